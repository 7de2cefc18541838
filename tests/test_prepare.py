"""`fopro data prepare`: the image cache holds exactly the loader's pixels, runs on it give the same metrics as on
the original files, and bad inputs stop with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from conftest import tiny_distill_values, torch_threads
from fopro.cli import app
from fopro.config import resolve_config
from fopro.data import DataOptions, ImageDataset, load_image, load_splits
from fopro.data.cache import INDEX_FILE, read_index
from fopro.data.prepare import PrepareOptions, prepare_cache
from fopro.errors import FoproError
from fopro.models.teacher import TeacherOptions
from fopro.probe.frequency import run_probe
from fopro.probe.options import ProbeOptions
from fopro.train import train
from helpers import one_line, truncate, write_csv

SIZE = 32
SOURCE_SIZE = 1024
CLASSES = ["NV", "MEL", "BCC"]  # ISIC-2019 LT findings 0, 1, 2
COUNTS = {"train": [6, 4, 2], "val": [2, 2, 2], "test": [2, 2, 2]}  # 24 images


def write_lesion(path: Path, seed: int, finding: int) -> None:
    """A 1024 x 768 JPEG: a skin-toned gradient and a dark lesion whose size and hue depend on the class."""
    rng = np.random.default_rng(seed)
    width, height = SOURCE_SIZE, SOURCE_SIZE * 3 // 4
    ramp = np.linspace(0, 1, width)[None, :, None] * rng.uniform(20, 60, size=3)
    skin = np.array([200, 150, 120]) + ramp + rng.normal(0, 4, size=(height, 1, 3))
    image = Image.fromarray(np.clip(skin, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    radius = 120 + 80 * finding + int(rng.integers(0, 60))
    cx, cy = int(rng.integers(radius, width - radius)), int(rng.integers(radius // 2, height - radius // 2))
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(90 - 20 * finding, 50 + 30 * finding, 40))
    image.save(path, format="JPEG", quality=90)


@pytest.fixture(scope="module")
def isic(tmp_path_factory) -> dict[str, Path]:
    """ISIC-2019 LT layout: images/ISIC_xxxxxxx.jpg and train/val/test CSVs with image,finding_name,finding."""
    root = tmp_path_factory.mktemp("isic")
    (root / "images").mkdir()
    number = 0
    files = {}
    for split, counts in COUNTS.items():
        rows = []
        for finding, count in enumerate(counts):
            for _ in range(count):
                number += 1
                name = f"ISIC_{number:07d}"
                write_lesion(root / "images" / f"{name}.jpg", number, finding)
                rows.append([name, CLASSES[finding], finding])
        files[split] = write_csv(root / f"{split}.csv", ["image", "finding_name", "finding"], rows)
    return {"root": root, **files}


def data_options(isic: dict[str, Path], **overrides) -> DataOptions:
    values = dict(train_csv=isic["train"], val_csv=isic["val"], test_csv=isic["test"], images=isic["root"] / "images", classes=list(CLASSES))
    return DataOptions(**{**values, **overrides})


def data_args(isic: dict[str, Path]) -> list[str]:
    return ["--train-csv", str(isic["train"]), "--val-csv", str(isic["val"]), "--test-csv", str(isic["test"]),
            "--images", str(isic["root"] / "images"), "--classes", ",".join(CLASSES)]


@pytest.fixture(scope="module")
def cache(isic, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "isic-32"
    with torch_threads(1):
        prepare_cache(data_options(isic), out, PrepareOptions(image_size=SIZE, workers=2))
    return out


def test_cache_images_equal_the_loaders_pixel_for_pixel(isic, cache) -> None:
    original = load_splits(data_options(isic))
    cached = load_splits(DataOptions(data=cache))
    assert cached.classes == CLASSES
    for split in ("train", "val", "test"):
        assert cached[split].labels == original[split].labels
        assert [p.name for p in cached[split].paths] == [p.name for p in original[split].paths]
        dataset = ImageDataset(cached[split], SIZE, cache=False)
        for index, path in enumerate(original[split].paths):
            reference = load_image(path, SIZE)  # the loader's decode of the original JPEG
            assert reference.shape == (3, SIZE, SIZE)
            assert torch.equal(dataset.raw(index), reference), (split, path)
    array = np.load(cache / "train.npy", mmap_mode="r")
    assert array.shape == (sum(COUNTS["train"]), 3, SIZE, SIZE) and array.dtype == np.uint8


def test_the_imbalance_subsample_of_a_cache_keeps_its_images(isic, cache) -> None:
    original = load_splits(data_options(isic, imbalance=0.2, seed=3))["train"]
    cached = load_splits(DataOptions(data=cache, imbalance=0.2, seed=3))["train"]
    assert [p.name for p in cached.paths] == [p.name for p in original.paths] and len(cached) < sum(COUNTS["train"])
    dataset = ImageDataset(cached, SIZE, cache=False)
    assert all(torch.equal(dataset.raw(i), load_image(path, SIZE)) for i, path in enumerate(original.paths))


def val_metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{key: line[key] for key in ("epoch", "train", "val")} for line in lines]  # losses depend on every pixel


def test_distill_on_the_cache_gives_the_same_metrics(isic, cache, distill_teacher, tmp_path) -> None:
    common = dict(image_size=SIZE, method="ekd", batch_size=4)
    on_files = tiny_distill_values(None, distill_teacher, **common, train_csv=str(isic["train"]), val_csv=str(isic["val"]),
                                   test_csv=str(isic["test"]), images=str(isic["root"] / "images"), classes=",".join(CLASSES))
    on_files["data"] = None
    on_cache = tiny_distill_values(cache, distill_teacher, **common)
    with torch_threads(1):
        train(resolve_config({}, on_files), tmp_path / "files")
        train(resolve_config({}, on_cache), tmp_path / "cache")
    files, cached = val_metrics(tmp_path / "files"), val_metrics(tmp_path / "cache")
    assert "balanced_accuracy" in files[0]["val"] and files[0]["train"]
    assert cached == files


def test_probe_on_the_cache_gives_the_same_result(isic, cache, distill_teacher) -> None:
    """`fopro probe` reads the cache like the files (at the teacher's 32-px input: the cache's size): same scores."""
    options = ProbeOptions(bands=2, gains="0,2", per_class=2, folds=2, neighbours=1, linear_views=1)
    with torch_threads(1):
        on_files = run_probe(TeacherOptions(str(distill_teacher)), data_options(isic), options)
        on_cache = run_probe(TeacherOptions(str(distill_teacher)), DataOptions(data=cache), options)
    keys = ("clean", "results", "linear_probe")
    assert on_files["linear_probe"]["num_images"] == 6 and len(on_files["results"]) == 4
    assert {k: on_cache[k] for k in keys} == {k: on_files[k] for k in keys}


def test_a_size_other_than_the_caches_is_refused(cache) -> None:
    manifest = load_splits(DataOptions(data=cache))["val"]
    with pytest.raises(FoproError) as info:
        ImageDataset(manifest, 48)
    one_line(info, str(cache), "32-px", "48-px", "--image-size 48")


def test_cli_json_and_overwrite(isic, tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "cache"
    args = ["data", "prepare", *data_args(isic), "--out", str(out), "--image-size", str(SIZE), "--workers", "1", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["splits"] == {split: {"images": sum(c), "skipped": 0} for split, c in COUNTS.items()}
    assert summary["images"] == 24 and summary["classes"] == CLASSES and summary["image_size"] == SIZE
    assert summary["bytes"] >= 24 * 3 * SIZE * SIZE and summary["images_per_second"] > 0
    index = read_index(out)
    assert index.image_size == SIZE and index.classes == CLASSES
    assert Path(index.splits["train"].paths[0]).is_absolute()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temporary folder left

    again = runner.invoke(app, args)
    assert again.exit_code == 2
    assert "already holds an image cache" in again.stderr and "--overwrite" in again.stderr
    before = (out / INDEX_FILE).read_bytes()
    replaced = runner.invoke(app, [*args[:-1], "--overwrite", "--json"])
    assert replaced.exit_code == 0, replaced.output
    assert (out / INDEX_FILE).read_bytes() == before  # same data, same index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]

    info = runner.invoke(app, ["data", "info", "--data", str(out), "--json"])  # any command reads the cache
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["splits"]["train"] == dict(zip(CLASSES, COUNTS["train"]))


def test_bad_inputs_stop_with_one_line(isic, tmp_path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FoproError) as info:
        prepare_cache(data_options(isic), occupied, PrepareOptions(image_size=SIZE, workers=1))
    one_line(info, str(occupied), "not an image cache")
    assert (occupied / "notes.txt").read_text() == "mine"

    not_data = tmp_path / "not-data"
    not_data.mkdir()
    with pytest.raises(FoproError) as info:
        prepare_cache(DataOptions(data=not_data), tmp_path / "out", PrepareOptions(image_size=SIZE, workers=1))
    one_line(info, str(not_data), "train/")

    with pytest.raises(FoproError) as info:
        prepare_cache(data_options(isic), tmp_path / "out", PrepareOptions(image_size=4, workers=1))
    one_line(info, "--image-size 4")
    assert not (tmp_path / "out").exists()


def test_a_corrupt_jpeg_is_named_and_nothing_is_written(isic, tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for path in (isic["root"] / "images").iterdir():
        (images / path.name).write_bytes(path.read_bytes())
    broken = truncate(images / "ISIC_0000003.jpg", keep=0.3)
    options = data_options(isic, images=images)
    out = tmp_path / "cache"
    with pytest.raises(FoproError) as info:
        prepare_cache(options, out, PrepareOptions(image_size=SIZE, workers=2))
    one_line(info, str(broken), "--skip-bad-images")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]  # no cache, no temporary folder

    calls = []
    summary = prepare_cache(DataOptions(**{**options.__dict__, "skip_bad_images": True}), out, PrepareOptions(image_size=SIZE, workers=1),
                            progress=lambda *call: calls.append(call))
    assert summary["splits"]["train"] == {"images": sum(COUNTS["train"]) - 1, "skipped": 1}
    assert calls[0] == ("decoding images", 0, 24) and calls[-1] == ("decoding images", 24, 24) and len(calls) == 25
    manifest = load_splits(DataOptions(data=out))["train"]
    assert broken.name not in [p.name for p in manifest.paths]
    assert any("skipped 1 unreadable" in note for note in manifest.notes)
    dataset = ImageDataset(manifest, SIZE, cache=False)
    assert all(torch.equal(dataset.raw(i), load_image(isic["root"] / "images" / p.name, SIZE)) for i, p in enumerate(manifest.paths))


def test_a_damaged_cache_is_named(cache, tmp_path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / INDEX_FILE).write_text((cache / INDEX_FILE).read_text())
    (copy / "train.npy").write_bytes((cache / "train.npy").read_bytes()[:1000])
    manifest = load_splits(DataOptions(data=copy))["train"]
    with pytest.raises(FoproError) as info:
        ImageDataset(manifest, SIZE, cache=False).raw(0)
    one_line(info, str(copy / "train.npy"), "--overwrite")
    (copy / INDEX_FILE).write_text("{not json")
    with pytest.raises(FoproError) as info:
        load_splits(DataOptions(data=copy))
    one_line(info, str(copy / INDEX_FILE))
