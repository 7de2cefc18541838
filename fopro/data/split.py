"""`fopro data split`: train / val / test CSVs from ONE metadata CSV (or a flat ImageFolder), stratified by class
and grouped by patient or lesion, so that no group has images on two sides of a split (a leak that inflates
every number: HAM10000 has several images of most lesions).

Per class, the groups whose images are mostly of that class are shuffled (seeded) and taken in that order:
first for test, then val, until each holds the asked number of images (a fraction of the class, or a count per
class); a group is never cut, so a split can exceed its count by less than one group. The rest is train
(optionally subsampled to a long-tail factor). With ``folds`` the rest is instead dealt, group by group, into K
folds of balanced class counts, and fold k's val is fold k, its train the other folds.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fopro.data.longtail import check_imbalance, longtail_indices
from fopro.data.sources import IMAGE_COLUMN_CANDIDATES, LABEL_COLUMN_CANDIDATES, is_image_file, pick_column, read_csv_records
from fopro.errors import FoproError
from fopro.io import check_output_folder, write_text

SPLIT_NAMES = ("train", "val", "test")


@dataclass
class SplitOptions:
    label_column: str | None = None
    group_column: str | None = None  # patient / lesion id; None: every image is its own group
    image_column: str | None = None
    val: float | None = None  # fraction of each class
    test: float | None = None
    val_per_class: int | None = None  # or images per class
    test_per_class: int | None = None
    imbalance: float | None = None  # subsample train to this long-tail factor
    folds: int | None = None
    seed: int = 0

    def check(self) -> None:
        for name, fraction, count in (("val", self.val, self.val_per_class), ("test", self.test, self.test_per_class)):
            if fraction is not None and count is not None:
                raise FoproError(f"give --{name} (a fraction) or --{name}-per-class (a count), not both")
            if fraction is not None and not 0 <= fraction < 1:
                raise FoproError(f"--{name} {fraction} must be a fraction in [0, 1), e.g. 0.15")
            if count is not None and count < 0:
                raise FoproError(f"--{name}-per-class {count} must not be negative")
        if (self.val or 0) + (self.test or 0) >= 1:
            raise FoproError(f"--val {self.val} and --test {self.test} leave nothing for train: their sum must be below 1")
        if self.folds is not None and self.folds < 2:
            raise FoproError(f"--folds {self.folds} must be at least 2")
        if self.imbalance is not None:
            check_imbalance(self.imbalance)


@dataclass
class Table:
    """The rows of the source, their labels and groups, and how to write them back."""

    header: list[str]
    rows: list[dict[str, str]]
    labels: list[str]
    groups: list[str]
    source: str


def read_table(source: Path, options: SplitOptions) -> Table:
    """A metadata CSV, or a flat ImageFolder (ROOT/<class>/<image>: one row per image, columns image and label)."""
    if source.is_dir():
        rows = [{"image": str(path.relative_to(source)), "label": folder.name}
                for folder in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
                for path in sorted(folder.rglob("*")) if is_image_file(path, folder)]
        if not rows:
            raise FoproError(f"{source} holds no class folders with images: give ROOT/<class>/<image> or a metadata CSV")
        if options.group_column:
            raise FoproError(f"--group-column needs a metadata CSV; {source} is a folder of images (each image is its own group)")
        return Table(["image", "label"], rows, [r["label"] for r in rows], [r["image"] for r in rows], str(source))
    if not source.is_file():
        raise FoproError(f"{source} does not exist: give a metadata CSV or a folder ROOT/<class>/<image>")
    header, records = read_csv_records(source)
    label = pick_column(source, header, options.label_column, LABEL_COLUMN_CANDIDATES, "--label-column")
    image = pick_column(source, header, options.image_column, IMAGE_COLUMN_CANDIDATES, "--image-column")
    group = options.group_column
    if group is not None and group not in header:
        raise FoproError(f"{source} has no column '{group}' (--group-column); its columns are: {', '.join(header)}")
    for line, record in enumerate(records, start=2):
        empty = next((c for c in (image, label, group) if c is not None and not record[c]), None)
        if empty is not None:
            raise FoproError(f"{source}:{line}: the '{empty}' cell is empty: fill it in or remove the row")
    groups = [r[group] if group else r[image] for r in records]
    return Table(header, records, [r[label] for r in records], groups, str(source))


def _group_classes(table: Table) -> dict[str, str]:
    """Each group's class: the most frequent label of its images (ties: the first seen)."""
    labels: dict[str, Counter] = defaultdict(Counter)
    for label, group in zip(table.labels, table.groups):
        labels[group][label] += 1
    return {group: counts.most_common(1)[0][0] for group, counts in labels.items()}


def _take(groups: list[str], sizes: dict[str, int], wanted: int) -> tuple[list[str], list[str]]:
    """The first groups (in order) until `wanted` images are reached, and the rest."""
    taken, total = [], 0
    for index, group in enumerate(groups):
        if total >= wanted:
            return taken, groups[index:]
        taken.append(group)
        total += sizes[group]
    return taken, []


