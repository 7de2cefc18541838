"""Cross-validated nearest-class-mean and k-NN scores on frozen embeddings: the probe's statistics kernel (numpy only).

Stratified k-fold (the same folds for every condition); in each fold the embeddings are centred on the training
mean and L2-normalised (CL2N); NCM predicts the class mean at the smallest Euclidean distance, k-NN the majority
of the k most cosine-similar training images (ties: the lowest class index). ``paired_standard_error`` is the
standard error of a change in balanced accuracy between two predictions of the same images.
"""


from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from fopro.metrics import confusion_matrix, per_class_recall


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over rows of cos(a_i, b_i)."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)))


def stratified_folds(labels: Sequence[int], n_folds: int, seed: int) -> np.ndarray:
    """Fold id per sample: each class's images shuffled (``default_rng(seed)``) and dealt round-robin.

    The dealing continues from class to class so that fold sizes differ by at most one.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    folds = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        folds[members] = (np.arange(len(members)) + offset) % n_folds
        offset += len(members)
    return folds


def fold_count(labels: np.ndarray, folds: int) -> int:
    """min(``folds``, the smallest class's count), at least 2."""
    present = np.bincount(labels)
    return max(2, min(folds, int(present[present > 0].min())))


def knn_neighbours(labels: np.ndarray, n_folds: int, neighbours: int) -> int:
    """k for k-NN: ``neighbours``, or fewer so that k never exceeds the smallest class's training images in a fold."""
    present = np.bincount(labels)
    smallest = int(present[present > 0].min())
    return max(1, min(neighbours, smallest - math.ceil(smallest / n_folds)))


def cl2n(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre both on the training mean, then L2-normalise each row."""
    mean = train.mean(axis=0, keepdims=True)

    def normalise(x: np.ndarray) -> np.ndarray:
        x = x - mean
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return normalise(train), normalise(test)


def ncm_predict(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray) -> np.ndarray:
    """The class whose training mean is nearest (Euclidean); ties go to the lowest class index."""
    classes = np.unique(train_labels)
    means = np.stack([train[train_labels == c].mean(axis=0) for c in classes])
    distances = ((test[:, None, :] - means[None, :, :]) ** 2).sum(axis=2)
    return classes[np.argmin(distances, axis=1)]


def knn_predict(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, k: int) -> np.ndarray:
    """Majority class of the k most cosine-similar training rows; ties go to the lowest class index."""
    classes = np.unique(train_labels)
    similarity = test @ train.T / np.maximum(
        np.linalg.norm(test, axis=1, keepdims=True) * np.linalg.norm(train, axis=1)[None, :], 1e-12
    )
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    index = np.searchsorted(classes, train_labels[nearest])
    votes = np.zeros((len(test), len(classes)), dtype=np.int64)
    np.add.at(votes, (np.arange(len(test))[:, None], index), 1)
    return classes[np.argmax(votes, axis=1)]


def cross_val_predictions(embeddings: np.ndarray, labels: np.ndarray, folds: np.ndarray, method: str, k: int = 5) -> np.ndarray:
    """Out-of-fold predictions of "ncm" or "knn" on CL2N embeddings (statistics from the training folds only)."""
    predictions = np.empty(len(labels), dtype=np.int64)
    for fold in np.unique(folds):
        test, train = folds == fold, folds != fold
        x_train, x_test = cl2n(embeddings[train], embeddings[test])
        if method == "ncm":
            predictions[test] = ncm_predict(x_train, labels[train], x_test)
        else:
            predictions[test] = knn_predict(x_train, labels[train], x_test, k)
    return predictions


def _balanced(labels: np.ndarray, predictions: np.ndarray, num_classes: int, subset: list[int] | None) -> tuple[float | None, list[float | None]]:
    recalls = per_class_recall(confusion_matrix(labels, predictions, num_classes))
    chosen = range(num_classes) if subset is None else subset
    defined = [recalls[c] for c in chosen if recalls[c] is not None]
    return (float(np.mean(defined)) if defined else None), recalls


def discriminability(
    embeddings: np.ndarray, labels: np.ndarray, folds: np.ndarray, k: int, num_classes: int, tail: list[int] | None
) -> dict:
    """NCM and k-NN balanced accuracy (overall and on the ``tail`` classes) and NCM per-class recall.

    ``_correct`` (NCM right or wrong per image) is for the paired standard errors; it is not reported.
    """
    ncm = cross_val_predictions(embeddings, labels, folds, "ncm")
    knn = cross_val_predictions(embeddings, labels, folds, "knn", k)
    balanced, recalls = _balanced(labels, ncm, num_classes, None)
    knn_balanced, _ = _balanced(labels, knn, num_classes, None)
    return {
        "balanced_accuracy": balanced,
        "tail_balanced_accuracy": _balanced(labels, ncm, num_classes, tail)[0] if tail else None,
        "knn_balanced_accuracy": knn_balanced,
        "knn_tail_balanced_accuracy": _balanced(labels, knn, num_classes, tail)[0] if tail else None,
        "per_class_recall": recalls,
        "_correct": ncm == labels,
    }


def paired_standard_error(labels: np.ndarray, before: np.ndarray, after: np.ndarray, classes: Sequence[int] | None) -> float | None:
    """Standard error of the change in balanced accuracy from ``before`` to ``after`` (per-image correctness).

    Balanced accuracy is the mean over classes of per-class accuracy, so its paired change is
    ``mean_c mean_{i in c} d_i`` with ``d_i = after_i - before_i`` and variance ``sum_c var(d | c) / n_c / C^2``.
    """
    chosen = sorted(set(labels.tolist())) if classes is None else list(classes)
    if not chosen:
        return None
    diff = after.astype(np.float64) - before.astype(np.float64)
    variance = 0.0
    for c in chosen:
        d = diff[labels == c]
        if len(d) > 1:
            variance += float(d.var(ddof=1)) / len(d)
    return math.sqrt(variance) / len(chosen)
