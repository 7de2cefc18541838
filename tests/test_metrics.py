"""fopro.metrics against scikit-learn, plus hand-checked ECE, groups, JSON safety, errors and the confusion plot."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from fopro.errors import FoproError
from fopro.metrics import LongTailGroups, average_ranks, compute_metrics, confusion_matrix, expected_calibration_error
from fopro.plots import plot_confusion

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# sklearn warns when a single label appears in y_true and y_pred (the single-class case is on purpose)
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")


# ----------------------------------------------------------------------------- helpers


def _names(num_classes: int) -> list[str]:
    return [f"c{i}" for i in range(num_classes)]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(2, 9))
    n = int(rng.integers(30, 200))
    labels = rng.integers(0, num_classes, size=n)
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels]
    return labels, _softmax(logits)


def _approx(value: float | None, expected: float) -> None:
    assert value is not None
    assert value == pytest.approx(float(expected), abs=1e-10)


def _sk_kappa(labels: np.ndarray, preds: np.ndarray) -> float | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = skm.cohen_kappa_score(labels, preds)
    return None if math.isnan(value) else value


def _reference_ece(labels: np.ndarray, probs: np.ndarray, num_bins: int) -> float:
    """The textbook loop: bins (lo, hi], confidence 0 in the first bin."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    total = 0.0
    for b in range(num_bins):
        lo, hi = edges[b], edges[b + 1]
        mask = (conf > lo) & (conf <= hi) if b > 0 else (conf >= lo) & (conf <= hi)
        if mask.any():
            total += abs(correct[mask].mean() - conf[mask].mean()) * mask.sum()
    return total / len(labels)


def check_against_sklearn(labels: np.ndarray, probs: np.ndarray, multiclass_auc: bool = True) -> dict:
    """Compare every metric of compute_metrics with scikit-learn; return the result."""
    labels = np.asarray(labels)
    num_classes = probs.shape[1]
    all_classes = list(range(num_classes))
    result = compute_metrics(labels, probs, _names(num_classes))
    json.dumps(result, allow_nan=False)  # never NaN, only plain JSON types

    preds = probs.argmax(axis=1)
    present = np.unique(labels)
    support = np.bincount(labels, minlength=num_classes)
    predicted = np.bincount(preds, minlength=num_classes)

    assert result["num_samples"] == len(labels)
    assert result["num_classes"] == num_classes
    assert result["class_names"] == _names(num_classes)
    _approx(result["accuracy"], skm.accuracy_score(labels, preds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _approx(result["balanced_accuracy"], skm.balanced_accuracy_score(labels, preds))
    _approx(result["macro_f1"], skm.f1_score(labels, preds, labels=present, average="macro", zero_division=0))
    _approx(result["mcc"], skm.matthews_corrcoef(labels, preds))
    sk_kappa = _sk_kappa(labels, preds)
    if sk_kappa is None:
        assert result["kappa"] is None
    else:
        _approx(result["kappa"], sk_kappa)

    sk_cm = skm.confusion_matrix(labels, preds, labels=all_classes)
    assert result["confusion_matrix"] == sk_cm.tolist()
    np.testing.assert_array_equal(confusion_matrix(labels, preds, num_classes), sk_cm)
    for c, row in enumerate(result["confusion_matrix_normalized"]):
        if support[c] == 0:
            assert row == [None] * num_classes
        else:
            np.testing.assert_allclose(row, sk_cm[c] / sk_cm[c].sum(), atol=1e-12)

    sk_precision = skm.precision_score(labels, preds, labels=all_classes, average=None, zero_division=0)
    sk_recall = skm.recall_score(labels, preds, labels=all_classes, average=None, zero_division=0)
    sk_f1 = skm.f1_score(labels, preds, labels=all_classes, average=None, zero_division=0)
    sk_aucs: list[float | None] = []
    for c, entry in enumerate(result["per_class"]):
        assert entry["name"] == f"c{c}" and entry["index"] == c and entry["train_count"] is None
        assert entry["support"] == support[c] and entry["predicted"] == predicted[c]
        if predicted[c] == 0:
            assert entry["precision"] is None
        else:
            _approx(entry["precision"], sk_precision[c])
        if support[c] == 0:
            assert entry["recall"] is None and entry["f1"] is None
        else:
            _approx(entry["recall"], sk_recall[c])
            _approx(entry["f1"], sk_f1[c])
        if support[c] == len(labels):
            assert entry["specificity"] is None
        else:
            _approx(entry["specificity"], skm.recall_score(labels != c, preds != c))
        if 0 < support[c] < len(labels):
            sk_auc = skm.roc_auc_score(labels == c, probs[:, c])
            _approx(entry["auc"], sk_auc)
            sk_aucs.append(sk_auc)
        else:
            assert entry["auc"] is None
    if sk_aucs:
        _approx(result["macro_auc"], np.mean(sk_aucs))
    else:
        assert result["macro_auc"] is None
    if multiclass_auc and len(present) == num_classes:
        if num_classes == 2:
            _approx(result["macro_auc"], skm.roc_auc_score(labels, probs[:, 1]))
        else:
            _approx(result["macro_auc"], skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))

    _approx(result["ece"], _reference_ece(labels, probs, 15))
    assert result["groups"] is None and result["tail_recall"] is None
    assert "no training counts: head/medium/tail groups skipped" in result["notes"]
    return result


# ----------------------------------------------------------------------------- against scikit-learn


@pytest.mark.parametrize("seed", range(8))
def test_random_inputs_match_sklearn(seed: int) -> None:
    labels, probs = _random_case(seed)
    check_against_sklearn(labels, probs)


def test_rounded_probabilities_with_many_ties() -> None:
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 4, size=150)
    probs = np.round(_softmax(rng.normal(size=(150, 4)) + np.eye(4)[labels]), 1)
    check_against_sklearn(labels, probs, multiclass_auc=False)  # rounded rows no longer sum to 1


