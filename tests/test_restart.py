"""Restartable cluster jobs: `resume: auto` in a config file, a 2-process torchrun job whose worker is killed
mid-run and restarted by torchrun with the same command, and the syntax of the SLURM examples."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fopro.cli import app
from fopro.config_files import read_config_file
from fopro.distill import distill
from fopro.errors import FoproError
from fopro.train import TrainingInterrupted

from conftest import torch_threads
from test_distributed import _command, _distill, _env
from test_resume import _assert_same_history, _assert_same_weights, _metrics, _sigint_at

REPO = Path(__file__).resolve().parents[1]
SLURM_SCRIPTS = sorted((REPO / "examples" / "slurm").glob("*.sbatch"))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def _config_file(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


# ------------------------------------------------------------------------------- resume: auto in a config file


def test_resume_auto_in_a_config_file_starts_then_resumes_to_the_straight_run(fopro_two_epoch_run, tmp_path):
    """One file for every start of a pre-empted job: the first start trains, SIGTERM stops it mid-epoch, and
    `fopro distill --config FILE` (nothing else) resumes it to the straight run's weights, bit for bit."""
    values, straight = fopro_two_epoch_run
    run_dir = tmp_path / "run"
    config = _config_file(tmp_path / "job.yaml", {**values, "out": str(run_dir), "resume": "auto"})
    with pytest.raises(TrainingInterrupted) as stop:
        distill({}, config_file=config, progress=_sigint_at(epoch=2, step=1, signum=signal.SIGTERM))
    assert stop.value.signal_name == "SIGTERM"
    assert "resume" not in json.loads((run_dir / "config.json").read_text())  # how to run, not saved with the run

    result = CliRunner().invoke(app, ["distill", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    assert any("resumed at epoch 2, step " in note for note in json.loads(result.stdout)["notes"])
    _assert_same_weights(run_dir, straight)
    _assert_same_history(run_dir, straight, epochs=2)


def test_resume_on_the_command_line_wins_over_the_files(distill_values, tmp_path):
    started = tmp_path / "started"
    config = _config_file(tmp_path / "job.yaml", {**distill_values(), "out": str(started), "resume": "auto"})
    other = tmp_path / "other"
    with pytest.raises(FoproError, match=f"{other}/config.json is missing"):
        distill({}, config_file=config, resume=other)
    assert not started.exists()  # the file's `resume: auto` would have started a run there


def test_a_config_file_can_only_say_resume_auto(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("resume: runs/old\nepochs: 2\n")
    with pytest.raises(FoproError, match=r"job.yaml: resume: 'runs/old' is not allowed: a config file can only say resume: auto"):
        read_config_file(config)
    toml = tmp_path / "job.toml"
    toml.write_text('resume = "auto"\nepochs = 2\n')
    assert read_config_file(toml) == {"resume": "auto", "epochs": 2}
    config.write_text("resume: auto\n")
    with pytest.raises(FoproError, match="--resume auto needs --out"):
        distill({}, config_file=config)
    config.write_text("resum: auto\n")
    with pytest.raises(FoproError, match=r"resum \(did you mean resume\?\)"):
        read_config_file(config)


# ------------------------------------------------------------------- torchrun restarts a killed worker (gloo, CPU)
#
# How the worker dies: this test watches the run folder from outside and SIGKILLs rank 1 once epoch 1's state is
# saved, part way into epoch 2. No hook in the library: a SIGKILL from outside is what the OOM killer or a lost
# node does, it saves nothing, and where exactly it lands does not change what the job must end with (the restart
# resumes from the last end-of-epoch state, and resume is exact). The test asserts it landed during training.

RESTART_EPOCHS = 4
# torchrun (PyTorch 2.14) keeps one TCP store for every restart of a job: a restarted process can read the address
# its predecessor published and fail to connect (pytorch/pytorch#135712); a store per attempt avoids it.
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
RESTART_ARGS = ["--method", "none", "--student", "test_vit", "--image-size", "32", "--epochs", str(RESTART_EPOCHS),
                "--batch-size", "2", "--seed", "3", "--resume", "auto", "--json"]


@pytest.fixture(scope="module")
def train_val_only(distill_data, tmp_path_factory) -> Path:
    """The tiny data without its test split (31 train, 16 val images): no test evaluation at the end of each job."""
    root = tmp_path_factory.mktemp("restart-data") / "data"
    for split in ("train", "val"):
        shutil.copytree(distill_data / split, root / split)
    return root


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            parent = next(line for line in status.read_text().splitlines() if line.startswith("PPid:"))
        except (OSError, StopIteration):
            continue
        if int(parent.split()[1]) == pid:
            found.append(int(status.parent.name))
    return found


def _rank(pid: int) -> int | None:
    """The RANK torchrun gave a worker process, from its environment."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(item[5:]) for item in environ if item.startswith(b"RANK=")), None)


def _kill_rank_1_during_epoch_2(launcher: subprocess.Popen, run_dir: Path, epoch_seconds: float, log: Path) -> None:
    deadline = time.monotonic() + 180
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text().strip():
        if launcher.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the job ended or stalled before its first epoch ended:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    time.sleep(0.3 * epoch_seconds)  # part way into epoch 2
    workers = [pid for pid in _children(launcher.pid) if _rank(pid) == 1]
    assert len(workers) == 1, f"rank 1 not found among torchrun's children {_children(launcher.pid)}"
    os.kill(workers[0], signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc (Linux)")
def test_torchrun_restart_after_a_killed_worker_ends_with_the_uninterrupted_weights(train_val_only, tmp_path):
    """`torchrun --max-restarts 1 ... fopro distill --resume auto`: rank 1 is SIGKILLed in epoch 2, torchrun stops
    rank 0 and starts both again with the same command, which resumes from the state saved at the end of epoch 1.
    The job ends with the weights (bit for bit), training losses and val metrics of an uninterrupted 2-process job."""
    args = ["--data", str(train_val_only), *RESTART_ARGS]
    straight = tmp_path / "straight"
    _distill(args, straight, 2)
    local_images = 2 * (31 // 4)  # per process and epoch: batch 2 x 7 steps of the global batch 4
    epoch_seconds = local_images / min(r["images_per_second"] for r in _metrics(straight))

    run_dir, log = tmp_path / "restarted", tmp_path / "torchrun.log"
    with open(log, "w") as err:
        launcher = subprocess.Popen(_command(args, run_dir, 2, "--max-restarts", "1"), stdout=subprocess.PIPE, stderr=err, text=True,
                                    env={**_env(), **RESTART_ENV})
    try:
        _kill_rank_1_during_epoch_2(launcher, run_dir, epoch_seconds, log)
        stdout, _ = launcher.communicate(timeout=240)
    finally:
        if launcher.poll() is None:  # a failed or stuck job: its workers first, then torchrun
            for pid in _children(launcher.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == 0, log.read_text()[-3000:]
    notes = json.loads(stdout)["notes"]  # the summary of the second attempt's rank 0 (the first one died)
    resumed = [note for note in notes if note.startswith("resumed at epoch ")]
    assert len(resumed) == 1 and resumed[0].endswith(", step 0"), notes  # a SIGKILL saves nothing: an epoch's end
    assert 2 <= int(resumed[0].split()[3].rstrip(",")) <= RESTART_EPOCHS, resumed  # killed during training
    _assert_same_weights(run_dir, straight, names=("last.safetensors", "best.safetensors"))
    _assert_same_history(run_dir, straight, epochs=RESTART_EPOCHS)


# ---------------------------------------------------------------------------------------------- SLURM examples


@pytest.mark.parametrize("script", SLURM_SCRIPTS, ids=lambda p: p.name)
def test_slurm_scripts_parse(script: Path):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--resume auto" in script.read_text()


def test_there_are_slurm_examples():
    assert {p.name for p in SLURM_SCRIPTS} >= {"multi_node.sbatch", "single_node.sbatch"}
