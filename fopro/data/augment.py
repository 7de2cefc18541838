"""Train-time augmentation: presets that fit the anatomy, knobs that override them, and the seeded transform.

Images have an orientation or they do not. A dermoscopic lesion looks the same mirrored or turned by
90 degrees, so flips and right-angle rotations are free extra data; a chest radiograph, a hand X-ray
or a handwritten digit does not (a mirrored heart, a 6 turned into a 9), and flipping it teaches the
model the wrong thing. The default preset, `standard`, therefore never flips or rotates: it is safe on
any image, and a user who knows that orientation carries no label picks `dermoscopy`.

Every draw comes from one `torch.Generator` seeded per (seed, epoch, image), and every image makes the
same draws whatever the knobs, so a run is reproducible and resumable at any step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from fopro.errors import FoproError


@dataclass(frozen=True)
class AugmentConfig:
    """One train augmentation, in the order it is applied.

    scale: area fraction of the random crop (RandomResizedCrop's `scale`; (1, 1) keeps the whole image);
    ratio: its aspect-ratio range; translate: random shift as a fraction of the image side; rotate:
    uniform rotation in [-rotate, +rotate] degrees; rot90: a random multiple of 90 degrees; hflip / vflip:
    flip probabilities; color_jitter: brightness, contrast and saturation factors in [1 - f, 1 + f];
    one_of: apply only ONE of the enabled transforms (zoom + shift + rotation as one affine, right-angle turn,
    hflip, vflip, colour), chosen uniformly per image, like torchvision's RandomChoice.
    """

    scale: tuple[float, float] = (1.0, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    translate: float = 0.0
    rotate: float = 0.0
    rot90: bool = False
    hflip: float = 0.0
    vflip: float = 0.0
    color_jitter: float = 0.0
    one_of: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @property
    def is_identity(self) -> bool:
        """The `none` preset: every image comes out as it went in (so augmented views would all be equal)."""
        return self == AugmentConfig()

    @property
    def flips_or_turns(self) -> bool:
        return self.hflip > 0 or self.vflip > 0 or self.rot90

    @property
    def transforms(self) -> tuple[str, ...]:
        """The enabled transforms, in the order they are applied (what `one_of` chooses from)."""
        enabled = {
            "affine": self.scale != (1.0, 1.0) or self.translate > 0 or self.rotate > 0,
            "rot90": self.rot90,
            "hflip": self.hflip > 0,
            "vflip": self.vflip > 0,
            "colour": self.color_jitter > 0,
        }
        return tuple(name for name, on in enabled.items() if on)


PRESETS: dict[str, AugmentConfig] = {
    # small shifts and zoom only: preserves orientation and colour, safe on any image
    "standard": AugmentConfig(scale=(0.85, 1.0), translate=0.1),
    # lesions have no orientation: flips, right-angle turns, free rotation, zoom, mild colour changes
    "dermoscopy": AugmentConfig(scale=(0.6, 1.0), translate=0.05, rotate=45.0, rot90=True, hflip=0.5, vflip=0.5, color_jitter=0.15),
    # the scope turns freely inside the lumen, but colour is diagnostic (bleeding, inflammation): tiny colour changes
    "endoscopy": AugmentConfig(scale=(0.7, 1.0), translate=0.05, rotate=45.0, hflip=0.5, vflip=0.5, color_jitter=0.05),
    # anatomy has a side and an up: no flips, small rotation and zoom, no colour
    "radiograph": AugmentConfig(scale=(0.8, 1.0), translate=0.05, rotate=10.0),
    # the FoPro-KD authors' ISIC training transform, as far as the knobs express it: ONE of affine (zoom 0.95-1.2,
    # here as crop area 1/1.2^2-1 since the crop cannot zoom out; shift 5 %; rotation 45 degrees), colour jitter 0.25,
    # horizontal flip, vertical flip (each flip with probability 0.5 once chosen)
    "reference": AugmentConfig(scale=(0.69, 1.0), translate=0.05, rotate=45.0, hflip=0.5, vflip=0.5, color_jitter=0.25, one_of=True),
    "none": AugmentConfig(),
}
DEFAULT_PRESET = "standard"
PRESET_HELP = {
    "standard": "shifts and zoom only (default; safe on any image)",
    "dermoscopy": "flips, 90-degree turns, rotation within 45 degrees, zoom, mild colour",
    "endoscopy": "flips, rotation within 45 degrees, zoom, very mild colour",
    "radiograph": "no flips, rotation within 10 degrees, zoom, no colour",
    "reference": "the FoPro-KD authors' ISIC transform: ONE of zoom/shift/rotation within 45 degrees, colour 0.25, hflip, vflip per image",
    "none": "no augmentation",
}
KNOBS = ("hflip", "vflip", "rotate", "scale", "color_jitter")


def parse_scale(value: Any, option: str = "--scale") -> tuple[float, float]:
    """`MIN,MAX` (a string, or a two-item list from a config file) -> (min, max), each in (0, 1]."""
    items = value.split(",") if isinstance(value, str) else value
    try:
        low, high = (float(item) for item in items)
    except (TypeError, ValueError):
        raise FoproError(f"{option} {value!r} is not MIN,MAX: give two crop area fractions, e.g. 0.8,1.0") from None
    if not 0 < low <= high <= 1:
        raise FoproError(f"{option} {low},{high} is not a range in (0, 1]: give MIN <= MAX, e.g. 0.8,1.0")
    return low, high


def resolve_augment(preset: str, **knobs: Any) -> AugmentConfig:
    """The preset's augmentation with every knob that is not None put over it; checks every value."""
    if preset not in PRESETS:
        raise FoproError(f"--augment {preset} is not known: choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown augmentation knob(s): {unknown}")
    given = {key: value for key, value in knobs.items() if value is not None}
    for key in ("hflip", "vflip"):
        if key in given and not 0 <= float(given[key]) <= 1:
            raise FoproError(f"--{key} {given[key]} is not a probability: give a value in [0, 1] (0 turns it off)")
    if "rotate" in given and not 0 <= float(given["rotate"]) <= 180:
        raise FoproError(f"--rotate {given['rotate']} is outside [0, 180]: give the largest rotation in degrees (0 turns it off)")
    if "color_jitter" in given and not 0 <= float(given["color_jitter"]) < 1:
        raise FoproError(f"--color-jitter {given['color_jitter']} is outside [0, 1): give the largest relative change, e.g. 0.1 (0 turns it off)")
    if "scale" in given:
        given["scale"] = parse_scale(given["scale"])
    config = replace(PRESETS[preset], **{k: v if k == "scale" else float(v) for k, v in given.items()})
    if "rotate" in given and float(given["rotate"]) == 0:
        config = replace(config, rot90=False)  # --rotate 0 means no rotation at all
    return config


def augment(image: torch.Tensor, generator: torch.Generator, config: AugmentConfig) -> torch.Tensor:
    """Crop-zoom, shift and rotation (one affine resampling), right-angle turn, flips, colour on a float
    3xSxS image in [0, 1], drawing only from `generator` (a fixed number of draws whatever the config)."""
    geometry = torch.rand(8, generator=generator).tolist()
    draws = torch.rand(7, generator=generator).tolist()
    chosen = _chosen(draws[6], config)
    theta = _affine(geometry, config) if "affine" in chosen else None
    if theta is not None:
        grid = F.affine_grid(theta[None], [1, *image.shape], align_corners=False)
        image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]
    if "rot90" in chosen:
        image = torch.rot90(image, int(draws[0] * 4) % 4, dims=(-2, -1))
    if "hflip" in chosen and draws[1] < config.hflip:
        image = image.flip(-1)
    if "vflip" in chosen and draws[2] < config.vflip:
        image = image.flip(-2)
    if "colour" in chosen:
        brightness, contrast, saturation = (1 + config.color_jitter * (2 * torch.tensor(draws[3:6]) - 1)).tolist()
        image = image * brightness
        mean = image.mean()
        image = (image - mean) * contrast + mean
        gray = image.mean(dim=0, keepdim=True)
        image = (image - gray) * saturation + gray
    return image.clamp(0, 1)


