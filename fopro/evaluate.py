"""Prediction backends (fopro checkpoint, exported ONNX model) -> the metrics report, and its files."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from fopro.bootstrap import DEFAULT_RESAMPLES
from fopro.calibration import calibration_report, uncalibrated
from fopro.config_files import load_run_config
from fopro.data import DataOptions, ImageDataset, checked_dataset, load_splits
from fopro.errors import FoproError
from fopro.io import check_output_folder, write_json, write_text
from fopro.metrics import DEFAULT_GROUPS, LongTailGroups, compute_metrics
from fopro.models.weights import build_model
from fopro.onnx_model import OnnxPredictor
from fopro.operating_points import DEFAULT_SPECIFICITIES, apply_operating_points
from fopro.plots import plot_confusion, plot_reliability, plot_roc_pr
from fopro.preprocess import Preprocess
from fopro.runtime import ProgressFn, no_progress, resolve_device


@dataclass
class EvalOptions:
    split: str = "test"
    batch_size: int = 64
    device: str = "auto"
    groups: LongTailGroups = DEFAULT_GROUPS
    bootstrap: int = DEFAULT_RESAMPLES  # stratified bootstrap resamples for the 95 % intervals (0: none)
    specificities: tuple[float, ...] = DEFAULT_SPECIFICITIES  # sensitivity is reported at each
    seed: int = 0  # of the bootstrap


class Predictor(Protocol):
    """Anything that turns raw [0, 1] images into class probabilities, with the facts to interpret them."""

    classes: list[str]
    train_counts: list[int] | None
    preprocess: Preprocess
    description: str
    temperature: float  # the calibration applied to the probabilities (1: none)
    operating_points: dict[str, list[dict]]  # per class, thresholds fitted on val ({} : none)

    def predict_proba(self, images: torch.Tensor) -> np.ndarray: ...


class TorchPredictor:
    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Preprocess,
        classes: list[str],
        train_counts: list[int] | None,
        description: str,
        device: torch.device | str = "cpu",
        temperature: float = 1.0,
        operating_points: dict[str, list[dict]] | None = None,
    ):
        self.device = torch.device(device)
        self.temperature = temperature
        self.operating_points = operating_points or {}
        self.model = model.to(self.device).eval()
        self.classes = classes
        self.train_counts = train_counts
        self.preprocess = preprocess
        self.description = description

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> "TorchPredictor":
        model, meta = build_model(path)
        return cls(model, meta.preprocess, meta.classes, meta.train_counts, f"fopro checkpoint {path} ({meta.arch})", resolve_device(device),
                   meta.temperature, meta.operating_points)

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        logits = self.model(self.preprocess(images.to(self.device)))
        return torch.softmax(logits.float() / self.temperature, dim=1).cpu().numpy()


def run_inputs(model_path: str | Path, data: DataOptions) -> tuple[Path, DataOptions]:
    """A run folder means its best checkpoint and, when no data option is given, the run's own data (config.json)."""
    path = Path(model_path)
    if path.is_dir() and (path / "best.safetensors").is_file():
        if not data.given() and (path / "config.json").is_file():
            data = load_run_config(path).data_options()
        path = path / "best.safetensors"
    return path, data


def load_predictor(path: str | Path, device: str = "auto") -> Predictor:
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxPredictor(path)
    return TorchPredictor.from_checkpoint(path, device)


