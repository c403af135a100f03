"""`s2t-edge eval`: run decoding policies over a JSONL problem set, resumably, one record per problem."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from s2t_edge.batch import decode_batch
from s2t_edge.collect import problem_prompt
from s2t_edge.decode import DecodeStats, decode
from s2t_edge.engine import Engine
from s2t_edge.errors import S2TError
from s2t_edge.eval.data import Problem, load_problems
from s2t_edge.eval.grading import extract_answer, is_correct
from s2t_edge.eval.results import ResultsDir
from s2t_edge.eval.vote import tally
from s2t_edge.parallel import VOTE_TEMPERATURE, sample_batch, sample_parallel
from s2t_edge.policy import Policy
from s2t_edge.progress import Progress
from s2t_edge.prompt import ChatTemplate
from s2t_edge.runtime import POLICIES, Models, build_policy
from s2t_edge.store import sha256_file


@dataclass(frozen=True)
class EvalSpec:
    """One policy to evaluate: greedy, maj@N, s2t-local, s2t-local-maj@N, s2t, takeover or teacher."""

    name: str

    @property
    def maj_n(self) -> int | None:
        """N of a vote over N samples: maj@N (the base SLM) or s2t-local-maj@N (the adapted SLM)."""
        head, sep, tail = self.name.partition("maj@")
        if not sep or head not in ("", "s2t-local-"):
            return None
        try:
            n = int(tail)
        except ValueError:
            n = 0
        if n < 1:
            raise S2TError(f"bad policy {self.name!r}: use {head}maj@N with N >= 1, e.g. {head}maj@8")
        return n

    @property
    def adapted(self) -> bool:
        """Decodes with the bundle's LoRA adapter on: s2t-local and s2t-local-maj@N."""
        return self.name == "s2t-local" or self.name.startswith("s2t-local-maj@")

    @property
    def needs_teacher(self) -> bool:
        return self.name in ("s2t", "takeover", "teacher")


def parse_policies(names: list[str]) -> list[EvalSpec]:
    known = (*POLICIES, "teacher")
    specs = [EvalSpec(n) for n in dict.fromkeys(names)]  # a policy named twice runs (and is reported) once
    for s in specs:
        if s.maj_n is None and s.name not in known:
            raise S2TError(f"unknown policy {s.name!r}; choose from {', '.join(known)} or maj@N")
    return specs


def _solve(
    models: Models,
    spec: EvalSpec,
    policy: Policy | None,
    problem: Problem,
    prompt: list[int],
    *,
    max_tokens: int,
    seed: int,
    temperature: float = VOTE_TEMPERATURE,
) -> dict:
    """Answer one problem with one policy; the record written to results.jsonl."""
    t0 = time.perf_counter()
    if spec.maj_n:
        samples = sample_parallel(
            models.slm, prompt, spec.maj_n, max_tokens=max_tokens, temperature=temperature, seed=seed + problem.index
        )
        return _maj_record(models.slm, samples, time.perf_counter() - t0, max_tokens)
    engine = _engine_for(models, spec)
    stats = DecodeStats()
    ids = [t.id for t in decode(engine, prompt, max_tokens=max_tokens, stats=stats, **policy.decode_args())]
    return _decoded_record(engine, ids, stats, time.perf_counter() - t0)


def _engine_for(models: Models, spec: EvalSpec) -> Engine:
    return models.teacher if spec.name == "teacher" else models.slm


def _maj_record(engine: Engine, samples: list[list[int]], seconds: float, max_tokens: int) -> dict:
    t = tally(engine, samples, max_tokens)
    return {
        "output": t.texts[0],
        "pred": t.pred,
        "votes": t.votes,
        "answers": t.answers,
        "tokens": t.tokens,
        "seconds": seconds,
        "triggers": 0,
        "flips": 0,
        "truncated": t.truncated,
    }


def _decoded_record(engine: Engine, ids: list[int], stats: DecodeStats, seconds: float) -> dict:
    text = engine.detokenize(ids)
    return {
        "output": text,
        "pred": extract_answer(text, complete=stats.finish_reason == "stop"),
        "tokens": len(ids),
        "seconds": seconds,
        "triggers": stats.triggers,
        "flips": stats.flips,
        "finish_reason": stats.finish_reason,
        "truncated": int(stats.finish_reason != "stop"),
    }


def _solve_batched(
    models: Models,
    spec: EvalSpec,
    policy: Policy | None,
    problems: list[Problem],
    prompts: list[list[int]],
    *,
    max_tokens: int,
    seed: int,
    temperature: float = VOTE_TEMPERATURE,
) -> Iterator[tuple[Problem, dict]]:
    """Answer `problems` as one continuous batch; yields (problem, record) as each finishes. A
    record's seconds are its share of the batched decode (cost per problem, not latency)."""
    engine = _engine_for(models, spec)
    if spec.maj_n:  # groups of N sequences, one group per problem, same seeds as one at a time
        seeds = [seed + p.index for p in problems]
        batches = sample_batch(engine, prompts, spec.maj_n, max_tokens=max_tokens, temperature=temperature, seeds=seeds)
        for i, samples, seconds in batches:
            yield problems[i], _maj_record(engine, samples, seconds, max_tokens)
        return
    for i, ids, stats in decode_batch(engine, prompts, policy, max_tokens=max_tokens):
        yield problems[i], _decoded_record(engine, ids, stats, stats.model_s + stats.ours_s)


