"""Exact resume: after Ctrl-C mid-epoch (in-process and through the CLI) and after kill -9 of a real
`fopro distill` process, `--resume` ends with the same weights, bit for bit, as a straight run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fopro.cli import app
from fopro.config import resolve_config
from fopro.config_files import load_run_config
from fopro.data.synth import SynthConfig, generate_synth
from fopro.distill import auto_resume, distill
from fopro.errors import FoproError
from fopro.state import load_state
from fopro.run import check_run_dir
from fopro.train import STOP_SIGNALS, TrainingInterrupted, make_loader, train

from conftest import tiny_distill_values, torch_threads

os.environ["HF_HUB_OFFLINE"] = "1"

WEIGHT_FILES = ("last.safetensors", "best.safetensors", "fpg.safetensors")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one intra-op thread (see conftest.torch_threads), restored after this module."""
    with torch_threads(1):
        yield


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(run: Path, straight: Path, names=WEIGHT_FILES) -> None:
    for name in names:
        a, b = load_file(str(run / name)), load_file(str(straight / name))
        assert a.keys() == b.keys(), name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs from the straight run"


def _assert_same_history(run: Path, straight: Path, epochs: int) -> None:
    """One record per epoch (no duplicates), with the straight run's training losses, validation metrics and best flags."""
    got, want = _metrics(run), _metrics(straight)
    assert [r["epoch"] for r in got] == list(range(1, epochs + 1))
    assert [r["train"] for r in got] == [r["train"] for r in want]  # the interrupted epoch's losses too
    assert [r["val"] for r in got] == [r["val"] for r in want]
    assert [r.get("best", False) for r in got] == [r.get("best", False) for r in want]


def _sigint_at(epoch: int, step: int, signum: signal.Signals = signal.SIGINT):
    """A progress callback that presses Ctrl-C (a real SIGINT to this process; or sends `signum`) during `epoch`
    (1-based) at `step`."""
    fired = {"done": False}

    def progress(description: str, done: int, total: int) -> None:
        if not fired["done"] and f"epoch {epoch}/" in description and done == step:
            fired["done"] = True
            signal.raise_signal(signum)

    return progress


def _assert_interrupted_state(run_dir: Path, epoch: int) -> dict:
    """The saved state is mid-epoch: `epoch` (0-based) started, some but not all of its steps done."""
    state = load_state(run_dir / "resume.safetensors")
    steps_per_epoch = 31 // 8
    assert state["epoch"] == epoch
    assert 1 <= state["step"] < steps_per_epoch
    assert [r["epoch"] for r in state["history"]] == list(range(1, epoch + 1))
    return state


