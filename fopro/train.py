"""The distillation loop: epochs, validation through the eval library, checkpoints, exact resume, progress.

Determinism: the data order of an epoch comes from (seed, epoch), each image's augmentation from
(seed, epoch, index), and the global torch RNG is re-seeded from (seed, epoch, step) before every step.
So a run resumed at any step boundary gives the same weights as an uninterrupted one (CPU, same seed).
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from fopro.calibration import calibration_report, fit_temperature, log_probs, log_softmax
from fopro.checkpoint import CheckpointMeta, save_checkpoint, set_calibration
from fopro.config import DistillConfig, save_config
from fopro.data import ImageDataset, Splits, checked_dataset, load_splits, read_unlabeled
from fopro.data.augment import AugmentConfig, describe
from fopro.distributed import SINGLE, DistEnv, any_flag, average_gradients, barrier, device_for
from fopro.errors import FoproError
from fopro.evaluate import EvalOptions, TorchPredictor, evaluate, predict
from fopro.fpg import FourierPromptGenerator
from fopro.io import atomic_path, check_output_folder, folder_lock, write_text
from fopro import linear_probe
from fopro.linear_probe import fit_teacher_probe, score_probe
from fopro.losses import SupervisedLoss
from fopro.methods import Method, build_method
from fopro.metrics import compute_metrics
from fopro.models import Teacher, create_student, load_teacher
from fopro.operating_points import fit_operating_points
from fopro.preprocess import Preprocess
from fopro.probe.file import band_gains_from_probe
from fopro.runtime import ProgressFn, in_phase, no_progress, resolve_device
from fopro.schedule import adversary_ramp, epoch_batches, epoch_order, lr_factor, set_step_schedule, step_seed, unlabeled_batches
from fopro.state import load_state, save_state
from fopro.tracking import NoTracker, Tracker, learning_rates, make_tracker

RUN_MARKERS = ("config.json", "last.safetensors", "resume.safetensors")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
LOG_EVERY = 10  # steps between the progress line's loss updates (each one synchronises the device once)


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C, SIGTERM or SIGUSR1 once a resumable state has been saved."""

    def __init__(self, run_dir: Path, epoch: int, step: int, signal_name: str = "SIGINT"):
        super().__init__(f"interrupted ({signal_name}) at epoch {epoch + 1}, step {step}; resume with: fopro distill --resume {run_dir} "
                         f"(or the same command with --resume auto)")
        self.run_dir = run_dir
        self.signal_name = signal_name


@dataclass
class Run:
    """Everything a training run is made of, built once from the config."""

    config: DistillConfig
    run_dir: Path
    device: torch.device
    splits: Splits
    train_set: ImageDataset
    val_set: ImageDataset | None
    unlabeled_set: ImageDataset | None
    train_counts: list[int]
    method: Method
    student_preprocess: Preprocess
    optimizer: torch.optim.Optimizer
    teacher: Teacher | None
    teacher_probe: nn.Module | None  # the linear probe on the frozen teacher (fopro.linear_probe), fitted for --probe-kd
    lr: float
    env: DistEnv = SINGLE
    notes: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    running: dict[str, float] = field(default_factory=dict)  # the epoch's running losses (kept by a mid-epoch resume)
    best_score: float = -math.inf
    epoch: int = 0
    step: int = 0
    tracker: Tracker = field(default_factory=NoTracker)  # --tracking (rank 0; records nothing elsewhere)


def check_run_dir(run_dir: Path, overwrite: bool, data_folders: tuple[str | None, ...] = ()) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise FoproError(f"--out {run_dir} is a file: give a folder for the run")
    check_output_folder(run_dir, "--out", data_folders)
    if any((run_dir / marker).exists() for marker in RUN_MARKERS) and not overwrite:
        raise FoproError(
            f"--out {run_dir} already holds a run: pass --overwrite to replace it, --resume {run_dir} to continue it, "
            "or choose another folder"
        )


