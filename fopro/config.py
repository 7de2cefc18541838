"""The resolved options of `fopro distill`: defaults <- config file <- command line (the files: fopro.config_files)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fopro.data import DataOptions
from fopro.data.dicom import parse_window
from fopro.data.manifest import MAX_IMAGE_PIXELS, DecodeOptions
from fopro.data.augment import DEFAULT_PRESET, KNOBS, PRESET_HELP, PRESETS, AugmentConfig, parse_scale, resolve_augment
from fopro.errors import FoproError
from fopro.fpg import FPG_MODES
from fopro.losses import ALIGN_WEIGHTS, check_loss
from fopro.checkpoint import HEADS
from fopro.methods import METHODS, MethodConfig, default_align_focus, trains_second_head
from fopro.metrics import LongTailGroups
from fopro.models import StudentOptions, TeacherOptions
from fopro.tracking import TRACKERS, check_tracker

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")
# --lr auto: Adam's peak rate at a global batch of 32, scaled with the square root of the batch (timm's
# rule for adaptive optimisers); SGD's is the linear rule of Goyal et al. (0.1 at 256). Adam's base was
# chosen on the val splits of three datasets (examples/results/recipe/); SGD's was not searched.
AUTO_LR = {"adam": (1e-3, 32, 0.5), "sgd": (0.1, 256, 1.0)}
AMP_MODES = ("none", "bf16", "fp16")

DATA, AUGMENT, TEACHER, STUDENT, METHOD, FPG, OPTIM = (
    "Data", "Augmentation (train split)", "Teacher", "Student", "Method", "Fourier Prompt Generator", "Optimisation"
)
AUGMENT_PRESETS = "; ".join(f"{name}: {text}" for name, text in PRESET_HELP.items())


@dataclass(frozen=True)
class Rule:
    """A check on one option's value (None passes: it means 'not given' or 'auto')."""

    ok: Callable[[Any], bool]
    says: str  # what the error says after `--option VALUE`


AT_LEAST_1 = Rule(lambda v: v >= 1, "must be at least 1")
NOT_NEGATIVE = Rule(lambda v: v >= 0, "must not be negative")
POSITIVE = Rule(lambda v: v > 0, "must be greater than 0")
MAX_IMAGE_SIZE = 2048  # a 2048 px batch of 32 already needs ~1.6 GB for its inputs alone
IMAGE_SIZE = Rule(lambda v: 16 <= v <= MAX_IMAGE_SIZE, f"must be between 16 and {MAX_IMAGE_SIZE} pixels")
DEVICE = Rule(lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "is not a device fopro runs on: use auto, cpu, cuda or cuda:N")


def option(
    default: Any = None,
    help: str = "",
    panel: str | None = None,
    *,
    choices: tuple[str, ...] | None = None,
    rule: Rule | None = None,
    path: bool = False,
    metavar: str | None = None,
    cli_text: bool = False,
    cli_default: Any = None,
) -> Any:
    """A DistillConfig field and everything the CLI, the config files and the validation need to know about it.

    path: a file or folder (a Path on the command line, made absolute in config.json); cli_text: given as
    text on the command line (e.g. `--scale 0.8,1.0`, `--classes a,b`, `--lr auto`) and parsed by `coerce`.
    """
    metadata = {"help": help, "panel": panel, "choices": choices, "rule": rule, "path": path, "metavar": metavar,
                "cli_text": cli_text, "cli_default": cli_default}
    return field(default=default, metadata=metadata)