def test_tied_rows_drawn_from_a_small_set_match_multiclass_auc() -> None:
    rng = np.random.default_rng(12)
    palette = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    probs = palette[rng.integers(0, len(palette), size=120)]
    labels = rng.integers(0, 3, size=120)
    check_against_sklearn(labels, probs)


def test_average_ranks_handle_ties() -> None:
    np.testing.assert_allclose(average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4.0, 1.0, 4.0, 2.0, 4.0])


def test_class_absent_from_labels() -> None:
    rng = np.random.default_rng(3)
    labels = rng.choice([0, 1, 3], size=80)
    probs = _softmax(rng.normal(size=(80, 4)) + np.eye(4)[labels])
    result = check_against_sklearn(labels, probs)
    absent = result["per_class"][2]
    assert absent["support"] == 0 and absent["recall"] is None and absent["f1"] is None and absent["auc"] is None
    assert any("class 'c2' is absent from the evaluated set" in note for note in result["notes"])


def test_class_never_predicted() -> None:
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, size=90)
    probs = _softmax(rng.normal(size=(90, 4)) + 2 * np.eye(4)[labels])
    probs[:, 1] = 0.0
    probs /= probs.sum(axis=1, keepdims=True)
    result = check_against_sklearn(labels, probs)
    never = result["per_class"][1]
    assert never["predicted"] == 0 and never["precision"] is None
    assert never["support"] > 0 and never["f1"] == 0.0 and never["recall"] == 0.0
    assert any(note.startswith("class 'c1' was never predicted") for note in result["notes"])


@pytest.mark.parametrize("all_correct", [True, False])
def test_single_class_evaluated_set(all_correct: bool) -> None:
    rng = np.random.default_rng(5)
    labels = np.zeros(20, dtype=int)
    probs = _softmax(rng.normal(size=(20, 3)) + (5.0 if all_correct else 0.5) * np.eye(3)[labels])
    result = check_against_sklearn(labels, probs)
    assert result["macro_auc"] is None
    assert result["mcc"] == 0.0
    if all_correct:
        assert result["kappa"] is None
    assert any(note.startswith("single class in the evaluated set") for note in result["notes"])


