"""How long-tailed a dataset is: per-split class counts, imbalance ratio, head/medium/tail membership."""

from __future__ import annotations

from fopro.data.sources import DataOptions, load_splits
from fopro.metrics import DEFAULT_GROUPS, LongTailGroups


def data_info(options: DataOptions, groups: LongTailGroups = DEFAULT_GROUPS) -> dict:
    """Counts per split and class; groups are defined by the training counts when a train split exists."""
    splits = load_splits(options)
    counts = {name: manifest.counts_by_name() for name, manifest in splits.manifests.items()}
    result: dict = {"classes": splits.classes, "splits": counts, "sources": {n: m.source for n, m in splits.manifests.items()}}
    if "train" in counts:
        train = counts["train"]
        nonzero = [c for c in train.values() if c > 0]
        result["imbalance_ratio"] = (min(nonzero) / max(nonzero)) if nonzero else None
        result["groups"] = {name: groups.group_of(count) for name, count in train.items()}
        result["group_definition"] = groups.definitions()
    if options.imbalance is not None:
        result["imbalance_applied"] = options.imbalance
    return result
