"""Data sources (ImageFolder tree, CSV manifests, ISIC-2019 long-tailed CSVs) -> one Manifest per split."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from fopro.data.cache import is_cache, read_index
from fopro.data.dicom import has_dicom_preamble
from fopro.data.longtail import check_imbalance, longtail_indices
from fopro.data.manifest import DecodeOptions, Manifest, check_class_names
from fopro.errors import FoproError

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
# The `finding` column of the FoPro-KD ISIC-2019 split files: classes ordered by training frequency.
ISIC2019_CLASSES = ["NV", "MEL", "BCC", "BKL", "AK", "SCC", "VASC", "DF"]
ISIC2019_COLUMNS = ("image", "finding_name", "finding")
IMAGE_COLUMN_CANDIDATES = ("image", "image_id", "image_path", "path", "file", "filename", "img")
LABEL_COLUMN_CANDIDATES = ("label", "class", "class_name", "target", "diagnosis", "finding", "y")
MAX_LISTED = 5


@dataclass
class DataOptions:
    """Where the images and labels are; the same options on every command that reads data."""

    data: Path | None = None
    train_csv: Path | None = None
    val_csv: Path | None = None
    test_csv: Path | None = None
    images: Path | None = None
    image_column: str | None = None
    label_column: str | None = None
    classes: list[str] | None = None
    imbalance: float | None = None
    seed: int = 0
    skip_bad_images: bool = False
    decode: DecodeOptions = DecodeOptions()

    def csv_for(self, split: str) -> Path | None:
        return {"train": self.train_csv, "val": self.val_csv, "test": self.test_csv}[split]

    def given(self) -> bool:
        return self.data is not None or any(self.csv_for(s) for s in SPLITS)

    def describe(self) -> str:
        if self.data is not None:
            return str(self.data)
        return ", ".join(f"{s}={self.csv_for(s)}" for s in SPLITS if self.csv_for(s))


@dataclass
class Splits:
    """The manifests of the available splits, with one class list shared by all of them."""

    manifests: dict[str, Manifest]
    classes: list[str]
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, split: str) -> Manifest:
        return self.manifests[split]

    def __contains__(self, split: str) -> bool:
        return split in self.manifests

    def require(self, split: str, hint: str) -> Manifest:
        if split not in self.manifests:
            raise FoproError(f"no {split} split in the data: {hint}")
        manifest = self.manifests[split]
        if len(manifest) == 0:
            raise FoproError(f"the {split} split is empty ({manifest.source}): add images or choose another split")
        return manifest


def load_splits(
    options: DataOptions,
    splits: tuple[str, ...] = SPLITS,
    classes: list[str] | None = None,
) -> Splits:
    """Read the requested splits that exist; `classes` (e.g. a checkpoint's) fixes the class order."""
    if options.data is not None and any(options.csv_for(s) for s in SPLITS):
        raise FoproError("give either --data ROOT or --train-csv/--val-csv/--test-csv, not both")
    if not options.given():
        raise FoproError("no data given: pass --data ROOT (ImageFolder) or --train-csv/--val-csv/--test-csv with --images DIR")
    model_classes = classes is not None
    classes = classes or options.classes
    default_classes = None
    cache = read_index(Path(options.data)) if is_cache(options.data) else None
    if cache is not None:  # a prepared cache (fopro data prepare): its images are decoded already
        cache.check_decode(options.decode)
        raw = cache.rows(splits)
        default_classes = cache.classes
    elif options.data is not None:
        raw = _read_image_folder(Path(options.data), splits)
    else:
        raw, isic = _read_csvs(options, splits, classes)
        # ISIC-2019 LT labels are indices into ISIC2019_CLASSES: keep that order (and all 8 classes)
        default_classes = list(ISIC2019_CLASSES) if isic else None
    if not raw:
        raise FoproError(f"none of the splits {', '.join(splits)} was found in {options.describe()}")
    class_list = classes or default_classes or _class_list(raw)
    check_class_names(class_list, options.describe())
    origin = "the classes of the model" if model_classes else "the classes"
    manifests = {split: _to_manifest(split, rows, class_list, source, origin) for split, (rows, source) in raw.items()}
    if cache is not None:
        for split, manifest in manifests.items():
            manifest.prepared = cache.images(split)
            manifest.notes.extend(cache.splits[split].notes)
    if options.imbalance is not None and "train" in manifests:
        manifests["train"] = subsample_longtail(manifests["train"], options.imbalance, options.seed)
    for manifest in manifests.values():
        manifest.decode = options.decode
    return Splits(manifests=manifests, classes=class_list)


def subsample_longtail(manifest: Manifest, imbalance: float, seed: int) -> Manifest:
    check_imbalance(imbalance)
    absent = [name for name, n in zip(manifest.classes, manifest.class_counts()) if n == 0]
    if absent:
        raise FoproError(
            f"class(es) {', '.join(absent[:MAX_LISTED])} have no training image in {manifest.source or 'the train split'}, "
            f"so --imbalance {imbalance} has nothing to keep for them: add training images or leave them out of --classes"
        )
    return manifest.subset(longtail_indices(manifest.labels, manifest.num_classes, imbalance, seed))


Rows = list[tuple[Path, str]]


def _class_list(raw: dict[str, tuple[Rows, str]]) -> list[str]:
    """Class names in training order: the train split's when present, else all splits' (sorted)."""
    source_splits = ["train"] if "train" in raw else list(raw)
    names: set[str] = set()
    for split in source_splits:
        names.update(label for _, label in raw[split][0])
    if all(name.isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


def _to_manifest(split: str, rows: Rows, classes: list[str], source: str, origin: str = "the classes") -> Manifest:
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for _, label in rows if label not in index})
    if unknown:
        fix = (", so it cannot predict them: leave those images out or relabel them" if origin != "the classes"
               else ": fix the labels or the class list")
        raise FoproError(
            f"{source}: {split} label(s) {', '.join(unknown[:MAX_LISTED])} are not among {origin} "
            f"({', '.join(classes[:10])}{'...' if len(classes) > 10 else ''}){fix}"
        )
    return Manifest(
        paths=[path for path, _ in rows],
        labels=[index[label] for _, label in rows],
        classes=list(classes),
        split=split,
        source=source,
    )