def build_run(config: DistillConfig, run_dir: Path, progress: ProgressFn = no_progress, env: DistEnv = SINGLE) -> Run:
    device = device_for(env, resolve_device(config.device))
    augmentation = config.augment_config()
    notes = config_warnings(config, augmentation)
    data = config.data_options()
    splits = load_splits(data)
    train_manifest = splits.require("train", "give --train-csv or a train/ folder")
    train_counts = train_manifest.class_counts()
    empty = [name for name, count in zip(splits.classes, train_counts) if count == 0]
    if empty:
        raise FoproError(f"class(es) {', '.join(empty)} have no training image: add images or drop the class")
    data_progress = in_phase(progress, "data")
    data_progress("checking images", 0, 1)
    train_set = checked_dataset(
        train_manifest, config.image_size, data.skip_bad_images, train=True, seed=config.seed, augment_config=augmentation
    )
    val_set = None
    if "val" in splits and len(splits["val"]):
        val_set = checked_dataset(splits["val"], config.image_size, data.skip_bad_images)
    else:
        notes.append("no val split: best.safetensors is the last epoch (no model selection)")
    unlabeled_set = unlabeled_dataset(config, augmentation, notes)
    data_progress("checking images", 1, 1)
    torch.manual_seed(config.seed)
    student, student_preprocess = create_student(config.student_options(), len(splits.classes))
    teacher = None
    if config.method != "none":
        if not config.teacher:
            raise FoproError(f"--method {config.method} needs a teacher: pass --teacher (a timm name or a fopro checkpoint)")
        teacher, teacher_notes = load_teacher(config.teacher_options(), config.image_size)
        notes.extend(teacher_notes)
    fpg = build_fpg(config) if config.method == "fopro" else None
    probe = None
    if teacher is not None and config.probe_kd > 0:  # (for the report alone it is fitted at the end: see finish)
        probe = fit_teacher_probe(teacher, train_set, train_counts, linear_probe.run_options(train_set, config.seed), device, in_phase(progress, "teacher probe"))
    sup_loss = SupervisedLoss(config.loss, train_counts)
    method = build_method(config.method_config(), student, student_preprocess, sup_loss, teacher, fpg, probe).to(device)
    method.sync_gradients = lambda parameters: average_gradients(parameters, env)
    if env.enabled and device.type == "cuda":  # SyncBatchNorm works on GPUs only
        for name, module in method.trainable_state().items():
            if name in ("student", "heads"):
                setattr(method, name, nn.SyncBatchNorm.convert_sync_batchnorm(module))
    if env.enabled and len(train_set) < config.batch_size * env.world_size:
        raise FoproError(
            f"--batch-size {config.batch_size} x {env.world_size} processes is more than the {len(train_set)} training images: use a smaller batch"
        )
    if config.channels_last and device.type == "cuda":
        method.student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    lr = config.learning_rate(env.world_size)
    if config.lr is None:
        notes.append(f"--lr auto: {lr:.3g} for {config.optimizer} at a global batch of {config.batch_size * env.world_size}")
    optimizer = make_optimizer(config, method.student_parameters(), lr)
    return Run(
        config, run_dir, device, splits, train_set, val_set, unlabeled_set, train_counts, method, student_preprocess, optimizer, teacher, probe, lr, env, notes
    )


UNLABELED_SEED_OFFSET = 104_729  # the unlabelled images' augmentation draws differ from the labelled ones'


def unlabeled_dataset(config: DistillConfig, augmentation: AugmentConfig, notes: list[str]) -> ImageDataset | None:
    """--unlabeled: images that join the alignment (and FPG) terms only, augmented like the train split."""
    if not config.unlabeled:
        return None
    data = config.data_options()
    manifest = read_unlabeled(Path(config.unlabeled), images=data.images, image_column=config.image_column)
    manifest.decode = data.decode
    dataset = checked_dataset(
        manifest, config.image_size, data.skip_bad_images, train=True, seed=config.seed + UNLABELED_SEED_OFFSET, augment_config=augmentation
    )
    terms = "alignment and FPG terms" if config.method == "fopro" else "alignment term"
    notes.append(f"--unlabeled: {len(dataset)} images, {config.unlabeled_batch_size()} per step, in the {terms} only")
    return dataset


