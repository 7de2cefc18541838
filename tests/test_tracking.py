"""`fopro distill --tracking tensorboard | mlflow`: what a tiny run records, read back through each tool's own reader
(TensorBoard's EventAccumulator, MLflow's client), across an interruption and --resume; the missing-package error."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from fopro.cli import app
from fopro.config import resolve_config
from fopro.config_files import read_config_file
from fopro.errors import FoproError
from fopro.fourier import fftshift2
from fopro.fpg import FourierPromptGenerator
from fopro.plots import mask_rgb
from fopro.tracking import epoch_scalars, make_tracker, metric_name, mlflow_uri
from fopro.train import TrainingInterrupted, train

from conftest import torch_threads
from test_distill import _cli_args, _error_line
from test_resume import _sigint_at

os.environ["HF_HUB_OFFLINE"] = "1"

STEPS_PER_EPOCH = 31 // 8  # the tiny data's 31 training images in batches of 8 (the last, partial one dropped)
# a fast-moving, dataset-level FPG (one mask for all images), so that its mask image changes; no teacher probe at the
# end (not what is tested here)
TRACKED = dict(method="fopro", fpg_mode="dataset", fpg_strength=0.3, fpg_lr=0.3, teacher_probe=False)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _interrupted_then_resumed(values: dict, run_dir: Path, epoch: int) -> None:
    """Ctrl-C after step 1 of `epoch` (the loop stops after step 2, saving its state), then --resume to the end."""
    with pytest.raises(TrainingInterrupted):
        train(resolve_config({}, values), run_dir, progress=_sigint_at(epoch=epoch, step=1))
    result = CliRunner().invoke(app, ["distill", "--resume", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output


def _loss_steps(epochs: int, stopped_at: int) -> list[int]:
    """Global steps at which the loop reads the losses: each epoch's first and last step (every 10th too), the step
    it stopped at (Ctrl-C) and the first step after --resume."""
    steps = {e * STEPS_PER_EPOCH + s for e in range(epochs) for s in range(1, STEPS_PER_EPOCH + 1)
             if s in (1, STEPS_PER_EPOCH) or s % 10 == 0}
    return sorted(steps | {stopped_at, stopped_at + 1})


def _mask_colours_of_saved_fpg(run_dir: Path, values: dict) -> np.ndarray:
    """The final fpg.safetensors' mask (dataset mode: the same for every image), centred, as the tracker colours it."""
    fpg = FourierPromptGenerator(32, mode="dataset", strength=values["fpg_strength"])
    fpg.load_state_dict(load_file(str(run_dir / "fpg.safetensors")))
    mask = fftshift2(fpg.mean_mask(torch.zeros(1, 3, 32, 32))).numpy()
    return mask_rgb(mask, (1 - fpg.strength, 1 + fpg.strength), scale=8)


def test_tensorboard_records_losses_val_metrics_and_the_fpg_mask_across_a_resume(tmp_path, distill_values):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = distill_values(**TRACKED, epochs=2, tracking="tensorboard")
    run_dir = tmp_path / "run"
    _interrupted_then_resumed(values, run_dir, epoch=2)  # stops after global step 5, resumes at 6
    records = _metrics(run_dir)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per attempt

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    scalar = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]  # noqa: E731

    # every loss part and learning rate at each read of the losses, once per step
    expected_steps = _loss_steps(epochs=2, stopped_at=STEPS_PER_EPOCH + 2)
    for part in records[-1]["train"]:
        assert [step for step, _ in scalar(f"train/{part}")] == expected_steps, part
    for rate in ("lr/student", "lr/fpg"):
        assert [step for step, _ in scalar(rate)] == expected_steps
        assert all(value > 0 for _, value in scalar(rate))
    last_epoch_end = dict(scalar("train/sup"))[2 * STEPS_PER_EPOCH]
    assert last_epoch_end == pytest.approx(records[-1]["train"]["sup"], rel=1e-5)  # metrics.jsonl: the epoch-end losses

    # each epoch's validation at its last step equals metrics.jsonl
    epoch_ends = [STEPS_PER_EPOCH * r["epoch"] for r in records]
    balanced = scalar("val/balanced_accuracy")
    assert [step for step, _ in balanced] == epoch_ends
    assert [value for _, value in balanced] == pytest.approx([r["val"]["balanced_accuracy"] for r in records], rel=1e-6)
    assert [v for _, v in scalar("val/tail_recall")] == pytest.approx([r["val"]["tail_recall"] for r in records], rel=1e-6)
    for name, recall in records[-1]["val"]["class_recall"].items():
        assert scalar(f"val/class_recall/{name}")[-1] == (epoch_ends[-1], pytest.approx(recall, rel=1e-6))
    assert [v for _, v in scalar("best")] == [float(r.get("best", False)) for r in records]

    # the FPG's mean mask each epoch: the last one is the saved FPG's mask, coloured (white = unchanged, at DC)
    images = events.Images("fpg/mean_mask")
    assert [image.step for image in images] == epoch_ends
    last = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert np.abs(last.astype(int) - _mask_colours_of_saved_fpg(run_dir, values)).max() <= 1
    assert len(np.unique(last.reshape(-1, 3), axis=0)) > 10  # the FPG has moved: not one flat colour

    # the config, once, as a text table
    texts = events.Tensors("config/text_summary")
    assert len(texts) == 1 and "| method | `fopro` |" in texts[0].tensor_proto.string_val[0].decode()


