"""Device choice and the progress callback type shared by the library functions."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fopro.errors import FoproError

# progress(description, done, total): library functions report long work through this; the CLI draws it.
ProgressFn = Callable[[str, int, int], None]


def no_progress(description: str, done: int, total: int) -> None:
    return None


PHASE_SEPARATOR = " · "


def in_phase(progress: ProgressFn, phase: str) -> ProgressFn:
    """`progress` with every description labelled by its phase: "student: fopro distillation · epoch 2/6"."""
    if progress is no_progress:
        return no_progress
    return lambda description, done, total: progress(f"{phase}{PHASE_SEPARATOR}{description}", done, total)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FoproError(f"--device {device}: no CUDA GPU is available here; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise FoproError(f"--device {device} is not a device: use auto, cpu, cuda or cuda:N") from err
