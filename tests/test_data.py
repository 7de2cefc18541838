"""Data sources (ImageFolder, CSV, ISIC-2019 LT CSV), long-tail subsampling, image decoding, augmentation,
the dataset cache and unreadable images."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fopro.data import (
    ISIC2019_CLASSES,
    DataOptions,
    ImageDataset,
    Manifest,
    checked_dataset,
    load_image,
    load_splits,
    longtail_counts,
    longtail_indices,
    subsample_longtail,
)
from fopro.data.images import BadImageError, to_rgb_array
from fopro.data.manifest import DecodeOptions
from fopro.data.summary import data_info
from fopro.errors import FoproError
from fopro.metrics import LongTailGroups
from helpers import ISIC_DIR, make_image_folder, truncate, write_csv, write_image

# ------------------------------------------------------------------------------------------ ImageFolder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(
        tmp_path / "data",
        {
            "train": {"melanoma": 5, "benign": 3, "ak": 2},
            "val": {"melanoma": 1, "benign": 1, "ak": 1},
            "test": {"melanoma": 2, "benign": 2, "ak": 2},
        },
    )


def test_image_folder_classes_are_sorted_folder_names(folder: Path) -> None:
    splits = load_splits(DataOptions(data=folder))
    assert splits.classes == ["ak", "benign", "melanoma"]
    assert set(splits.manifests) == {"train", "val", "test"}
    train = splits["train"]
    assert train.counts_by_name() == {"ak": 2, "benign": 3, "melanoma": 5}
    assert splits["test"].counts_by_name() == {"ak": 2, "benign": 2, "melanoma": 2}
    for path, label in zip(train.paths, train.labels):
        assert path.parent.name == splits.classes[label]
        assert path.is_file()
    assert train.source == str(folder / "train")


def test_image_folder_with_class_list_fixes_the_order(folder: Path) -> None:
    order = ["melanoma", "benign", "ak"]
    splits = load_splits(DataOptions(data=folder, classes=order))
    assert splits.classes == order
    assert splits["train"].class_counts() == [5, 3, 2]
    for path, label in zip(splits["val"].paths, splits["val"].labels):
        assert path.parent.name == order[label]


def test_image_folder_class_unknown_to_the_class_list(folder: Path) -> None:
    with pytest.raises(FoproError, match="ak") as info:
        load_splits(DataOptions(data=folder, classes=["melanoma", "benign"]))
    assert "\n" not in str(info.value)


def test_image_folder_only_some_splits(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", {"test": {"a": 1, "b": 2}})
    splits = load_splits(DataOptions(data=root))
    assert list(splits.manifests) == ["test"]
    assert splits.classes == ["a", "b"]
    with pytest.raises(FoproError, match="no train split"):
        splits.require("train", "give a train/ folder")


@pytest.mark.parametrize(
    "build, expected",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "none of the split folders"),
        (lambda root: (root / "train").mkdir(parents=True), "no class folders"),
        (lambda root: (root / "train" / "a").mkdir(parents=True), "hold no images"),
    ],
)
def test_image_folder_errors(tmp_path: Path, build, expected: str) -> None:
    root = tmp_path / "root"
    build(root)
    with pytest.raises(FoproError, match=expected) as info:
        load_splits(DataOptions(data=root))
    assert "\n" not in str(info.value)


def test_image_folder_ignores_other_files_and_hidden_ones(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", {"train": {"a": 2, "b": 1}})
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    write_image(root / "train" / "a" / ".hidden.png")
    (root / "train" / ".cache").mkdir()
    write_image(root / "train" / "b" / "nested" / "deep.JPG", fmt="JPEG")
    splits = load_splits(DataOptions(data=root))
    assert splits.classes == ["a", "b"]
    assert splits["train"].counts_by_name() == {"a": 2, "b": 2}


def test_no_data_and_both_kinds_of_data(tmp_path: Path) -> None:
    with pytest.raises(FoproError, match="no data given"):
        load_splits(DataOptions())
    with pytest.raises(FoproError, match="not both"):
        load_splits(DataOptions(data=tmp_path, train_csv=tmp_path / "x.csv"))


# ------------------------------------------------------------------------------------------ CSV


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    for i in range(6):
        write_image(images / f"img{i}.png", seed=i)
    return images


def test_csv_with_name_labels(tmp_path: Path, image_dir: Path) -> None:
    train = write_csv(tmp_path / "train.csv", ["image", "label"],
                      [[f"img{i}.png", name] for i, name in enumerate(["cat", "dog", "cat", "emu", "cat", "dog"])])
    test = write_csv(tmp_path / "test.csv", ["image", "label"], [["img0.png", "emu"], ["img1.png", "dog"]])
    splits = load_splits(DataOptions(train_csv=train, test_csv=test, images=image_dir))
    assert splits.classes == ["cat", "dog", "emu"]
    assert splits["train"].labels == [0, 1, 0, 2, 0, 1]
    assert splits["train"].paths[3] == image_dir / "img3.png"
    assert splits["test"].labels == [2, 1]
    assert splits["train"].source == str(train)
    assert "val" not in splits


def test_csv_with_index_labels(tmp_path: Path, image_dir: Path) -> None:
    rows = [[f"img{i}.png", str(label)] for i, label in enumerate([0, 2, 10, 1, 0, 2])]
    train = write_csv(tmp_path / "train.csv", ["filename", "target"], rows)
    # without a class list, indices are names sorted numerically (10 after 2)
    splits = load_splits(DataOptions(train_csv=train, images=image_dir))
    assert splits.classes == ["0", "1", "2", "10"]
    assert splits["train"].labels == [0, 2, 3, 1, 0, 2]
    # with a class list, indices map through it
    small = write_csv(tmp_path / "small.csv", ["filename", "target"], [r for r in rows if r[1] != "10"])
    named = load_splits(DataOptions(train_csv=small, images=image_dir, classes=["nv", "mel", "bcc"]))
    assert named.classes == ["nv", "mel", "bcc"]
    assert named["train"].labels == [0, 2, 1, 0, 2]


def test_csv_index_labels_map_through_a_checkpoints_classes(tmp_path: Path, image_dir: Path) -> None:
    test = write_csv(tmp_path / "test.csv", ["image", "label"], [["img0.png", "1"], ["img1.png", "0"]])
    splits = load_splits(DataOptions(test_csv=test, images=image_dir), splits=("test",), classes=["nv", "mel"])
    assert splits.classes == ["nv", "mel"]
    assert splits["test"].labels == [1, 0]


def test_csv_custom_columns_and_auto_detection(tmp_path: Path, image_dir: Path) -> None:
    rows = [[f"img{i}.png", "x" if i % 2 else "y", f"sub{i}"] for i in range(4)]
    custom = write_csv(tmp_path / "custom.csv", ["file_name", "dx", "subject"], rows)
    with pytest.raises(FoproError, match="--image-column") as info:
        load_splits(DataOptions(train_csv=custom, images=image_dir))
    assert "file_name" in str(info.value)
    splits = load_splits(DataOptions(train_csv=custom, images=image_dir, image_column="file_name", label_column="dx"))
    assert splits.classes == ["x", "y"]
    assert splits["train"].labels == [1, 0, 1, 0]
    # auto-detection is case-insensitive, extra columns are ignored, whitespace and BOM are stripped
    auto = tmp_path / "auto.csv"
    auto.write_text("\ufeffImage_ID , Diagnosis,age\n" + "".join(f"img{i}.png , {r[1]} ,40\n" for i, r in enumerate(rows)),
                    encoding="utf-8")
    splits = load_splits(DataOptions(train_csv=auto, images=image_dir))
    assert splits["train"].counts_by_name() == {"x": 2, "y": 2}
    # two candidate label columns: ambiguous, ask for --label-column
    both = write_csv(tmp_path / "both.csv", ["image", "label", "class"], [["img0.png", "a", "b"]])
    with pytest.raises(FoproError, match="several.*--label-column"):
        load_splits(DataOptions(train_csv=both, images=image_dir))
    assert load_splits(DataOptions(train_csv=both, images=image_dir, label_column="class")).classes == ["b"]
    with pytest.raises(FoproError, match="no column 'nope'"):
        load_splits(DataOptions(train_csv=both, images=image_dir, label_column="nope"))


def test_csv_errors(tmp_path: Path, image_dir: Path) -> None:
    good = write_csv(tmp_path / "good.csv", ["image", "label"], [["img0.png", "a"]])
    with pytest.raises(FoproError, match="--images"):
        load_splits(DataOptions(train_csv=good))
    with pytest.raises(FoproError, match="does not exist"):
        load_splits(DataOptions(train_csv=tmp_path / "absent.csv", images=image_dir))
    missing = write_csv(tmp_path / "missing.csv", ["image", "label"], [["img0.png", "a"], ["nope.png", "b"]])
    with pytest.raises(FoproError, match="nope.png"):
        load_splits(DataOptions(train_csv=missing, images=image_dir))
    dup = write_csv(tmp_path / "dup.csv", ["image", "label"], [["img0.png", "a"], ["img0.png", "a"]])
    with pytest.raises(FoproError, match="duplicate"):
        load_splits(DataOptions(train_csv=dup, images=image_dir))
    empty = write_csv(tmp_path / "empty.csv", ["image", "label"], [])
    with pytest.raises(FoproError, match="no rows"):
        load_splits(DataOptions(train_csv=empty, images=image_dir))
    (tmp_path / "blank.csv").write_text("")
    with pytest.raises(FoproError, match="empty"):
        load_splits(DataOptions(train_csv=tmp_path / "blank.csv", images=image_dir))
    train = write_csv(tmp_path / "train.csv", ["image", "label"], [["img0.png", "a"], ["img1.png", "b"]])
    test = write_csv(tmp_path / "test.csv", ["image", "label"], [["img2.png", "c"]])
    with pytest.raises(FoproError, match="label.*c.*not among the classes"):
        load_splits(DataOptions(train_csv=train, test_csv=test, images=image_dir))


# ------------------------------------------------------------------------------------------ ISIC-2019 LT

# ISIC_2019_Training_GroundTruth.csv column order, which `finding_name` indexes (see the data README).
ISIC_GROUND_TRUTH_COLUMNS = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]


def _isic_csv(name: str) -> Path:
    path = ISIC_DIR / name
    if not path.is_file():
        pytest.skip(f"{path} is not available")
    return path


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return list(csv.DictReader(handle))


def test_isic_class_constant_agrees_with_the_real_split_files() -> None:
    """`finding` (the label, ISIC2019_CLASSES order) and `finding_name` (ground-truth column) name the same class."""
    for name in ("train_skin1_0.01.csv", "test_skin1_0.01.csv"):
        rows = _read_rows(_isic_csv(name))
        for row in rows:
            assert ISIC2019_CLASSES[int(row["finding"])] == ISIC_GROUND_TRUTH_COLUMNS[int(row["finding_name"])]
        counts = np.bincount([int(r["finding"]) for r in rows], minlength=8)
        if name.startswith("train"):
            assert list(counts) == sorted(counts, reverse=True)  # ordered by training frequency
            assert counts[0] == 12725


def test_isic_csv_gives_the_class_names_in_finding_order(tmp_path: Path) -> None:
    header_source = _isic_csv("train_skin1_0.01.csv")
    rows = _read_rows(header_source)
    # the first rows, plus the first row of every class
    picked = rows[:6] + [next(r for r in rows if r["finding"] == str(c)) for c in range(8)]
    picked = list({r["image"]: r for r in picked}.values())
    test_rows = _read_rows(_isic_csv("test_skin1_0.01.csv"))[:3]
    images = tmp_path / "ISIC_2019_Training_Input"
    for i, row in enumerate(picked + test_rows):
        write_image(images / f"{row['image']}.jpg", seed=i, fmt="JPEG")
    columns = ["image", "finding_name", "finding"]
    train = write_csv(tmp_path / "train_skin1_0.01.csv", columns, [[r[c] for c in columns] for r in picked])
    test = write_csv(tmp_path / "test_skin1_0.01.csv", columns, [[r[c] for c in columns] for r in test_rows])

    splits = load_splits(DataOptions(train_csv=train, test_csv=test, images=images))
    assert splits.classes == ISIC2019_CLASSES == ["NV", "MEL", "BCC", "BKL", "AK", "SCC", "VASC", "DF"]
    manifest = splits["train"]
    for path, label, row in zip(manifest.paths, manifest.labels, picked):
        assert path == images / f"{row['image']}.jpg"
        assert label == int(row["finding"])
        assert manifest.classes[label] == ISIC_GROUND_TRUTH_COLUMNS[int(row["finding_name"])]
    assert manifest.counts_by_name()["DF"] == 1
    assert splits["test"].labels == [int(r["finding"]) for r in test_rows]

    # a split holding only a few of the classes still uses the full ISIC class order
    only_test = load_splits(DataOptions(test_csv=test, images=images), splits=("test",))
    assert only_test.classes == ISIC2019_CLASSES


def test_isic_csv_bad_finding(tmp_path: Path) -> None:
    images = tmp_path / "img"
    write_image(images / "ISIC_1.jpg", fmt="JPEG")
    bad = write_csv(tmp_path / "train.csv", ["image", "finding_name", "finding"], [["ISIC_1", "0", "8"]])
    with pytest.raises(FoproError, match=r"train.csv:2: finding '8'"):
        load_splits(DataOptions(train_csv=bad, images=images))


# ------------------------------------------------------------------------------------------ long tail


def test_longtail_counts_follow_the_exponential_profile() -> None:
    assert longtail_counts(100, 3, 0.01) == [100, 10, 1]
    assert longtail_counts(12725, 8, 0.01)[0] == 12725
    for n_max, classes, imbalance in [(500, 8, 0.01), (40, 5, 0.1), (64, 7, 0.5), (10, 4, 1.0)]:
        counts = longtail_counts(n_max, classes, imbalance)
        expected = [max(1, math.floor(n_max * imbalance ** (i / (classes - 1)) + 1e-9)) for i in range(classes)]
        assert counts == expected
        assert counts == sorted(counts, reverse=True)
    assert longtail_counts(7, 1, 0.1) == [7]
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(FoproError, match="outside"):
            longtail_counts(10, 3, bad)


def _balanced_manifest(classes: int, per_class: int) -> Manifest:
    labels = [c for c in range(classes) for _ in range(per_class)]
    return Manifest(paths=[Path(f"/x/{c}_{i}.png") for i, c in enumerate(labels)], labels=labels,
                    classes=[f"c{c}" for c in range(classes)])


def test_longtail_subsampling_counts_and_determinism() -> None:
    manifest = _balanced_manifest(5, 40)
    result = subsample_longtail(manifest, 0.1, seed=0)
    assert result.class_counts() == longtail_counts(40, 5, 0.1) == [40, 22, 12, 7, 4]
    again = subsample_longtail(manifest, 0.1, seed=0)
    assert again.paths == result.paths
    other = subsample_longtail(manifest, 0.1, seed=1)
    assert other.class_counts() == result.class_counts()
    assert other.paths != result.paths
    # the selection is a subset, in the original order
    positions = [manifest.paths.index(p) for p in result.paths]
    assert positions == sorted(positions)
    with pytest.raises(FoproError, match="--imbalance"):
        subsample_longtail(manifest, 2.0, seed=0)


def test_longtail_ranks_classes_by_available_count() -> None:
    labels = [0] * 5 + [1] * 20 + [2] * 10
    keep = longtail_indices(labels, 3, 0.25, seed=0)
    counts = np.bincount(np.asarray(labels)[keep], minlength=3).tolist()
    # class 1 is the most frequent (keeps 20), then class 2 (20 * 0.5 = 10), then class 0 (min(5, 5))
    assert counts == [5, 20, 10]


def test_imbalance_option_subsamples_only_train(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", {"train": {"a": 12, "b": 12, "c": 12}, "test": {"a": 2, "b": 2, "c": 2}})
    splits = load_splits(DataOptions(data=root, imbalance=0.25, seed=3))
    assert splits["train"].class_counts() == [12, 6, 3]
    assert splits["test"].class_counts() == [2, 2, 2]
    info = data_info(DataOptions(data=root, imbalance=0.25, seed=3), groups=LongTailGroups(head=10, tail=4))
    assert info["splits"]["train"] == {"a": 12, "b": 6, "c": 3}
    assert info["imbalance_ratio"] == pytest.approx(0.25)
    assert info["groups"] == {"a": "head", "b": "medium", "c": "tail"}
    assert info["imbalance_applied"] == 0.25
    seeds = {tuple(load_splits(DataOptions(data=root, imbalance=0.25, seed=s))["train"].paths) for s in range(4)}
    assert len(seeds) > 1


# ------------------------------------------------------------------------------------------ image modes


def _save(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def test_grayscale_and_palette_images(tmp_path: Path) -> None:
    gray = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) % 256
    path = _save(Image.fromarray(gray.astype(np.uint8), mode="L"), tmp_path / "l.png")
    tensor = load_image(path, 32)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 32, 32)
    for channel in tensor:
        assert torch.equal(channel, torch.from_numpy(gray.astype(np.uint8)))

    palette_image = Image.new("P", (32, 32))
    palette_image.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    palette_image.paste(1, (0, 0, 16, 32))
    path = _save(palette_image, tmp_path / "p.png")
    assert Image.open(path).mode == "P"
    tensor = load_image(path, 32)
    assert tensor[:, 0, 0].tolist() == [0, 255, 0]
    assert tensor[:, 0, 31].tolist() == [255, 0, 0]


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:, :16, 3] = 255  # left half opaque red, right half fully transparent
    path = _save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "rgba.png")
    tensor = load_image(path, 32)
    assert tensor[:, 5, 5].tolist() == [200, 0, 0]
    assert tensor[:, 5, 30].tolist() == [255, 255, 255]

    palette_image = Image.new("P", (32, 32), 0)
    palette_image.putpalette([0, 0, 255, 0, 0, 0] + [0, 0, 0] * 254)
    palette_image.info["transparency"] = 0
    path = tmp_path / "pt.png"
    palette_image.save(path, transparency=0)
    assert load_image(path, 32)[:, 3, 3].tolist() == [255, 255, 255]

    la = Image.fromarray(np.stack([np.full((32, 32), 10, np.uint8), np.zeros((32, 32), np.uint8)], -1), mode="LA")
    assert load_image(_save(la, tmp_path / "la.png"), 32)[:, 0, 0].tolist() == [255, 255, 255]


def test_16_bit_png_is_rescaled_not_clipped(tmp_path: Path) -> None:
    values = np.full((32, 32), 32768, dtype=np.uint16)
    values[0, :] = 65535
    values[1, :] = 0
    values[2, :] = 256
    path = tmp_path / "16bit.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    tensor = load_image(path, 32)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8
    assert abs(int(tensor[0, 10, 10]) - 128) <= 1  # clipping would give 255
    assert tensor[:, 0, 0].tolist() == [255, 255, 255]
    assert tensor[:, 1, 0].tolist() == [0, 0, 0]
    assert tensor[0, 2, 0].item() == 1  # 256 / 65535 * 255
    assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])


def test_float_and_cmyk_modes() -> None:
    floats = Image.fromarray(np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(8, 8), mode="F")
    array = to_rgb_array(floats)
    assert array.dtype == np.uint8 and array.shape == (8, 8, 3)
    assert array.min() == 0 and array.max() == 255
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert to_rgb_array(cmyk).shape == (4, 4, 3)


def test_resize_to_the_model_size(tmp_path: Path) -> None:
    path = write_image(tmp_path / "wide.png", size=32)
    Image.open(path).resize((48, 20)).save(path)
    assert load_image(path, 32).shape == (3, 32, 32)
    assert load_image(path, 16).shape == (3, 16, 16)
    flat = _save(Image.new("RGB", (40, 24), (10, 100, 200)), tmp_path / "flat.png")
    tensor = load_image(flat, 32)
    assert tensor.shape == (3, 32, 32)
    assert tensor[:, 16, 16].tolist() == [10, 100, 200]


# ------------------------------------------------------------------------------------------ dataset, augmentation


def _manifest(paths: list[Path], labels: list[int] | None = None, split: str = "train") -> Manifest:
    labels = labels if labels is not None else [i % 2 for i in range(len(paths))]
    return Manifest(paths=paths, labels=labels, classes=["a", "b"], split=split, source="test")


def test_eval_items_are_raw_images_in_0_1(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", seed=4)
    dataset = ImageDataset(_manifest([path], [1]), image_size=32)
    image, label, index = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert label == 1 and index == 0
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
    assert torch.equal(image, expected)
    assert torch.equal(dataset[0][0], image)


def test_augmentation_is_deterministic_per_seed_epoch_and_index(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", seed=5)
    paths = [path] * 4  # the same image at every index: only the augmentation differs
    dataset = ImageDataset(_manifest(paths), image_size=32, train=True, seed=7)
    first = [dataset[i][0] for i in range(4)]
    for image in first:
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert image.min() >= 0 and image.max() <= 1
    assert all(torch.equal(a, dataset[i][0]) for i, a in enumerate(first))
    assert not torch.equal(first[0], first[1])
    twin = ImageDataset(_manifest(paths), image_size=32, train=True, seed=7)
    assert torch.equal(twin[2][0], first[2])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0][0], first[0])
    dataset.set_epoch(0)
    assert torch.equal(dataset[0][0], first[0])
    other_seed = ImageDataset(_manifest(paths), image_size=32, train=True, seed=8)
    assert not torch.equal(other_seed[0][0], first[0])
    # a worker's global RNG state does not matter
    torch.manual_seed(123)
    assert torch.equal(dataset[3][0], first[3])


def test_dataset_cache_keeps_decoded_images(tmp_path: Path) -> None:
    paths = [write_image(tmp_path / f"{i}.png", seed=i) for i in range(3)]
    cached = ImageDataset(_manifest(paths), image_size=32, cache=True)
    before = [cached[i][0] for i in range(3)]
    uncached = ImageDataset(_manifest(paths), image_size=32, cache=False)
    uncached[0]
    for path in paths:
        path.unlink()
    assert all(torch.equal(cached[i][0], before[i]) for i in range(3))
    with pytest.raises(BadImageError, match="0.png"):
        uncached[0]
    # small datasets are cached by default
    assert ImageDataset(_manifest(paths), image_size=32)._cache is not None


@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".jpg", "JPEG")])
def test_checked_dataset_with_truncated_images(tmp_path: Path, suffix: str, fmt: str) -> None:
    paths = [write_image(tmp_path / f"img{i}{suffix}", seed=i, size=64, fmt=fmt) for i in range(5)]
    truncate(paths[1], 0.4)
    truncate(paths[3], 0.6)
    manifest = _manifest(paths, labels=[0, 1, 0, 1, 0], split="test")
    with pytest.raises(FoproError) as info:
        checked_dataset(manifest, 32, skip_bad_images=False)
    message = str(info.value)
    assert "\n" not in message
    assert f"img1{suffix}" in message and f"img3{suffix}" in message and "2 image(s)" in message
    assert "--skip-bad-images" in message

    dataset = checked_dataset(manifest, 32, skip_bad_images=True)
    assert len(dataset) == 3
    assert dataset.manifest.paths == [paths[0], paths[2], paths[4]]
    assert dataset.manifest.labels == [0, 0, 0]
    assert any("skipped 2" in note for note in dataset.manifest.notes)
    assert len(manifest) == 5 and not manifest.notes  # the input manifest is untouched
    images = [dataset[i][0] for i in range(len(dataset))]
    assert all(image.shape == (3, 32, 32) for image in images)


def test_checked_dataset_with_no_readable_image(tmp_path: Path) -> None:
    paths = [truncate(write_image(tmp_path / f"{i}.png", seed=i, size=64), 0.3) for i in range(2)]
    with pytest.raises(FoproError, match="none of the 2 image") as info:
        checked_dataset(_manifest(paths, split="test"), 32, skip_bad_images=True)
    assert "0.png" in str(info.value) and "\n" not in str(info.value)


def test_not_an_image_at_all(tmp_path: Path) -> None:
    bad = tmp_path / "text.png"
    bad.write_text("hello")
    with pytest.raises(BadImageError, match="text.png"):
        load_image(bad, 32)
    good = write_image(tmp_path / "good.png")
    dataset = checked_dataset(_manifest([good, bad]), 32, skip_bad_images=True)
    assert dataset.manifest.paths == [good]


def test_data_info_reports_counts_and_groups(folder: Path) -> None:
    info = data_info(DataOptions(data=folder), groups=LongTailGroups(head=4, tail=3))
    assert info["classes"] == ["ak", "benign", "melanoma"]
    assert info["splits"] == {
        "train": {"ak": 2, "benign": 3, "melanoma": 5},
        "val": {"ak": 1, "benign": 1, "melanoma": 1},
        "test": {"ak": 2, "benign": 2, "melanoma": 2},
    }
    assert info["imbalance_ratio"] == pytest.approx(2 / 5)
    assert info["groups"] == {"ak": "tail", "benign": "medium", "melanoma": "head"}
    assert "imbalance_applied" not in info
    shutil.rmtree(folder / "train")
    assert "groups" not in data_info(DataOptions(data=folder))


# --- what a careless or hostile data folder holds (issue: hardening) ----------------------------------


def test_images_in_hidden_sub_folders_are_not_read(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}})
    write_image(root / "train" / "a" / ".ipynb_checkpoints" / "a_000-checkpoint.png")
    write_image(root / "train" / "a" / "scans" / "a_extra.png")  # a visible sub-folder is read
    manifest = load_splits(DataOptions(data=root))["train"]
    assert sorted(p.name for p in manifest.paths) == ["a_000.png", "a_001.png", "a_extra.png", "b_000.png", "b_001.png"]


def test_a_semicolon_csv_is_read_like_a_comma_one(tmp_path: Path, image_dir: Path) -> None:
    rows = [["img0.png", "a"], ["img1.png", "a"], ["img2.png", "b"]]
    comma = write_csv(tmp_path / "comma.csv", ["image", "label"], rows)
    semicolon = tmp_path / "semicolon.csv"
    semicolon.write_text("image;label\n" + "".join(f"{image};{label}\n" for image, label in rows), encoding="utf-8")
    read = lambda path: load_splits(DataOptions(train_csv=path, images=image_dir))["train"]  # noqa: E731
    assert (read(semicolon).paths, read(semicolon).labels) == (read(comma).paths, read(comma).labels)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A phone / dermoscope JPEG stored sideways with orientation 6 (rotate 90 clockwise to display) loads upright."""
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, :16] = 255  # left half white, as stored (32 wide, 16 high)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "sideways.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    upright = np.asarray(Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270))  # what a viewer shows: 16 x 32
    loaded = load_image(path, 32).permute(1, 2, 0).numpy()
    expected = np.asarray(Image.fromarray(upright).resize((32, 32), Image.BILINEAR))
    assert np.abs(loaded.astype(int) - expected.astype(int)).mean() < 20  # JPEG and resampling noise only
    assert loaded[:16].mean() > 200 and loaded[16:].mean() < 55  # top white: the stored left half is now on top


