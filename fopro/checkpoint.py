"""fopro checkpoints: NAME.safetensors (weights) + NAME.json (validated metadata), written atomically."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fopro import __version__
from fopro.data.manifest import check_class_names
from fopro.errors import FoproError
from fopro.io import atomic_path, write_json
from fopro.preprocess import Preprocess

FORMAT = "fopro-checkpoint"
FORMAT_VERSION = 1
MAX_CLASSES = 100_000
HEADS = ("fc", "fc_t")  # the classifier a checkpoint keeps (fopro.models.heads)


@dataclass
class CheckpointMeta:
    """Everything needed to rebuild and use a model: architecture, classes, preprocessing, provenance."""

    arch: str
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    train_counts: list[int] | None = None
    epoch: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    fopro_version: str = __version__
    temperature: float = 1.0  # calibration: probabilities are softmax(logits / temperature) (fitted on val)
    # per class, the probability thresholds fitted on val for target specificities: [{target_specificity, threshold}]
    operating_points: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    head: str = "fc"  # the classifier in the weights: fc, or fc_t (p then fc_t in the classifier's place; fopro.models.heads)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.image_size, tuple(self.mean), tuple(self.std))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["num_classes"] = self.num_classes
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "CheckpointMeta":
        validate_meta(data, source)
        return cls(
            arch=data["arch"],
            classes=list(data["classes"]),
            image_size=int(data["image_size"]),
            mean=[float(v) for v in data["mean"]],
            std=[float(v) for v in data["std"]],
            train_counts=None if data.get("train_counts") is None else [int(v) for v in data["train_counts"]],
            epoch=data.get("epoch"),
            metrics=data.get("metrics") or {},
            config=data.get("config") or {},
            fopro_version=str(data.get("fopro_version", "")),
            temperature=float(data.get("temperature", 1.0)),
            operating_points=data.get("operating_points") or {},
            head=data.get("head", "fc"),
        )


def validate_meta(data: Any, source: str) -> None:
    """Types and sizes of a checkpoint's JSON, checked before anything is built from it."""

    def fail(what: str) -> None:
        raise FoproError(f"{source}: {what}; the checkpoint metadata is invalid, re-export it with fopro")

    if not isinstance(data, dict):
        fail("the JSON is not an object")
    if data.get("format") != FORMAT:
        fail(f"'format' is {data.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(data.get("format_version"), int) or data["format_version"] > FORMAT_VERSION:
        fail(f"'format_version' {data.get('format_version')!r} is not supported by fopro {__version__}")
    if not isinstance(data.get("arch"), str) or not data["arch"]:
        fail("'arch' must be a model name")
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes):
        fail("'classes' must be a non-empty list of names")
    if len(classes) > MAX_CLASSES or len(set(classes)) != len(classes):
        fail("'classes' must be unique names")
    check_class_names(classes, source)
    if "num_classes" in data and data["num_classes"] != len(classes):
        fail(f"'num_classes' {data['num_classes']} differs from the {len(classes)} class names")
    size = data.get("image_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 8192:
        fail("'image_size' must be an integer between 8 and 8192")
    for key in ("mean", "std"):
        values = data.get(key)
        if not isinstance(values, list) or len(values) != 3 or not all(_is_number(v) for v in values):
            fail(f"'{key}' must be a list of 3 finite numbers")
    if any(v <= 0 for v in data["std"]):
        fail("'std' values must be positive")
    counts = data.get("train_counts")
    if counts is not None and (
        not isinstance(counts, list) or len(counts) != len(classes) or not all(isinstance(c, int) and c >= 0 for c in counts)
    ):
        fail("'train_counts' must list one non-negative integer per class")
    if data.get("head", "fc") not in HEADS:
        fail(f"'head' {data.get('head')!r} is not one of {', '.join(HEADS)}")
    if "temperature" in data and not (_is_number(data["temperature"]) and data["temperature"] > 0):
        fail("'temperature' must be a positive number")
    points = data.get("operating_points") or {}
    if not isinstance(points, dict) or not all(
        name in classes and isinstance(ops, list) and all(isinstance(op, dict) and _is_number(op.get("threshold", 0.0)) for op in ops)
        for name, ops in points.items()
    ):
        fail("'operating_points' must map class names to lists of {target_specificity, threshold}")


def _is_number(value: Any) -> bool:
    """A finite int or float (JSON allows NaN and Infinity; bools are ints in Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sidecar(path: str | Path) -> tuple[Path, Path]:
    """(weights, metadata) paths of a checkpoint given as NAME, NAME.safetensors or NAME.json."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], meta: CheckpointMeta) -> Path:
    """Write weights then metadata, each atomically; returns the weights path."""
    weights_path, meta_path = sidecar(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FoproError(f"refusing to write {weights_path}: weight {name} is not finite")
    with atomic_path(weights_path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "arch": meta.arch})
    payload = meta.to_dict()
    payload["weights_sha256"] = file_sha256(weights_path)
    write_json(meta_path, payload)
    return weights_path


def set_calibration(path: str | Path, temperature: float, operating_points: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Store what was fitted on val (the temperature, the per-class thresholds) in a checkpoint's JSON, rewritten
    atomically; the weights are untouched."""
    _, meta_path = sidecar(path)
    payload = json.loads(meta_path.read_text(encoding="utf-8"))
    payload["temperature"] = float(temperature)
    if operating_points is not None:
        payload["operating_points"] = operating_points
    write_json(meta_path, payload)


def load_meta(path: str | Path) -> CheckpointMeta:
    _, meta_path = sidecar(path)
    if not meta_path.is_file():
        raise FoproError(f"{meta_path} is missing: a fopro checkpoint is NAME.safetensors with its NAME.json beside it")
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FoproError(f"{meta_path} is not valid JSON ({err.msg if hasattr(err, 'msg') else err}): restore it from the run") from err
    return CheckpointMeta.from_dict(data, str(meta_path))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    weights_path, meta_path = sidecar(path)
    if not weights_path.is_file():
        raise FoproError(f"{weights_path} does not exist: give a fopro checkpoint (NAME.safetensors with NAME.json)")
    meta = load_meta(path)
    try:
        state_dict = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise FoproError(f"{weights_path} is not a valid safetensors file: it may be corrupted or truncated; copy it again") from err
    return state_dict, meta


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
