"""One type for every data source: image paths, integer labels, and the class names they index."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fopro.errors import FoproError

UNLABELED = -1  # the label of an unlabelled image (--unlabeled): the supervised losses skip it
# Larger images are unreadable images (a decompression bomb, or a scan no classifier input needs): 64 megapixels
# is an 8000 x 8000 image, ~190 MB decoded; whole-slide images must be tiled first (--max-image-pixels).
MAX_IMAGE_PIXELS = 64_000_000


@dataclass(frozen=True)
class DecodeOptions:
    """How the images of a manifest are decoded (the data options --max-image-pixels and --dicom-window)."""

    max_pixels: int = MAX_IMAGE_PIXELS  # images with more pixels count as unreadable
    dicom_window: tuple[float, float] | None = None  # (center, width) for every DICOM image; None: the file's, else min-max


class PreparedImages(Protocol):
    """Images decoded ahead of time (fopro.data.cache.CachedImages): `image(i)` is image i as uint8 3 x S x S."""

    image_size: int

    def subset(self, indices: list[int]) -> PreparedImages: ...

    def image(self, index: int) -> Any: ...

    def check_size(self, image_size: int) -> None: ...


def has_control_characters(text: str) -> bool:
    """Terminal escapes, line breaks, bidirectional overrides, zero-width marks: text that must not reach a screen."""
    return any(unicodedata.category(char) in ("Cc", "Cf") for char in text)


def check_class_names(names: Iterable[str], source: str) -> None:
    """Class names come from folders, CSVs, checkpoints and ONNX files, and are printed: refuse control characters."""
    bad = next((name for name in names if has_control_characters(name)), None)
    if bad is not None:
        raise FoproError(f"{source}: the class name {ascii(bad)} holds control characters (escapes, line breaks): rename that class")


@dataclass
class Manifest:
    """A labelled list of images of one split; `labels[i]` indexes `classes`."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]
    split: str = "train"
    source: str = ""
    notes: list[str] = field(default_factory=list)
    decode: DecodeOptions = DecodeOptions()
    prepared: PreparedImages | None = None  # set when the data is a prepared cache (fopro data prepare)

    def __post_init__(self) -> None:
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels differ in length")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> list[int]:
        """Images per class, in class-index order (zeros included)."""
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=self.num_classes).tolist()

    def counts_by_name(self) -> dict[str, int]:
        return dict(zip(self.classes, self.class_counts()))

    def subset(self, indices: list[int]) -> "Manifest":
        return Manifest(
            paths=[self.paths[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            classes=list(self.classes),
            split=self.split,
            source=self.source,
            notes=list(self.notes),
            decode=self.decode,
            prepared=None if self.prepared is None else self.prepared.subset(indices),
        )

    def image_ids(self) -> list[str]:
        """A readable id per image: the path relative to the common root where possible."""
        return [p.name if len(p.parts) < 2 else f"{p.parent.name}/{p.name}" for p in self.paths]