def assign_groups(table: Table, options: SplitOptions) -> dict[str, str]:
    """{group: "train" | "val" | "test" | "fold<k>"}."""
    rng = np.random.default_rng(options.seed)
    sizes = Counter(table.groups)
    by_class: dict[str, list[str]] = defaultdict(list)
    for group, label in _group_classes(table).items():
        by_class[label].append(group)
    assignment: dict[str, str] = {}
    fold_counts = np.zeros(options.folds or 0)
    for label in sorted(by_class):
        groups = sorted(by_class[label])
        groups = [groups[i] for i in rng.permutation(len(groups))]
        images = sum(sizes[g] for g in groups)
        rest = groups
        for name, fraction, count in (("test", options.test, options.test_per_class), ("val", options.val, options.val_per_class)):
            wanted = count if count is not None else math.floor((fraction or 0) * images + 0.5)
            taken, rest = _take(rest, sizes, wanted)
            assignment.update({g: name for g in taken})
        if options.folds:
            fold_counts[:] = 0
            for group in rest:  # the fold with the fewest images of this class so far (ties: the lowest)
                fold = int(np.argmin(fold_counts))
                fold_counts[fold] += sizes[group]
                assignment[group] = f"fold{fold}"
        else:
            assignment.update({g: "train" for g in rest})
    return assignment


def _csv(header: list[str], rows: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _subsample(table: Table, indices: list[int], imbalance: float, seed: int) -> list[int]:
    classes = sorted(set(table.labels[i] for i in indices))
    labels = [classes.index(table.labels[i]) for i in indices]
    return [indices[k] for k in longtail_indices(labels, len(classes), imbalance, seed)]


def leaked_groups(groups: list[str], files: dict[str, list[int]], names: list[str]) -> int:
    """How many groups have images in more than one of the files `names` (one experiment's splits)."""
    sides: dict[str, set[str]] = defaultdict(set)
    for name in names:
        for i in files.get(name, []):
            sides[groups[i]].add(name)
    return sum(1 for found in sides.values() if len(found) > 1)


def split_dataset(source: str | Path, out_dir: str | Path, options: SplitOptions) -> dict[str, Any]:
    """Write OUT/{train,val,test}.csv (or OUT/fold<k>/{train,val}.csv and OUT/test.csv) and return the summary."""
    options.check()
    source, out_dir = Path(source), Path(out_dir)
    check_output_folder(out_dir, "--out", [source if source.is_dir() else None])
    table = read_table(source, options)
    assignment = assign_groups(table, options)
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(table.groups):
        members[assignment[group]].append(index)
    files: dict[str, list[int]] = {}
    if options.folds:
        for k in range(options.folds):
            train = [i for f in range(options.folds) if f != k for i in members[f"fold{f}"]]
            if options.imbalance is not None:
                train = _subsample(table, train, options.imbalance, options.seed)
            files[f"fold{k}/train"] = sorted(train)
            files[f"fold{k}/val"] = members[f"fold{k}"]
        files["test"] = members["test"]
    else:
        train = members["train"]
        files = {"train": _subsample(table, train, options.imbalance, options.seed) if options.imbalance is not None else train,
                 "val": members["val"], "test": members["test"]}
    files = {name: sorted(indices) for name, indices in files.items() if indices}
    for name, indices in files.items():
        write_text(out_dir / f"{name}.csv", _csv(table.header, [table.rows[i] for i in indices]))
    experiments = [[f"fold{k}/train", f"fold{k}/val", "test"] for k in range(options.folds)] if options.folds else [list(SPLIT_NAMES)]
    counts = {name: Counter(table.labels[i] for i in indices) for name, indices in files.items()}
    return {
        "source": table.source,
        "out": str(out_dir),
        "files": {name: str(out_dir / f"{name}.csv") for name in files},
        "counts": {name: dict(sorted(c.items())) for name, c in counts.items()},
        "groups": {name: len({table.groups[i] for i in indices}) for name, indices in files.items()},
        "group_column": options.group_column,
        "groups_on_two_sides": sum(leaked_groups(table.groups, files, names) for names in experiments),
        "seed": options.seed,
        "notes": shortfalls(table, counts, options),
    }


def shortfalls(table: Table, counts: dict[str, Counter], options: SplitOptions) -> list[str]:
    """Classes too small for the counts asked: a split got fewer images, or train got none."""
    notes = []
    total = Counter(table.labels)
    for name, count in (("test", options.test_per_class), ("val", options.val_per_class)):
        for label in sorted(total):
            got = counts.get(name, Counter())[label]
            if count is not None and got < count:
                notes.append(f"warning: class {label} has {total[label]} images: {name} got {got} of the {count} asked")
    trains = [name for name in counts if name.endswith("train")]
    for label in sorted(total):
        if trains and all(counts[name][label] == 0 for name in trains):
            notes.append(f"warning: class {label} has no training image left: ask for fewer val / test images")
    return notes
