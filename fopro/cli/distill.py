"""`fopro distill`: FPG + EKD (+ AKD) training, and the baselines none / kd / ekd."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from fopro.cli.common import cli_errors, console, err_console, print_json, progress_bar, with_data_values
from fopro.cli.render import fmt, render_eval
from fopro.data.augment import DEFAULT_PRESET, PRESET_HELP
from fopro.distill import distill
from fopro.distributed import env_from_environment
from fopro.train import TrainingInterrupted

TEACHER = "Teacher"
STUDENT = "Student"
METHOD = "Method"
FPG = "Fourier Prompt Generator"
OPTIM = "Optimisation"
AUGMENT = "Augmentation (train split)"
AUGMENT_PRESETS = "; ".join(f"{name}: {text}" for name, text in PRESET_HELP.items())


@cli_errors
@with_data_values
def distill_cli(
    ctx: typer.Context,
    data_values: dict,
    augment: Annotated[str, typer.Option(help=f"Augmentation preset of the train split (the student, the teacher and the FPG see the same augmented image). {AUGMENT_PRESETS}. The knobs below override it.", rich_help_panel=AUGMENT)] = DEFAULT_PRESET,
    hflip: Annotated[Optional[float], typer.Option(help="Horizontal flip probability (0 turns flips off).", rich_help_panel=AUGMENT)] = None,
    vflip: Annotated[Optional[float], typer.Option(help="Vertical flip probability (0 turns flips off).", rich_help_panel=AUGMENT)] = None,
    rotate: Annotated[Optional[float], typer.Option(help="Largest random rotation in degrees (0 turns rotation off, 90-degree turns too).", rich_help_panel=AUGMENT)] = None,
    scale: Annotated[Optional[str], typer.Option(metavar="MIN,MAX", help="Area fraction of the random crop, e.g. 0.8,1.0 (1,1: no zoom).", rich_help_panel=AUGMENT)] = None,
    color_jitter: Annotated[Optional[float], typer.Option(help="Brightness/contrast/saturation change in [1-F, 1+F] (0 turns it off).", rich_help_panel=AUGMENT)] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Teacher: a timm model name (weights from --teacher-weights or timm's hub), or a fopro checkpoint .safetensors. None with no data: the synthetic demo.", rich_help_panel=TEACHER)] = None,
    teacher_weights: Annotated[Optional[Path], typer.Option(help="Local teacher weights: .safetensors, .pth or .pth.tar (timm, torchvision, MoCo v2, DINOv2 layouts).", rich_help_panel=TEACHER)] = None,
    teacher_image_size: Annotated[Optional[int], typer.Option(help="Teacher input size (default: the student's, rounded to the patch size of ViT teachers).", rich_help_panel=TEACHER)] = None,
    student: Annotated[str, typer.Option(help="Student: any timm model name.", rich_help_panel=STUDENT)] = "resnet18",
    student_pretrained: Annotated[bool, typer.Option(help="Start the student from timm's pretrained weights (hub) instead of random init.", rich_help_panel=STUDENT)] = False,
    student_weights: Annotated[Optional[Path], typer.Option(help="Local pretrained weights for the student (its classifier is re-initialised).", rich_help_panel=STUDENT)] = None,
    image_size: Annotated[int, typer.Option(help="Student (and FPG) input size in pixels.", rich_help_panel=STUDENT)] = 64,
    method: Annotated[str, typer.Option(help="none (supervised baseline) | kd (feature MSE) | ekd (cosine + second head) | fopro (EKD + FPG + AKD).", rich_help_panel=METHOD)] = "fopro",
    loss: Annotated[str, typer.Option(help="Supervised loss: balanced_softmax (logit-adjusted for the training class counts) | ce.", rich_help_panel=METHOD)] = "balanced_softmax",
    unlabeled: Annotated[Optional[Path], typer.Option(help="Unlabelled images (a folder, searched recursively, or a CSV with an image column) that join the alignment and FPG terms only (kd, ekd, fopro).", rich_help_panel=METHOD)] = None,
    unlabeled_batch: Annotated[Optional[int], typer.Option(help="Unlabelled images per step (default: --batch-size).", rich_help_panel=METHOD)] = None,
    probe_kd: Annotated[float, typer.Option(help="Weight of KL(teacher probe || student): the class beliefs of a linear classifier fitted on the frozen teacher's embeddings of train, on every image (unlabelled ones too). 0 turns it off.", rich_help_panel=METHOD)] = 0.0,
    ekd_weight: Annotated[float, typer.Option(help="lambda: weight of the student-teacher alignment term.", rich_help_panel=METHOD)] = 3.0,
    adv_weight: Annotated[float, typer.Option(help="alpha: adversarial (AKD) weight in the FPG objective; 0 turns AKD off.", rich_help_panel=FPG)] = 1.0,
    fpg_reg: Annotated[float, typer.Option(help="beta: penalty on (M - 1)^2 keeping the mask near 1.", rich_help_panel=FPG)] = 0.1,
    fpg_mode: Annotated[str, typer.Option(help="dataset (one learned spectrum map) | conditional (per-image conv net) | both.", rich_help_panel=FPG)] = "both",
    fpg_strength: Annotated[float, typer.Option(help="epsilon: the mask stays within [1 - eps, 1 + eps].", rich_help_panel=FPG)] = 0.5,
    fpg_hidden: Annotated[int, typer.Option(help="Channels of the conditional generator.", rich_help_panel=FPG)] = 16,
    fpg_lr: Annotated[float, typer.Option(help="Learning rate of the FPG and the teacher head h_t.", rich_help_panel=FPG)] = 1e-3,
    fpg_every: Annotated[int, typer.Option(help="Run the FPG step every K steps.", rich_help_panel=FPG)] = 1,
    prompt_fraction: Annotated[float, typer.Option(help="Share of each batch the FPG prompts; the student learns on the prompted images (the rest stay clean).", rich_help_panel=FPG)] = 1.0,
    probe_init: Annotated[Optional[Path], typer.Option(help="Start the dataset-level prompt from a probe.json (amplify the preferred bands).", rich_help_panel=FPG)] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs (default 100; 6 on the synthetic demo).", rich_help_panel=OPTIM)] = 100,
    batch_size: Annotated[int, typer.Option(help="Images per step (per process under torchrun).", rich_help_panel=OPTIM)] = 32,
    optimizer: Annotated[str, typer.Option(help="adam | sgd (momentum, Nesterov).", rich_help_panel=OPTIM)] = "adam",
    lr: Annotated[str, typer.Option(help="Peak learning rate, or auto: Adam 1e-3 x sqrt(global batch / 32), SGD 0.1 x global batch / 256.", rich_help_panel=OPTIM)] = "auto",
    schedule: Annotated[str, typer.Option(help="After the warm-up: cosine (decay to 0) | constant.", rich_help_panel=OPTIM)] = "cosine",
    weight_decay: Annotated[float, typer.Option(help="Weight decay.", rich_help_panel=OPTIM)] = 0.0,
    momentum: Annotated[float, typer.Option(help="SGD momentum.", rich_help_panel=OPTIM)] = 0.9,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up length in epochs.", rich_help_panel=OPTIM)] = 1.0,
    grad_clip: Annotated[float, typer.Option(help="Gradient norm clipping.", rich_help_panel=OPTIM)] = 5.0,
    balanced_sampler: Annotated[bool, typer.Option(help="Class-balanced sampling instead of shuffling.", rich_help_panel=OPTIM)] = False,
    amp: Annotated[str, typer.Option(help="Mixed precision on GPU: none | bf16 | fp16.", rich_help_panel=OPTIM)] = "none",
    channels_last: Annotated[bool, typer.Option(help="channels_last memory format on GPU.", rich_help_panel=OPTIM)] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.", rich_help_panel=OPTIM)] = "auto",
    workers: Annotated[Optional[int], typer.Option(help="Data loader worker processes (default: 0 for in-memory datasets, else cores - 1).", rich_help_panel=OPTIM)] = None,
    seed: Annotated[int, typer.Option(help="Random seed (same seed on CPU: same weights, bit for bit).", rich_help_panel=OPTIM)] = 0,
    head_threshold: Annotated[int, typer.Option(help="Head classes have more training images than this.")] = 100,
    tail_threshold: Annotated[int, typer.Option(help="Tail (rare) classes have fewer training images than this.")] = 20,
    teacher_probe: Annotated[bool, typer.Option(help="After training, fit a linear classifier on the frozen teacher's embeddings of the train split and report the student next to it (the reference for the transfer).")] = True,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/<method>-<time>).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML or TOML file with the same keys as these options; command-line options override it.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue an interrupted run folder with its saved options.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON on stdout, nothing else.")] = False,
) -> None:
    """Distil a frozen teacher into a small student with FoPro-KD (or a baseline); with no data and no
    teacher, runs the embedded synthetic demo."""
    local = dict(locals())
    values = {**data_values, **{k: v for k, v in local.items() if k not in ("ctx", "data_values", "config", "resume", "overwrite", "json_output")}}
    given = {key: value for key, value in values.items() if _from_command_line(ctx, key)}
    is_main = env_from_environment().is_main
    try:
        with progress_bar(is_main) as progress:
            summary = distill(given, config_file=config, resume=resume, overwrite=overwrite, progress=progress)
    except TrainingInterrupted as stop:
        if is_main:
            err_console.print(f"[yellow]{stop}[/yellow]")
        raise typer.Exit(130) from None
    if not is_main:
        return
    if json_output:
        print_json(summary)
        return
    render_summary(summary)


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


def render_teacher_probe(summary: dict[str, Any]) -> None:
    """The student next to the teacher probe: how much of what the teacher knows the student learned."""
    probe = summary.get("teacher_probe")
    if not probe:
        return
    split = "test" if "test" in probe["splits"] else "val"
    theirs = probe["splits"].get(split, {})
    student = summary.get("test") if split == "test" else summary.get("best_val")
    line = (
        f"teacher probe (linear classifier on the frozen teacher's embeddings of train, {probe['views']} view(s)): {split} balanced accuracy "
        f"{fmt(theirs.get('balanced_accuracy'))}, tail recall {fmt(theirs.get('tail_recall'))}"
    )
    if student:
        line += f"; the student: {fmt(student.get('balanced_accuracy'))}, {fmt(student.get('tail_recall'))}"
    transfer = summary.get("transfer") or {}
    if transfer.get("balanced_accuracy") is not None:
        line += f" ({100 * transfer['balanced_accuracy']:.0f} % of the probe's balanced accuracy)"
    console.print(escape(line), highlight=False)


def render_summary(summary: dict[str, Any]) -> None:
    for note in summary.get("notes", []):
        if note.startswith("warning:"):
            console.print(f"[yellow]{escape(note)}[/]", highlight=False)
        else:
            console.print(f"[cyan]note:[/] {escape(note)}", highlight=False)
    best = summary.get("best_val") or {}
    if summary.get("augmentation_text"):
        console.print(f"augmentation: {escape(summary['augmentation_text'])}", highlight=False)
    console.print(
        f"[bold]{summary['method']}[/] student {summary['student']}; best epoch {summary['best_epoch']}: "
        f"val balanced accuracy {fmt(best.get('balanced_accuracy'))}, val tail recall {fmt(best.get('tail_recall'))}"
    )
    if "test" in summary:
        render_eval(summary["test"], title="best checkpoint on the test split")
    render_teacher_probe(summary)
    console.print(f"run folder: [bold]{summary['run_dir']}[/] (best.safetensors, last.safetensors, metrics.jsonl, config.json)")
