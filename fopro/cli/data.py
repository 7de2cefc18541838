"""`fopro data info` and `fopro data synth`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from fopro.cli.common import cli_errors, console, print_json, progress_bar, with_data_options, with_group_options
from fopro.cli.render import GROUP_STYLE
from fopro.data import DataOptions
from fopro.data.summary import data_info
from fopro.data.synth import SynthConfig, generate_synth
from fopro.metrics import LongTailGroups

app = typer.Typer(help="Inspect datasets and generate the embedded synthetic one.", no_args_is_help=True)


@app.command("info")
@cli_errors
@with_data_options
@with_group_options
def info_cli(
    data_options: DataOptions,
    groups: LongTailGroups,
    json_output: Annotated[bool, typer.Option("--json", help="Print only a JSON object (key 'splits': split -> class -> count).")] = False,
) -> None:
    """Per-class image counts of each split, the imbalance ratio and head/medium/tail membership."""
    result = data_info(data_options, groups)
    if json_output:
        print_json(result)
        return
    render_info(result)


def render_info(result: dict) -> None:
    splits = result["splits"]
    order = sorted(result["classes"], key=lambda c: -splits.get("train", next(iter(splits.values()))).get(c, 0))
    table = Table(title="Images per class (sorted by training count)")
    table.add_column("class")
    for split in splits:
        table.add_column(split, justify="right")
    if "groups" in result:
        table.add_column("group")
    for name in order:
        row = [escape(name)] + [str(splits[s].get(name, 0)) for s in splits]
        if "groups" in result:
            group = result["groups"][name]
            row.append(f"[{GROUP_STYLE[group]}]{group}[/]")
        table.add_row(*row)
    table.add_row("[bold]total[/]", *[f"[bold]{sum(c.values())}[/]" for c in splits.values()], *([""] if "groups" in result else []))
    console.print(table)
    if result.get("imbalance_ratio") is not None:
        ratio = result["imbalance_ratio"]
        console.print(f"imbalance ratio (rarest / most frequent training class): [bold]{ratio:.4f}[/] (1:{1 / ratio:.0f})")
        console.print("groups: " + ", ".join(f"{k}: {v}" for k, v in result["group_definition"].items()))


@app.command("synth")
@cli_errors
def synth_cli(
    out: Annotated[Path, typer.Argument(help="Folder to write target/ (train/val/test) and public/ (train/val) into.")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives byte-identical images.")] = 0,
    num_classes: Annotated[int, typer.Option(help="Number of target classes.")] = 8,
    image_size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    imbalance: Annotated[float, typer.Option(help="Target training imbalance factor (rarest / most frequent).")] = 0.01,
    max_per_class: Annotated[int, typer.Option(help="Training images of the most frequent target class.")] = 500,
    val_per_class: Annotated[int, typer.Option(help="Validation images per target class (balanced).")] = 20,
    test_per_class: Annotated[int, typer.Option(help="Test images per target class (balanced).")] = 20,
    public_classes: Annotated[int, typer.Option(help="Classes of the public corpus (for pre-training a teacher).")] = 10,
    public_per_class: Annotated[int, typer.Option(help="Public training images per class.")] = 300,
    public_val_per_class: Annotated[int, typer.Option(help="Public validation images per class.")] = 30,
    unlabeled: Annotated[int, typer.Option(help="Also write N unlabelled target images to OUT/target/unlabeled/ (one flat folder, no labels), drawn from the training class distribution; changes no other image.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a synthetic dataset already in OUT.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Generate the embedded synthetic long-tailed dataset (lesion-like images, offline, deterministic)."""
    config = SynthConfig(
        num_classes=num_classes,
        image_size=image_size,
        imbalance=imbalance,
        max_per_class=max_per_class,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
        public_classes=public_classes,
        public_per_class=public_per_class,
        public_val_per_class=public_val_per_class,
        seed=seed,
        unlabeled=unlabeled,
    )
    with progress_bar(not json_output) as progress:
        summary = generate_synth(out, config, progress=lambda done, total: progress("generating images", done, total), overwrite=overwrite)
    if json_output:
        print_json(summary)
        return
    console.print(f"[green]wrote[/green] synthetic data (SYNTHETIC, not medical images) to [bold]{out}[/]")
    console.print(f"  target: {out / 'target'}  (fopro data info --data {out / 'target'})")
    console.print(f"  public: {out / 'public'}  (to pre-train a stand-in teacher)")
    if unlabeled:
        pool = out / "target" / summary["target"]["unlabeled"]["folder"]
        console.print(f"  unlabeled: {pool}  ({unlabeled} images, no labels)")
