"""Small builders shared by the data / model / checkpoint / CLI tests: tiny images, folders, checkpoints."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

os.environ["HF_HUB_OFFLINE"] = "1"

# /work/shared (../shared relative to the checkout): the real ISIC-2019 LT split CSVs, when present.
ISIC_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic2019-lt"


def write_image(path: Path, seed: int = 0, size: int = 32, fmt: str | None = None) -> Path:
    """A random RGB image of size x size (PNG or JPEG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(array).save(path, format=fmt)
    return path


def make_image_folder(root: Path, counts: dict[str, dict[str, int]], size: int = 32, ext: str = ".png") -> Path:
    """ROOT/<split>/<class>/<i>.png with counts[split][class] images each."""
    seed = 0
    for split, per_class in counts.items():
        for name, n in per_class.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                write_image(root / split / name / f"{name}_{i:03d}{ext}", seed=seed, size=size)
    return root


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def tiny_checkpoint(path: Path, classes: list[str], arch: str = "test_resnet", image_size: int = 32,
                    train_counts: list[int] | None = None, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """A randomly initialised timm model saved as a fopro checkpoint; returns (weights path, model)."""
    import timm

    from fopro.checkpoint import CheckpointMeta, save_checkpoint

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=len(classes)).eval()
    meta = CheckpointMeta(
        arch=arch,
        classes=list(classes),
        image_size=image_size,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        train_counts=train_counts,
        epoch=3,
        metrics={"val_balanced_accuracy": 0.5},
        config={"seed": seed},
    )
    return save_checkpoint(path, model.state_dict(), meta), model


def one_line(info, *parts: str) -> str:
    """The message of a raised error (pytest.ExceptionInfo): one line, containing every part."""
    message = str(info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message
