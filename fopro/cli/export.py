"""`fopro export`: the student as a verified ONNX model, with its preprocessing facts inside."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fopro.cli.common import cli_errors, console, print_json, progress_bar, with_data_options
from fopro.cli.render import fmt
from fopro.data import DataOptions
from fopro.errors import FoproError
from fopro.export import export_onnx
from fopro.export_options import DEFAULT_OPSET, ExportOptions


def parse_batch(value: str) -> int | None:
    if value.strip().lower() == "dynamic":
        return None
    try:
        batch = int(value)
    except ValueError:
        batch = 0
    if batch <= 0:
        raise FoproError(f"--batch {value} must be 'dynamic' or a positive number of images")
    return batch


@cli_errors
@with_data_options
def export_cli(
    data_options: DataOptions,
    checkpoint: Annotated[Path, typer.Argument(help="A fopro checkpoint (NAME.safetensors with NAME.json).")],
    onnx_path: Annotated[Path, typer.Option("--onnx", help="Write the ONNX model here (a path ending in .onnx).")],
    opset: Annotated[int, typer.Option(help="ONNX opset of the exported graph.")] = DEFAULT_OPSET,
    batch: Annotated[str, typer.Option(help="'dynamic' (any batch size) or a fixed number of images per call.")] = "dynamic",
    include_preprocess: Annotated[bool, typer.Option(help="The graph takes uint8 NCHW images (0-255) and normalises them itself.")] = False,
    softmax: Annotated[bool, typer.Option(help="Output probabilities instead of logits.")] = False,
    fp16: Annotated[bool, typer.Option(help="float16 weights (inputs and outputs stay float32); for GPUs.")] = False,
    int8: Annotated[bool, typer.Option(help="int8 static quantisation (QDQ, per channel), calibrated on your data (needs the data options).")] = False,
    calibration_images: Annotated[int, typer.Option(help="Images of the train split (else val) used to calibrate --int8.")] = 200,
    max_int8_drop: Annotated[float, typer.Option(help="--int8: the largest loss of VAL balanced accuracy, in points, before the export is refused.")] = 1.0,
    max_int8_tail_drop: Annotated[float, typer.Option(help="--int8: the largest loss of VAL tail recall, in points.")] = 3.0,
    allow_int8_drop: Annotated[bool, typer.Option(help="--int8: write the model even when it loses more than those limits on val.")] = False,
    check: Annotated[bool, typer.Option(help="Compare the ONNX model with the PyTorch student (on val images when data is given) and time both.")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout, nothing else.")] = False,
) -> None:
    """Export a checkpoint to ONNX (backbone + classifier), verified against PyTorch, with its metadata inside."""
    options = ExportOptions(
        opset=opset,
        batch=parse_batch(batch),
        include_preprocess=include_preprocess,
        softmax=softmax,
        fp16=fp16,
        int8=int8,
        calibration_images=calibration_images,
        max_int8_drop=max_int8_drop / 100,
        max_int8_tail_drop=max_int8_tail_drop / 100,
        allow_int8_drop=allow_int8_drop,
        check=check,
    )
    with progress_bar(not json_output) as progress:
        report = export_onnx(checkpoint, onnx_path, options, data_options if data_options.given() else None, progress)
    if json_output:
        print_json(report)
        return
    render_export(report)


def _size(n: int) -> str:
    return f"{n / 1024**2:.2f} MiB" if n >= 1024**2 else f"{n / 1024:.1f} KiB"


def render_export(report: dict) -> None:
    console.rule(f"[bold]fopro export[/] — {report['arch']} → {report['onnx']}")
    inp, out = report["input"], report["output"]
    console.print(
        f"{report['precision']} opset {report['opset']}, batch {report['batch']}, {_size(report['size_bytes'])}"
        + (f" (float32: {_size(report['fp32_size_bytes'])})" if report["precision"] != "fp32" else "")
    )
    console.print(
        f"input [bold]{inp['name']}[/] {inp['dtype']} {inp['layout']} {inp['shape']}"
        + (" (0-255, normalised inside)" if inp["preprocess_included"] else " (normalised with the metadata mean/std)")
        + f"   output [bold]{out['name']}[/] ({out['num_classes']} classes)"
    )
    check = report.get("check")
    if check:
        verdict = "[green]passed[/]" if check["passed"] else ("[yellow]reported[/]" if check["passed"] is None else "[red]failed[/]")
        console.print(
            f"check on {check['source']}: max |diff| {check['max_abs_diff']:.3g} ({check['output']}), "
            f"top-1 agreement {fmt(check['top1_agreement'])} — {verdict}"
        )
        if "accuracy_pytorch" in check:
            console.print(f"accuracy: PyTorch {fmt(check['accuracy_pytorch'])}, ONNX {fmt(check['accuracy_onnx'])}")
        table = Table(title="Median latency (CPU, ms per call)")
        for column in ("batch", "PyTorch eager", "onnxruntime", "speed-up"):
            table.add_column(column, justify="right")
        for row in check["latency"].values():
            speedup = row["pytorch_ms"] / row["onnxruntime_ms"] if row["onnxruntime_ms"] > 0 else float("nan")
            table.add_row(str(row["batch"]), f"{row['pytorch_ms']:.2f}", f"{row['onnxruntime_ms']:.2f}", f"{speedup:.1f}×")
        console.print(table)
    else:
        console.print("[yellow]not checked[/] (--no-check)")
    int8 = report.get("int8_accuracy")
    if int8:
        console.print(
            f"int8 on {int8['source']}: top-1 agreement with float {fmt(int8['top1_agreement'])}, accuracy "
            f"{fmt(int8['accuracy_float'])} → {fmt(int8['accuracy_int8'])} ({100 * int8['accuracy_change']:+.1f} points)"
        )
    for note in report.get("notes", []):
        console.print(f"[dim]note: {note}[/]")
    console.print(f"[green]wrote[/green] {report['onnx']} (sha256 {report['sha256'][:12]}…)")
