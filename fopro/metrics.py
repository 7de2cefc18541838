"""Evaluation metrics for long-tailed classification, in pure numpy (no torch, no scikit-learn).

Every function here matches the scikit-learn metric of the same meaning (see tests/test_metrics.py).
`compute_metrics` gathers them into one JSON-serialisable report: Python floats/ints/lists/None only,
never NaN; a value that is undefined (e.g. the recall of a class absent from the evaluated set) is None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fopro.bootstrap import bootstrap_intervals
from fopro.errors import FoproError
from fopro.operating_points import DEFAULT_SPECIFICITIES, average_precision, fit_operating_points


# ----------------------------------------------------------------------------- small helpers


def _float_or_none(value: float | np.floating | None) -> float | None:
    """A finite Python float, or None for None/NaN/inf."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _mean_or_none(values: list[float | None]) -> float | None:
    """Mean of the defined (non-None) values, or None if there are none."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _divide(num: float, den: float) -> float | None:
    """num / den, or None if den == 0."""
    return float(num) / float(den) if den != 0 else None


# ----------------------------------------------------------------------------- validation


def validate_inputs(labels: Any, probs: Any, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, ranges and finiteness; return (labels as int64 (N,), probs as float64 (N, C))."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if labels.ndim != 1:
        raise FoproError(f"labels must be a 1-D array of class indices, got shape {labels.shape}")
    if labels.shape[0] == 0:
        raise FoproError("the evaluated set is empty: check the data options (split, CSV)")
    if probs.ndim != 2:
        raise FoproError(f"probabilities must be a 2-D array (samples, classes), got shape {probs.shape}")
    if probs.shape[0] != labels.shape[0]:
        raise FoproError(
            f"shape mismatch: {labels.shape[0]} labels but {probs.shape[0]} rows of probabilities"
        )
    num_classes = probs.shape[1]
    if num_classes == 0:
        raise FoproError("the probabilities have no class column: the model output is empty")
    if len(class_names) != num_classes:
        raise FoproError(
            f"{len(class_names)} class names but the probabilities have {num_classes} columns: "
            "check the class list against the model"
        )
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind != "f" or not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise FoproError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if np.any(bad):
        raise FoproError(
            f"label {int(labels[bad][0])} is out of range for {num_classes} classes (0..{num_classes - 1}): "
            "check the label column and the class list"
        )
    if not np.all(np.isfinite(probs)):
        raise FoproError("the probabilities contain NaN or infinity: the model output is broken")
    return labels, probs


# ----------------------------------------------------------------------------- counting


def predictions(probs: np.ndarray) -> np.ndarray:
    """Predicted class = argmax of each row (ties -> lowest index)."""
    return np.asarray(probs).argmax(axis=1).astype(np.int64)


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: rows = true class, columns = predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    flat = labels * num_classes + preds
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def normalized_confusion(matrix: np.ndarray) -> list[list[float | None]]:
    """Each row divided by its sum; rows with no sample are all None."""
    rows: list[list[float | None]] = []
    for row in np.asarray(matrix):
        total = row.sum()
        rows.append([float(v) / float(total) for v in row] if total > 0 else [None] * len(row))
    return rows


# ----------------------------------------------------------------------------- global metrics


def accuracy(matrix: np.ndarray) -> float:
    """Fraction of correct predictions."""
    return float(np.trace(matrix)) / float(matrix.sum())


def per_class_recall(matrix: np.ndarray) -> list[float | None]:
    """tp / support per class; None where support is 0."""
    return [_divide(matrix[c, c], matrix[c].sum()) for c in range(matrix.shape[0])]


def per_class_precision(matrix: np.ndarray) -> list[float | None]:
    """tp / predicted per class; None where the class was never predicted."""
    return [_divide(matrix[c, c], matrix[:, c].sum()) for c in range(matrix.shape[0])]


def per_class_specificity(matrix: np.ndarray) -> list[float | None]:
    """tn / negatives per class; None where the class has no negative sample."""
    total = matrix.sum()
    out: list[float | None] = []
    for c in range(matrix.shape[0]):
        negatives = total - matrix[c].sum()
        false_pos = matrix[:, c].sum() - matrix[c, c]
        out.append(_divide(negatives - false_pos, negatives))
    return out


def per_class_f1(matrix: np.ndarray) -> list[float | None]:
    """2tp / (2tp + fp + fn) per class; None where support is 0, 0.0 where tp is 0."""
    out: list[float | None] = []
    for c in range(matrix.shape[0]):
        support = matrix[c].sum()
        if support == 0:
            out.append(None)
            continue
        tp = matrix[c, c]
        fp = matrix[:, c].sum() - tp
        fn = support - tp
        out.append(float(2 * tp) / float(2 * tp + fp + fn))
    return out


def balanced_accuracy(matrix: np.ndarray) -> float | None:
    """Mean recall over the classes present in the labels."""
    return _mean_or_none(per_class_recall(matrix))


def macro_f1(matrix: np.ndarray) -> float | None:
    """Mean F1 over the classes present in the labels (an undefined precision counts as F1 = 0)."""
    return _mean_or_none(per_class_f1(matrix))


def matthews_corrcoef(matrix: np.ndarray) -> float:
    """Multiclass Matthews correlation (Gorodkin's R_K), as sklearn: 0.0 where undefined."""
    matrix = np.asarray(matrix, dtype=np.float64)
    t_sum = matrix.sum(axis=1)
    p_sum = matrix.sum(axis=0)
    n_correct = np.trace(matrix)
    n = p_sum.sum()
    cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n**2 - np.dot(p_sum, p_sum)
    cov_ytyt = n**2 - np.dot(t_sum, t_sum)
    denominator = cov_ypyp * cov_ytyt
    if denominator == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(denominator))


