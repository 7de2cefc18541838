"""DICOM input: pixel values through the rescale, the window and the photometric interpretation (files written by
pydicom itself), a DICOM ImageFolder trains and evaluates like PNGs, damaged files and a missing pydicom."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")  # the dev extra installs it; fopro itself needs it only for DICOM files

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

import fopro.data.dicom as dicom_module  # noqa: E402
from fopro.data import DataOptions, checked_dataset, load_image, load_splits  # noqa: E402
from fopro.data.dicom import parse_window, read_dicom  # noqa: E402
from fopro.errors import FoproError  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", frames: int = 1, **tags) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    rgb = photometric == "RGB"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric
    if rgb:
        ds.PlanarConfiguration = 0
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


RAMP = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 16  # stored values 0..4080


def test_monochrome2_with_rescale_and_the_files_window(tmp_path: Path) -> None:
    # HU = 1 * stored - 1024: values -1024..3056; the file's window 40 / 400 keeps -160..240 HU
    path = write_dicom(tmp_path / "ct.dcm", RAMP, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    hu = RAMP.astype(float) - 1024
    expected = np.round((np.clip(hu, -160, 240) + 160) / 400 * 255)
    got = read_dicom(path)[..., 0].astype(float)
    assert np.abs(got - expected).max() <= 1.0  # pydicom's VOI LUT and the plain window formula agree within a level


def test_an_explicit_window_and_min_max(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "x.dcm", RAMP, RescaleSlope=2, RescaleIntercept=0)
    np.testing.assert_array_equal(read_dicom(path)[..., 0], np.round(RAMP / RAMP.max() * 255).astype(np.uint8))  # min-max
    windowed = read_dicom(path, parse_window("2000,1000"))[..., 0]  # 1500..2500 of the rescaled values (2 x stored)
    np.testing.assert_array_equal(windowed, np.round((np.clip(2.0 * RAMP, 1500, 2500) - 1500) / 1000 * 255).astype(np.uint8))
    with pytest.raises(FoproError, match="CENTER,WIDTH"):
        parse_window("wide")


def test_monochrome1_is_inverted_rgb_kept_first_frame_used(tmp_path: Path) -> None:
    mono2 = read_dicom(write_dicom(tmp_path / "m2.dcm", RAMP))
    mono1 = read_dicom(write_dicom(tmp_path / "m1.dcm", RAMP, "MONOCHROME1"))
    np.testing.assert_array_equal(mono1, 255 - mono2)
    colour = np.random.default_rng(0).integers(0, 256, (12, 14, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_dicom(write_dicom(tmp_path / "rgb.dcm", colour, "RGB")), colour)
    frames = np.stack([RAMP, RAMP[::-1]])
    np.testing.assert_array_equal(read_dicom(write_dicom(tmp_path / "multi.dcm", frames, frames=2)), mono2)


def test_a_dicom_image_folder_trains_and_evaluates_like_pngs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fopro.cli import app

    rng = np.random.default_rng(1)
    root = tmp_path / "data"
    for split, per_class in (("train", 6), ("val", 2), ("test", 2)):
        for c, name in enumerate(("normal", "nodule")):
            for i in range(per_class):
                pixels = (rng.integers(0, 1000, (32, 32)) + 1500 * c).astype(np.uint16)
                photometric = "MONOCHROME1" if i % 2 else "MONOCHROME2"
                target = root / split / name / (f"{i}.dcm" if i % 3 else f"{i}")  # some without an extension
                write_dicom(target, pixels, photometric, RescaleSlope=1, RescaleIntercept=-1024)
    splits = load_splits(DataOptions(data=root))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert load_image(splits["train"].paths[0], 32).shape == (3, 32, 32)
    result = CliRunner().invoke(app, ["distill", "--data", str(root), "--method", "none", "--student", "test_resnet", "--image-size", "32",
                                      "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0", "--no-teacher-probe",
                                      "--out", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    evaluation = CliRunner().invoke(app, ["eval", str(tmp_path / "run" / "best.safetensors"), "--data", str(root), "--device", "cpu", "--json"])
    assert evaluation.exit_code == 0, evaluation.output


def test_a_damaged_dicom_is_an_unreadable_image_and_a_missing_pydicom_one_line(tmp_path: Path, monkeypatch) -> None:
    good = write_dicom(tmp_path / "test" / "a" / "good.dcm", RAMP)
    bad = tmp_path / "test" / "a" / "bad.dcm"
    bad.write_bytes(good.read_bytes()[:200])
    manifest = load_splits(DataOptions(data=tmp_path))["test"]
    with pytest.raises(FoproError, match=f"1 image\\(s\\) of the test split cannot be read, e.g. {bad}"):
        checked_dataset(manifest, 16, skip_bad_images=False)
    assert len(checked_dataset(manifest, 16, skip_bad_images=True)) == 1
    monkeypatch.setattr(dicom_module, "_pydicom", lambda: (None, None))
    with pytest.raises(FoproError, match=r'is a DICOM file: install the DICOM extra: pip install "fopro\[dicom\]"'):
        read_dicom(good)
