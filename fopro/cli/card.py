"""`fopro card`: MODEL_CARD.md for a run or a checkpoint, generated from its files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fopro.cli.common import cli_errors, console, print_json
from fopro.model_card import resolve_checkpoint, write_card


@cli_errors
def card_cli(
    model: Annotated[Path, typer.Argument(help="A run folder (its best checkpoint) or a checkpoint NAME.safetensors.")],
    out: Annotated[Optional[Path], typer.Option(help="Where to write the card (default: MODEL_CARD.md beside the checkpoint).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print {\"model_card\": PATH} as JSON on stdout, nothing else.")] = False,
) -> None:
    """Write a model card (Hugging Face layout) from the checkpoint's JSON and the run's test evaluation."""
    weights = resolve_checkpoint(model)
    path = write_card(weights, out if out is not None else weights.with_name("MODEL_CARD.md"))
    if json_output:
        print_json({"model_card": str(path)})
        return
    console.print(f"[green]wrote[/green] {path}")
