"""The summary of a finished run: best epoch, teacher probe, calibration and operating points on val, test report."""

from __future__ import annotations

from typing import Any

import numpy as np

from fopro.calibration import calibration_report, fit_temperature, log_probs, log_softmax
from fopro.checkpoint import set_calibration
from fopro.data import checked_dataset
from fopro.data.augment import describe
from fopro.evaluate import EvalOptions, TorchPredictor, evaluate, predict
from fopro import linear_probe
from fopro.linear_probe import fit_teacher_probe, score_probe
from fopro.operating_points import fit_operating_points
from fopro.run import Run
from fopro.runtime import ProgressFn, in_phase


def finish(run: Run, progress: ProgressFn) -> dict:
    best = next((r for r in reversed(run.history) if r.get("best")), run.history[-1] if run.history else {})
    summary: dict[str, Any] = {
        "run_dir": str(run.run_dir),
        "method": run.config.method,
        "student": run.config.student,
        "teacher": run.teacher.description if run.teacher else None,
        "epochs": run.config.epochs,
        "classes": run.splits.classes,
        "train_counts": run.train_counts,
        "unlabeled_images": len(run.unlabeled_set) if run.unlabeled_set is not None else 0,
        "lr": run.lr,
        "augmentation": {"preset": run.config.augment, **run.train_set.augment_config.as_dict()},
        "augmentation_text": describe(run.config.augment, run.train_set.augment_config),
        "best_epoch": best.get("epoch"),
        "best_val": best.get("val"),
        "checkpoints": {"best": str(run.run_dir / "best.safetensors"), "last": str(run.run_dir / "last.safetensors")},
        "notes": run.notes,
    }
    if run.teacher is not None and run.config.teacher_probe and run.env.is_main:
        summary["teacher_probe"] = run_teacher_probe(run, in_phase(progress, "teacher probe"))
    if run.val_set is not None and run.env.is_main:
        summary["calibration"] = calibrate_best(run, in_phase(progress, "calibration on val"))
    if "test" in run.splits and run.env.is_main:
        options = EvalOptions(split="test", batch_size=max(64, run.config.batch_size), device=str(run.device), groups=run.config.groups())
        summary["test"] = evaluate(run.run_dir / "best", run.config.data_options(), options, out_dir=run.run_dir / "test", progress=in_phase(progress, "test evaluation"))
    probe = summary.get("teacher_probe")
    if probe and "test" in summary and "test" in probe["splits"]:
        summary["transfer"] = linear_probe.transfer_ratios(summary["test"], probe["splits"]["test"])
    run.tracker.log_checkpoint(run.run_dir / "best")
    return summary


def calibrate_best(run: Run, progress: ProgressFn) -> dict[str, Any]:
    """Fitted on val for the best checkpoint and stored in best.json: the temperature (see fopro.calibration), then on
    the calibrated probabilities each class's threshold for each default target specificity."""
    predictor = TorchPredictor.from_checkpoint(run.run_dir / "best", str(run.device))
    predictor.temperature = 1.0  # fit on the plain logits, also when a finished run is summarised again
    probs = predict(predictor, run.val_set, max(64, run.config.batch_size), progress)
    labels = np.asarray(run.val_set.manifest.labels)
    plain = log_probs(probs)  # the logits minus a per-image constant: the same softmax(. / T) for every T
    temperature = fit_temperature(plain, labels)
    calibrated = np.exp(log_softmax(plain / temperature))
    points = {
        name: [{"target_specificity": op["target_specificity"], "threshold": op["threshold"]} for op in ops if op["threshold"] is not None]
        for name, ops in fit_operating_points(labels, calibrated, run.splits.classes).items()
    }
    set_calibration(run.run_dir / "best", temperature, points)
    return {**calibration_report(calibrated, labels, temperature), "fitted_on": "val", "operating_points": points,
            "checkpoint": str(run.run_dir / "best.safetensors")}


def run_teacher_probe(run: Run, progress: ProgressFn) -> dict[str, Any]:
    """The teacher probe scored on val and test: what a linear classifier on the frozen teacher's embeddings
    of the (augmented) train split reaches, the reference for the student. Its L2 weight is chosen on val (so its
    val numbers are a little optimistic, as the student's best epoch is; test is the clean comparison)."""
    eval_sets = {"val": run.val_set} if run.val_set is not None else {}
    if "test" in run.splits and len(run.splits["test"]):
        eval_sets["test"] = checked_dataset(run.splits["test"], run.config.image_size, run.config.skip_bad_images)
    options = linear_probe.run_options(run.train_set)
    select = linear_probe.embed_selection(run.teacher, run.val_set, run.device, progress)
    probe = run.teacher_probe if run.teacher_probe is not None else fit_teacher_probe(
        run.teacher, run.train_set, run.train_counts, options, run.device, progress, select=select
    )
    scores = score_probe(
        probe, run.teacher, eval_sets, run.splits.classes, run.train_counts, run.config.groups(),
        run.device, progress, embedded={"val": select[0]} if select else None,
    )
    chosen_on = "val" if select else "cross-validation on train"
    return {"views": options.views, "l2": probe.l2, "l2_chosen_on": chosen_on,
            "l2_balanced_accuracy": {f"{k:g}": v for k, v in probe.selection.items()}, "splits": linear_probe.summarise_scores(scores)}
