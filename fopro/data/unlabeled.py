"""Unlabelled images (`--unlabeled PATH`): a folder of images or a CSV column of image paths -> one Manifest.

They carry no class: the manifest has ``classes=[]`` and ``labels=[-1] * n`` (``split="unlabeled"``), so
``class_counts()`` / ``counts_by_name()`` do not apply to it; ``len``, ``paths``, ``subset`` and
``image_ids`` do, and so does ``ImageDataset`` (the label of every item is -1).
"""

from __future__ import annotations

import os
from pathlib import Path

from fopro.data.manifest import UNLABELED, Manifest
from fopro.data.sources import (
    IMAGE_COLUMN_CANDIDATES,
    IMAGE_EXTENSIONS,
    MAX_LISTED,
    resolve_image,
    read_csv_records,
)
from fopro.errors import FoproError

UNLABELED_SPLIT = "unlabeled"


def read_unlabeled(path: Path, images: Path | None = None, image_column: str | None = None) -> Manifest:
    """The unlabelled images of `path`: a folder (every image in it, recursively) or a CSV with a column of paths.

    A folder is searched recursively whatever its sub-folders (class folders are allowed; their names are
    ignored), in sorted order, skipping hidden files and folders and not following symlinked folders.
    A CSV's image column is `image_column`, else the first of IMAGE_COLUMN_CANDIDATES present (any case);
    other columns (labels...) are ignored; relative paths resolve against `images`, else the CSV's folder.
    """
    path = Path(path)
    option = f"--unlabeled {path}"
    if not path.exists():
        raise FoproError(f"{option} does not exist: give a folder of images or a CSV file with a column of image paths")
    if path.is_dir():
        paths = _folder_images(path, option)
    elif path.suffix.lower() in IMAGE_EXTENSIONS:
        raise FoproError(f"{option} is a single image: give the folder that holds the unlabelled images, or a CSV listing them")
    else:
        paths = _csv_images(path, option, images, image_column)
    return Manifest(paths=paths, labels=[UNLABELED] * len(paths), classes=[], split=UNLABELED_SPLIT, source=str(path))


def _folder_images(root: Path, option: str) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(root):  # os.walk does not descend into symlinked folders
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            file = Path(folder) / name
            if not name.startswith(".") and file.suffix.lower() in IMAGE_EXTENSIONS and file.is_file():
                found.append(file)
    if not found:
        raise FoproError(
            f"{option} holds no images ({', '.join(IMAGE_EXTENSIONS)}, searched recursively, hidden files skipped): "
            "put the unlabelled images in it or give another folder"
        )
    return sorted(found)


def _csv_images(path: Path, option: str, images: Path | None, image_column: str | None) -> list[Path]:
    if images is not None and not Path(images).is_dir():
        raise FoproError(f"--images {images} is not a folder: give the folder the image paths of {option} are relative to")
    root = Path(images) if images is not None else path.parent
    header, records = read_csv_records(path, option)
    column = _image_column(header, option, image_column)
    missing = []
    paths = []
    for line, record in enumerate(records, start=2):  # line 1 is the header
        value = record.get(column, "")
        image = resolve_image(root, value) if value else None
        if image is None or not image.is_file():
            missing.append(f"line {line}: {value or '(empty)'}")
        else:
            paths.append(image)
    if missing:
        raise FoproError(
            f"{option}: {len(missing)} of {len(records)} images do not exist, e.g. {', '.join(missing[:MAX_LISTED])} "
            f"(relative paths are read from {root}): fix the '{column}' column, or give the image folder with --images"
        )
    return paths


def _image_column(header: list[str], option: str, chosen: str | None) -> str:
    if chosen is not None:
        if chosen not in header:
            raise FoproError(f"{option} has no column '{chosen}' (--image-column); its columns are: {', '.join(header)}")
        return chosen
    lowered = {h.lower(): h for h in header}
    for candidate in IMAGE_COLUMN_CANDIDATES:
        if candidate in lowered:
            return lowered[candidate]
    hint = ""
    if any(Path(h).suffix.lower() in IMAGE_EXTENSIONS for h in header):
        hint = "; its first line looks like an image path, so add a header line such as 'image'"
    raise FoproError(
        f"{option} has no image column (columns: {', '.join(header)}){hint}: name the column with --image-column "
        f"or call it one of {', '.join(IMAGE_COLUMN_CANDIDATES)}"
    )
