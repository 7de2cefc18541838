"""What a learned Fourier Prompt Generator does (`fopro probe --fpg RUN_DIR`).

Loads ``RUN_DIR/fpg.safetensors`` with ``RUN_DIR/config.json``, averages its mask over the probed images
(2-D, and its radial profile: the mean mask per band) and compares it with an earlier probe's preference.
"""


from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fopro.config_files import load_run_config
from fopro.data import DataOptions, load_splits
from fopro.errors import FoproError
from fopro.fourier import band_masks, fftshift2
from fopro.fpg import FourierPromptGenerator
from fopro.io import write_json
from fopro.models.weights import read_state_dict
from fopro.plots import plot_fpg_mask
from fopro.probe.file import FPG_FORMAT, band_summary, read_probe_json, suggested_gain
from fopro.probe.frequency import load_probe_images
from fopro.probe.options import ProbeOptions, check_bands_fit, check_options
from fopro.runtime import ProgressFn, no_progress


#: |mean mask - 1| below this counts as "unchanged" in the FPG's radial profile.
UNCHANGED_TOLERANCE = 0.01
RUN_CONFIG = "config.json"
RUN_FPG = "fpg.safetensors"


def read_run_config(run_dir: str | Path) -> dict:
    """The FPG facts of a `fopro distill` run (its RUN_DIR/config.json): ``fpg`` (mode, strength, hidden),
    ``image_size`` and ``teacher`` (teacher, weights, image_size)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FoproError(f"--fpg {run_dir} is not a folder: give the output folder of a `fopro distill` run")
    if not (run_dir / RUN_CONFIG).is_file():
        raise FoproError(f"--fpg {run_dir} has no {RUN_CONFIG}: give the output folder of a `fopro distill` run")
    config = load_run_config(run_dir)
    if config.method != "fopro":
        raise FoproError(f"--fpg {run_dir}: the run used --method {config.method}, which has no Fourier Prompt Generator")
    return {
        "fpg": {"mode": config.fpg_mode, "strength": config.fpg_strength, "hidden": config.fpg_hidden},
        "image_size": config.image_size,
        "teacher": {"teacher": config.teacher, "weights": config.teacher_weights, "image_size": config.teacher_image_size},
    }


def load_run_fpg(run_dir: str | Path) -> FourierPromptGenerator:
    """The trained FPG of a distillation run (RUN_DIR/fpg.safetensors + RUN_DIR/config.json), in eval mode."""
    config = read_run_config(run_dir)
    path = Path(run_dir) / RUN_FPG
    if not path.is_file():
        raise FoproError(f"--fpg {run_dir} has no {RUN_FPG}: the run has not saved its Fourier Prompt Generator yet")
    spec = config["fpg"]
    fpg = FourierPromptGenerator(config["image_size"], mode=spec["mode"], strength=float(spec["strength"]),
                                 hidden=int(spec.get("hidden", 16)))
    state_dict = read_state_dict(path, option="--fpg")
    try:
        fpg.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:200]
        raise FoproError(f"{path} does not match the FPG described in {RUN_CONFIG} ({first}): the run folder is inconsistent") from err
    return fpg.eval()


def radial_profile(mask: torch.Tensor, edges: Sequence[Sequence[float]]) -> list[float]:
    """Mean of an (H, W) unshifted-grid mask over each band."""
    h, w = mask.shape[-2:]
    masks = band_masks(h, w, edges).to(torch.float64)
    sums = (masks * mask.to(torch.float64)).sum(dim=(1, 2))
    return [float(v) for v in sums / masks.sum(dim=(1, 2)).clamp(min=1)]


def _direction(value: float) -> str:
    if value > 1 + UNCHANGED_TOLERANCE:
        return "amplified"
    if value < 1 - UNCHANGED_TOLERANCE:
        return "diminished"
    return "unchanged"


@torch.no_grad()
def fpg_masks(fpg: FourierPromptGenerator, images: torch.Tensor, labels: np.ndarray, num_classes: int,
              batch_size: int, progress: ProgressFn) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Mean mask (H, W) over all images, per-class mean masks (C, H, W) and per-class counts."""
    n = fpg.image_size
    total = torch.zeros(n, n, dtype=torch.float64)
    per_class = torch.zeros(num_classes, n, n, dtype=torch.float64)
    label_tensor = torch.from_numpy(labels)
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].float() / 255.0
        masks = fpg.mask(x).to(torch.float64)[:, 0].expand(len(x), n, n)
        total += masks.sum(dim=0)
        per_class.index_add_(0, label_tensor[start : start + batch_size], masks)
        progress("FPG masks", start + len(x), len(images))
    counts = np.bincount(labels, minlength=num_classes)
    per_class /= torch.from_numpy(np.maximum(counts, 1)).to(torch.float64)[:, None, None]
    return total / len(images), per_class, counts


def _compare_with_probe(probe: dict, profile: list[float], run_teacher: str | None) -> tuple[dict, list[str]]:
    min_effect = float((probe.get("preference") or {}).get("min_effect", ProbeOptions.min_effect))
    gains = [suggested_gain(band_summary(probe["results"], b), min_effect) for b in range(len(probe["bands"]))]
    wanted = [(b, "amplified" if g > 1 else "diminished") for b, g in enumerate(gains) if g != 1]
    agree = [b for b, direction in wanted if _direction(profile[b]) == direction]
    notes = []
    probe_teacher = (probe.get("teacher") or {}).get("teacher")
    if run_teacher and probe_teacher and probe_teacher != run_teacher:
        notes.append(f"the probe was run on teacher {probe_teacher} but the run distils {run_teacher}: compare with care")
    comparison = {
        "teacher": probe_teacher,
        "split": probe.get("split"),
        "suggested_gains": gains,
        "bands_with_preference": [b for b, _ in wanted],
        "agreeing_bands": agree,
        "agreement": (len(agree) / len(wanted)) if wanted else None,
        "verdict": probe.get("verdict"),
    }
    return comparison, notes


