"""Figures written as PNG files: each plot is an independent function that saves atomically and closes its figure."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from fopro.errors import FoproError
from fopro.io import atomic_path


def _pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend.

    The backend is chosen only if pyplot has not been imported yet, so a backend picked elsewhere
    (a notebook, another tool) is never switched under its feet; PNG output works on any backend.
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(
    matrix: np.ndarray | list,
    class_names: list[str],
    path: Path,
    title: str = "Confusion matrix",
) -> Path:
    """Heatmap of the row-normalised confusion matrix (rows = true, columns = predicted), counts in each cell.

    Rows with no sample are left blank. Written atomically to `path` as PNG; returns `path`.
    """
    counts = np.asarray(matrix, dtype=np.float64)
    num_classes = len(class_names)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise FoproError(f"the confusion matrix must be square, got shape {counts.shape}")
    if counts.shape[0] != num_classes:
        raise FoproError(f"the confusion matrix has {counts.shape[0]} rows but there are {num_classes} class names")
    row_sums = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalized = np.where(row_sums > 0, counts / np.where(row_sums > 0, row_sums, 1.0), np.nan)

    plt = _pyplot()
    side = max(5.0, 0.55 * num_classes + 3.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    try:
        image = ax.imshow(np.ma.masked_invalid(normalized), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
        colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        colorbar.set_label("fraction of the true class")
        ticks = np.arange(num_classes)
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.set_xticklabels(class_names, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticklabels(class_names)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(title)
        font_size = max(5.0, min(10.0, 120.0 / max(num_classes, 1)))
        for i in range(num_classes):
            for j in range(num_classes):
                value = normalized[i, j]
                dark = np.isfinite(value) and value > 0.5
                ax.text(
                    j,
                    i,
                    f"{int(round(counts[i, j]))}",
                    ha="center",
                    va="center",
                    fontsize=font_size,
                    color="white" if dark else "black",
                )
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path
