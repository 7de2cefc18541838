"""The resolved options of `fopro distill`: defaults <- config file (YAML/TOML) <- command line; saved with each run."""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fopro.data import DataOptions
from fopro.data.augment import DEFAULT_PRESET, AugmentConfig, parse_scale, resolve_augment
from fopro.errors import FoproError
from fopro.losses import check_loss
from fopro.methods import METHODS, MethodConfig
from fopro.models import StudentOptions, TeacherOptions

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")
# --lr auto: Adam's peak rate at a global batch of 32, scaled with the square root of the batch (timm's
# rule for adaptive optimisers); SGD's is the linear rule of Goyal et al. (0.1 at 256). Adam's base was
# chosen on the val splits of three datasets (examples/results/recipe/); SGD's was not searched.
AUTO_LR = {"adam": (1e-3, 32, 0.5), "sgd": (0.1, 256, 1.0)}
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class DistillConfig:
    """Every option of a distillation run, flat, with the same names as the command-line options."""

    # data
    data: str | None = None
    train_csv: str | None = None
    val_csv: str | None = None
    test_csv: str | None = None
    images: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    classes: list[str] | None = None
    imbalance: float | None = None
    data_seed: int = 0
    skip_bad_images: bool = False
    unlabeled: str | None = None
    unlabeled_batch: int | None = None
    # augmentation (a preset, and knobs that override it when given)
    augment: str = DEFAULT_PRESET
    hflip: float | None = None
    vflip: float | None = None
    rotate: float | None = None
    scale: list[float] | None = None
    color_jitter: float | None = None
    # models
    teacher: str | None = None
    teacher_weights: str | None = None
    teacher_image_size: int | None = None
    student: str = "resnet18"
    student_pretrained: bool = False
    student_weights: str | None = None
    image_size: int = 64
    # method
    method: str = "fopro"
    loss: str = "balanced_softmax"
    ekd_weight: float = 3.0
    adv_weight: float = 1.0
    fpg_reg: float = 0.1
    fpg_mode: str = "both"
    fpg_strength: float = 0.5
    fpg_hidden: int = 16
    fpg_lr: float = 1e-3
    fpg_every: int = 1
    prompt_fraction: float = 1.0
    probe_kd: float = 0.0
    probe_init: str | None = None
    # optimisation
    epochs: int = 100
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float | None = None
    schedule: str = "cosine"
    weight_decay: float = 0.0
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    grad_clip: float = 5.0
    balanced_sampler: bool = False
    amp: str = "none"
    channels_last: bool = True
    device: str = "auto"
    workers: int | None = None
    seed: int = 0
    # run
    out: str | None = None
    head_threshold: int = 100
    tail_threshold: int = 20
    teacher_probe: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def data_options(self) -> DataOptions:
        path = lambda value: Path(value) if value else None  # noqa: E731
        return DataOptions(
            data=path(self.data),
            train_csv=path(self.train_csv),
            val_csv=path(self.val_csv),
            test_csv=path(self.test_csv),
            images=path(self.images),
            image_column=self.image_column,
            label_column=self.label_column,
            classes=self.classes,
            imbalance=self.imbalance,
            seed=self.data_seed,
            skip_bad_images=self.skip_bad_images,
        )

    def unlabeled_batch_size(self) -> int:
        """Unlabelled images per step and process (--unlabeled-batch, default: --batch-size)."""
        return self.unlabeled_batch or self.batch_size

    def augment_config(self) -> AugmentConfig:
        return resolve_augment(
            self.augment, hflip=self.hflip, vflip=self.vflip, rotate=self.rotate, scale=self.scale, color_jitter=self.color_jitter
        )

    def teacher_options(self) -> TeacherOptions:
        return TeacherOptions(
            teacher=self.teacher or "",
            weights=Path(self.teacher_weights) if self.teacher_weights else None,
            image_size=self.teacher_image_size,
        )

    def student_options(self) -> StudentOptions:
        return StudentOptions(
            arch=self.student,
            image_size=self.image_size,
            pretrained=self.student_pretrained,
            weights=Path(self.student_weights) if self.student_weights else None,
        )

    def method_config(self) -> MethodConfig:
        return MethodConfig(
            name=self.method,
            ekd_weight=self.ekd_weight,
            adv_weight=self.adv_weight,
            fpg_reg=self.fpg_reg,
            fpg_every=self.fpg_every,
            fpg_lr=self.fpg_lr,
            prompt_fraction=self.prompt_fraction,
            probe_kd=self.probe_kd,
        )

    def learning_rate(self, world_size: int = 1) -> float:
        """--lr, or with --lr auto (None) the optimiser's base rate scaled to the global batch."""
        if self.lr is not None:
            return self.lr
        base, base_batch, power = AUTO_LR[self.optimizer]
        return base * (self.batch_size * world_size / base_batch) ** power

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}
# Options of earlier versions: run folders that hold them still load (the value is dropped); config files are told.
RETIRED_KEYS = {
    "reuse_teacher_forward": "was removed in fopro 0.3 (the student now always learns against the FPG step's teacher embedding)",
}


