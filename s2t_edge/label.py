"""`s2t-edge label`: compact teacher labels at scale, for training an adapter on the SLM.

Trajectories are the teacher's own greedy answers, decoded many problems at once (one llama.cpp
batch per step); the teacher's log-probabilities are kept at every step. Each finished answer is
then prefilled once through the SLM, which gives the SLM's top-K at every position, and the
teacher's log-probability of each of those K ids is looked up. One small `.npz` per problem
(no hidden states, ≈ 10 KB), written atomically, so a killed run resumes where it stopped and the
labels can be committed.

Why the teacher's trajectories: S2T (the teacher selecting among the SLM's top-K) and the teacher
alone reach the same accuracy, the teacher's token lies in the SLM's top-8 at ≈ 98% of divergence
points, and its trajectories batch without the SLM in lockstep (the cheapest of the three).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from s2t_edge.batch import decode_batch
from s2t_edge.candidates import top_k
from s2t_edge.collect import problem_prompt
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.eval.data import Problem, load_problems
from s2t_edge.eval.grading import extract_answer, is_correct
from s2t_edge.locks import lock_folder
from s2t_edge.policy import greedy
from s2t_edge.progress import Progress
from s2t_edge.prompt import ChatTemplate
from s2t_edge.shards import read_manifest, read_npz, shard_name, shard_paths, write_manifest, write_npz
from s2t_edge.store import cached_sha256, sha256_file
from s2t_edge.teacher import check_same_vocab, log_softmax

LABEL_SCHEMA = 1
TEACHER_TOP = 64  # teacher log-probs kept per step; an SLM candidate outside them gets the 64th (an upper bound)

# Per-problem arrays of a label file.
LABEL_FIELDS = (
    "prompt",  # int32 [P]        the chat prompt's token ids
    "chosen",  # int32 [T]        the trajectory (teacher greedy; the end-of-turn token included)
    "slm_ids",  # int32 [T, K]    SLM top-K at each position, best first (llama.cpp, the GGUF)
    "slm_logprobs",  # float16 [T, K]   SLM full-vocabulary log-probs of those ids
    "teacher_logprobs",  # float16 [T, K]   teacher full-vocabulary log-probs of the same ids
    "teacher_top1",  # int32 [T]      the teacher's own top-1 (= chosen)
)


@dataclass
class _Pending:
    """A problem the teacher is decoding: its per-step top log-probs so far."""

    problem: Problem
    prompt: list[int]
    steps: list[tuple[np.ndarray, np.ndarray]]  # (ids, log-probs) of the teacher's top TEACHER_TOP


def slm_labels(slm: Engine, prompt: list[int], traj: list[int], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The SLM's top-K ids and log-probs at every trajectory position, from one prefill."""
    ids, lps = [], []
    for _, logits in slm.score(prompt + traj[:-1], len(prompt) - 1):
        top = top_k(logits, k)
        ids.append(top)
        lps.append(log_softmax(logits)[top])
    return np.stack(ids).astype(np.int32), np.stack(lps)