def test_a_fifo_listed_in_a_csv_is_not_read(tmp_path: Path, image_dir: Path) -> None:
    import os

    os.mkfifo(tmp_path / "pipe.png")
    csv_path = write_csv(tmp_path / "train.csv", ["image", "label"], [["img0.png", "a"], [str(tmp_path / "pipe.png"), "b"]])
    with pytest.raises(FoproError, match="not regular files"):
        load_splits(DataOptions(train_csv=csv_path, images=image_dir))


def test_the_pixel_limit_is_an_option(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}}, size=32)
    manifest = load_splits(DataOptions(data=root, decode=DecodeOptions(max_pixels=32 * 32 - 1)))["train"]
    with pytest.raises(FoproError, match=r"32 x 32 pixels is above the limit of 1,023 pixels \(--max-image-pixels\)"):
        checked_dataset(manifest, 32, skip_bad_images=False)
    assert len(checked_dataset(load_splits(DataOptions(data=root, decode=DecodeOptions(max_pixels=32 * 32)))["train"], 32, False)) == 4


def test_an_image_id_without_extension_finds_its_file(tmp_path: Path) -> None:
    images = tmp_path / "images"
    write_image(images / "ISIC_0000001.jpg")
    write_image(images / "ISIC_0000002.png")
    csv_path = write_csv(tmp_path / "train.csv", ["image_id", "dx"], [["ISIC_0000001", "nv"], ["ISIC_0000002", "mel"]])
    manifest = load_splits(DataOptions(train_csv=csv_path, images=images, image_column="image_id", label_column="dx"))["train"]
    assert [p.name for p in manifest.paths] == ["ISIC_0000001.jpg", "ISIC_0000002.png"]