def config_warnings(config: DistillConfig, augmentation: AugmentConfig) -> list[str]:
    """Option combinations that run but are probably not what the user wants."""
    warnings = []
    if config.balanced_sampler and config.loss == "balanced_softmax":
        warnings.append(
            "warning: --balanced-sampler with --loss balanced_softmax corrects the class imbalance twice (rare classes end up "
            "over-predicted): use --loss ce with --balanced-sampler, or drop --balanced-sampler"
        )
    if augmentation.flips_or_turns:
        warnings.append(
            f"augmentation {config.augment} flips or turns images: right only if orientation carries no label "
            "(lesions, cells); for radiographs or any image with a side and an up use --augment radiograph or standard"
        )
    return warnings


def build_fpg(config: DistillConfig) -> FourierPromptGenerator:
    fpg = FourierPromptGenerator(config.image_size, mode=config.fpg_mode, strength=config.fpg_strength, hidden=config.fpg_hidden)
    if config.probe_init:
        edges, gains = band_gains_from_probe(Path(config.probe_init))
        fpg.init_from_band_gains(edges, gains)
    return fpg


def make_optimizer(config: DistillConfig, parameters: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True)
    return torch.optim.Adam(parameters, lr=lr, weight_decay=config.weight_decay)


def autocast(run: Run):
    if run.device.type != "cuda" or run.config.amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if run.config.amp == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


@contextmanager
def interrupt_flag() -> Iterator[dict[str, bool]]:
    """Ctrl-C (SIGINT), SIGTERM or SIGUSR1 (a scheduler's stop or pre-emption warning) sets a flag that the loop
    checks between steps, so a resumable state can be saved first."""
    flag: dict[str, Any] = {"stop": False, "signal": "SIGINT"}

    def stop(signum: int, _frame: Any) -> None:
        flag.update(stop=True, signal=signal.Signals(signum).name)

    try:
        previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread: leave signals alone
        yield flag
        return
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(
    config: DistillConfig,
    run_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressFn = no_progress,
    env: DistEnv = SINGLE,
    phase: str | None = None,
) -> dict:
    """Train (or resume) a run; returns a summary with the best validation metrics and the test report.

    Under torchrun every process calls this with its DistEnv; only rank 0 writes files and reports progress.
    Progress is reported in labelled phases (data, the training phase `phase`, teacher probe, calibration, test
    evaluation); `phase` defaults to "student: <method> distillation".
    """
    run_dir = Path(run_dir)
    if not env.is_main:
        progress = no_progress
    if not resume and env.is_main:
        check_run_dir(run_dir, overwrite, (config.data, config.images, config.unlabeled))
    with folder_lock(run_dir, "--resume" if resume else "--out") if env.is_main else nullcontext():
        barrier(env)
        run = build_run(config, run_dir, progress, env)
        if resume:
            restore(run, load_state(run_dir / "resume.safetensors"))
        elif env.is_main:
            save_config(config, run_dir / "config.json")
        scaler = torch.amp.GradScaler("cuda", enabled=run.device.type == "cuda" and config.amp == "fp16")
        training = in_phase(progress, phase or training_phase(config.method))
        with start_tracking(run, resume) as run.tracker:
            with interrupt_flag() as flag:
                while run.epoch < config.epochs:
                    train_epoch(run, scaler, flag, training)
                    end_epoch(run, progress)
            return finish(run, progress)


def training_phase(method: str) -> str:
    return "student: supervised training (no teacher)" if method == "none" else f"student: {method} distillation"


