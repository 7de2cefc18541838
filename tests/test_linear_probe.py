"""The teacher probe (fopro.linear_probe): a balanced-softmax linear classifier on frozen teacher embeddings,
checked against scikit-learn on Gaussian blobs, for determinism and for its long-tail correction; the
end-to-end teacher_probe with a tiny random teacher, and `fopro probe`'s linear_probe in probe.json."""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fopro.cli import app
from fopro.data import DataOptions, checked_dataset, load_splits, resolve_augment
from fopro.errors import FoproError
from fopro.linear_probe import (
    LinearProbe,
    LinearProbeOptions,
    embed,
    fit_linear_probe,
    teacher_probe,
)
from fopro.metrics import LongTailGroups, compute_metrics
from fopro.models.teacher import TeacherOptions, load_teacher
from fopro.probe.file import band_gains_from_probe, read_probe_json
from fopro.probe.frequency import run_probe
from fopro.probe.options import ProbeOptions

S = 32


def blobs(counts, seed, dim=16, sep=3.0, spread=1.0, centres_seed=0):
    """Gaussian blobs, one per class (centres drawn from ``centres_seed``), ``counts[c]`` points each."""
    centres = np.random.default_rng(centres_seed).normal(0, sep, (len(counts), dim)) + 5.0
    rng = np.random.default_rng([seed, 1])
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return (centres[labels] + rng.normal(0, spread, (len(labels), dim))).astype(np.float32), labels


def tail_recall(probe: LinearProbe, x, y, counts, tail_threshold) -> float:
    report = compute_metrics(y, probe.predict_proba(x), [f"c{c}" for c in range(len(counts))], counts,
                             groups=LongTailGroups(head=100, tail=tail_threshold))
    return report["tail_recall"]


# ------------------------------------------------------------------------------------------ the classifier


def test_separable_blobs_match_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    counts = [120, 60, 30, 15, 8, 5]
    x, y = blobs(counts, seed=0, sep=1.5, spread=1.0)
    x_test, y_test = blobs([40] * len(counts), seed=1, sep=1.5, spread=1.0)
    probe = fit_linear_probe(x, y, counts, LinearProbeOptions())  # the defaults, as `fopro probe` uses them
    ours = balanced_accuracy_score(y_test, probe.predict_proba(x_test).argmax(axis=1))
    reference = LogisticRegression(class_weight="balanced", max_iter=5000).fit(x, y).predict(x_test)
    theirs = balanced_accuracy_score(y_test, reference)
    assert ours >= 0.9, ours
    assert abs(ours - theirs) <= 0.05, (ours, theirs)


def test_equal_counts_give_sklearns_l2_logistic_regression():
    """With equal counts balanced softmax is cross-entropy, and mean loss + l2/2 ||W||^2 is scikit-learn's
    multinomial LogisticRegression with C = 1 / (l2 N) (sum of losses + ||W||^2 / 2, intercept not penalised):
    the same convex problem, so the same probabilities at the optimum."""
    from sklearn.linear_model import LogisticRegression

    counts = [50, 50, 50]
    x, y = blobs(counts, seed=12, dim=6, sep=1.0, spread=1.5)
    for l2 in (0.01, 1.0):
        probe = fit_linear_probe(x, y, counts, LinearProbeOptions(l2_grid=(l2,)))
        standardised = probe.standardise(torch.from_numpy(x)).numpy().astype(np.float64)
        reference = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(standardised, y)
        np.testing.assert_allclose(probe.predict_proba(x), reference.predict_proba(standardised), atol=2e-4)
        assert probe.l2 == l2 and probe.selection == {}


def test_deterministic_and_the_global_rng_untouched():
    counts = [40, 20, 6]
    x, y = blobs(counts, seed=2, dim=8)
    state = torch.get_rng_state()
    first = fit_linear_probe(x, y, counts)
    second = fit_linear_probe(torch.from_numpy(x), y.tolist(), counts)
    assert torch.equal(torch.get_rng_state(), state)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    torch.testing.assert_close(first.mean, torch.from_numpy(x).mean(dim=0))  # standardisation: data only
    assert not first.training and not any(p.requires_grad for p in first.parameters())


