"""Click options that several commands share, declared once."""

from __future__ import annotations

import click

threads = click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads (default: all cores, at most 8).",
)
gpu_layers = click.option(
    "--gpu-layers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Layers to offload to the GPU (Metal on macOS).",
)
skip_bad = click.option("--skip-bad", is_flag=True, help="Skip malformed JSONL lines (counted) instead of failing.")
pull = click.option(
    "--pull", is_flag=True, help="Pull a missing registry model without asking (it is never pulled unasked)."
)
adapter_scale = click.option(
    "--adapter-scale",
    type=click.FloatRange(min=0.0, max=100.0),
    default=None,
    help="Apply the bundle's LoRA adapter at this scale (default: the bundle's, 1).",
)
