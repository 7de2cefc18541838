"""Image decoding (any mode -> RGB), seeded augmentation, and the dataset of RAW [0, 1] images.

Normalisation is not done here: it happens at each model's door, because the Fourier prompt acts on
the raw image and teacher and student have different mean/std and input sizes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from fopro.data.augment import DEFAULT_PRESET, PRESETS, AugmentConfig, augment
from fopro.data.dicom import is_dicom, read_dicom
from fopro.data.manifest import MAX_IMAGE_PIXELS, DecodeOptions, Manifest
from fopro.errors import FoproError

CACHE_LIMIT_BYTES = 2 * 1024**3
MAX_LISTED = 5
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK...) -> uint8 HxWx3; high bit depths are rescaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        peak = 65535.0 if image.mode.startswith("I;16") else max(high, 1.0)
        if image.mode == "F" or low < 0:
            array, peak = array - low, max(high - low, 1e-12)
        gray = np.clip(np.round(array / peak * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def open_image(path: Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """PIL's lazy image of a regular file of at most max_pixels pixels (header read only); BadImageError otherwise."""
    if not path.is_file():
        raise BadImageError(path, "not a regular file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except DECODE_ERRORS as err:
            raise BadImageError(path, str(err)) from err
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise BadImageError(path, f"{width} x {height} pixels is above the limit of {max_pixels:,} pixels (--max-image-pixels); downscale or tile it")
    return image


def decode_rgb(path: Path, size: int, decode: DecodeOptions = DecodeOptions()) -> np.ndarray:
    """uint8 H x W x 3 of any image file fopro reads (DICOM included), upright as displayed (EXIF orientation
    applied); large JPEGs are decoded at a reduced scale (still at least 2 x size) first."""
    if is_dicom(path):
        if not path.is_file():
            raise BadImageError(path, "not a regular file")
        try:
            array = read_dicom(path, decode.dicom_window)
        except ValueError as err:
            raise BadImageError(path, str(err)) from err
        if array.shape[0] * array.shape[1] > decode.max_pixels:
            raise BadImageError(path, f"{array.shape[1]} x {array.shape[0]} pixels is above the limit of {decode.max_pixels:,} pixels (--max-image-pixels)")
        return array
    with open_image(path, decode.max_pixels) as image:
        try:
            if image.format == "JPEG" and min(image.size) >= 4 * size:
                image.draft("RGB", (2 * size, 2 * size))
            image.load()
            return to_rgb_array(ImageOps.exif_transpose(image))
        except DECODE_ERRORS as err:
            raise BadImageError(path, str(err)) from err


def load_image(path: Path, size: int, decode: DecodeOptions = DecodeOptions()) -> torch.Tensor:
    """Decode `path` to a uint8 tensor 3 x size x size (square resize, antialiased)."""
    return square_resize(decode_rgb(path, size, decode), size)


def square_resize(array: np.ndarray, size: int) -> torch.Tensor:
    """uint8 H x W x 3 -> uint8 tensor 3 x size x size (bilinear, antialiased), the loader's resize."""
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # PIL's buffer is read-only: torch warns and sharing it is undefined
        array = array.copy()
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    if tensor.shape[1:] != (size, size):
        tensor = F.interpolate(tensor[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        tensor = tensor[0].round().clamp(0, 255).to(torch.uint8)
    return tensor


def verify_image(path: Path, decode: DecodeOptions = DecodeOptions()) -> None:
    if is_dicom(path):  # a DICOM header says little: decode it
        decode_rgb(path, 0, decode)
        return
    with open_image(path, decode.max_pixels) as image:
        try:
            image.verify()
        except DECODE_ERRORS as err:
            raise BadImageError(path, str(err)) from err


class BadImageError(FoproError):
    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} cannot be read as an image ({reason}): replace it, or pass --skip-bad-images")
        self.path = path
        self.reason = reason


class ImageDataset(torch.utils.data.Dataset):
    """Raw images in [0, 1] (float 3xSxS), their labels and indices.

    With `train=True`, each item is augmented with a generator seeded by (seed, epoch, index), so the
    result does not depend on the worker that loads it or on where a resumed run restarts.
    With `cache=True`, decoded images are kept in memory (uint8) after the first read.
    """

    def __init__(
        self,
        manifest: Manifest,
        image_size: int,
        train: bool = False,
        seed: int = 0,
        augment_config: AugmentConfig | None = None,
        cache: bool | None = None,
    ):
        self.manifest = manifest
        self.image_size = image_size
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.augment_config = augment_config or PRESETS[DEFAULT_PRESET]
        if manifest.prepared is not None:
            manifest.prepared.check_size(image_size)
        if cache is None:
            cache = len(manifest) * 3 * image_size * image_size <= CACHE_LIMIT_BYTES
        self._cache: list[torch.Tensor | None] | None = [None] * len(manifest) if cache else None

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def raw(self, index: int) -> torch.Tensor:
        if self._cache is None:
            return self._decoded(index)
        cached = self._cache[index]
        if cached is None:
            cached = self._cache[index] = self._decoded(index)
        return cached

    def _decoded(self, index: int) -> torch.Tensor:
        if self.manifest.prepared is not None:  # a prepared cache holds what load_image makes of the file
            return self.manifest.prepared.image(index)
        return load_image(self.manifest.paths[index], self.image_size, self.manifest.decode)

    def scan(self) -> dict[int, str]:
        """The images that cannot be read: {index: why}.

        With the cache on, every image is decoded once (filling the cache, catching truncated files);
        without it (large datasets), only the headers are verified and a bad image fails when loaded.
        """
        bad = {}
        for index in range(len(self)):
            try:
                if self._cache is None:
                    if self.manifest.prepared is None:  # a prepared cache holds only images that decoded
                        verify_image(self.manifest.paths[index], self.manifest.decode)
                else:
                    self.raw(index)
            except BadImageError as err:
                bad[index] = err.reason
        return bad

    def keep(self, indices: list[int]) -> None:
        self.manifest = self.manifest.subset(indices)
        if self._cache is not None:
            self._cache = [self._cache[i] for i in indices]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image = self.raw(index).float().div_(255.0)
        if self.train:
            generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
            image = augment(image, generator, self.augment_config)
        return image, self.manifest.labels[index], index


def item_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + index) % (2**63 - 1)


def checked_dataset(
    manifest: Manifest,
    image_size: int,
    skip_bad_images: bool,
    train: bool = False,
    seed: int = 0,
    augment_config: AugmentConfig | None = None,
) -> ImageDataset:
    """An ImageDataset whose images all decode: fail listing the unreadable ones, or drop them with a note."""
    dataset = ImageDataset(manifest, image_size, train=train, seed=seed, augment_config=augment_config)
    bad = dataset.scan()
    if not bad:
        return dataset
    check_unreadable(manifest, bad, skip_bad_images)
    bad_set = set(bad)
    dataset.keep([i for i in range(len(manifest)) if i not in bad_set])
    dataset.manifest.notes.append(skipped_note(manifest, len(bad)))
    return dataset


def skipped_note(manifest: Manifest, count: int) -> str:
    return f"skipped {count} unreadable image(s) of the {manifest.split} split (--skip-bad-images)"


def check_unreadable(manifest: Manifest, bad: dict[int, str], skip_bad_images: bool) -> None:
    """Fail on the unreadable images `bad` ({index: why}) of `manifest`, listing a few, unless they are to be
    skipped and some image is left."""
    if not bad:
        return
    paths = [str(manifest.paths[i]) for i in bad]
    first = next(iter(bad.values()))
    if skip_bad_images and len(bad) == len(manifest):
        raise FoproError(
            f"none of the {len(bad)} image(s) of the {manifest.split} split can be read, e.g. {', '.join(paths[:MAX_LISTED])}: "
            "nothing is left to use; replace them or check the data path"
        )
    if not skip_bad_images:
        raise FoproError(
            f"{len(bad)} image(s) of the {manifest.split} split cannot be read, e.g. {', '.join(paths[:MAX_LISTED])} "
            f"(the first: {first}): replace them, or pass --skip-bad-images to leave them out"
        )
