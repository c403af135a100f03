"""`s2t-edge collect`: SLM trajectories scored by the teacher, stored as labelled candidate groups.

For each problem: decode an SLM trajectory (plain greedy, or on-policy S2T where the teacher picks
among the SLM's candidates at every step), record the SLM's top-K, hidden state and step features
at every generated position, then score the whole trajectory with the teacher in ONE prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from s2t_edge.bundle import load_adapter_bundle
from s2t_edge.candidates import Candidates, Step
from s2t_edge.decode import DecodeStats, decode
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.eval.data import Problem, load_problems
from s2t_edge.eval.grading import SYSTEM_PROMPT, extract_answer, is_correct
from s2t_edge.locks import lock_folder
from s2t_edge.progress import Progress
from s2t_edge.prompt import ChatTemplate
from s2t_edge.shards import read_manifest, read_shard_meta, shard_name, write_manifest, write_shard
from s2t_edge.store import sha256_file
from s2t_edge.teacher import TeacherSelector, check_same_vocab, kl_on_support, teacher_view
from s2t_edge.trigger import Always, Never, Trigger


@dataclass
class Recorder:
    """A trigger wrapper that records every step it sees (candidates, hidden state, features)."""

    inner: Trigger = field(default_factory=Never)
    name: str = "recorder"
    steps: list[tuple[np.ndarray, np.ndarray, np.ndarray, float, float]] = field(default_factory=list)

    def fires(self, step: Step) -> bool:
        c = step.cands
        hidden = step.hidden.astype(np.float16) if step.hidden is not None else np.zeros(0, np.float16)
        self.steps.append((c.ids.copy(), c.logits.copy(), hidden, c.entropy, c.margin))
        return self.inner.fires(step)


def problem_prompt(engine: Engine, template: ChatTemplate, question: str) -> list[int]:
    """The prompt every stage (collection, evaluation) uses for a math problem."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return engine.tokenize(template.render(messages), special=True)


def label_problem(
    slm: Engine,
    teacher: Engine,
    template: ChatTemplate,
    problem: Problem,
    *,
    k: int,
    mode: str,
    max_tokens: int,
) -> tuple[dict[str, np.ndarray], dict]:
    """One problem's shard arrays and metadata."""
    prompt = problem_prompt(slm, template, problem.question)
    selector = TeacherSelector(teacher, "s2t") if mode == "s2t" else None
    rec = Recorder(Always() if mode == "s2t" else Never())
    stats = DecodeStats()
    traj = [t.id for t in decode(slm, prompt, max_tokens=max_tokens, k=k, trigger=rec, selector=selector, stats=stats)]
    if stats.stop_token is not None:
        traj.append(stats.stop_token)  # the end-of-turn step was recorded: let the teacher score it
    T = len(traj)
    rec.steps = rec.steps[:T]
    # Teacher logits at position p predict token p+1: score prompt + traj[:-1] from len(prompt)-1.
    probs, top1, top1p, kl = [], [], [], []
    scored = teacher.score(prompt + traj[:-1], len(prompt) - 1)
    for (_, logits), (ids, slm_logits, _, _, _) in zip(scored, rec.steps):
        v = teacher_view(logits, ids)
        probs.append(v.probs_on)
        top1.append(v.top1)
        top1p.append(v.top1_prob)
        kl.append(kl_on_support(v.probs_on, Candidates(ids, slm_logits).logprobs))
    text = slm.detokenize([t for t in traj if not slm.is_eog(t)])
    pred = extract_answer(text)
    arrays = {
        "slm_ids": np.stack([s[0] for s in rec.steps]).astype(np.int32),
        "slm_logits": np.stack([s[1] for s in rec.steps]).astype(np.float32),
        "hidden": np.stack([s[2] for s in rec.steps]),
        "entropy": np.array([s[3] for s in rec.steps], np.float32),
        "margin": np.array([s[4] for s in rec.steps], np.float32),
        "teacher_probs": np.stack(probs).astype(np.float32),
        "teacher_top1": np.array(top1, np.int32),
        "teacher_top1_prob": np.array(top1p, np.float32),
        "kl": np.array(kl, np.float32),
        "chosen": np.array(traj, np.int32),
    }
    meta = {
        "gold": problem.gold,
        "pred": pred,
        "correct": is_correct(pred, problem.gold),
        "prompt_tokens": len(prompt),
        "tokens": T,
        "finish_reason": stats.finish_reason,
        "text": text,
    }
    return arrays, meta


