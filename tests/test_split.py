"""`fopro data split`: no patient / lesion on two sides, stratified counts as asked, the same files for the same
seed; K folds; the leakage check of `fopro data info`."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fopro.cli import app
from fopro.data import DataOptions
from fopro.data.split import SplitOptions, split_dataset
from fopro.data.summary import data_info
from fopro.errors import FoproError

CLASSES = {"nv": 400, "mel": 120, "bkl": 90, "bcc": 60, "akiec": 30, "vasc": 15, "df": 12}  # images, HAM10000-like


def ham_like(path: Path, seed: int = 0) -> Path:
    """A HAM10000-style metadata CSV: lesion_id, image_id, dx; 1 to 4 images per lesion."""
    rng = np.random.default_rng(seed)
    rows, lesion = [], 0
    for dx, images in CLASSES.items():
        left = images
        while left > 0:
            n = min(left, int(rng.integers(1, 5)))
            rows += [{"lesion_id": f"L{lesion:05d}", "image_id": f"ISIC_{len(rows) + i:07d}", "dx": dx} for i in range(n)]
            lesion, left = lesion + 1, left - n
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["lesion_id", "image_id", "dx"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_no_lesion_on_two_sides_and_the_counts_asked(tmp_path: Path) -> None:
    meta = ham_like(tmp_path / "meta.csv")
    result = CliRunner().invoke(app, ["data", "split", str(meta), "--out", str(tmp_path / "splits"), "--label-column", "dx",
                                      "--group-column", "lesion_id", "--image-column", "image_id",
                                      "--test-per-class", "10", "--val-per-class", "5", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    splits = {name: read(tmp_path / "splits" / f"{name}.csv") for name in ("train", "val", "test")}
    lesions = {name: {r["lesion_id"] for r in rows} for name, rows in splits.items()}
    assert not (lesions["train"] & lesions["val"]) and not (lesions["train"] & lesions["test"]) and not (lesions["val"] & lesions["test"])
    assert summary["groups_on_two_sides"] == 0
    assert sum(len(rows) for rows in splits.values()) == sum(CLASSES.values())  # every image once
    for name, asked in (("test", 10), ("val", 5)):
        counts = Counter(r["dx"] for r in splits[name])
        for dx, images in CLASSES.items():  # at least the count asked, exceeded by less than one lesion (at most 4 images)
            if images >= 30:
                assert asked <= counts[dx] < asked + 4, (name, dx, counts[dx])
    shortfalls = [n for n in summary["notes"] if "got" in n]
    assert all(n.split()[2] in ("vasc", "df") for n in shortfalls) and shortfalls  # 15 and 12 images: val comes up short
    assert list(splits["train"][0]) == ["lesion_id", "image_id", "dx"]  # the source's columns, unchanged


def test_the_same_seed_gives_the_same_files_another_seed_others(tmp_path: Path) -> None:
    meta = ham_like(tmp_path / "meta.csv")
    options = lambda seed: SplitOptions(label_column="dx", group_column="lesion_id", image_column="image_id", val=0.1, test=0.2, seed=seed)  # noqa: E731
    texts = {}
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        split_dataset(meta, tmp_path / run, options(seed))
        texts[run] = [(tmp_path / run / f"{n}.csv").read_text() for n in ("train", "val", "test")]
    assert texts["a"] == texts["b"] and texts["a"] != texts["c"]
    test = Counter(r["dx"] for r in read(tmp_path / "a" / "test.csv"))
    assert test["nv"] == pytest.approx(0.2 * 400, abs=4)  # fractions of each class


def test_folds_keep_lesions_together(tmp_path: Path) -> None:
    meta = ham_like(tmp_path / "meta.csv")
    summary = split_dataset(meta, tmp_path / "cv", SplitOptions(label_column="dx", group_column="lesion_id", image_column="image_id",
                                                               test_per_class=5, folds=3))
    assert summary["groups_on_two_sides"] == 0
    vals = [read(tmp_path / "cv" / f"fold{k}" / "val.csv") for k in range(3)]
    assert sum(len(v) for v in vals) + len(read(tmp_path / "cv" / "test.csv")) == sum(CLASSES.values())
    for k in range(3):
        train = {r["lesion_id"] for r in read(tmp_path / "cv" / f"fold{k}" / "train.csv")}
        assert not train & {r["lesion_id"] for r in vals[k]}
    per_fold = [Counter(r["dx"] for r in v)["nv"] for v in vals]
    assert max(per_fold) - min(per_fold) <= 4  # balanced class counts across folds


def test_data_info_warns_about_a_leaky_split(tmp_path: Path) -> None:
    from helpers import write_image

    images = tmp_path / "images"
    rows = [("p1", "a", "x1.png"), ("p1", "a", "x2.png"), ("p2", "b", "x3.png"), ("p3", "b", "x4.png"), ("p4", "a", "x5.png")]
    for _, _, name in rows:
        write_image(images / name)
    for split, chosen in (("train", rows[:1] + rows[2:4]), ("test", rows[1:2] + rows[4:])):  # p1 on both sides
        with open(tmp_path / f"{split}.csv", "w", newline="") as handle:
            csv.writer(handle).writerows([["patient", "label", "image"], *[[p, label, image] for p, label, image in chosen]])
    options = DataOptions(train_csv=tmp_path / "train.csv", test_csv=tmp_path / "test.csv", images=images)
    leakage = data_info(options, group_column="patient")["leakage"]
    assert leakage["groups_on_two_sides"] == 1 and leakage["examples"] == {"p1": ["test", "train"]}
    result = CliRunner().invoke(app, ["data", "info", "--train-csv", str(tmp_path / "train.csv"), "--test-csv", str(tmp_path / "test.csv"),
                                      "--images", str(images), "--group-column", "patient"])
    assert result.exit_code == 0 and "1 of 4 'patient' groups have images in two splits" in " ".join(result.stdout.split())


def test_bad_split_options(tmp_path: Path) -> None:
    meta = ham_like(tmp_path / "meta.csv")
    for options, message in ((SplitOptions(val=0.6, test=0.5), "leave nothing for train"),
                             (SplitOptions(val=0.1, val_per_class=5), "not both"),
                             (SplitOptions(folds=1), "at least 2"),
                             (SplitOptions(label_column="dx", group_column="patient"), "no column 'patient'")):
        with pytest.raises(FoproError, match=message):
            split_dataset(meta, tmp_path / "out", options)