def test_ctrl_c_mid_epoch_then_resume_gives_the_straight_run(fopro_two_epoch_run, tmp_path):
    values, straight = fopro_two_epoch_run
    run_dir = tmp_path / "run"
    config = resolve_config({}, values)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stop:
        train(config, run_dir, progress=_sigint_at(epoch=2, step=1))
    message = str(stop.value)
    assert f"fopro distill --resume {run_dir}" in message and "interrupted (SIGINT) at epoch 2" in message
    assert signal.getsignal(signal.SIGINT) is handler  # the Ctrl-C handler is given back
    _assert_interrupted_state(run_dir, epoch=1)
    assert [r["epoch"] for r in _metrics(run_dir)] == [1]
    with pytest.raises(FoproError, match="--resume"):
        check_run_dir(run_dir, overwrite=False)  # a fresh start into it is refused

    result = CliRunner().invoke(app, ["distill", "--resume", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["epochs"] == 2 and any("resumed at epoch 2" in note for note in summary["notes"])
    _assert_same_weights(run_dir, straight)
    _assert_same_history(run_dir, straight, epochs=2)
    state = load_state(run_dir / "resume.safetensors")
    assert (state["epoch"], state["step"]) == (2, 0)
    straight_state = load_state(straight / "resume.safetensors")
    for module in ("student", "heads", "fpg", "teacher_head"):
        for key, value in straight_state["modules"][module].items():
            assert torch.equal(state["modules"][module][key], value), f"{module}.{key}"


def test_cli_ctrl_c_exits_130_and_resume_finishes_the_run(fopro_two_epoch_run, tmp_path, monkeypatch):
    import fopro.cli.distill

    values, straight = fopro_two_epoch_run
    run_dir = tmp_path / "run"

    @contextlib.contextmanager
    def pressing_ctrl_c(enabled: bool = True):
        yield _sigint_at(epoch=1, step=1)

    monkeypatch.setattr(fopro.cli.distill, "progress_bar", pressing_ctrl_c)
    args = ["distill", "--out", str(run_dir)]
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    compact = "".join(result.stderr.split())  # (the console may wrap the line)
    assert f"fopro distill --resume {run_dir}".replace(" ", "") in compact, result.stderr
    _assert_interrupted_state(run_dir, epoch=0)
    assert not (run_dir / "last.safetensors").exists()  # no epoch finished: no checkpoint yet
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 2

    # resume through the library; options given with --resume (other than device/workers) are ignored
    summary = distill({"epochs": 5, "device": "cpu"}, resume=run_dir)
    assert summary["epochs"] == 2
    assert any("ignored: --epochs" in note for note in summary["notes"])
    _assert_same_weights(run_dir, straight)
    _assert_same_history(run_dir, straight, epochs=2)
    assert load_run_config(run_dir).epochs == 2


# ---------------------------------------------------------------------------------- kill -9, real process

KILL_SYNTH = SynthConfig(num_classes=4, image_size=32, imbalance=0.5, max_per_class=56, val_per_class=4,
                         test_per_class=4, public_classes=2, public_per_class=2, public_val_per_class=1)
KILL_OPTIONS = dict(method="fopro", epochs=3)


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory) -> Path:
    """A larger synthetic set (163 training images, 20 steps of 8 per epoch) so an epoch takes a while."""
    root = tmp_path_factory.mktemp("kill-synth") / "synth"
    generate_synth(root, KILL_SYNTH)
    return root / "target"


def _wait(predicate, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None and not predicate():
            pytest.fail(f"fopro distill exited with {proc.returncode} early:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"fopro distill made no progress in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.01)


def _lines(path: Path) -> int:
    try:
        return len(path.read_text().splitlines())
    except FileNotFoundError:
        return 0


def _start_and_kill(values: dict, run_dir: Path, log: Path, delay: float) -> tuple[Path, int]:
    """Run `python -m fopro distill` on `values`; once epoch 1 is done, wait `delay` s and SIGKILL it.

    Returns the run folder and the exit status (-9 when killed, 0 when it finished first)."""
    command = [sys.executable, "-m", "fopro", "distill", "--out", str(run_dir)]
    for key, value in values.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait(lambda: _lines(run_dir / "metrics.jsonl") >= 1, proc, log, timeout=100)  # epoch 1 done
        assert (run_dir / "resume.safetensors").is_file()
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return run_dir, proc.returncode


def test_kill_9_mid_epoch_then_resume_gives_the_straight_run(kill_data, distill_teacher, tmp_path):
    values = tiny_distill_values(kill_data, distill_teacher, **KILL_OPTIONS)

    # the straight run, in this process (its duration tells how long an epoch takes here, now)
    straight = tmp_path / "straight"
    started = time.perf_counter()
    train(resolve_config({}, values), straight)
    epoch_seconds = (time.perf_counter() - started) / values["epochs"]

    # the same options through a real `fopro distill` process, killed with SIGKILL during epoch 2
    run_dir, returncode = _start_and_kill(values, tmp_path / "killed", tmp_path / "distill.log", delay=0.3 * epoch_seconds)
    if returncode == 0:
        # it ran 2 epochs within 0.3 of one (should not happen): that run must equal the straight one;
        # then kill another right as epoch 2 starts
        _assert_same_weights(run_dir, straight)
        _assert_same_history(run_dir, straight, epochs=values["epochs"])
        run_dir, returncode = _start_and_kill(values, tmp_path / "killed-again", tmp_path / "distill-again.log", delay=0.0)
    assert returncode == -signal.SIGKILL, (tmp_path / "distill.log").read_text()[-3000:]
    state = load_state(run_dir / "resume.safetensors")
    # SIGKILL leaves the last epoch-boundary state and whole files, never a half-written one
    assert state["step"] == 0 and 1 <= state["epoch"] < values["epochs"], (state["epoch"], state["step"])
    for path in run_dir.glob("*.safetensors"):
        load_file(str(path))
    done = [r["epoch"] for r in _metrics(run_dir)]
    print(f"killed during epoch {state['epoch'] + 1} ({epoch_seconds:.2f} s per epoch; metrics had {done})")
    assert done == list(range(1, len(done) + 1)) and len(done) < values["epochs"]

    result = CliRunner().invoke(app, ["distill", "--resume", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert any(f"resumed at epoch {state['epoch'] + 1}, step 0" in n for n in json.loads(result.stdout)["notes"])
    _assert_same_weights(run_dir, straight)
    _assert_same_history(run_dir, straight, epochs=values["epochs"])
    assert _metrics(run_dir)[-1]["val"] == _metrics(straight)[-1]["val"]


def test_sigterm_then_the_same_command_with_resume_auto_gives_the_straight_run(fopro_two_epoch_run, tmp_path):
    """A pre-empted job (SIGTERM mid-epoch) restarted by the SAME command line (--resume auto) ends bit-identical."""
    values, straight = fopro_two_epoch_run
    run_dir = tmp_path / "run"
    command = {**values, "out": str(run_dir)}
    with pytest.raises(TrainingInterrupted) as stop:
        distill(command, resume="auto", progress=_sigint_at(epoch=2, step=1, signum=signal.SIGTERM))
    assert stop.value.signal_name == "SIGTERM" and "--resume auto" in str(stop.value)
    _assert_interrupted_state(run_dir, epoch=1)
    summary = distill(command, resume="auto")  # the restart: same options
    assert any("resumed at epoch 2" in note for note in summary["notes"])
    assert summary["next_steps"][0].startswith(f"fopro eval {run_dir} --data OTHER_DATA")  # what to do next, paths filled in
    assert any(step.startswith(f"fopro export {run_dir}/best.safetensors --onnx {run_dir}/student.onnx --data ") for step in summary["next_steps"])
    _assert_same_weights(run_dir, straight)
    _assert_same_history(run_dir, straight, epochs=2)
    again = distill(command, resume="auto")  # a third start of a finished run only summarises it
    assert again["best_epoch"] == summary["best_epoch"]
    with pytest.raises(FoproError, match="--resume auto needs --out"):
        distill(values, resume="auto")


def test_cli_sigterm_exits_75_so_a_scheduler_can_requeue(fopro_two_epoch_run, tmp_path, monkeypatch):
    import fopro.cli.distill

    values, _ = fopro_two_epoch_run

    @contextlib.contextmanager
    def terminated(enabled: bool = True):
        yield _sigint_at(epoch=1, step=1, signum=signal.SIGTERM)

    monkeypatch.setattr(fopro.cli.distill, "progress_bar", terminated)
    args = ["distill", "--out", str(tmp_path / "run"), "--resume", "auto"]
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == fopro.cli.distill.REQUEUE_EXIT_CODE == 75, result.output
    assert "interrupted (SIGTERM)" in " ".join(result.stderr.split())


def test_eval_of_a_run_folder_uses_its_best_checkpoint_and_its_data(fopro_two_epoch_run):
    from fopro.data import DataOptions
    from fopro.evaluate import EvalOptions, evaluate

    _, straight = fopro_two_epoch_run
    report = evaluate(straight, DataOptions(), EvalOptions(device="cpu", bootstrap=0))
    assert Path(report["model"]) == straight / "best.safetensors"
    assert report["data"] == load_run_config(straight).data_options().describe()


def test_resume_auto_starts_over_a_first_epoch_killed_before_its_state_and_refuses_recorded_work(tmp_path):
    """A kill between the first epoch's checkpoints and its resumable state leaves checkpoints and nothing recorded:
    the same command starts the run again. A folder with recorded epochs but no state is refused."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.safetensors").write_bytes(b"x")
    assert auto_resume({"out": str(run_dir)}, {}) == (None, True)
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(FoproError, match="holds checkpoints but no resumable state"):
        auto_resume({"out": str(run_dir)}, {})


class _SignalsItsOwnProcess(torch.utils.data.Dataset):
    """Each item sends SIGINT, SIGTERM and SIGUSR1 to the process that loads it (a loader worker)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        for sig in STOP_SIGNALS:
            os.kill(os.getpid(), sig)
        return torch.tensor(index)


def test_loader_workers_leave_stop_signals_to_the_main_process():
    """A scheduler signals the whole process group: the loader workers must survive it, so that the main process
    can save its state (a worker killed by SIGTERM would end the run with nothing saved)."""
    run = SimpleNamespace(config=SimpleNamespace(workers=1), device=torch.device("cpu"))
    loader = make_loader(run, _SignalsItsOwnProcess(), [[0, 1], [2, 3]])
    assert [batch.tolist() for batch in loader] == [[0, 1], [2, 3]]
