"""`fopro data prepare`: decode and resize a dataset once into an image cache (see fopro.data.cache).

Each image is made exactly as the loader makes it every epoch (`load_image`: JPEG draft decoding, EXIF
orientation, square antialiased resize to the training size), so a run on the cache sees the same pixels, and
gives the same metrics, as a run on the original files. The images of a split go to one uint8 array
(SPLIT.npy, rows x 3 x S x S) that runs memory-map; the folder is written under a temporary name and renamed.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fopro import __version__
from fopro.config import IMAGE_SIZE
from fopro.data.cache import FORMAT, INDEX_FILE, VERSION, is_cache
from fopro.data.images import BadImageError, check_unreadable, load_image, skipped_note
from fopro.data.manifest import DecodeOptions, Manifest
from fopro.data.sources import DataOptions, Splits, load_splits
from fopro.errors import FoproError
from fopro.io import check_output_folder, write_json
from fopro.runtime import ProgressFn, no_progress

DEFAULT_IMAGE_SIZE = 224
CHUNK = 16  # images per task sent to a worker process


@dataclass(frozen=True)
class PrepareOptions:
    image_size: int = DEFAULT_IMAGE_SIZE  # the side of the square images the runs use (distill --image-size)
    workers: int | None = None  # decoding processes; None: every usable core
    overwrite: bool = False  # replace an image cache already in the output folder


def prepare_cache(data: DataOptions, out: Path, options: PrepareOptions = PrepareOptions(), progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Decode every image of the data's splits once into the cache folder `out`; returns the summary."""
    out = Path(out)
    workers = check_options(options)
    if is_cache(data.data):
        raise FoproError(f"--data {data.data} is an image cache already: give the original data (the folder or the CSVs) to prepare")
    check_output(out, data, options.overwrite)
    splits = load_splits(data)
    total = sum(len(m) for m in splits.manifests.values())
    check_free_space(out, total * image_bytes(options.image_size))
    start = time.perf_counter()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        work.chmod(0o777 & ~umask)  # mkdtemp makes 0700 folders; the cache gets the usual permissions
    except OSError as err:
        raise FoproError(f"cannot write --out {out}: {err.strerror}; choose a writable folder") from err
    try:
        entries = write_arrays(work, splits, options.image_size, workers, data.skip_bad_images, progress)
        write_json(work / INDEX_FILE, index(splits, entries, options.image_size, data))
        move_into_place(work, out)
    except OSError as err:
        raise FoproError(f"cannot write the image cache {out}: {err.strerror or err}; check the free space and permissions") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    return summary(out, splits, entries, options.image_size, workers, seconds)


def check_options(options: PrepareOptions) -> int:
    """The number of worker processes, after checking the options."""
    if not IMAGE_SIZE.ok(options.image_size):
        raise FoproError(f"--image-size {options.image_size} {IMAGE_SIZE.says}")
    if options.workers is not None and options.workers < 1:
        raise FoproError(f"--workers {options.workers} must be at least 1 (one process decodes in series)")
    return options.workers or usable_cores()


def usable_cores() -> int:
    """The cores this process may run on (a container's or a job's share), else every core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_output(out: Path, data: DataOptions, overwrite: bool) -> None:
    """Refuse an output that holds anything but an image cache, and an image cache without --overwrite."""
    check_output_folder(out, "--out", (data.data, data.images))
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not is_cache(out):
        raise FoproError(f"--out {out} is a folder with files that are not an image cache: choose a new or empty folder")
    if not overwrite:
        raise FoproError(f"--out {out} already holds an image cache: pass --overwrite to replace it, or choose another folder")


def image_bytes(image_size: int) -> int:
    return 3 * image_size * image_size


def check_free_space(out: Path, needed: int) -> None:
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise FoproError(f"--out {out}: the cache needs {needed / 1e9:.2f} GB and {existing} has {free / 1e9:.2f} GB free: free space or choose another disk")


def write_arrays(work: Path, splits: Splits, image_size: int, workers: int, skip_bad_images: bool, progress: ProgressFn) -> dict[str, dict]:
    """Decode each split into work/SPLIT.npy; returns each split's index entry (unreadable images left out)."""
    total = sum(len(m) for m in splits.manifests.values())
    done = 0
    progress("decoding images", 0, total)
    entries = {}
    with ImageDecoder(workers, image_size) as decode_all:
        for split, manifest in splits.manifests.items():
            array = np.lib.format.open_memmap(work / f"{split}.npy", mode="w+", dtype=np.uint8, shape=(len(manifest), 3, image_size, image_size))
            bad = {}
            for index, (image, reason) in enumerate(decode_all(manifest)):
                if image is None:
                    bad[index] = reason
                else:
                    array[index] = image
                done += 1
                progress("decoding images", done, total)
            array.flush()
            del array
            check_unreadable(manifest, bad, skip_bad_images)
            entries[split] = split_entry(split, manifest, bad)
    return entries


