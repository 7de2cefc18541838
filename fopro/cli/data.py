"""`fopro data info`, `split`, `synth` and `prepare`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from fopro.cli.common import cli_errors, console, print_json, progress_bar, with_data_options, with_group_options
from fopro.cli.render import GROUP_STYLE
from fopro.data import DataOptions
from fopro.data.prepare import DEFAULT_IMAGE_SIZE, PrepareOptions, prepare_cache
from fopro.data.split import SplitOptions, split_dataset
from fopro.data.summary import data_info
from fopro.data.synth import SynthConfig, generate_synth
from fopro.metrics import LongTailGroups

app = typer.Typer(help="Inspect datasets, split them, generate the embedded synthetic one, prepare an image cache.", no_args_is_help=True)


@app.command("info")
@cli_errors
@with_data_options
@with_group_options
def info_cli(
    data_options: DataOptions,
    groups: LongTailGroups,
    group_column: Annotated[Optional[str], typer.Option(help="Patient or lesion id column of the split CSVs: warn when a group has images in two splits (a leak).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print only a JSON object (key 'splits': split -> class -> count).")] = False,
) -> None:
    """Per-class image counts of each split, the imbalance ratio and head/medium/tail membership."""
    result = data_info(data_options, groups, group_column)
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
    leakage = result.get("leakage")
    if leakage and leakage["groups_on_two_sides"]:
        examples = "; ".join(f"{escape(group)} in {', '.join(sides)}" for group, sides in leakage["examples"].items())
        console.print(f"[bold yellow]warning:[/] {leakage['groups_on_two_sides']} of {leakage['groups']} '{escape(leakage['group_column'])}' "
                      f"groups have images in two splits (e.g. {examples}): the numbers are inflated; split with fopro data split")
    elif leakage:
        console.print(f"no '{escape(leakage['group_column'])}' group has images in two splits ({leakage['groups']} groups)")


@app.command("split")
@cli_errors
def split_cli(
    source: Annotated[Path, typer.Argument(help="One metadata CSV (image and label columns, e.g. HAM10000's) or a folder ROOT/<class>/<image>.")],
    out: Annotated[Path, typer.Option(help="Folder for train.csv, val.csv and test.csv (with --folds: fold<k>/train.csv, fold<k>/val.csv, test.csv).")],
    label_column: Annotated[Optional[str], typer.Option(help="CSV column with the class (auto-detected when unambiguous).")] = None,
    group_column: Annotated[Optional[str], typer.Option(help="Patient or lesion id: all images of a group go to the same split.")] = None,
    image_column: Annotated[Optional[str], typer.Option(help="CSV column with the image path or id (auto-detected).")] = None,
    val: Annotated[Optional[float], typer.Option(help="Fraction of each class for val, e.g. 0.15.")] = None,
    test: Annotated[Optional[float], typer.Option(help="Fraction of each class for test, e.g. 0.15.")] = None,
    val_per_class: Annotated[Optional[int], typer.Option(help="Images of each class for val (e.g. 50, the ISIC-2019-LT protocol).")] = None,
    test_per_class: Annotated[Optional[int], typer.Option(help="Images of each class for test (e.g. 100).")] = None,
    imbalance: Annotated[Optional[float], typer.Option(help="Subsample train to this long-tail factor (rarest / most frequent).")] = None,
    folds: Annotated[Optional[int], typer.Option(help="K-fold cross-validation files instead of one val split.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the shuffles; the same seed gives the same files.")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Stratified, patient- or lesion-grouped train / val / test CSVs from one metadata CSV."""
    options = SplitOptions(label_column=label_column, group_column=group_column, image_column=image_column, val=val, test=test,
                           val_per_class=val_per_class, test_per_class=test_per_class, imbalance=imbalance, folds=folds, seed=seed)
    summary = split_dataset(source, out, options)
    if json_output:
        print_json(summary)
        return
    table = Table(title=f"Images per class in {escape(str(out))}")
    table.add_column("class")
    for name in summary["counts"]:
        table.add_column(escape(name), justify="right")
    for label in sorted({c for counts in summary["counts"].values() for c in counts}):
        table.add_row(escape(label), *[str(counts.get(label, 0)) for counts in summary["counts"].values()])
    console.print(table)
    grouped = f"grouped by '{escape(group_column)}'" if group_column else "every image its own group"
    console.print(f"{grouped}: {summary['groups_on_two_sides']} group(s) on two sides; files: "
                  + ", ".join(escape(path) for path in summary["files"].values()))
    for note in summary["notes"]:
        console.print(f"[yellow]{escape(note)}[/]")


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


@app.command("prepare")
@cli_errors
@with_data_options
def prepare_cli(
    data_options: DataOptions,
    out: Annotated[Path, typer.Option(help="New folder for the image cache; then run any command with --data OUT.")],
    image_size: Annotated[int, typer.Option(help="Side of the square images the runs use: distill's --image-size, or the model's input size for eval.")] = DEFAULT_IMAGE_SIZE,
    workers: Annotated[Optional[int], typer.Option(help="Decoding processes (default: every core this process may use).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an image cache already in OUT.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Decode and resize every image once, as training does, into an image cache that --data reads (same pixels, same metrics)."""
    options = PrepareOptions(image_size=image_size, workers=workers, overwrite=overwrite)
    with progress_bar(not json_output) as progress:
        summary = prepare_cache(data_options, out, options, progress)
    if json_output:
        print_json(summary)
        return
    counts = ", ".join(f"{split} {entry['images']}" for split, entry in summary["splits"].items())
    console.print(f"[green]wrote[/green] an image cache of {summary['images']} images ({counts}) at {image_size} px, "
                  f"{summary['bytes'] / 1e6:.1f} MB, to [bold]{escape(str(out))}[/] in {summary['seconds']:.1f} s "
                  f"({summary['images_per_second']} images/s, {summary['workers']} workers)")
    for note in summary["notes"]:
        console.print(f"[yellow]{escape(note)}[/]")
    console.print(f"  use it: fopro distill --data {escape(str(out))} --image-size {image_size} ...")
