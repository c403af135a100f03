"""CLI for the S2T pipeline's data side: collect, label, analyze coverage, bundle inspect."""

from __future__ import annotations

import json
from pathlib import Path

import click

from s2t_edge.cli import options as cli_options


@click.command()
@click.option("--slm", default=None, help="SLM registry name or .gguf path (default: the default SLM).")
@click.option(
    "--teacher",
    default=None,
    help="Teacher registry name, .gguf path, or Hugging Face model directory "
    "(run by transformers, GPU when present; needs the train extra).",
)
@click.option("--data", "data", required=True, type=click.Path(path_type=Path), help="JSONL problems (GSM8K format).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Groups directory (resumable).")
@click.option("--limit", type=int, default=None, help="First N problems only.")
@click.option("--k", type=click.IntRange(1, 32), default=16, show_default=True)
@click.option(
    "--mode",
    type=click.Choice(["greedy", "s2t"]),
    default="greedy",
    show_default=True,
    help="SLM greedy trajectories, or on-policy S2T (teacher selects at every step).",
)
@click.option("--max-tokens", type=click.IntRange(min=1), default=400, show_default=True)
@click.option("--ctx", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option(
    "--bundle",
    type=click.Path(path_type=Path),
    default=None,
    help="Run the SLM under this bundle's LoRA adapter (groups for a reranker on the adapted SLM).",
)
@cli_options.threads
@cli_options.gpu_layers
@cli_options.skip_bad
@cli_options.pull
def collect(slm, teacher, data, out, limit, k, mode, max_tokens, ctx, bundle, threads, gpu_layers, skip_bad, pull):
    """Label SLM top-K candidate groups with a teacher's scores."""
    from s2t_edge.collect import collect as run
    from s2t_edge.store import resolve_model

    # a directory is a Hugging Face teacher (run by transformers), passed through unchanged
    teacher_path = (
        Path(teacher)
        if teacher and Path(teacher).is_dir()
        else resolve_model(teacher, role="teacher", pull=pull or None)
    )
    m = run(
        resolve_model(slm, pull=pull or None),
        teacher_path,
        data,
        out,
        limit=limit,
        k=k,
        mode=mode,
        max_tokens=max_tokens,
        n_ctx=ctx,
        threads=threads,
        gpu_layers=gpu_layers,
        skip_bad=skip_bad,
        bundle=bundle,
    )
    click.echo(
        f"{m['problems']} problems, {m['positions']} positions, SLM accuracy "
        f"{m['correct'] / max(m['problems'], 1):.1%} → {out}"
    )


@click.command()
@click.option("--slm", default=None, help="SLM registry name or .gguf path (default: the default SLM).")
@click.option("--teacher", default=None, help="Teacher registry name or .gguf path (default: the default teacher).")
@click.option("--data", "data", required=True, type=click.Path(path_type=Path), help="JSONL problems (GSM8K format).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Labels directory (resumable).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N problems only.")
@click.option(
    "--skip", type=click.IntRange(min=0), default=0, help="Leave out the first N problems (label a later stretch)."
)
@click.option("--k", type=click.IntRange(1, 32), default=8, show_default=True)
@click.option("--max-tokens", type=click.IntRange(min=1), default=400, show_default=True)
@click.option(
    "--batch",
    type=click.IntRange(1, 64),
    default=16,
    show_default=True,
    help="Problems decoded at once (on 2 CPU cores 64 labelled no faster than 16).",
)
@click.option(
    "--trajectories",
    type=click.Choice(["teacher", "slm"]),
    default="teacher",
    show_default=True,
    help="Whose greedy answers are labelled: the teacher's, or the SLM's own (teacher-scored by prefill).",
)
@click.option(
    "--bundle",
    type=click.Path(path_type=Path),
    default=None,
    help="With --trajectories slm: decode under this bundle's LoRA adapter (its own states).",
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --temperature: answers sampled per problem (one label file each).",
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="With --trajectories slm: sample from the SLM's top-K at this temperature (0: greedy).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="The sampler's seed.")
@click.option(
    "--score",
    type=click.Choice(["all", "right"]),
    default="all",
    show_default=True,
    help="With --trajectories slm: score every answer, or only the right ones (rejection sampling; "
    "the wrong ones are recorded unscored, without their prefills).",
)
@cli_options.threads
@cli_options.gpu_layers
@cli_options.pull
def label(
    slm,
    teacher,
    data,
    out,
    limit,
    skip,
    k,
    max_tokens,
    batch,
    trajectories,
    bundle,
    samples,
    temperature,
    seed,
    score,
    threads,
    gpu_layers,
    pull,
):
    """Compact teacher labels over the SLM's top-K at every position of a trajectory (for `train --labels`)."""
    from s2t_edge.label import label as run
    from s2t_edge.store import resolve_model

    m = run(
        resolve_model(slm, pull=pull or None),
        resolve_model(teacher, role="teacher", pull=pull or None),
        data,
        out,
        limit=limit,
        skip=skip,
        k=k,
        max_tokens=max_tokens,
        batch=batch,
        trajectories=trajectories,
        bundle=bundle,
        samples=samples,
        temperature=temperature,
        seed=seed,
        score=score,
        threads=threads,
        gpu_layers=gpu_layers,
    )
    click.echo(f"{m['problems']} {'problems' if samples == 1 else 'answers'} labelled → {out}")


@click.group()
def analyze():
    """Analyses of collected groups."""


@analyze.command()
@click.argument("groups", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write the hit@K curve as a PNG.")
def coverage(groups, as_json, plot):
    """Local sufficiency: divergence rate and hit@K of the teacher's top-1 in the SLM's top-K."""
    from s2t_edge.analyze import coverage as cov
    from s2t_edge.analyze import format_coverage, plot_coverage

    r = cov(groups)
    click.echo(json.dumps(r, indent=2) if as_json else format_coverage(r))
    if plot:
        plot_coverage(r, plot)
        click.echo(f"plot → {plot}", err=True)


@analyze.command("labels")
@click.argument("labels", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def labels_cmd(labels, as_json):
    """What a labels folder holds: problems, their trajectories' accuracy, local sufficiency on them."""
    from s2t_edge.label_files import summarize_labels

    r = summarize_labels(labels)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    solved = f", {r['solved']} problems solved by at least one" if r["answers"] > r["problems"] else ""
    scored = f", {r['scored']} scored" if r["scored"] < r["answers"] else ""
    line = (
        f"{r['problems']} problems, {r['answers']} answers ({r['truncated']} cut at max tokens{scored}), "
        f"{r['trajectories']} trajectories, accuracy {r['accuracy']:.1%}{solved}; {r['positions']} positions"
    )
    if r["divergence_rate"] is not None:
        line += f", the teacher's token differs from the SLM's top-1 at {r['divergence_rate']:.1%}"
    if r["at_divergence_rank2"] is not None:
        line += (
            f"; there it is the SLM's 2nd candidate {r['at_divergence_rank2']:.1%}, "
            f"inside its top-{r['k']} {r['at_divergence_in_topk']:.1%}"
        )
    click.echo(f"{line}; {r['bytes_per_answer'] / 1024:.1f} KB per answer")


@click.group()
def bundle():
    """Inspect S2T-LOCAL bundles."""


@bundle.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect(path, as_json):
    """Verify a bundle (folder or .tar) and print its manifest."""
    from s2t_edge.bundle import load_bundle

    b = load_bundle(path)
    m = b.manifest
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    click.echo("\n".join(b.describe(str(path))))