def _read_image_folder(root: Path, splits: tuple[str, ...]) -> dict[str, tuple[Rows, str]]:
    if not root.exists():
        raise FoproError(f"--data {root} does not exist: give the folder that holds train/, val/ and test/")
    if not root.is_dir():
        raise FoproError(f"--data {root} is not a folder: give the folder that holds train/, val/ and test/")
    present = [s for s in splits if (root / s).is_dir()]
    others = [s for s in SPLITS if s not in splits and (root / s).is_dir()]
    if not present and others:
        raise FoproError(
            f"--data {root} has no {' or '.join(s + '/' for s in splits)} folder (it has {', '.join(s + '/' for s in others)}): "
            f"add {'/'.join(splits)}/<class name>/<image>, or choose another --split"
        )
    if not present:
        raise FoproError(
            f"--data {root} has none of the split folders {', '.join(s + '/' for s in splits)}: "
            "lay it out as ROOT/<split>/<class name>/<image>"
        )
    return {split: (_read_split_folder(root / split), str(root / split)) for split in present}


def _read_split_folder(folder: Path) -> Rows:
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise FoproError(f"{folder} has no class folders: put images in {folder}/<class name>/")
    _check_links(folder, class_dirs)
    rows: Rows = []
    empty = []
    for class_dir in class_dirs:
        images = sorted(p for p in class_dir.rglob("*") if is_image_file(p, class_dir))
        if not images:
            empty.append(class_dir.name)
        rows.extend((path, class_dir.name) for path in images)
    if empty:
        raise FoproError(
            f"{folder}: class folder(s) {', '.join(empty[:MAX_LISTED])} hold no images "
            f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder"
        )
    return rows


def is_image_file(path: Path, root: Path) -> bool:
    """A regular file (not a pipe or a device) with an image suffix, or a DICOM file without one, outside hidden
    files and folders under root."""
    hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
    if hidden or not path.is_file():
        return False
    return path.suffix.lower() in IMAGE_EXTENSIONS or (not path.suffix and has_dicom_preamble(path))


def _check_links(folder: Path, class_dirs: list[Path]) -> None:
    """A class folder that is a link into the data tree would count its images twice, under another class."""
    root = folder.resolve()
    for class_dir in class_dirs:
        if class_dir.is_symlink():
            target = class_dir.resolve()
            if target == root or root in target.parents or target in root.parents:
                raise FoproError(f"{class_dir} is a link to {target}, inside the data: its images would count twice; remove the link")


def _read_csvs(
    options: DataOptions, splits: tuple[str, ...], classes: list[str] | None
) -> tuple[dict[str, tuple[Rows, str]], bool]:
    """The rows of each split's CSV, and whether they all are ISIC-2019 LT files."""
    if options.images is None:
        raise FoproError("CSV manifests need --images DIR, the folder the image paths are relative to")
    images = Path(options.images)
    if not images.is_dir():
        raise FoproError(f"--images {images} is not a folder: give the folder that holds the images")
    result = {}
    isic = []
    for split in splits:
        csv_path = options.csv_for(split)
        if csv_path is not None:
            rows, is_isic = _read_csv(Path(csv_path), images, options, classes)
            result[split] = (rows, str(csv_path))
            isic.append(is_isic)
    return result, bool(isic) and all(isic)