def train_epoch(run: Run, scaler: torch.amp.GradScaler, flag: dict[str, bool], progress: ProgressFn) -> None:
    """One epoch; progress rows: the epoch (losses, last val balanced accuracy, rate) and all epochs together."""
    config, method = run.config, run.method
    run.train_set.set_epoch(run.epoch)
    batches = local_batches(run)
    total_steps = config.epochs * len(batches)
    warmup = int(config.warmup_epochs * len(batches))
    loader = with_unlabeled(run, make_loader(run, run.train_set, batches[run.step :]), len(batches))
    method.train()
    if run.step == 0:
        run.running = {}
    running = run.running
    started, seen, info = time.perf_counter(), 0, ""
    all_epochs = "the only epoch" if config.epochs == 1 else f"all {config.epochs} epochs"
    total_steps_done = run.epoch * len(batches) + run.step
    progress(all_epochs, total_steps_done, total_steps)
    progress(f"epoch {run.epoch + 1}/{config.epochs}", run.step, len(batches))
    for images, labels in loader:
        torch.manual_seed(step_seed(config.seed, run.epoch, run.step))
        global_step = run.epoch * len(batches) + run.step
        factor = lr_factor(global_step, total_steps, warmup, config.schedule)
        set_step_schedule(method, run.optimizer, run.lr, factor, adversary_ramp(global_step, warmup, len(batches)))
        images, labels = images.to(run.device, non_blocking=True), labels.to(run.device, non_blocking=True)
        try:
            parts, stop = optimisation_step(
                method, run.optimizer, scaler, images, labels, run.step, config.grad_clip, run.env, flag["stop"], autocast(run)
            )
        except NonFiniteLoss as err:
            raise non_finite_error(run, err.parts) from None
        run.step += 1
        seen += len(images)
        for key, value in parts.items():  # running means stay on the device: no synchronisation per step
            value = value.detach().double()
            running[key] = 0.9 * running.get(key, value) + 0.1 * value
        if run.step % LOG_EVERY == 0 or run.step == len(batches) or stop or not info:
            run.running = running = as_numbers(running)  # one synchronisation per logging interval
            run.tracker.log_losses(global_step + 1, running, learning_rates(optimizers_of(run)))
            info = " ".join(f"{k} {v:.3f}" for k, v in running.items() if not k.startswith("fpg_")) + last_val_text(run)
        rate = seen / max(time.perf_counter() - started, 1e-9)
        progress(all_epochs, global_step + 1, total_steps)
        progress(f"epoch {run.epoch + 1}/{config.epochs} [{info}, {rate:.0f} img/s]", run.step, len(batches))
        if stop:
            if run.env.is_main:
                save_state(run.run_dir / "resume.safetensors", capture(run))
            barrier(run.env)
            raise TrainingInterrupted(run.run_dir, run.epoch, run.step, flag["signal"])
    run.history.append({"epoch": run.epoch + 1, "train": {k: round(v, 6) for k, v in running.items()}, "images_per_second": round(seen / max(time.perf_counter() - started, 1e-9), 2)})


def last_val_text(run: Run) -> str:
    val = run.history[-1].get("val", {}) if run.history else {}
    score = val.get("balanced_accuracy")
    return "" if score is None else f", last val bal. acc. {100 * score:.1f}%"


def as_numbers(values: dict[str, Any]) -> dict[str, float]:
    """Losses (0-d tensors or floats) as floats, with one device-to-host copy for all of them."""
    tensors = [torch.as_tensor(v, dtype=torch.float64) for v in values.values()]
    numbers = torch.stack([t.cpu() for t in tensors]).tolist() if tensors else []
    return dict(zip(values, numbers))


class NonFiniteLoss(Exception):
    def __init__(self, parts: dict[str, Any]):
        super().__init__("non-finite loss")
        self.parts = parts


