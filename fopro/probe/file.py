"""The probe.json contract: what `fopro probe` writes and what the rest of fopro reads (torch-free).

``read_probe_json`` checks a probe.json for the keys fopro uses; ``band_summary`` / ``suggested_gain`` turn its
rows into one preference per band; ``band_gains_from_probe`` turns a probe.json into per-band gains for
``fopro distill --probe-init`` (the only thing training reads from the probe).
"""


from __future__ import annotations

import json
from pathlib import Path

from fopro.bands import band_edges
from fopro.errors import FoproError

DEFAULT_MIN_EFFECT = 0.01  # a change counts only above max(this, 2 standard errors): 1 point of balanced accuracy


FORMAT = "fopro-probe/1"
FPG_FORMAT = "fopro-probe-fpg/1"


def delta_of(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else float(value - reference)


def band_entry(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {"gain": row["gain"], "delta": row["delta_balanced_accuracy"], "se": row.get("se_delta_balanced_accuracy"),
            "tail_delta": row.get("delta_tail_balanced_accuracy"), "knn_delta": row.get("delta_knn_balanced_accuracy"),
            "cosine": row.get("cosine")}


def effect_threshold(entry: dict, min_effect: float) -> float:
    """An effect counts when |delta| exceeds max(min_effect, 2 standard errors of the paired difference)."""
    return max(min_effect, 2.0 * (entry.get("se") or 0.0))


def band_summary(results: list[dict], band: int) -> dict:
    """For one band: the best amplifying gain (> 1), the removal (smallest gain < 1) and the best diminishing gain (< 1)."""
    rows = [r for r in results if r["band"] == band and r["delta_balanced_accuracy"] is not None]
    up = [r for r in rows if r["gain"] > 1]
    down = [r for r in rows if r["gain"] < 1]
    best = lambda candidates: max(candidates, key=lambda r: (r["delta_balanced_accuracy"], -abs(r["gain"] - 1)), default=None)  # noqa: E731
    return {
        "amplify": band_entry(best(up)),
        "remove": band_entry(min(down, key=lambda r: r["gain"], default=None)),
        "diminish": band_entry(best(down)),
    }


def suggested_gain(summary: dict, min_effect: float) -> float:
    """The rule of :func:`band_gains_from_probe` for one band (see there)."""
    helps = [e for e in (summary["amplify"], summary["diminish"]) if e is not None and e["delta"] > effect_threshold(e, min_effect)]
    if not helps:
        return 1.0
    return float(max(helps, key=lambda e: e["delta"])["gain"])


def read_probe_json(path: str | Path, option: str = "--probe-json") -> dict:
    """A probe.json written by ``fopro probe``, checked for the keys used here."""
    path = Path(path)
    if not path.is_file():
        raise FoproError(f"{option} {path} does not exist: give the probe.json written by `fopro probe --out DIR`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FoproError(f"{option} {path} is not valid JSON ({err}): give the probe.json written by `fopro probe`") from err
    if not isinstance(data, dict) or not all(k in data for k in ("bands", "gains", "results")):
        raise FoproError(f"{option} {path} is not a probe.json (needs 'bands', 'gains' and 'results'): run `fopro probe --out DIR`")
    try:
        data["bands"] = [(float(lo), float(hi)) for lo, hi in data["bands"]]
        for row in data["results"]:
            row["band"], row["gain"] = int(row["band"]), float(row["gain"])
            delta = row["delta_balanced_accuracy"]
            row["delta_balanced_accuracy"] = None if delta is None else float(delta)
    except (TypeError, ValueError, KeyError) as err:
        raise FoproError(f"{option} {path} has malformed bands or results ({err}): write it again with `fopro probe`") from err
    return data


def band_gains_from_probe(probe_json_path: str | Path, n_bands: int | None = None) -> tuple[list[tuple[float, float]], list[float]]:
    """Per-band gains for ``FourierPromptGenerator.init_from_band_gains`` from a probe.json.

    The rule, per probed band, on the NCM balanced accuracy (``delta_balanced_accuracy``, change vs clean):
    take the best amplifying gain (> 1) and the best diminishing gain (< 1, removal included); of those whose
    gain beats the noise (delta > max(``min_effect``, 2 x its standard error ``se_delta_balanced_accuracy``)),
    the band takes the probed gain with the larger delta (> 1 where amplification helped most, < 1 where
    removing/diminishing did); otherwise 1 (leave the band alone: removal that only HURTS says the teacher
    needs the band, not that it should be amplified). The FPG clips gains into [1 - 0.95 s, 1 + 0.95 s].

    With ``n_bands`` different from the probe's, bands are rebuilt with ``band_edges(n_bands, log)`` (the
    probe's spacing) and each new band takes the gain of the probe band holding its centre.
    """
    data = read_probe_json(probe_json_path, option="--probe-init")
    edges = data["bands"]
    min_effect = float((data.get("preference") or {}).get("min_effect", DEFAULT_MIN_EFFECT))
    gains = [suggested_gain(band_summary(data["results"], band), min_effect) for band in range(len(edges))]
    if n_bands is None or n_bands == len(edges):
        return edges, gains
    new_edges = band_edges(n_bands, log=bool(data.get("log_bands", False)))
    new_gains = []
    for low, high in new_edges:
        centre = (low + high) / 2
        source = next((i for i, (lo, hi) in enumerate(edges) if lo <= centre < hi), len(edges) - 1)
        new_gains.append(gains[source])
    return new_edges, new_gains
