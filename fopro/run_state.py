"""What a run writes at the end of each epoch: validation, the last / best checkpoints, the FPG, metrics.jsonl and
the resumable state (capture / restore)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from safetensors.torch import save_file

from fopro.checkpoint import CheckpointMeta, save_checkpoint
from fopro.distributed import barrier
from fopro.evaluate import TorchPredictor, predict
from fopro.fpg import FourierPromptGenerator
from fopro.io import atomic_path, write_text
from fopro.metrics import compute_metrics
from fopro.run import Run, optimizers_of, steps_done
from fopro.runtime import ProgressFn
from fopro.state import save_state


def validate(run: Run) -> dict[str, Any]:
    """Balanced accuracy, tail recall and the rest on the val split, through the eval library."""
    if run.val_set is None:
        return {}
    predictor = TorchPredictor(run.method.deployed(), run.student_preprocess, run.splits.classes, run.train_counts, "in training", run.device)
    probs = predict(predictor, run.val_set, batch_size=max(64, run.config.batch_size))
    report = compute_metrics(
        np.asarray(run.val_set.manifest.labels), probs, run.splits.classes, run.train_counts, run.config.groups()
    )
    keys = ("accuracy", "balanced_accuracy", "macro_f1", "tail_recall", "macro_auc", "ece")
    summary = {k: report[k] for k in keys}
    summary["group_recall"] = {k: v["mean_recall"] for k, v in (report["groups"] or {}).items()}
    summary["class_recall"] = {c["name"]: c["recall"] for c in report["per_class"]}
    return summary


def end_epoch(run: Run, progress: ProgressFn) -> None:
    """Validate, write last/best checkpoints and the FPG, the resumable state, then metrics.jsonl (rank 0 only)."""
    if run.env.is_main:
        write_epoch(run)
    run.epoch += 1
    run.step = 0
    if run.env.is_main:
        save_state(run.run_dir / "resume.safetensors", capture(run))
        write_metrics(run)
    barrier(run.env)


def write_epoch(run: Run) -> None:
    """Validation, then the last/best checkpoints and the FPG of the epoch that just ended."""
    val = validate(run)
    record = run.history[-1]
    record["val"] = val
    meta = checkpoint_meta(run, val)
    weights = run.method.deployed_state()
    save_checkpoint(run.run_dir / "last", weights, meta)
    score = val.get("balanced_accuracy")
    score = -math.inf if score is None else score
    if run.val_set is None or score > run.best_score:
        run.best_score = score
        record["best"] = True
        save_checkpoint(run.run_dir / "best", weights, meta)
    fpg = getattr(run.method, "fpg", None)
    if fpg is not None:
        save_fpg(run, fpg)
    run.tracker.log_epoch(steps_done(run), record, fpg, run.val_set if run.val_set is not None else run.train_set)


def save_fpg(run: Run, fpg: FourierPromptGenerator) -> None:
    with atomic_path(run.run_dir / "fpg.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in fpg.state_dict().items()}, str(tmp))


def write_metrics(run: Run) -> None:
    write_text(run.run_dir / "metrics.jsonl", "".join(json.dumps(r, allow_nan=False) + "\n" for r in run.history))


def checkpoint_meta(run: Run, val: dict[str, Any]) -> CheckpointMeta:
    pre = run.student_preprocess
    return CheckpointMeta(
        arch=run.config.student,
        classes=list(run.splits.classes),
        image_size=pre.image_size,
        mean=list(pre.mean),
        std=list(pre.std),
        train_counts=list(run.train_counts),
        epoch=run.epoch + 1,
        metrics={"val": val},
        config={**run.config.to_dict(), "augmentation": run.train_set.augment_config.as_dict()},
        head=run.method.config.deploy_head,
    )


def capture(run: Run) -> dict[str, Any]:
    """The resumable state: modules, optimisers, position, selection and history."""
    modules = {name: module.state_dict() for name, module in run.method.trainable_state().items()}
    optimizers = {name: optimizer.state_dict() for name, optimizer in optimizers_of(run).items()}
    return {
        "modules": modules,
        "optimizers": optimizers,
        "epoch": run.epoch,
        "step": run.step,
        "best_score": run.best_score if math.isfinite(run.best_score) else None,
        "history": run.history,
        "running": run.running,
        "world_size": run.env.world_size,
    }


def restore(run: Run, state: dict[str, Any]) -> None:
    for name, module in run.method.trainable_state().items():
        module.load_state_dict(state["modules"][name])
    run.optimizer.load_state_dict(state["optimizers"]["student"])
    for name, optimizer in run.method.extra_optimizers().items():
        optimizer.load_state_dict(state["optimizers"][name])
    run.epoch, run.step = int(state["epoch"]), int(state["step"])
    saved_world = int(state.get("world_size", 1))
    if run.step and saved_world != run.env.world_size:
        run.notes.append(
            f"the state was saved mid-epoch by {saved_world} process(es): epoch {run.epoch + 1} restarts from its first step"
        )
        run.step = 0
    run.best_score = -math.inf if state["best_score"] is None else float(state["best_score"])
    run.history = list(state["history"])
    run.running = dict(state.get("running") or {})
    run.notes.append(f"resumed at epoch {run.epoch + 1}, step {run.step}")