def lookup(teacher_top: tuple[np.ndarray, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Teacher log-probs of `ids`; ids outside the kept top get the smallest kept value."""
    t_ids, t_lps = teacher_top
    where = {int(t): i for i, t in enumerate(t_ids)}
    floor = float(t_lps[-1])
    return np.array([t_lps[where[int(i)]] if int(i) in where else floor for i in ids], np.float32)


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


def label(
    slm_path: Path,
    teacher_path: Path,
    data: Path,
    out_dir: Path,
    *,
    limit: int | None = None,
    k: int = 8,
    max_tokens: int = 400,
    batch: int = 16,
    threads: int | None = None,
    gpu_layers: int = 0,
    progress: bool = True,
) -> dict:
    """Label the first `limit` problems of `data` into `out_dir` (resumable). Returns the manifest."""
    problems, _ = load_problems(data, limit=limit)
    settings = {
        "slm_sha256": cached_sha256(slm_path),  # hashed once per file, not at every resume
        "teacher_sha256": cached_sha256(teacher_path),
        "data_sha256": sha256_file(data),
        "k": k,
        "max_tokens": max_tokens,
        "teacher_top": TEACHER_TOP,
        "trajectories": "teacher-greedy",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_folder(out_dir):  # one run per labels folder
        old = read_manifest(out_dir)
        if old and old.get("settings") != settings:
            diff = [key for key in settings if old.get("settings", {}).get(key) != settings[key]]
            raise S2TError(f"{out_dir} holds labels made with other settings ({', '.join(diff)}); use another --out")
        write_manifest(out_dir, {"settings": settings, "data": data.name, "problems": len(shard_paths(out_dir))})
        done = {p.name for p in shard_paths(out_dir)}
        todo = [p for p in problems if shard_name(p.id) not in done]
        with contextlib.ExitStack() as stack:  # closes whichever engines were opened, however this ends
            slm = stack.enter_context(
                Engine(slm_path, n_ctx=max_tokens + 2048, n_threads=threads, n_gpu_layers=gpu_layers)
            )
            # A cache per sequence: with one unified cache every token attends over all sequences' cells
            # (5x slower steps at 16 x 400 tokens); the queue keeps every slot busy, so the active
            # sequences stay consecutive and a step is still one ubatch.
            teacher = stack.enter_context(
                Engine(
                    teacher_path,
                    n_ctx=batch * (max_tokens + 1024),
                    n_threads=threads,
                    n_gpu_layers=gpu_layers,
                    n_seq=batch,
                    unified=False,
                )
            )
            check_same_vocab(slm, teacher)
            template = ChatTemplate(teacher)
            pending = [_Pending(p, problem_prompt(teacher, template, p.question), []) for p in todo]
            too_long = [q for q in pending if len(q.prompt) + max_tokens > teacher.n_ctx_seq]
            if too_long:
                q = too_long[0]
                raise S2TError(
                    f"problem {q.problem.id}: its {len(q.prompt)}-token prompt + --max-tokens {max_tokens} > the "
                    f"{teacher.n_ctx_seq} tokens a sequence can hold; lower --max-tokens"
                )

            def keep(i: int, logits: np.ndarray) -> None:
                top = top_k(logits, TEACHER_TOP)
                pending[i].steps.append((top, log_softmax(logits)[top]))

            bar = Progress(len(todo), "label", progress)
            n_done = n_correct = 0
            try:
                prompts = [q.prompt for q in pending]
                for i, out, stats in decode_batch(teacher, prompts, greedy(1), max_tokens=max_tokens, on_logits=keep):
                    q = pending[i]
                    traj = out + ([stats.stop_token] if stats.stop_token is not None else [])
                    if len(q.steps) != len(traj):  # one teacher row per step, or the labels would shift
                        raise RuntimeError(f"{q.problem.id}: {len(q.steps)} teacher rows for {len(traj)} tokens")
                    ids, slm_lps = slm_labels(slm, q.prompt, traj, k)
                    t_lps = np.stack([lookup(step, row) for step, row in zip(q.steps, ids)])
                    pred = extract_answer(teacher.detokenize(out), complete=stats.finish_reason == "stop")
                    meta = {
                        "gold": q.problem.gold,
                        "pred": pred,
                        "correct": is_correct(pred, q.problem.gold),
                        "tokens": len(traj),
                        "finish_reason": stats.finish_reason,
                        "batch": batch,  # batched kernels may break near-ties differently
                    }
                    arrays = {
                        "prompt": np.array(q.prompt, np.int32),
                        "chosen": np.array(traj, np.int32),
                        "slm_ids": ids,
                        "slm_logprobs": slm_lps.astype(np.float16),
                        "teacher_logprobs": t_lps.astype(np.float16),
                        "teacher_top1": np.array([s[0][0] for s in q.steps], np.int32),
                    }
                    write_label(out_dir, q.problem.id, arrays, meta)
                    q.steps = []
                    n_done += 1
                    n_correct += meta["correct"]
                    bar.update(note=f"teacher acc {n_correct / n_done:.2f}")
            finally:
                bar.close()
    n = len(shard_paths(out_dir))
    manifest = {"settings": settings, "data": data.name, "problems": n}
    write_manifest(out_dir, manifest)
    return manifest


def summarize_labels(out_dir: Path) -> dict:
    """What a labels folder holds: problems, the teacher's accuracy, and local sufficiency on the
    teacher's trajectories (how often its token is the SLM's top-1, 2nd, or inside its top-K)."""
    paths = shard_paths(out_dir)
    if not paths:
        raise S2TError(f"{out_dir}: no label files; run `s2t-edge label` first")
    n_correct = n_cut = 0
    ranks = []
    for p in paths:
        meta, a = read_label(p)
        n_correct += bool(meta["correct"])
        n_cut += meta["finish_reason"] != "stop"
        hit = a["slm_ids"] == a["teacher_top1"][:, None]
        ranks.append(np.where(hit.any(1), hit.argmax(1) + 1, 0))  # 1-based rank, 0 = outside top-K
    r = np.concatenate(ranks)
    div = r != 1
    return {
        "problems": len(paths),
        "teacher_accuracy": n_correct / len(paths),
        "truncated": n_cut,
        "positions": int(len(r)),
        "k": int(a["slm_ids"].shape[1]),
        "divergence_rate": float(div.mean()),
        "at_divergence_rank2": float((r[div] == 2).mean()) if div.any() else None,
        "at_divergence_in_topk": float((r[div] > 0).mean()) if div.any() else None,
        "bytes_per_problem": int(sum(p.stat().st_size for p in paths) / len(paths)),
    }
