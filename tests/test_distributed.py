"""Data-parallel distillation under torchrun on CPU (gloo, 2 processes) against a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fopro.data import DataOptions
from fopro.distributed import DistEnv, env_from_environment
from fopro.evaluate import EvalOptions, evaluate
from fopro.schedule import epoch_batches, epoch_order



def _command(args: list[str], out: Path, processes: int, *launcher_options: str) -> list[str]:
    """`fopro distill ARGS --out OUT` on the CPU, under torchrun (with `launcher_options`) when processes > 1."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *launcher_options] if processes > 1 else [sys.executable]
    return launcher + ["-m", "fopro", "distill", *args, "--out", str(out), "--device", "cpu", "--workers", "0"]


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def _distill(args: list[str], out: Path, processes: int) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(args, out, processes), capture_output=True, text=True, env=_env(), timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def runs(distill_data, tmp_path_factory):
    """The same global batch (16) as one process x 16 and as two processes x 8."""
    root = tmp_path_factory.mktemp("ddp")
    common = ["--data", str(distill_data), "--method", "none", "--student", "test_vit", "--image-size", "32", "--epochs", "2", "--seed", "3"]
    single = _distill(common + ["--batch-size", "16"], root / "single", 1)
    double = _distill(common + ["--batch-size", "8"], root / "double", 2)
    return root, single, double


def test_two_processes_match_one_with_the_same_global_batch(runs):
    root, _, _ = runs
    one, two = load_file(str(root / "single" / "last.safetensors")), load_file(str(root / "double" / "last.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-4, msg=key)


def test_only_rank_zero_writes_and_prints(runs):
    root, _, double = runs
    files = sorted(p.name for p in (root / "double").iterdir())
    assert files == sorted(p.name for p in (root / "single").iterdir())
    assert not list((root / "double").glob("*.tmp")) and not list((root / "double").glob(".*"))
    assert double.stdout.count("run folder:") == 1
    assert double.stdout.count("next steps:") == 1 and "fopro export" in double.stdout  # the summary ends with what to run next
    lines = (root / "double" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_val_metrics_equal_single_process_eval_of_the_checkpoint(runs, distill_data):
    root, _, _ = runs
    logged = json.loads((root / "double" / "metrics.jsonl").read_text().splitlines()[-1])["val"]
    report = evaluate(root / "double" / "last", DataOptions(data=distill_data), EvalOptions(split="val", device="cpu"))
    assert logged["balanced_accuracy"] == pytest.approx(report["balanced_accuracy"], abs=1e-9)
    assert logged["accuracy"] == pytest.approx(report["accuracy"], abs=1e-9)


def test_fopro_runs_under_two_processes(distill_data, distill_teacher, tmp_path):
    args = ["--data", str(distill_data), "--teacher", str(distill_teacher), "--student", "test_resnet", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--method", "fopro"]
    _distill(args, tmp_path / "fopro", 2)
    assert (tmp_path / "fopro" / "fpg.safetensors").is_file()
    assert (tmp_path / "fopro" / "best.safetensors").is_file()


def test_each_process_gets_its_share_of_the_global_batch():
    labels = [0] * 20 + [1] * 12
    order = epoch_order(labels, epoch=1, seed=0, balanced=False)
    global_batches = epoch_batches(order, 8)
    shares = [[b[r * 4 : (r + 1) * 4] for b in global_batches] for r in range(2)]
    for step, batch in enumerate(global_batches):
        assert shares[0][step] + shares[1][step] == batch


def test_environment_parsing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert env_from_environment() == DistEnv(rank=2, world_size=4, local_rank=0)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert not env_from_environment().enabled


def test_resume_with_a_different_number_of_processes(distill_data, tmp_path):
    """A state saved at an epoch's end by 2 processes continues with 1, like a 1-process state does."""
    common = ["--data", str(distill_data), "--method", "none", "--student", "test_vit", "--image-size", "32", "--epochs", "1", "--seed", "5"]
    _distill(common + ["--batch-size", "8"], tmp_path / "two", 2)
    _distill(common + ["--batch-size", "16"], tmp_path / "one", 1)
    for name in ("two", "one"):  # one more epoch for both, each continued by a single process
        config_path = tmp_path / name / "config.json"
        config = json.loads(config_path.read_text())
        config.update(epochs=2, batch_size=16)
        config_path.write_text(json.dumps(config))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        resumed = subprocess.run([sys.executable, "-m", "fopro", "distill", "--resume", str(tmp_path / name)], capture_output=True, text=True, env=env, timeout=240)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
    two, one = load_file(str(tmp_path / "two" / "last.safetensors")), load_file(str(tmp_path / "one" / "last.safetensors"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-4, msg=key)
