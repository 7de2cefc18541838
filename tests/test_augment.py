"""Augmentation presets and knobs: what each may and may not do to an image, their errors, and where they are saved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fopro.config import DistillConfig, resolve_config
from fopro.config_files import read_config_file
from fopro.data import ImageDataset, Manifest
from fopro.data.augment import DEFAULT_PRESET, KNOBS, PRESETS, AugmentConfig, augment, describe, parse_scale, resolve_augment
from fopro.errors import FoproError

DRAWS = 300


def quadrant_image(size: int = 32) -> torch.Tensor:
    """An image with a side and an up: dark left / bright right, and a top-to-bottom ramp in the green channel."""
    image = torch.zeros(3, size, size)
    image[0, :, size // 2 :] = 1.0
    image[1] = torch.linspace(0.0, 1.0, size)[:, None].expand(size, size)
    image[2] = 0.5
    return image


def orientation(image: torch.Tensor) -> tuple[bool, bool]:
    """(right brighter than left in red, bottom brighter than top in green): (True, True) when upright."""
    half = image.shape[-1] // 2
    red, green = image[0], image[1]
    return bool(red[:, half:].mean() > red[:, :half].mean()), bool(green[half:].mean() > green[:half].mean())


def draws(config: AugmentConfig, count: int = DRAWS) -> list[torch.Tensor]:
    image = quadrant_image()
    return [augment(image, torch.Generator().manual_seed(seed), config) for seed in range(count)]


@pytest.mark.parametrize("preset", ["standard", "radiograph", "none"])
def test_orientation_presets_never_flip_or_turn(preset):
    results = [orientation(image) for image in draws(PRESETS[preset])]
    assert results == [(True, True)] * DRAWS


def test_dermoscopy_flips_and_turns_often():
    """The control that makes the test above mean something: the same check sees flips when they happen."""
    results = [orientation(image) for image in draws(PRESETS["dermoscopy"])]
    upright = results.count((True, True)) / DRAWS
    assert 0.1 < upright < 0.5
    assert {(False, True), (True, False), (False, False)} <= set(results)


def test_radiograph_through_the_real_train_dataset(tmp_path: Path):
    """The train transform fopro builds from `--augment radiograph` keeps every image upright."""
    path = tmp_path / "asymmetric.png"
    Image.fromarray((quadrant_image(48).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    manifest = Manifest(paths=[path] * 60, labels=[0] * 60, classes=["a"], split="train", source="test")
    dataset = ImageDataset(manifest, image_size=48, train=True, augment_config=DistillConfig(augment="radiograph").augment_config())
    for epoch in range(3):
        dataset.set_epoch(epoch)
        assert all(orientation(dataset[i][0]) == (True, True) for i in range(len(dataset)))


def test_knobs_override_the_preset():
    always_mirrored = resolve_augment("radiograph", hflip=1.0)
    assert always_mirrored.rotate == PRESETS["radiograph"].rotate and always_mirrored.hflip == 1.0
    assert {orientation(image) for image in draws(always_mirrored, 50)} == {(False, True)}
    upside_down = resolve_augment("none", vflip=1)
    assert {orientation(image) for image in draws(upside_down, 50)} == {(True, False)}
    no_flips = resolve_augment("dermoscopy", hflip=0, vflip=0, rotate=0)
    assert not no_flips.flips_or_turns and no_flips.rotate == 0  # --rotate 0 turns off the 90-degree turns too
    assert {orientation(image) for image in draws(no_flips, 100)} == {(True, True)}
    assert resolve_augment("standard", scale="0.5,0.9", color_jitter=0.2).scale == (0.5, 0.9)
    assert resolve_augment("standard") == PRESETS["standard"]


def test_none_is_the_identity_and_colour_only_changes_colour():
    image = quadrant_image()
    assert torch.equal(augment(image, torch.Generator().manual_seed(0), PRESETS["none"]), image)
    jitter = resolve_augment("none", color_jitter=0.3)
    changed = [augment(image, torch.Generator().manual_seed(s), jitter) for s in range(20)]
    assert any(not torch.allclose(c, image, atol=1e-3) for c in changed)
    assert all(orientation(c) == (True, True) for c in changed)


def test_geometry_keeps_the_image_in_range_and_shape():
    for preset in PRESETS:
        for image in draws(PRESETS[preset], 20):
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert image.min() >= 0 and image.max() <= 1


def test_standard_shift_moves_the_content_by_at_most_its_bound():
    """A bright square's centre of mass moves by at most translate + the crop's own offset, never off the image."""
    image = torch.zeros(3, 64, 64)
    image[:, 28:36, 28:36] = 1.0
    config = resolve_augment("standard", scale="1,1")  # shifts only
    coords = torch.arange(64, dtype=torch.float32)
    for result in draws_of(image, config, 100):
        mass = result[0]
        cx = float((mass.sum(0) * coords).sum() / mass.sum())
        cy = float((mass.sum(1) * coords).sum() / mass.sum())
        assert abs(cx - 31.5) <= 0.1 * 64 + 0.5 and abs(cy - 31.5) <= 0.1 * 64 + 0.5


def draws_of(image: torch.Tensor, config: AugmentConfig, count: int) -> list[torch.Tensor]:
    return [augment(image, torch.Generator().manual_seed(seed), config) for seed in range(count)]


@pytest.mark.parametrize(
    "preset, knobs, message",
    [
        ("radiographs", {}, r"--augment radiographs is not known: choose one of standard, dermoscopy, endoscopy, radiograph, reference, none"),
        ("standard", {"hflip": 1.5}, r"--hflip 1.5 is not a probability"),
        ("standard", {"vflip": -0.1}, r"--vflip -0.1 is not a probability"),
        ("standard", {"rotate": 181}, r"--rotate 181 is outside \[0, 180\]"),
        ("standard", {"color_jitter": 1.0}, r"--color-jitter 1.0 is outside \[0, 1\)"),
        ("standard", {"scale": "0.9,0.5"}, r"--scale 0.9,0.5 is not a range in \(0, 1\]"),
        ("standard", {"scale": "0.5"}, r"--scale '0.5' is not MIN,MAX"),
        ("standard", {"scale": "a,b"}, r"--scale 'a,b' is not MIN,MAX"),
    ],
)
def test_bad_augmentation_values(preset, knobs, message):
    with pytest.raises(FoproError, match=message):
        resolve_augment(preset, **knobs)


def test_parse_scale_takes_text_or_a_list():
    assert parse_scale("0.8, 1.0") == (0.8, 1.0)
    assert parse_scale([0.7, 1]) == (0.7, 1.0)


def test_default_preset_and_its_description():
    assert DistillConfig().augment == DEFAULT_PRESET == "standard"
    assert not PRESETS[DEFAULT_PRESET].flips_or_turns and PRESETS[DEFAULT_PRESET].color_jitter == 0
    assert describe("standard", PRESETS["standard"]) == "standard (crop area 0.85-1, shift <= 10%, no flips, no rotation, no colour)"
    assert describe("radiograph", resolve_augment("radiograph", hflip=0.5)).startswith("radiograph, with knobs (")
    assert set(KNOBS) <= {f for f in DistillConfig.__dataclass_fields__}


def test_config_file_keys_and_command_line_override(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("augment: radiograph\nscale: [0.7, 1.0]\nhflip: 0\ncolor-jitter: 0.05\n")
    config = resolve_config(read_config_file(path), {"rotate": 5.0})
    assert (config.augment, config.scale, config.hflip, config.color_jitter, config.rotate) == ("radiograph", [0.7, 1.0], 0.0, 0.05, 5.0)
    resolved = config.augment_config()
    assert resolved.scale == (0.7, 1.0) and resolved.rotate == 5.0 and resolved.color_jitter == 0.05
    toml = tmp_path / "run.toml"
    toml.write_text('augment = "dermoscopy"\nscale = "0.6,0.9"\n')
    assert resolve_config(read_config_file(toml), {}).augment_config().scale == (0.6, 0.9)
    bad = tmp_path / "bad.yaml"
    bad.write_text("augment: xray\n")
    with pytest.raises(FoproError, match="--augment xray is not known"):
        resolve_config(read_config_file(bad), {})


def test_augmentation_is_saved_in_config_json_and_the_checkpoint(tmp_path: Path, distill_values):
    from conftest import torch_threads
    from fopro.distill import distill

    values = distill_values(method="none", augment="radiograph", hflip=0.0, scale=[0.9, 1.0], out=str(tmp_path / "run"))
    with torch_threads(1):
        summary = distill(values)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["augment"], saved["hflip"], saved["scale"]) == ("radiograph", 0.0, [0.9, 1.0])
    meta = json.loads((tmp_path / "run" / "best.json").read_text())
    assert meta["config"]["augment"] == "radiograph"
    assert meta["config"]["augmentation"] == {**PRESETS["radiograph"].as_dict(), "hflip": 0.0, "scale": [0.9, 1.0]}
    assert summary["augmentation"]["preset"] == "radiograph" and summary["augmentation"]["rotate"] == 10.0
    assert summary["augmentation_text"].startswith("radiograph, with knobs (crop area 0.9-1")


def test_one_of_applies_exactly_one_transform_per_image():
    """one_of with two sure flips: each image is flipped one way, never both, never neither; each way about half."""
    image = quadrant_image()
    results = [orientation(out) for out in draws(AugmentConfig(hflip=1.0, vflip=1.0, one_of=True))]
    assert set(results) == {(False, True), (True, False)}
    assert 0.4 < results.count((False, True)) / DRAWS < 0.6
    # colour or flip: a flipped image keeps its colours exactly, a recoloured one keeps its orientation
    for out in draws(AugmentConfig(hflip=1.0, color_jitter=0.5, one_of=True), 50):
        assert torch.equal(out, image.flip(-1)) or (orientation(out) == (True, True) and not torch.equal(out, image))
    # without one_of both flips apply to every image
    assert {orientation(out) for out in draws(AugmentConfig(hflip=1.0, vflip=1.0), 20)} == {(False, False)}


def test_reference_preset_is_the_authors_one_of_transform():
    config = PRESETS["reference"]
    assert config.one_of and config.transforms == ("affine", "hflip", "vflip", "colour") and not config.rot90
    assert (config.rotate, config.translate, config.color_jitter) == (45.0, 0.05, 0.25)
    assert describe("reference", config).endswith("colour jitter 0.25, one of these per image)")
    results = [orientation(out) for out in draws(config)]
    # a flip is chosen for half of the images and then applied with p 0.5: about a quarter are mirrored
    assert 0.12 < 1 - results.count((True, True)) / DRAWS < 0.4
    assert (False, False) not in results


def test_orientation_warning_is_for_images_with_a_side_not_for_the_synthetic_lesions(distill_data, tmp_path):
    from fopro.run import config_warnings

    def orientation_warnings(data: Path, augment: str) -> list[str]:
        config = resolve_config({}, {"data": str(data), "augment": augment})
        return [w for w in config_warnings(config, config.augment_config()) if "flips or turns" in w]

    user_folder = tmp_path / "scans"  # any ImageFolder that fopro did not generate
    user_folder.mkdir()
    assert len(orientation_warnings(user_folder, "reference")) == 1
    assert len(orientation_warnings(user_folder, "dermoscopy")) == 1
    assert orientation_warnings(user_folder, "radiograph") == []
    assert orientation_warnings(distill_data, "reference") == []  # fopro data synth's target corpus (the demo's data)
    assert orientation_warnings(distill_data.parent / "public", "dermoscopy") == []