def test_the_l2_weight_is_chosen_on_the_selection_split():
    from sklearn.metrics import balanced_accuracy_score

    counts = [200, 100, 30, 8, 5]
    x, y = blobs(counts, seed=13, dim=32, sep=0.7, spread=1.5)
    x_val, y_val = blobs([40] * len(counts), seed=14, dim=32, sep=0.7, spread=1.5)
    grid = (0.001, 0.1, 10.0)
    probe = fit_linear_probe(x, y, counts, LinearProbeOptions(l2_grid=grid), select=(x_val, y_val))
    alone = {l2: fit_linear_probe(x, y, counts, LinearProbeOptions(l2_grid=(l2,))) for l2 in grid}  # each from zero
    scores = {l2: balanced_accuracy_score(y_val, p.predict_proba(x_val).argmax(axis=1)) for l2, p in alone.items()}
    assert probe.selection == pytest.approx(scores, abs=1 / 40)  # warm starts reach the same optima
    assert len(set(scores.values())) > 1, scores  # the grid matters on these blobs
    assert probe.l2 == max(grid, key=lambda l2: (probe.selection[l2], l2))
    np.testing.assert_allclose(probe.predict_proba(x_val), alone[probe.l2].predict_proba(x_val), atol=1e-3)


def test_balanced_softmax_lifts_the_tail_over_plain_cross_entropy():
    counts = [300, 200, 100, 10, 5]  # classes 3 and 4 are tail (< 20)
    x, y = blobs(counts, seed=5, sep=0.8, spread=1.5)
    x_test, y_test = blobs([60] * len(counts), seed=6, sep=0.8, spread=1.5)
    balanced = fit_linear_probe(x, y, counts, LinearProbeOptions())
    # with equal counts the log prior is constant: balanced softmax is then plain cross-entropy
    plain = fit_linear_probe(x, y, [1] * len(counts), LinearProbeOptions())
    ours, ce = tail_recall(balanced, x_test, y_test, counts, 20), tail_recall(plain, x_test, y_test, counts, 20)
    assert ours >= ce + 0.3, (ours, ce)
    # the shift acts through the prior: the balanced probe predicts the tail classes more often
    predicted_tail = lambda probe: np.isin(probe.predict_proba(x_test).argmax(axis=1), [3, 4]).mean()  # noqa: E731
    assert predicted_tail(balanced) > predicted_tail(plain)


def test_predict_proba_is_a_softmax():
    counts = [10, 5]
    x, y = blobs(counts, seed=7, dim=4)
    probe = fit_linear_probe(x, y, counts, LinearProbeOptions(max_iter=5))
    probs = probe.predict_proba(x)
    assert probs.shape == (15, 2) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    logits = probe(torch.from_numpy(x)).double()
    np.testing.assert_allclose(probs, torch.softmax(logits, dim=1).numpy(), atol=1e-6)
    with pytest.raises(FoproError, match=r"\(N, 4\)"):
        probe.predict_proba(x[:, :3])
    untrained = LinearProbe(4, 3)  # zero weights: uniform, and no draw from the global RNG
    np.testing.assert_allclose(untrained.predict_proba(x), 1 / 3)


@pytest.mark.parametrize("changes,option", [
    ({"views": 0}, "--linear-views"), ({"views": 1.5}, "--linear-views"), ({"views": True}, "--linear-views"),
    ({"l2_grid": (-1e-4,)}, "l2_grid"), ({"l2_grid": (float("nan"),)}, "l2_grid"), ({"l2_grid": ()}, "l2_grid"),
    ({"max_iter": 0}, "max_iter"),
])
def test_bad_options(changes, option):
    from helpers import one_line

    with pytest.raises(FoproError) as info:
        LinearProbeOptions(**changes)
    one_line(info, option)


def test_bad_training_data():
    x, y = blobs([5, 5], seed=9, dim=3)
    with pytest.raises(FoproError, match="one label per row"):
        fit_linear_probe(x, y[:-1], [5, 5])
    with pytest.raises(FoproError, match="outside 0..1"):
        fit_linear_probe(x, y + 1, [5, 5])
    with pytest.raises(FoproError, match="at least one training image"):
        fit_linear_probe(x, y, [10, 0])
    x[0, 0] = np.nan
    with pytest.raises(FoproError, match="NaN"):
        fit_linear_probe(x, y, [5, 5])


