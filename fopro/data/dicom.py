"""DICOM images (`pip install "fopro[dicom]"`: pydicom), decoded to the same uint8 RGB as every other image.

Grey images: the stored values go through the modality LUT (RescaleSlope / RescaleIntercept: Hounsfield units
for CT), then a window: `--dicom-window CENTER,WIDTH` when given, else the file's VOI LUT or window (auto),
else the image's own min-max; the window is mapped to 0-255 and MONOCHROME1 (bright = low values) is inverted.
Colour images (RGB, YBR_*) are converted to RGB and scaled to 8 bits. Of a multi-frame file the first frame is
used. pydicom is optional: only a DICOM file asks for it, with a one-line install hint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fopro.errors import FoproError

DICM_OFFSET = 128  # a DICOM Part 10 file: 128 bytes of preamble, then b"DICM"
INSTALL_HINT = 'install the DICOM extra: pip install "fopro[dicom]"'


def has_dicom_preamble(path: Path) -> bool:
    """Whether a file (e.g. one without an extension) is a DICOM Part 10 file."""
    try:
        with open(path, "rb") as handle:
            handle.seek(DICM_OFFSET)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom(path: Path) -> bool:
    return path.suffix.lower() == ".dcm" or (not path.suffix and has_dicom_preamble(path))


def parse_window(text: str) -> tuple[float, float] | None:
    """--dicom-window: 'auto' (None) or 'CENTER,WIDTH' with WIDTH > 0."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        center, width = (float(item) for item in str(text).split(","))
    except ValueError:
        raise FoproError(f"--dicom-window {text} is not CENTER,WIDTH: give e.g. 40,400 (a CT soft-tissue window) or auto") from None
    if not width > 0:
        raise FoproError(f"--dicom-window {text}: the width must be greater than 0")
    return center, width


def _pydicom():
    try:
        import pydicom  # optional dependency: imported only when a DICOM file is read
        from pydicom import pixels
    except ImportError:
        return None, None
    return pydicom, pixels


def read_dicom(path: Path, window: tuple[float, float] | None = None) -> np.ndarray:
    """The first frame of a DICOM file as uint8 H x W x 3 (see the module docstring); ValueError if unreadable."""
    pydicom, pixels = _pydicom()
    if pydicom is None:
        raise FoproError(f"{path} is a DICOM file: {INSTALL_HINT}")
    try:
        dataset = pydicom.dcmread(str(path))
        array = dataset.pixel_array
    except Exception as err:  # pydicom raises many types for damaged files and missing codecs
        raise ValueError(f"DICOM: {str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__}") from err
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    colour = photometric not in ("MONOCHROME1", "MONOCHROME2")
    if frames > 1:
        array = array[0]
    if colour:
        if photometric.startswith("YBR"):
            array = pixels.convert_color_space(array, photometric, "RGB")
        return _to_uint8(np.asarray(array, dtype=np.float64), 0.0, float(2 ** int(getattr(dataset, "BitsStored", 8)) - 1))
    values = np.asarray(pixels.apply_modality_lut(array, dataset), dtype=np.float64)
    if window is not None:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    else:
        has_voi = "VOILUTSequence" in dataset or "WindowCenter" in dataset
        if has_voi:
            values = np.asarray(pixels.apply_voi_lut(values, dataset), dtype=np.float64)
        low, high = float(values.min()), float(values.max())
    gray = _to_uint8(values, low, high)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return np.repeat(gray[..., None], 3, axis=2) if gray.ndim == 2 else gray


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (np.clip(values, low, high) - low) / max(high - low, 1e-12) * 255.0
    return np.round(scaled).astype(np.uint8)
