"""The training recipe: --lr auto, the schedule, option combinations that warn, what the teacher and the FPG see,
and the --help / config-file surface of the augmentation options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import torch_threads
from fopro.cli import app
from fopro.config import AUTO_LR, DistillConfig, resolve_config
from fopro.data.augment import KNOBS, PRESETS
from fopro.distill import distill
from fopro.errors import FoproError
from fopro.runtime import no_progress
from fopro.schedule import lr_factor
from fopro.run import build_run, local_batches
from fopro.train import train_epoch


def test_lr_auto_scales_with_the_global_batch():
    assert AUTO_LR["adam"] == (1e-3, 32, 0.5)
    assert DistillConfig().lr is None
    assert DistillConfig().learning_rate() == pytest.approx(1e-3)
    assert DistillConfig(batch_size=128).learning_rate() == pytest.approx(2e-3)  # sqrt(128 / 32) = 2
    assert DistillConfig(batch_size=32).learning_rate(world_size=4) == pytest.approx(2e-3)
    assert DistillConfig(optimizer="sgd", batch_size=64).learning_rate(world_size=2) == pytest.approx(0.05)  # 0.1 * 128 / 256
    assert DistillConfig(lr=3e-4, batch_size=256).learning_rate(world_size=8) == 3e-4  # given: never scaled
    assert resolve_config({}, {"lr": "auto"}).lr is None
    assert resolve_config({}, {"lr": "2e-3"}).lr == 2e-3
    with pytest.raises(FoproError, match=r"--lr fast is not a number: give a learning rate such as 1e-3, or auto"):
        resolve_config({}, {"lr": "fast"})
    with pytest.raises(FoproError, match=r"--lr -1.0 must be greater than 0"):
        resolve_config({}, {"lr": -1.0})


def test_schedules():
    total, warmup = 100, 10
    assert [lr_factor(s, total, warmup) for s in (0, 9)] == [0.1, 1.0]
    assert lr_factor(10, total, warmup) == 1.0 and lr_factor(99, total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_factor(55, total, warmup) == pytest.approx(0.5)
    assert [lr_factor(s, total, warmup, "constant") for s in (0, 9, 10, 99)] == [0.1, 1.0, 1.0, 1.0]
    with pytest.raises(FoproError, match="--schedule step is not known: choose one of cosine, constant"):
        resolve_config({}, {"schedule": "step"})


def test_auto_lr_is_used_noted_and_saved_as_auto(tmp_path: Path, distill_values):
    values = distill_values(method="none", batch_size=8, out=str(tmp_path / "run"))
    with torch_threads(1):
        summary = distill(values)
    expected = 1e-3 * math.sqrt(8 / 32)
    assert summary["lr"] == pytest.approx(expected)
    assert any(note.startswith(f"--lr auto: {expected:.3g} for adam at a global batch of 8") for note in summary["notes"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] is None


def test_balanced_sampler_with_balanced_softmax_warns(distill_data, distill_teacher, tmp_path):
    config = DistillConfig(data=str(distill_data), student="test_resnet", image_size=32, method="none", balanced_sampler=True,
                           batch_size=8, device="cpu", workers=0)
    notes = build_run(config, tmp_path / "run").notes
    assert any(n.startswith("warning: --balanced-sampler with --loss balanced_softmax corrects the class imbalance twice") for n in notes)
    config.loss = "ce"
    assert not any("twice" in n for n in build_run(config, tmp_path / "run2").notes)


@pytest.mark.parametrize("method", ["ekd", "fopro"])
def test_teacher_and_fpg_see_the_students_augmented_image(method, distill_data, distill_teacher, tmp_path):
    """One train epoch: the teacher sees the student's input, which is the augmented batch (ekd) or the FPG's prompt
    of the augmented batch (fopro)."""
    config = DistillConfig(data=str(distill_data), teacher=str(distill_teacher), student="test_resnet", image_size=32,
                           method=method, augment="dermoscopy", batch_size=8, epochs=1, device="cpu", workers=0)
    run = build_run(config, tmp_path / "run")
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": [], "fpg": []}
    student_preprocess = run.method.student_preprocess
    run.method.student_preprocess = lambda x: (seen["student"].append(x.detach().clone()), student_preprocess(x))[1]
    teacher_forward = run.method.teacher.forward
    run.method.teacher.forward = lambda x: (seen["teacher"].append(x.detach().clone()), teacher_forward(x))[1]
    prompted: list[torch.Tensor] = []
    if method == "fopro":
        fpg_forward = run.method.fpg.forward

        def watched_fpg(x):
            seen["fpg"].append(x.detach().clone())
            out = fpg_forward(x)
            prompted.append(out[0].detach().clone())
            return out

        run.method.fpg.forward = watched_fpg
    with torch_threads(1):
        train_epoch(run, torch.amp.GradScaler("cuda", enabled=False), {"stop": False}, no_progress)
    batches = local_batches(run)  # epoch 0's image indices, batch by batch
    assert len(seen["student"]) == len(batches)
    for images, indices in zip(seen["student"], batches):
        stored = torch.stack([run.train_set.raw(i).float() / 255 for i in indices])
        assert images.shape == stored.shape and not torch.equal(images, stored)  # augmented, not the stored images
    # the teacher sees what the student sees: the augmented batch (ekd), or its prompted version (fopro)
    assert len(seen["teacher"]) == len(seen["student"])
    assert all(torch.equal(a, b) for a, b in zip(seen["student"], seen["teacher"]))
    if method == "fopro":  # ... which the FPG made from the augmented batch
        assert len(seen["fpg"]) == len(seen["student"])
        for images, indices, fpg_input, fpg_output in zip(seen["student"], batches, seen["fpg"], prompted):
            stored = torch.stack([run.train_set.raw(i).float() / 255 for i in indices])
            assert not torch.equal(fpg_input, stored) and torch.equal(fpg_output, images)


def test_help_lists_every_preset_and_knob():
    result = CliRunner().invoke(app, ["distill", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for preset in PRESETS:
        assert f"{preset}:" in text
    for knob in KNOBS:
        assert f"--{knob.replace('_', '-')}" in text
    assert "--augment" in text and "--schedule" in text and "auto" in text