def _teacher_sha256(path: Path) -> str:
    """sha256 of a GGUF teacher, or of a Hugging Face model directory's weight files."""
    if path.is_dir():
        from s2t_edge.train.hf_teacher import weights_sha256  # no torch import

        return weights_sha256(path)
    return sha256_file(path)


def _open_teacher(path: Path, slm: Engine, *, n_ctx: int, threads: int | None, gpu_layers: int):
    """A GGUF teacher through llama.cpp, or a Hugging Face model directory through transformers."""
    if path.is_dir():
        from s2t_edge.train.hf_teacher import HFTeacher, check_tokenizer_matches  # torch only here

        hf = HFTeacher(path, n_vocab=slm.n_vocab, n_ctx=n_ctx, threads=threads)
        check_tokenizer_matches(slm, hf)
        return hf
    teacher = Engine(path, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=gpu_layers)
    check_same_vocab(slm, teacher)
    return teacher


def collect(
    slm_path: Path,
    teacher_path: Path,
    data: Path,
    out_dir: Path,
    *,
    limit: int | None = None,
    k: int = 16,
    mode: str = "greedy",
    max_tokens: int = 400,
    n_ctx: int = 4096,
    threads: int | None = None,
    gpu_layers: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
    bundle: Path | None = None,
) -> dict:
    """Label `limit` problems of `data` into `out_dir`; resumable. Returns the manifest. With
    `bundle`, the SLM runs under that bundle's LoRA adapter: the groups (top-K logits, hidden
    states, trajectories) are the adapted SLM's, for a reranker on top of the adapter."""
    if mode not in ("greedy", "s2t"):
        raise S2TError(f"unknown --mode {mode!r} (greedy or s2t)")
    b = None if bundle is None else load_adapter_bundle(bundle, slm_path, "to collect under")
    problems, n_bad = load_problems(data, limit=limit, skip_bad=skip_bad)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "slm": slm_path.name,
        "slm_sha256": sha256_file(slm_path),
        "teacher": teacher_path.name,
        "teacher_sha256": _teacher_sha256(teacher_path),
        "k": k,
        "mode": mode,
        "max_tokens": max_tokens,
        "n_ctx": n_ctx,
        "data": str(data),
    }
    if b is not None:  # older folders (the base SLM's groups) have no key
        settings["adapter_sha256"] = b.adapter["sha256"]
    old = read_manifest(out_dir)
    if old:
        keys = dict.fromkeys([*settings, "adapter_sha256"])  # the base SLM's groups and an adapter's never mix
        diff = [key for key in keys if key != "data" and old.get(key) != settings.get(key)]
        if diff:
            raise S2TError(
                f"{out_dir} holds groups collected with other settings ({', '.join(diff)}); use another --out"
            )
    with lock_folder(out_dir):  # one run per groups folder
        slm = Engine(slm_path, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=gpu_layers, hidden=True)
        if b is not None:
            slm.load_lora(b.adapter_path, b.adapter_scale)
        teacher = _open_teacher(teacher_path, slm, n_ctx=n_ctx, threads=threads, gpu_layers=gpu_layers)
        template = ChatTemplate(slm)
        todo = [p for p in problems if not (out_dir / shard_name(p.id)).exists()]
        # counts come from the shards on disk (cheap: only their metadata is read), so a crash
        # between a shard and the manifest, or a rerun with another --limit, cannot skew them
        counts = {"problems": 0, "positions": 0, "correct": 0}
        for p in problems:
            if (out_dir / shard_name(p.id)).exists():
                meta = read_shard_meta(out_dir / shard_name(p.id))
                counts["problems"] += 1
                counts["positions"] += meta["tokens"]
                counts["correct"] += meta["correct"]
        bar = Progress(len(todo), "collect", progress)
        try:
            for p in todo:
                arrays, meta = label_problem(slm, teacher, template, p, k=k, mode=mode, max_tokens=max_tokens)
                write_shard(out_dir, p.id, arrays, meta)
                counts["problems"] += 1
                counts["positions"] += meta["tokens"]
                counts["correct"] += meta["correct"]
                write_manifest(out_dir, {**settings, **counts, "skipped_bad_lines": n_bad})
                bar.update(note=f"acc {counts['correct'] / counts['problems']:.2f}")
        finally:
            bar.close()
            slm.close()
            teacher.close()
    return {**settings, **counts}
