"""MODEL_CARD.md for a checkpoint or an exported model, generated from the files fopro wrote, never typed by hand.

The sections follow the Hugging Face model card layout (Mitchell et al., "Model Cards for Model Reporting"):
model details, intended and out-of-scope use, training data, evaluation (per class, with the 95 % intervals,
the operating points fitted on val and the calibration), quantisation, limitations. Its sources: the checkpoint's
JSON (architecture, classes, counts, options, temperature, thresholds) and, when the run evaluated it, the
run's test/metrics.json; an export adds its own report (precision, check against PyTorch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fopro import __version__
from fopro.checkpoint import CheckpointMeta, file_sha256, load_meta, sidecar
from fopro.errors import FoproError
from fopro.io import write_text
from fopro.metrics import DEFAULT_GROUPS, LongTailGroups

SECTIONS = ("Model details", "Intended use", "Out-of-scope use", "Training data", "Evaluation", "Quantisation", "Limitations")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its best checkpoint) or a checkpoint path."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.safetensors"
    weights, meta = sidecar(path)
    if not weights.is_file() or not meta.is_file():
        raise FoproError(f"{path}: give a run folder (with best.safetensors) or a checkpoint NAME.safetensors with NAME.json")
    return weights


def evaluation_of(weights: Path) -> dict | None:
    """The run's test evaluation of this checkpoint (RUN/test/metrics.json), if it is the one evaluated."""
    path = weights.parent / "test" / "metrics.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text(encoding="utf-8"))
    return report if Path(str(report.get("model", ""))).stem == weights.stem else None


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def with_interval(value: float | None, interval: list[float] | None) -> str:
    return pct(value) if not interval else f"{pct(value)} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def model_details(meta: CheckpointMeta, weights: Path, export: dict | None) -> list[str]:
    config = meta.config
    lines = [
        f"- Student: `{meta.arch}`, {meta.num_classes} classes, input {meta.image_size} x {meta.image_size} RGB, "
        f"normalised with mean {meta.mean} and std {meta.std}; classifier "
        + ("`fc_t(p(f))`, EKD's second head on the projection of the features." if meta.head == "fc_t" else "`fc(f)`, its own."),
        f"- Training: `fopro distill --method {config.get('method', '?')}` (fopro {meta.fopro_version}), teacher "
        f"`{config.get('teacher') or 'none'}`{' with weights ' + repr(config['teacher_weights']) if config.get('teacher_weights') else ''}, "
        f"{config.get('epochs', '?')} epochs, best epoch {meta.epoch} (chosen on val), seed {config.get('seed', '?')}.",
        f"- Checkpoint: `{weights.name}`, sha256 `{file_sha256(weights)}`.",
        "- FoPro-KD's Fourier Prompt Generator and its adversarial training are fopro's reconstruction (the authors "
        "did not publish them); EKD follows the authors' released code.",
    ]
    if export:
        lines.append(f"- Exported: `{Path(export['onnx']).name}` (ONNX opset {export['opset']}, {export['precision']}), "
                     f"written by fopro {__version__}.")
    return lines


def training_data(meta: CheckpointMeta, groups: LongTailGroups) -> list[str]:
    counts = meta.train_counts
    if counts is None:
        return ["The checkpoint does not record its training counts."]
    nonzero = [c for c in counts if c > 0]
    lines = [f"{sum(counts)} training images; imbalance (rarest / most frequent) {min(nonzero) / max(nonzero):.3f}; "
             f"groups by training count: {', '.join(f'{k} {v}' for k, v in groups.definitions().items())}.", "",
             "| class | training images | group |", "| --- | ---: | --- |"]
    lines += [f"| {name} | {count} | {groups.group_of(count)} |" for name, count in zip(meta.classes, counts)]
    data = str(meta.config.get("data") or "")
    if "demo" in data or "synth" in data:
        lines += ["", "**These are SYNTHETIC lesion-like images (fopro's embedded demo data), not patients' images: "
                      "this model is a demonstration and says nothing about real lesions.**"]
    return lines