def fpg_verdict(bands: list[dict], comparison: dict | None) -> str:
    def listed(direction: str) -> str:
        chosen = [b for b in bands if b["direction"] == direction]
        return ", ".join(f"band {b['band']} ({b['range'][0]:.2f}-{b['range'][1]:.2f}) x{b['mean_gain']:.2f}" for b in chosen)

    amplified, diminished = listed("amplified"), listed("diminished")
    parts = [f"the learned FPG amplifies {amplified}" if amplified else "the learned FPG amplifies no band",
             f"diminishes {diminished}" if diminished else "diminishes no band"]
    if comparison is not None:
        if comparison["agreement"] is None:
            parts.append("the probe had no band preference to compare with")
        else:
            parts.append(f"it agrees with the probe on {len(comparison['agreeing_bands'])} of "
                         f"{len(comparison['bands_with_preference'])} bands the probe had a preference for")
    return "; ".join(parts)


def probe_fpg(
    run_dir: str | Path,
    data_options: DataOptions,
    options: ProbeOptions = ProbeOptions(),
    out_dir: str | Path | None = None,
    probe_json: str | Path | None = None,
    progress: ProgressFn = no_progress,
) -> dict:
    """What a trained FPG does to the spectrum on one split; fpg.json and fpg_mask.png in out_dir.

    With ``probe_json`` its bands are used for the radial profile (so the two line up) and the FPG's
    amplified / diminished bands are compared with the gains :func:`band_gains_from_probe` suggests.
    """
    edges, _ = check_options(options)
    config = read_run_config(run_dir)
    fpg = load_run_fpg(run_dir)
    notes: list[str] = []
    if not data_options.given():  # the run's own data (its config.json)
        data_options = load_run_config(Path(run_dir)).data_options()
        notes.append(f"data: the run's own ({data_options.describe()})")
    probe = read_probe_json(probe_json) if probe_json is not None else None
    if probe is not None:
        edges = probe["bands"]
        notes.append(f"radial profile over the probe's {len(edges)} bands (--bands ignored)")
    check_bands_fit(edges, fpg.image_size, bool(options.log_bands))
    splits = load_splits(data_options, splits=(options.split,))
    manifest = splits.require(options.split, f"give --{options.split}-csv or a {options.split}/ folder, or pick another --split")
    images, labels, probed_manifest = load_probe_images(manifest, fpg.image_size, options, data_options.skip_bad_images)
    notes += probed_manifest.notes
    classes = splits.classes
    mean_mask, class_masks, counts = fpg_masks(fpg, images, labels, len(classes), options.batch_size, progress)

    profile = radial_profile(mean_mask, edges)
    bands = [{"band": b, "range": list(edges[b]), "centre": (edges[b][0] + edges[b][1]) / 2, "mean_gain": profile[b],
              "direction": _direction(profile[b])} for b in range(len(edges))]
    run_teacher = config["teacher"].get("teacher")
    comparison = None
    if probe is not None:
        comparison, probe_notes = _compare_with_probe(probe, profile, run_teacher)
        notes += probe_notes
    result = {
        "format": FPG_FORMAT,
        "run_dir": str(run_dir),
        "fpg": {"mode": fpg.mode, "strength": fpg.strength, "hidden": fpg.hidden, "image_size": fpg.image_size},
        "teacher": config["teacher"],
        "data": data_options.describe(),
        "split": options.split,
        "num_images": int(len(labels)),
        "bands": [list(e) for e in edges],
        "band_centres": [(lo + hi) / 2 for lo, hi in edges],
        "radial_profile": bands,
        "per_class_radial_profile": {classes[c]: radial_profile(class_masks[c], edges) for c in range(len(classes)) if counts[c]},
        "mask": {"min": float(mean_mask.min()), "max": float(mean_mask.max()), "mean": float(mean_mask.mean()),
                 "bounds": [1 - fpg.strength, 1 + fpg.strength]},
        "probe": None if comparison is None else {**comparison, "path": str(probe_json)},
        "verdict": fpg_verdict(bands, comparison),
        "notes": notes,
    }
    if out_dir is not None:
        write_fpg(result, mean_mask, Path(out_dir), probe)
    return result


def write_fpg(result: dict, mean_mask: torch.Tensor, out_dir: Path, probe: dict | None = None) -> dict[str, Path]:
    """fpg.json and fpg_mask.png (the centred mean mask, its radial profile, the probe's deltas) in ``out_dir``."""
    n = mean_mask.shape[-1]
    axis = (torch.fft.fftshift(torch.fft.fftfreq(n, dtype=torch.float64)) / 0.5).numpy()
    files = {"json": out_dir / "fpg.json", "plot": out_dir / "fpg_mask.png"}
    write_json(files["json"], result)
    plot_fpg_mask(fftshift2(mean_mask).numpy(), axis, result, files["plot"], probe=probe)
    return files