def _read_csv(path: Path, images: Path, options: DataOptions, classes: list[str] | None) -> tuple[Rows, bool]:
    if not path.is_file():
        raise FoproError(f"{path} does not exist: check the --{_csv_split(path, options)}-csv path")
    header, records = read_csv_records(path)
    isic = all(c in header for c in ISIC2019_COLUMNS) and options.label_column is None
    if isic:
        rows = _isic_rows(path, records, images)
    else:
        image_col = pick_column(path, header, options.image_column, IMAGE_COLUMN_CANDIDATES, "--image-column")
        label_col = pick_column(path, header, options.label_column, LABEL_COLUMN_CANDIDATES, "--label-column")
        for line, record in enumerate(records, start=2):
            empty = next((column for column in (image_col, label_col) if not record[column]), None)
            if empty is not None:
                raise FoproError(f"{path}:{line}: the '{empty}' cell is empty: fill it in or remove the row")
        rows = [(resolve_image(images, r[image_col]), _label_name(r[label_col], classes)) for r in records]
    _check_rows(path, rows)
    return rows, isic


def read_csv_records(path: Path, name: str | None = None) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows (cells stripped) of a UTF-8 CSV file with a header line and at least one row.

    `name` is how the errors call the file (default: its path).
    """
    name = str(path) if name is None else name
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            first = handle.readline()
            handle.seek(0)
            reader = csv.DictReader(handle, delimiter=_delimiter(first))
            header = [h.strip() for h in (reader.fieldnames or [])]
            twice = next((h for h in header if header.count(h) > 1), None)
            if twice is not None:
                raise FoproError(f"{name}: the column '{twice}' appears twice in the header: rename or remove one")
            records = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise FoproError(f"{name} is not a readable CSV file ({err}): save it as UTF-8 CSV with a header") from err
    if not header:
        raise FoproError(f"{name} is empty: it needs a header line and one row per image")
    if not records:
        raise FoproError(f"{name} has a header but no rows: add one row per image")
    return header, records


def _delimiter(header_line: str) -> str:
    """The CSV's delimiter, from its header line: ',' (the default), ';' (spreadsheets in many locales) or a tab."""
    counts = {delimiter: header_line.count(delimiter) for delimiter in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


def _csv_split(path: Path, options: DataOptions) -> str:
    return next((s for s in SPLITS if options.csv_for(s) == path), "train")


def _isic_rows(path: Path, records: list[dict[str, str]], images: Path) -> Rows:
    rows = []
    for line, record in enumerate(records, start=2):
        finding = record["finding"]
        if not finding.isdigit() or int(finding) >= len(ISIC2019_CLASSES):
            raise FoproError(f"{path}:{line}: finding '{finding}' is not a class index 0-7 of the ISIC-2019 LT split")
        image = record["image"]
        rows.append((resolve_image(images, image if Path(image).suffix else image + ".jpg"), ISIC2019_CLASSES[int(finding)]))
    return rows


def pick_column(path: Path, header: list[str], chosen: str | None, candidates: tuple[str, ...], option: str) -> str:
    if chosen is not None:
        if chosen not in header:
            raise FoproError(f"{path} has no column '{chosen}' ({option}); its columns are: {', '.join(header)}")
        return chosen
    lowered = {h.lower(): h for h in header}
    found = [lowered[c] for c in candidates if c in lowered]
    if len(found) != 1 or len(header) < 2:
        what = "no" if not found else "several"
        raise FoproError(
            f"{path}: {what} column looks like the {option.split('-')[2]} column (columns: {', '.join(header)}): "
            f"name it with {option}"
        )
    return found[0]


def _label_name(value: str, classes: list[str] | None) -> str:
    """Labels may be class names or indices; indices map through the class list when one is given."""
    if classes and value.isdigit() and value not in classes and int(value) < len(classes):
        return classes[int(value)]
    return value


def resolve_image(images: Path, name: str) -> Path:
    """The image file of a CSV cell: a path relative to `images` (or absolute); an id without an extension
    (HAM10000's image_id) is the first existing id.png / id.jpg / ...."""
    path = Path(name)
    path = path if path.is_absolute() else images / path
    if not path.suffix and not path.exists():
        return next((found for ext in IMAGE_EXTENSIONS if (found := path.with_name(path.name + ext)).is_file()), path)
    return path


def _check_rows(path: Path, rows: Rows) -> None:
    seen: set[Path] = set()
    duplicates = []
    for image, _ in rows:
        if image in seen:
            duplicates.append(image.name)
        seen.add(image)
    if duplicates:
        raise FoproError(
            f"{path}: {len(duplicates)} duplicate row(s), e.g. {', '.join(duplicates[:MAX_LISTED])}: "
            "list each image once"
        )
    missing = [image for image, _ in rows if not image.is_file()]
    if missing:
        raise FoproError(
            f"{path}: {len(missing)} of {len(rows)} images do not exist (or are not regular files), e.g. "
            f"{', '.join(str(m) for m in missing[:MAX_LISTED])}: check --images and the image column"
        )
