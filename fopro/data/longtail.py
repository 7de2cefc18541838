"""Long-tailed class counts and deterministic subsampling (the exponential profile of LT benchmarks)."""

from __future__ import annotations

import math

import numpy as np

from fopro.errors import FoproError


def longtail_counts(max_count: int, num_classes: int, imbalance: float) -> list[int]:
    """Counts n_i = max_count * imbalance ** (i / (C - 1)) for i = 0..C-1 (rounded down, at least 1).

    `imbalance` is the ratio rarest / most frequent, in (0, 1]; 1 keeps the set balanced.
    """
    check_imbalance(imbalance)
    if num_classes == 1:
        return [max_count]
    return [max(1, int(math.floor(max_count * imbalance ** (i / (num_classes - 1)) + 1e-9))) for i in range(num_classes)]


def check_imbalance(imbalance: float, option: str = "--imbalance") -> None:
    if not (0.0 < imbalance <= 1.0):
        raise FoproError(f"{option} {imbalance} is outside (0, 1]: give the ratio rarest/most frequent, e.g. 0.01")


def longtail_indices(labels: list[int] | np.ndarray, num_classes: int, imbalance: float, seed: int) -> list[int]:
    """Indices of a long-tailed subset of a (roughly balanced) labelled set, chosen deterministically by seed.

    Classes are ranked by their available count (most first, ties by class index); the most frequent
    keeps all its images and class of rank i keeps n_max * imbalance ** (i / (C - 1)) of them.
    """
    labels = np.asarray(labels, dtype=np.int64)
    available = np.bincount(labels, minlength=num_classes)
    order = sorted(range(num_classes), key=lambda c: (-available[c], c))
    targets = longtail_counts(int(available[order[0]]), num_classes, imbalance)
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for rank, cls in enumerate(order):
        members = np.flatnonzero(labels == cls)
        count = min(targets[rank], len(members))
        keep.extend(sorted(rng.permutation(members)[:count].tolist()))
    return sorted(keep)
