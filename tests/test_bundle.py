"""Bundle format 2: the manifest schema, adapter verification, format-1 compatibility, the full
SLM sha256 (cached) and atomic `.tar` extraction."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from s2t_edge import store
from s2t_edge.bundle import ADAPTER_NAME, MANIFEST, cached_sha256, default_bundle_path, load_bundle
from s2t_edge.errors import S2TError
from s2t_edge.manifest import FORMAT_VERSION
from tests.test_adapter import adapter_bundle

RERANKER_V1 = Path(__file__).parent / "data" / "reranker-bundle-v1"  # the format-1 bundle shipped until adapter 9


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Path:
    """An adapter-only bundle with its GGUF, and its .tar."""
    return adapter_bundle(tmp_path_factory.mktemp("bundle") / "bundle", tiny_gguf, archive=True).with_suffix("")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("S2T_EDGE_MODELS", str(tmp_path / "store" / "models"))
    return tmp_path / "store"


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit(root: Path, fn) -> None:
    m = json.loads((root / MANIFEST).read_text())
    fn(m)
    (root / MANIFEST).write_text(json.dumps(m))


def test_adapter_bundle_loads(bundle: Path, tiny_gguf: Path, cache: Path) -> None:
    b = load_bundle(bundle)
    assert b.manifest["format_version"] == FORMAT_VERSION == 2 and b.adapter_path == bundle / ADAPTER_NAME
    b.check_slm(tiny_gguf, b.manifest["slm"]["vocab_size"])
    out = CliRunner().invoke(_cli(), ["bundle", "inspect", str(bundle)])
    assert out.exit_code == 0, out.output
    assert "adapter    LoRA r=4 alpha 8" in out.output and "top-1 agreement" in out.output


def test_default_bundle_is_an_adapter_for_the_default_slm() -> None:
    """The shipped default: format 2, a LoRA adapter made for the registry's default SLM, no reranker."""
    from s2t_edge.store import default_model, load_registry

    b = load_bundle(default_bundle_path())
    slm = load_registry()[default_model()]
    assert b.manifest["slm"]["name"] == slm.name and b.manifest["slm"]["sha256"] == slm.sha256
    assert b.manifest["format_version"] == 2 and b.adapter is not None and not b.has_reranker
    assert b.adapter["base_sha256"] == slm.sha256 and b.adapter["size"] <= 20_000_000


def _cli():
    from s2t_edge.cli import main

    return main


def test_format_1_bundle_still_loads(tmp_path: Path) -> None:
    shipped = RERANKER_V1
    b = load_bundle(shipped)
    assert b.manifest["format_version"] == 1 and b.has_reranker and b.adapter is None and b.adapter_path is None
    assert b.k == 8 and 0 <= b.threshold <= 1 and b.onnx_path.is_file()
    root = copy(shipped, tmp_path / "v1")
    edit(root, lambda m: m.update(adapter={"file": "whatever"}))  # format 1 has no adapter section
    assert load_bundle(root).adapter is None


@pytest.mark.parametrize("damage", ["truncate", "tamper", "delete"])
def test_damaged_adapter_refused(bundle: Path, tmp_path: Path, damage: str) -> None:
    root = copy(bundle, tmp_path / "b")
    f = root / ADAPTER_NAME
    data = bytearray(f.read_bytes())
    if damage == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
        match = "bytes, the manifest says .*truncated"
    elif damage == "tamper":
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
        match = "sha256 does not match"
    else:
        f.unlink()
        match = "bundle has no adapter.gguf"
    with pytest.raises(S2TError, match=match):
        load_bundle(root)


def test_adapter_for_other_slm_refused(bundle: Path, tmp_path: Path, tiny_teacher_gguf: Path) -> None:
    root = copy(bundle, tmp_path / "b")
    edit(root, lambda m: m["adapter"].update(base_sha256="ab" * 32))
    with pytest.raises(S2TError, match="adapter was trained on another SLM"):
        load_bundle(root)
    b = load_bundle(bundle)
    with pytest.raises(S2TError, match="was built for"):
        b.check_slm(tiny_teacher_gguf)


def test_full_sha256_checked(bundle: Path, tmp_path: Path, tiny_gguf: Path, cache: Path) -> None:
    """Same size and fingerprint, another sha256 in the manifest: refused by the full hash."""
    root = copy(bundle, tmp_path / "b")

    def other_sha(m: dict) -> None:
        m["slm"]["sha256"] = m["adapter"]["base_sha256"] = "cd" * 32

    edit(root, other_sha)
    with pytest.raises(S2TError, match="was built for"):
        load_bundle(root).check_slm(tiny_gguf)


