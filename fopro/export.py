"""`fopro export --onnx`: the student's inference path as a verified, self-describing ONNX model.

The exported graph is the checkpoint's backbone + classifier (`build_model`), optionally with the
input scaling/normalisation (uint8 NCHW input) and a softmax inside. Everything needed to use it
(classes, input size, mean/std, what is inside the graph, provenance) is stored in the model's
`metadata_props`, so `fopro eval OUT.onnx` works on the file alone (`OnnxPredictor`). The options are in
`fopro.export_options`, the check against PyTorch's outputs in `fopro.export_check`, float16 / int8 in `fopro.quantize`.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from fopro import __version__
from fopro.checkpoint import CheckpointMeta, file_sha256, sidecar
from fopro.data import DataOptions
from fopro.errors import FoproError, first_line
from fopro.export_check import Sample, compare, measure_latency, random_sample, sample_images, torch_outputs
from fopro.export_options import ExportOptions, supported_max_opset
from fopro.io import atomic_path
from fopro.model_card import export_summary, write_card
from fopro.models.weights import build_model
from fopro.onnx_model import FORMAT, FORMAT_VERSION, INPUT_LAYOUT, graph_input, open_session, run_batched
from fopro.preprocess import Preprocess
from fopro.quantize import int8_accuracy, int8_on_val, quantize_int8, to_fp16
from fopro.runtime import ProgressFn, no_progress

FP32_MAX_DIFF = 1e-3
CHECK_SPLITS = ("val", "test", "train")
CALIBRATION_SPLITS = ("train", "val")
LATENCY_BATCHES = (1, 32)


# --- the graph -------------------------------------------------------------------------------------


class ExportWrapper(nn.Module):
    """Student + optional input preprocessing (uint8 -> /255 -> mean/std) + optional softmax."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, include_preprocess: bool, softmax: bool, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.include_preprocess = include_preprocess
        self.softmax = softmax
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.include_preprocess:
            x = (x.to(torch.float32) / 255.0 - self.mean) / self.std
        out = self.model(x)
        if self.temperature != 1.0:  # the calibration fitted on val (checkpoint JSON 'temperature')
            out = out / self.temperature
        return torch.softmax(out, dim=1) if self.softmax else out


def _names(softmax: bool) -> tuple[str, str]:
    return "images", "probabilities" if softmax else "logits"


def _torch_export(wrapper: ExportWrapper, meta: CheckpointMeta, options: ExportOptions, path: Path) -> None:
    input_name, output_name = _names(options.softmax)
    batch = options.batch or 2
    shape = (batch, 3, meta.image_size, meta.image_size)
    if options.include_preprocess:
        example = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(options.seed))
    else:
        example = torch.randn(shape, generator=torch.Generator().manual_seed(options.seed))
    dynamic = None if options.batch else {input_name: {0: "batch"}, output_name: {0: "batch"}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # the TorchScript exporter is deprecated but is the one that works here; silence only that notice
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                dynamo=False,
                opset_version=options.opset,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
    except RuntimeError as err:  # OnnxExporterError and UnsupportedOperatorError are RuntimeErrors
        raise FoproError(
            f"{meta.arch} cannot be exported to ONNX opset {options.opset} ({first_line(err, 300)}): "
            f"try another --opset (up to {supported_max_opset()})"
        ) from err


def metadata_props(meta: CheckpointMeta, options: ExportOptions, source: Path, sha256: str) -> dict[str, str]:
    """The string key/values stored in the model; `OnnxPredictor` reads them back."""
    input_name, output_name = _names(options.softmax)
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "classes": json.dumps(meta.classes),
        "num_classes": str(meta.num_classes),
        "image_size": str(meta.image_size),
        "mean": json.dumps(list(meta.mean)),
        "std": json.dumps(list(meta.std)),
        "preprocess_included": json.dumps(options.include_preprocess),
        "softmax_included": json.dumps(options.softmax),
        "input_name": input_name,
        "output_name": output_name,
        "input_dtype": "uint8" if options.include_preprocess else "float32",
        "input_range": "0-255" if options.include_preprocess else "normalised with mean/std",
        "input_layout": INPUT_LAYOUT,
        "batch": "dynamic" if options.batch is None else str(options.batch),
        "precision": options.precision,
        "opset": str(options.opset),
        "arch": meta.arch,
        "head": meta.head,
        "train_counts": json.dumps(meta.train_counts),
        "temperature": json.dumps(meta.temperature),
        "operating_points": json.dumps(meta.operating_points),
        "source_checkpoint": source.name,
        "source_sha256": sha256,
        "fopro_version": __version__,
    }


def _set_metadata(model: Any, props: dict[str, str]) -> None:
    onnx.helper.set_model_props(model, props)
    model.producer_name = "fopro"
    model.producer_version = __version__
    model.doc_string = f"fopro student {props['arch']} ({props['num_classes']} classes), exported from {props['source_checkpoint']}"



