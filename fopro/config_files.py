"""Config files and saved run configs: a YAML / TOML `--config` file read into option values, and a run's
config.json written and read back (fopro.config holds the options themselves and resolves them)."""

from __future__ import annotations

import difflib
import json
import tomllib
from pathlib import Path
from typing import Any

import yaml

from fopro.config import FIELDS, PATH_KEYS, DistillConfig, resolve_config
from fopro.errors import FoproError
from fopro.io import write_json

# Options of earlier versions: run folders that hold them still load (the value is dropped); config files are told.
RETIRED_KEYS = {
    "reuse_teacher_forward": "was removed in fopro 0.3 (the student now always learns against the FPG step's teacher embedding)",
}
# Keys a config file may hold besides the options: how to run, not what (never in config.json). `resume: auto` is
# `--resume auto` (see fopro.distill.auto_resume), so that one file serves a job's first start and every restart.
RESUME_AUTO = "auto"
RUN_KEYS = ("resume",)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Keys and values of a YAML or TOML config file (safe loaders only: no object construction): options, and `resume`."""
    path = Path(path)
    if not path.is_file():
        raise FoproError(f"--config {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        toml = path.suffix == ".toml"
        raise FoproError(
            f"--config {path} is not valid {'TOML' if toml else 'YAML'} ({_syntax_error(err)}): "
            f"fix the syntax there (one {'key = value' if toml else 'key: value'} per line)"
        ) from err
    data = data or {}
    if not isinstance(data, dict):
        raise FoproError(f"--config {path} must hold a mapping of option names to values")
    normalised = {str(k).replace("-", "_"): v for k, v in data.items()}
    retired = [k for k in normalised if k in RETIRED_KEYS]
    if retired:
        raise FoproError(f"--config {path}: {retired[0]} {RETIRED_KEYS[retired[0]]}: delete that line")
    unknown = [k for k in normalised if (k not in FIELDS and k not in RUN_KEYS) or k == "extra"]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, [*FIELDS, *RUN_KEYS], n=1)) else k for k in unknown]
        raise FoproError(
            f"--config {path} has unknown key(s): {', '.join(hints)}; "
            "the keys are the options of `fopro distill --help` without the leading -- (e.g. epochs, batch_size, image_size)"
        )
    if normalised.get("resume") not in (None, RESUME_AUTO):
        raise FoproError(
            f"--config {path}: resume: {normalised['resume']!r} is not allowed: a config file can only say resume: auto "
            "(to continue one run folder, pass --resume RUN on the command line)"
        )
    return normalised


def _syntax_error(err: Exception) -> str:
    """The problem and its line of a YAML / TOML parse error, on one line."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def absolute_paths(config: DistillConfig) -> DistillConfig:
    """Paths made absolute, so that a saved run can be resumed or inspected from any folder."""
    for key in PATH_KEYS:
        value = getattr(config, key)
        if value:
            setattr(config, key, str(Path(value).expanduser().absolute()))
    if config.teacher and Path(config.teacher).suffix in (".safetensors", ".json") and Path(config.teacher).exists():
        config.teacher = str(Path(config.teacher).absolute())
    return config


def save_config(config: DistillConfig, path: Path) -> None:
    write_json(path, config.to_dict())


def load_run_config(run_dir: Path) -> DistillConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FoproError(f"{path} is missing: --resume needs a run folder written by fopro distill")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FoproError(f"{path} is not valid JSON: the run folder is damaged") from err
    data = {k: v for k, v in data.items() if k not in RETIRED_KEYS}
    data.setdefault("align_focus", 0.0)  # written before 0.8, which had no focus: resume as it ran
    data.setdefault("deploy_head", "fc")  # written before 0.9, which kept fc
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise FoproError(f"{path} has unknown key(s) {', '.join(unknown)}: was it written by another fopro version?")
    return resolve_config({}, data)
