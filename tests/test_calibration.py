"""Temperature scaling: the fit finds the temperature that generated the labels and the minimum of the NLL, the
before/after report is exact, and a calibrated checkpoint's evaluation writes a reliability diagram."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fopro.calibration import calibration_report, fit_temperature, log_softmax, negative_log_likelihood, uncalibrated
from fopro.metrics import expected_calibration_error


def _overconfident(temperature: float = 2.5, n: int = 20000, classes: int = 5, seed: int = 0):
    """Logits z and labels drawn from softmax(z / temperature): the model is overconfident by that factor."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, size=(n, classes))
    probs = np.exp(log_softmax(logits / temperature))
    labels = (rng.random((n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return logits, labels


def test_the_fit_recovers_the_temperature_that_made_the_labels() -> None:
    logits, labels = _overconfident(2.5)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def test_the_fit_is_the_minimum_of_the_nll() -> None:
    logits, labels = _overconfident(1.7, n=3000, seed=1)
    fitted = fit_temperature(logits, labels)
    grid = np.exp(np.linspace(math.log(0.5), math.log(6), 2001))
    losses = [negative_log_likelihood(log_softmax(logits / t), labels) for t in grid]
    assert fitted == pytest.approx(grid[int(np.argmin(losses))], rel=2e-3)


def test_before_and_after() -> None:
    logits, labels = _overconfident(2.0, n=5000, seed=2)
    temperature = fit_temperature(logits, labels)
    calibrated = np.exp(log_softmax(logits / temperature))
    np.testing.assert_allclose(uncalibrated(calibrated, temperature), np.exp(log_softmax(logits)), atol=1e-9)
    report = calibration_report(calibrated, labels, temperature)
    assert report["ece_after"] < report["ece_before"] and report["nll_after"] < report["nll_before"]
    assert report["ece_before"] == pytest.approx(expected_calibration_error(labels, np.exp(log_softmax(logits))))


def test_evaluating_a_calibrated_checkpoint_reports_and_plots_it(tmp_path) -> None:
    from fopro.checkpoint import set_calibration
    from fopro.data import DataOptions
    from fopro.evaluate import EvalOptions, evaluate
    from helpers import make_image_folder, tiny_checkpoint

    classes = ["a", "b", "c"]
    data = make_image_folder(tmp_path / "d", {"test": {name: 3 for name in classes}})
    checkpoint, _ = tiny_checkpoint(tmp_path / "ckpt" / "model", classes, train_counts=[9, 5, 2])
    set_calibration(checkpoint, 1.8)
    report = evaluate(checkpoint, DataOptions(data=data), EvalOptions(device="cpu", bootstrap=0), out_dir=tmp_path / "eval")
    assert report["calibration"]["temperature"] == 1.8
    assert (tmp_path / "eval" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
