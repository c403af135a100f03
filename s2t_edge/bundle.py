"""S2T-LOCAL bundles: `bundle.json` + `reranker.onnx` (+ optionally the GGUF), a folder or a .tar.

Loading verifies everything before any decoding: format version, the ONNX file's sha256 (a
truncated or tampered file is refused), K and feature version, and that the GGUF it will run on
is the SLM the reranker was trained for (sha256 fingerprint and vocabulary size).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from s2t_edge.errors import S2TError
from s2t_edge.store import sha256_file

FORMAT_VERSION = 1
FEATURE_VERSION = 1
MANIFEST = "bundle.json"
ONNX_NAME = "reranker.onnx"


def fingerprint(gguf_path: str | Path) -> str:
    """A fast identity for a GGUF: sha256 of its size, first and last MiB (milliseconds, not a
    full hash of half a gigabyte at every start). The manifest also records the full sha256."""
    p = Path(gguf_path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict

    @property
    def onnx_path(self) -> Path:
        return self.root / ONNX_NAME

    @property
    def gguf_path(self) -> Path | None:
        name = self.manifest["slm"].get("bundled_file")
        return self.root / name if name else None

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])

    @property
    def select_rule(self) -> str:
        """Where the trigger fires: "best" scored candidate, or best "alternative" to the top-1."""
        return self.manifest.get("select_rule", "best")

    def check_slm(self, gguf_path: str | Path, n_vocab: int) -> None:
        """Refuse to run this reranker on a GGUF other than the one it was trained for."""
        slm = self.manifest["slm"]
        if n_vocab != slm["vocab_size"]:
            raise S2TError(
                f"bundle {self.root} is for a {slm['vocab_size']}-id vocabulary, {Path(gguf_path).name} has {n_vocab}"
            )
        if fingerprint(gguf_path) != slm["fingerprint"]:
            raise S2TError(
                f"bundle {self.root} was built for {slm['name']} (sha256 {slm['sha256'][:12]}…), "
                f"not {Path(gguf_path).name}; use a bundle exported for this model"
            )


def _unpack(archive: Path) -> Path:
    """Extract a bundle archive once into the cache, keyed by the archive's hash."""
    from s2t_edge.store import store_dir

    dest = store_dir().parent / "bundles" / sha256_file(archive)[:16]
    if not (dest / MANIFEST).exists():
        dest.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")
        except (tarfile.TarError, OSError) as e:
            raise S2TError(f"{archive}: not a readable bundle archive ({e})") from e
    return dest


def load_bundle(path: str | Path) -> Bundle:
    """Open and verify a bundle folder or `.tar` archive."""
    p = Path(path)
    if not p.exists():
        raise S2TError(f"{p}: no such bundle")
    root = _unpack(p) if p.is_file() else p
    mpath = root / MANIFEST
    if not mpath.exists():
        raise S2TError(f"{p}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise S2TError(f"{mpath}: manifest is not valid JSON ({e})") from e
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise S2TError(f"{mpath}: manifest has no integer format_version; not an s2t-edge bundle")
    if version > FORMAT_VERSION:
        raise S2TError(
            f"{mpath}: bundle format {version} is newer than this s2t-edge reads ({FORMAT_VERSION}); upgrade s2t-edge"
        )
    if manifest.get("feature_version") != FEATURE_VERSION:
        raise S2TError(
            f"{mpath}: reranker feature version {manifest.get('feature_version')}, "
            f"this runtime computes version {FEATURE_VERSION}"
        )
    onnx = root / ONNX_NAME
    if not onnx.exists():
        raise S2TError(f"{p}: bundle has no {ONNX_NAME}")
    if sha256_file(onnx) != manifest.get("onnx_sha256"):
        raise S2TError(f"{onnx}: sha256 does not match the manifest (truncated or modified); re-export the bundle")
    return Bundle(root, manifest)


def default_bundle_path() -> Path | None:
    """The bundle shipped with the package (`models/default-bundle`), if present."""
    from importlib.resources import files

    try:
        p = Path(str(files("s2t_edge.assets") / "default-bundle"))
    except ModuleNotFoundError:
        p = Path(__file__).resolve().parent.parent / "models" / "default-bundle"
    return p if (p / MANIFEST).exists() else None