def fitting(
    engine: Engine, template: ChatTemplate, problems: list[Problem], skip_bad: bool
) -> tuple[list[Problem], dict[str, list[int]], int]:
    """The problems whose prompt leaves room for an answer in one sequence's context, checked before
    anything decodes; (those, their prompts by id, how many were skipped). Without `skip_bad` the
    first misfit is an error."""
    ok, prompts = [], {}
    for p in problems:
        prompts[p.id] = prompt = problem_prompt(engine, template, p.question)
        n = len(prompt)
        if n < engine.n_ctx_seq:
            ok.append(p)
        elif not skip_bad:
            raise S2TError(
                f"problem {p.id}: its prompt is {n} tokens and the context holds {engine.n_ctx_seq}; "
                "raise --ctx or use --skip-bad to skip it"
            )
    if len(ok) < len(problems):
        print(f"skipped {len(problems) - len(ok)} problem(s) longer than the context", file=sys.stderr)
    return ok, {p.id: prompts[p.id] for p in ok}, len(problems) - len(ok)


def batchable(spec: EvalSpec, trigger: str = "always") -> bool:
    """Policies that run as one continuous batch of problems (teacher policies: trigger always)."""
    if spec.maj_n is not None or spec.name in ("greedy", "s2t-local", "teacher"):
        return True
    return spec.name in ("s2t", "takeover") and trigger == "always"


def run_eval(
    models: Models,
    data: Path,
    specs: list[EvalSpec],
    out: Path,
    *,
    limit: int | None = None,
    k: int = 8,
    max_tokens: int = 512,
    seed: int = 0,
    vote_temperature: float | None = None,
    trigger: str = "always",
    threshold: float | None = None,
    question_field: str = "question",
    answer_field: str = "answer",
    skip_bad: bool = False,
    progress: bool = True,
    batch: int = 1,
) -> list[dict]:
    """Evaluate each policy into `out/<policy>/`; rerunning skips finished problems. Returns summaries.

    `batch` > 1 decodes the `batchable` policies as a continuous batch of that many problems (the
    engines must have been opened with as many sequences). `vote_temperature`: maj@N's sampling
    temperature (None: VOTE_TEMPERATURE)."""
    if vote_temperature is None:
        vote_temperature = VOTE_TEMPERATURE
    if not math.isfinite(vote_temperature) or vote_temperature <= 0:
        raise S2TError(f"the vote temperature must be a finite number > 0, got {vote_temperature}")
    solve_kw = {"max_tokens": max_tokens, "seed": seed, "temperature": vote_temperature}
    problems, n_bad = load_problems(data, question_field, answer_field, limit=limit, skip_bad=skip_bad)
    if n_bad:
        print(f"skipped {n_bad} bad line(s) in {data}", file=sys.stderr)
    template = ChatTemplate(models.slm)
    data_sha = sha256_file(data)
    summaries = []
    for spec in specs:
        if spec.needs_teacher and models.teacher is None:
            raise S2TError(f"policy {spec.name} needs --teacher MODEL")
        if spec.maj_n and spec.adapted and models.slm.lora_path is None:
            raise S2TError(f"policy {spec.name} samples the adapted SLM: it needs a bundle with a LoRA adapter")
        engine = _engine_for(models, spec)
        batched = batch > 1 and batchable(spec, trigger)
        teacher_run = spec.name in ("s2t", "takeover")
        settings = {
            "policy": spec.name,
            "model": engine.path.name,
            "model_size": engine.path.stat().st_size,
            "k": k,
            "max_tokens": max_tokens,
            "data": Path(data).name,
            "data_sha256": data_sha,
            "fields": [question_field, answer_field],
            "seed": seed,
            "bundle": models.bundle.digest[:16] if spec.adapted and models.bundle else None,
            "teacher": models.teacher.path.name if teacher_run and models.teacher else None,
            "trigger": trigger if teacher_run else None,
            "threshold": threshold if teacher_run else None,
        }
        scale = models.slm.lora_scale
        if spec.adapted and models.bundle and scale not in (None, models.bundle.adapter_scale):
            settings["adapter_scale"] = scale  # --adapter-scale: another model than the bundle's
        if spec.maj_n and vote_temperature != VOTE_TEMPERATURE:
            settings["vote_temperature"] = vote_temperature
        if batched:  # batched kernels reorder float sums: not mixed with unbatched results
            settings["batch"] = batch
        if spec.maj_n and models.slm.lora_path is not None:  # maj@N samples the base SLM, s2t-local-maj@N the adapted
            models.slm.use_lora(spec.adapted)
        results = ResultsDir(out / spec.name.replace("@", "_at_"), settings)
        try:
            policy = (
                None
                if spec.maj_n
                else build_policy(
                    models, "greedy" if spec.name == "teacher" else spec.name, k=k, trigger=trigger, threshold=threshold
                )
            )
            runnable, prompts, too_long = fitting(engine, template, problems, skip_bad)
            done = results.done_ids()
            todo = [p for p in runnable if p.id not in done]
            correct = sum(r["correct"] for r in results.records())
            bar = Progress(len(runnable), spec.name, progress)
            bar.done = len(runnable) - len(todo)
            if batched:
                todo_prompts = [prompts[p.id] for p in todo]
                solved = _solve_batched(models, spec, policy, todo, todo_prompts, **solve_kw)
            else:
                solved = ((p, _solve(models, spec, policy, p, prompts[p.id], **solve_kw)) for p in todo)
            try:
                for p, rec in solved:
                    rec = {
                        "id": p.id,
                        "policy": spec.name,
                        "gold": p.gold,
                        "correct": is_correct(rec["pred"], p.gold),
                        **rec,
                    }
                    results.append(rec)
                    correct += rec["correct"]
                    bar.update(note=f"acc {correct / (bar.done + 1):.3f}")
            finally:
                bar.close()
            summary = {**results.summary(), "skipped": n_bad + too_long, "settings": settings}
            summaries.append(summary)  # settings: cost× only within one --batch
        finally:
            results.close()
    return summaries
