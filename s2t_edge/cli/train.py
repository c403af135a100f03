"""CLI for the training side: `s2t-edge train` (reranker or LoRA adapter) and `s2t-edge export`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from s2t_edge.bundle import MANIFEST
from s2t_edge.cli import options as cli_options
from s2t_edge.errors import S2TError

# adapter-only options
ADAPTER_ONLY = {
    "lr",
    "kl_weight",
    "all_trajectories",
    "max_problems",
    "problems_of",
    "targets",
    "layers",
    "objective",
    "divergent_margin",
    "early_weight",
    "early_fraction",
    "teacher_kl_weight",
    "toward",
    "bf16",
}


def need_training_extra() -> None:
    try:
        import onnx  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as e:
        raise S2TError(
            "this command needs the training extra: pip install torch==2.13.0 && pip install 's2t-edge[train]'"
        ) from e


def report_keys(path: Path) -> list[str]:
    """The trajectory keys a training report lists (reports from before they were recorded: none)."""
    try:
        keys = json.loads(path.read_text(encoding="utf-8"))["problems"]["keys"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise S2TError(f"{path}: not a training report that lists its problems ({e.__class__.__name__})") from e
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise S2TError(f"{path}: problems.keys is not a list of trajectory keys")
    return keys


@click.command()
@click.option("--groups", type=click.Path(path_type=Path), help="Groups from `s2t-edge collect` (trains the reranker).")
@click.option(
    "--labels",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Labels from `s2t-edge label` (trains a LoRA adapter); repeat to train on several folders.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Checkpoint directory (resumable).")
@click.option("--slm", default=None, help="The SLM the data came from (registry name or .gguf path).")
@click.option("--k", type=click.IntRange(2, 32), default=8, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Default: 6 (reranker), 1 (adapter).")
@click.option("--rank", type=click.IntRange(min=1), default=None, help="Default: 32 (reranker), 16 (adapter).")
@click.option("--width", type=click.IntRange(min=1), default=64, show_default=True, help="Reranker only.")
@click.option("--no-hidden", is_flag=True, help="Reranker ablation: no hidden-state features.")
@click.option("--no-tokens", is_flag=True, help="Reranker ablation: no candidate token identity.")
@click.option("--token-prior", is_flag=True, help="Reranker: also score each candidate's identity on its own.")
@click.option(
    "--divergent-weight", type=click.FloatRange(min=0), default=None, help="Default: 1 (reranker), 3 (adapter)."
)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="Adapter: default 1e-4.")
@click.option("--kl-weight", type=click.FloatRange(min=0), default=0.1, show_default=True, help="Adapter only.")
@click.option("--all-trajectories", is_flag=True, help="Adapter: also the teacher's trajectories with a wrong answer.")
@click.option("--max-problems", type=click.IntRange(min=1), default=None, help="Adapter: first N training problems.")
@click.option(
    "--problems-of",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Adapter: train on exactly the labelled trajectories of the run in this report "
    "(a bundle's train-report.json): rebuilds it from folders that have grown since; "
    "a --labels folder the report does not name is taken whole.",
)
@click.option(
    "--targets",
    type=click.Choice(["all", "attention"]),
    default=None,
    help="Adapter: LoRA on q/k/v/o/gate/up/down (all, default) or q/k/v/o only (cheaper to decode).",
)
@click.option(
    "--layers",
    type=click.IntRange(min=1),
    default=None,
    help="Adapter: LoRA on the top N decoder layers only; the frozen layers below run once per "
    "trajectory (cached in --out), so an epoch costs about N / 24 of a full one.",
)
@click.option(
    "--objective",
    type=click.Choice(["select", "vocab"]),
    default="select",
    show_default=True,
    help="Adapter: listwise toward the teacher over the SLM's K candidates (select), or cross-entropy "
    "toward the teacher's choice over the whole vocabulary (vocab: no top-K restriction).",
)
@click.option(
    "--divergent-margin",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Adapter: a divergence weighs --divergent-weight only where the teacher's log-prob of its choice "
    "beats the SLM's top-1's by at least this many nats; near-ties weigh like agreement.",
)
@click.option(
    "--early-weight",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Adapter: weight of the positions in the first --early-fraction of each answer (its setup).",
)
@click.option(
    "--early-fraction",
    type=click.FloatRange(0, 1, min_open=True),
    default=0.25,
    show_default=True,
    help="Adapter: how much of each answer --early-weight weighs.",
)
@click.option(
    "--teacher-kl-weight",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Adapter: weight of the KL to the teacher over the K candidates beside the cross-entropy "
    "toward its choice (the published S2T-LOCAL loss: 0.1).",
)
@click.option(
    "--toward",
    type=click.Choice(["teacher", "chosen", "samples"]),
    default="teacher",
    show_default=True,
    help="Adapter: train each position toward the teacher's selection, or toward the token the trajectory "
    "took (chosen: with sampled answers, of which only the right ones are kept, rejection sampling), or "
    "toward the token taken on sampled answers only and the teacher's selection elsewhere (samples).",
)
@click.option(
    "--bf16",
    is_flag=True,
    help="Adapter: run the SLM's layers under bfloat16 autocast (faster on CPUs with AVX512-BF16 or AMX; "
    "the LoRA weights, optimizer and losses stay float32).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@cli_options.threads
@click.option("--json", "as_json", is_flag=True)
def train(
    groups,
    labels,
    out,
    slm,
    k,
    epochs,
    rank,
    width,
    no_hidden,
    no_tokens,
    token_prior,
    divergent_weight,
    lr,
    kl_weight,
    all_trajectories,
    max_problems,
    problems_of,
    targets,
    layers,
    objective,
    divergent_margin,
    early_weight,
    early_fraction,
    teacher_kl_weight,
    toward,
    bf16,
    seed,
    threads,
    as_json,
):
    """Distill the teacher's selection: into the tiny reranker (--groups) or a LoRA adapter (--labels)."""
    if (groups is None) == (not labels):
        raise click.UsageError("give --groups (reranker) or --labels (adapter)")
    ctx = click.get_current_context()
    given = {n for n in ctx.params if ctx.get_parameter_source(n) != click.core.ParameterSource.DEFAULT}
    wrong = given & ({"k", "width", "no_hidden", "no_tokens", "token_prior"} if labels else ADAPTER_ONLY)
    if wrong:
        flags = ", ".join("--" + n.replace("_", "-") for n in sorted(wrong))
        raise click.UsageError(f"{flags} do not apply to {'--labels (adapter)' if labels else '--groups (reranker)'}")
    if objective == "vocab" and "teacher_kl_weight" in given:
        raise click.UsageError("--teacher-kl-weight weighs the listwise term of --objective select; vocab has none")
    need_training_extra()
    from s2t_edge.store import resolve_model

    if labels:
        from s2t_edge.train.adapter import TARGETS, AdapterConfig, train_adapter

        cfg = AdapterConfig(
            rank=rank or 16,
            alpha=2 * (rank or 16),
            lr=lr or 1e-4,
            epochs=epochs or 1,
            divergent_weight=3.0 if divergent_weight is None else divergent_weight,
            kl_weight=kl_weight,
            only_correct=not all_trajectories,
            max_problems=max_problems,
            seed=seed,
            targets=TARGETS[:4] if targets == "attention" else TARGETS,
            layers=layers,
            objective=objective,
            divergent_margin=divergent_margin,
            early_weight=early_weight,
            early_fraction=early_fraction,
            teacher_kl_weight=teacher_kl_weight,
            toward=toward,
            bf16=bf16,
        )
        keys = None if problems_of is None else report_keys(problems_of)
        from s2t_edge.train.trunk import native_bf16

        if bf16 and not native_bf16():
            click.echo(
                "warning: this CPU has no native bfloat16 (AVX512-BF16 or AMX): --bf16 is emulated and far "
                "slower than float32 here; drop it",
                err=True,
            )
        r = train_adapter(labels, resolve_model(slm), out, cfg, threads=threads, keys=keys)
        if as_json:
            click.echo(json.dumps(r, indent=2))
            return
        b = r["best"]
        click.echo(
            f"validation ({r['problems']['val']} problems, {b['positions']} positions), best at {b['tag']}: "
            f"agreement {b['agreement']:.4f} vs base {b['base_agreement']:.4f}; "
            f"teacher's choice at divergence {b['hit_at_divergence']:.3f}; "
            f"changed where base agrees {b['changed_where_agreeing']:.4f}"
        )
        click.echo(f"adapter → {out / 'adapter.pt'}")
        return

    from s2t_edge.train.train import TrainConfig
    from s2t_edge.train.train import train as run

    cfg = TrainConfig(
        k=k,
        epochs=epochs or 6,
        rank=rank or 32,
        width=width,
        use_hidden=not no_hidden,
        use_tokens=not no_tokens,
        token_prior=token_prior,
        divergent_weight=1.0 if divergent_weight is None else divergent_weight,
        seed=seed,
    )
    r = run(groups, out, resolve_model(slm), cfg)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    t = r["test"]
    click.echo(
        f"held-out ({r['problems']['test']} problems, {t['positions']} positions): "
        f"agreement {t['agreement']:.4f} vs greedy {t['greedy_agreement']:.4f}; "
        f"hit@1 at divergence {t['hit1_at_divergence']:.3f}; false flips {t['false_flip_rate']:.4f}; "
        f"trigger P/R {t['trigger_precision'] or 0:.2f}/{t['trigger_recall'] or 0:.2f} "
        f"at threshold {r['threshold']:.3f} (rule {r['rule']})"
    )
    click.echo(f"checkpoint → {out / 'reranker.pt'}")