def test_perfect_predictions() -> None:
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 3])
    probs = np.full((9, 4), 0.1)
    probs[np.arange(9), labels] = 0.7
    result = check_against_sklearn(labels, probs)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "mcc", "kappa"):
        assert result[key] == pytest.approx(1.0)
    assert result["ece"] == pytest.approx(0.3)


# ----------------------------------------------------------------------------- ECE by hand


def test_ece_hand_example() -> None:
    probs = np.array(
        [
            [0.9, 0.05, 0.05],  # conf 0.9, correct -> bin (0.8, 1.0]
            [0.7, 0.2, 0.1],  # conf 0.7, wrong -> bin (0.6, 0.8]
            [0.3, 0.28, 0.28],  # conf 0.3, correct -> bin (0.2, 0.4]
            [0.28, 0.28, 0.3],  # conf 0.3, correct -> bin (0.2, 0.4]
        ]
    )
    labels = np.array([0, 1, 0, 2])
    # bins of width 0.2: (|1-0.9|*1 + |0-0.7|*1 + |1-0.3|*2) / 4 = (0.1 + 0.7 + 1.4) / 4
    assert expected_calibration_error(labels, probs, num_bins=5) == pytest.approx(0.55)
    assert compute_metrics(labels, probs, ["a", "b", "c"], ece_bins=5)["ece"] == pytest.approx(0.55)


def test_ece_bin_edges_are_right_closed() -> None:
    probs = np.array([[0.5, 0.5], [0.75, 0.25]])
    labels = np.array([0, 1])
    # 0.5 falls in (0, 0.5], 0.75 in (0.5, 1]: (|1-0.5| + |0-0.75|) / 2
    assert expected_calibration_error(labels, probs, num_bins=2) == pytest.approx(0.625)


# ----------------------------------------------------------------------------- groups


def test_head_medium_tail_groups() -> None:
    names = ["A", "B", "C", "D"]
    labels = np.array([0, 0, 1, 1, 3, 3])
    preds = np.array([0, 0, 1, 0, 1, 0])
    probs = np.full((6, 4), 0.1)
    probs[np.arange(6), preds] = 0.7
    result = compute_metrics(labels, probs, names, train_counts=[500, 100, 20, 5])
    json.dumps(result, allow_nan=False)
    groups = result["groups"]
    assert groups["head"] == {"classes": ["A"], "mean_recall": 1.0, "definition": "train_count > 100"}
    # C is absent from the evaluated set: only B's recall (0.5) counts
    assert groups["medium"] == {"classes": ["B", "C"], "mean_recall": 0.5, "definition": "20 <= train_count <= 100"}
    assert groups["tail"] == {"classes": ["D"], "mean_recall": 0.0, "definition": "train_count < 20"}
    assert result["tail_recall"] == 0.0
    assert [entry["train_count"] for entry in result["per_class"]] == [500, 100, 20, 5]
    assert result["balanced_accuracy"] == pytest.approx(0.5)


def test_groups_custom_thresholds_and_empty_group() -> None:
    labels = np.array([0, 1, 2])
    probs = np.eye(3)
    result = compute_metrics(labels, probs, ["a", "b", "c"], train_counts=[50, 40, 30], groups=LongTailGroups(head=45, tail=10))
    assert result["groups"]["head"]["classes"] == ["a"]
    assert result["groups"]["medium"]["classes"] == ["b", "c"]
    assert result["groups"]["tail"] == {"classes": [], "mean_recall": None, "definition": "train_count < 10"}
    assert result["tail_recall"] is None
    assert any("group 'tail'" in note for note in result["notes"])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("labels", "probs", "names", "message"),
    [
        (np.array([], dtype=int), np.zeros((0, 3)), ["a", "b", "c"], "the evaluated set is empty"),
        (np.array([0, 1]), np.full((3, 2), 0.5), ["a", "b"], "shape mismatch"),
        (np.array([0, 1]), np.full((2, 2), 0.5), ["a", "b", "c"], "class names"),
        (np.array([0, 2]), np.full((2, 2), 0.5), ["a", "b"], "out of range"),
        (np.array([0, -1]), np.full((2, 2), 0.5), ["a", "b"], "out of range"),
        (np.array([0, 1]), np.full(2, 0.5), ["a", "b"], "2-D"),
        (np.array([0, 1]), np.array([[0.5, np.nan], [0.5, 0.5]]), ["a", "b"], "NaN"),
    ],
)
def test_invalid_inputs_raise(labels, probs, names, message) -> None:
    with pytest.raises(FoproError, match=message):
        compute_metrics(labels, probs, names)


