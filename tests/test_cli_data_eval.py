"""`fopro data info` and `fopro eval` through the Typer app: JSON output, tables, report files, exit codes."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
from typer.testing import CliRunner

from fopro.cli import app
from helpers import make_image_folder, tiny_checkpoint, truncate, write_csv, write_image

CLASSES = ["akiec", "bcc", "mel"]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "data"
    return make_image_folder(
        root,
        {
            "train": {"akiec": 3, "bcc": 6, "mel": 12},
            "val": {"akiec": 1, "bcc": 1, "mel": 1},
            "test": {"akiec": 4, "bcc": 4, "mel": 4},
        },
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    weights, _ = tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", CLASSES, train_counts=[3, 6, 12], seed=1)
    return weights


def _error_line(result) -> str:
    """The one-line error a failed command prints on stderr (no traceback)."""
    text = result.stderr.strip()
    assert "Traceback" not in result.output, result.output
    assert text.startswith("error:"), text
    assert len(text.splitlines()) == 1, text
    return text


# ------------------------------------------------------------------------------------------ data info


def test_data_info_json(runner: CliRunner, dataset: Path) -> None:
    result = runner.invoke(app, ["data", "info", "--data", str(dataset), "--json", "--head-threshold", "10",
                                 "--tail-threshold", "5"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)  # stdout holds exactly one JSON document
    assert info["splits"] == {
        "train": {"akiec": 3, "bcc": 6, "mel": 12},
        "val": {"akiec": 1, "bcc": 1, "mel": 1},
        "test": {"akiec": 4, "bcc": 4, "mel": 4},
    }
    assert info["classes"] == CLASSES
    assert info["imbalance_ratio"] == pytest.approx(0.25)
    assert info["groups"] == {"akiec": "tail", "bcc": "medium", "mel": "head"}
    assert result.stderr == ""


def test_data_info_options_reach_the_library(runner: CliRunner, dataset: Path) -> None:
    result = runner.invoke(app, ["data", "info", "--data", str(dataset), "--json", "--imbalance", "0.1",
                                 "--data-seed", "2", "--classes", "mel,bcc,akiec"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["classes"] == ["mel", "bcc", "akiec"]
    # 12 * 0.1 ** (i / 2): 12, 3, 1; val and test are not subsampled
    assert info["splits"]["train"] == {"mel": 12, "bcc": 3, "akiec": 1}
    assert info["splits"]["test"] == {"mel": 4, "bcc": 4, "akiec": 4}
    assert info["imbalance_applied"] == 0.1
    result = runner.invoke(app, ["data", "info", "--data", str(dataset), "--imbalance", "1.5"])
    assert result.exit_code == 2
    assert "--imbalance 1.5" in _error_line(result)


def test_data_info_csv(runner: CliRunner, tmp_path: Path) -> None:
    images = tmp_path / "images"
    for i in range(4):
        write_image(images / f"{i}.png", seed=i)
    train = write_csv(tmp_path / "train.csv", ["path", "dx"], [[f"{i}.png", str(i % 2)] for i in range(4)])
    result = runner.invoke(app, ["data", "info", "--train-csv", str(train), "--images", str(images),
                                 "--label-column", "dx", "--classes", "benign,malignant", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["splits"] == {"train": {"benign": 2, "malignant": 2}}


def test_data_info_table(runner: CliRunner, dataset: Path) -> None:
    result = runner.invoke(app, ["data", "info", "--data", str(dataset)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Images per class" in out
    for name in CLASSES + ["train", "val", "test", "total", "21", "imbalance ratio", "0.2500"]:
        assert name in out, name
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    # sorted by training count: the most frequent class first
    assert out.index("mel") < out.index("bcc") < out.index("akiec")


def test_data_info_missing_path(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = runner.invoke(app, ["data", "info", "--data", str(missing)])
    assert result.exit_code == 2
    assert "does not exist" in _error_line(result)
    assert str(missing) in result.stderr.replace("\n", "")
    assert result.stdout == ""


def test_data_info_without_data(runner: CliRunner) -> None:
    result = runner.invoke(app, ["data", "info"])
    assert result.exit_code == 2
    assert "no data given" in _error_line(result)


# ------------------------------------------------------------------------------------------ eval


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_eval_json_and_report_files(runner: CliRunner, dataset: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = runner.invoke(app, ["eval", str(checkpoint), "--data", str(dataset), "--json", "--out", str(out),
                                 "--device", "cpu", "--batch-size", "5", "--head-threshold", "10", "--tail-threshold", "5"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_samples"] == 12 and report["split"] == "test"
    assert report["class_names"] == CLASSES

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(report["accuracy"])
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "per_class", "groups", "confusion_matrix"):
        assert key in metrics, key
    assert [row["name"] for row in metrics["per_class"]] == CLASSES
    for row, count in zip(metrics["per_class"], [3, 6, 12]):
        assert {"name", "train_count", "support", "precision", "recall", "f1"} <= set(row)
        assert row["train_count"] == count and row["support"] == 4
    assert set(metrics["groups"]) == {"head", "medium", "tail"}
    assert metrics["groups"]["tail"]["classes"] == ["akiec"] and metrics["groups"]["head"]["classes"] == ["mel"]
    matrix = np.asarray(metrics["confusion_matrix"])
    assert matrix.shape == (3, 3) and matrix.sum(axis=1).tolist() == [4, 4, 4]

    per_class = _read_csv(out / "per_class.csv")
    assert [row["name"] for row in per_class] == CLASSES
    assert {"name", "train_count", "support", "precision", "recall", "f1"} <= set(per_class[0])
    # the clinical layer: intervals, average precision, sensitivity at the default specificities with thresholds
    assert report["intervals"]["resamples"] == 1000 and len(report["intervals"]["balanced_accuracy"]) == 2
    for row, csv_row in zip(report["per_class"], per_class):
        low, high = row["recall_ci"]
        assert low <= row["recall"] <= high and float(csv_row["recall_low"]) == pytest.approx(low)
        assert [op["target_specificity"] for op in row["operating_points"]] == [0.9, 0.95]
        assert row["average_precision"] is not None and "sensitivity_at_spec_0.95" in csv_row and "threshold_at_spec_0.9" in csv_row

    predictions = _read_csv(out / "predictions.csv")
    with open(out / "predictions.csv", encoding="utf-8") as handle:
        header = handle.readline().strip().split(",")
    assert header == ["image", "label", "pred"] + [f"prob_{c}" for c in CLASSES]
    assert len(predictions) == 12
    labels = [row["label"] for row in predictions]
    preds = [row["pred"] for row in predictions]
    for row in predictions:
        assert row["image"].split("/")[0] == row["label"]  # the ImageFolder class of the image
        probs = [float(row[f"prob_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert CLASSES[int(np.argmax(probs))] == row["pred"]
    assert report["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert report["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, preds))
    assert report["macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro", labels=CLASSES, zero_division=0))
    np.testing.assert_array_equal(
        matrix, np.array([[sum(1 for t, p in zip(labels, preds) if t == a and p == b) for b in CLASSES] for a in CLASSES])
    )
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "roc_pr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # one-vs-rest ROC and PR curves
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_eval_table_and_other_split(runner: CliRunner, dataset: Path, checkpoint: Path) -> None:
    result = runner.invoke(app, ["eval", str(checkpoint), "--data", str(dataset), "--split", "val", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for text in ("balanced accuracy", "Per class", "Confusion matrix", "val split, 3 images", "resamples"):
        assert text in result.stdout, text
    assert re.search(r"balanced accuracy \d+\.\d% \[\d+\.\d, \d+\.\d\]", result.stdout)  # with its interval


def test_eval_csv_with_index_labels(runner: CliRunner, tmp_path: Path, checkpoint: Path) -> None:
    """Labels given as indices map through the checkpoint's class names."""
    images = tmp_path / "images"
    rows = []
    for i in range(6):
        write_image(images / f"img{i}.jpg", seed=i, fmt="JPEG")
        rows.append([f"img{i}.jpg", str(i % 3)])
    test = write_csv(tmp_path / "test.csv", ["image", "label"], rows)
    result = runner.invoke(app, ["eval", str(checkpoint), "--test-csv", str(test), "--images", str(images), "--json",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [row["support"] for row in report["per_class"]] == [2, 2, 2]


def test_eval_missing_checkpoint(runner: CliRunner, dataset: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    result = runner.invoke(app, ["eval", str(missing), "--data", str(dataset), "--json"])
    assert result.exit_code == 2
    line = _error_line(result)
    assert "nope.safetensors" in line and "does not exist" in line
    assert result.stdout == ""


def test_eval_class_unknown_to_the_checkpoint(runner: CliRunner, tmp_path: Path, checkpoint: Path) -> None:
    root = make_image_folder(tmp_path / "other", {"test": {"akiec": 1, "mel": 1, "vasc": 2}})
    result = runner.invoke(app, ["eval", str(checkpoint), "--data", str(root), "--json"])
    assert result.exit_code == 2
    line = _error_line(result)
    assert "vasc" in line and "not among the classes" in line


def test_eval_checkpoint_with_fewer_test_classes_is_fine(runner: CliRunner, tmp_path: Path, checkpoint: Path) -> None:
    root = make_image_folder(tmp_path / "subset", {"test": {"bcc": 2, "mel": 1}})
    result = runner.invoke(app, ["eval", str(checkpoint), "--data", str(root), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [row["support"] for row in report["per_class"]] == [0, 2, 1]
    assert any("akiec" in note and "absent" in note for note in report["notes"])


def test_eval_empty_or_missing_test_split(runner: CliRunner, tmp_path: Path, checkpoint: Path) -> None:
    root = make_image_folder(tmp_path / "empty", {"train": {"akiec": 1, "bcc": 1, "mel": 1}})
    (root / "test" / "mel").mkdir(parents=True)
    result = runner.invoke(app, ["eval", str(checkpoint), "--data", str(root)])
    assert result.exit_code == 2
    assert "hold no images" in _error_line(result)

    (root / "test" / "mel").rmdir()
    (root / "test").rmdir()
    result = runner.invoke(app, ["eval", str(checkpoint), "--data", str(root), "--json"])
    assert result.exit_code == 2
    assert "test" in _error_line(result)

    header_only = write_csv(tmp_path / "test.csv", ["image", "label"], [])
    result = runner.invoke(app, ["eval", str(checkpoint), "--test-csv", str(header_only), "--images", str(tmp_path)])
    assert result.exit_code == 2
    assert "no rows" in _error_line(result)


def test_eval_bad_images(runner: CliRunner, tmp_path: Path, checkpoint: Path) -> None:
    root = make_image_folder(tmp_path / "bad", {"test": {"akiec": 2, "mel": 2}})
    broken = sorted((root / "test" / "mel").iterdir())[0]
    truncate(broken, 0.3)
    result = runner.invoke(app, ["eval", str(checkpoint), "--data", str(root), "--json"])
    assert result.exit_code == 2
    assert broken.name in _error_line(result)
    result = runner.invoke(app, ["eval", str(checkpoint), "--data", str(root), "--json", "--skip-bad-images",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_samples"] == 3
    assert any("skipped 1" in note for note in report["notes"])
    # every test image unreadable: nothing left to evaluate is a clear error, not a crash
    for path in (root / "test").rglob("*.png"):
        truncate(path, 0.3)
    result = runner.invoke(app, ["eval", str(checkpoint), "--data", str(root), "--json", "--skip-bad-images"])
    assert result.exit_code == 2, result.output
    assert "test" in _error_line(result)
