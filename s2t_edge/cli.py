"""The `s2t-edge` command line: thin click wrappers over the library."""

from __future__ import annotations

import sys

import click

from s2t_edge import __version__
from s2t_edge.errors import S2TError


class _Group(click.Group):
    """Turns S2TError into one clear line on stderr and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except S2TError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="s2t-edge")
def main() -> None:
    """Select to Think on the edge: a small model reranks its own top-K candidates."""


def _register() -> None:
    from s2t_edge.cli_eval import eval_group
    from s2t_edge.cli_models import models
    from s2t_edge.cli_pipeline import analyze, bundle, collect, export, train
    from s2t_edge.cli_run import chat, generate

    for command in (models, generate, chat, collect, analyze, train, export, bundle, eval_group):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