@click.command()
@click.option("--slm", default=None, help="SLM registry name or .gguf path.")
@click.option("--reranker", type=click.Path(path_type=Path), help="reranker.pt from `s2t-edge train --groups`.")
@click.option(
    "--adapter",
    type=click.Path(path_type=Path),
    help="Output folder of `s2t-edge train --labels`, or a bundle whose checked adapter is reused.",
)
@click.option(
    "--weights",
    type=click.Choice(["best", "last"]),
    default="best",
    show_default=True,
    help="The adapter's best weights on validation, or the last ones trained.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@click.option("--archive", is_flag=True, help="Also write OUT.tar, one file to copy around.")
@click.option(
    "--quantize",
    type=click.Choice(["Q4_K_M", "Q8_0"]),
    default=None,
    help="Requantize a higher-precision GGUF through llama.cpp first (reranker-only bundles).",
)
@click.option("--no-gguf", is_flag=True, help="Leave the GGUF out (it comes from `s2t-edge models pull`).")
@cli_options.threads
def export(slm, reranker, adapter, weights, out, archive, quantize, no_gguf, threads):
    """Write an S2T-LOCAL bundle: GGUF + LoRA adapter and/or ONNX reranker + bundle.json, each checked."""
    if reranker is None and adapter is None:
        raise click.UsageError("give --adapter DIR, --reranker FILE, or both")
    need_training_extra()
    from s2t_edge.export.bundle_writer import export_bundle
    from s2t_edge.store import load_registry, resolve_model

    path = resolve_model(slm)
    name = next((n for n, e in load_registry().items() if e.file == path.name), None)
    lora = None
    if adapter is not None and (adapter / MANIFEST).is_file():  # a bundle: its checked adapter, reused
        lora = adapter
    elif adapter is not None:
        from s2t_edge.train.adapter import adapter_export

        lora = adapter_export(adapter, path, which=weights, threads=threads)
    written = export_bundle(
        path, reranker, out, adapter=lora, archive=archive, quantize=quantize, include_gguf=not no_gguf, slm_name=name
    )
    click.echo(f"bundle → {written}")
