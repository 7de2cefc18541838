"""The distillation loop: epochs and steps, interruption (Ctrl-C, SIGTERM, SIGUSR1), tracking, progress. A run is
built by fopro.run, writes its epochs through fopro.run_state and its summary through fopro.run_summary.

Determinism: the data order of an epoch comes from (seed, epoch), each image's augmentation from
(seed, epoch, index), and the global torch RNG is re-seeded from (seed, epoch, step) before every step.
So a run resumed at any step boundary gives the same weights as an uninterrupted one (CPU, same seed).
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from fopro.config import DistillConfig
from fopro.config_files import save_config
from fopro.data import ImageDataset
from fopro.distributed import SINGLE, DistEnv, any_flag, average_gradients, barrier
from fopro.errors import FoproError
from fopro.io import folder_lock
from fopro.methods import Method
from fopro.run import Run, build_run, check_run_dir, local_batches, optimizers_of, steps_done
from fopro.run_state import capture, end_epoch, restore
from fopro.run_summary import finish
from fopro.runtime import ProgressFn, in_phase, no_progress
from fopro.schedule import adversary_ramp, lr_factor, set_step_schedule, step_seed, unlabeled_batches
from fopro.state import load_state, save_state
from fopro.tracking import NoTracker, Tracker, learning_rates, make_tracker

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
LOG_EVERY = 10  # steps between the progress line's loss updates (each one synchronises the device once)


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C, SIGTERM or SIGUSR1 once a resumable state has been saved."""

    def __init__(self, run_dir: Path, epoch: int, step: int, signal_name: str = "SIGINT"):
        super().__init__(f"interrupted ({signal_name}) at epoch {epoch + 1}, step {step}; resume with: fopro distill --resume {run_dir} "
                         f"(or the same command with --resume auto)")
        self.run_dir = run_dir
        self.signal_name = signal_name


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
    progress(all_epochs, steps_done(run, len(batches)), total_steps)
    progress(f"epoch {run.epoch + 1}/{config.epochs}", run.step, len(batches))
    for images, labels in loader:
        torch.manual_seed(step_seed(config.seed, run.epoch, run.step))
        global_step = steps_done(run, len(batches))
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


