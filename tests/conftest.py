"""Shared test setup: never touch the network (timm / Hugging Face hub stay offline)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# --- distillation fixtures (tests/test_distill.py, tests/test_resume.py) ---------------------------

import contextlib  # noqa: E402

import pytest  # noqa: E402


@contextlib.contextmanager
def torch_threads(count: int = 1):
    """Run tiny CPU trainings on `count` intra-op threads, then restore the previous setting.

    On a shared 2-core machine two OpenMP threads per process oversubscribe the cores and slow these tiny
    models down many times; one thread is faster, and the same count everywhere keeps runs bit-comparable.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


DISTILL_SYNTH = dict(num_classes=4, image_size=32, max_per_class=24, val_per_class=4, test_per_class=4,
                     public_classes=2, public_per_class=4, public_val_per_class=2)


@pytest.fixture(scope="session")
def distill_data(tmp_path_factory):
    """A tiny long-tailed synthetic ImageFolder (31 train images in 4 classes, 32 px); returns target/."""
    from fopro.data.synth import SynthConfig, generate_synth

    root = tmp_path_factory.mktemp("distill-synth")
    generate_synth(root / "synth", SynthConfig(**DISTILL_SYNTH))
    return root / "synth" / "target"


@pytest.fixture(scope="session")
def distill_teacher(tmp_path_factory):
    """A randomly initialised `test_resnet` saved as a fopro checkpoint (the frozen teacher); its .safetensors path."""
    import timm
    import torch

    from fopro.checkpoint import CheckpointMeta, save_checkpoint

    torch.manual_seed(123)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=2).eval()
    meta = CheckpointMeta(arch="test_resnet", classes=["p0", "p1"], image_size=32,
                          mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    return save_checkpoint(tmp_path_factory.mktemp("distill-teacher") / "teacher", model.state_dict(), meta)


def tiny_distill_values(data, teacher, **overrides) -> dict:
    """Option values (as `fopro distill` gets them) of a tiny fast run: test_resnet student, 32 px, batch 8, 1 epoch."""
    values = dict(data=str(data), teacher=str(teacher), student="test_resnet", image_size=32,
                  method="fopro", epochs=1, batch_size=8, device="cpu", workers=0, seed=0)
    values.update(overrides)
    return values


@pytest.fixture
def distill_values(distill_data, distill_teacher):
    """make(**overrides) -> the option values of a tiny fast run (see tiny_distill_values)."""
    return lambda **overrides: tiny_distill_values(distill_data, distill_teacher, **overrides)


# 2 epochs of fopro with a fast-moving FPG and the augmentation that draws the most (flips, turns, rotation,
# colour): the straight run that the determinism and resume tests compare against.
TWO_EPOCH_FOPRO = dict(method="fopro", epochs=2, fpg_strength=0.3, fpg_lr=0.3, augment="dermoscopy")


@pytest.fixture(scope="session")
def fopro_two_epoch_run(tmp_path_factory, distill_data, distill_teacher):
    """(option values, run folder) of one straight 2-epoch fopro run (seed 0), trained once per session."""
    from fopro.config import resolve_config
    from fopro.train import train

    values = tiny_distill_values(distill_data, distill_teacher, **TWO_EPOCH_FOPRO)
    run_dir = tmp_path_factory.mktemp("fopro-two-epochs") / "run"
    with torch_threads(1):
        train(resolve_config({}, values), run_dir)
    return values, run_dir