def validate(config: DistillConfig) -> None:
    """Option values a run cannot start with: one clear error naming the option."""
    checks = [
        (config.epochs >= 1, "--epochs", "must be at least 1"),
        (config.batch_size >= 1, "--batch-size", "must be at least 1"),
        (config.lr is None or config.lr > 0, "--lr", "must be greater than 0 (or auto)"),
        (config.fpg_lr > 0, "--fpg-lr", "must be greater than 0"),
        (config.image_size >= 16, "--image-size", "must be at least 16 pixels"),
        (config.fpg_every >= 1, "--fpg-every", "must be at least 1"),
        (0 < config.prompt_fraction <= 1, "--prompt-fraction", "must be in (0, 1]"),
        (config.weight_decay >= 0, "--weight-decay", "must not be negative"),
        (config.warmup_epochs >= 0, "--warmup-epochs", "must not be negative"),
        (config.grad_clip > 0, "--grad-clip", "must be greater than 0"),
        (config.ekd_weight >= 0, "--ekd-weight", "must not be negative"),
        (config.adv_weight >= 0, "--adv-weight", "must not be negative (0 turns AKD off)"),
        (config.fpg_reg >= 0, "--fpg-reg", "must not be negative"),
        (config.probe_kd >= 0, "--probe-kd", "must not be negative (0 turns it off)"),
        (config.workers is None or config.workers >= 0, "--workers", "must not be negative"),
        (config.unlabeled_batch is None or config.unlabeled_batch >= 1, "--unlabeled-batch", "must be at least 1"),
    ]
    for ok, option, what in checks:
        if not ok:
            value = getattr(config, option[2:].replace("-", "_"))
            raise FoproError(f"{option} {value} {what}")
    check_loss(config.loss)
    choices = [("method", METHODS), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("amp", AMP_MODES)]
    for name, allowed in choices:
        if getattr(config, name) not in allowed:
            raise FoproError(f"--{name} {getattr(config, name)} is not known: choose one of {', '.join(allowed)}")
    config.augment_config()
    if config.probe_kd > 0 and config.method == "none":
        raise FoproError("--probe-kd distils the teacher probe: use --method kd, ekd or fopro, or drop --probe-kd")
    if config.unlabeled and config.method == "none":
        raise FoproError("--unlabeled needs a teacher to align with: use --method kd, ekd or fopro, or drop --unlabeled")
    if config.imbalance is not None and not 0 < config.imbalance <= 1:
        raise FoproError(f"--imbalance {config.imbalance} is outside (0, 1]: give the ratio rarest/most frequent, e.g. 0.01")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Keys and values of a YAML or TOML config file (safe loaders only: no object construction)."""
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
    unknown = [k for k in normalised if k not in FIELDS or k == "extra"]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, FIELDS, n=1)) else k for k in unknown]
        raise FoproError(
            f"--config {path} has unknown key(s): {', '.join(hints)}; "
            "the keys are the options of `fopro distill --help` without the leading -- (e.g. epochs, batch_size, image_size)"
        )
    return normalised


def _syntax_error(err: Exception) -> str:
    """The problem and its line of a YAML / TOML parse error, on one line."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def resolve_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> DistillConfig:
    """Defaults, overridden by the config file, overridden by options given on the command line."""
    merged = {**file_values, **cli_values}
    config = DistillConfig()
    for key, value in merged.items():
        setattr(config, key, _coerce(key, value))
    validate(config)
    return config


def _coerce(key: str, value: Any) -> Any:
    if value is None:
        return None
    default = getattr(DistillConfig(), key)
    if key == "classes" and isinstance(value, str):
        return [c.strip() for c in value.split(",") if c.strip()]
    if key == "scale":
        return list(parse_scale(value))
    if key == "lr" and value == "auto":
        return None
    if key in OPTIONAL_FLOATS:
        try:
            return float(value)
        except (TypeError, ValueError):
            if key == "lr":
                raise FoproError(f"--lr {value} is not a number: give a learning rate such as 1e-3, or auto") from None
            raise FoproError(f"option {key} = {value!r} has the wrong type: expected a number") from None
    if isinstance(value, Path):
        return str(value)
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(default, int) and not isinstance(value, bool):
            if float(value) != int(value):
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError) as err:
        raise FoproError(f"option {key} = {value!r} has the wrong type: expected {type(default).__name__}") from err
    return value


OPTIONAL_FLOATS = ("hflip", "vflip", "rotate", "color_jitter", "imbalance", "lr")
PATH_KEYS = ("data", "train_csv", "val_csv", "test_csv", "images", "unlabeled", "teacher_weights", "student_weights", "probe_init", "out")


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
    from fopro.io import write_json

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
    unknown = [k for k in data if k not in FIELDS]
    if unknown:
        raise FoproError(f"{path} has unknown key(s) {', '.join(unknown)}: was it written by another fopro version?")
    return resolve_config({}, data)
