"""Training arrays from collected groups, split by problem, and the SLM's output embedding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from s2t_edge.errors import S2TError
from s2t_edge.shards import iter_shards, read_manifest


@dataclass
class Groups:
    """Per-position arrays (first axis = position) for one split."""

    hidden: np.ndarray  # float16 [N, H]
    ids: np.ndarray  # int64 [N, K]
    logits: np.ndarray  # float32 [N, K]
    teacher_probs: np.ndarray  # float32 [N, K]
    teacher_top1: np.ndarray  # int64 [N]
    problem: np.ndarray  # int32 [N] index into `problem_ids`
    problem_ids: list[str]

    def __len__(self) -> int:
        return len(self.teacher_top1)

    @property
    def target(self) -> np.ndarray:
        """The teacher's choice among the K candidates."""
        return self.teacher_probs.argmax(1)

    @property
    def diverges(self) -> np.ndarray:
        """Divergence point: teacher full-vocabulary top-1 != SLM top-1."""
        return self.teacher_top1 != self.ids[:, 0]

    def subset(self, problems: set[int]) -> Groups:
        m = np.isin(self.problem, list(problems))
        return Groups(
            self.hidden[m],
            self.ids[m],
            self.logits[m],
            self.teacher_probs[m],
            self.teacher_top1[m],
            self.problem[m],
            self.problem_ids,
        )


def load_groups(group_dir: str | Path, k: int) -> tuple[Groups, dict]:
    """All positions of a groups directory, keeping the first `k` candidates."""
    manifest = read_manifest(Path(group_dir)) or {}
    cols: dict[str, list[np.ndarray]] = {
        n: [] for n in ("hidden", "slm_ids", "slm_logits", "teacher_probs", "teacher_top1")
    }
    problem, ids = [], []
    stored_k = None
    for meta, a in iter_shards(group_dir):
        if stored_k is None:
            stored_k = a["slm_ids"].shape[1]
        if a["slm_ids"].shape[1] != stored_k:
            raise S2TError(f"{group_dir}: shards hold different K ({stored_k} and {a['slm_ids'].shape[1]})")
        if a["hidden"].shape[1] == 0:
            raise S2TError(f"{group_dir}: shard {meta['problem_id']} has no hidden states")
        for name in cols:
            cols[name].append(a[name])
        problem.append(np.full(len(a["teacher_top1"]), len(ids), np.int32))
        ids.append(meta["problem_id"])
    if stored_k < k:
        raise S2TError(f"{group_dir}: groups hold top-{stored_k} candidates, cannot train K={k}")
    g = Groups(
        hidden=np.concatenate(cols["hidden"]),
        ids=np.concatenate(cols["slm_ids"])[:, :k].astype(np.int64),
        logits=np.concatenate(cols["slm_logits"])[:, :k].astype(np.float32),
        teacher_probs=np.concatenate(cols["teacher_probs"])[:, :k].astype(np.float32),
        teacher_top1=np.concatenate(cols["teacher_top1"]).astype(np.int64),
        problem=np.concatenate(problem),
        problem_ids=ids,
    )
    return g, manifest


def split_problems(n: int, seed: int, val: float = 0.2, test: float = 0.15) -> tuple[set[int], set[int], set[int]]:
    """Disjoint train / validation / test problem indices (no problem straddles two splits)."""
    order = np.random.default_rng(seed).permutation(n)
    n_test, n_val = max(1, int(n * test)), max(1, int(n * val))
    return (
        set(order[n_test + n_val :].tolist()),
        set(order[n_test : n_test + n_val].tolist()),
        set(order[:n_test].tolist()),
    )


def output_embedding(gguf_path: str | Path) -> np.ndarray:
    """The SLM's output-embedding matrix [V, H] (float16), dequantized from the GGUF.

    Uses `output.weight`, or `token_embd.weight` for models with tied embeddings.
    """
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    t = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if t is None:
        raise S2TError(f"{gguf_path}: no output.weight or token_embd.weight tensor")
    return dequantize(t.data, t.tensor_type).astype(np.float16)
