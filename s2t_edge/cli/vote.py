"""`generate --votes N`: N samples of one prompt as one llama.cpp batch, the winning one printed."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

import click

from s2t_edge.errors import S2TError
from s2t_edge.eval.grading import SYSTEM_PROMPT
from s2t_edge.eval.vote import vote
from s2t_edge.parallel import VOTE_TEMPERATURE
from s2t_edge.runtime import Models

if TYPE_CHECKING:
    from s2t_edge.cli.run import RunOptions

# options of the decode loop that a vote does not use (it samples at top-k 20, top-p 0.8)
NOT_WITH_VOTES = ("k", "trigger", "threshold", "teacher", "show_flips")


def prepare(run: RunOptions, n: int, system: str | None, raw: bool) -> str | None:
    """Check the options against a vote of `n` and size its context; returns the system message
    (eval's math prompt, which asks for `\\boxed{}`, unless --system or --raw)."""
    ctx = click.get_current_context()
    given = {p for p in ctx.params if ctx.get_parameter_source(p) != click.core.ParameterSource.DEFAULT}
    wrong = sorted(given & set(NOT_WITH_VOTES))
    if wrong or run.policy_opts["policy"] in ("s2t", "takeover"):
        flags = ", ".join("--" + p.replace("_", "-") for p in wrong) or "--policy s2t / takeover"
        raise click.UsageError(f"--votes samples the SLM itself (top-k 20, top-p 0.8): not with {flags}")
    temperature = run.policy_opts["temperature"]
    if "temperature" in given and temperature == 0:
        raise click.UsageError("--votes samples: --temperature must be > 0 (default 0.7)")
    # sampling policy: build_policy switches the bundle's adapter on under s2t-local, loads no reranker
    run.policy_opts["temperature"] = temperature or VOTE_TEMPERATURE
    if run.ctx:  # the prompt and N answers share one cache (0 = the model's whole context)
        run.ctx = max(run.ctx, 1024 + n * run.max_tokens)
    return system if system is not None or raw else SYSTEM_PROMPT


def generate_votes(run: RunOptions, models: Models, ids: list[int], n: int, *, as_json: bool, show_stats: bool) -> None:
    """Vote; print the first sample that gives the winning answer (stdout) and the vote (stderr)."""
    engine = models.slm
    policy = run.policy_opts["policy"] or ("s2t-local" if models.bundle else "greedy")
    if policy == "s2t-local" and not engine.lora_on:
        raise S2TError("s2t-local votes sample the adapted SLM: this bundle has no LoRA adapter (--policy greedy)")
    need = len(ids) + n * run.max_tokens
    if len(ids) + run.max_tokens > engine.n_ctx_seq:
        raise S2TError(
            f"the prompt ({len(ids)} tokens) and an answer of up to {run.max_tokens} tokens do not fit the "
            f"{engine.n_ctx_seq} tokens a sequence holds; lower --max-tokens"
        )
    if need > engine.n_ctx:
        fix = (
            "raise --ctx"
            if engine.n_ctx_asked < need
            else f"lower --max-tokens or --votes (the model holds {engine.n_ctx})"
        )
        raise S2TError(
            f"the prompt ({len(ids)} tokens) and {n} answers of up to {run.max_tokens} tokens need {need} "
            f"cells, the context has {engine.n_ctx}; {fix}"
        )
    name = f"{'s2t-local-' if engine.lora_on else ''}maj@{n}"
    temperature = run.policy_opts["temperature"]
    if not as_json and sys.stderr.isatty():
        click.echo(f"sampling {n} answers as one batch ({name}, T {temperature:g})…", err=True)
    t0 = time.perf_counter()
    try:
        t = vote(engine, ids, n, max_tokens=run.max_tokens, temperature=temperature, seed=run.policy_opts["seed"])
    except KeyboardInterrupt:
        click.echo("\ninterrupted: no vote (the samples finish together)", err=True)
        raise
    seconds = time.perf_counter() - t0
    if as_json:
        result = {
            "text": t.texts[t.winner],
            "answer": t.pred,
            "votes": t.votes,
            "answers": t.answers,
            "texts": t.texts,
            "stats": {"tokens": t.tokens, "truncated": t.truncated, "seconds": seconds, "temperature": temperature},
            "model": run.model_name,
            "policy": name,
        }
        click.echo(json.dumps(result))
    else:
        click.echo(t.texts[t.winner])
        shown = ", ".join("-" if a is None else a for a in t.answers)
        won = f"{t.pred} won {t.votes} of {n} votes" if t.pred is not None else "no sample gave a final answer"
        click.echo(f"[{name}: {won}; answers {shown}]", err=True)
    if show_stats:
        rate = t.tokens / max(seconds, 1e-9)
        click.echo(
            f"[{t.tokens} tokens in {seconds:.1f} s, {rate:.1f} tok/s, {t.truncated} cut at max tokens]", err=True
        )