def test_mlflow_records_one_run_with_params_metrics_images_and_the_best_checkpoint(tmp_path, distill_values):
    from mlflow import MlflowClient

    values = distill_values(**TRACKED, epochs=1, tracking="mlflow")
    run_dir = tmp_path / "run"
    _interrupted_then_resumed(values, run_dir, epoch=1)  # stops after step 2, resumes at 3
    record = _metrics(run_dir)[0]

    client = MlflowClient(tracking_uri=mlflow_uri(run_dir))
    experiment = client.get_experiment_by_name("fopro distill")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resumed run continued the same tracking run
    run = runs[0]
    assert run.info.run_id == (run_dir / "mlflow" / "run_id").read_text().strip()
    assert run.info.status == "FINISHED"

    config = json.loads((run_dir / "config.json").read_text())
    assert run.data.params == {key: v if isinstance(v, str) else json.dumps(v) for key, v in config.items()}

    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    for part in record["train"]:
        assert [step for step, _ in history(f"train/{part}")] == _loss_steps(epochs=1, stopped_at=2), part
    assert history("val/balanced_accuracy") == [(STEPS_PER_EPOCH, pytest.approx(record["val"]["balanced_accuracy"]))]
    for name, recall in record["val"]["class_recall"].items():
        assert history(metric_name(f"val/class_recall/{name}")) == [(STEPS_PER_EPOCH, pytest.approx(recall))]

    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    for name in ("best.safetensors", "best.json"):
        assert _sha(artifacts / "best" / name) == _sha(run_dir / name), name
    masks = sorted(p.name for p in (artifacts / "images").glob("*.png"))
    assert len(masks) == 1 and f"+step+{STEPS_PER_EPOCH}+" in masks[0]


