"""Figures written as PNG files: each plot is an independent function that saves atomically and closes its figure."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fopro.errors import FoproError
from fopro.io import atomic_path
from fopro.metrics import binary_auc
from fopro.operating_points import average_precision, ranked_counts


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


def _save(fig: Any, path: str | Path, dpi: int) -> None:
    """Write a figure as PNG, atomically."""
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


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
        _save(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return path


def plot_roc_pr(labels: np.ndarray, probs: np.ndarray, class_names: list[str], path: Path) -> Path:
    """One-vs-rest ROC and precision-recall curves of every class (left, right), each class's AUC / AP in the legend."""
    labels, probs = np.asarray(labels, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    plt = _pyplot()
    fig, (roc, pr) = plt.subplots(1, 2, figsize=(11.0, 5.0))
    try:
        for c, name in enumerate(class_names):
            positive = labels == c
            if not positive.any() or positive.all():
                continue
            _, true_pos, false_pos = ranked_counts(positive, probs[:, c])
            tpr, fpr = np.r_[0.0, true_pos / positive.sum()], np.r_[0.0, false_pos / (~positive).sum()]
            precision = true_pos / (true_pos + false_pos)
            roc.plot(fpr, tpr, label=f"{name} (AUC {binary_auc(positive, probs[:, c]):.2f})")
            pr.step(np.r_[0.0, true_pos / positive.sum()], np.r_[precision[0], precision], where="post",
                    label=f"{name} (AP {average_precision(positive, probs[:, c]):.2f})")
        roc.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        roc.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (one vs rest)", xlim=(0, 1), ylim=(0, 1.01))
        pr.set(xlabel="recall", ylabel="precision", title="Precision-recall (one vs rest)", xlim=(0, 1), ylim=(0, 1.01))
        for ax in (roc, pr):
            ax.legend(loc="lower right" if ax is roc else "lower left", fontsize=7)
        fig.tight_layout()
        _save(fig, Path(path), dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


def plot_reliability(labels: np.ndarray, curves: dict[str, np.ndarray], path: Path, num_bins: int = 15) -> Path:
    """Reliability diagram: accuracy of the top-label prediction against its confidence, per equal-width bin,
    one line per set of probabilities in `curves` (e.g. before / after temperature scaling). PNG, atomically."""
    labels = np.asarray(labels, dtype=np.int64)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 5.0))
    try:
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        for name, probs in curves.items():
            confidence = np.asarray(probs, dtype=np.float64).max(axis=1)
            correct = np.asarray(probs).argmax(axis=1) == labels
            bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
            filled = [b for b in range(num_bins) if np.any(bins == b)]
            ax.plot([confidence[bins == b].mean() for b in filled], [correct[bins == b].mean() for b in filled], marker="o", label=name)
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title("Reliability")
        ax.legend(loc="upper left")
        fig.tight_layout()
        _save(fig, Path(path), dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


def _finite_abs_max(*arrays: np.ndarray, floor: float = 1.0) -> float:
    values = [np.nanmax(np.abs(a)) for a in arrays if np.isfinite(a).any()]
    return max([floor] + [float(v) for v in values])


def plot_probe(result: dict, path: Path) -> Path:
    """The teacher's frequency preference (a probe.json dict): heatmap band x gain and curves over frequency.

    Left: change in the NCM balanced accuracy vs clean images, in points, per band (rows, low frequencies at
    the bottom) and gain (columns), with the tail-class change under each value. Right: the same against the
    band centre (fraction of Nyquist), solid for all classes and dashed for the tail classes.
    """
    bands, gains = result["bands"], [float(g) for g in result["gains"]]
    delta = np.full((len(bands), len(gains)), np.nan)
    tail = np.full_like(delta, np.nan)
    beyond_noise = np.zeros(delta.shape, dtype=bool)
    min_effect = float((result.get("preference") or {}).get("min_effect", 0.01))
    for row in result["results"]:
        i, j = int(row["band"]), gains.index(float(row["gain"]))
        if row.get("delta_balanced_accuracy") is not None:
            noise = max(min_effect, 2.0 * (row.get("se_delta_balanced_accuracy") or 0.0))
            beyond_noise[i, j] = abs(row["delta_balanced_accuracy"]) > noise
        for target, key in ((delta, "delta_balanced_accuracy"), (tail, "delta_tail_balanced_accuracy")):
            if row.get(key) is not None:
                target[i, j] = 100.0 * row[key]

    plt = _pyplot()
    fig, (ax_map, ax_curve) = plt.subplots(
        1, 2, figsize=(14, max(5.0, 0.5 * len(bands) + 3.0)), gridspec_kw={"width_ratios": [1.0, 1.25]}
    )
    try:
        limit = _finite_abs_max(delta, tail)
        image = ax_map.imshow(np.ma.masked_invalid(delta), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto",
                              origin="lower", interpolation="nearest")
        fig.colorbar(image, ax=ax_map, fraction=0.046, pad=0.04).set_label("change in balanced accuracy vs clean (points)")
        kind = lambda g: "removed" if g == 0 else ("diminished" if g < 1 else ("amplified" if g > 1 else "unchanged"))  # noqa: E731
        ax_map.set_xticks(np.arange(len(gains)))
        ax_map.set_xticklabels([f"x{g:g}\n({kind(g)})" for g in gains])
        ax_map.set_yticks(np.arange(len(bands)))
        ax_map.set_yticklabels([f"{lo:.2f}-{hi:.2f}" for lo, hi in bands])
        ax_map.set_xlabel("gain on the band's Fourier amplitude (phase kept)")
        ax_map.set_ylabel("frequency band (fraction of Nyquist: 0 = coarse, 1 = finest detail)")
        ax_map.set_title("balanced accuracy change (tail classes below; bold: beyond noise, 2 s.e.)", fontsize=10)
        font = max(6.0, min(10.0, 90.0 / max(len(bands), len(gains) * 2)))
        for i in range(len(bands)):
            for j in range(len(gains)):
                if np.isfinite(delta[i, j]):
                    text = f"{delta[i, j]:+.1f}" + (f"\ntail {tail[i, j]:+.1f}" if np.isfinite(tail[i, j]) else "")
                    dark = abs(delta[i, j]) > 0.6 * limit
                    ax_map.text(j, i, text, ha="center", va="center", fontsize=font, color="white" if dark else "black",
                                fontweight="bold" if beyond_noise[i, j] else "normal", alpha=1.0 if beyond_noise[i, j] else 0.6)

        centres = result.get("band_centres") or [(lo + hi) / 2 for lo, hi in bands]
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for j, gain in enumerate(gains):
            colour = colours[j % len(colours)]
            ax_curve.plot(centres, delta[:, j], marker="o", color=colour, label=f"x{gain:g} ({kind(gain)}), all classes")
            if np.isfinite(tail[:, j]).any():
                ax_curve.plot(centres, tail[:, j], marker="v", linestyle="--", color=colour, label=f"x{gain:g}, tail classes")
        ax_curve.axhline(0.0, color="black", linewidth=0.8)
        for low, _ in bands[1:]:
            ax_curve.axvline(low, color="grey", linewidth=0.5, alpha=0.4)
        ax_curve.set_xlim(0.0, 1.0)
        ax_curve.set_xlabel("band centre frequency (fraction of Nyquist: 0 = coarse, 1 = finest detail)")
        ax_curve.set_ylabel("change in balanced accuracy vs clean (points)")
        clean = result["clean"]
        tail_text = "" if clean.get("tail_balanced_accuracy") is None else f", tail {100 * clean['tail_balanced_accuracy']:.1f}%"
        ax_curve.set_title(f"clean images: balanced accuracy {100 * clean['balanced_accuracy']:.1f}%{tail_text}")
        ax_curve.legend(fontsize=8, loc="best")
        teacher = (result.get("teacher") or {}).get("teacher", "teacher")
        fig.suptitle(
            f"Frequency preference of {teacher} on the {result.get('split', '')} split "
            f"({result.get('num_images', '?')} images, {result.get('image_size', '?')} px)"
        )
        fig.tight_layout()
        _save(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


MASK_COLOURS = "RdBu_r"  # FPG masks: red amplified, white unchanged (1), blue diminished


def mask_norm(mask: np.ndarray, bounds: Sequence[float]) -> Any:
    """The colour scale of an FPG mask: centred on 1, spanning its bounds [1 - eps, 1 + eps] (and its values)."""
    from matplotlib.colors import TwoSlopeNorm

    low, high = bounds
    return TwoSlopeNorm(vcenter=1.0, vmin=min(low, float(mask.min()), 1 - 1e-6), vmax=max(high, float(mask.max()), 1 + 1e-6))


def mask_rgb(mask: np.ndarray, bounds: Sequence[float], scale: int = 1) -> np.ndarray:
    """A centred (H, W) FPG mask as an (H * scale, W * scale, 3) uint8 image in the colours of fpg_mask.png
    (low frequencies in the middle, positive vertical frequencies up)."""
    from matplotlib import colormaps

    mask = np.asarray(mask, dtype=np.float64)
    colours = colormaps[MASK_COLOURS](mask_norm(mask, bounds)(mask))[::-1, :, :3]
    return np.round(colours * 255).astype(np.uint8).repeat(scale, axis=0).repeat(scale, axis=1)


def plot_fpg_mask(mask: np.ndarray, axis: np.ndarray, result: dict, path: Path, probe: dict | None = None) -> Path:
    """A learned FPG (an fpg.json dict): its mean mask over the centred spectrum and its radial profile.

    ``mask`` is the fftshift-ed (H, W) mean mask and ``axis`` the fftshift-ed frequencies of its rows and
    columns as fractions of Nyquist. With ``probe`` (a probe.json dict), a third panel shows the probe's
    balanced-accuracy changes per band for comparison.
    """
    mask = np.asarray(mask, dtype=np.float64)
    axis = np.asarray(axis, dtype=np.float64)
    plt = _pyplot()
    panels = 3 if probe is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.8 * panels, 5.2))
    try:
        step = float(axis[1] - axis[0]) if len(axis) > 1 else 1.0
        extent = (axis[0] - step / 2, axis[-1] + step / 2, axis[0] - step / 2, axis[-1] + step / 2)
        image = axes[0].imshow(mask, cmap=MASK_COLOURS, norm=mask_norm(mask, result["mask"]["bounds"]),
                               extent=extent, origin="lower", interpolation="nearest")
        fig.colorbar(image, ax=axes[0], fraction=0.046, pad=0.04).set_label("amplitude gain (>1 amplified, <1 diminished)")
        axes[0].set_xlabel("horizontal frequency (fraction of Nyquist)")
        axes[0].set_ylabel("vertical frequency (fraction of Nyquist)")
        axes[0].set_title(f"mean FPG mask over {result.get('num_images', '?')} images (centre = mean colour)")

        profile = result["radial_profile"]
        centres = [b["centre"] for b in profile]
        values = [b["mean_gain"] for b in profile]
        ax = axes[1]
        per_class = result.get("per_class_radial_profile") or {}
        if 1 < len(per_class) <= 10:
            for name, curve in per_class.items():
                ax.plot(centres, curve, linewidth=0.8, alpha=0.45, label=f"class {name}")
        ax.plot(centres, values, color="black", linewidth=1.5, label="all images")
        styles = {"amplified": ("^", "tab:red"), "diminished": ("v", "tab:blue"), "unchanged": ("o", "grey")}
        for direction, (marker, colour) in styles.items():
            chosen = [b for b in profile if b["direction"] == direction]
            if chosen:
                ax.scatter([b["centre"] for b in chosen], [b["mean_gain"] for b in chosen], marker=marker, s=70,
                           color=colour, zorder=3, label=direction)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
        for lo, _ in result["bands"][1:]:
            ax.axvline(lo, color="grey", linewidth=0.5, alpha=0.4)
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("band centre frequency (fraction of Nyquist: 0 = coarse, 1 = finest detail)")
        ax.set_ylabel("mean FPG gain in the band (1 = unchanged)")
        ax.set_title("radial profile of the mask")
        ax.legend(fontsize=7, loc="best")

        if probe is not None:
            ax = axes[2]
            gains = [float(g) for g in probe["gains"]]
            for gain in gains:
                rows = sorted((r for r in probe["results"] if float(r["gain"]) == gain), key=lambda r: r["band"])
                x = [(probe["bands"][r["band"]][0] + probe["bands"][r["band"]][1]) / 2 for r in rows]
                y = [np.nan if r.get("delta_balanced_accuracy") is None else 100 * r["delta_balanced_accuracy"] for r in rows]
                label = "removed" if gain == 0 else ("diminished" if gain < 1 else ("amplified" if gain > 1 else "unchanged"))
                ax.plot(x, y, marker="o", label=f"band x{gain:g} ({label})")
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.set_xlim(0.0, 1.0)
            ax.set_xlabel("band centre frequency (fraction of Nyquist)")
            ax.set_ylabel("change in balanced accuracy vs clean (points)")
            teacher = (probe.get("teacher") or {}).get("teacher", "teacher")
            ax.set_title(f"probe of {teacher}: what scaling each band does")
            ax.legend(fontsize=8, loc="best")
        fpg = result["fpg"]
        fig.suptitle(f"Learned Fourier prompt ({fpg['mode']}, strength {fpg['strength']:g}, {fpg['image_size']} px) "
                     f"on the {result.get('split', '')} split")
        fig.tight_layout()
        _save(fig, path, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)
