"""The embedded default dataset: synthetic "lesion-like" images, generated offline and deterministically.

Two corpora are written as ImageFolder trees under one output folder:

* ``target/{train,val,test}/<class>/<NNNNN>.png`` — the long-tailed task (train follows
  ``longtail_counts``; val and test are balanced). Class folders are prefixed ``c0_``, ``c1_``...
  (zero-padded) so that their sorted order is the class order, class 0 being the most frequent.
* ``target/unlabeled/u<NNNNN>.png`` — only with ``unlabeled=N`` (``--unlabeled N``): a flat, label-free pool of
  N more target images drawn from the training split's class distribution, in shuffled order (the names
  say nothing of the class; the true per-class counts are only in synth.json, for analysis).
* ``public/{train,val}/<class>/<NNNNN>.png`` — a balanced "public" corpus with its OWN classes
  (prefix ``p0_``...), made of other combinations of the same low-level structure, for the teacher.
* ``synth.json`` — the config, the class names, counts per split, each class's design and the
  ``frequency_pairs``: target classes that differ from a head class mainly in texture frequency.

Every image is a skin-toned background (low-frequency shading + pixel noise) with one lesion blob
whose shape (round / oval / irregular lobed boundary), colour family and internal band-limited
texture (coarse blobs = low spatial frequency, medium, fine speckle or stripes between half-Nyquist
and Nyquist) depend on the class, with per-image randomness and some atypical images (shape or
colour of another family) so the task is not trivially separable. Each image has its own generator,
``np.random.default_rng([seed, split_id, class, index])``: the same seed gives byte-identical PNGs, and
the unlabelled pool has its own split id, so adding it changes no other image.
"""

from __future__ import annotations

import functools
import itertools
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fopro.data.longtail import check_imbalance, longtail_counts
from fopro.errors import FoproError
from fopro.io import write_json

FORMAT = "fopro-synth/1"
SUMMARY_FILE = "synth.json"
MIN_IMAGE_SIZE = 16
MAX_IMAGE_SIZE = 512
# (corpus, split) -> split id mixed into each image's seed.
SPLIT_IDS = {("target", "train"): 0, ("target", "val"): 1, ("target", "test"): 2,
             ("public", "train"): 3, ("public", "val"): 4}
UNLABELED_FOLDER = "unlabeled"  # target/unlabeled/: the label-free pool
UNLABELED_SPLIT_ID = 5  # its own random streams: new images, and no other image changes with it
ATYPICAL_SHAPE_P = 0.15  # an image of the class takes the shape of another family
ATYPICAL_COLOUR_P = 0.12  # ... or the colour of another family

# ----------------------------------------------------------------------------------------------------
# Low-level vocabulary: shapes, colour families, texture bands.

SHAPES = {
    # elongation (major/minor axis ratio), boundary irregularity (sum of harmonic amplitudes)
    "round": {"elong": (1.0, 1.2), "irreg": (0.0, 0.05), "text": "round blob"},
    "oval": {"elong": (1.45, 2.1), "irreg": (0.0, 0.07), "text": "elongated oval"},
    "irregular": {"elong": (1.0, 1.5), "irreg": (0.15, 0.32), "text": "irregular lobed boundary"},
}
COLOURS = {
    # base RGB in [0, 1]
    "brown": ((0.55, 0.35, 0.22), "brown"),
    "dark": ((0.27, 0.17, 0.13), "dark brown/black"),
    "pink": ((0.80, 0.38, 0.40), "pink-red"),
    "bluegrey": ((0.42, 0.46, 0.56), "bluish-grey"),
    "tan": ((0.72, 0.55, 0.40), "tan"),
}
TEXTURES = {
    "coarse": "coarse blobs (low spatial frequency, 2-6.5 cycles per image)",
    "medium": "medium mottling (0.13-0.22 cycles/pixel)",
    "fine": "fine speckle or stripes (0.28-0.5 cycles/pixel, half-Nyquist to Nyquist)",
}
MEDIUM_BAND = (0.13, 0.22)
FINE_BAND = (0.28, 0.5)


@dataclass(frozen=True)
class Design:
    name: str
    shape: str
    colour: str
    texture: str

    def describe(self) -> str:
        return f"{SHAPES[self.shape]['text']}, {COLOURS[self.colour][1]}, {TEXTURES[self.texture]}"

    def as_dict(self, folder: str) -> dict:
        return {"name": folder, "shape": self.shape, "colour": self.colour, "texture": self.texture,
                "description": self.describe()}


