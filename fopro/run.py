"""What a training run is made of, built once from its config: data, student, teacher, method, optimiser; and
its data order (the per-process batches of an epoch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fopro.config import DistillConfig
from fopro.data import ImageDataset, Splits, checked_dataset, load_splits, read_unlabeled
from fopro.data.augment import AugmentConfig
from fopro.data.synth import is_synth_corpus
from fopro.distributed import SINGLE, DistEnv, average_gradients, device_for
from fopro.errors import FoproError
from fopro.fpg import FourierPromptGenerator
from fopro.io import check_output_folder
from fopro import linear_probe
from fopro.linear_probe import fit_teacher_probe
from fopro.losses import SupervisedLoss
from fopro.methods import Method, build_method
from fopro.models import Teacher, create_student, load_teacher
from fopro.preprocess import Preprocess
from fopro.probe.file import band_gains_from_probe
from fopro.runtime import ProgressFn, in_phase, no_progress, resolve_device
from fopro.schedule import epoch_batches, epoch_order
from fopro.tracking import NoTracker, Tracker

RUN_MARKERS = ("config.json", "last.safetensors", "resume.safetensors")


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
        probe_progress = in_phase(progress, "teacher probe")
        probe = fit_teacher_probe(teacher, train_set, train_counts, linear_probe.run_options(train_set), device, probe_progress,
                                  select=linear_probe.embed_selection(teacher, val_set, device, probe_progress))
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
    if config.deploy_head == "auto" and config.head() == "fc_t":
        notes.append("--deploy-head auto: the checkpoints keep fc_t(p(f)), EKD's second head on the projection (--deploy-head fc: the student's own fc)")
    if config.align_focus is None and config.focus() > 0:
        notes.append(f"--align-focus {config.focus():g}: the {config.method} default (the images the student matches worst weigh most; 0 turns it off)")
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
    if augmentation.flips_or_turns and not is_synth_corpus(config.data):  # fopro's synthetic lesions have no side or up
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


def local_batches(run: Run) -> list[list[int]]:
    """This process's share of each global batch (batch_size images per process, the same global order everywhere)."""
    config, env = run.config, run.env
    order = epoch_order(run.train_set.manifest.labels, run.epoch, config.seed, config.balanced_sampler)
    size = config.batch_size
    return [batch[env.rank * size : (env.rank + 1) * size] for batch in epoch_batches(order, size * env.world_size)]


def steps_done(run: Run, steps_per_epoch: int | None = None) -> int:
    """Optimisation steps done so far, over all epochs (the x axis of the tracked curves; the schedule's position)."""
    if steps_per_epoch is None:
        steps_per_epoch = len(local_batches(run))
    return run.epoch * steps_per_epoch + run.step


def optimizers_of(run: Run) -> dict[str, torch.optim.Optimizer]:
    return {"student": run.optimizer, **run.method.extra_optimizers()}
