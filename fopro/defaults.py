"""The embedded default: synthetic data (made once offline and cached) and the demo teacher shipped with fopro.

`fopro distill` with no data and no teacher uses them, so a new user sees the whole method run on any machine in a
few minutes. The data are SYNTHETIC lesion-like images, not medical images. The demo teacher stands in for a public
pre-trained model: a resnet18 trained on the synthetic "public" corpus by `make_demo_teacher` (run by
scripts/make_demo_teacher.py, deterministic on one thread), stored in half precision in fopro/assets/ and checked
against its sha256 before use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fopro.checkpoint import file_sha256, load_checkpoint, save_checkpoint, sidecar
from fopro.config import DistillConfig
from fopro.data.synth import UNLABELED_FOLDER, SynthConfig, generate_synth, is_synth_dataset
from fopro.errors import FoproError
from fopro.runtime import ProgressFn, in_phase, no_progress
from fopro.train import train

SYNTH_CACHE_VERSION = "v2"  # v2 adds the label-free pool; every other image is v1's
# the target task of `fopro data synth` with a smaller head (200 -> 5 at 1:40: 479 train images, where the defaults
# have 1,028) and the rare classes nearly as many as there (14, 8, 5 against 18, 9, 5), so that the demo runs in about
# two minutes on 2 cores; a label-free pool about three times train (as the protocol's 3,000 to 1,028), drawn from the
# same long tail; the public corpus is the shipped teacher's, so one image a class
DEMO_SYNTH = SynthConfig(max_per_class=200, imbalance=0.025, public_per_class=1, public_val_per_class=1, unlabeled=1500)
# FOPRO_DEMO_SCALE=tiny (for tests only): a few images a class and one epoch, the same pipeline
TINY_SYNTH = SynthConfig(max_per_class=12, val_per_class=3, test_per_class=3, public_per_class=1, public_val_per_class=1, unlabeled=16)
DEMO_TEACHER = Path(__file__).resolve().parent / "assets" / "demo_teacher.safetensors"
DEMO_TEACHER_SHA256 = "c58d2bff3faa539cff7755582993a74d072e19722aef616ed5b3efc0156decb9"
DEMO_TEACHER_ARCH = "resnet18"
DEMO_TEACHER_EPOCHS = 6
DEMO_STUDENT = "resnet10t"  # smaller than the teacher (4.9 M vs 11.2 M parameters), and fast enough for the demo
# 15 epochs (the synthetic protocol's budget), chosen on the demo data's VAL split (3 seeds, see README): at 5 epochs
# (before 0.9) every student stopped 10 points short of where 15 take it
DEMO_EPOCHS = 15
# The demo student's augmentation: the authors' transform, chosen on the synthetic protocol's VAL split over
# 3 seeds (examples/results/synthetic_lt_06/results.md): it beat dermoscopy for the plain, EKD and fopro students.
DEMO_AUGMENT = "reference"
DEMO_TEACHER_AUGMENT = "dermoscopy"  # how the shipped demo teacher was pre-trained (lesion-like: no orientation)
REMAKE = "reinstall fopro, or remake it with python scripts/make_demo_teacher.py"


@dataclass
class EmbeddedDefault:
    data_root: Path
    unlabeled: Path
    teacher_checkpoint: Path
    epochs: int
    notes: list[str]


def cache_dir() -> Path:
    """$FOPRO_CACHE, else $XDG_CACHE_HOME/fopro, else ~/.cache/fopro."""
    if os.environ.get("FOPRO_CACHE"):
        return Path(os.environ["FOPRO_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fopro"


def tiny_demo() -> bool:
    """FOPRO_DEMO_SCALE=tiny shrinks the embedded default for tests; any other value is refused."""
    scale = os.environ.get("FOPRO_DEMO_SCALE", "full")
    if scale not in ("full", "tiny"):
        raise FoproError(f"FOPRO_DEMO_SCALE={scale!r}: use full (the default) or tiny (for tests)")
    return scale == "tiny"


def ensure_synth(root: Path, config: SynthConfig, progress: ProgressFn = no_progress) -> Path:
    """The synthetic dataset `config` in `root`, generated unless it is there already."""
    if not is_synth_dataset(root):
        data = in_phase(progress, "data")
        generate_synth(root, config, progress=lambda done, total: data("generating synthetic data", done, total))
    return root


def demo_teacher_config(synth_root: Path) -> DistillConfig:
    """The stand-in for a public pre-trained model: a larger network trained on the public synthetic corpus."""
    return DistillConfig(
        data=str(synth_root / "public"),
        method="none",
        loss="ce",
        student=DEMO_TEACHER_ARCH,
        image_size=64,
        epochs=DEMO_TEACHER_EPOCHS,
        batch_size=32,
        augment=DEMO_TEACHER_AUGMENT,
    )


def demo_teacher(path: Path = DEMO_TEACHER, sha256: str = DEMO_TEACHER_SHA256) -> Path:
    """The shipped demo teacher checkpoint, after checking that its weights are the ones fopro was released with."""
    weights, meta = sidecar(path)
    for part in (weights, meta):
        if not part.is_file():
            raise FoproError(f"the demo teacher {part} is missing: {REMAKE}")
    digest = file_sha256(weights)
    if digest != sha256:
        raise FoproError(f"the demo teacher {weights} is damaged (sha256 {digest[:16]}..., expected {sha256[:16]}...): {REMAKE}")
    return weights


def make_demo_teacher(out: Path, work: Path, progress: ProgressFn = no_progress) -> dict[str, Any]:
    """Pre-train the demo teacher on the synthetic public corpus in `work` and write it to `out` in half precision.

    Deterministic for a given torch build and thread count (scripts/make_demo_teacher.py uses one thread)."""
    synth = ensure_synth(work / "synth", SynthConfig(), progress)
    run_dir = work / "demo-teacher"
    config = demo_teacher_config(synth)
    summary = train(config, run_dir, overwrite=True, progress=progress, phase="demo teacher: pre-training")
    state, meta = load_checkpoint(run_dir / "best")
    meta.config = {**config.to_dict(), "data": "fopro's synthetic public corpus (SynthConfig defaults, seed 0)"}
    weights = save_checkpoint(out, {k: v.half() if v.is_floating_point() else v for k, v in state.items()}, meta)
    return {"weights": str(weights), "sha256": file_sha256(weights), "best_epoch": summary["best_epoch"], "best_val": summary["best_val"]}


def embedded_default(progress: ProgressFn = no_progress) -> EmbeddedDefault:
    tiny = tiny_demo()
    synth = ensure_synth(cache_dir() / f"synth-{SYNTH_CACHE_VERSION}-{'tiny' if tiny else 'demo'}", TINY_SYNTH if tiny else DEMO_SYNTH, progress)
    teacher = demo_teacher()
    notes = [
        f"embedded default: SYNTHETIC lesion-like data ({synth / 'target'}), not medical images",
        f"demo teacher: {DEMO_TEACHER_ARCH} pre-trained on the synthetic public corpus, shipped with fopro ({teacher})",
    ]
    return EmbeddedDefault(data_root=synth / "target", unlabeled=synth / "target" / UNLABELED_FOLDER, teacher_checkpoint=teacher,
                           epochs=1 if tiny else DEMO_EPOCHS, notes=notes)
