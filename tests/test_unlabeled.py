"""Unlabelled images: reading a folder or a CSV (`read_unlabeled`), and the synthetic pool (`data synth --unlabeled N`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fopro.cli import app
from fopro.data import DataOptions, ImageDataset, read_unlabeled
from fopro.data.longtail import longtail_counts
from fopro.data.summary import data_info
from fopro.data.synth import (
    SynthConfig,
    generate_synth,
    proportional_counts,
    render_image,
    target_designs,
    unlabeled_items,
    unlabeled_name,
)
from fopro.errors import FoproError
from helpers import make_image_folder, write_csv, write_image

# ------------------------------------------------------------------------------------------ a folder


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """Images at several depths and extensions, plus hidden files/folders, non-images and a symlinked folder."""
    root = tmp_path / "pool"
    write_image(root / "b.png", seed=1)
    write_image(root / "a.JPG", seed=2)
    write_image(root / "sub" / "c.jpeg", seed=3)
    write_image(root / "sub" / "deep" / "d.TIF", seed=4, fmt="TIFF")
    write_image(root / "z-dir" / "e.bmp", seed=5, fmt="BMP")
    write_image(root / ".hidden.png", seed=6)  # hidden file
    write_image(root / ".cache" / "f.png", seed=7)  # hidden folder
    write_image(root / "sub" / ".thumbs" / "g.png", seed=8)  # hidden folder deeper down
    (root / "notes.txt").write_text("not an image")
    (root / "h.png.json").write_text("{}")
    (root / "dir.png").mkdir()  # a folder named like an image: not a file
    write_image(tmp_path / "outside" / "linked.png", seed=9)
    try:
        os.symlink(tmp_path / "outside", root / "link", target_is_directory=True)
    except OSError:
        pass  # no symlinks on this file system: the rest still holds
    return root


def test_folder_is_read_recursively_sorted_without_hidden_files(pool: Path) -> None:
    manifest = read_unlabeled(pool)
    relative = [p.relative_to(pool).as_posix() for p in manifest.paths]
    assert relative == ["a.JPG", "b.png", "sub/c.jpeg", "sub/deep/d.TIF", "z-dir/e.bmp"]
    assert manifest.paths == sorted(manifest.paths)
    assert manifest.labels == [-1] * 5 and manifest.classes == [] and manifest.num_classes == 0
    assert manifest.split == "unlabeled" and manifest.source == str(pool)
    # the Manifest methods that make sense without labels work on it
    assert len(manifest.subset([0, 2])) == 2 and manifest.subset([0, 2]).labels == [-1, -1]
    assert manifest.image_ids()[0] == "pool/a.JPG"
    assert read_unlabeled(pool).paths == manifest.paths  # deterministic


def test_imagefolder_labels_are_ignored(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", {"train": {"cat": 2, "dog": 1}, "val": {"cat": 1}})
    manifest = read_unlabeled(root / "train")
    assert [p.parent.name for p in manifest.paths] == ["cat", "cat", "dog"]
    assert manifest.labels == [-1, -1, -1] and manifest.classes == []
    assert len(read_unlabeled(root)) == 4  # every split folder too: the structure does not matter


def test_unlabeled_manifest_feeds_an_image_dataset(pool: Path) -> None:
    dataset = ImageDataset(read_unlabeled(pool), image_size=16)
    image, label, index = dataset[3]
    assert tuple(image.shape) == (3, 16, 16) and label == -1 and index == 3
    assert dataset.scan() == {}


# ------------------------------------------------------------------------------------------ a CSV


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for i, name in enumerate(["x0.png", "x1.png", "nested/x2.png"]):
        write_image(root / name, seed=i)
    return root


def test_csv_relative_paths_resolve_against_the_csv_folder(tmp_path: Path, images: Path) -> None:
    csv = write_csv(images / "list.csv", ["label", "path"], [["a", "x1.png"], ["b", "nested/x2.png"]])
    manifest = read_unlabeled(csv)
    assert manifest.paths == [images / "x1.png", images / "nested" / "x2.png"]  # CSV order, labels ignored
    assert manifest.labels == [-1, -1] and manifest.classes == [] and manifest.source == str(csv)


def test_csv_with_images_root_and_absolute_paths(tmp_path: Path, images: Path) -> None:
    absolute = str(images / "x0.png")
    csv = write_csv(tmp_path / "elsewhere" / "u.csv", ["Image"], [["x1.png"], [absolute]])
    manifest = read_unlabeled(csv, images=images)
    assert manifest.paths == [images / "x1.png", images / "x0.png"]
    with pytest.raises(FoproError, match=r"line 2: x1\.png"):
        read_unlabeled(csv)  # without --images, relative paths are read from the CSV's folder


def test_csv_image_column_detection_and_choice(tmp_path: Path, images: Path) -> None:
    # several candidates: the first of IMAGE_COLUMN_CANDIDATES ('image' before 'file') wins
    csv = write_csv(tmp_path / "two.csv", ["file", "image", "class"], [["nope.png", "x0.png", "3"]])
    assert read_unlabeled(csv, images=images).paths == [images / "x0.png"]
    csv = write_csv(tmp_path / "custom.csv", ["id", "where"], [["1", "x1.png"], ["2", "x0.png"]])
    assert read_unlabeled(csv, images=images, image_column="where").paths == [images / "x1.png", images / "x0.png"]


# ------------------------------------------------------------------------------------------ errors


def _error(path: Path, **kwargs) -> str:
    with pytest.raises(FoproError) as info:
        read_unlabeled(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_errors_name_the_option_and_the_path(tmp_path: Path, images: Path) -> None:
    missing = tmp_path / "nowhere"
    assert f"--unlabeled {missing} does not exist" in _error(missing)

    empty = tmp_path / "empty"
    write_image(empty / ".only-hidden.png")
    (empty / "readme.txt").write_text("x")
    message = _error(empty)
    assert f"--unlabeled {empty} holds no images" in message and ".png" in message

    no_column = write_csv(tmp_path / "nocol.csv", ["label", "weight"], [["a", "1"]])
    message = _error(no_column)
    assert f"--unlabeled {no_column} has no image column" in message and "label, weight" in message
    assert "--image-column" in message
    headerless = write_csv(tmp_path / "headerless.csv", ["x0.png"], [["x1.png"]])
    assert "add a header line" in _error(headerless, images=images)
    assert "no column 'where'" in _error(write_csv(tmp_path / "c.csv", ["image"], [["x0.png"]]), image_column="where")

    rows = [["x0.png"], ["gone.png"], ["x1.png"], [""], ["nested/also-gone.png"]]
    bad_rows = write_csv(tmp_path / "rows.csv", ["image"], rows)
    message = _error(bad_rows, images=images)
    assert f"--unlabeled {bad_rows}: 3 of 5 images do not exist" in message
    assert "line 3: gone.png" in message and "line 5: (empty)" in message and "line 6: nested/also-gone.png" in message

    blank = tmp_path / "blank.csv"
    blank.write_text("")
    assert f"--unlabeled {blank} is empty" in _error(blank)
    header_only = write_csv(tmp_path / "header.csv", ["image"], [])
    assert f"--unlabeled {header_only} has a header but no rows" in _error(header_only)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    assert f"--unlabeled {binary} is not a readable CSV" in _error(binary)

    single = images / "x0.png"
    assert f"--unlabeled {single} is a single image" in _error(single)
    assert "--images" in _error(bad_rows, images=tmp_path / "no-such-folder")


# ------------------------------------------------------------------------------------------ the synthetic pool

TINY = dict(num_classes=4, image_size=32, imbalance=0.25, max_per_class=12, val_per_class=2, test_per_class=2,
            public_classes=2, public_per_class=2, public_val_per_class=1)
POOL = 40


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth_pair(tmp_path_factory) -> tuple[Path, Path, dict, dict]:
    """The same tiny synthetic dataset without and with a pool of 40 unlabelled images."""
    root = tmp_path_factory.mktemp("synth-unlabeled")
    plain = generate_synth(root / "plain", SynthConfig(**TINY))
    calls: list[tuple[int, int]] = []
    pooled = generate_synth(root / "pooled", SynthConfig(**TINY, unlabeled=POOL),
                            progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (pooled["total_images"], pooled["total_images"]) == (len(calls), plain["total_images"] + POOL)
    return root / "plain", root / "pooled", plain, pooled


def test_pool_size_and_counts_follow_the_train_distribution(synth_pair) -> None:
    _, pooled_root, _, pooled = synth_pair
    folder = pooled_root / "target" / "unlabeled"
    files = sorted(folder.iterdir())
    assert len(files) == POOL and all(p.is_file() and p.suffix == ".png" for p in files)  # flat: no sub-folder
    on_disk = json.loads((pooled_root / "synth.json").read_text())
    assert on_disk == pooled and on_disk["config"]["unlabeled"] == POOL
    section = on_disk["target"]["unlabeled"]
    assert section["size"] == POOL and section["folder"] == "unlabeled"
    train = on_disk["target"]["counts"]["train"]
    assert list(train.values()) == longtail_counts(12, 4, 0.25)
    assert list(section["counts"]) == on_disk["target"]["classes"]
    assert sum(section["counts"].values()) == POOL
    for name, count in section["counts"].items():
        exact = POOL * train[name] / sum(train.values())
        assert abs(count - exact) < 1 and (count == round(exact) or abs(exact % 1 - 0.5) < 1e-9), (name, count, exact)


def test_pool_leaves_every_other_image_and_file_unchanged(synth_pair) -> None:
    plain_root, pooled_root, plain, pooled = synth_pair
    plain_hashes, pooled_hashes = file_hashes(plain_root), file_hashes(pooled_root)
    assert not (plain_root / "target" / "unlabeled").exists() and "unlabeled" not in plain["config"]
    shared = {k: v for k, v in pooled_hashes.items() if not k.startswith("target/unlabeled/") and k != "synth.json"}
    assert shared == {k: v for k, v in plain_hashes.items() if k != "synth.json"}  # train/val/test/public: same bytes
    assert {p.name for p in (pooled_root / "target").iterdir()} == {"train", "val", "test", "unlabeled"}
    # synth.json differs only by the pool's own entries
    without = json.loads(json.dumps(pooled))
    del without["config"]["unlabeled"], without["target"]["unlabeled"]
    without["total_images"] -= POOL
    assert without == plain


def test_pool_images_are_new_and_names_reveal_no_class(synth_pair) -> None:
    _, pooled_root, _, pooled = synth_pair
    hashes = file_hashes(pooled_root)
    pool = {k: v for k, v in hashes.items() if k.startswith("target/unlabeled/")}
    others = {v for k, v in hashes.items() if not k.startswith("target/unlabeled/") and k.endswith(".png")}
    assert len(set(pool.values())) == POOL and not set(pool.values()) & others
    train_pixels = [np.asarray(Image.open(p)) for p in sorted((pooled_root / "target" / "train").rglob("*.png"))]
    for name in pool:
        pixels = np.asarray(Image.open(pooled_root / name))
        assert not any(np.array_equal(pixels, t) for t in train_pixels)
    names = [Path(k).name for k in pool]
    assert all(re.fullmatch(r"u\d{5}\.png", n) for n in names) and sorted(names) == [f"u{i:05d}.png" for i in range(POOL)]
    classes = pooled["target"]["classes"]
    words = {w for c in classes for w in re.split(r"[_\W]+", c) if len(w) > 1}
    assert not [n for n in names if any(w in n for w in words)]
    # no label file anywhere in target/: only PNG images
    assert {p.suffix for p in (pooled_root / "target").rglob("*") if p.is_file()} == {".png"}


def test_pool_images_are_renders_of_the_recorded_classes_in_shuffled_order(synth_pair) -> None:
    _, pooled_root, _, pooled = synth_pair
    config = SynthConfig(**TINY, unlabeled=POOL)
    designs, _ = target_designs(config.num_classes)
    counts = list(pooled["target"]["unlabeled"]["counts"].values())
    items = unlabeled_items(config, len(designs), counts)
    classes_in_file_order = [cls for _, cls, _ in sorted(items)]
    assert classes_in_file_order != sorted(classes_in_file_order)  # shuffled, not grouped by class
    for number, cls, idx in items:
        expected = render_image(designs[cls], config.image_size, np.random.default_rng([config.seed, 5, cls, idx]))
        on_disk = np.asarray(Image.open(pooled_root / "target" / "unlabeled" / unlabeled_name(number, POOL)))
        assert np.array_equal(on_disk, expected)


def test_pool_is_deterministic_and_readable(tmp_path: Path, synth_pair) -> None:
    _, pooled_root, _, _ = synth_pair
    small = dict(TINY, public_per_class=1)
    generate_synth(tmp_path / "again", SynthConfig(**small, unlabeled=POOL))
    again = file_hashes(tmp_path / "again" / "target" / "unlabeled")
    assert again == file_hashes(pooled_root / "target" / "unlabeled")
    manifest = read_unlabeled(pooled_root / "target" / "unlabeled")
    assert len(manifest) == POOL and manifest.labels == [-1] * POOL


def test_data_info_ignores_the_pool(synth_pair) -> None:
    plain_root, pooled_root, _, _ = synth_pair
    pooled_info = data_info(DataOptions(data=pooled_root / "target"))
    assert set(pooled_info["splits"]) == {"train", "val", "test"}
    assert pooled_info["splits"] == data_info(DataOptions(data=plain_root / "target"))["splits"]


def test_proportional_counts_sum_exactly() -> None:
    assert proportional_counts(40, [12, 7, 4, 3]) == [18, 11, 6, 5]
    assert proportional_counts(3, [1, 1, 1, 1]) == [1, 1, 1, 0]  # ties go to the lower (more frequent) class
    assert proportional_counts(0, [5, 2]) == [0, 0]
    rng = np.random.default_rng(0)
    for _ in range(50):
        weights = rng.integers(1, 500, size=int(rng.integers(2, 12))).tolist()
        total = int(rng.integers(0, 2000))
        counts = proportional_counts(total, weights)
        assert sum(counts) == total
        assert all(abs(c - total * w / sum(weights)) < 1 for c, w in zip(counts, weights))


def test_cli_synth_unlabeled(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    args = ["data", "synth", str(out), "--num-classes", "2", "--image-size", "16", "--max-per-class", "4",
            "--val-per-class", "1", "--test-per-class", "1", "--public-classes", "2", "--public-per-class", "1",
            "--public-val-per-class", "1", "--unlabeled", "5", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["target"]["unlabeled"]["size"] == 5 and sum(summary["target"]["unlabeled"]["counts"].values()) == 5
    assert len(list((out / "target" / "unlabeled").glob("u*.png"))) == 5
    bad = CliRunner().invoke(app, ["data", "synth", str(tmp_path / "bad"), "--unlabeled", "-1"])
    assert bad.exit_code == 2 and "--unlabeled" in bad.output and not (tmp_path / "bad").exists()