def test_sha256_cached(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + b"x" * 5000)
    calls = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda p: calls.append(p) or real(p))
    first = cached_sha256(f)
    assert cached_sha256(f) == first == real(f) and len(calls) == 1  # hashed once
    assert len(list((cache / "sha256").iterdir())) == 1
    f.write_bytes(b"GGUF" + b"y" * 5001)  # size and mtime change: hashed again
    assert cached_sha256(f) == real(f) != first and len(calls) == 2


def _set(path: str, value):
    def fn(m: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            m = m[p]
        if value is KeyError:
            del m[last]
        else:
            m[last] = value

    return fn


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("k", "8", r"k: expected an integer in 1\.\.32, got '8'"),
        ("k", 0, r"k: expected an integer in 1\.\.32"),
        ("k", 33, r"k: expected an integer"),
        ("k", True, r"k: expected an integer"),
        ("k", KeyError, "k: required key is missing"),
        ("slm", KeyError, "slm: required key is missing"),
        ("slm", [1, 2], "slm: expected an object"),
        ("slm.sha256", "abc", "slm.sha256: expected a 64-hex sha256, got 'abc'"),
        ("slm.vocab_size", KeyError, "slm.vocab_size: required key is missing"),
        ("slm.size", 1.5, "slm.size: expected an integer"),
        ("slm.bundled_file", "../../etc/passwd", "slm.bundled_file: expected a string matching"),
        ("adapter.rank", "16", "adapter.rank: expected an integer"),
        ("adapter.alpha", float("nan"), r"adapter.alpha: expected a finite number"),
        ("adapter.target_modules", [], "adapter.target_modules: expected a list"),
        ("adapter.sha256", None, "adapter.sha256: expected a 64-hex sha256"),
        ("adapter.check", KeyError, "adapter.check: required key is missing"),
        ("adapter.check.top1_agreement", 1.5, r"top1_agreement: expected a finite number in \[0, 1\]"),
        ("adapter", None, "neither a reranker"),
        ("format_version", FORMAT_VERSION + 1, f"format {FORMAT_VERSION + 1} is newer"),
        ("format_version", "2", "no integer format_version"),
        ("format_version", 0, r"format_version: expected an integer in 1\.\.2"),
    ],
)
def test_bad_manifest_refused(bundle: Path, tmp_path: Path, path: str, value, message: str) -> None:
    root = copy(bundle, tmp_path / "b")
    edit(root, _set(path, value))
    with pytest.raises(S2TError, match=message) as e:
        load_bundle(root)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(root / MANIFEST))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("threshold", float("nan"), "threshold: expected a finite number"),
        ("threshold", -0.1, "threshold: expected a finite number in"),
        ("threshold", "0.5", "threshold: expected a finite number"),
        ("threshold", float("inf"), "threshold: expected a finite number"),
        ("select_rule", "worst", "select_rule: expected one of best, alternative"),
        ("onnx_sha256", 7, "onnx_sha256: expected a 64-hex sha256"),
        ("feature_version", 99, "feature version 99"),
        ("onnx_opset", KeyError, "onnx_opset: required key is missing"),
    ],
)
def test_bad_reranker_manifest_refused(tmp_path: Path, key: str, value, message: str) -> None:
    root = copy(RERANKER_V1, tmp_path / "v1")
    edit(root, _set(key, value))
    with pytest.raises(S2TError, match=message):
        load_bundle(root)


def test_not_an_object_manifest(tmp_path: Path, bundle: Path) -> None:
    root = copy(bundle, tmp_path / "b")
    for text in ("[1, 2]", '"x"', "null", "\xff\xfe"):
        (root / MANIFEST).write_bytes(text.encode("latin-1"))
        with pytest.raises(S2TError, match="format_version|not valid JSON|expected a JSON object"):
            load_bundle(root)


def test_tar_extraction_is_atomic(bundle: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An extraction interrupted half-way (Ctrl-C, kill) leaves no cache entry that refuses the
    good archive; an in-place leftover of an older version is replaced."""
    tar = bundle.with_suffix(".tar")
    real = tarfile.TarFile.extractall

    def interrupted(self, path, *a, **kw):
        member = next(m for m in self.getmembers() if m.name == MANIFEST)
        self.extract(member, path, filter="data")
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "extractall", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_bundle(tar)
    monkeypatch.setattr(tarfile.TarFile, "extractall", real)
    leftovers = list((cache / "bundles").iterdir())
    assert not leftovers  # the temporary folder was removed, nothing named like the cache entry
    b = load_bundle(tar)
    assert b.root.parent == cache / "bundles" and b.adapter_path.is_file()
    # an older version's half-extracted entry under the final name: re-extracted, not trusted
    shutil.rmtree(b.root)
    b.root.mkdir()
    (b.root / MANIFEST).write_text((bundle / MANIFEST).read_text())
    (b.root / ADAPTER_NAME).write_bytes(b"cut")
    again = load_bundle(tar)
    assert again.root == b.root and again.adapter_path.read_bytes() == (bundle / ADAPTER_NAME).read_bytes()
