"""Experiment tracking of `fopro distill --tracking`: TensorBoard event files or a local MLflow store, in the run folder.

Rank 0 records, keyed by the global step (optimisation steps done so far): the loss parts each time the training
loop reads them and the learning rates; at the end of each epoch its metrics.jsonl line (val balanced accuracy,
tail recall, per-class recall and the rest) and the FPG's mean mask as an image; the config (config.json) once;
with MLflow the best checkpoint at the end. A resumed run continues the same tracking run, each step once (after a
kill -9, MLflow continues in a copy of the run up to the resumed state: MlflowTracker.continue_run).
The tracking packages are optional extras, imported only when their tracker is made.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
import json
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from fopro.checkpoint import sidecar
from fopro.errors import FoproError, first_line
from fopro.fourier import fftshift2
from fopro.fpg import FourierPromptGenerator
from fopro.io import write_text
from fopro.plots import mask_rgb

TRACKERS = ("none", "tensorboard", "mlflow")
# the top-level modules each tracker needs (the fopro[...] extra of the same name installs them); MLflow's local
# store is SQLite (its ./mlruns file store is retired), which needs the SQL packages mlflow-skinny leaves out
REQUIRED_MODULES = {"tensorboard": ("tensorboard",), "mlflow": ("mlflow", "sqlalchemy", "alembic", "sqlparse")}
TENSORBOARD_DIR = "tensorboard"  # RUN/tensorboard/: the event files
MLFLOW_DIR = "mlflow"  # RUN/mlflow/: mlflow.db (the store), artifacts/, run_id (the tracking run --resume continues)
MLFLOW_EXPERIMENT = "fopro distill"
MLFLOW_BATCH_PARAMS, MLFLOW_BATCH_METRICS = 100, 1000  # MLflow's limits on one log_batch
RESUMED_FROM_TAG = "fopro.resumed_from"  # on a run that replaced another after a resume (MlflowTracker.continue_run)
MASK_IMAGES = 32  # the FPG's mean mask is averaged over the first images of the val split (the same every epoch)
MASK_PIXELS = 256  # and enlarged (nearest neighbour) to about this many pixels a side
MLFLOW_PARAM_LENGTH = 6000  # MLflow's limit on a parameter's value


class Tracker(Protocol):
    """What the training loop tells a tracker; a tracker is a context manager that ends its tracking run."""

    def log_losses(self, step: int, losses: dict[str, float], learning_rates: dict[str, float]) -> None: ...

    def log_epoch(self, step: int, record: dict[str, Any], fpg: FourierPromptGenerator | None, images: Sequence) -> None: ...

    def log_checkpoint(self, checkpoint: Path) -> None: ...

    def __enter__(self) -> Tracker: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None: ...


class NoTracker:
    """--tracking none (and every rank but 0): records nothing."""

    def log_losses(self, step: int, losses: dict[str, float], learning_rates: dict[str, float]) -> None:
        pass

    def log_epoch(self, step: int, record: dict[str, Any], fpg: FourierPromptGenerator | None, images: Sequence) -> None:
        pass

    def log_checkpoint(self, checkpoint: Path) -> None:
        pass

    def __enter__(self) -> NoTracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        pass


class Recorder(NoTracker, ABC):
    """What the TensorBoard and MLflow trackers share: the training loop's numbers as named scalars and images.
    A backend writes scalars and images and ends its run in close(status)."""

    def log_losses(self, step: int, losses: dict[str, float], learning_rates: dict[str, float]) -> None:
        self.scalars({**{f"train/{name}": value for name, value in losses.items()}, **learning_rates}, step)

    def log_epoch(self, step: int, record: dict[str, Any], fpg: FourierPromptGenerator | None, images: Sequence) -> None:
        self.scalars(epoch_scalars(record), step)
        if fpg is not None and len(images):
            self.image("fpg/mean_mask", fpg_mask_image(fpg, images), step)

    @abstractmethod
    def scalars(self, values: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def image(self, tag: str, image: np.ndarray, step: int) -> None: ...

    @abstractmethod
    def close(self, status: str) -> None: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close("FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")


class TensorBoardTracker(Recorder):
    """Event files in RUN/tensorboard/: a new run (--overwrite) replaces them; a resumed run adds one, and what an
    interrupted attempt logged after the state it resumes from is purged, so every step appears once."""

    def __init__(self, folder: Path, config: dict[str, Any], resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter

        if resumed_at is None:
            for old in folder.glob("events.out.tfevents.*"):
                old.unlink()
        # purge_step hides the events of the folder's earlier files at and after it (TensorBoard's own restart rule)
        self.writer = SummaryWriter(str(folder), purge_step=None if resumed_at is None else resumed_at + 1)
        if resumed_at is None:
            self.writer.add_text("config", config_table(config), 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self, status: str) -> None:
        self.writer.close()


class MLflowTracker(Recorder):
    """A local MLflow store in RUN/mlflow/ (mlflow.db, artifacts/): no server; the config as params, the best
    checkpoint as artifacts under best/."""

    def __init__(self, folder: Path, config: dict[str, Any], resumed_at: int | None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # local files only: nothing is sent anywhere
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # its INFO lines would cut into the progress display
        from mlflow import MlflowClient
        from mlflow.entities import Param

        folder.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=mlflow_uri(folder.parent))
        run_id_file = folder / "run_id"
        if resumed_at is not None and run_id_file.is_file():
            self.run_id = self.continue_run(run_id_file.read_text(encoding="utf-8").strip(), resumed_at, folder)
            write_text(run_id_file, self.run_id + "\n")
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            MLFLOW_EXPERIMENT, artifact_location=(folder / "artifacts").absolute().as_uri()
        )
        self.run_id = self.client.create_run(experiment_id, run_name=folder.parent.name).info.run_id
        self.client.log_batch(self.run_id, params=[Param(key, value) for key, value in param_values(config).items()])
        write_text(run_id_file, self.run_id + "\n")

    def continue_run(self, run_id: str, resumed_at: int, folder: Path) -> str:
        """The run to continue from global step `resumed_at`. MLflow can add to a metric's history, never take from
        it: when the interrupted attempt logged past `resumed_at` (a kill -9 between two saved states), what was
        logged up to it (params, tags, metrics, images) is copied into a new run that replaces the old one, which is
        deleted (MLflow's soft delete: `mlflow gc` removes it for good), so that every step appears once."""
        from mlflow.entities import Metric, Param

        old = self.client.get_run(run_id)
        history = {key: self.client.get_metric_history(run_id, key) for key in old.data.metrics}
        if all(m.step <= resumed_at for metrics in history.values() for m in metrics):
            return run_id
        tags = {**{k: v for k, v in old.data.tags.items() if k != "mlflow.runName"}, RESUMED_FROM_TAG: run_id}
        new_id = self.client.create_run(old.info.experiment_id, run_name=old.info.run_name, tags=tags).info.run_id
        params = [Param(key, value) for key, value in old.data.params.items()]
        metrics = [Metric(m.key, m.value, m.timestamp, m.step) for ms in history.values() for m in ms if m.step <= resumed_at]
        for start in range(0, len(params), MLFLOW_BATCH_PARAMS):
            self.client.log_batch(new_id, params=params[start:start + MLFLOW_BATCH_PARAMS])
        for start in range(0, len(metrics), MLFLOW_BATCH_METRICS):
            self.client.log_batch(new_id, metrics=metrics[start:start + MLFLOW_BATCH_METRICS])
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            copied = Path(self.client.download_artifacts(run_id, "", scratch))
            for image in copied.glob("images/*"):
                step = re.search(r"\+step\+(\d+)\+", image.name)
                if step and int(step.group(1)) > resumed_at:
                    image.unlink()
            if any(copied.iterdir()):
                self.client.log_artifacts(new_id, str(copied))
        self.client.set_terminated(run_id, "KILLED")
        self.client.delete_run(run_id)
        return new_id

    def scalars(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(metric_name(key), value, stamp, step) for key, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, image, key=metric_name(tag), step=step)

    def log_checkpoint(self, checkpoint: Path) -> None:
        for path in sidecar(checkpoint):
            self.client.log_artifact(self.run_id, str(path), artifact_path=path.stem)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def check_tracker(kind: str) -> None:
    """Fail with one line, before any work, when a package --tracking KIND needs is not installed."""
    missing = [module for module in REQUIRED_MODULES.get(kind, ()) if importlib.util.find_spec(module) is None]
    if missing:
        raise FoproError(
            f'--tracking {kind} needs the {missing[0]} package, which is not installed: pip install "fopro[{kind}]" (or use --tracking none)'
        )


def make_tracker(kind: str, run_dir: Path, config: dict[str, Any], resumed_at: int | None = None) -> Tracker:
    """The tracker of --tracking KIND, writing into RUN_DIR; resumed_at: the global step a --resume continues from
    (None: a new tracking run)."""
    if kind == "none":
        return NoTracker()
    check_tracker(kind)
    tracker, folder = (TensorBoardTracker, TENSORBOARD_DIR) if kind == "tensorboard" else (MLflowTracker, MLFLOW_DIR)
    try:
        return tracker(run_dir / folder, config, resumed_at)
    except ImportError as err:
        raise FoproError(f'--tracking {kind}: {first_line(err)}: pip install "fopro[{kind}]"') from err
    except Exception as err:  # the packages' own errors: an unwritable folder, a damaged or locked store, an unknown run id
        raise FoproError(
            f"--tracking {kind}: cannot start tracking in {run_dir / folder} ({first_line(err)}): move that folder away to start "
            "a new tracking run, or use --tracking none"
        ) from err


def mlflow_uri(run_dir: Path) -> str:
    """The tracking URI of a run's MLflow store (`mlflow ui --backend-store-uri URI`)."""
    return f"sqlite:///{(Path(run_dir) / MLFLOW_DIR / 'mlflow.db').absolute()}"


def learning_rates(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
    """lr/NAME of each optimiser (lr/NAME/I for each parameter group of one that has several)."""
    rates = {}
    for name, optimizer in optimizers.items():
        groups = optimizer.param_groups
        for index, group in enumerate(groups):
            rates[f"lr/{name}" + (f"/{index}" if len(groups) > 1 else "")] = float(group["lr"])
    return rates


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """An epoch's metrics.jsonl line as scalars (val/balanced_accuracy, val/class_recall/NAME, ...); its train losses
    are left out: they are the losses logged at the epoch's last step."""
    return flat_numbers({key: value for key, value in record.items() if key != "train"} | {"best": bool(record.get("best"))})


def flat_numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict as {"a/b": x}; booleans as 0 / 1; undefined metrics (None) left out."""
    numbers = {}
    for key, value in values.items():
        if isinstance(value, dict):
            numbers.update(flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (bool, int, float)) and math.isfinite(value):
            numbers[f"{prefix}{key}"] = float(value)
    return numbers


def fpg_mask_image(fpg: FourierPromptGenerator, images: Sequence) -> np.ndarray:
    """The FPG's mean amplitude mask over the first images of a dataset ((image, label, index) items), centred
    and coloured as in fopro probe --fpg's fpg_mask.png."""
    device = next(fpg.parameters()).device
    batch = torch.stack([images[index][0] for index in range(min(MASK_IMAGES, len(images)))]).to(device)
    mask = fftshift2(fpg.mean_mask(batch)).float().cpu().numpy()
    return mask_rgb(mask, (1 - fpg.strength, 1 + fpg.strength), scale=max(1, MASK_PIXELS // fpg.image_size))


def param_values(config: dict[str, Any]) -> dict[str, str]:
    """config.json's values as MLflow params (text; lists, null and mappings as JSON)."""
    return {key: (value if isinstance(value, str) else json.dumps(value))[:MLFLOW_PARAM_LENGTH] for key, value in config.items()}


def config_table(config: dict[str, Any]) -> str:
    """config.json as a Markdown table (TensorBoard's text tab)."""
    rows = [f"| {key} | `{value}` |" for key, value in param_values(config).items()]
    return "\n".join(["| option | value |", "| --- | --- |", *rows])


def metric_name(name: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . : / and spaces): class names may hold anything."""
    return re.sub(r"[^\w\-. :/]", "_", name)