@dataclass
class DistillConfig:
    """Every option of a distillation run, flat, with the same names as the command-line options.

    The one schema of `fopro distill`: its flags, help, defaults and panels, the config-file keys,
    config.json and the value checks all derive from these fields (fopro.cli.options builds the flags).
    """

    # data (the same fields are the data options of every command)
    data: str | None = option(help="ImageFolder root with train/, val/, test/ <class>/<image>.", panel=DATA, path=True)
    train_csv: str | None = option(help="Training CSV manifest (image and label columns; ISIC-2019 LT format detected).", panel=DATA, path=True)
    val_csv: str | None = option(help="Validation CSV manifest.", panel=DATA, path=True)
    test_csv: str | None = option(help="Test CSV manifest.", panel=DATA, path=True)
    images: str | None = option(help="Folder the CSV image paths are relative to (ISIC: the .jpg folder).", panel=DATA, path=True)
    image_column: str | None = option(help="CSV column with the image path or id (auto-detected when unambiguous).", panel=DATA)
    label_column: str | None = option(help="CSV column with the label, a class name or index (auto-detected).", panel=DATA)
    classes: list[str] | None = option(
        help='Class names in class-index order, comma-separated or a JSON list (names with commas: \'["a, b", "c"]\'); default: sorted names.',
        panel=DATA, cli_text=True,
    )
    imbalance: float | None = option(
        help="Subsample the training split to this long-tail factor (rarest/most frequent, in (0, 1]).", panel=DATA,
        rule=Rule(lambda v: 0 < v <= 1, "is outside (0, 1]: give the ratio rarest/most frequent, e.g. 0.01"),
    )
    data_seed: int = option(0, "Seed of the long-tail subsampling.", DATA)
    skip_bad_images: bool = option(False, "Leave out unreadable images (and say how many) instead of failing.", DATA)
    max_image_pixels: int = option(
        MAX_IMAGE_PIXELS, "Images with more pixels (width x height) count as unreadable: decompression bombs, untiled slides.", DATA,
        rule=Rule(lambda v: v >= 256, "must be at least 256 (16 x 16 pixels)"),
    )
    dicom_window: str = option(
        "auto", "DICOM intensity window CENTER,WIDTH for every .dcm image (after the rescale slope/intercept); auto: the "
        "file's VOI LUT or window, else min-max.", DATA, metavar="auto|CENTER,WIDTH",
    )
    unlabeled: str | None = option(
        help="Unlabelled images (a folder, searched recursively, or a CSV with an image column) that join the alignment and FPG terms only (kd, ekd, fopro).",
        panel=METHOD, path=True,
    )
    unlabeled_batch: int | None = option(help="Unlabelled images per step (default: --batch-size).", panel=METHOD, rule=AT_LEAST_1)
    # augmentation (a preset, and knobs that override it when given)
    augment: str = option(
        DEFAULT_PRESET,
        f"Augmentation preset of the train split (the student, the teacher and the FPG see the same augmented image). {AUGMENT_PRESETS}. The knobs below override it.",
        AUGMENT, choices=tuple(PRESETS),
    )
    hflip: float | None = option(help="Horizontal flip probability (0 turns flips off).", panel=AUGMENT)
    vflip: float | None = option(help="Vertical flip probability (0 turns flips off).", panel=AUGMENT)
    rotate: float | None = option(help="Largest random rotation in degrees (0 turns rotation off, 90-degree turns too).", panel=AUGMENT)
    scale: list[float] | None = option(help="Area fraction of the random crop, e.g. 0.8,1.0 (1,1: no zoom).", panel=AUGMENT, metavar="MIN,MAX", cli_text=True)
    color_jitter: float | None = option(help="Brightness/contrast/saturation change in [1-F, 1+F] (0 turns it off).", panel=AUGMENT)
    # models
    teacher: str | None = option(
        help="Teacher: a timm model name (weights from --teacher-weights or timm's hub), or a fopro checkpoint .safetensors. None with no data: the synthetic demo.",
        panel=TEACHER,
    )
    teacher_weights: str | None = option(
        help="Local teacher weights: .safetensors, .pth or .pth.tar (timm, torchvision, MoCo v2, DINOv2 layouts).", panel=TEACHER, path=True
    )
    teacher_image_size: int | None = option(
        help="Teacher input size (default: the student's, rounded to the patch size of ViT teachers).", panel=TEACHER,
        rule=IMAGE_SIZE,
    )
    student: str = option("resnet18", "Student: any timm model name.", STUDENT)
    student_pretrained: bool = option(False, "Start the student from timm's pretrained weights (hub) instead of random init.", STUDENT)
    student_weights: str | None = option(help="Local pretrained weights for the student (its classifier is re-initialised).", panel=STUDENT, path=True)
    image_size: int = option(64, "Student (and FPG) input size in pixels.", STUDENT, rule=IMAGE_SIZE)
    # method
    method: str = option(
        "ekd",
        "none (supervised baseline) | kd (feature MSE) | ekd (cosine + second head; the default since 0.9, the best on val in every comparison) | fopro (EKD + FPG + AKD, FoPro-KD).",
        METHOD, choices=METHODS,
    )
    loss: str = option("balanced_softmax", "Supervised loss: balanced_softmax (logit-adjusted for the training class counts) | ce.", METHOD)
    ekd_weight: float = option(3.0, "lambda: weight of the student-teacher alignment term.", METHOD, rule=NOT_NEGATIVE)
    align_weights: str = option(
        "none",
        "none | balanced: weight each image's alignment term by 1 / (C p_y), so that every class counts equally (the authors' balanced_free idea; unlabelled images weigh 1).",
        METHOD,
        choices=ALIGN_WEIGHTS,
    )
    align_focus: float | None = option(
        help="gamma: weight each image's alignment term by d_i^gamma / mean(d^gamma), its own distance to the teacher's embedding relative to the batch's, so that the images the student matches worst (in practice the rare classes') count most, unlabelled ones too; 0 weighs them alike. Default: 2 with ekd (chosen on val), 0 with kd and fopro.",
        panel=METHOD, rule=NOT_NEGATIVE,
    )
    second_head: bool = option(
        True,
        "EKD's second classifier fc_t on the projected features, trained with the supervised loss (ekd, fopro); --no-second-head keeps only the alignment term.",
        METHOD,
    )
    deploy_head: str = option(
        "auto",
        "The classifier the checkpoints keep (and eval, export and the best-epoch choice use): fc, the student's own, or fc_t, EKD's second head on the projection p(f) (p then fc_t, 0.5 M more weights for a 512-wide student); auto: fc_t when the run trains it (ekd, fopro), else fc. fc_t read val better than fc (README, The method in fopro).",
        METHOD, choices=("auto", *HEADS),
    )
    adv_weight: float = option(
        1.0, "alpha: adversarial (AKD) weight in the FPG objective; 0 turns AKD off.", FPG,
        rule=Rule(lambda v: v >= 0, "must not be negative (0 turns AKD off)"),
    )
    fpg_reg: float = option(0.1, "beta: penalty on (M - 1)^2 keeping the mask near 1.", FPG, rule=NOT_NEGATIVE)
    fpg_mode: str = option("both", "dataset (one learned spectrum map) | conditional (per-image conv net) | both.", FPG, choices=FPG_MODES)
    fpg_strength: float = option(
        0.5, "epsilon: the mask stays within [1 - eps, 1 + eps].", FPG, rule=Rule(lambda v: 0 < v < 1, "must be in (0, 1), e.g. 0.5")
    )
    fpg_hidden: int = option(16, "Channels of the conditional generator.", FPG, rule=AT_LEAST_1)
    fpg_lr: float = option(1e-3, "Learning rate of the FPG and the teacher head h_t.", FPG, rule=POSITIVE)
    fpg_every: int = option(1, "Run the FPG step every K steps.", FPG, rule=AT_LEAST_1)
    prompt_fraction: float = option(
        1.0, "Share of each batch the FPG prompts; the student learns on the prompted images (the rest stay clean).", FPG,
        rule=Rule(lambda v: 0 < v <= 1, "must be in (0, 1]"),
    )
    probe_kd: float = option(
        0.0,
        "Weight of KL(teacher probe || student): the class beliefs of a linear classifier fitted on the frozen teacher's embeddings of train, on every image (unlabelled ones too). 0 turns it off.",
        METHOD, rule=Rule(lambda v: v >= 0, "must not be negative (0 turns it off)"),
    )
    probe_init: str | None = option(help="Start the dataset-level prompt from a probe.json (amplify the preferred bands).", panel=FPG, path=True)
    # optimisation
    epochs: int = option(100, "Training epochs (default 100; 5 on the synthetic demo).", OPTIM, rule=AT_LEAST_1)
    batch_size: int = option(
        32, "Images per step (per process under torchrun).", OPTIM,
        rule=Rule(lambda v: v >= 2, "must be at least 2 (batch normalisation needs two images per step)"),
    )
    optimizer: str = option("adam", "adam | sgd (momentum, Nesterov).", OPTIM, choices=OPTIMIZERS)
    lr: float | None = option(
        help="Peak learning rate, or auto: Adam 1e-3 x sqrt(global batch / 32), SGD 0.1 x global batch / 256.", panel=OPTIM,
        rule=Rule(lambda v: v > 0, "must be greater than 0 (or auto)"), cli_text=True, cli_default="auto",
    )
    schedule: str = option("cosine", "After the warm-up: cosine (decay to 0) | constant.", OPTIM, choices=SCHEDULES)
    weight_decay: float = option(0.0, "Weight decay.", OPTIM, rule=NOT_NEGATIVE)
    momentum: float = option(0.9, "SGD momentum.", OPTIM, rule=Rule(lambda v: 0 <= v < 1, "must be in [0, 1)"))
    warmup_epochs: float = option(1.0, "Linear warm-up length in epochs.", OPTIM, rule=NOT_NEGATIVE)
    grad_clip: float = option(5.0, "Gradient norm clipping.", OPTIM, rule=POSITIVE)
    balanced_sampler: bool = option(False, "Class-balanced sampling instead of shuffling.", OPTIM)
    amp: str = option("none", "Mixed precision on GPU: none | bf16 | fp16.", OPTIM, choices=AMP_MODES)
    channels_last: bool = option(True, "channels_last memory format on GPU.", OPTIM)
    device: str = option("auto", "auto | cpu | cuda | cuda:N.", OPTIM, rule=DEVICE)
    workers: int | None = option(help="Data loader worker processes (default: 0 for in-memory datasets, else cores - 1).", panel=OPTIM, rule=NOT_NEGATIVE)
    seed: int = option(0, "Random seed (same seed on CPU: same weights, bit for bit).", OPTIM)
    # run
    out: str | None = option(help="Run folder (default runs/<method>-<time>).", path=True)
    head_threshold: int = option(100, "Head classes have more training images than this.", rule=NOT_NEGATIVE)
    tail_threshold: int = option(20, "Tail (rare) classes have fewer training images than this.", rule=NOT_NEGATIVE)
    teacher_probe: bool = option(
        True,
        "After training, fit a linear classifier on the frozen teacher's embeddings of the train split and report the student next to it (the reference for the transfer).",
    )
    tracking: str = option(
        "none",
        'Experiment tracking in the run folder: none | tensorboard (RUN/tensorboard/) | mlflow (a local store in RUN/mlflow/): '
        'losses, learning rates, val metrics, the FPG mask, the config. Needs the tensorboard or mlflow extra of fopro (README: Experiment tracking).',
        choices=TRACKERS,
    )
    extra: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})

    def data_options(self) -> DataOptions:
        return data_options_of(self.to_dict())

    def unlabeled_batch_size(self) -> int:
        """Unlabelled images per step and process (--unlabeled-batch, default: --batch-size)."""
        return self.unlabeled_batch or self.batch_size

    def augment_config(self) -> AugmentConfig:
        return resolve_augment(self.augment, **{knob: getattr(self, knob) for knob in KNOBS})

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
            align_weights=self.align_weights,
            align_focus=self.focus(),
            second_head=self.second_head,
            deploy_head=self.head(),
        )

    def focus(self) -> float:
        """--align-focus, or when it is not given the method's default (2 for ekd, else 0)."""
        return self.align_focus if self.align_focus is not None else default_align_focus(self.method)

    def head(self) -> str:
        """--deploy-head, with auto resolved: fc_t when the run trains EKD's second head, else fc."""
        if self.deploy_head != "auto":
            return self.deploy_head
        return "fc_t" if trains_second_head(self.method, self.second_head) else "fc"

    def learning_rate(self, world_size: int = 1) -> float:
        """--lr, or with --lr auto (None) the optimiser's base rate scaled to the global batch."""
        if self.lr is not None:
            return self.lr
        base, base_batch, power = AUTO_LR[self.optimizer]
        return base * (self.batch_size * world_size / base_batch) ** power

    def validate(self) -> None:
        """Every option and cross-option rule, before any file is read or model built: one error naming the option."""
        for name, spec in OPTION_FIELDS.items():
            value = getattr(self, name)
            choices, rule = spec.metadata["choices"], spec.metadata["rule"]
            if choices and value not in choices:
                raise FoproError(f"{flag(name)} {value} is not known: choose one of {', '.join(choices)}")
            if rule and value is not None and not rule.ok(value):
                raise FoproError(f"{flag(name)} {value} {rule.says}")
        check_loss(self.loss)
        self.augment_config()
        self.groups()
        parse_window(self.dicom_window)
        check_tracker(self.tracking)
        if self.probe_kd > 0 and self.method == "none":
            raise FoproError("--probe-kd distils the teacher probe: use --method kd, ekd or fopro, or drop --probe-kd")
        if self.align_focus and self.method == "none":
            raise FoproError("--align-focus weighs the alignment term, which --method none has not: use --method kd, ekd or fopro, or drop --align-focus")
        if self.deploy_head == "fc_t" and not trains_second_head(self.method, self.second_head):
            raise FoproError("--deploy-head fc_t is EKD's second head, which this run does not train: use --method ekd or fopro without --no-second-head, or --deploy-head fc")
        if self.unlabeled and self.method == "none":
            raise FoproError("--unlabeled needs a teacher to align with: use --method kd, ekd or fopro, or drop --unlabeled")
        if self.probe_init and not Path(self.probe_init).is_file():
            raise FoproError(f"--probe-init {self.probe_init} does not exist: give the probe.json written by fopro probe")
        if self.probe_init and self.fpg_mode == "conditional":
            raise FoproError("--probe-init sets the dataset-level prompt, which --fpg-mode conditional has not: use --fpg-mode dataset or both")

    def groups(self) -> LongTailGroups:
        """The head / medium / tail split of --head-threshold and --tail-threshold (checks tail <= head)."""
        return LongTailGroups(head=self.head_threshold, tail=self.tail_threshold)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(DistillConfig)}
