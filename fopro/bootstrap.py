"""How sure a metric is: stratified bootstrap 95 % intervals of the argmax metrics (numpy only).

Each resample draws, within every class of the evaluated set, as many images as the class has, with
replacement (so a rare class keeps its size and is never left out); the metric is recomputed from the
resample's confusion matrix; the interval is the 2.5th and 97.5th percentile over the resamples where the
metric is defined (a class never predicted in a resample has no precision there). Seeded: the same
predictions and seed give the same intervals.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

DEFAULT_RESAMPLES = 1000
LEVEL = 0.95


def stratified_resamples(labels: np.ndarray, resamples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Index arrays of `resamples` stratified bootstrap resamples of `labels` (each class keeps its size)."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(resamples):
        yield np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])


def _per_class(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Recall, precision and F1 of each class from a confusion matrix (NaN where undefined)."""
    tp = np.diag(matrix).astype(np.float64)
    support, predicted = matrix.sum(axis=1).astype(np.float64), matrix.sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        f1 = np.where(support > 0, 2 * tp / (support + predicted), np.nan)
    return {"recall": recall, "precision": precision, "f1": f1}


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    low, high = np.percentile(values, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return [float(low), float(high)]


def bootstrap_intervals(
    labels: np.ndarray,
    preds: np.ndarray,
    num_classes: int,
    group_members: dict[str, list[int]] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict:
    """95 % intervals: {"balanced_accuracy", "macro_f1", "per_class": {recall, precision, f1: [[low, high] | None]},
    "groups": {group: [low, high] | None} of the mean recall of `group_members` (e.g. head / medium / tail),
    "resamples", "level", "seed", "method"}."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    present = np.bincount(labels, minlength=num_classes) > 0
    members = {group: [c for c in classes if present[c]] for group, classes in (group_members or {}).items()}
    per_class = {key: np.empty((resamples, num_classes)) for key in ("recall", "precision", "f1")}
    for b, index in enumerate(stratified_resamples(labels, resamples, seed)):
        matrix = np.bincount(labels[index] * num_classes + preds[index], minlength=num_classes**2).reshape(num_classes, num_classes)
        for key, values in _per_class(matrix).items():
            per_class[key][b] = values
    recall = per_class["recall"][:, present]
    result = {
        "balanced_accuracy": _interval(recall.mean(axis=1)),
        "macro_f1": _interval(np.nan_to_num(per_class["f1"][:, present]).mean(axis=1)),
        "per_class": {key: [_interval(values[:, c]) for c in range(num_classes)] for key, values in per_class.items()},
        "groups": {group: _interval(per_class["recall"][:, cs].mean(axis=1)) if cs else None for group, cs in members.items()},
        "resamples": resamples,
        "level": LEVEL,
        "seed": seed,
        "method": "stratified bootstrap (each class resampled to its own size), percentile interval",
    }
    return result
