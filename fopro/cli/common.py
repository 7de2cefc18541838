"""What every command shares: error handling, JSON output, progress bars, and the data options."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
import time
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fopro.config import DATA_KEYS, FIELDS, OPTION_FIELDS, data_options_of, value_type
from fopro.data.manifest import has_control_characters
from fopro.errors import FoproError
from fopro.metrics import LongTailGroups
from fopro.runtime import ProgressFn

console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}
LOG_SECONDS = 30.0  # without a terminal, a progress line at least this often


def cli_errors(func: Callable) -> Callable:
    """Turn a FoproError into one red line and exit code 2; anything else into one line and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except FoproError as err:
            if STATE["debug"]:
                raise
            err_console.print(f"[bold red]error:[/bold red] {escape(printable(str(err)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None
        except Exception as err:  # a bug or an unforeseen failure: one line, the traceback with --debug
            if STATE["debug"]:
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            err_console.print(
                f"[bold red]internal error:[/bold red] {type(err).__name__}: {escape(printable(message))} "
                "(run with --debug for the traceback, and please report it)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


def printable(text: str) -> str:
    """Text from files (paths, names) with control characters shown as escapes, never sent to the terminal raw."""
    return "".join(ascii(char)[1:-1] if has_control_characters(char) else char for char in text)


def print_json(data: Any) -> None:
    """Machine-readable output: exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")
    sys.stdout.flush()


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[ProgressFn]:
    """A rich progress bar on stderr (stdout stays clean for --json); one bar per description."""
    if not enabled:
        yield lambda description, done, total: None
        return
    if not err_console.is_terminal:
        yield plain_progress_lines()
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, console=err_console, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def update(description: str, done: int, total: int, info: str = "") -> None:
            key = task_key(description)
            if key not in tasks:
                tasks[key] = bar.add_task(description, total=total, info=info)
            bar.update(tasks[key], completed=done, total=total, description=description, info=info)

        yield update


def task_key(description: str) -> str:
    """One progress row per task: the description without its changing " [...]" details."""
    return description.split(" [")[0]


def plain_progress_lines() -> ProgressFn:
    """Without a terminal (a log file, CI): one line per task when it completes and every LOG_SECONDS while it runs,
    with the task's own elapsed time and an estimate of the time left."""
    started: dict[str, float] = {}
    printed: dict[str, float] = {}

    def log_line(description: str, done: int, total: int) -> None:
        now = time.monotonic()
        key = task_key(description)
        start = started.setdefault(key, now)
        if done != total and now - printed.setdefault(key, now) < LOG_SECONDS:
            return
        printed[key] = now
        elapsed = now - start
        if done == total:
            timing = f"done in {clock(elapsed)}"
        else:
            timing = f"so far, {clock(elapsed)} elapsed" + (f", about {clock(elapsed / done * (total - done))} left" if done else "")
        err_console.print(f"{description}: {done}/{total} {timing}", highlight=False, soft_wrap=True, markup=False)

    return log_line


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


# --- options from the DistillConfig schema: distill's, and the data options every command shares -----


def option_parameter(name: str) -> inspect.Parameter:
    """The Typer option of a DistillConfig field: its type, default, help, panel and metavar come from the schema."""
    spec = FIELDS[name]
    meta = spec.metadata
    kind = Path if meta["path"] else str if meta["cli_text"] else value_type(name)
    default = spec.default if meta["cli_default"] is None else meta["cli_default"]
    info = typer.Option(help=meta["help"], rich_help_panel=meta["panel"], metavar=meta["metavar"])
    annotation = Annotated[kind if default is not None else Optional[kind], info]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def with_data_options(func: Callable) -> Callable:
    """Add the shared data options to a command; the command receives them as `data_options: DataOptions`."""
    return with_schema_options(func, DATA_KEYS, "data_options", data_options_of)


def with_group_options(func: Callable) -> Callable:
    """Add --head-threshold / --tail-threshold (the schema's); the command receives `groups: LongTailGroups`."""
    return with_schema_options(func, ("head_threshold", "tail_threshold"), "groups",
                               lambda values: LongTailGroups(head=values["head_threshold"], tail=values["tail_threshold"]))


def with_distill_options(func: Callable) -> Callable:
    """Add every option of DistillConfig to a command; the command receives their values as `values: dict`."""
    return with_schema_options(func, tuple(OPTION_FIELDS), "values", dict)


def with_schema_options(func: Callable, names: tuple[str, ...], target: str, build: Callable[[dict[str, Any]], Any]) -> Callable:
    """Add the options `names` of the schema to `func`'s signature; `func` receives build(their values) as `target`."""
    signature = inspect.signature(func)
    hints = typing.get_type_hints(func, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values() if p.name != target]
    added = [option_parameter(name) for name in names]

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in names if name in kwargs}
        return func(**{target: build(values)}, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
    del wrapper.__wrapped__
    return wrapper
