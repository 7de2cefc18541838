"""Reading a prepared image cache (`fopro data prepare`): a folder of pre-decoded uint8 images, one .npy per split.

A cache folder holds INDEX_FILE (classes, splits, each image's source path, label and row, the image size and
the decode options) and SPLIT.npy arrays of shape (rows, 3, size, size): the exact tensors `load_image` makes
from the source files, so a run on the cache sees the same pixels as a run on the originals.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fopro.data.manifest import DecodeOptions
from fopro.errors import FoproError

INDEX_FILE = "fopro-cache.json"
FORMAT = "fopro-image-cache"
VERSION = 1


def is_cache(folder: Path | None) -> bool:
    return folder is not None and (Path(folder) / INDEX_FILE).is_file()


class CachedImages:
    """The images of one manifest inside a split's array: `image(i)` is manifest image i (uint8 3 x S x S).

    The array is memory-mapped on first use in each process (a DataLoader worker maps its own), never pickled.
    """

    def __init__(self, file: Path, image_size: int, rows: Sequence[int]):
        self.file = Path(file)
        self.image_size = image_size
        self.rows = list(rows)
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def subset(self, indices: Sequence[int]) -> CachedImages:
        return CachedImages(self.file, self.image_size, [self.rows[i] for i in indices])

    def image(self, index: int) -> torch.Tensor:
        if self._array is None:
            self._array = open_array(self.file, self.image_size, max(self.rows, default=-1) + 1)
        return torch.from_numpy(np.array(self._array[self.rows[index]]))

    def check_size(self, image_size: int) -> None:
        if image_size != self.image_size:
            raise FoproError(
                f"--data {self.file.parent} is an image cache of {self.image_size}-px images, but {image_size}-px images are needed "
                f"(--image-size or the model's input size): prepare a cache with fopro data prepare --image-size {image_size}, "
                "or give the original data"
            )


def open_array(file: Path, image_size: int, min_rows: int) -> np.ndarray:
    """The memory-mapped uint8 (rows, 3, S, S) array of a split; a one-line error if it is missing or damaged."""
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise FoproError(f"{file} of the image cache cannot be read ({err}): prepare the cache again with fopro data prepare --overwrite") from err
    expected = (3, image_size, image_size)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != expected or array.shape[0] < min_rows:
        raise FoproError(
            f"{file} of the image cache holds a {array.dtype} array of shape {array.shape}, not at least {min_rows} "
            f"uint8 images of {expected}: prepare the cache again with fopro data prepare --overwrite"
        )
    return array


@dataclass
class CacheSplit:
    file: str  # the array, relative to the cache folder
    source: str  # the folder or CSV the split was read from
    paths: list[str]
    labels: list[str]  # class names
    rows: list[int]  # each image's row in the array
    notes: list[str]  # what preparing it left out (--skip-bad-images)


@dataclass
class CacheIndex:
    folder: Path
    image_size: int
    classes: list[str]
    splits: dict[str, CacheSplit]
    decode: DecodeOptions

    def rows(self, splits: Sequence[str]) -> dict[str, tuple[list[tuple[Path, str]], str]]:
        """The (source path, class name) rows and the source of each requested split the cache holds."""
        return {
            split: (list(zip(map(Path, entry.paths), entry.labels)), f"{self.folder} (prepared from {entry.source})")
            for split, entry in self.splits.items()
            if split in splits
        }

    def images(self, split: str) -> CachedImages:
        entry = self.splits[split]
        return CachedImages(self.folder / entry.file, self.image_size, entry.rows)

    def check_decode(self, decode: DecodeOptions) -> None:
        """Decode options only matter when decoding: a cache keeps the ones it was prepared with."""
        if decode not in (DecodeOptions(), self.decode):
            raise FoproError(
                f"--data {self.folder} is an image cache decoded with --max-image-pixels {self.decode.max_pixels} and "
                f"--dicom-window {self.decode.dicom_window}: other decode options need a cache prepared with them"
            )


def read_index(folder: Path) -> CacheIndex:
    """The index of a cache folder, checked; a one-line error naming the file otherwise."""
    path = Path(folder) / INDEX_FILE
    again = "prepare the cache again with fopro data prepare --overwrite"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FoproError(f"{path} is not a readable image-cache index ({err}): {again}") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FoproError(f"{path} is not a fopro image-cache index (no \"format\": \"{FORMAT}\"): {again}")
    if data.get("version") != VERSION:
        raise FoproError(f"{path} is an image cache of version {data.get('version')}; this fopro reads version {VERSION}: {again}")
    try:
        decode = data["decode"]
        window = decode["dicom_window"]
        splits = {
            name: CacheSplit(file=str(s["file"]), source=str(s["source"]), paths=[str(i["path"]) for i in s["images"]],
                             labels=[str(i["label"]) for i in s["images"]], rows=[int(i["row"]) for i in s["images"]],
                             notes=[str(n) for n in s.get("notes", [])])
            for name, s in data["splits"].items()
        }
        return CacheIndex(
            folder=Path(folder),
            image_size=int(data["image_size"]),
            classes=[str(c) for c in data["classes"]],
            splits=splits,
            decode=DecodeOptions(max_pixels=int(decode["max_pixels"]), dicom_window=None if window is None else (float(window[0]), float(window[1]))),
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise FoproError(f"{path}: the image-cache index is incomplete ({type(err).__name__}: {err}): {again}") from err
