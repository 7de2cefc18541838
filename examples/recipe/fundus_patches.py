"""Build FUNDUS-8: a small long-tailed dataset of real fundus-photograph patches whose classes depend on orientation.

The one real retinal photograph that scikit-image ships (`skimage.data.retina()`, 1411 x 1411, a left
eye: optic disc on the left, macula in the centre) is cut into patches; a patch's class is the octant of
the fundus it comes from, measured around the image centre (c0_temporal = towards 3 o'clock, then
counter-clockwise in 45-degree steps). What tells the octants apart is anatomy with a side and an up:
the direction of the vessel arcades, the optic disc, the rim of the fundus. A horizontal flip turns a
nasal patch into a temporal one, a vertical flip a superior into an inferior one, so flip augmentation
destroys labels here, as it does for laterality in radiographs or a 6 turned into a 9.

Train is long-tailed (100 -> 5 per class, exponential), val and test are balanced (50 per class).
Patches are squares of 120-220 px (random side and centre, centres at 12-88 % of the fundus radius),
resized to --size px. All splits come from the same photograph, so patches of different splits can
overlap: the dataset measures whether a training recipe learns the task, not generalisation to new
eyes. Deterministic: the same --seed gives the same PNGs.

    pip install scikit-image
    python examples/recipe/fundus_patches.py fopro-data/fundus8
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

OCTANTS = ["temporal", "superotemporal", "superior", "superonasal", "nasal", "inferonasal", "inferior", "inferotemporal"]
# skimage's retina is a left eye seen from the front: temporal is to the right (0 degrees), nasal to the left.
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def train_counts(num_classes: int, most: int, fewest: int) -> list[int]:
    ratio = fewest / most
    return [int(round(most * ratio ** (i / (num_classes - 1)))) for i in range(num_classes)]


def cut_patch(photo: Image.Image, octant: int, rng: np.random.Generator, size: int) -> Image.Image:
    width, height = photo.size
    centre_x, centre_y, radius = width / 2, height / 2, 0.49 * min(width, height)
    angle = math.radians(45 * octant + rng.uniform(-22.5, 22.5))
    distance = radius * rng.uniform(0.12, 0.88)
    x, y = centre_x + distance * math.cos(angle), centre_y - distance * math.sin(angle)
    side = rng.uniform(120, 220)
    box = (int(round(x - side / 2)), int(round(y - side / 2)), int(round(x + side / 2)), int(round(y + side / 2)))
    return photo.crop(box).resize((size, size), Image.Resampling.LANCZOS)


def build(out: Path, size: int = 64, most: int = 100, fewest: int = 5, per_class_eval: int = 50, seed: int = 0) -> dict[str, dict[str, int]]:
    from skimage.data import retina

    photo = Image.fromarray(retina())
    counts = {"train": train_counts(len(OCTANTS), most, fewest), "val": [per_class_eval] * len(OCTANTS), "test": [per_class_eval] * len(OCTANTS)}
    written: dict[str, dict[str, int]] = {}
    for split, per_class in counts.items():
        written[split] = {}
        for index, (name, count) in enumerate(zip(OCTANTS, per_class)):
            folder = out / split / f"c{index}_{name}"
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, SPLIT_SEEDS[split], index])
            for number in range(count):
                cut_patch(photo, index, rng, size).save(folder / f"{number:04d}.png")
            written[split][folder.name] = count
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    written = build(args.out, size=args.size, seed=args.seed)
    for split, classes in written.items():
        print(f"{split}: {sum(classes.values())} images, " + ", ".join(f"{k} {v}" for k, v in classes.items()))


if __name__ == "__main__":
    main()