def cohen_kappa(matrix: np.ndarray) -> float | None:
    """Cohen's kappa between labels and predictions, as sklearn; None where undefined (denominator 0)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    sum0 = matrix.sum(axis=0)
    sum1 = matrix.sum(axis=1)
    total = sum0.sum()
    if total == 0:
        return None
    expected = np.outer(sum0, sum1) / total
    weights = np.ones_like(matrix)
    np.fill_diagonal(weights, 0.0)
    denominator = np.sum(weights * expected)
    if denominator == 0:
        return None
    return _float_or_none(1.0 - np.sum(weights * matrix) / denominator)


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, num_bins: int = 15) -> float:
    """ECE of the top-label confidence: sum over equal-width bins of |acc - conf| * n_bin / N.

    Bin b covers (b/B, (b+1)/B]; a confidence of exactly 0 falls in the first bin.
    """
    if num_bins < 1:
        raise FoproError(f"the number of ECE bins must be at least 1, got {num_bins}")
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    bins = np.clip(np.searchsorted(edges[1:-1], confidence, side="left"), 0, num_bins - 1)
    total = 0.0
    for b in range(num_bins):
        mask = bins == b
        count = int(mask.sum())
        if count:
            total += abs(correct[mask].mean() - confidence[mask].mean()) * count
    return float(total / len(labels))


# ----------------------------------------------------------------------------- ROC-AUC


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks (scipy's 'average')."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # start index of each run of equal values
    starts = np.concatenate(([True], sorted_values[1:] != sorted_values[:-1]))
    run_id = np.cumsum(starts) - 1
    run_start = np.flatnonzero(starts)
    run_end = np.concatenate((run_start[1:], [len(values)]))  # exclusive
    run_rank = (run_start + 1 + run_end) / 2.0  # mean of ranks run_start+1 .. run_end
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = run_rank[run_id]
    return ranks


def binary_auc(is_positive: np.ndarray, scores: np.ndarray) -> float | None:
    """ROC-AUC via the Mann-Whitney U statistic with average ranks (ties count 1/2, as sklearn).

    None if there is no positive or no negative sample.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    n_pos = int(is_positive.sum())
    n_neg = int(is_positive.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = average_ranks(scores)
    u_stat = ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_stat / (n_pos * n_neg))


