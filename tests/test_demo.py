"""The first run a new user sees: `fopro distill` with no options, in a fresh HOME (FOPRO_DEMO_SCALE=tiny shrinks
the data and the schedule; the pipeline, the shipped teacher and the output are the real ones)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fopro.checkpoint import file_sha256, load_meta
from fopro.defaults import DEMO_TEACHER, DEMO_TEACHER_ARCH, DEMO_TEACHER_SHA256, TINY_SYNTH, demo_teacher, tiny_demo
from fopro.errors import FoproError
from helpers import one_line

PHASES = (
    "data · generating synthetic data",
    "data · checking images",
    "student: ekd distillation · the only epoch",
    "student: ekd distillation · epoch 1/1",
    "teacher probe ·",
    "calibration on val ·",
    "test evaluation ·",
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if k not in ("FOPRO_CACHE", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), FOPRO_DEMO_SCALE="tiny", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="200")
    done = subprocess.run([sys.executable, "-m", "fopro", "distill"], cwd=home, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, home


def test_the_default_job_runs_in_labelled_phases_in_order(demo_run) -> None:
    done, home = demo_run
    lines = done.stderr.splitlines()
    firsts = [next((i for i, line in enumerate(lines) if line.startswith(phase)), None) for phase in PHASES]
    assert None not in firsts, "\n".join(lines)
    assert firsts[:2] == sorted(firsts[:2]) and max(firsts[:2]) < min(firsts[2:4]) < min(firsts[4:]), "\n".join(lines)
    epoch = next(line for line in lines if line.startswith("student: ekd distillation · epoch 1/1 ["))
    assert re.search(r"sup \d+\.\d{3}.* img/s\]: \d+/\d+ done in 0:\d\d:\d\d$", epoch), epoch
    assert (home / ".cache" / "fopro" / "synth-v2-tiny" / "target" / "train").is_dir()  # the fresh HOME's cache


def test_the_summary_shows_the_teacher_probe_and_the_next_steps(demo_run) -> None:
    done, home = demo_run
    out = done.stdout
    assert "SYNTHETIC" in out and f"demo teacher: {DEMO_TEACHER_ARCH}" in out, out
    assert re.search(r"teacher probe .*test balanced accuracy \d+\.\d%.*the student: \d+\.\d%", out.replace("\n", " ")), out
    run_dirs = list((home / "runs").iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / "best.safetensors").is_file()
    tail = out[out.index("next steps:"):]
    for command in (f"fopro eval {run_dirs[0]}", f"fopro export {run_dirs[0]}/best.safetensors --onnx", f"fopro card {run_dirs[0]}", "fopro probe --teacher"):
        assert command in tail, tail


def test_the_demo_runs_the_default_method_with_the_label_free_pool(demo_run) -> None:
    """The embedded default is the recommended configuration: ekd with --align-focus 2 and the synthetic pool."""
    done, home = demo_run
    run_dir = next((home / "runs").iterdir())
    config = json.loads((run_dir / "config.json").read_text())
    pool = home / ".cache" / "fopro" / "synth-v2-tiny" / "target" / "unlabeled"
    assert config["method"] == "ekd" and config["align_focus"] is None and config["unlabeled"] == str(pool)
    assert len(list(pool.iterdir())) == TINY_SYNTH.unlabeled
    assert f"--unlabeled: {TINY_SYNTH.unlabeled} images" in done.stdout and "--align-focus 2: the ekd default" in done.stdout


def test_the_shipped_demo_teacher_is_checked_before_use(tmp_path: Path) -> None:
    assert demo_teacher() == DEMO_TEACHER
    assert file_sha256(DEMO_TEACHER) == DEMO_TEACHER_SHA256 == load_meta(DEMO_TEACHER).to_dict().get("weights_sha256", DEMO_TEACHER_SHA256)
    damaged = tmp_path / "demo_teacher.safetensors"
    shutil.copy(DEMO_TEACHER, damaged)
    shutil.copy(DEMO_TEACHER.with_suffix(".json"), tmp_path / "demo_teacher.json")
    with open(damaged, "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    with pytest.raises(FoproError) as info:
        demo_teacher(damaged)
    one_line(info, str(damaged), "damaged", "scripts/make_demo_teacher.py")
    (tmp_path / "demo_teacher.json").unlink()
    with pytest.raises(FoproError) as info:
        demo_teacher(damaged)
    one_line(info, "demo_teacher.json is missing")


def test_the_demo_scale_variable_accepts_only_full_and_tiny(monkeypatch) -> None:
    monkeypatch.setenv("FOPRO_DEMO_SCALE", "huge")
    with pytest.raises(FoproError) as info:
        tiny_demo()
    one_line(info, "FOPRO_DEMO_SCALE='huge'", "full", "tiny")
    monkeypatch.setenv("FOPRO_DEMO_SCALE", "tiny")
    assert tiny_demo()
    monkeypatch.delenv("FOPRO_DEMO_SCALE")
    assert not tiny_demo()