# ------------------------------------------------------------------------------------------ with a teacher


@pytest.fixture(scope="module")
def tiny(distill_data, distill_teacher):
    """The tiny synthetic data (4 classes, 32 px), its splits and the random `test_resnet` teacher."""
    teacher, _ = load_teacher(TeacherOptions(str(distill_teacher)), S)
    splits = load_splits(DataOptions(data=distill_data))
    return splits, teacher


def _train_set(splits, preset="standard"):
    return checked_dataset(splits["train"], S, False, train=True, seed=0, augment_config=resolve_augment(preset))


def test_embed_is_the_teacher_on_the_raw_images(tiny):
    splits, teacher = tiny
    dataset = checked_dataset(splits["val"], S, False)
    calls = []
    out = embed(teacher, dataset, batch_size=5, device="cpu", progress=lambda *args: calls.append(args))
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert out.shape == (len(dataset), teacher.embed_dim)
    with torch.no_grad():
        direct = teacher(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    torch.testing.assert_close(out, direct, atol=1e-5, rtol=1e-5)
    assert calls[-1][1:] == (len(dataset), len(dataset)) and len(calls) == -(-len(dataset) // 5)


def test_teacher_probe_end_to_end(tiny):
    splits, teacher = tiny
    train_set = _train_set(splits)
    eval_sets = {split: checked_dataset(splits[split], S, False) for split in ("val", "test")}
    counts = splits["train"].class_counts()
    options = LinearProbeOptions(views=2)
    result = teacher_probe(teacher, train_set, eval_sets, splits.classes, counts, LongTailGroups(head=100, tail=20), options, "cpu")
    assert set(result) == {"options", "train_images", "views", "embed_dim", "l2", "splits"}
    assert result["train_images"] == len(splits["train"]) == 31 and result["views"] == 2
    assert result["embed_dim"] == teacher.embed_dim and result["options"]["views"] == 2
    assert json.loads(json.dumps(result)) == result
    assert train_set.epoch == 0  # restored after the views
    # each view is a different augmentation of the same images
    views = []
    for view in range(2):
        train_set.set_epoch(view)
        views.append(embed(teacher, train_set, 64, "cpu"))  # teacher_probe's embed_batch_size: the same sums
    train_set.set_epoch(0)
    assert not torch.allclose(views[0], views[1])
    # the reports are compute_metrics on the probe's own predictions
    labels = np.tile(np.asarray(splits["train"].labels), 2)
    probe = fit_linear_probe(torch.cat(views), labels, counts, options)
    for split, dataset in eval_sets.items():
        report = result["splits"][split]
        expected = compute_metrics(np.asarray(dataset.manifest.labels), probe.predict_proba(embed(teacher, dataset, 64, "cpu")),
                                   splits.classes, counts, LongTailGroups(head=100, tail=20))
        assert report == expected
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert 0.0 <= report[key] <= 1.0
        assert report["groups"]["tail"]["classes"] and 0.0 <= report["tail_recall"] <= 1.0
        assert report["num_samples"] == len(dataset)


def test_teacher_probe_views_need_augmentation(tiny):
    splits, teacher = tiny
    counts = splits["train"].class_counts()
    val = {"val": checked_dataset(splits["val"], S, False)}
    for plain in (checked_dataset(splits["train"], S, False), _train_set(splits, "none")):
        with pytest.raises(FoproError, match="--linear-views 2"):
            teacher_probe(teacher, plain, val, splits.classes, counts, options=LinearProbeOptions(views=2), device="cpu")
    one = teacher_probe(teacher, checked_dataset(splits["train"], S, False), val, splits.classes, counts,
                        options=LinearProbeOptions(views=1), device="cpu")
    assert one["views"] == 1 and set(one["splits"]) == {"val"}
    with pytest.raises(FoproError, match="one count per class"):
        teacher_probe(teacher, _train_set(splits), val, splits.classes, counts[:-1], device="cpu")


# ------------------------------------------------------------------------------------------ fopro probe


def _probe_args(data, teacher, out, *extra):
    return ["probe", "--teacher", str(teacher), "--data", str(data), "--bands", "2", "--gains", "0", "--per-class", "4",
            "--device", "cpu", "--out", str(out), *extra]


def test_cli_writes_the_linear_probe(distill_data, distill_teacher, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*_probe_args(distill_data, distill_teacher, out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    data = json.loads((out / "probe.json").read_text())
    assert data == printed
    linear = data["linear_probe"]
    assert linear["trained_on"] == "train" and linear["evaluated_on"] == "val"
    assert linear["views"] == 4 and linear["train_images"] == 31 and linear["augment"] == "standard"
    assert linear["num_images"] == 16  # the whole val split, not the --per-class selection
    assert linear["options"]["views"] == 4 and linear["l2"] in linear["options"]["l2_grid"]
    for key in ("balanced_accuracy", "tail_recall", "macro_f1", "accuracy"):
        assert 0.0 <= linear[key] <= 1.0, key
    assert set(linear["group_recall"]) == {"head", "medium", "tail"}
    assert set(linear["per_class_recall"]) == set(data["class_names"])
    assert linear["balanced_accuracy"] == linear["metrics"]["balanced_accuracy"]
    assert linear["tail_classes"] == data["tail"]["classes"]
    # readers of probe.json still work, with and without the new key
    assert read_probe_json(out / "probe.json")["linear_probe"]["views"] == 4
    gains = band_gains_from_probe(out / "probe.json")
    del data["linear_probe"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert band_gains_from_probe(tmp_path / "old.json") == gains
    shown = CliRunner().invoke(app, _probe_args(distill_data, distill_teacher, tmp_path / "shown"))
    assert shown.exit_code == 0, shown.output
    line = (f"linear probe (trained on train, 4 augmented views): val balanced accuracy "
            f"{100 * linear['balanced_accuracy']:.1f}%, tail recall {100 * linear['tail_recall']:.1f}%")
    assert line in " ".join(shown.stdout.split())


def test_cli_no_linear_and_options(distill_data, distill_teacher, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*_probe_args(distill_data, distill_teacher, out, "--no-linear"), "--json"])
    assert result.exit_code == 0, result.output
    assert "linear_probe" not in json.loads((out / "probe.json").read_text())
    assert not any("linear probe" in note for note in json.loads(result.stdout)["notes"])
    one = CliRunner().invoke(app, [*_probe_args(distill_data, distill_teacher, tmp_path / "one", "--linear-views", "1",
                                                "--augment", "dermoscopy"), "--json"])
    assert one.exit_code == 0, one.output
    linear = json.loads(one.stdout)["linear_probe"]
    assert linear["views"] == 1 and linear["augment"] == "dermoscopy" and linear["augmentation"]["rot90"] is True


@pytest.mark.parametrize("args,fragment", [
    (["--linear-views", "0"], "--linear-views"), (["--linear-views", "-3"], "--linear-views"),
    (["--augment", "sideways"], "--augment"),
])
def test_cli_bad_linear_options(distill_data, distill_teacher, tmp_path, args, fragment):
    result = CliRunner().invoke(app, _probe_args(distill_data, distill_teacher, tmp_path / "out", *args))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fragment in result.stderr
    assert not (tmp_path / "out" / "probe.json").exists()


def test_no_linear_probe_without_a_train_split_or_on_train(distill_data, distill_teacher, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(distill_data / "val", root / "val")
    options = ProbeOptions(bands=1, gains="0", per_class=4, device="cpu")
    result = run_probe(TeacherOptions(str(distill_teacher)), DataOptions(data=root), options)
    assert "linear_probe" not in result
    assert any("no train split: no linear probe" in note for note in result["notes"])
    on_train = run_probe(TeacherOptions(str(distill_teacher)), DataOptions(data=distill_data),
                         ProbeOptions(split="train", bands=1, gains="0", per_class=4, device="cpu"))
    assert "linear_probe" not in on_train
    assert any("--split train" in note and "linear probe" in note for note in on_train["notes"])


def test_augment_none_uses_one_view(distill_data, distill_teacher):
    options = ProbeOptions(bands=1, gains="0", per_class=4, device="cpu", augment="none")
    result = run_probe(TeacherOptions(str(distill_teacher)), DataOptions(data=distill_data), options)
    assert result["linear_probe"]["views"] == 1
    assert any("--augment none" in note and "1 view" in note for note in result["notes"])
