"""CLI for offline evaluation: `s2t-edge eval --data F --policy P` and `s2t-edge eval compare DIR...`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from s2t_edge.cli import options as cli_options
from s2t_edge.errors import S2TError


@click.group("eval", invoke_without_command=True)
@click.option("--data", type=click.Path(path_type=Path), help="JSONL problems (GSM8K format by default).")
@click.option(
    "--policy",
    "policies",
    multiple=True,
    help="greedy, maj@N, s2t-local, s2t-local-maj@N (a vote of N samples of the adapted SLM), s2t, takeover, "
    "teacher (repeat or comma-separate). Default: s2t-local.",
)
@click.option("--limit", type=int, default=None, help="First N problems only.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("runs/eval"),
    show_default=True,
    help="Results directory (one sub-folder per policy; rerunning resumes).",
)
@click.option("--model", default=None, help="SLM registry name or .gguf path.")
@click.option("--bundle", default=None, help="S2T-LOCAL bundle (default: the shipped one; 'none' for no reranker).")
@click.option("--teacher", default=None, help="Teacher for s2t / takeover / teacher policies.")
@click.option(
    "--trigger",
    type=click.Choice(["always", "kl", "entropy"]),
    default="always",
    show_default=True,
    help="Where the teacher selects (s2t / takeover).",
)
@click.option("--threshold", type=float, default=None, help="Trigger threshold for kl / entropy.")
@click.option("--k", type=click.IntRange(1, 32), default=8, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option(
    "--vote-temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Sampling temperature of maj@N and s2t-local-maj@N (then top-p 0.8, top-k 20).  [default: 0.7]",
)
@click.option("--question-field", default="question", show_default=True)
@click.option("--answer-field", default="answer", show_default=True)
@cli_options.skip_bad
@click.option(
    "--batch",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Decode greedy / s2t-local / teacher (and s2t / takeover with --trigger always) as a continuous "
    "batch of this many problems, maj@N as this many sequences (N per problem); several times the "
    "throughput on a CPU; tokens can differ from --batch 1 at near-ties.",
)
@click.option(
    "--ctx",
    "n_ctx",
    type=click.IntRange(min=1),
    default=None,
    help="Context per sequence (the cache holds one per sequence). Default: 4096, or max tokens + 1024 with --batch.",
)
@cli_options.adapter_scale
@cli_options.threads
@cli_options.gpu_layers
@cli_options.pull
@click.option("--json", "as_json", is_flag=True, help="Print the summaries as JSON.")
@click.pass_context
def eval_group(
    ctx,
    data,
    policies,
    limit,
    out,
    model,
    bundle,
    teacher,
    trigger,
    threshold,
    k,
    max_tokens,
    seed,
    vote_temperature,
    question_field,
    answer_field,
    skip_bad,
    batch,
    n_ctx,
    adapter_scale,
    threads,
    gpu_layers,
    pull,
    as_json,
):
    """Evaluate decoding policies on a problem set (resumable, one JSONL record per problem)."""
    if ctx.invoked_subcommand is not None:
        return
    from s2t_edge.eval.data import load_problems
    from s2t_edge.eval.results import format_table
    from s2t_edge.eval.runner import batchable, parse_policies, run_eval
    from s2t_edge.runtime import open_models
    from s2t_edge.store import default_model

    if data is None:
        raise S2TError("eval needs --data FILE.jsonl (or a subcommand: eval compare DIR...)")
    specs = parse_policies([p for arg in (policies or ("s2t-local",)) for p in arg.split(",") if p])
    # bad data (missing file, malformed line, missing field) fails here, before models load
    load_problems(data, question_field, answer_field, limit=limit, skip_bad=skip_bad)
    if vote_temperature is not None and not any(s.maj_n for s in specs):
        raise S2TError("--vote-temperature is the sampling of maj@N / s2t-local-maj@N: add one of them to --policy")
    maj_n = max([s.maj_n or 1 for s in specs])
    batch_slm = batch if any(batchable(s, trigger) and s.name != "teacher" for s in specs) else 1
    batch_teacher = batch if any(batchable(s, trigger) and s.needs_teacher for s in specs) else 1
    if n_ctx is None:
        n_ctx = 4096 if max(batch_slm, batch_teacher) == 1 else min(4096, max_tokens + 1024)
    # A KV cache per sequence for the continuous batch: with one unified cache every token attends
    # over every sequence's cells, 5x slower per step at 16 x 400 tokens (benchmarks/kv_layout.py);
    # maj@N keeps one unified cache, where its N samples share their prompt's cells.
    n_ctx *= max(batch_slm, batch_teacher)
    if maj_n > 1:  # a problem's N samples share the cache: it must hold at least its prompt + N answers
        n_ctx = max(n_ctx, 1024 + maj_n * max_tokens)
    needs_teacher = any(s.needs_teacher for s in specs)
    if needs_teacher and teacher is None:
        teacher = default_model("teacher")
    wants_bundle = any(s.adapted for s in specs)
    models = open_models(
        model,
        bundle=bundle if wants_bundle else "none",
        teacher=teacher,
        ctx=n_ctx,
        threads=threads,
        gpu_layers=gpu_layers,
        n_seq=max(maj_n, batch_slm),
        teacher_seq=batch_teacher,
        unified=maj_n > 1,
        pull=pull or None,
        adapter_scale=adapter_scale if wants_bundle else None,
    )
    try:
        rows = run_eval(
            models,
            data,
            specs,
            out,
            limit=limit,
            k=k,
            max_tokens=max_tokens,
            seed=seed,
            vote_temperature=vote_temperature,
            trigger=trigger,
            threshold=threshold,
            question_field=question_field,
            answer_field=answer_field,
            skip_bad=skip_bad,
            batch=batch,
        )
    finally:
        models.close()
    click.echo(json.dumps(rows, indent=2) if as_json else format_table(rows))


@eval_group.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Accuracy vs cost per problem, as PNG.")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="With --limit: the runs' JSONL problems.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N problems of --data.")
def compare(dirs, as_json, plot, data, limit):
    """One table across runs, restricted to the problems they all finished."""
    from s2t_edge.eval.compare import compare_runs, plot_compare
    from s2t_edge.eval.data import load_problems
    from s2t_edge.eval.results import format_table

    if (data is None) != (limit is None):
        raise click.UsageError("--data and --limit go together (the first N problems of that file)")
    only = None if data is None else {p.id for p in load_problems(data, limit=limit, skip_bad=True)[0]}

    expanded = []
    for d in dirs:  # a parent eval --out folder stands for all its policy folders
        expanded += sorted(p.parent for p in d.glob("*/settings.json")) if not (d / "settings.json").exists() else [d]
    rows = compare_runs(expanded, only)
    click.echo(json.dumps(rows, indent=2, default=str) if as_json else format_table(rows))
    if plot:
        plot_compare(rows, plot)
        click.echo(f"plot → {plot}", err=True)
