"""What a probe found, in words and numbers: the per-band preference (which bands, removed, diminished or
amplified, change the teacher's class separation beyond the noise), the one-line verdict, the linear probe's line."""

from __future__ import annotations

from typing import Sequence

from fopro.data.augment import AugmentConfig
from fopro.probe.file import band_summary, effect_threshold, suggested_gain


def preference(results: list[dict], edges: Sequence[Sequence[float]], min_effect: float) -> dict:
    """Per-band effects, the bands whose amplification helps / removal hurts / diminishing helps, suggested gains."""
    per_band = []
    for band, (low, high) in enumerate(edges):
        summary = band_summary(results, band)
        per_band.append({"band": band, "range": [low, high], **summary, "suggested_gain": suggested_gain(summary, min_effect)})

    def ranked(kind: str, sign: int) -> list[dict]:
        chosen = [{"band": b["band"], "range": b["range"], **b[kind]} for b in per_band
                  if b[kind] is not None and sign * b[kind]["delta"] > effect_threshold(b[kind], min_effect)]
        return sorted(chosen, key=lambda e: -sign * e["delta"])

    amplify, remove, diminish = ranked("amplify", 1), ranked("remove", -1), ranked("diminish", 1)
    return {
        "metric": "balanced_accuracy (NCM), change vs clean images",
        "min_effect": min_effect,
        "effect_rule": "a change counts when |delta| > max(min_effect, 2 x se), se = standard error of the paired "
                       "per-image change in balanced accuracy",
        "amplify_helps": amplify,
        "removal_hurts": remove,
        "diminish_helps": diminish,
        "relies_most_on": remove[0]["band"] if remove else None,
        "best_amplified": amplify[0]["band"] if amplify else None,
        "suggested_gains": [b["suggested_gain"] for b in per_band],
        "per_band": per_band,
    }


def band_text(entry: dict) -> str:
    low, high = entry["range"]
    return f"band {entry['band']} ({low:.2f}-{high:.2f} of Nyquist)"


def points_text(value: float | None) -> str:
    """A change in balanced accuracy as signed points, e.g. +1.5."""
    return "n/a" if value is None else f"{100 * value:+.1f}"


def verdict_line(teacher: str, clean: dict, pref: dict, gains: list[float]) -> str:
    """One line: what removing and amplifying bands does to the teacher's class separation."""
    parts = [f"{teacher}: clean balanced accuracy {100 * clean['balanced_accuracy']:.1f}%"]
    tail = lambda e: f", tail {points_text(e['tail_delta'])}" if e["tail_delta"] is not None else ""  # noqa: E731
    if not any(g < 1 for g in gains):
        parts.append("no removal or diminishing gain probed (add 0 to --gains)")
    elif pref["removal_hurts"]:
        e = pref["removal_hurts"][0]
        how = "removing it" if e["gain"] == 0 else f"scaling it x{e['gain']:g}"
        parts.append(f"relies most on {band_text(e)}: {how} changes it by {points_text(e['delta'])} points{tail(e)}")
    else:
        parts.append("no band's removal lowers it beyond the noise")
    if pref["amplify_helps"]:
        e = pref["amplify_helps"][0]
        parts.append(f"amplifying {band_text(e)} x{e['gain']:g} helps most: {points_text(e['delta'])} points{tail(e)}")
    elif any(g > 1 for g in gains):
        parts.append("no amplification helps beyond the noise")
    if pref["diminish_helps"]:
        e = pref["diminish_helps"][0]
        how = f"removing {band_text(e)}" if e["gain"] == 0 else f"diminishing {band_text(e)} x{e['gain']:g}"
        parts.append(f"{how} helps: {points_text(e['delta'])} points")
    return "; ".join(parts)


def extra_notes(clean: dict, gains: list[float], num_probed: int, min_effect: float) -> list[str]:
    notes = []
    if 1.0 in gains:
        notes.append("gain 1 leaves the images unchanged: its rows repeat the clean scores")
    chance = 1.0 / num_probed
    if clean["balanced_accuracy"] is not None and clean["balanced_accuracy"] <= chance + min_effect:
        notes.append(f"the clean balanced accuracy {100 * clean['balanced_accuracy']:.1f}% is at or below chance "
                     f"({100 * chance:.0f}%): the teacher's embeddings do not separate these classes, so its "
                     "band preferences say little (is it a pretrained teacher?)")
    return notes


def linear_probe_line(linear: dict) -> str:
    """One line: e.g. "linear probe (trained on train, 4 augmented views): val balanced accuracy 84.2%, ..."."""
    views, plural = linear["views"], "s" if linear["views"] > 1 else ""
    augmented = linear.get("augmentation") != AugmentConfig().as_dict()
    how = f"{views} augmented view{plural}" if augmented else f"{views} view{plural}, no augmentation"
    percent = lambda value: "n/a" if value is None else f"{100 * value:.1f}%"  # noqa: E731
    return (f"linear probe (trained on {linear['trained_on']}, {how}): {linear['evaluated_on']} balanced accuracy "
            f"{percent(linear['balanced_accuracy'])}, tail recall {percent(linear['tail_recall'])}, "
            f"macro-F1 {percent(linear['macro_f1'])}")
