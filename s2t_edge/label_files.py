"""The label file format: one `.npz` per labelled answer (its fields, its id, reading and writing
it) and what a labels folder holds (`s2t-edge analyze labels`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from s2t_edge.errors import S2TError
from s2t_edge.shards import read_manifest, read_npz, shard_paths, write_npz

LABEL_SCHEMA = 1

# Per-problem arrays of a label file.
LABEL_FIELDS = (
    "prompt",  # int32 [P]        the chat prompt's token ids
    "chosen",  # int32 [T]        the trajectory (teacher greedy; the end-of-turn token included)
    "slm_ids",  # int32 [T, K]    SLM top-K at each position, best first (llama.cpp, the GGUF)
    "slm_logprobs",  # float16 [T, K]   SLM full-vocabulary log-probs of those ids
    "teacher_logprobs",  # float16 [T, K]   teacher full-vocabulary log-probs of the same ids
    "teacher_top1",  # int32 [T]      the teacher's own top-1 (= chosen)
)


def label_id(problem_id: str, sample: int | None) -> str:
    """A label file's id: the problem's, with `.s<j>` for its j-th sampled answer."""
    return problem_id if sample is None else f"{problem_id}.s{sample}"


def label_problem(meta: dict) -> str:
    """The problem a label file answers (a sampled answer's file id carries `.s<j>`)."""
    return meta.get("problem", meta["problem_id"])


def write_label(out_dir: Path, problem_id: str, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Atomically write one problem's label file."""
    return write_npz(out_dir, problem_id, arrays, {"schema": LABEL_SCHEMA, **meta})


def read_label(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays) of one label file."""
    meta, arrays = read_npz(path, LABEL_SCHEMA, kind="label file")
    missing = [f for f in LABEL_FIELDS if f not in arrays]
    if missing:
        raise S2TError(f"{path}: label file without {', '.join(missing)}")
    return meta, arrays


def unscored_arrays(k: int) -> dict[str, np.ndarray]:
    """The score fields of an answer that was not scored (`label --score right`): no rows."""
    return {
        "slm_ids": np.zeros((0, k), np.int32),
        "slm_logprobs": np.zeros((0, k), np.float16),
        "teacher_logprobs": np.zeros((0, k), np.float16),
        "teacher_top1": np.zeros(0, np.int32),
    }


def summarize_labels(out_dir: Path) -> dict:
    """What a labels folder holds: problems, whose trajectories and their accuracy, and local
    sufficiency on them (how often the teacher's token is the SLM's top-1, 2nd, or inside its top-K)."""
    paths = shard_paths(out_dir)
    if not paths:
        raise S2TError(f"{out_dir}: no label files; run `s2t-edge label` first")
    n_correct = n_cut = n_scored = 0
    ranks = []
    solved: dict[str, bool] = {}  # problem -> any of its answers right (sampled folders hold several)
    for p in paths:
        meta, a = read_label(p)
        n_correct += bool(meta["correct"])
        q = label_problem(meta)
        solved[q] = solved.get(q, False) or bool(meta["correct"])
        n_cut += meta["finish_reason"] != "stop"
        n_scored += meta.get("scored", True)
        hit = a["slm_ids"] == a["teacher_top1"][:, None]
        ranks.append(np.where(hit.any(1), hit.argmax(1) + 1, 0))  # 1-based rank, 0 = outside top-K
    r = np.concatenate(ranks)
    div = r != 1
    return {
        "problems": len(solved),
        "answers": len(paths),
        "solved": sum(solved.values()),  # problems with at least one right answer
        "trajectories": (read_manifest(out_dir) or {}).get("settings", {}).get("trajectories"),
        "accuracy": n_correct / len(paths),  # of the labelled trajectories' answers
        "truncated": n_cut,
        "scored": n_scored,  # answers with the SLM's top-K and the teacher's log-probs (score="right": the right ones)
        "positions": int(len(r)),
        "k": int(a["slm_ids"].shape[1]),
        "divergence_rate": float(div.mean()) if len(r) else None,
        "at_divergence_rank2": float((r[div] == 2).mean()) if div.any() else None,
        "at_divergence_in_topk": float((r[div] > 0).mean()) if div.any() else None,
        "bytes_per_answer": int(sum(p.stat().st_size for p in paths) / len(paths)),
    }