OPTION_FIELDS = {name: f for name, f in FIELDS.items() if f.metadata.get("cli", True)}  # the command-line options
TYPES = typing.get_type_hints(DistillConfig)
PATH_KEYS = tuple(name for name, f in OPTION_FIELDS.items() if f.metadata["path"])
# The data options every command that reads data shares (fopro eval, probe, export, data info).
DATA_KEYS = ("data", "train_csv", "val_csv", "test_csv", "images", "image_column", "label_column", "classes", "imbalance",
             "data_seed", "skip_bad_images", "max_image_pixels", "dicom_window")


def flag(name: str) -> str:
    """The command-line flag of a field: image_size -> --image-size."""
    return "--" + name.replace("_", "-")


def value_type(name: str) -> type:
    """The type a field holds when set: int for `int | None`, list for `list[float] | None`."""
    hint = TYPES[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    return typing.get_origin(args[0]) or args[0]


def data_options_of(values: dict[str, Any]) -> DataOptions:
    """The DataOptions of the data fields in `values` (a DistillConfig's dict, or a command's data options)."""
    classes = values.get("classes")
    if isinstance(classes, str):
        classes = _coerce("classes", classes)
    path = lambda key: Path(values[key]) if values.get(key) else None  # noqa: E731
    return DataOptions(
        data=path("data"),
        train_csv=path("train_csv"),
        val_csv=path("val_csv"),
        test_csv=path("test_csv"),
        images=path("images"),
        image_column=values.get("image_column"),
        label_column=values.get("label_column"),
        classes=classes,
        imbalance=values.get("imbalance"),
        seed=values.get("data_seed") or 0,
        skip_bad_images=bool(values.get("skip_bad_images")),
        decode=DecodeOptions(values.get("max_image_pixels") or MAX_IMAGE_PIXELS, parse_window(values.get("dicom_window") or "auto")),
    )


def resolve_config(file_values: dict[str, Any], cli_values: dict[str, Any]) -> DistillConfig:
    """Defaults, overridden by the config file, overridden by options given on the command line."""
    merged = {**file_values, **cli_values}
    config = DistillConfig()
    for key, value in merged.items():
        setattr(config, key, _coerce(key, value))
    config.validate()
    return config


def _coerce(key: str, value: Any) -> Any:
    """A value from the command line, a config file or config.json, as the field's type (or one clear error).

    Strict: a boolean is not a number, a list is not a path, a number is not a name."""
    if value is None:
        return None
    if key == "classes":
        return _class_list(value)
    if key == "scale":
        return list(parse_scale(value))
    if key == "lr" and value == "auto":
        return None
    if isinstance(value, Path):
        value = str(value)
    kind = value_type(key)
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if kind in (int, float) and isinstance(value, (bool, list, dict)):
            raise ValueError
        if kind is int:
            if float(value) != int(value):
                raise ValueError
            return int(value)
        if kind is float:
            number = float(value)
            if not math.isfinite(number):
                raise FoproError(f"option {key} = {value!r} is not a finite number: give a value such as {FIELDS[key].default or 1.0}")
            return number
        if kind is str and not isinstance(value, str):
            raise ValueError
        if kind is dict and not isinstance(value, dict):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        if key == "lr":
            raise FoproError(f"--lr {value} is not a number: give a learning rate such as 1e-3, or auto") from None
        raise FoproError(f"option {key} = {value!r} has the wrong type: expected {_TYPE_WORDS.get(kind, kind.__name__)}") from None
    return value


_TYPE_WORDS = {float: "a number", int: "an integer", bool: "true or false", str: "text (one name or path)", dict: "a mapping"}


def _class_list(value: Any) -> list[str]:
    """--classes: comma-separated text, a JSON list (names that hold commas), or a config file's list of names."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise FoproError(f"--classes {value} is not a JSON list of names ({err.msg}): give e.g. '[\"a, b\", \"c\"]' or a,b,c") from None
    if isinstance(value, str):
        return [c.strip() for c in value.split(",") if c.strip()]
    if not isinstance(value, list) or not all(isinstance(c, str) and c.strip() for c in value):
        raise FoproError(f"option classes = {value!r} must be a list of class names (text), e.g. [a, b, c]")
    return [c.strip() for c in value]
