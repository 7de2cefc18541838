"""The Typer app. Each command parses options, calls one library function and renders its result."""

from __future__ import annotations

from typing import Annotated

import typer

from fopro import __version__
from fopro.cli import data as data_commands
from fopro.cli.card import card_cli
from fopro.cli.common import STATE
from fopro.cli.distill import distill_cli
from fopro.cli.evaluate import eval_cli
from fopro.cli.export import export_cli
from fopro.cli.probe import probe_cli

app = typer.Typer(
    name="fopro",
    help="FoPro-KD: distil frozen pre-trained teachers into small students for long-tailed medical image recognition.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(data_commands.app, name="data")
app.command("distill")(distill_cli)
app.command("eval")(eval_cli)
app.command("export")(export_cli)
app.command("probe")(probe_cli)
app.command("card")(card_cli)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fopro {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: Annotated[bool, typer.Option(help="Show full tracebacks instead of one-line errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    STATE["debug"] = debug


def main() -> None:
    app()
