"""S2T-LOCAL bundles: `bundle.json` + `adapter.gguf` and/or `reranker.onnx` (+ optionally the
GGUF), a folder or a .tar.

Loading verifies everything before any decoding: the manifest against its one schema
(`s2t_edge.manifest`), the ONNX and adapter files' size and sha256 (a truncated or tampered file is
refused), K and feature version, and that the GGUF it will run on is the SLM the bundle was made
for (vocabulary size, a fast fingerprint, then the full sha256, computed once per file and cached).
A `.tar` is extracted into a temporary folder renamed atomically into the cache, so an interrupted
extraction never leaves a cache entry that refuses the good archive.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from s2t_edge.errors import S2TError
from s2t_edge.manifest import FEATURE_VERSION, FORMAT_VERSION, ManifestError, validate_manifest
from s2t_edge.store import cached_sha256, sha256_file, store_dir

__all__ = ["FEATURE_VERSION", "FORMAT_VERSION", "Bundle", "load_bundle", "fingerprint", "cached_sha256"]

MANIFEST = "bundle.json"
ONNX_NAME = "reranker.onnx"
ADAPTER_NAME = "adapter.gguf"
_COMPLETE = ".extracted"  # written last inside an extraction, before the atomic rename


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
    def has_reranker(self) -> bool:
        return "onnx_sha256" in self.manifest

    @property
    def onnx_path(self) -> Path | None:
        return self.root / ONNX_NAME if self.has_reranker else None

    @property
    def adapter(self) -> dict | None:
        """The manifest's adapter section (file, sha256, rank, alpha, export check...), if any."""
        return self.manifest.get("adapter") if self.manifest["format_version"] >= 2 else None

    @property
    def adapter_path(self) -> Path | None:
        return self.root / self.adapter["file"] if self.adapter else None

    @property
    def adapter_scale(self) -> float:
        return float(self.adapter.get("scale", 1.0)) if self.adapter else 0.0

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

    @property
    def digest(self) -> str:
        """sha256 of the canonical manifest: it names the ONNX and adapter sha256 and every
        setting, so it identifies what the bundle decodes (e.g. to key resumable results)."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    def check_slm(self, gguf_path: str | Path, n_vocab: int | None = None) -> None:
        """Refuse to run this bundle on a GGUF other than the one it was made for: vocabulary size
        (when given), fingerprint, then the full sha256 (cached)."""
        slm = self.manifest["slm"]
        if n_vocab is not None and n_vocab != slm["vocab_size"]:
            raise S2TError(
                f"bundle {self.root} is for a {slm['vocab_size']}-id vocabulary, {Path(gguf_path).name} has {n_vocab}"
            )
        if fingerprint(gguf_path) != slm["fingerprint"] or cached_sha256(gguf_path) != slm["sha256"]:
            raise S2TError(
                f"bundle {self.root} was built for {slm['name']} (sha256 {slm['sha256'][:12]}…), "
                f"not {Path(gguf_path).name}; use a bundle exported for this model"
            )

    def describe(self, label: str | None = None) -> list[str]:
        """What `s2t-edge bundle inspect` prints: one line per part, verified."""
        m, slm = self.manifest, self.manifest["slm"]
        lines = [
            f"bundle {label or self.root} (format {m['format_version']}) — verified",
            f"  SLM        {slm['name']}  sha256 {slm['sha256'][:16]}…  vocab {slm['vocab_size']}  "
            f"GGUF {'bundled' if slm.get('bundled_file') else 'not bundled (models pull)'}",
        ]
        if self.adapter:
            a, c = self.adapter, self.adapter["check"]
            lines.append(
                f"  adapter    LoRA r={a['rank']} alpha {a['alpha']:g} on {','.join(a['target_modules'])}  "
                f"{a.get('dtype', '?')}  {a['size'] / 1e6:.1f} MB  scale {self.adapter_scale:g}"
            )
            lines.append(
                f"  export     llama.cpp vs torch+peft on {c['positions']} positions: top-1 agreement "
                f"{c['top1_agreement']:.4f}, logit correlation {c['correlation_mean']:.4f}"
            )
            t = a.get("training", {}).get("metrics", {})
            if isinstance(t, dict) and t:
                lines.append("  training   " + ", ".join(f"{k} {_fmt(v)}" for k, v in list(t.items())[:6]))
        if self.has_reranker:
            t = m.get("training", {}).get("test", {})
            t = t if isinstance(t, dict) else {}
            lines.append(
                f"  reranker   K={m['k']}  features v{m['feature_version']}  threshold {m['threshold']:.3f}  "
                f"opset {m['onnx_opset']}  parity {m['onnx_parity_max_abs_diff']:.1e}  "
                f"{self.onnx_path.stat().st_size / 1e6:.1f} MB"
            )
            lines.append(
                f"  held-out   agreement {_fmt(t.get('agreement'))} vs greedy {_fmt(t.get('greedy_agreement'))}, "
                f"hit@1 at divergence {_fmt(t.get('hit1_at_divergence'))}"
            )
        else:
            lines.append(f"  policy     s2t-local = greedy over the adapted SLM (K={m['k']}), no reranker")
        pk = m.get("packages", {})
        lines.append(f"  packages   {', '.join(f'{k} {v}' for k, v in pk.items()) if isinstance(pk, dict) else '?'}")
        return lines


def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _unpack(archive: Path) -> Path:
    """Extract a bundle archive once into the cache, keyed by the archive's hash: into a temporary
    folder, marked complete, then renamed atomically (a leftover from an interrupted extraction
    is never mistaken for a complete one)."""
    dest = store_dir().parent / "bundles" / cached_sha256(archive)[:16]
    if (dest / _COMPLETE).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (tmp / _COMPLETE).write_text(str(archive))
        if dest.exists() and not (dest / _COMPLETE).exists():  # an incomplete leftover
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / _COMPLETE).exists():  # not another process winning the same race
                raise
    except (tarfile.TarError, OSError) as e:
        raise S2TError(f"{archive}: not a readable bundle archive ({e})") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _verify_file(path: Path, sha256: str, size: int | None, what: str) -> None:
    if not path.is_file():
        raise S2TError(f"{path.parent}: bundle has no {path.name} ({what})")
    if size is not None and path.stat().st_size != size:
        raise S2TError(
            f"{path}: {path.stat().st_size} bytes, the manifest says {size} (truncated or modified); "
            "re-export the bundle"
        )
    if sha256_file(path) != sha256:
        raise S2TError(f"{path}: sha256 does not match the manifest (truncated or modified); re-export the bundle")


def load_adapter_bundle(path: str | Path, slm_path: str | Path, use: str, n_vocab: int | None = None) -> Bundle:
    """A bundle whose LoRA adapter is needed (`use` says for what), checked against the SLM's GGUF."""
    b = load_bundle(path)
    if b.adapter_path is None:
        raise S2TError(f"{path}: this bundle has no LoRA adapter {use}")
    b.check_slm(slm_path, n_vocab)
    return b


def load_bundle(path: str | Path) -> Bundle:
    """Open and verify a bundle folder or `.tar` archive."""
    p = Path(path)
    if not p.exists():
        raise S2TError(f"{p}: no such bundle")
    root = _unpack(p) if p.is_file() else p
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise S2TError(f"{p}: not a bundle (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise S2TError(f"{mpath}: manifest is not valid JSON ({e})") from e
    try:
        validate_manifest(manifest)
    except ManifestError as e:
        raise S2TError(f"{mpath}: {e}") from e
    bundle = Bundle(root, manifest)
    if bundle.has_reranker:
        _verify_file(root / ONNX_NAME, manifest["onnx_sha256"], None, "the ONNX reranker")
    if bundle.adapter:
        _verify_file(bundle.adapter_path, bundle.adapter["sha256"], bundle.adapter["size"], "the LoRA adapter")
    return bundle


def default_bundle_path() -> Path | None:
    """The bundle shipped with the package (`models/default-bundle`), if present."""
    from importlib.resources import files

    try:
        p = Path(str(files("s2t_edge.assets") / "default-bundle"))
    except ModuleNotFoundError:
        p = Path(__file__).resolve().parent.parent / "models" / "default-bundle"
    return p if (p / MANIFEST).exists() else None