def _killed_then_resumed(values: dict, run_dir: Path, epoch: int) -> None:
    """What kill -9 during `epoch` (after its step 2) leaves: the tracker has logged past the last saved state, which
    is the previous epoch's end. Simulated by saving the run folder's files at step 1 of `epoch`, pressing Ctrl-C
    after step 2, and putting the saved files back; then --resume to the end."""
    saved = run_dir.parent / "saved"
    sigint = _sigint_at(epoch=epoch, step=2)

    def progress(description: str, done: int, total: int) -> None:
        if f"epoch {epoch}/" in description and done == 1 and not saved.exists():
            saved.mkdir()
            for path in run_dir.iterdir():
                if path.is_file():
                    shutil.copy2(path, saved / path.name)
        sigint(description, done, total)

    with pytest.raises(TrainingInterrupted):
        train(resolve_config({}, values), run_dir, progress=progress)
    for path in saved.iterdir():
        shutil.copy2(path, run_dir / path.name)
    result = CliRunner().invoke(app, ["distill", "--resume", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output


def test_tensorboard_after_a_kill_9_keeps_each_step_once(tmp_path, distill_values):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = distill_values(**TRACKED, epochs=2, tracking="tensorboard")
    run_dir = tmp_path / "run"
    _killed_then_resumed(values, run_dir, epoch=2)  # logged steps 4 and 5, resumes from the state of step 3
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/sup")] == [1, 3, 4, 6]
    assert [e.step for e in events.Scalars("val/balanced_accuracy")] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]


def test_mlflow_after_a_kill_9_keeps_each_step_once_in_one_run(tmp_path, distill_values):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    values = distill_values(**TRACKED, epochs=2, tracking="mlflow")
    run_dir = tmp_path / "run"
    _killed_then_resumed(values, run_dir, epoch=2)  # logged steps 4 and 5, resumes from the state of step 3
    records = _metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]

    client = MlflowClient(tracking_uri=mlflow_uri(run_dir))
    experiment = client.get_experiment_by_name("fopro distill")
    runs = client.search_runs([experiment.experiment_id])
    deleted = client.search_runs([experiment.experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert len(runs) == 1 and len(deleted) == 1  # the attempt that logged past its state is replaced, not shown
    run = runs[0]
    assert run.info.run_id == (run_dir / "mlflow" / "run_id").read_text().strip()
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["fopro.resumed_from"] == deleted[0].info.run_id
    config = json.loads((run_dir / "config.json").read_text())
    assert run.data.params == {key: v if isinstance(v, str) else json.dumps(v) for key, v in config.items()}

    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    for part in records[-1]["train"]:  # each epoch's first and last step once: 4 is not there twice, 5 not at all
        assert [step for step, _ in history(f"train/{part}")] == [1, 3, 4, 6], part
    epoch_ends = [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert history("val/balanced_accuracy") == [(step, pytest.approx(r["val"]["balanced_accuracy"]))
                                                for step, r in zip(epoch_ends, records)]

    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    masks = sorted(p.name for p in (artifacts / "images").glob("*.png"))
    assert [int(name.split("+step+")[1].split("+")[0]) for name in masks] == epoch_ends
    for name in ("best.safetensors", "best.json"):
        assert _sha(artifacts / "best" / name) == _sha(run_dir / name), name


def test_tensorboard_a_new_run_over_an_old_one_replaces_its_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run, steps in (("old", (1, 2, 3)), ("new", (1, 2))):  # --overwrite: a new run in the same folder
        with make_tracker("tensorboard", tmp_path, {"run": run}) as tracker:
            for step in steps:
                tracker.log_losses(step, {"sup": float(step) if run == "new" else -1.0}, {})
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/sup")] == [(1, 1.0), (2, 2.0)]
    texts = [t.tensor_proto.string_val[0].decode() for t in events.Tensors("config/text_summary")]
    assert len(texts) == 1 and "`new`" in texts[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind, module", [("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("mlflow", "sqlalchemy")])
def test_a_missing_package_fails_at_once_naming_the_extra(kind, module, tmp_path, distill_values, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` fails; importlib finds no such module
    run_dir = tmp_path / "run"
    args = ["distill", *_cli_args(distill_values(tracking=kind)), "--out", str(run_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    line = _error_line(result)
    assert f'--tracking {kind} needs the {module} package' in line and f'pip install "fopro[{kind}]"' in line
    assert not run_dir.exists()  # nothing written


def test_a_broken_install_fails_when_the_tracker_is_made(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # tensorboard found, torch's writer not importable
    with pytest.raises(FoproError, match=r'--tracking tensorboard: .*pip install "fopro\[tensorboard\]"'):
        make_tracker("tensorboard", tmp_path, {})
    assert list(tmp_path.iterdir()) == []


def test_log_is_an_option_like_any_other(tmp_path, distill_values):
    config_file = tmp_path / "distill.yaml"
    config_file.write_text("tracking: tensorboard\n")
    assert resolve_config(read_config_file(config_file), distill_values()).tracking == "tensorboard"
    assert resolve_config({}, distill_values()).tracking == "none"
    with pytest.raises(FoproError, match="--tracking wandb is not known: choose one of none, tensorboard, mlflow"):
        resolve_config({}, distill_values(tracking="wandb"))


def test_epoch_scalars_flatten_the_metrics_line() -> None:
    record = {"epoch": 2, "train": {"sup": 0.5}, "images_per_second": 10.0,
              "val": {"balanced_accuracy": 0.5, "macro_auc": None, "group_recall": {"tail": 0.25}, "class_recall": {"a b": 1.0}}}
    assert epoch_scalars(record) == {"epoch": 2.0, "images_per_second": 10.0, "val/balanced_accuracy": 0.5,
                                     "val/group_recall/tail": 0.25, "val/class_recall/a b": 1.0, "best": 0.0}
    assert metric_name("val/class_recall/naevus (benign), 2%") == "val/class_recall/naevus _benign__ 2_"