def per_class_auc(labels: np.ndarray, probs: np.ndarray) -> list[float | None]:
    """One-vs-rest ROC-AUC of each class column; None where undefined."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    return [binary_auc(labels == c, probs[:, c]) for c in range(probs.shape[1])]


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """Mean one-vs-rest ROC-AUC over the classes where it is defined; None if none."""
    return _mean_or_none(per_class_auc(labels, probs))


# ----------------------------------------------------------------------------- long-tail groups


@dataclass(frozen=True)
class LongTailGroups:
    """Head / medium / tail classes by their number of TRAINING images: head above ``head``, tail below ``tail``,
    medium in between (both included). The command-line options are --head-threshold and --tail-threshold."""

    head: int = 100
    tail: int = 20

    def __post_init__(self) -> None:
        if self.tail > self.head:
            raise FoproError(f"--tail-threshold {self.tail} is above --head-threshold {self.head}: choose tail <= head")

    def group_of(self, train_count: int) -> str:
        """'head' if train_count > head, 'tail' if < tail, else 'medium'."""
        if train_count > self.head:
            return "head"
        if train_count < self.tail:
            return "tail"
        return "medium"

    def definitions(self) -> dict[str, str]:
        return {
            "head": f"train_count > {self.head}",
            "medium": f"{self.tail} <= train_count <= {self.head}",
            "tail": f"train_count < {self.tail}",
        }


DEFAULT_GROUPS = LongTailGroups()


def validate_train_counts(train_counts: Any, num_classes: int) -> list[int]:
    counts = list(train_counts)
    if len(counts) != num_classes:
        raise FoproError(
            f"{len(counts)} training counts for {num_classes} classes: give one count per class"
        )
    out: list[int] = []
    for count in counts:
        try:
            value = int(count)
            valid = not isinstance(count, bool) and float(count) == value and value >= 0
        except (TypeError, ValueError, OverflowError):
            valid = False
        if not valid:
            raise FoproError(f"training count {count!r} is not a non-negative integer")
        out.append(value)
    return out


def group_recalls(
    class_names: list[str],
    recalls: list[float | None],
    train_counts: list[int],
    groups: LongTailGroups = DEFAULT_GROUPS,
) -> dict[str, dict[str, Any]]:
    """{"head"|"medium"|"tail": {"classes", "mean_recall", "definition"}}; the mean skips undefined recalls."""
    definitions = groups.definitions()
    result: dict[str, dict[str, Any]] = {}
    for group in ("head", "medium", "tail"):
        members = [c for c, n in enumerate(train_counts) if groups.group_of(n) == group]
        result[group] = {
            "classes": [class_names[c] for c in members],
            "mean_recall": _mean_or_none([recalls[c] for c in members]),
            "definition": definitions[group],
        }
    return result


# ----------------------------------------------------------------------------- report


def _notes(
    class_names: list[str],
    matrix: np.ndarray,
    probs: np.ndarray,
    groups: dict[str, dict[str, Any]] | None,
    aucs: list[float | None],
) -> list[str]:
    notes: list[str] = []
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    present = int(np.count_nonzero(support))
    if present == 1:
        only = class_names[int(np.flatnonzero(support)[0])]
        notes.append(
            f"single class in the evaluated set ('{only}'): ROC-AUC is undefined, MCC is 0 by convention "
            "and balanced accuracy equals that class's recall"
        )
    for c, name in enumerate(class_names):
        if support[c] == 0:
            notes.append(
                f"class '{name}' is absent from the evaluated set: its recall is undefined and excluded "
                "from balanced accuracy, macro-F1 and group means"
            )
        if predicted[c] == 0:
            notes.append(f"class '{name}' was never predicted: its precision is undefined (null)")
    if all(a is None for a in aucs):
        notes.append("ROC-AUC is undefined for every class (each needs positives and negatives): macro AUC is null")
    deviation = float(np.max(np.abs(probs.sum(axis=1) - 1.0)))
    if deviation > 1e-3:
        notes.append(
            f"probability rows do not sum to 1 (max deviation {deviation:.3g}): ECE assumes probabilities, "
            "not logits"
        )
    if groups is None:
        notes.append("no training counts: head/medium/tail groups skipped")
    else:
        for group, info in groups.items():
            if not info["classes"]:
                notes.append(f"group '{group}' ({info['definition']}) has no class: its mean recall is null")
            elif info["mean_recall"] is None:
                notes.append(
                    f"group '{group}' has no class in the evaluated set: its mean recall is null"
                )
    return notes


def compute_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    train_counts: list[int] | None = None,
    groups: LongTailGroups = DEFAULT_GROUPS,
    ece_bins: int = 15,
    target_specificities: tuple[float, ...] = DEFAULT_SPECIFICITIES,
    bootstrap: int = 0,
    seed: int = 0,
) -> dict:
    """All metrics of one evaluation, as a JSON-serialisable dict (no NaN: undefined values are None).

    Per class also the average precision and, one-vs-rest on its probability, the sensitivity at each of
    `target_specificities` with its threshold; with `bootstrap` > 0, 95 % intervals (see fopro.bootstrap)."""
    labels, probs = validate_inputs(labels, probs, class_names)
    class_names = [str(name) for name in class_names]
    num_classes = probs.shape[1]
    counts = validate_train_counts(train_counts, num_classes) if train_counts is not None else None

    preds = predictions(probs)
    matrix = confusion_matrix(labels, preds, num_classes)
    recalls = per_class_recall(matrix)
    precisions = per_class_precision(matrix)
    specificities = per_class_specificity(matrix)
    f1s = per_class_f1(matrix)
    aucs = per_class_auc(labels, probs)
    operating_points = fit_operating_points(labels, probs, class_names, target_specificities)

    per_class = [
        {
            "name": class_names[c],
            "index": c,
            "train_count": counts[c] if counts is not None else None,
            "support": int(matrix[c].sum()),
            "predicted": int(matrix[:, c].sum()),
            "precision": precisions[c],
            "recall": recalls[c],
            "specificity": specificities[c],
            "f1": f1s[c],
            "auc": aucs[c],
            "average_precision": average_precision(labels == c, probs[:, c]),
            "operating_points": operating_points[class_names[c]],
        }
        for c in range(num_classes)
    ]
    group_report = group_recalls(class_names, recalls, counts, groups) if counts is not None else None
    intervals = None
    if bootstrap > 0:
        members = {name: [class_names.index(n) for n in g["classes"]] for name, g in group_report.items()} if group_report else None
        intervals = bootstrap_intervals(labels, preds, num_classes, members, bootstrap, seed)
        for c, row in enumerate(per_class):
            row.update({f"{key}_ci": intervals["per_class"][key][c] for key in ("recall", "precision", "f1")})

    return {
        "num_samples": int(labels.shape[0]),
        "num_classes": int(num_classes),
        "class_names": class_names,
        "accuracy": accuracy(matrix),
        "balanced_accuracy": _float_or_none(balanced_accuracy(matrix)),
        "macro_f1": _float_or_none(macro_f1(matrix)),
        "macro_auc": _float_or_none(_mean_or_none(aucs)),
        "ece": _float_or_none(expected_calibration_error(labels, probs, ece_bins)),
        "mcc": _float_or_none(matthews_corrcoef(matrix)),
        "kappa": cohen_kappa(matrix),
        "per_class": per_class,
        "groups": group_report,
        "tail_recall": group_report["tail"]["mean_recall"] if group_report is not None else None,
        "confusion_matrix": [[int(v) for v in row] for row in matrix],
        "confusion_matrix_normalized": normalized_confusion(matrix),
        "intervals": intervals,
        "notes": _notes(class_names, matrix, probs, group_report, aucs),
    }