def evaluation(report: dict | None) -> list[str]:
    if report is None:
        return ["No test evaluation of this checkpoint was found (run `fopro eval CHECKPOINT --data ... --out RUN/test`)."]
    intervals = report.get("intervals") or {}
    lines = [
        f"On the {report.get('split', 'test')} split of `{report.get('data', '?')}`, {report['num_samples']} images "
        f"(95 % intervals: {intervals.get('method', 'not computed')}):", "",
        f"- Balanced accuracy {with_interval(report['balanced_accuracy'], intervals.get('balanced_accuracy'))}; macro-F1 "
        f"{with_interval(report['macro_f1'], intervals.get('macro_f1'))}; rare-class (tail) recall "
        f"{with_interval(report.get('tail_recall'), (intervals.get('groups') or {}).get('tail'))}.", "",
        "| class | support | recall [95 % CI] | precision | ROC-AUC | average precision | sensitivity @ specificity (thresholds fitted on val) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    applied = report.get("val_operating_points") or {}
    for row in report["per_class"]:
        ops = "; ".join(f"{pct(op['sensitivity'])} @ {pct(op['specificity'])} (target {op['target_specificity']:g})"
                        for op in applied.get(row["name"], [])) or "n/a"
        auc = "n/a" if row["auc"] is None else f"{row['auc']:.3f}"
        ap = "n/a" if row.get("average_precision") is None else f"{row['average_precision']:.3f}"
        lines.append(f"| {row['name']} | {row['support']} | {with_interval(row['recall'], row.get('recall_ci'))} | "
                     f"{pct(row['precision'])} | {auc} | {ap} | {ops} |")
    calibration = report.get("calibration")
    lines.append("")
    if calibration:
        lines.append(f"Calibration: temperature {calibration['temperature']:.3f} fitted on val; on this split ECE "
                     f"{calibration['ece_before']:.3f} -> {calibration['ece_after']:.3f}, NLL {calibration['nll_before']:.3f} -> "
                     f"{calibration['nll_after']:.3f}.")
    else:
        lines.append("Calibration: none (temperature 1).")
    return lines


def quantisation(export: dict | None) -> list[str]:
    if not export:
        return ["Not exported (float32 PyTorch checkpoint)."]
    check = export.get("check") or {}
    if not check:
        return [f"Precision {export['precision']}; not checked against the PyTorch student (--no-check)."]
    lines = [f"Precision {export['precision']}; check against the PyTorch student on {check.get('source', '?')}: "
             f"top-1 agreement {pct(check.get('top1_agreement'))}, largest output difference {check.get('max_abs_diff')}."]
    if check.get("accuracy_onnx") is not None:
        lines.append(f"Accuracy on those images: ONNX {pct(check['accuracy_onnx'])}, PyTorch {pct(check.get('accuracy_pytorch'))}.")
    return lines


def build_card(checkpoint: str | Path, export: dict | None = None, groups: LongTailGroups = DEFAULT_GROUPS) -> str:
    """The MODEL_CARD.md text of a checkpoint (a run folder means its best checkpoint), with an export's report."""
    weights = resolve_checkpoint(checkpoint)
    meta = load_meta(weights)
    report = evaluation_of(weights)
    body = {
        "Model details": model_details(meta, weights, export),
        "Intended use": [
            f"Research and engineering evaluation of a compact classifier of these {meta.num_classes} classes "
            f"({', '.join(meta.classes)}) on images like its training data, with the per-class numbers below in view.",
            "Any clinical use needs a validation on the target population, scanners and prevalence, under the rules "
            "that govern medical devices where it is used.",
        ],
        "Out-of-scope use": [
            "Diagnosis without a clinician; classes, image types or populations it was not trained on; decisions "
            "that rely on a class whose interval below is wide or whose test support is small.",
        ],
        "Training data": training_data(meta, groups),
        "Evaluation": evaluation(report),
        "Quantisation": quantisation(export),
        "Limitations": [
            "Rare classes have few training and test images: their recall intervals are wide, and the thresholds "
            "fitted on val may not hold on other data. Long-tailed training (balanced softmax) trades head-class "
            "precision for tail recall. Numbers come from one split of one dataset.",
        ],
    }
    lines = [f"# Model card: {meta.arch} student ({weights.stem})", "",
             f"Generated by fopro {__version__} from `{sidecar(weights)[1].name}`"
             f"{' and test/metrics.json' if report else ''}; do not edit by hand.", ""]
    for section in SECTIONS:
        lines += [f"## {section}", "", *body[section], ""]
    return "\n".join(lines)


def write_card(checkpoint: str | Path, out: str | Path, export: dict | None = None) -> Path:
    out = Path(out)
    write_text(out, build_card(checkpoint, export))
    return out


def export_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The parts of an export report a card uses."""
    return {key: report.get(key) for key in ("onnx", "opset", "precision", "check")}
