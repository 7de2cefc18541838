"""`fopro distill`: FPG + EKD (+ AKD) training, and the baselines none / kd / ekd."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from fopro.cli.common import cli_errors, console, err_console, print_json, progress_bar, with_distill_options
from fopro.cli.render import fmt, render_eval
from fopro.distill import distill
from fopro.distributed import env_from_environment
from fopro.train import TrainingInterrupted


REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM / SIGUSR1 with a resumable state; run the same command again


@cli_errors
@with_distill_options
def distill_cli(
    ctx: typer.Context,
    values: dict,
    config: Annotated[Optional[Path], typer.Option(help="YAML or TOML file with the same keys as these options; command-line options override it.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue an interrupted run folder with its saved options; auto: resume --out when it holds a resumable state, else start it (one command line for a job's first start and every restart).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON on stdout, nothing else.")] = False,
) -> None:
    """Distil a frozen teacher into a small student with FoPro-KD (or a baseline); with no data and no
    teacher, runs the embedded synthetic demo. Every option is a field of fopro.config.DistillConfig."""
    given = {key: value for key, value in values.items() if _from_command_line(ctx, key)}
    is_main = env_from_environment().is_main
    try:
        with progress_bar(is_main) as progress:
            summary = distill(given, config_file=config, resume=resume, overwrite=overwrite, progress=progress)
    except TrainingInterrupted as stop:
        if is_main:
            err_console.print(f"[yellow]{stop}[/yellow]")
        raise typer.Exit(130 if stop.signal_name == "SIGINT" else REQUEUE_EXIT_CODE) from None
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
        f"teacher probe (linear classifier on the frozen teacher's embeddings of train, {probe['views']} view(s), L2 weight "
        f"{probe['l2']:g} chosen on {probe['l2_chosen_on']}): {split} balanced accuracy "
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
    if summary.get("next_steps"):
        console.print("next steps:")
        for command in summary["next_steps"]:
            console.print(f"  {escape(command)}", highlight=False, soft_wrap=True)
