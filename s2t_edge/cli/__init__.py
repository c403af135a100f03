"""The `s2t-edge` command line: thin click wrappers over the library."""

from __future__ import annotations

import sys

import click

from s2t_edge import __version__
from s2t_edge.errors import S2TError


class _Group(click.Group):
    """The one error path: a user error (S2TError, or the OS refusing a path the user gave) is one
    line on stderr and exit code 1; Ctrl-C is exit 130; a closed stdout ends quietly."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except S2TError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except BrokenPipeError:  # e.g. `s2t-edge ... | head`
            sys.stderr.close()
            sys.exit(0)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"error: {e.strerror or e}{where}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="s2t-edge")
def main() -> None:
    """Select to Think on the edge: a small model reranks its own top-K candidates."""


def _register() -> None:
    from s2t_edge.cli.eval import eval_group
    from s2t_edge.cli.models import models
    from s2t_edge.cli.pipeline import analyze, bundle, collect, label
    from s2t_edge.cli.run import chat, generate
    from s2t_edge.cli.serve import serve
    from s2t_edge.cli.train import export, train

    for command in (models, generate, chat, serve, collect, label, analyze, train, export, bundle, eval_group):
        main.add_command(command)


_register()

if __name__ == "__main__":
    main()