def split_entry(split: str, manifest: Manifest, bad: dict[int, str]) -> dict[str, Any]:
    """A split's part of the index: every readable image's source path, class name and row (its manifest index)."""
    images = [
        {"path": str(path.absolute()), "label": manifest.classes[label], "row": row}
        for row, (path, label) in enumerate(zip(manifest.paths, manifest.labels))
        if row not in bad
    ]
    notes = [skipped_note(manifest, len(bad))] if bad else []
    return {"file": f"{split}.npy", "source": manifest.source, "count": len(images), "skipped": len(bad), "notes": notes, "images": images}


class ImageDecoder:
    """`with ImageDecoder(workers, size) as decode_all`: decode_all(manifest) yields (uint8 3 x S x S array or
    None, why not) per image, in order; more than one worker decodes in a pool of processes."""

    def __init__(self, workers: int, image_size: int):
        self.workers = workers
        self.image_size = image_size
        self.pool: Any = None

    def __enter__(self) -> Callable[[Manifest], Iterator[tuple[np.ndarray | None, str]]]:
        if self.workers > 1:
            self.pool = multiprocessing.Pool(self.workers, initializer=single_thread)
        return self.decode_all

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def decode_all(self, manifest: Manifest) -> Iterator[tuple[np.ndarray | None, str]]:
        decode = partial(decode_one, image_size=self.image_size, decode=manifest.decode)
        if self.pool is None:
            return map(decode, manifest.paths)
        return self.pool.imap(decode, manifest.paths, chunksize=CHUNK)


def single_thread() -> None:
    """Worker processes decode one image each at a time: torch's own threads would only compete for the cores."""
    torch.set_num_threads(1)


def decode_one(path: Path, image_size: int, decode: DecodeOptions) -> tuple[np.ndarray | None, str]:
    try:
        return load_image(path, image_size, decode).numpy(), ""
    except BadImageError as err:
        return None, err.reason


def move_into_place(work: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an old cache (or empty folder) there is moved aside first, then removed."""
    if not out.exists():
        work.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(old / out.name)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def index(splits: Splits, entries: dict[str, dict], image_size: int, data: DataOptions) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "fopro": __version__,
        "image_size": image_size,
        "resize": "as the loader: JPEG draft decoding, EXIF orientation, square bilinear antialiased resize (fopro.data.images.load_image)",
        "classes": list(splits.classes),
        "decode": {"max_pixels": data.decode.max_pixels, "dicom_window": data.decode.dicom_window},
        "data": {key: str(value) if isinstance(value, Path) else value for key, value in asdict(data).items() if key != "decode"},
        "splits": entries,
    }


def summary(out: Path, splits: Splits, entries: dict[str, dict], image_size: int, workers: int, seconds: float) -> dict[str, Any]:
    images = sum(entry["count"] for entry in entries.values())
    decoded = sum(len(m) for m in splits.manifests.values())
    return {
        "out": str(out),
        "image_size": image_size,
        "classes": list(splits.classes),
        "splits": {split: {"images": entry["count"], "skipped": entry["skipped"]} for split, entry in entries.items()},
        "images": images,
        "bytes": sum((out / entry["file"]).stat().st_size for entry in entries.values()),
        "workers": workers,
        "seconds": round(seconds, 3),
        "images_per_second": round(decoded / seconds, 1) if seconds > 0 else None,
        "notes": [note for entry in entries.values() for note in entry["notes"]],
    }
