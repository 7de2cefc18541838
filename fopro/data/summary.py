"""How long-tailed a dataset is: per-split class counts, imbalance ratio, head/medium/tail membership."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from fopro.data.sources import SPLITS, DataOptions, load_splits, read_csv_records
from fopro.errors import FoproError
from fopro.metrics import DEFAULT_GROUPS, LongTailGroups

MAX_LISTED = 5


def data_info(options: DataOptions, groups: LongTailGroups = DEFAULT_GROUPS, group_column: str | None = None) -> dict:
    """Counts per split and class; groups are defined by the training counts when a train split exists. With
    `group_column` (patient / lesion id in the split CSVs), the groups that have images in two splits (a leak)."""
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
    if group_column is not None:
        result["leakage"] = split_leakage(options, group_column)
    return result


def split_leakage(options: DataOptions, group_column: str) -> dict:
    """The groups (values of `group_column`) found in more than one split's CSV."""
    csvs = {split: Path(path) for split in SPLITS if (path := options.csv_for(split)) is not None}
    if not csvs:
        raise FoproError("--group-column is read from the split CSVs: give --train-csv / --val-csv / --test-csv")
    sides: dict[str, set[str]] = defaultdict(set)
    for split, path in csvs.items():
        header, records = read_csv_records(path)
        if group_column not in header:
            raise FoproError(f"{path} has no column '{group_column}' (--group-column); its columns are: {', '.join(header)}")
        for record in records:
            sides[record[group_column]].add(split)
    leaked = sorted(group for group, found in sides.items() if len(found) > 1)
    return {"group_column": group_column, "groups": len(sides), "groups_on_two_sides": len(leaked),
            "examples": {group: sorted(sides[group]) for group in leaked[:MAX_LISTED]}}