def _chosen(u: float, config: AugmentConfig) -> tuple[str, ...]:
    """The transforms applied to this image: all the enabled ones, or with `one_of` the one that `u` picks."""
    enabled = config.transforms
    if not config.one_of or not enabled:
        return enabled
    return (enabled[min(int(u * len(enabled)), len(enabled) - 1)],)


def _affine(u: list[float], config: AugmentConfig) -> torch.Tensor | None:
    """The 2x3 matrix mapping output to input coordinates (normalised to [-1, 1]), or None for the identity.

    A crop of area fraction a and aspect r is width sqrt(a r), height sqrt(a / r) (clipped to the image);
    its centre is drawn where the crop fits, then shifted by up to `translate` of the side.
    """
    low, high = config.scale
    area = low + u[0] * (high - low)
    log_low, log_high = math.log(config.ratio[0]), math.log(config.ratio[1])
    aspect = math.exp(log_low + u[1] * (log_high - log_low)) if area < 1 else 1.0
    width, height = min(1.0, math.sqrt(area * aspect)), min(1.0, math.sqrt(area / aspect))
    centre_x = (1 - width) * (2 * u[2] - 1) + config.translate * 2 * (2 * u[4] - 1)
    centre_y = (1 - height) * (2 * u[3] - 1) + config.translate * 2 * (2 * u[5] - 1)
    angle = math.radians(config.rotate * (2 * u[6] - 1))
    if width == height == 1 and centre_x == centre_y == 0 and angle == 0:
        return None
    cos, sin = math.cos(angle), math.sin(angle)
    return torch.tensor([[cos * width, -sin * height, centre_x], [sin * width, cos * height, centre_y]], dtype=torch.float32)


def describe(preset: str, config: AugmentConfig) -> str:
    """One line a user can check at a glance, e.g. `standard (crop area 0.85-1, shift <= 10%, no flips, no rotation, no colour)`."""
    parts = []
    if config.scale != (1.0, 1.0):
        parts.append(f"crop area {config.scale[0]:g}-{config.scale[1]:g}")
    if config.translate:
        parts.append(f"shift <= {config.translate:.0%}")
    flips = [f"{name} {p:g}" for name, p in (("hflip", config.hflip), ("vflip", config.vflip)) if p]
    parts.append(", ".join(flips) if flips else "no flips")
    turns = (["90-degree turns"] if config.rot90 else []) + ([f"rotation <= {config.rotate:g} deg"] if config.rotate else [])
    parts.append(", ".join(turns) if turns else "no rotation")
    parts.append(f"colour jitter {config.color_jitter:g}" if config.color_jitter else "no colour")
    if config.one_of:
        parts.append("one of these per image")
    changed = "" if config == PRESETS.get(preset) else ", with knobs"
    return f"{preset}{changed} ({', '.join(parts)})"
