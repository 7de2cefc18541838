"""The plan of a run, step by step: the data order of each epoch (labelled and unlabelled), each process's
share of a global batch, the seed of each step, the learning-rate schedule and the adversary's ramp.

Pure functions of (seed, epoch, step) and the sizes: the same on every process and after any resume, which is
what makes resumed and multi-process runs exact (see fopro.train).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fopro.distributed import DistEnv
from fopro.methods import Method


def step_seed(seed: int, epoch: int, step: int) -> int:
    return (seed * 7_919_993 + epoch * 100_003 + step) % (2**63 - 1)


def epoch_order(labels: list[int], epoch: int, seed: int, balanced: bool) -> np.ndarray:
    """The image order of one epoch: a permutation, or class-balanced draws with replacement."""
    rng = np.random.default_rng([seed, epoch, 17])
    labels_array = np.asarray(labels)
    if not balanced:
        return rng.permutation(len(labels_array))
    counts = np.bincount(labels_array)
    weights = 1.0 / counts[labels_array]
    return rng.choice(len(labels_array), size=len(labels_array), replace=True, p=weights / weights.sum())


def epoch_batches(order: np.ndarray, batch_size: int) -> list[list[int]]:
    """Full batches only when there is more than one (BatchNorm needs > 1 sample per batch)."""
    count = max(1, len(order) // batch_size)
    return [order[i * batch_size : (i + 1) * batch_size].tolist() for i in range(count)]


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """Linear warm-up, then cosine decay to zero (or a constant rate)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_step_schedule(method: Method, optimizer: torch.optim.Optimizer, lr: float, factor: float, adversary: float) -> None:
    """The student's rate (peak lr x schedule factor) and the method's own schedule (FPG rate, adversary ramp)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * factor
    method.set_schedule(factor, adversary)


def adversary_ramp(step: int, warmup_steps: int, steps_per_epoch: int) -> float:
    """The adversary's weight factor: 0 -> 1 over the warm-up (at least one epoch), so h_t learns first."""
    return min(1.0, step / max(1, warmup_steps, steps_per_epoch))


def unlabeled_batches(size: int, steps: int, per_step: int, epoch: int, seed: int, env: DistEnv) -> list[list[int]]:
    """This process's unlabelled images for each step of an epoch: successive permutations of the pool, cut
    into global batches of per_step x processes (the same global order everywhere)."""
    rng = np.random.default_rng([seed, epoch, 29])
    global_batch = per_step * env.world_size
    needed = steps * global_batch
    order = np.concatenate([rng.permutation(size) for _ in range(-(-needed // size))])[:needed]
    return [order[i * global_batch + env.rank * per_step : i * global_batch + (env.rank + 1) * per_step].tolist() for i in range(steps)]