def test_wrong_number_of_train_counts_raises() -> None:
    with pytest.raises(FoproError, match="training counts"):
        compute_metrics(np.array([0, 1]), np.eye(2), ["a", "b"], train_counts=[3])


# ----------------------------------------------------------------------------- plot


def test_plot_confusion_writes_png(tmp_path) -> None:
    matrix = [[5, 1, 0], [0, 0, 0], [2, 0, 7]]  # the middle class is absent: its row stays blank
    out = plot_confusion(matrix, ["akiec", "df", "nv"], tmp_path / "plots" / "confusion.png", title="test")
    assert out == tmp_path / "plots" / "confusion.png"
    data = out.read_bytes()
    assert len(data) > len(PNG_MAGIC) and data.startswith(PNG_MAGIC)
    assert [p.name for p in out.parent.iterdir()] == ["confusion.png"]  # no temporary file left


def test_plot_confusion_rejects_wrong_names(tmp_path) -> None:
    with pytest.raises(FoproError):
        plot_confusion(np.eye(2), ["a", "b", "c"], tmp_path / "cm.png")


# --- operating points and intervals (the clinical layer) ----------------------------------------------


def _binary_cases(count: int = 25):
    rng = np.random.default_rng(0)
    for _ in range(count):
        n = int(rng.integers(6, 80))
        positive = rng.random(n) < rng.uniform(0.05, 0.6)
        positive[0], positive[-1] = True, False
        scores = np.round(rng.random(n) * 0.5 + positive * rng.uniform(0, 0.5), int(rng.integers(1, 4)))  # ties too
        yield positive, scores


def test_average_precision_matches_sklearn() -> None:
    from sklearn.metrics import average_precision_score

    from fopro.operating_points import average_precision

    for positive, scores in _binary_cases():
        assert average_precision(positive, scores) == pytest.approx(average_precision_score(positive, scores), abs=1e-12)
    assert average_precision(np.zeros(4, dtype=bool), np.arange(4.0)) is None


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_sensitivity_at_specificity_matches_the_roc_curve(target: float) -> None:
    from sklearn.metrics import roc_curve

    from fopro.operating_points import sensitivity_at_specificity

    for positive, scores in _binary_cases():
        fpr, tpr, _ = roc_curve(positive, scores, drop_intermediate=False)
        point = sensitivity_at_specificity(positive, scores, target)
        assert point["sensitivity"] == pytest.approx(tpr[fpr <= 1 - target + 1e-12].max())
        if point["threshold"] is not None:  # the threshold gives exactly the numbers reported
            called = scores >= point["threshold"]
            assert point["sensitivity"] == pytest.approx(called[positive].mean())
            assert point["specificity"] == pytest.approx(1 - called[~positive].mean()) and point["specificity"] >= target


def _bootstrap_case():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(6), [80, 50, 30, 20, 12, 8])
    preds = np.where(rng.random(labels.size) < 0.7, labels, rng.integers(0, 6, labels.size))
    return labels, preds


