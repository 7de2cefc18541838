"""`fopro eval`: per-class and rare-class metrics of a checkpoint or an exported ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fopro.cli.common import cli_errors, console, print_json, progress_bar, with_data_options, with_group_options
from fopro.cli.render import render_eval
from fopro.data import DataOptions
from fopro.metrics import LongTailGroups
from fopro.bootstrap import DEFAULT_RESAMPLES
from fopro.evaluate import EvalOptions, evaluate, parse_specificities


@cli_errors
@with_data_options
@with_group_options
def eval_cli(
    data_options: DataOptions,
    groups: LongTailGroups,
    model: Annotated[Path, typer.Argument(help="A fopro checkpoint (NAME.safetensors with NAME.json), an exported .onnx file, or a run folder (its best checkpoint, on the run's own data unless data options are given).")],
    split: Annotated[str, typer.Option(help="Split to evaluate (train, val or test).")] = "test",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (PyTorch checkpoints).")] = "auto",
    bootstrap: Annotated[int, typer.Option(help="Stratified bootstrap resamples for the 95 % intervals (0 turns them off).")] = DEFAULT_RESAMPLES,
    specificity: Annotated[str, typer.Option(help="Target specificities (comma-separated): each class's sensitivity and threshold at each.")] = "0.9,0.95",
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Write metrics.json, per_class.csv, predictions.csv, confusion.png, roc_pr.png (and reliability.png) here.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON on stdout, nothing else.")] = False,
) -> None:
    """Per-class and rare-class metrics (balanced accuracy, head/medium/tail recall, confusion matrix)."""
    options = EvalOptions(split=split, batch_size=batch_size, device=device, groups=groups, bootstrap=bootstrap,
                          specificities=parse_specificities(specificity), seed=seed)
    with progress_bar(not json_output) as progress:
        report = evaluate(model, data_options, options, out_dir=out, progress=progress)
    if json_output:
        print_json(report)
        return
    render_eval(report, title=f"fopro eval {model.name}")
    if out is not None:
        console.print(f"[green]wrote[/green] metrics.json, per_class.csv, predictions.csv and the plots to {out}")
