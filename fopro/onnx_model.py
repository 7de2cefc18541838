"""Reading an ONNX model written by `fopro export`: its fopro metadata, an onnxruntime session, and the predictor
`fopro eval OUT.onnx` uses (`OnnxPredictor`). The writer, quantisation and checks are in :mod:`fopro.export`.

The model's `metadata_props` hold everything needed to use it: classes, input size, mean/std, what is inside the
graph (preprocessing: uint8 NCHW input; softmax) and provenance.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from fopro import __version__
from fopro.data.manifest import check_class_names
from fopro.errors import FoproError, first_line
from fopro.preprocess import Preprocess

FORMAT = "fopro-onnx"
FORMAT_VERSION = 1
INPUT_LAYOUT = "NCHW"


def graph_input(raw: torch.Tensor, preprocess: Preprocess, include_preprocess: bool) -> np.ndarray:
    """Raw [0, 1] images -> what the exported graph takes: uint8 0-255, or float32 normalised."""
    raw = preprocess.resize(raw.float())
    if include_preprocess:
        return (raw * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()
    return np.ascontiguousarray(preprocess(raw).numpy().astype(np.float32))


def ort_errors() -> tuple[type[BaseException], ...]:
    """The exceptions onnxruntime raises for a bad model or input (its own types, and the Python ones)."""
    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "InvalidProtobuf", "InvalidGraph", "NotImplemented", "RuntimeException")
    return tuple(getattr(ort_state, n) for n in names if hasattr(ort_state, n)) + (RuntimeError, OSError, ValueError)


def open_session(path: Path) -> Any:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except ort_errors() as err:
        raise FoproError(f"{path} cannot be loaded by onnxruntime ({first_line(err, 300)}): it is not a valid ONNX model; export it again") from err


def run_batched(session: Any, feed: np.ndarray, fixed_batch: int | None, chunk: int = 32) -> np.ndarray:
    """Run `feed` through the session; with a fixed batch the last chunk is padded and trimmed."""
    name = session.get_inputs()[0].name
    step = fixed_batch or chunk
    outputs = []
    for start in range(0, len(feed), step):
        part = feed[start : start + step]
        n = len(part)
        if fixed_batch and n < fixed_batch:
            part = np.concatenate([part, np.repeat(part[:1], fixed_batch - n, axis=0)])
        outputs.append(session.run(None, {name: part})[0][:n])
    return np.concatenate(outputs).astype(np.float32)


def fixed_batch(session: Any) -> int | None:
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def read_metadata(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """Parse and validate the fopro metadata of an .onnx file."""
    if raw.get("format") != FORMAT:
        raise FoproError(
            f"{path} has no fopro metadata (metadata_props 'format' is {raw.get('format')!r}): "
            "export the model with `fopro export CHECKPOINT --onnx OUT.onnx`"
        )

    def get(key: str) -> Any:
        if key not in raw:
            raise FoproError(f"{path}: the fopro metadata lacks '{key}': export the model again with fopro")
        try:
            return json.loads(raw[key])
        except json.JSONDecodeError as err:
            raise FoproError(f"{path}: the fopro metadata '{key}' is not valid JSON: export the model again with fopro") from err

    version = get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FoproError(f"{path}: fopro ONNX format version {version!r} is not supported by fopro {__version__}: update fopro")
    classes = get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        raise FoproError(f"{path}: the fopro metadata 'classes' must be a non-empty list of names: export the model again")
    check_class_names(classes, str(path))
    size = get("image_size")
    mean, std = get("mean"), get("std")
    if not isinstance(size, int) or size <= 0:
        raise FoproError(f"{path}: the fopro metadata 'image_size' must be a positive integer: export the model again")
    for key, values in (("mean", mean), ("std", std)):
        if not isinstance(values, list) or len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
            raise FoproError(f"{path}: the fopro metadata '{key}' must be a list of 3 numbers: export the model again")
    counts = get("train_counts")
    if counts is not None and (not isinstance(counts, list) or len(counts) != len(classes)):
        raise FoproError(f"{path}: the fopro metadata 'train_counts' must list one count per class: export the model again")
    return {
        "classes": classes,
        "image_size": size,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "preprocess_included": bool(get("preprocess_included")),
        "softmax_included": bool(get("softmax_included")),
        "train_counts": None if counts is None else [int(c) for c in counts],
        "temperature": _temperature(path, raw.get("temperature", "1.0")),
        "operating_points": _operating_points(path, raw.get("operating_points", "{}")),
        "arch": raw.get("arch", "?"),
        "precision": raw.get("precision", "fp32"),
    }


def _temperature(path: Path, text: str) -> float:
    try:
        value = float(json.loads(text))
    except (ValueError, TypeError):
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise FoproError(f"{path}: the fopro metadata 'temperature' must be a positive number: export the model again")
    return value


def _operating_points(path: Path, text: str) -> dict[str, list[dict]]:
    try:
        points = json.loads(text)
    except json.JSONDecodeError:
        points = None
    if not isinstance(points, dict):
        raise FoproError(f"{path}: the fopro metadata 'operating_points' must be a JSON mapping: export the model again")
    return points


class OnnxPredictor:
    """A `fopro.evaluate.Predictor` over an exported .onnx file, run by onnxruntime on the CPU."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FoproError(f"{path} does not exist: give an .onnx file written by `fopro export`")
        self.path = path
        self.session = open_session(path)
        self.meta = read_metadata(path, self.session.get_modelmeta().custom_metadata_map)
        self.classes: list[str] = self.meta["classes"]
        self.train_counts: list[int] | None = self.meta["train_counts"]
        self.temperature: float = self.meta["temperature"]  # applied inside the graph
        self.operating_points: dict[str, list[dict]] = self.meta["operating_points"]
        self.preprocess = Preprocess(self.meta["image_size"], tuple(self.meta["mean"]), tuple(self.meta["std"]))
        self.batch = fixed_batch(self.session)
        outputs = self.session.get_outputs()[0].shape
        if len(outputs) != 2 or (isinstance(outputs[1], int) and outputs[1] != len(self.classes)):
            raise FoproError(f"{path}: the graph's output {outputs} does not match the {len(self.classes)} classes of its metadata")
        inside = [name for name, key in (("preprocessing", "preprocess_included"), ("softmax", "softmax_included")) if self.meta[key]]
        self.description = (
            f"ONNX model {path} ({self.meta['arch']}, {self.meta['precision']}"
            + (f", with {' and '.join(inside)} inside" if inside else "")
            + ")"
        )

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        feed = graph_input(images.cpu(), self.preprocess, self.meta["preprocess_included"])
        try:
            out = run_batched(self.session, feed, self.batch)
        except ort_errors() as err:
            raise FoproError(f"{self.path} failed to run ({first_line(err, 300)}): export the model again") from err
        if self.meta["softmax_included"]:
            return out
        return torch.softmax(torch.from_numpy(out).float(), dim=1).numpy()