# --- export ----------------------------------------------------------------------------------------


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    options: ExportOptions = ExportOptions(),
    data: DataOptions | None = None,
    progress: ProgressFn = no_progress,
) -> dict:
    """Export a checkpoint's inference path to `out` (.onnx), verify it, and return the JSON-ready report.

    The file appears only once it is complete and (with `options.check`) verified: a float32 export that
    disagrees with the PyTorch student raises FoproError and leaves nothing at `out`.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix.lower() != ".onnx":
        raise FoproError(f"--onnx {out} must end in .onnx (fopro eval recognises ONNX models by the suffix)")
    if out.is_dir():
        raise FoproError(f"--onnx {out} is a folder: give a file path ending in .onnx")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise FoproError(f"cannot write --onnx {out}: {blocking} is a file, not a folder; choose a writable output path")
    options.validate(data)
    steps = 2 + options.int8 + options.check
    progress("exporting", 0, steps)
    model, meta = build_model(checkpoint)
    model = model.cpu().eval()
    weights_path, _ = sidecar(checkpoint)
    sha256 = file_sha256(weights_path)
    wrapper = ExportWrapper(model, meta.preprocess, options.include_preprocess, options.softmax, meta.temperature).eval()
    have_data = data is not None and data.given()
    # read the data first: a data mistake should fail before minutes of export/quantisation
    calibration = sample_images(data, meta, CALIBRATION_SPLITS, options.calibration_images, options.seed) if options.int8 else None
    check_sample = None
    if options.check:
        check_sample = sample_images(data, meta, CHECK_SPLITS, options.check_images, options.seed) if have_data else random_sample(
            meta, options.check_images, options.seed
        )
    props = metadata_props(meta, options, weights_path, sha256)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256,
        "onnx": str(out),
        "arch": meta.arch,
        "precision": options.precision,
        "opset": options.opset,
        "batch": "dynamic" if options.batch is None else options.batch,
        "input": {
            "name": props["input_name"],
            "dtype": props["input_dtype"],
            "layout": INPUT_LAYOUT,
            "shape": [options.batch or "batch", 3, meta.image_size, meta.image_size],
            "preprocess_included": options.include_preprocess,
        },
        "output": {"name": props["output_name"], "softmax_included": options.softmax, "num_classes": meta.num_classes},
        "metadata": props,
        "options": asdict(options),
        "notes": [],
    }
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(prefix="fopro-export-") as work:
        fp32_path = Path(work) / "fp32.onnx"
        _torch_export(wrapper, meta, options, fp32_path)
        progress("exporting", 1, steps)
        float_model = onnx.load(str(fp32_path))
        _set_metadata(float_model, props)
        report["fp32_size_bytes"] = fp32_path.stat().st_size
        if options.fp16:
            final = to_fp16(float_model, meta)
        elif options.int8:
            final = quantize_int8(fp32_path, Path(work), props, calibration, meta, options)
            int8_path = Path(work) / "int8_check.onnx"  # saved once; both checks run this one session
            onnx.save(final, str(int8_path))
            int8_session = open_session(int8_path)
            report["int8_accuracy"] = int8_accuracy(int8_session, model, meta, calibration, options)
            report["int8_val"] = int8_on_val(int8_session, model, meta, data, options)
            progress("exporting", 2, steps)
        else:
            final = float_model
        _set_metadata(final, props)
        try:
            onnx.checker.check_model(final, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
            raise FoproError(f"the exported {meta.arch} graph fails the ONNX checker ({first_line(err, 300)}): try another --opset") from err
        try:
            onnx.save(final, str(tmp))
        except OSError as err:
            raise FoproError(f"cannot write {out}: {err.strerror}; choose a writable output path with free space") from err
        report["size_bytes"] = tmp.stat().st_size
        if options.check and check_sample is not None:
            report["check"] = _check(tmp, model, wrapper, meta, options, check_sample)
        progress("exporting", steps, steps)
    report["sha256"] = file_sha256(out)
    if options.fp16:
        report["notes"].append(
            "float16 targets GPUs (onnxruntime CUDA/TensorRT providers); on the CPU it runs through casts and is usually slower than float32"
        )
    if options.int8:
        report["notes"].append("int8 speed on the CPU depends on its int8 instructions (AVX-512 VNNI / AMX); compare the latencies above")
    report["model_card"] = str(write_card(checkpoint, out.with_name("MODEL_CARD.md"), export_summary(report)))
    return report


def _check(path: Path, model: nn.Module, wrapper: ExportWrapper, meta: CheckpointMeta, options: ExportOptions, sample: Sample) -> dict:
    session = open_session(path)
    feed = graph_input(sample.images, meta.preprocess, options.include_preprocess)
    exported = run_batched(session, feed, options.batch)
    reference = torch_outputs(model, meta, sample.images, options.softmax)
    result: dict[str, Any] = {"images": len(feed), "source": sample.source, "output": "probabilities" if options.softmax else "logits"}
    result.update(compare(reference, exported))
    if sample.labels is not None:
        result["accuracy_pytorch"] = float((reference.argmax(1) == sample.labels).mean())
        result["accuracy_onnx"] = float((exported.argmax(1) == sample.labels).mean())
    strict = options.precision == "fp32"
    result["passed"] = result["top1_agreement"] >= 1.0 and result["max_abs_diff"] <= FP32_MAX_DIFF if strict else None
    if strict and not result["passed"]:
        raise FoproError(
            f"the exported model disagrees with the PyTorch student on {sample.source} "
            f"(max |diff| {result['max_abs_diff']:.3g} > {FP32_MAX_DIFF:g} or top-1 agreement "
            f"{100 * result['top1_agreement']:.1f}% < 100%): nothing was written; try another --opset and report the architecture"
        )
    batches = LATENCY_BATCHES if options.batch is None else (options.batch,)
    result["latency"] = measure_latency(session, wrapper, meta, options, batches)
    result["latency_repeats"] = options.latency_repeats
    return result