# Target classes: heads first, then the middle classes, then the fine-texture partners of the heads
# (the rarest classes), which share the head's shape and colour distribution.
TARGET_HEADS = [Design("nevus_like", "round", "brown", "coarse"), Design("melanoma_like", "irregular", "dark", "coarse")]
TARGET_PARTNERS = [Design("dysplastic_nevus_like", "round", "brown", "fine"),
                   Design("lentigo_maligna_like", "irregular", "dark", "fine")]
TARGET_MIDDLE = [
    Design("keratosis_like", "oval", "tan", "medium"),
    Design("vascular_like", "round", "pink", "coarse"),
    Design("blue_nevus_like", "round", "bluegrey", "medium"),
    Design("dermatofibroma_like", "irregular", "tan", "coarse"),
]
PUBLIC_BASE = [
    Design("round_pink_fine", "round", "pink", "fine"),
    Design("oval_brown_coarse", "oval", "brown", "coarse"),
    Design("oval_brown_fine", "oval", "brown", "fine"),
    Design("irregular_tan_fine", "irregular", "tan", "fine"),
    Design("round_dark_medium", "round", "dark", "medium"),
    Design("oval_bluegrey_coarse", "oval", "bluegrey", "coarse"),
    Design("irregular_pink_coarse", "irregular", "pink", "coarse"),
    Design("round_tan_medium", "round", "tan", "medium"),
    Design("irregular_bluegrey_fine", "irregular", "bluegrey", "fine"),
    Design("oval_dark_medium", "oval", "dark", "medium"),
]
ALL_COMBOS = list(itertools.product(SHAPES, COLOURS, TEXTURES))
MAX_CLASSES = len(ALL_COMBOS)


def _extra_designs(used: list[Design], count: int, prefix: str) -> list[Design]:
    """`count` more designs: combinations of shape x colour x texture not used yet, in a fixed order."""
    taken = {(d.shape, d.colour, d.texture) for d in used}
    free = [combo for combo in ALL_COMBOS if combo not in taken]
    return [Design(f"{prefix}_{s}_{c}_{t}", s, c, t) for s, c, t in free[:count]]


def target_designs(num_classes: int) -> tuple[list[Design], list[tuple[int, int]]]:
    """Designs of the target classes in class order, and the frequency pairs as (rare index, head index)."""
    pairs = 0 if num_classes < 2 else (1 if num_classes < 6 else 2)
    heads = TARGET_HEADS[: min(2, num_classes - pairs)]
    middle_count = num_classes - len(heads) - pairs
    middle = TARGET_MIDDLE[:middle_count]
    if middle_count > len(middle):
        middle += _extra_designs(TARGET_HEADS + TARGET_PARTNERS + TARGET_MIDDLE, middle_count - len(middle), "lesion")
    designs = heads + middle + TARGET_PARTNERS[:pairs]
    head_index = {d.name: i for i, d in enumerate(designs)}
    pair_list = [(num_classes - pairs + k, head_index[TARGET_HEADS[k].name]) for k in range(pairs)]
    return designs, pair_list


def public_designs(num_classes: int) -> list[Design]:
    designs = PUBLIC_BASE[:num_classes]
    if num_classes > len(designs):
        used = PUBLIC_BASE + TARGET_HEADS + TARGET_PARTNERS + TARGET_MIDDLE
        designs += _extra_designs(used, num_classes - len(designs), "blob")
        if len(designs) < num_classes:  # every combination is taken by the target: reuse them
            designs += _extra_designs(PUBLIC_BASE, num_classes - len(designs), "blob")
    return designs


def folder_names(designs: list[Design], prefix: str) -> list[str]:
    """`c0_name`, `c1_name`... zero-padded so that sorted folder names give the class order."""
    width = len(str(max(len(designs) - 1, 0)))
    return [f"{prefix}{i:0{width}d}_{d.name}" for i, d in enumerate(designs)]


# ----------------------------------------------------------------------------------------------------
# Rendering one image (vectorised numpy).