def predict(predictor: Predictor, dataset: ImageDataset, batch_size: int, progress: ProgressFn = no_progress) -> np.ndarray:
    """Probabilities (N, C) for a dataset of raw images, in dataset order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    outputs = []
    done = 0
    for images, _, _ in loader:
        outputs.append(predictor.predict_proba(images))
        done += len(images)
        progress("predicting", done, len(dataset))
    return np.concatenate(outputs, axis=0)


def evaluate(
    model_path: str | Path,
    data: DataOptions,
    options: EvalOptions = EvalOptions(),
    out_dir: str | Path | None = None,
    progress: ProgressFn = no_progress,
) -> dict:
    """Evaluate a checkpoint or ONNX model on one split; returns the report (and writes its files to out_dir)."""
    if options.batch_size <= 0:
        raise FoproError(f"--batch-size {options.batch_size} must be greater than 0")
    if options.bootstrap < 0:
        raise FoproError(f"--bootstrap {options.bootstrap} must not be negative (0 turns the intervals off)")
    if not options.specificities or not all(0 < s < 1 for s in options.specificities):
        raise FoproError(f"--specificity {','.join(map(str, options.specificities))}: give targets in (0, 1), e.g. 0.9,0.95")
    model_path, data = run_inputs(model_path, data)
    if out_dir is not None:
        check_output_folder(out_dir, "--out", (data.data, data.images))
        check_writable_dir(Path(out_dir), "--out")
    predictor = load_predictor(model_path, options.device)
    splits = load_splits(data, splits=(options.split,), classes=predictor.classes)
    manifest = splits.require(options.split, f"give --{options.split}-csv or a {options.split}/ folder, or pick --split")
    dataset = checked_dataset(manifest, predictor.preprocess.image_size, data.skip_bad_images)
    probs = predict(predictor, dataset, options.batch_size, progress)
    labels = np.asarray(dataset.manifest.labels)
    report = compute_metrics(labels, probs, predictor.classes, predictor.train_counts, options.groups,
                             target_specificities=options.specificities, bootstrap=options.bootstrap, seed=options.seed)
    report["calibration"] = calibration_report(probs, labels, predictor.temperature) if predictor.temperature != 1.0 else None
    # the thresholds fitted on val, applied here: the sensitivity / specificity a deployment would actually get
    report["val_operating_points"] = apply_operating_points(labels, probs, predictor.classes, predictor.operating_points) or None
    report["model"] = str(model_path)
    report["model_description"] = predictor.description
    report["split"] = options.split
    report["data"] = data.describe()
    report["notes"] = dataset.manifest.notes + report["notes"]
    if out_dir is not None:
        write_report(report, dataset.manifest.image_ids(), labels, probs, Path(out_dir))
    return report


def check_writable_dir(folder: Path, option: str) -> None:
    """Fail before the work, not after it, when the output folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".fopro-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise FoproError(f"cannot write to {option} {folder} ({err.strerror}): choose a writable output path") from err


def write_report(report: dict, image_ids: list[str], labels: np.ndarray, probs: np.ndarray, out_dir: Path) -> dict[str, Path]:
    """metrics.json, per_class.csv, predictions.csv, confusion.png, roc_pr.png (and reliability.png for a calibrated
    model) in out_dir, each written atomically."""
    classes = report["class_names"]
    files = {
        "metrics": out_dir / "metrics.json",
        "per_class": out_dir / "per_class.csv",
        "predictions": out_dir / "predictions.csv",
        "confusion": out_dir / "confusion.png",
    }
    write_json(files["metrics"], report)
    write_text(files["per_class"], _csv_text(per_class_rows(report)))
    preds = probs.argmax(axis=1)
    rows = [["image", "label", "pred"] + [f"prob_{c}" for c in classes]]
    for image, label, pred, row in zip(image_ids, labels, preds, probs):
        rows.append([image, classes[label], classes[pred]] + [f"{p:.6f}" for p in row])
    write_text(files["predictions"], _csv_text(rows))
    plot_confusion(report["confusion_matrix"], classes, files["confusion"], title=f"Confusion matrix ({report.get('split', '')})")
    files["roc_pr"] = plot_roc_pr(labels, probs, classes, out_dir / "roc_pr.png")
    calibration = report.get("calibration")
    if calibration:
        files["reliability"] = out_dir / "reliability.png"
        before = uncalibrated(probs, calibration["temperature"])
        plot_reliability(labels, {"before (T = 1)": before, f"after (T = {calibration['temperature']:.2f})": probs}, files["reliability"])
    return files


def parse_specificities(text: str) -> tuple[float, ...]:
    """--specificity "0.9,0.95" -> (0.9, 0.95) (evaluate() checks that each is in (0, 1))."""
    try:
        return tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise FoproError(f"--specificity {text} is not a list of numbers: give e.g. 0.9,0.95") from None


def per_class_rows(report: dict) -> list[list]:
    """per_class.csv: the per-class metrics, the recall interval, average precision, and one sensitivity /
    threshold pair per target specificity."""
    columns = ["name", "index", "train_count", "support", "predicted", "precision", "recall", "specificity", "f1", "auc",
               "average_precision"]
    targets = [op["target_specificity"] for row in report["per_class"][:1] for op in row["operating_points"]]
    header = columns + ["recall_low", "recall_high"]
    header += [f"{what}_at_spec_{target:g}" for target in targets for what in ("sensitivity", "threshold")]
    rows = [header]
    for row in report["per_class"]:
        interval = row.get("recall_ci") or [None, None]
        points = {op["target_specificity"]: op for op in row["operating_points"]}
        cells = [row[c] for c in columns] + list(interval)
        cells += [(points.get(target) or {}).get(what) for target in targets for what in ("sensitivity", "threshold")]
        rows.append(cells)
    return rows


def _csv_text(rows: list[list]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(["" if v is None else v for v in row] for row in rows)
    return buffer.getvalue()
