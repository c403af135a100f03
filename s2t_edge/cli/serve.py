"""`s2t-edge serve`: a thin click command over `s2t_edge.serve.server.run`."""

from __future__ import annotations

import click

from s2t_edge.cli import options as cli_options


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port (0: any free one).")
@click.option("--model", metavar="NAME|PATH", default=None, help="Registry model name or GGUF file.")
@click.option(
    "--bundle",
    metavar="PATH|none",
    default=None,
    help="S2T-LOCAL bundle (default: the shipped one; 'none' serves plain greedy).",
)
@click.option(
    "--parallel",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Requests decoded at once, as one batch.",
)
@click.option(
    "--queue",
    "queue_size",
    type=click.IntRange(min=0),
    default=16,
    show_default=True,
    help="Requests that may wait for a slot; more get HTTP 503.",
)
@click.option(
    "--api-key",
    envvar="S2T_EDGE_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on /v1/* (also $S2T_EDGE_API_KEY).",
)
@click.option(
    "--ctx",
    type=click.IntRange(min=16),
    default=4096,
    show_default=True,
    help="Context per request in tokens (prompt + answer).",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Answer length for requests that give no max_tokens.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Seconds running requests get to finish on Ctrl-C / SIGTERM.",
)
@cli_options.adapter_scale
@cli_options.threads
@cli_options.gpu_layers
@cli_options.pull
def serve(
    host: str,
    port: int,
    model: str | None,
    bundle: str | None,
    parallel: int,
    queue_size: int,
    api_key: str | None,
    ctx: int,
    max_tokens: int,
    grace: float,
    adapter_scale: float | None,
    threads: int | None,
    gpu_layers: int,
    pull: bool,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, with a web chat at /.

    POST /v1/chat/completions and /v1/completions (streamed or not), GET /v1/models, GET /health.
    S2T-LOCAL by default; temperature > 0 samples (from the adapted SLM if the bundle has an
    adapter). The model name '<model>:greedy' asks for the base model's greedy (not served
    beside an adapter).
    """
    from s2t_edge.serve.server import ServeConfig, run

    cfg = ServeConfig(
        host=host,
        port=port,
        model=model,
        bundle=bundle,
        adapter_scale=adapter_scale,
        parallel=parallel,
        queue=queue_size,
        api_key=api_key or None,
        ctx=ctx,
        max_tokens=max_tokens,
        threads=threads,
        gpu_layers=gpu_layers,
        grace=grace,
        pull=pull or None,
    )
    run(cfg, ready=click.echo)
