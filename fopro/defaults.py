"""The embedded default: synthetic data and a demo teacher, made once offline and cached.

`fopro distill` with no data and no teacher uses them, so a new user sees the whole method run
on any machine. The data are SYNTHETIC lesion-like images, not medical images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fopro.config import DistillConfig
from fopro.data.synth import SynthConfig, generate_synth, is_synth_dataset
from fopro.runtime import ProgressFn, no_progress
from fopro.train import train

SYNTH_CACHE_VERSION = "v1"
TEACHER_CACHE_VERSION = "v2"  # v2: trained with the recipe of fopro 0.2 (lr auto, --augment)
DEMO_TEACHER_ARCH = "resnet26"
DEMO_TEACHER_EPOCHS = 6
DEMO_EPOCHS = 6
DEMO_AUGMENT = "dermoscopy"  # the synthetic images are lesion-like: orientation carries no label


@dataclass
class EmbeddedDefault:
    data_root: Path
    teacher_checkpoint: Path
    notes: list[str]


def cache_dir() -> Path:
    """$FOPRO_CACHE, else $XDG_CACHE_HOME/fopro, else ~/.cache/fopro."""
    if os.environ.get("FOPRO_CACHE"):
        return Path(os.environ["FOPRO_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fopro"


def ensure_synth(progress: ProgressFn = no_progress) -> Path:
    root = cache_dir() / f"synth-{SYNTH_CACHE_VERSION}"
    if not is_synth_dataset(root):
        generate_synth(root, SynthConfig(), progress=lambda done, total: progress("generating synthetic data", done, total))
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
        augment=DEMO_AUGMENT,
    )


def ensure_demo_teacher(synth_root: Path, progress: ProgressFn = no_progress) -> Path:
    run_dir = cache_dir() / f"demo-teacher-{TEACHER_CACHE_VERSION}"
    best = run_dir / "best.safetensors"
    if _finished(run_dir):
        return best
    resume = (run_dir / "resume.safetensors").is_file()
    train(demo_teacher_config(synth_root), run_dir, resume=resume, overwrite=not resume, progress=progress)
    return best


def _finished(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return False
    lines = metrics.read_text().strip().splitlines()
    return bool(lines) and json.loads(lines[-1]).get("epoch") == DEMO_TEACHER_EPOCHS


def embedded_default(progress: ProgressFn = no_progress) -> EmbeddedDefault:
    synth = ensure_synth(progress)
    teacher = ensure_demo_teacher(synth, progress)
    notes = [
        f"embedded default: SYNTHETIC lesion-like data ({synth / 'target'}), not medical images",
        f"demo teacher: {DEMO_TEACHER_ARCH} pre-trained on the synthetic public corpus ({teacher})",
    ]
    return EmbeddedDefault(data_root=synth / "target", teacher_checkpoint=teacher, notes=notes)
