"""Operating points of one class, one-vs-rest on its probability (numpy only): the counts down the ranking, the
average precision (PR-AUC), the sensitivity at a target specificity with its threshold, and thresholds fitted on
one split applied to another (the honest number a deployment gets)."""

from __future__ import annotations

import numpy as np

DEFAULT_SPECIFICITIES = (0.9, 0.95)  # operating points reported for each class


def ranked_counts(is_positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """At each distinct score t, from the highest down: (t, true positives, false positives) of `score >= t`."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    ranked, positive = np.asarray(scores, dtype=np.float64)[order], np.asarray(is_positive, dtype=bool)[order]
    last_of_run = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]
    true_pos = np.cumsum(positive)[last_of_run]
    return ranked[last_of_run], true_pos, last_of_run + 1 - true_pos


def average_precision(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the precision-recall curve as sklearn's average_precision_score: sum (R_n - R_n-1) P_n.
    For a rare class it says more than ROC-AUC. None without a positive sample."""
    _, true_pos, false_pos = ranked_counts(is_positive, scores)
    if true_pos.size == 0 or true_pos[-1] == 0:
        return None
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / true_pos[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def sensitivity_at_specificity(is_positive: np.ndarray, scores: np.ndarray, target: float) -> dict | None:
    """The highest sensitivity with specificity >= target when `score >= threshold` is called positive, and that
    threshold (on this set: an optimistic number for the set it was chosen on). None without positives or negatives."""
    thresholds, true_pos, false_pos = ranked_counts(is_positive, scores)
    positives, negatives = int(np.sum(is_positive)), int(np.size(is_positive) - np.sum(is_positive))
    if positives == 0 or negatives == 0:
        return None
    specificity = 1.0 - false_pos / negatives
    allowed = np.flatnonzero(specificity >= target - 1e-12)
    if allowed.size == 0:  # not even the highest score is specific enough: call nothing positive
        return {"target_specificity": target, "sensitivity": 0.0, "specificity": 1.0, "threshold": None}
    best = allowed[-1]  # sensitivity grows down the ranking: the lowest threshold that keeps the specificity
    return {"target_specificity": target, "sensitivity": float(true_pos[best] / positives),
            "specificity": float(specificity[best]), "threshold": float(thresholds[best])}


def fit_operating_points(
    labels: np.ndarray, probs: np.ndarray, class_names: list[str], targets: tuple[float, ...] = (0.9, 0.95)
) -> dict[str, list[dict]]:
    """{class: [sensitivity_at_specificity(...) for each target]} one-vs-rest on each class's probability (an empty
    list for a class without positives or negatives)."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    return {name: [op for t in targets if (op := sensitivity_at_specificity(labels == c, probs[:, c], t))]
            for c, name in enumerate(class_names)}


def apply_operating_points(labels: np.ndarray, probs: np.ndarray, class_names: list[str], points: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The sensitivity and specificity that thresholds chosen elsewhere (on val) give on this split (the honest number)."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    result = {}
    for name, ops in points.items():
        c = class_names.index(name)
        positive = labels == c
        if not positive.any() or positive.all():
            continue
        result[name] = [
            {**op, "sensitivity": float((probs[positive, c] >= op["threshold"]).mean()),
             "specificity": float((probs[~positive, c] < op["threshold"]).mean())}
            for op in ops
        ]
    return result