def optimisation_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor,
    labels: torch.Tensor,
    step: int,
    grad_clip: float,
    env: DistEnv = SINGLE,
    stop_requested: bool = False,
    precision: Any = None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """One step of the student (the method runs its own FPG step inside): loss, gradient averaging across
    processes, clipping, optimiser. Returns the named losses and whether any process asked to stop."""
    with precision if precision is not None else nullcontext():
        loss, parts = method.step(images, labels, step)
    stop, bad = any_flag([stop_requested, not is_finite(loss, parts)], env, images.device)
    if bad:
        raise NonFiniteLoss(parts)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    average_gradients(method.student_parameters(), env)
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(method.student_parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return parts, stop


def local_batches(run: Run) -> list[list[int]]:
    """This process's share of each global batch (batch_size images per process, the same global order everywhere)."""
    config, env = run.config, run.env
    order = epoch_order(run.train_set.manifest.labels, run.epoch, config.seed, config.balanced_sampler)
    size = config.batch_size
    return [batch[env.rank * size : (env.rank + 1) * size] for batch in epoch_batches(order, size * env.world_size)]


def steps_done(run: Run) -> int:
    """Optimisation steps done so far, over all epochs (the x axis of the tracked curves)."""
    return run.epoch * len(local_batches(run)) + run.step


def optimizers_of(run: Run) -> dict[str, torch.optim.Optimizer]:
    return {"student": run.optimizer, **run.method.extra_optimizers()}


def start_tracking(run: Run, resume: bool) -> Tracker:
    """The --tracking tracker (rank 0 only); a resumed run continues its tracking run from the resumed step."""
    if not run.env.is_main:
        return NoTracker()
    return make_tracker(run.config.tracking, run.run_dir, run.config.to_dict(), steps_done(run) if resume else None)


def with_unlabeled(run: Run, loader: torch.utils.data.DataLoader, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) per step: the labelled batch, followed by its unlabelled images (label UNLABELED) if any."""
    if run.unlabeled_set is None:
        yield from ((images, labels) for images, labels, _ in loader)
        return
    run.unlabeled_set.set_epoch(run.epoch)
    batches = unlabeled_batches(len(run.unlabeled_set), steps, run.config.unlabeled_batch_size(), run.epoch, run.config.seed, run.env)
    extra = make_loader(run, run.unlabeled_set, batches[run.step :])
    for (images, labels, _), (more, unlabeled, _) in zip(loader, extra):
        yield torch.cat([images, more]), torch.cat([labels, unlabeled])


def make_loader(run: Run, dataset: ImageDataset, batches: list[list[int]]) -> torch.utils.data.DataLoader:
    workers = run.config.workers
    if workers is None:
        workers = 0 if dataset.cached else min(8, max(1, (torch.get_num_threads() or 2) - 1))
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, pin_memory=run.device.type == "cuda", persistent_workers=False,
        worker_init_fn=leave_stop_signals_to_the_main_process,
    )


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """Loader workers ignore SIGINT / SIGTERM / SIGUSR1: a scheduler signals the whole process group, and a worker
    killed by it would end the run before the main process saves its resumable state (it stops the workers itself)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def is_finite(loss: torch.Tensor, parts: dict[str, Any]) -> bool:
    """Whether the loss and every part are finite: one synchronisation for all of them."""
    values = [loss.detach().float().reshape(-1)] + [torch.as_tensor(v, dtype=torch.float32, device=loss.device).reshape(-1) for v in parts.values()]
    return bool(torch.isfinite(torch.cat(values)).all())


def non_finite_error(run: Run, parts: dict[str, Any]) -> FoproError:
    detail = ", ".join(f"{k}={v:.4g}" for k, v in as_numbers(parts).items())
    return FoproError(
        f"non-finite loss at epoch {run.epoch + 1}, step {run.step + 1} ({detail}): lower --lr, or use --amp bf16 / none "
        f"instead of fp16; the last good checkpoint in {run.run_dir} is kept"
    )


def validate(run: Run) -> dict[str, Any]:
    """Balanced accuracy, tail recall and the rest on the val split, through the eval library."""
    if run.val_set is None:
        return {}
    predictor = TorchPredictor(run.method.student, run.student_preprocess, run.splits.classes, run.train_counts, "in training", run.device)
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
    save_checkpoint(run.run_dir / "last", run.method.student.state_dict(), meta)
    score = val.get("balanced_accuracy")
    score = -math.inf if score is None else score
    if run.val_set is None or score > run.best_score:
        run.best_score = score
        record["best"] = True
        save_checkpoint(run.run_dir / "best", run.method.student.state_dict(), meta)
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
    of the (augmented) train split reaches, the reference for the student."""
    eval_sets = {"val": run.val_set} if run.val_set is not None else {}
    if "test" in run.splits and len(run.splits["test"]):
        eval_sets["test"] = checked_dataset(run.splits["test"], run.config.image_size, run.config.skip_bad_images)
    options = linear_probe.run_options(run.train_set, run.config.seed)
    probe = run.teacher_probe if run.teacher_probe is not None else fit_teacher_probe(
        run.teacher, run.train_set, run.train_counts, options, run.device, progress
    )
    scores = score_probe(
        probe, run.teacher, eval_sets, run.splits.classes, run.train_counts, run.config.groups(),
        run.device, progress,
    )
    return {"views": options.views, "splits": linear_probe.summarise_scores(scores)}
