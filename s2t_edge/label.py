"""`s2t-edge label`: compact teacher labels at scale, for training an adapter on the SLM.

Two kinds of trajectories, decoded many problems at once (one llama.cpp batch per step):
- "teacher": the teacher's own greedy answers, its log-probabilities kept at every step; each
  finished answer is prefilled once through the SLM for the SLM's top-K at every position.
- "slm": the SLM's own greedy answers (optionally under a bundle's LoRA adapter): the states the
  student actually visits. Each is scored by the teacher in one prefill, which costs far less
  than the teacher decoding token by token. With `samples` / `temperature` the SLM samples N
  answers per problem from its top-K instead (seeded; for rejection sampling: its own right
  answers as training targets).
Either way a position stores the SLM's top-K and the teacher's log-probability of each of those
K ids. One small `.npz` per problem (no hidden states, ≈ 10 KB), written atomically, so a killed
run resumes where it stopped and the labels can be committed. With `score="right"` only the right
answers are scored (the prefills are most of a sampled answer's cost); a wrong one is kept as a
record (its tokens and grade, `scored: false` in its meta) that training skips.

Why the teacher's trajectories first: S2T (the teacher selecting among the SLM's top-K) and the
teacher alone reach the same accuracy, the teacher's token lies in the SLM's top-8 at ≈ 98% of
divergence points, and they can be filtered by the known answer. The SLM's trajectories correct
the student where it actually goes (off the teacher's path), at about half the cost per problem.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from s2t_edge.batch import decode_batch
from s2t_edge.bundle import load_adapter_bundle
from s2t_edge.candidates import top_k
from s2t_edge.collect import problem_prompt
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.eval.data import Problem, load_problems
from s2t_edge.eval.grading import extract_answer, is_correct
from s2t_edge.label_files import label_id, unscored_arrays, write_label
from s2t_edge.locks import lock_folder
from s2t_edge.policy import Policy, greedy, sampling
from s2t_edge.progress import Progress
from s2t_edge.prompt import ChatTemplate
from s2t_edge.shards import read_manifest, shard_name, shard_paths, write_manifest
from s2t_edge.store import cached_sha256, sha256_file
from s2t_edge.teacher import check_same_vocab, log_softmax

TEACHER_TOP = 64  # teacher log-probs kept per step; an SLM candidate outside them gets the 64th (an upper bound)


@dataclass
class _Pending:
    """A problem the teacher is decoding: its per-step top log-probs so far."""

    problem: Problem
    prompt: list[int]
    steps: list[tuple[np.ndarray, np.ndarray]]  # (ids, log-probs) of the teacher's top TEACHER_TOP
    sample: int | None = None  # which of a problem's sampled answers (None: its greedy answer)

    @property
    def name(self) -> str:
        return label_id(self.problem.id, self.sample)


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


TRAJECTORIES = ("teacher", "slm")


@dataclass
class _Labelled:
    """One finished trajectory with its label arrays (what `write_label` stores)."""

    pending: _Pending
    prompt: list[int]
    traj: list[int]  # the end-of-turn token included
    text_ids: list[int]  # the answer without it (for grading)
    finish_reason: str
    ids: np.ndarray | None  # None: not scored (a wrong answer under score="right")
    slm_lps: np.ndarray | None
    t_lps: np.ndarray | None
    t_top1: np.ndarray | None


def _teacher_trajectories(slm: Engine, teacher: Engine, pending: list[_Pending], k: int, max_tokens: int):
    """The teacher decodes (its log-probs kept per step); each answer is prefilled through the SLM."""

    def keep(i: int, logits: np.ndarray) -> None:
        top = top_k(logits, TEACHER_TOP)
        pending[i].steps.append((top, log_softmax(logits)[top]))

    prompts = [q.prompt for q in pending]
    for i, out, stats in decode_batch(teacher, prompts, greedy(1), max_tokens=max_tokens, on_logits=keep):
        q = pending[i]
        traj = out + ([stats.stop_token] if stats.stop_token is not None else [])
        if len(q.steps) != len(traj):  # one teacher row per step, or the labels would shift
            raise RuntimeError(f"{q.problem.id}: {len(q.steps)} teacher rows for {len(traj)} tokens")
        ids, slm_lps = slm_labels(slm, q.prompt, traj, k)
        t_lps = np.stack([lookup(step, row) for step, row in zip(q.steps, ids)])
        t_top1 = np.array([s[0][0] for s in q.steps], np.int32)
        q.steps = []
        yield _Labelled(q, q.prompt, traj, out, stats.finish_reason, ids, slm_lps, t_lps, t_top1)


def _slm_trajectories(
    slm: Engine,
    decoder: Engine,
    teacher: Engine,
    pending: list[_Pending],
    k: int,
    max_tokens: int,
    policy: Policy,
    worth_scoring: Callable[[_Pending, list[int], str], bool] | None = None,
):
    """The SLM (`decoder`: the same model, batched, with or without a bundle's adapter) decodes
    with `policy` (greedy, or a sampler over its top-K); each answer is then scored by the teacher
    in one prefill (exact log-probs, not a top cut) and, when an adapter decoded it, by the base
    SLM in one more — unless `worth_scoring(pending, answer, finish_reason)` says no."""
    base_decodes = decoder.lora_path is None
    rows: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    def keep(i: int, logits: np.ndarray) -> None:  # the base SLM's top-K, straight from its decode
        top = top_k(logits, k)
        rows.setdefault(i, []).append((top, log_softmax(logits)[top]))

    prompts = [q.prompt for q in pending]
    hook = keep if base_decodes else None
    for i, out, stats in decode_batch(decoder, prompts, policy, max_tokens=max_tokens, on_logits=hook):
        q = pending[i]
        traj = out + ([stats.stop_token] if stats.stop_token is not None else [])
        if worth_scoring is not None and not worth_scoring(q, out, stats.finish_reason):
            rows.pop(i, None)
            yield _Labelled(q, q.prompt, traj, out, stats.finish_reason, None, None, None, None)
            continue
        if base_decodes:
            steps = rows.pop(i)
            ids, slm_lps = np.stack([s[0] for s in steps]).astype(np.int32), np.stack([s[1] for s in steps])
        else:
            ids, slm_lps = slm_labels(slm, q.prompt, traj, k)
        if len(ids) != len(traj):
            raise RuntimeError(f"{q.problem.id}: {len(ids)} SLM rows for {len(traj)} tokens")
        t_lps, t_top1 = [], []
        for (_, logits), row in zip(teacher.score(q.prompt + traj[:-1], len(q.prompt) - 1), ids):
            t_lps.append(log_softmax(logits)[row])
            t_top1.append(int(logits.argmax()))
        t_lps_a, t_top1_a = np.stack(t_lps), np.array(t_top1, np.int32)
        yield _Labelled(q, q.prompt, traj, out, stats.finish_reason, ids, slm_lps, t_lps_a, t_top1_a)


def label(
    slm_path: Path,
    teacher_path: Path,
    data: Path,
    out_dir: Path,
    *,
    limit: int | None = None,
    skip: int = 0,
    k: int = 8,
    max_tokens: int = 400,
    batch: int = 16,
    trajectories: str = "teacher",
    bundle: Path | None = None,
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    score: str = "all",
    threads: int | None = None,
    gpu_layers: int = 0,
    progress: bool = True,
) -> dict:
    """Label the first `limit` problems of `data`, less the first `skip`, into `out_dir` (resumable).
    Returns the manifest.

    `trajectories`: "teacher" (the teacher's greedy answers) or "slm" (the SLM's own greedy
    answers, i.e. the states it visits when it decodes alone; with `bundle`, those of the SLM
    under that bundle's adapter). `temperature` > 0 samples `samples` answers per problem from the
    SLM's top-K instead of its greedy one (seeded: an uninterrupted run is reproduced exactly).
    `score`: "all" answers, or only the "right" ones (rejection sampling: the wrong ones recorded
    unscored)."""
    if trajectories not in TRAJECTORIES:
        raise S2TError(f"unknown trajectories {trajectories!r}; choose one of {', '.join(TRAJECTORIES)}")
    if temperature < 0 or samples < 1:
        raise S2TError("--temperature must be >= 0 and --samples >= 1")
    if temperature == 0 and samples > 1:
        raise S2TError("--samples N needs --temperature > 0 (greedy answers are all the same)")
    if score not in ("all", "right"):
        raise S2TError(f"unknown --score {score!r}; choose all or right")
    if score == "right" and trajectories != "slm":
        raise S2TError("--score right skips scoring the SLM's wrong answers: use it with --trajectories slm")
    if temperature > 0 and trajectories != "slm":
        raise S2TError("--temperature samples the SLM's own answers: use it with --trajectories slm")
    b = None
    if bundle is not None:
        if trajectories != "slm":
            raise S2TError("--bundle decodes the SLM's own trajectories: use it with --trajectories slm")
        b = load_adapter_bundle(bundle, slm_path, "to decode with")
    problems, _ = load_problems(data, limit=limit)
    if skip >= len(problems):
        raise S2TError(f"--skip {skip} leaves none of the {len(problems)} problems to label")
    problems = problems[skip:]
    how = "sample" if temperature > 0 else "greedy"
    settings = {
        "slm_sha256": cached_sha256(slm_path),  # hashed once per file, not at every resume
        "teacher_sha256": cached_sha256(teacher_path),
        "data_sha256": sha256_file(data),
        "k": k,
        "max_tokens": max_tokens,
        "teacher_top": TEACHER_TOP if trajectories == "teacher" else None,
        "trajectories": f"teacher-{how}" if trajectories == "teacher" else f"slm-{how}",
    }
    if b is not None:
        settings["trajectories"] = f"adapter-{how}:{b.adapter['sha256']}"
    if temperature > 0:
        settings.update(samples=samples, temperature=temperature, seed=seed)
    if score != "all":
        settings["score"] = score  # older folders scored every answer and have no key
    if settings["teacher_top"] is None:
        del settings["teacher_top"]  # exact teacher log-probs (older folders keep their key)
    out_dir.mkdir(parents=True, exist_ok=True)
    with lock_folder(out_dir):  # one run per labels folder
        old = read_manifest(out_dir)
        if old and old.get("settings") != settings:
            diff = [key for key in settings if old.get("settings", {}).get(key) != settings[key]]
            raise S2TError(f"{out_dir} holds labels made with other settings ({', '.join(diff)}); use another --out")
        write_manifest(out_dir, {"settings": settings, "data": data.name, "problems": len(shard_paths(out_dir))})
        done = {p.name for p in shard_paths(out_dir)}
        runs = [None] if temperature == 0 else list(range(samples))
        todo = [(p, j) for p in problems for j in runs if shard_name(label_id(p.id, j)) not in done]
        with contextlib.ExitStack() as stack:  # closes whichever engines were opened, however this ends
            # A cache per sequence: with one unified cache every token attends over all sequences' cells
            # (5x slower steps at 16 x 400 tokens); the queue keeps every slot busy, so the active
            # sequences stay consecutive and a step is still one ubatch.
            decoder = stack.enter_context(
                Engine(
                    teacher_path if trajectories == "teacher" else slm_path,
                    n_ctx=batch * (max_tokens + 1024),
                    n_threads=threads,
                    n_gpu_layers=gpu_layers,
                    n_seq=batch,
                    unified=False,
                )
            )
            if b is not None:
                decoder.load_lora(b.adapter_path, b.adapter_scale)
            if trajectories == "slm" and b is None:
                slm = decoder  # the base SLM decodes: its top-K come straight from the decode
            else:  # one more prefill per answer for the base SLM's top-K
                slm = stack.enter_context(
                    Engine(slm_path, n_ctx=max_tokens + 2048, n_threads=threads, n_gpu_layers=gpu_layers)
                )
            if trajectories == "teacher":
                teacher = decoder
            else:
                teacher = stack.enter_context(
                    Engine(teacher_path, n_ctx=max_tokens + 2048, n_threads=threads, n_gpu_layers=gpu_layers)
                )
            check_same_vocab(slm, teacher)
            template = ChatTemplate(teacher)
            pending = [_Pending(p, problem_prompt(teacher, template, p.question), [], j) for p, j in todo]
            too_long = [q for q in pending if len(q.prompt) + max_tokens > decoder.n_ctx_seq]
            if too_long:
                q = too_long[0]
                raise S2TError(
                    f"problem {q.problem.id}: its {len(q.prompt)}-token prompt + --max-tokens {max_tokens} > the "
                    f"{decoder.n_ctx_seq} tokens a sequence can hold; lower --max-tokens"
                )

            def grade(q: _Pending, answer: list[int], finish_reason: str) -> tuple[str | None, bool]:
                pred = extract_answer(teacher.detokenize(answer), complete=finish_reason == "stop")
                return pred, is_correct(pred, q.problem.gold)

            if trajectories == "teacher":
                source = _teacher_trajectories(slm, teacher, pending, k, max_tokens)
            else:
                policy = greedy(1) if temperature == 0 else sampling(temperature, top_k=k, seed=seed)
                right = (lambda q, a, f: grade(q, a, f)[1]) if score == "right" else None
                source = _slm_trajectories(slm, decoder, teacher, pending, k, max_tokens, policy, right)
            who = "teacher" if trajectories == "teacher" else "slm"
            bar = Progress(len(todo), "label", progress)
            n_done = n_correct = 0
            try:
                for lab in source:
                    pred, correct = grade(lab.pending, lab.text_ids, lab.finish_reason)
                    problem = lab.pending.problem
                    meta = {
                        "gold": problem.gold,
                        "pred": pred,
                        "correct": correct,
                        "tokens": len(lab.traj),
                        "finish_reason": lab.finish_reason,
                        "batch": batch,  # batched kernels may break near-ties differently
                        "trajectories": settings["trajectories"],
                    }
                    if lab.pending.sample is not None:  # the split and the trainer group samples by problem
                        meta.update(problem=problem.id, sample=lab.pending.sample)
                    if lab.ids is None:
                        meta["scored"] = False
                    arrays = {
                        "prompt": np.array(lab.prompt, np.int32),
                        "chosen": np.array(lab.traj, np.int32),
                        **(_scores(lab) if lab.ids is not None else unscored_arrays(k)),
                    }
                    write_label(out_dir, lab.pending.name, arrays, meta)
                    n_done += 1
                    n_correct += meta["correct"]
                    bar.update(note=f"{who} acc {n_correct / n_done:.2f}")
            finally:
                bar.close()
    n = len(shard_paths(out_dir))
    manifest = {"settings": settings, "data": data.name, "problems": n}
    write_manifest(out_dir, manifest)
    return manifest


def _scores(lab: _Labelled) -> dict[str, np.ndarray]:
    return {
        "slm_ids": lab.ids,
        "slm_logprobs": lab.slm_lps.astype(np.float16),
        "teacher_logprobs": lab.t_lps.astype(np.float16),
        "teacher_top1": lab.t_top1,
    }
