"""`fopro probe`'s options: what to probe and how (bands, gains, folds, linear probe), parsed from CLI text and
checked before anything is read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from fopro.data.augment import DEFAULT_PRESET, resolve_augment
from fopro.data.sources import SPLITS
from fopro.errors import FoproError
from fopro.fourier import band_edges, band_masks
from fopro.linear_probe import LinearProbeOptions
from fopro.metrics import DEFAULT_GROUPS, LongTailGroups
from fopro.probe.file import DEFAULT_MIN_EFFECT


DEFAULT_GAINS = (0.0, 0.5, 2.0)
MAX_BANDS = 64
MAX_GAIN = 100.0
MAX_DEFAULT_IMAGE_SIZE = 224  # the probe's image size without a teacher default: the data's native side, within these
MIN_DEFAULT_IMAGE_SIZE = 16


@dataclass
class ProbeOptions:
    """What to probe and how; ``bands`` and ``gains`` may also be given as CLI text ("8", "0,0.5,2")."""

    split: str = "val"
    bands: int | str = 8
    log_bands: bool = False
    gains: Sequence[float] | str = DEFAULT_GAINS
    per_class: int = 50
    batch_size: int = 64
    device: str = "auto"
    seed: int = 0
    groups: LongTailGroups = DEFAULT_GROUPS
    folds: int = 5
    neighbours: int = 5
    min_effect: float = DEFAULT_MIN_EFFECT
    linear: bool = True
    linear_views: int = 4
    augment: str = DEFAULT_PRESET


def parse_bands(value: int | str) -> int:
    """The number of bands, from an int or CLI text; FoproError naming --bands otherwise."""
    text = str(value).strip()
    if isinstance(value, bool) or not text.lstrip("+").isdigit():
        raise FoproError(f"--bands must be a whole number >= 1 (got {text!r}); pass e.g. --bands 8")
    bands = int(text)
    if not 1 <= bands <= MAX_BANDS:
        raise FoproError(f"--bands must be between 1 and {MAX_BANDS} (got {bands}); pass e.g. --bands 8")
    return bands


def parse_gains(value: Sequence[float] | str) -> list[float]:
    """Sorted distinct gains >= 0 from a list or CLI text "0,0.5,2"; FoproError naming --gains otherwise."""
    items = value.split(",") if isinstance(value, str) else list(value)
    hint = "pass comma-separated numbers >= 0, e.g. --gains 0,0.5,2"
    if not items or all(str(item).strip() == "" for item in items):
        raise FoproError(f"--gains is empty: {hint}")
    gains = []
    for item in items:
        text = str(item).strip()
        try:
            gain = float(text)
        except ValueError:
            raise FoproError(f"--gains: {text!r} is not a number: {hint}") from None
        if isinstance(item, bool) or text == "" or not math.isfinite(gain):
            raise FoproError(f"--gains: {text!r} is not a finite number: {hint}")
        if gain < 0:
            raise FoproError(f"--gains: {text} is negative (an amplitude gain is >= 0; 0 removes the band): {hint}")
        if gain > MAX_GAIN:
            raise FoproError(f"--gains: {text} is above {MAX_GAIN:g}: amplify by at most {MAX_GAIN:g}x")
        gains.append(gain)
    return sorted(set(gains))


def check_options(options: ProbeOptions) -> tuple[list[tuple[float, float]], list[float]]:
    """Validate the options; return the band edges and the gains."""
    if options.split not in SPLITS:
        raise FoproError(f"--split {options.split!r} is not a split: use {', '.join(SPLITS)}")
    edges = band_edges(parse_bands(options.bands), log=bool(options.log_bands))
    gains = parse_gains(options.gains)
    for value, option, minimum in ((options.per_class, "--per-class", 2), (options.batch_size, "--batch-size", 1),
                                   (options.folds, "folds", 2), (options.neighbours, "neighbours", 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise FoproError(f"{option} must be a whole number >= {minimum} (got {value!r})")
    linear_options(options)
    resolve_augment(options.augment)
    return edges, gains


def linear_options(options: ProbeOptions) -> LinearProbeOptions:
    """The linear probe's options: ``linear_views`` views, the other values at their defaults."""
    return LinearProbeOptions(views=options.linear_views)


def check_bands_fit(edges: Sequence[Sequence[float]], size: int, log: bool) -> None:
    """Every band must hold at least one frequency of a size x size image."""
    counts = band_masks(size, size, edges).sum(dim=(1, 2))
    for index, count in enumerate(counts.tolist()):
        if count == 0:
            low, high = edges[index]
            hint = "use fewer bands" + (" or linear bands (no --log-bands)" if log else "")
            raise FoproError(
                f"--bands {len(edges)}{' --log-bands' if log else ''}: band {index} ({low:.3f}-{high:.3f} of Nyquist) "
                f"holds no frequency of a {size}-px image: {hint}"
            )
