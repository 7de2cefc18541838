"""`fopro distill` as one library call: resolve the options (file, command line, saved run), fill in the
embedded default when no data and no teacher are given, and train."""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

from fopro.config import DistillConfig, resolve_config
from fopro.config_files import RESUME_AUTO, absolute_paths, load_run_config, read_config_file
from fopro import distributed
from fopro.data.augment import KNOBS
from fopro.defaults import DEMO_AUGMENT, DEMO_STUDENT, embedded_default
from fopro.distributed import DistEnv
from fopro.errors import FoproError
from fopro.runtime import ProgressFn, no_progress
from fopro.train import train

DATA_KEYS = ("data", "train_csv", "val_csv", "test_csv")
RESUME_OVERRIDES = ("device", "workers")  # where a resumed run may run; everything else comes from the run


def distill(
    cli_values: dict[str, Any],
    config_file: str | Path | None = None,
    resume: str | Path | None = None,
    overwrite: bool = False,
    progress: ProgressFn = no_progress,
) -> dict:
    """Run `fopro distill`. `cli_values` holds only the options given on the command line.

    Launched by torchrun, every process runs this; the process group lives for the call.
    """
    file_values = read_config_file(config_file) if config_file else {}
    file_resume = file_values.pop("resume", None)
    if resume is None:  # --resume on the command line wins over the file's `resume: auto`
        resume = file_resume
    if resume is not None and str(resume) == RESUME_AUTO:
        resume, overwrite = auto_resume(cli_values, file_values)
    if resume is not None:  # a resumed run keeps its saved options
        config = load_run_config(Path(resume))
        for key in RESUME_OVERRIDES:
            if key in cli_values:
                setattr(config, key, cli_values[key])
    else:
        config = resolve_config(file_values, cli_values)
    env = distributed.init(config.device)
    try:
        if resume is not None:
            summary = train(config, Path(resume), resume=True, progress=progress, env=env)
            ignored = sorted(k for k in cli_values if k not in RESUME_OVERRIDES)
            if ignored:
                summary["notes"].insert(0, f"--resume uses the run's saved options; ignored: {', '.join('--' + k.replace('_', '-') for k in ignored)}")
            return {**summary, "next_steps": next_steps(config)}
        summary = start_run(config, {**file_values, **cli_values}, overwrite, progress, env)
        return {**summary, "next_steps": next_steps(config)}  # start_run filled in config (out, the demo data)
    finally:
        distributed.shutdown()


def auto_resume(cli_values: dict[str, Any], file_values: dict[str, Any]) -> tuple[Path | None, bool]:
    """--resume auto: (the run folder, False) when --out holds a resumable state, else (None, True): start it, over
    a folder that holds no finished work (a start killed before its first epoch ended). One command line serves the
    first start and every restart of a pre-empted job."""
    out = cli_values.get("out") or file_values.get("out")
    if not out:
        raise FoproError("--resume auto needs --out RUN: the folder to resume when it holds a run, or to start the run in")
    run_dir = Path(out)
    if (run_dir / "resume.safetensors").is_file():
        return run_dir, False
    metrics = run_dir / "metrics.jsonl"
    if (run_dir / "last.safetensors").is_file() and metrics.is_file() and metrics.stat().st_size:
        raise FoproError(f"--resume auto: {run_dir} holds checkpoints but no resumable state: choose another --out")
    # checkpoints without metrics.jsonl: killed between the first epoch's checkpoints and its state; nothing recorded
    return None, True


def next_steps(config: DistillConfig) -> list[str]:
    """The commands a user runs next, with this run's paths filled in."""
    run = shlex.quote(str(config.out))
    data = " ".join(f"--{key.replace('_', '-')} {shlex.quote(str(getattr(config, key)))}"
                    for key in ("data", "train_csv", "val_csv", "test_csv", "images", "image_column", "label_column")
                    if getattr(config, key))
    steps = [
        f"fopro eval {run} --data OTHER_DATA   # the best checkpoint on other data (its own: fopro eval {run})",
        f"fopro export {run}/best.safetensors --onnx {run}/student.onnx {data}   # ONNX, checked, with MODEL_CARD.md",
        f"fopro card {run}   # the model card of this run",
    ]
    if config.teacher:
        weights = f" --teacher-weights {shlex.quote(config.teacher_weights)}" if config.teacher_weights else ""
        steps.append(f"fopro probe --teacher {shlex.quote(config.teacher)}{weights} {data}   # what the teacher knows, band by band")
    return steps


def start_run(config: DistillConfig, given: dict[str, Any], overwrite: bool, progress: ProgressFn, env: DistEnv) -> dict:
    notes: list[str] = []
    if not any(getattr(config, key) for key in DATA_KEYS):
        if config.teacher:
            raise FoproError("no data given: pass --data ROOT or --train-csv/--val-csv/--test-csv (or neither data nor --teacher for the synthetic demo)")
        if env.is_main:
            config, notes = apply_embedded_default(config, given, progress)
        distributed.barrier(env)
        if not env.is_main:  # rank 0 has made and cached the data and the demo teacher
            config, notes = apply_embedded_default(config, given, no_progress)
    run_dir = Path(config.out) if config.out else Path("runs") / f"{config.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    config.out = distributed.broadcast_text(str(run_dir), env)
    config = absolute_paths(config)
    summary = train(config, Path(config.out), overwrite=overwrite, progress=progress, env=env)
    summary["notes"] = notes + summary["notes"]
    return summary


def apply_embedded_default(config: DistillConfig, given: dict[str, Any], progress: ProgressFn) -> tuple[DistillConfig, list[str]]:
    """Synthetic target data with its label-free pool (for kd, ekd and fopro) and the shipped demo teacher; the
    demo's epochs, student and augmentation unless --epochs / --student / --augment were given."""
    default = embedded_default(progress)
    config.data = str(default.data_root)
    if config.method != "none":
        config.teacher = str(default.teacher_checkpoint)
        if not config.unlabeled:
            config.unlabeled = str(default.unlabeled)
    if "epochs" not in given:
        config.epochs = default.epochs
    if "student" not in given:
        config.student = DEMO_STUDENT
    augment_given = any(key in given for key in ("augment", *KNOBS))
    if not augment_given:
        config.augment = DEMO_AUGMENT
    return config, default.notes + [
        f"student {config.student}, {config.epochs} epoch(s) at {config.image_size} px on the synthetic data"
        + ("" if augment_given else f", --augment {DEMO_AUGMENT} (chosen on the synthetic val split)")
    ]