@functools.lru_cache(maxsize=8)
def _grids(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel coordinates (centred), and the rfft2 radial frequency (cycles/pixel) and angle."""
    c = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.hypot(fx, fy)
    angle = np.arctan2(fy, fx) + np.zeros_like(radius)
    return xx, yy, radius, angle


def _band(texture: str, size: int) -> tuple[float, float]:
    if texture == "coarse":  # a few blobs across the lesion, whatever the image size
        return min(2.0 / size, 0.0625), min(6.5 / size, 0.11)
    return MEDIUM_BAND if texture == "medium" else FINE_BAND


def band_noise(rng: np.random.Generator, size: int, low: float, high: float,
               orientation: float | None = None, spread: float = 0.25) -> np.ndarray:
    """Zero-mean, unit-std noise whose spectrum is the annulus low <= |f| <= high (cycles/pixel).

    With `orientation` the annulus is restricted to the directions near it: stripes.
    """
    _, _, radius, angle = _grids(size)
    mask = ((radius >= low) & (radius <= high)).astype(np.float64)
    if not mask.any():
        mask = (np.abs(radius - (low + high) / 2) == np.abs(radius - (low + high) / 2).min()).astype(np.float64)
    if orientation is not None:
        diff = np.angle(np.exp(2j * (angle - orientation))) / 2.0  # angle difference modulo pi
        mask = mask * np.exp(-0.5 * (diff / spread) ** 2)
    spectrum = np.fft.rfft2(rng.standard_normal((size, size))) * mask
    out = np.fft.irfft2(spectrum, s=(size, size))
    std = out.std()
    return out / std if std > 1e-12 else out


def _other(rng: np.random.Generator, options: list[str], current: str) -> str:
    others = [o for o in options if o != current]
    return others[int(rng.integers(len(others)))]


def render_image(design: Design, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image (size x size x 3) of the given class design."""
    xx, yy, _, _ = _grids(size)
    u01 = rng.uniform

    shape, colour = design.shape, design.colour
    if rng.random() < ATYPICAL_SHAPE_P:
        shape = _other(rng, list(SHAPES), shape)
    if rng.random() < ATYPICAL_COLOUR_P:
        colour = _other(rng, list(COLOURS), colour)

    # Background: skin tone, low-frequency shading (gradient + vignette).
    skin = np.array([0.87, 0.70, 0.60]) * u01(0.9, 1.06) + rng.normal(0.0, 0.02, 3)
    xn, yn = xx / (size / 2.0), yy / (size / 2.0)
    phi = u01(0, 2 * math.pi)
    shading = 1.0 + u01(0.0, 0.08) * (xn * math.cos(phi) + yn * math.sin(phi)) - u01(0.0, 0.12) * (xn**2 + yn**2)
    image = shading[..., None] * skin

    # Lesion geometry: jittered centre, size, elongation, rotation, lobed boundary.
    spec = SHAPES[shape]
    cx, cy = rng.normal(0.0, 0.07 * size, 2)
    radius = u01(0.2, 0.3) * size
    elong = u01(*spec["elong"])
    theta = u01(0, math.pi)
    a, b = radius * math.sqrt(elong), radius / math.sqrt(elong)
    x, y = xx - cx, yy - cy
    u = (x * math.cos(theta) + y * math.sin(theta)) / a
    v = (-x * math.sin(theta) + y * math.cos(theta)) / b
    rho = np.hypot(u, v)
    ang = np.arctan2(v, u)
    harmonics = rng.choice(np.arange(2, 8), size=3, replace=False)
    weights = rng.dirichlet(np.ones(3)) * u01(*spec["irreg"])
    boundary = 1.0 + sum(w * np.cos(k * ang + u01(0, 2 * math.pi)) for k, w in zip(harmonics, weights))
    dist = rho / boundary
    edge = u01(0.04, 0.12)
    alpha = 1.0 / (1.0 + np.exp(np.clip(-(1.0 - dist) / edge, -50, 50)))
    alpha *= u01(0.75, 1.0)  # opacity: the skin shows through faint lesions

    # Lesion colour and internal texture (luminance modulation, zero mean).
    base = np.array(COLOURS[colour][0]) * u01(0.82, 1.18) + rng.normal(0.0, 0.03, 3)
    low, high = _band(design.texture, size)
    orientation = None
    if design.texture == "fine" and rng.random() < 0.5:
        orientation = u01(0, math.pi)  # stripes instead of speckle
    texture = band_noise(rng, size, low, high, orientation)
    amplitude = u01(0.06, 0.35)
    centre_dark = u01(0.0, 0.25) * np.clip(1.0 - dist, 0.0, 1.0)
    lesion = base * ((1.0 + amplitude * texture) * (1.0 - centre_dark))[..., None]

    image = image * (1.0 - alpha[..., None]) + lesion * alpha[..., None]
    image += rng.normal(0.0, u01(0.01, 0.03), image.shape)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# The dataset.


@dataclass
class SynthConfig:
    num_classes: int = 8
    image_size: int = 64
    imbalance: float = 0.01
    max_per_class: int = 500
    val_per_class: int = 20
    test_per_class: int = 20
    public_classes: int = 10
    public_per_class: int = 300
    public_val_per_class: int = 30
    seed: int = 0
    unlabeled: int = 0  # size of the label-free pool target/unlabeled/ (0: none)


def _check_int(value: object, option: str, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise FoproError(f"{option} must be a whole number, got {value!r}")
    if value < minimum:
        raise FoproError(f"{option} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise FoproError(f"{option} must be <= {maximum}, got {value}")


def check_config(config: SynthConfig) -> None:
    """Raise FoproError naming the first bad option."""
    _check_int(config.num_classes, "--num-classes", 2, MAX_CLASSES)
    _check_int(config.image_size, "--image-size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    number = (int, float, np.integer, np.floating)
    if isinstance(config.imbalance, bool) or not isinstance(config.imbalance, number) or not math.isfinite(config.imbalance):
        raise FoproError(f"--imbalance must be a number in (0, 1], got {config.imbalance!r}")
    check_imbalance(float(config.imbalance), "--imbalance")
    _check_int(config.max_per_class, "--max-per-class", 1)
    _check_int(config.val_per_class, "--val-per-class", 1)
    _check_int(config.test_per_class, "--test-per-class", 1)
    _check_int(config.public_classes, "--public-classes", 2, MAX_CLASSES)
    _check_int(config.public_per_class, "--public-per-class", 1)
    _check_int(config.public_val_per_class, "--public-val-per-class", 1)
    _check_int(config.seed, "--seed", 0)
    _check_int(config.unlabeled, "--unlabeled", 0)


def proportional_counts(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`: round(total * w_i / sum w), fixed to sum exactly to `total`.

    Largest remainder: every class gets the floor of its share, and the classes with the largest
    fractional parts (ties: the lower class index) one more each.
    """
    weight_sum = sum(weights)
    counts = [total * w // weight_sum for w in weights]
    remainders = [total * w % weight_sum for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (-remainders[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def unlabeled_items(config: SynthConfig, classes: int, counts: list[int]) -> list[tuple[int, int, int]]:
    """(file number, class, index within the class) of each pool image; the file numbers are shuffled."""
    items = [(cls, idx) for cls in range(classes) for idx in range(counts[cls])]
    order = np.random.default_rng([config.seed, UNLABELED_SPLIT_ID]).permutation(len(items))
    return [(int(number), cls, idx) for number, (cls, idx) in zip(order, items)]


def unlabeled_name(number: int, size: int) -> str:
    return f"u{number:0{max(5, len(str(max(size - 1, 0))))}d}.png"


def plan(config: SynthConfig) -> dict:
    """The summary written to synth.json (classes, designs, counts), without rendering anything."""
    check_config(config)
    designs, pairs = target_designs(config.num_classes)
    names = folder_names(designs, "c")
    pub = public_designs(config.public_classes)
    pub_names = folder_names(pub, "p")
    train = longtail_counts(config.max_per_class, config.num_classes, float(config.imbalance))
    target_counts = {
        "train": dict(zip(names, train)),
        "val": {n: config.val_per_class for n in names},
        "test": {n: config.test_per_class for n in names},
    }
    public_counts = {
        "train": {n: config.public_per_class for n in pub_names},
        "val": {n: config.public_val_per_class for n in pub_names},
    }
    total = sum(sum(c.values()) for c in target_counts.values()) + sum(sum(c.values()) for c in public_counts.values())
    settings = asdict(config)
    if not config.unlabeled:
        del settings["unlabeled"]  # a dataset without the pool keeps the synth.json of earlier versions
    summary = {
        "format": FORMAT,
        "description": "Synthetic lesion-like images (fopro default dataset): long-tailed target task and a "
                       "balanced public corpus with its own classes; class = shape x colour x texture frequency.",
        "config": settings,
        "image_size": config.image_size,
        "frequency_pairs": [[names[rare], names[head]] for rare, head in pairs],
        "target": {
            "classes": names,
            "designs": [d.as_dict(n) for d, n in zip(designs, names)],
            "counts": target_counts,
        },
        "public": {
            "classes": pub_names,
            "designs": [d.as_dict(n) for d, n in zip(pub, pub_names)],
            "counts": public_counts,
        },
        "total_images": total,
    }
    if config.unlabeled:
        pool = proportional_counts(config.unlabeled, train)
        summary["target"]["unlabeled"] = {
            "folder": UNLABELED_FOLDER,
            "size": config.unlabeled,
            "counts": dict(zip(names, pool)),
            "note": "unlabelled pool drawn from the train split's class distribution; these true per-class "
                    "counts are for analysis only: no per-image label is written anywhere",
        }
        summary["total_images"] = total + config.unlabeled
    return summary


def is_synth_dataset(out: Path) -> bool:
    out = Path(out)
    return (out / SUMMARY_FILE).exists() or (out / "target").exists() or (out / "public").exists()


def is_synth_corpus(root: str | Path | None) -> bool:
    """True for a corpus folder (target/ or public/) that `generate_synth` wrote: lesion-like images whose
    orientation carries no label."""
    return root is not None and (Path(root).parent / SUMMARY_FILE).is_file()


def generate_synth(out: Path, config: SynthConfig | None = None,
                   progress: Callable[[int, int], None] | None = None, overwrite: bool = False) -> dict:
    """Write the synthetic dataset under `out` (see the module docstring) and return its summary.

    The images are rendered into a temporary folder inside `out` and moved in place at the end, so an
    interrupted run leaves no half dataset. `progress(done, total)` is called after each image.
    """
    config = SynthConfig() if config is None else config
    summary = plan(config)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FoproError(f"output {out} is a file; give a folder for the synthetic dataset")
    if is_synth_dataset(out) and not overwrite:
        raise FoproError(f"{out} already holds a synthetic dataset; "
                         "pass --overwrite to replace it or choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".synth-", dir=out))
    except OSError as err:
        raise FoproError(f"cannot write {out}: {err.strerror}; choose a writable output folder") from err

    designs, _ = target_designs(config.num_classes)
    pub = public_designs(config.public_classes)
    corpora = {"target": designs, "public": pub}
    total = summary["total_images"]
    done = 0
    try:
        for corpus in ("target", "public"):
            section = summary[corpus]
            for split, per_class in section["counts"].items():
                split_id = SPLIT_IDS[(corpus, split)]
                for cls, (name, design) in enumerate(zip(section["classes"], corpora[corpus])):
                    folder = work / corpus / split / name
                    folder.mkdir(parents=True, exist_ok=True)
                    for idx in range(per_class[name]):
                        rng = np.random.default_rng([config.seed, split_id, cls, idx])
                        pixels = render_image(design, config.image_size, rng)
                        Image.fromarray(pixels, "RGB").save(folder / f"{idx:05d}.png", format="PNG")
                        done += 1
                        if progress is not None:
                            progress(done, total)
        if config.unlabeled:
            pool = summary["target"]["unlabeled"]
            folder = work / "target" / UNLABELED_FOLDER
            folder.mkdir(parents=True, exist_ok=True)
            counts = [pool["counts"][name] for name in summary["target"]["classes"]]
            for number, cls, idx in unlabeled_items(config, len(designs), counts):
                rng = np.random.default_rng([config.seed, UNLABELED_SPLIT_ID, cls, idx])
                pixels = render_image(designs[cls], config.image_size, rng)
                Image.fromarray(pixels, "RGB").save(folder / unlabeled_name(number, config.unlabeled), format="PNG")
                done += 1
                if progress is not None:
                    progress(done, total)
        if overwrite:
            for old in ("target", "public", SUMMARY_FILE):
                path = out / old
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
        for corpus in ("target", "public"):
            (work / corpus).rename(out / corpus)
        write_json(out / SUMMARY_FILE, summary)
    except OSError as err:
        raise FoproError(f"cannot write the synthetic dataset to {out}: {err.strerror or err}; "
                         "check the free space and permissions") from err
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary
