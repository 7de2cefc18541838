"""What every command shares: error handling, JSON output, progress bars, and the data options."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fopro.data import DataOptions
from fopro.errors import FoproError
from fopro.runtime import ProgressFn

console = Console()
err_console = Console(stderr=True)
STATE = {"debug": False}


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
            err_console.print(f"[bold red]error:[/bold red] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None
        except Exception as err:  # a bug or an unforeseen failure: one line, the traceback with --debug
            if STATE["debug"]:
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            err_console.print(
                f"[bold red]internal error:[/bold red] {type(err).__name__}: {escape(message)} "
                "(run with --debug for the traceback, and please report it)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper


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
        # no terminal (a log file, CI): one plain line each time a task completes
        def log_line(description: str, done: int, total: int) -> None:
            if done == total:
                err_console.print(f"{description}: {done}/{total} done", highlight=False, soft_wrap=True)

        yield log_line
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
            key = description.split(" [")[0]
            if key not in tasks:
                tasks[key] = bar.add_task(description, total=total, info=info)
            bar.update(tasks[key], completed=done, total=total, description=description, info=info)

        yield update


# --- data options, shared by every command that reads data ---------------------------------------

DATA_OPTIONS: dict[str, tuple[Any, Any]] = {
    "data": (Optional[Path], typer.Option(help="ImageFolder root with train/, val/, test/ <class>/<image>.", rich_help_panel="Data")),
    "train_csv": (Optional[Path], typer.Option(help="Training CSV manifest (image and label columns; ISIC-2019 LT format detected).", rich_help_panel="Data")),
    "val_csv": (Optional[Path], typer.Option(help="Validation CSV manifest.", rich_help_panel="Data")),
    "test_csv": (Optional[Path], typer.Option(help="Test CSV manifest.", rich_help_panel="Data")),
    "images": (Optional[Path], typer.Option(help="Folder the CSV image paths are relative to (ISIC: the .jpg folder).", rich_help_panel="Data")),
    "image_column": (Optional[str], typer.Option(help="CSV column with the image path or id (auto-detected when unambiguous).", rich_help_panel="Data")),
    "label_column": (Optional[str], typer.Option(help="CSV column with the label, a class name or index (auto-detected).", rich_help_panel="Data")),
    "classes": (Optional[str], typer.Option(help="Comma-separated class names, in class-index order (default: sorted names).", rich_help_panel="Data")),
    "imbalance": (Optional[float], typer.Option(help="Subsample the training split to this long-tail factor (rarest/most frequent, in (0, 1]).", rich_help_panel="Data")),
    "data_seed": (int, typer.Option(help="Seed of the long-tail subsampling.", rich_help_panel="Data")),
    "skip_bad_images": (bool, typer.Option(help="Leave out unreadable images (and say how many) instead of failing.", rich_help_panel="Data")),
}
DATA_DEFAULTS = {"data_seed": 0, "skip_bad_images": False}


def data_options_from(values: dict[str, Any]) -> DataOptions:
    classes = values.get("classes")
    return DataOptions(
        data=values.get("data"),
        train_csv=values.get("train_csv"),
        val_csv=values.get("val_csv"),
        test_csv=values.get("test_csv"),
        images=values.get("images"),
        image_column=values.get("image_column"),
        label_column=values.get("label_column"),
        classes=[c.strip() for c in classes.split(",") if c.strip()] if classes else None,
        imbalance=values.get("imbalance"),
        seed=values.get("data_seed", 0),
        skip_bad_images=values.get("skip_bad_images", False),
    )


def with_data_options(func: Callable) -> Callable:
    """Add the shared data options to a command; the command receives them as `data_options: DataOptions`."""
    return _add_data_options(func, "data_options", data_options_from)


def with_data_values(func: Callable) -> Callable:
    """Like with_data_options, but the command receives the raw values as `data_values: dict`."""
    return _add_data_options(func, "data_values", dict)


def _add_data_options(func: Callable, target: str, build: Callable[[dict[str, Any]], Any]) -> Callable:
    signature = inspect.signature(func)
    hints = typing.get_type_hints(func, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values() if p.name != target]
    added = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=DATA_DEFAULTS.get(name), annotation=Annotated[kind, info])
        for name, (kind, info) in DATA_OPTIONS.items()
    ]

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        values = {name: kwargs.pop(name) for name in DATA_OPTIONS if name in kwargs}
        return func(**{target: build(values)}, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
    del wrapper.__wrapped__
    return wrapper
