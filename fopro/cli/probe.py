"""`fopro probe`: a teacher's frequency preferences on your data and its linear probe (`--teacher`), or what a
trained FPG learned (`--fpg`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from fopro.cli.common import cli_errors, console, print_json, progress_bar, with_data_options, with_group_options
from fopro.cli.render import fmt
from fopro.data import DataOptions
from fopro.metrics import LongTailGroups
from fopro.data.augment import DEFAULT_PRESET, PRESET_HELP
from fopro.errors import FoproError
from fopro.models.teacher import TeacherOptions
from fopro.probe.fpg_report import probe_fpg
from fopro.probe.frequency import run_probe
from fopro.probe.options import ProbeOptions
from fopro.probe.verdict import linear_probe_line, points_text

AUGMENT_PRESETS = "; ".join(f"{name}: {text}" for name, text in PRESET_HELP.items())


@cli_errors
@with_data_options
@with_group_options
def probe_cli(
    data_options: DataOptions,
    groups: LongTailGroups,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher to probe: a timm model name or a fopro checkpoint (NAME.safetensors).")] = None,
    teacher_weights: Annotated[Optional[Path], typer.Option(help="Local weights for the timm teacher (.safetensors or .pth).")] = None,
    teacher_image_size: Annotated[Optional[int], typer.Option(help="Teacher input size; images are probed at this size (default: the images' size, at most 224).")] = None,
    fpg: Annotated[Optional[Path], typer.Option(help="A distillation run folder (fpg.safetensors + config.json): show what its learned Fourier prompt does.")] = None,
    probe_json: Annotated[Optional[Path], typer.Option(help="With --fpg: an earlier probe.json of the same teacher, to compare with.")] = None,
    split: Annotated[str, typer.Option(help="Split to probe (train, val or test).")] = "val",
    bands: Annotated[str, typer.Option(help="Number of radial frequency bands (rings from 0 to Nyquist).")] = "8",
    log_bands: Annotated[bool, typer.Option(help="Log-spaced bands (finer at low frequencies) instead of linear.")] = False,
    gains: Annotated[str, typer.Option(help="Comma-separated amplitude gains per band: 0 removes it, <1 diminishes, >1 amplifies.")] = "0,0.5,2",
    per_class: Annotated[int, typer.Option(help="At most this many images per class (a seeded selection).")] = 50,
    batch_size: Annotated[int, typer.Option(help="Images per teacher batch.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the image selection and of the cross-validation folds.")] = 0,
    linear: Annotated[bool, typer.Option("--linear/--no-linear", help="With --teacher: also train a linear classifier on the frozen teacher's embeddings of the train split and score it on --split (how much the teacher knows).")] = True,
    linear_views: Annotated[int, typer.Option(help="Augmented passes over the train split that the linear probe is trained on (each a different draw).")] = 4,
    augment: Annotated[str, typer.Option(help=f"Augmentation preset of the linear probe's train views, as in `fopro distill`. {AUGMENT_PRESETS}.")] = DEFAULT_PRESET,
    out: Annotated[Optional[Path], typer.Option(help="Write probe.json and probe.png here (with --fpg: fpg.json and fpg_mask.png; default RUN_DIR; without data options --fpg uses the run's data).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the whole result as JSON on stdout, nothing else.")] = False,
) -> None:
    """How scaling each frequency band of the images changes how well the frozen teacher separates the classes,
    and how well a linear classifier on its embeddings (trained on the train split) scores: what the teacher knows."""
    options = ProbeOptions(split=split, bands=bands, log_bands=log_bands, gains=gains, per_class=per_class,
                           batch_size=batch_size, device=device, seed=seed, groups=groups,
                           linear=linear, linear_views=linear_views, augment=augment)
    if (teacher is None) == (fpg is None):
        raise FoproError("give either --teacher T (probe a teacher) or --fpg RUN_DIR (show a learned prompt), not both or neither")
    if fpg is not None:
        if teacher_weights is not None or teacher_image_size is not None:
            raise FoproError("--teacher-weights and --teacher-image-size go with --teacher, not with --fpg")
        out_dir = out if out is not None else fpg
        with progress_bar(not json_output) as progress:
            result = probe_fpg(fpg, data_options, options, out_dir, probe_json=probe_json, progress=progress)
        if json_output:
            print_json(result)
            return
        render_fpg(result)
        console.print(f"[green]wrote[/green] fpg.json, fpg_mask.png to {escape(str(out_dir))}")
        return
    if probe_json is not None:
        raise FoproError("--probe-json goes with --fpg RUN_DIR: it compares a learned prompt with an earlier probe")
    teacher_options = TeacherOptions(teacher=teacher, weights=teacher_weights, image_size=teacher_image_size)
    with progress_bar(not json_output) as progress:
        result = run_probe(teacher_options, data_options, options, out_dir=out, progress=progress)
    if json_output:
        print_json(result)
        return
    render_probe(result)
    if out is not None:
        console.print(f"[green]wrote[/green] probe.json, probe.png to {escape(str(out))}")


def _points(value: float | None, noise: float = 0.0) -> str:
    """Points of balanced accuracy; green / red only when the change is beyond the noise."""
    if value is None:
        return "[dim]n/a[/]"
    style = "bold green" if value > noise else ("bold red" if value < -noise else "dim")
    return f"[{style}]{points_text(value)}[/]"


def _noise(row: dict, key: str, min_effect: float) -> float:
    return max(min_effect, 2.0 * (row.get(f"se_{key}") or 0.0))


def render_probe(result: dict) -> None:
    """Headline, the band x gain table of balanced-accuracy changes (tail below), the verdict and notes."""
    teacher = result["teacher"]
    console.rule(f"[bold]fopro probe[/] {escape(str(teacher['teacher']))} — {result['split']} split, "
                 f"{result['num_images']} images, {len(result['classes'])} classes, {result['image_size']} px")
    clean = result["clean"]
    tail = result["tail"]
    console.print(
        f"clean: balanced accuracy (nearest class mean) [bold]{fmt(clean['balanced_accuracy'])}[/]   "
        f"k-NN [bold]{fmt(clean['knn_balanced_accuracy'])}[/]   tail [bold red]{fmt(clean['tail_balanced_accuracy'])}[/]"
        + (f" ({escape(', '.join(tail['classes']))})" if tail.get("classes") else "")
    )
    if result.get("linear_probe"):
        console.print(f"[bold]{escape(linear_probe_line(result['linear_probe']))}[/]", highlight=False)
    evaluation = result["evaluation"]
    console.print(f"[dim]{evaluation['folds']}-fold stratified cross-validation, k-NN k={evaluation['knn_k']}; "
                  "cells: change in balanced accuracy vs clean (points; coloured when beyond 2 standard errors), "
                  "tail classes below, mean cosine to clean[/]")
    min_effect = float(result["preference"].get("min_effect", 0.01))
    table = Table(title="Balanced accuracy change when one band is scaled")
    table.add_column("band (of Nyquist)")
    table.add_column("energy", justify="right")
    gains = result["gains"]
    for gain in gains:
        label = "removed" if gain == 0 else ("diminished" if gain < 1 else ("amplified" if gain > 1 else "unchanged"))
        table.add_column(f"x{gain:g} ({label})", justify="right")
    cells = {(row["band"], row["gain"]): row for row in result["results"]}
    for band, (low, high) in enumerate(result["bands"]):
        row_cells = []
        for gain in gains:
            row = cells.get((band, gain))
            if row is None:
                row_cells.append("")
                continue
            overall = _points(row["delta_balanced_accuracy"], _noise(row, "delta_balanced_accuracy", min_effect))
            tail_cell = _points(row["delta_tail_balanced_accuracy"], _noise(row, "delta_tail_balanced_accuracy", min_effect))
            row_cells.append(f"{overall}\ntail {tail_cell}"
                             f"\n[dim]cos {row['cosine']:.3f}[/]")
        table.add_row(f"{band}: {low:.2f}-{high:.2f}", f"{100 * result['band_energy'][band]:.1f}%", *row_cells)
    console.print(table)
    console.print(f"[bold]{escape(result['verdict'])}[/]")
    for note in result.get("notes", []):
        console.print(f"[dim]note: {escape(note)}[/]")


def render_fpg(result: dict) -> None:
    """The learned mask's radial profile per band, the comparison with a probe, the verdict and notes."""
    spec = result["fpg"]
    console.rule(f"[bold]fopro probe --fpg[/] {escape(result['run_dir'])} — {spec['mode']} prompt, strength {spec['strength']:g}, "
                 f"{result['num_images']} {result['split']} images")
    mask = result["mask"]
    console.print(f"mean mask: min {mask['min']:.3f}, max {mask['max']:.3f}, mean {mask['mean']:.3f} "
                  f"(bounds {mask['bounds'][0]:.2f}-{mask['bounds'][1]:.2f}; 1 = unchanged)")
    probe = result.get("probe")
    table = Table(title="Mean FPG gain per frequency band")
    for column in ("band (of Nyquist)", "mean gain", "FPG") + (("probe suggests",) if probe else ()):
        table.add_column(column, justify="left" if column.startswith("band") else "right")
    style = {"amplified": "[red]amplified[/]", "diminished": "[blue]diminished[/]", "unchanged": "[dim]unchanged[/]"}
    for band in result["radial_profile"]:
        cells = [f"{band['band']}: {band['range'][0]:.2f}-{band['range'][1]:.2f}", f"{band['mean_gain']:.3f}", style[band["direction"]]]
        if probe:
            gain = probe["suggested_gains"][band["band"]]
            cells.append("[dim]leave[/]" if gain == 1 else f"x{gain:g}")
        table.add_row(*cells)
    console.print(table)
    console.print(f"[bold]{escape(result['verdict'])}[/]")
    for note in result.get("notes", []):
        console.print(f"[dim]note: {escape(note)}[/]")
