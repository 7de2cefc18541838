"""Whether a predicted 0.9 means 90 %: temperature scaling (Guo et al., 2017) and the numbers that judge it (numpy).

One scalar T divides the student's plain logits (the logits of its classifier, which balanced softmax trained to
give class-balanced posteriors; the training-prior correction is not added back): p = softmax(z / T). T is fitted
on VAL by minimising the negative log-likelihood, a convex problem in log T solved by golden-section search.
Probabilities already divided by T are turned back with softmax(T log p), so a report can show the
calibration before and after from the calibrated probabilities alone.
"""

from __future__ import annotations

import math

import numpy as np

from fopro.errors import FoproError
from fopro.metrics import expected_calibration_error

LOG_T_RANGE = (math.log(0.05), math.log(20.0))
ITERATIONS = 80  # golden-section steps: the bracket shrinks to ~1e-16 of its width


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def log_probs(probs: np.ndarray) -> np.ndarray:
    """log p, with probabilities that underflowed to 0 kept finite (as the logits minus a per-image constant)."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-300, 1.0))


def negative_log_likelihood(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log p(true class)."""
    labels = np.asarray(labels, dtype=np.int64)
    return float(-np.mean(log_probs[np.arange(labels.size), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the NLL of softmax(logits / T) on (logits, labels)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or logits.shape[0] != labels.size or labels.size == 0:
        raise FoproError("temperature scaling needs one row of logits per labelled image")
    loss = lambda log_t: negative_log_likelihood(log_softmax(logits / math.exp(log_t)), labels)  # noqa: E731
    ratio = (math.sqrt(5) - 1) / 2
    low, high = LOG_T_RANGE
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(ITERATIONS):
        if loss_a <= loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return math.exp((low + high) / 2)


def uncalibrated(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(z) from p = softmax(z / T): softmax(T log p)."""
    with np.errstate(divide="ignore"):
        return np.exp(log_softmax(temperature * np.log(np.asarray(probs, dtype=np.float64))))


def calibration_report(probs: np.ndarray, labels: np.ndarray, temperature: float, ece_bins: int = 15) -> dict:
    """ECE and NLL of the probabilities before (T = 1) and after temperature scaling, on one evaluated split."""
    before = uncalibrated(probs, temperature)
    nll = lambda p: negative_log_likelihood(log_probs(p), labels)  # noqa: E731
    return {
        "temperature": float(temperature),
        "ece_before": float(expected_calibration_error(labels, before, ece_bins)),
        "ece_after": float(expected_calibration_error(labels, probs, ece_bins)),
        "nll_before": nll(before),
        "nll_after": nll(np.asarray(probs, dtype=np.float64)),
        "method": "temperature scaling of the student's plain logits, fitted on val (NLL, golden-section search)",
    }
