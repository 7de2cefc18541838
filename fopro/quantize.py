"""Reduced precision for an exported model: float16, and int8 (onnxruntime's static QDQ quantisation, calibrated on
real images), with the int8 model checked against the float one on val, class by class."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel
from torch import nn

from fopro.checkpoint import CheckpointMeta
from fopro.data import DataOptions
from fopro.errors import FoproError, first_line
from fopro.export_check import Sample, compare, sample_images, torch_outputs
from fopro.export_options import ExportOptions
from fopro.metrics import compute_metrics
from fopro.onnx_model import graph_input, ort_errors, run_batched

CALIBRATION_BATCH = 16


def to_fp16(float_model: Any, meta: CheckpointMeta) -> Any:
    """float16 weights and computation, float32 (or uint8) inputs and outputs."""
    try:
        model = convert_float_to_float16(float_model, keep_io_types=True)
        # the converter appends the input casts at the end of the node list: restore topological order
        OnnxModel.graph_topological_sort(model.graph)
    except (RuntimeError, ValueError) as err:
        raise FoproError(f"float16 conversion of {meta.arch} failed ({first_line(err, 300)}): export without --fp16") from err
    return model


class CalibrationReader:
    """An onnxruntime.quantization.CalibrationDataReader (it checks `get_next` by duck typing) over graph inputs."""

    def __init__(self, input_name: str, feed: np.ndarray, batch: int | None):
        self.input_name = input_name
        self.batches = []
        step = batch or CALIBRATION_BATCH
        for start in range(0, len(feed), step):
            part = feed[start : start + step]
            if batch and len(part) < batch:  # a fixed batch: pad the last one with copies of its first image
                part = np.concatenate([part, np.repeat(part[:1], batch - len(part), axis=0)])
            self.batches.append(part)
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def quantize_int8(fp32_path: Path, work: Path, props: dict[str, str], sample: Sample, meta: CheckpointMeta, options: ExportOptions) -> Any:
    feed = graph_input(sample.images, meta.preprocess, options.include_preprocess)
    reader = CalibrationReader(props["input_name"], feed, options.batch)
    int8_path = work / "int8.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice ("run pre-processing") through the root logger
    try:
        quantize_static(
            str(fp32_path),
            str(int8_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    except ort_errors() as err:
        raise FoproError(f"int8 quantisation of {meta.arch} failed ({first_line(err, 300)}): export without --int8, or try --fp16") from err
    finally:
        root.setLevel(level)
    return onnx.load(str(int8_path))


def int8_on_val(session: Any, model: nn.Module, meta: CheckpointMeta, data: DataOptions, options: ExportOptions) -> dict:
    """The int8 model against the float one on the VAL split (not the calibration images), class by class: the
    change of balanced accuracy and of tail recall; a drop beyond the limits stops the export (unless allowed)."""
    try:
        sample = sample_images(data, meta, ("val",), options.val_images, options.seed)
    except FoproError as err:
        return {"skipped": f"no val images to check the int8 model on ({err})"}
    reference, quantised = _float_and_int8(session, model, meta, sample, options)
    report = {name: compute_metrics(sample.labels, _as_probs(outputs, options.softmax), meta.classes, meta.train_counts)
              for name, outputs in (("float", reference), ("int8", quantised))}
    change = {key: _change(report["float"][key], report["int8"][key]) for key in ("balanced_accuracy", "tail_recall")}
    result = {
        "source": sample.source,
        "float": {key: report["float"][key] for key in ("balanced_accuracy", "tail_recall")},
        "int8": {key: report["int8"][key] for key in ("balanced_accuracy", "tail_recall")},
        "change": change,
        "per_class_recall_change": {
            row["name"]: _change(row["recall"], q["recall"]) for row, q in zip(report["float"]["per_class"], report["int8"]["per_class"])
        },
    }
    check_int8_drop(change, options, sample.source)
    return result


def check_int8_drop(change: dict[str, float | None], options: ExportOptions, source: str) -> None:
    """Refuse an int8 model that loses more val balanced accuracy or tail recall than the limits (unless allowed)."""
    limits = {"balanced_accuracy": (options.max_int8_drop, "--max-int8-drop"), "tail_recall": (options.max_int8_tail_drop, "--max-int8-tail-drop")}
    too_much = [key for key, (limit, _) in limits.items() if change.get(key) is not None and -change[key] > limit + 1e-12]
    if too_much and not options.allow_int8_drop:
        key = too_much[0]
        limit, flag = limits[key]
        raise FoproError(
            f"int8 loses {-100 * change[key]:.1f} points of {key.replace('_', ' ')} on val ({source}), more than {flag} "
            f"{100 * limit:.1f}: nothing was written; export fp32 / fp16, or pass --allow-int8-drop"
        )


def _as_probs(outputs: np.ndarray, softmax_included: bool) -> np.ndarray:
    return outputs if softmax_included else torch.softmax(torch.from_numpy(outputs).double(), dim=1).numpy()


def _change(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _float_and_int8(session: Any, model: nn.Module, meta: CheckpointMeta, sample: Sample, options: ExportOptions) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch student's outputs and the int8 session's on the same images."""
    quantised = run_batched(session, graph_input(sample.images, meta.preprocess, options.include_preprocess), options.batch)
    return torch_outputs(model, meta, sample.images, options.softmax), quantised


def int8_accuracy(session: Any, model: nn.Module, meta: CheckpointMeta, sample: Sample, options: ExportOptions) -> dict:
    """Top-1 agreement of the int8 model with the float model, and both accuracies, on the calibration images."""
    reference, quantised = _float_and_int8(session, model, meta, sample, options)
    result: dict[str, Any] = {"images": len(quantised), "source": sample.source}
    result.update(compare(reference, quantised))
    accuracy_float = float((reference.argmax(1) == sample.labels).mean())
    accuracy_int8 = float((quantised.argmax(1) == sample.labels).mean())
    result.update(accuracy_float=accuracy_float, accuracy_int8=accuracy_int8, accuracy_change=accuracy_int8 - accuracy_float)
    return result