def test_bootstrap_intervals_equal_a_straightforward_loop_on_the_same_resamples() -> None:
    from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

    from fopro.bootstrap import bootstrap_intervals, stratified_resamples

    labels, preds = _bootstrap_case()
    ours = bootstrap_intervals(labels, preds, 6, {"tail": [4, 5]}, resamples=150, seed=3)
    bacc, macro, tail, recall2 = [], [], [], []
    for index in stratified_resamples(labels, 150, seed=3):
        y, p = labels[index], preds[index]
        bacc.append(balanced_accuracy_score(y, p))
        macro.append(f1_score(y, p, average="macro", labels=range(6), zero_division=0))
        per_class = recall_score(y, p, average=None, labels=range(6), zero_division=0)
        tail.append(per_class[[4, 5]].mean())
        recall2.append(per_class[2])
    interval = lambda values: np.percentile(values, [2.5, 97.5]).tolist()  # noqa: E731
    assert ours["balanced_accuracy"] == pytest.approx(interval(bacc), abs=1e-12)
    assert ours["macro_f1"] == pytest.approx(interval(macro), abs=1e-12)
    assert ours["groups"]["tail"] == pytest.approx(interval(tail), abs=1e-12)
    assert ours["per_class"]["recall"][2] == pytest.approx(interval(recall2), abs=1e-12)


def test_bootstrap_interval_agrees_with_an_independent_resampler() -> None:
    """Another implementation (its own generator, per-class choice in a loop): the same interval within 0.5 points."""
    from sklearn.metrics import balanced_accuracy_score

    from fopro.bootstrap import bootstrap_intervals

    labels, preds = _bootstrap_case()
    rng = np.random.default_rng(1234)
    values = []
    for _ in range(4000):  # per class: the share of its resampled images predicted right, averaged over classes
        recalls = [(preds[rng.choice(np.flatnonzero(labels == c), size=int((labels == c).sum()))] == c).mean() for c in range(6)]
        values.append(np.mean(recalls))
    reference = np.percentile(values, [2.5, 97.5])
    ours = bootstrap_intervals(labels, preds, 6, resamples=4000, seed=0)["balanced_accuracy"]
    assert np.abs(np.asarray(ours) - reference).max() < 0.005
    point = balanced_accuracy_score(labels, preds)
    assert ours[0] < point < ours[1]


def test_compute_metrics_reports_operating_points_and_intervals() -> None:
    labels, preds = _bootstrap_case()
    probs = np.full((labels.size, 6), 0.02)
    probs[np.arange(labels.size), preds] = 0.9
    probs /= probs.sum(axis=1, keepdims=True)
    report = compute_metrics(labels, probs, [f"c{c}" for c in range(6)], train_counts=[500, 100, 50, 30, 10, 5],
                             bootstrap=200, seed=1)
    row = report["per_class"][5]
    assert [op["target_specificity"] for op in row["operating_points"]] == [0.9, 0.95]
    assert row["recall_ci"][0] <= row["recall"] <= row["recall_ci"][1]
    assert report["intervals"]["groups"]["tail"][0] <= report["tail_recall"] <= report["intervals"]["groups"]["tail"][1]
    assert json.loads(json.dumps(report)) == report
    assert compute_metrics(labels, probs, [f"c{c}" for c in range(6)])["intervals"] is None  # off by default


def test_thresholds_fitted_on_one_split_applied_to_another() -> None:
    from fopro.operating_points import apply_operating_points, fit_operating_points

    labels, preds = _bootstrap_case()
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(6), size=labels.size) * 0.5
    probs[np.arange(labels.size), preds] += 0.5
    names = [f"c{c}" for c in range(6)]
    fitted = fit_operating_points(labels, probs, names)
    stored = {name: [{"target_specificity": op["target_specificity"], "threshold": op["threshold"]} for op in ops] for name, ops in fitted.items()}
    same = apply_operating_points(labels, probs, names, stored)
    for name in names:  # on the split they were fitted on they give exactly the fitted numbers
        for got, want in zip(same[name], fitted[name]):
            assert got["sensitivity"] == pytest.approx(want["sensitivity"]) and got["specificity"] == pytest.approx(want["specificity"])
    other = apply_operating_points(labels[::-1], probs, names, stored)  # other labels: other numbers, same thresholds
    assert [op["threshold"] for op in other["c0"]] == [op["threshold"] for op in stored["c0"]]
