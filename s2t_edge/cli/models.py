"""`s2t-edge models ...`: list, pull, verify, locate and remove models in the local store."""

from __future__ import annotations

import json

import click

from s2t_edge import store
from s2t_edge.errors import S2TError


@click.group()
def models() -> None:
    """Manage the local model store (set S2T_EDGE_MODELS to move it)."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_cmd(as_json: bool) -> None:
    """List the registry models and whether they are pulled (* = default)."""
    rows = store.list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        mark = "*" if r["default"] else " "
        state = "pulled" if r["present"] else "-"
        click.echo(f"{mark} {r['name']:<38} {r['role']:<8} {r['size'] / 1e6:7.1f} MB  {state}")
    click.echo(f"store: {store.store_dir()}")


@models.command("pull")
@click.argument("name", required=False)
def pull_cmd(name: str | None) -> None:
    """Download, verify and store NAME (default: the default SLM); prints its path."""
    from s2t_edge.pull import pull

    click.echo(pull(name or store.default_model()))


@models.command("verify")
@click.argument("target", metavar="NAME|PATH")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_cmd(target: str, as_json: bool) -> None:
    """Re-hash a pulled model or a file and compare it with the registry."""
    res = store.verify(target, progress=True)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2))
    elif res.ok is None:
        click.echo(f"{res.path}: {res.size} bytes, sha256 {res.sha256} (not a registry model)")
    elif res.ok:
        click.echo(f"ok: {res.name} ({res.path}) sha256 {res.sha256}")
    if res.ok is False:
        raise S2TError(
            f"{res.path} does not match {res.name} (size {res.size}, expected "
            f"{res.expected_size}; sha256 {res.sha256}, expected {res.expected_sha256}); "
            f"run `s2t-edge models rm {res.name}` and `s2t-edge models pull {res.name}`"
        )


@models.command("path")
@click.argument("name", required=False)
def path_cmd(name: str | None) -> None:
    """Print the path of pulled model NAME (default: the default SLM)."""
    click.echo(store.resolve_model(name, pull=False, progress=False))


@models.command("rm")
@click.argument("name")
def rm_cmd(name: str) -> None:
    """Delete model NAME (and any partial download) from the store."""
    click.echo(f"removed {name}" if store.remove(name) else f"{name} is not pulled")
