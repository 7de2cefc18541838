"""Long-tailed supervised losses and distillation terms, checked against hand (numpy) computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from fopro.errors import FoproError
from fopro.losses import (
    LOSSES, SupervisedLoss, balanced_softmax, class_balanced_weights, class_log_prior, cosine_distances, focus_weights, squared_errors,
    weighted_mean,
)
from fopro.fpg import FourierPromptGenerator
from fopro.methods import MethodConfig, build_method
from fopro.models import StudentOptions, Teacher, create_student
from fopro.preprocess import Preprocess

COUNTS = [100, 30, 9, 2]


def _batch(seed: int = 0, n: int = 6, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(n, c, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 0, 3][:n])
    return logits, labels


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _nll(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return -_log_softmax(logits)[np.arange(len(labels)), labels]


def test_class_log_prior_by_hand():
    prior = np.array(COUNTS, dtype=np.float64) / sum(COUNTS)
    np.testing.assert_allclose(class_log_prior(COUNTS).numpy(), np.log(prior), rtol=1e-6)
    with pytest.raises(FoproError, match="at least one training image"):
        class_log_prior([5, 0, 3])


def test_balanced_softmax_equals_hand_computation():
    logits, labels = _batch()
    log_prior = np.log(np.array(COUNTS, dtype=np.float64) / sum(COUNTS))
    expected = _nll(logits.double().numpy() + log_prior, labels.numpy()).mean()
    got = balanced_softmax(logits, labels, class_log_prior(COUNTS))
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, rel=1e-5)
    loss = SupervisedLoss("balanced_softmax", COUNTS)
    assert float(loss(logits, labels)) == pytest.approx(expected, rel=1e-5)
    # the prior matters: rare classes are pushed harder than with plain CE
    assert not math.isclose(float(got), _nll(logits.double().numpy(), labels.numpy()).mean(), rel_tol=1e-3)
    # uniform counts: balanced softmax is plain cross-entropy
    uniform = SupervisedLoss("balanced_softmax", [7, 7, 7, 7])
    assert float(uniform(logits, labels)) == pytest.approx(_nll(logits.double().numpy(), labels.numpy()).mean(), rel=1e-5)


def test_cross_entropy_equals_hand_computation():
    logits, labels = _batch(seed=1)
    loss = SupervisedLoss("ce", COUNTS)
    expected = _nll(logits.double().numpy(), labels.numpy()).mean()
    assert float(loss(logits, labels)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]], 0.0),  # identical
        ([[1.0, 2.0, 3.0]], [[2.0, 4.0, 6.0]], 0.0),  # same direction, other norm
        ([[1.0, 2.0, 3.0]], [[-1.0, -2.0, -3.0]], 4.0),  # opposite
        ([[1.0, 0.0, 0.0]], [[0.0, 5.0, 0.0]], 2.0),  # orthogonal
        ([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[3.0, 0.0], [-1.0, 0.0], [2.0, 0.0]], 2.0),  # mean of 0, 4 and 2
        ([[1.0, 0.0]], [[1.0, 1.0]], 2.0 - math.sqrt(2.0)),  # 45 degrees
    ],
)
def test_cosine_distance_golden_values(a, b, expected):
    got = weighted_mean(cosine_distances(torch.tensor(a), torch.tensor(b)), None)
    assert got.dim() == 0
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_cosine_distance_matches_numpy_and_reads_half_precision():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    an, bn = a.double().numpy(), b.double().numpy()
    cos = (an * bn).sum(1) / np.linalg.norm(an, axis=1) / np.linalg.norm(bn, axis=1)
    assert float(cosine_distances(a, b).mean()) == pytest.approx(float(np.mean(2 - 2 * cos)), rel=1e-5)
    half = cosine_distances(a.half(), b.bfloat16()).mean()
    assert half.dtype == torch.float32
    assert float(half) == pytest.approx(float(np.mean(2 - 2 * cos)), abs=2e-2)


def test_squared_errors_by_hand():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert float(squared_errors(a, b).mean()) == pytest.approx((0 + 4 + 9 + 0) / 4)


def test_unknown_loss_is_a_fopro_error():
    with pytest.raises(FoproError, match=r"--loss focal is not known: choose one of balanced_softmax, ce"):
        SupervisedLoss("focal", COUNTS)
    assert LOSSES == ("balanced_softmax", "ce")


def test_ldam_was_removed_with_a_pointer():
    """LDAM without a cosine classifier puts its margins on unbounded logits: refused, naming what to use."""
    with pytest.raises(FoproError, match=r"--loss ldam_drw was removed \(LDAM needs a cosine classifier.*use balanced_softmax"):
        SupervisedLoss("ldam_drw", COUNTS)


def test_losses_have_gradients():
    logits, labels = _batch(seed=4)
    for name in LOSSES:
        x = logits.clone().requires_grad_(True)
        SupervisedLoss(name, COUNTS)(x, labels).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, name


def test_class_balanced_alignment_weights_by_hand():
    """Counts 6 / 3 / 1: weights N / (C n_y) = 10/18, 10/9, 10/3; an unlabelled image (-1) weighs 1."""
    log_prior = class_log_prior([6, 3, 1])
    weights = class_balanced_weights(log_prior, torch.tensor([0, 1, 2, -1, 2]))
    assert torch.allclose(weights, torch.tensor([10 / 18, 10 / 9, 10 / 3, 1.0, 10 / 3]))
    # over the training distribution the mean weight is 1: the term keeps its scale
    assert math.isclose(float((torch.tensor([6, 3, 1]) * weights[:3]).sum() / 10), 1.0, rel_tol=1e-6)


def test_weighted_alignment_terms_match_numpy():
    rng = np.random.default_rng(0)
    a, b, w = rng.normal(size=(5, 4)), rng.normal(size=(5, 4)), rng.uniform(0.2, 3.0, size=5)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    ta, tb, tw = (torch.tensor(x, dtype=torch.float32) for x in (a, b, w))
    assert math.isclose(float(weighted_mean(cosine_distances(ta, tb), tw)), float((w * (2 - 2 * cos)).sum() / w.sum()), rel_tol=1e-5)
    assert math.isclose(float(weighted_mean(squared_errors(ta, tb), tw)), float((w * ((a - b) ** 2).mean(1)).sum() / w.sum()), rel_tol=1e-5)
    # equal weights are the plain mean
    assert math.isclose(float(weighted_mean(cosine_distances(ta, tb), torch.full((5,), 2.0))),
                        float(weighted_mean(cosine_distances(ta, tb), None)), rel_tol=1e-6)


def test_focus_weights_by_hand():
    """d = 1, 2, 3, 6: gamma 1 gives d / 3 and the weighted mean sum(d^2) / sum(d) = 50 / 12; gamma 2 gives d^2 / 12.5;
    gamma 0 and an all-zero batch weigh every image 1."""
    d = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert torch.allclose(focus_weights(d, 1.0), d / 3)
    assert math.isclose(float(weighted_mean(d, focus_weights(d, 1.0))), 50 / 12, rel_tol=1e-6)
    assert torch.allclose(focus_weights(d, 2.0), d**2 / 12.5)
    assert torch.equal(focus_weights(d, 0.0), torch.ones(4))
    assert torch.equal(focus_weights(torch.zeros(3), 2.0), torch.ones(3))


def test_focus_weights_are_constants_of_the_gradient():
    """The weights are detached: d(sum w d / sum w) / d d_i = w_i / sum(w), not the gradient of sum(d^3) / sum(d^2)."""
    rng = np.random.default_rng(1)
    d = torch.tensor(rng.uniform(0.1, 2.0, size=6), dtype=torch.float32, requires_grad=True)
    weighted_mean(d, focus_weights(d, 2.0)).backward()
    w = d.detach().numpy() ** 2
    assert np.allclose(d.grad.numpy(), w / w.sum(), rtol=1e-5)


def _ekd_parts():
    """A seeded test_resnet student and teacher, a 3-class balanced softmax and a batch of 4 images."""
    torch.manual_seed(0)
    student, preprocess = create_student(StudentOptions("test_resnet", image_size=32), 3)
    teacher = Teacher(timm.create_model("test_resnet", num_classes=0), Preprocess(32, (0.5,) * 3, (0.5,) * 3), "test_resnet")
    sup = SupervisedLoss("balanced_softmax", [6, 3, 1])
    return student, preprocess, teacher, sup, torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 2])


def test_balanced_align_weights_reach_the_ekd_step():
    """method ekd with align_weights balanced: its kd part is the class-weighted mean of the per-image distances."""
    student, preprocess, teacher, sup, images, labels = _ekd_parts()
    parts, distances = {}, {}
    for weights in ("none", "balanced"):
        method = build_method(MethodConfig(name="ekd", align_weights=weights), student, preprocess, sup, teacher, None)
        method.eval()  # BatchNorm in eval mode: the same features for both
        with torch.no_grad():
            features, _ = method.student_forward(images)
            projected, _ = method.heads(features)
            distances[weights] = 2 - 2 * torch.nn.functional.cosine_similarity(projected, teacher(images), dim=1)
            _, parts[weights] = method.step(images, labels, 0)
    w = class_balanced_weights(sup.log_prior, labels)
    assert math.isclose(float(parts["none"]["kd"]), float(distances["none"].mean()), rel_tol=1e-5)
    balanced = distances["balanced"]
    assert math.isclose(float(parts["balanced"]["kd"]), float((w * balanced).sum() / w.sum()), rel_tol=1e-5)
    assert not math.isclose(float(balanced.mean()), float((w * balanced).sum() / w.sum()), rel_tol=1e-4)


@pytest.mark.parametrize("name", ["kd", "ekd", "fopro"])
@pytest.mark.parametrize("align_weights", ["none", "balanced"])
def test_align_focus_reaches_the_step(name, align_weights, monkeypatch):
    """--align-focus 2: the step hands focus_weights its per-image distances (MSE for kd, 2 - 2 cos otherwise, checked
    with numpy from the same projections) and gamma, and its kd part is the mean weighted by what focus_weights
    returns (times 1 / (C p_y) with balanced weights). At initialisation the distances are all near 2, so
    focus_weights is replaced by fixed weights to make the weighting visible."""
    student, preprocess, teacher, sup, images, labels = _ekd_parts()
    fpg = FourierPromptGenerator(32, strength=0.5) if name == "fopro" else None
    method = build_method(MethodConfig(name=name, align_weights=align_weights, align_focus=2.0), student, preprocess, sup, teacher, fpg)
    method.eval()
    with torch.no_grad():
        inputs = fpg(images)[0] if fpg is not None else images
        projected, _ = method.heads(method.student_forward(inputs)[0])
        p, z = projected.double().numpy(), teacher(inputs).double().numpy()
    if name == "kd":
        d = ((p - z) ** 2).mean(1)
    else:
        d = 2 - 2 * (p * z).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(z, axis=1))
    fixed = torch.tensor([4.0, 0.0, 1.0, 0.5])
    calls = []
    monkeypatch.setattr("fopro.methods.focus_weights", lambda distances, power: calls.append((distances.detach().double().numpy(), power)) or fixed)
    _, parts = method.step(images, labels, 1)
    assert len(calls) == 1 and calls[0][1] == 2.0 and np.allclose(calls[0][0], d, rtol=1e-5)
    w = fixed.double().numpy() * (class_balanced_weights(sup.log_prior, labels).double().numpy() if align_weights == "balanced" else 1.0)
    assert math.isclose(float(parts["kd"]), float((w * d).sum() / w.sum()), rel_tol=1e-5)


def test_ekd_without_second_head_is_supervision_plus_alignment():
    """second_head False (--no-second-head): no fc_t, no sup_t part, loss = L_sup(fc(f)) + lambda * (2 - 2 cos)."""
    student, preprocess, teacher, sup, images, labels = _ekd_parts()
    with_head = build_method(MethodConfig(name="ekd"), student, preprocess, sup, teacher, None)
    without = build_method(MethodConfig(name="ekd", ekd_weight=2.0, second_head=False), student, preprocess, sup, teacher, None)
    assert with_head.heads.fc_t is not None and without.heads.fc_t is None
    without.eval()
    with torch.no_grad():
        features, logits = without.student_forward(images)
        projected, second_logits = without.heads(features)
        loss, parts = without.step(images, labels, 0)
    assert second_logits is None and set(parts) == {"sup", "kd"}
    distance = (2 - 2 * torch.nn.functional.cosine_similarity(projected, teacher(images), dim=1)).mean()
    assert math.isclose(float(parts["kd"]), float(distance), rel_tol=1e-5)
    assert math.isclose(float(loss), float(sup(logits, labels) + 2.0 * distance), rel_tol=1e-5)
