"""Labelled candidate groups on disk: one compressed `.npz` shard per problem plus a manifest.

A shard is written to a temporary name and renamed, so a crash or Ctrl-C never leaves a shard
that looks complete; a rerun skips the problems whose shard exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from s2t_edge.errors import S2TError

SCHEMA_VERSION = 1

# Per-position arrays (first axis = generated position) stored in every shard.
POSITION_FIELDS = (
    "slm_ids",  # int32 [T, K]   SLM top-K ids, best first
    "slm_logits",  # float32 [T, K]
    "hidden",  # float16 [T, H]  SLM final hidden state at the step
    "entropy",  # float32 [T]    over the top-K support
    "margin",  # float32 [T]     top-1 minus top-2 logit
    "teacher_probs",  # float32 [T, K]  teacher probability of each SLM candidate
    "teacher_top1",  # int32 [T]      teacher full-vocabulary argmax
    "teacher_top1_prob",  # float32 [T]
    "kl",  # float32 [T]            KL(teacher || SLM) on the top-K support
    "chosen",  # int32 [T]          the token the trajectory took
)


def shard_name(problem_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in problem_id) + ".npz"


def write_shard(out_dir: Path, problem_id: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Atomically write one problem's shard."""
    missing = [f for f in POSITION_FIELDS if f not in arrays]
    if missing:
        raise ValueError(f"shard is missing fields {missing}")
    return write_npz(out_dir, problem_id, arrays, {"schema": SCHEMA_VERSION, **meta})


def write_npz(out_dir: Path, problem_id: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Atomically write one problem's `.npz` (arrays + a JSON `meta` that names the problem)."""
    path = out_dir / shard_name(problem_id)
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, meta=np.array(json.dumps({**meta, "problem_id": problem_id})), **arrays)
    os.replace(tmp, path)
    return path


def read_npz(path: Path, schema: int, arrays: bool = True, kind: str = "shard") -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of one problem's `.npz`; another schema version is refused."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("schema") != schema:
                raise S2TError(
                    f"{path}: {kind} schema {meta.get('schema')} but this s2t-edge reads "
                    f"schema {schema}; {'re-collect' if kind == 'shard' else 're-label'} with this version"
                )
            return meta, ({k: z[k] for k in z.files if k != "meta"} if arrays else {})
    except (OSError, ValueError, KeyError) as e:
        raise S2TError(f"{path}: not a readable {kind} ({e})") from e


def read_shard(path: Path, arrays: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of one shard; a shard of another schema version is refused."""
    return read_npz(path, SCHEMA_VERSION, arrays)


def read_shard_meta(path: Path) -> dict:
    """Only the metadata of a shard (its arrays are not decompressed)."""
    return read_shard(path, arrays=False)[0]


def shard_paths(group_dir: Path) -> list[Path]:
    return sorted(p for p in Path(group_dir).glob("*.npz") if not p.name.endswith(".tmp.npz"))


def iter_shards(group_dir: str | Path) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
    """Every shard of a groups directory; refuses an empty or mixed-schema directory."""
    group_dir = Path(group_dir)
    if not group_dir.is_dir():
        raise S2TError(f"{group_dir}: no such groups directory")
    paths = shard_paths(group_dir)
    if not paths:
        raise S2TError(f"{group_dir}: no shards (*.npz) here; run `s2t-edge collect` first")
    for p in paths:
        yield read_shard(p)


def read_manifest(group_dir: Path) -> dict | None:
    path = Path(group_dir) / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("schema") != SCHEMA_VERSION:
        raise S2TError(f"{path}: manifest schema {manifest.get('schema')}, expected {SCHEMA_VERSION}")
    return manifest


def write_manifest(group_dir: Path, manifest: dict) -> None:
    path = Path(group_dir) / "manifest.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"schema": SCHEMA_VERSION, **manifest}, indent=2))
    os.replace(tmp, path)
