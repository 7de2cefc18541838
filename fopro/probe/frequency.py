"""`fopro probe`: a frozen teacher's frequency preferences on the user's data.

The probe (``run_probe``)
    Radial bands over the normalised frequency radius (fraction of Nyquist, see :mod:`fopro.fourier`) split
    into ``bands`` rings, the same for every colour channel. For each band and gain the band's amplitude is
    scaled on the raw [0, 1] image with :func:`fopro.fourier.scale_band` (0 removes the band, < 1 diminishes,
    > 1 amplifies; the phase is kept; the result is clamped to [0, 1]). Gain 1 is the identity: the clean image
    is used as is and its embeddings are reused. Images are loaded at the teacher's input size (so its
    preprocessing does not resample them after the transform). For the clean images and every (band, gain):

    * sensitivity: mean cosine similarity of the teacher's embeddings to the clean embeddings;
    * discriminability: balanced accuracy of a nearest-class-mean (NCM, ``balanced_accuracy``) and of a k-NN
      classifier (``knn_balanced_accuracy``, cosine, k = 5 or fewer for tiny classes) under stratified k-fold
      cross-validation (5 folds or fewer for tiny classes, the same folds for every condition). In each fold the
      embeddings are centred on the training mean and L2-normalised (CL2N); NCM predicts the class mean at the
      smallest Euclidean distance, k-NN the majority of the k most cosine-similar training images (ties: the
      lowest class index). Both are computed overall and on the tail classes (mean recall of the tail classes).

    Tail classes are those with fewer than ``groups.tail`` images in the TRAINING split (``LongTailGroups``,
    after ``--imbalance`` subsampling). Without a train split the tail metrics are null and a note says why
    (no guess from the probed split, whose counts are often balanced).

    The preference: per band, the best amplifying gain (> 1), the removal (gain 0, or the smallest gain < 1
    probed) and the best diminishing gain (< 1), with their balanced-accuracy deltas vs clean and the standard
    error of each delta (paired, per image: the same images and folds are scored clean and transformed). A
    change counts only when it exceeds max(``min_effect`` = 1 point, 2 standard errors); smaller ones are noise.

The linear probe (``run_probe``, unless ``linear=False``): how much the teacher knows
    A linear classifier on the frozen teacher's embeddings (:mod:`fopro.linear_probe`), the reference number a
    distilled student is compared with. It is trained on the TRAIN split (``linear_views`` passes, each a
    different deterministic draw of the ``augment`` preset the student gets; images at the teacher's input
    size) with balanced softmax on the training counts, and scored on the WHOLE probed split (not capped by
    ``per_class``) with :func:`fopro.metrics.compute_metrics`, the report every student gets. probe.json holds
    it under ``linear_probe`` (headline numbers, per-class recall, options and the full report in
    ``metrics``). The key is absent when the linear probe did not run: ``linear=False``, no train split,
    ``--split train`` (it would be scored on its own training images) or a class without training image
    (the last three with a note saying why). Readers must not require it (older probe.json files lack it).

The learned FPG's report is in :mod:`fopro.probe.fpg_report`, the probe.json contract in :mod:`fopro.probe.file`,
the cross-validation kernel in :mod:`fopro.probe.crossval`, the options in :mod:`fopro.probe.options`, the
preference and the verdict line in :mod:`fopro.probe.verdict`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from fopro.data import DataOptions, Manifest, checked_dataset, load_splits
from fopro.data.augment import resolve_augment
from fopro.errors import FoproError
from fopro.fourier import amplitude_phase, band_masks, scale_band
from fopro.io import check_output_folder, write_json
from fopro.linear_probe import teacher_probe
from fopro.models.teacher import Teacher, TeacherOptions, load_teacher
from fopro.plots import plot_probe
from fopro.probe.crossval import (
    discriminability,
    fold_count,
    knn_neighbours,
    mean_cosine,
    paired_standard_error,
    stratified_folds,
)
from fopro.probe.file import FORMAT, delta_of
from fopro.probe.options import (
    MAX_DEFAULT_IMAGE_SIZE,
    MIN_DEFAULT_IMAGE_SIZE,
    ProbeOptions,
    check_bands_fit,
    check_options,
    linear_options,
)
from fopro.probe.verdict import extra_notes, preference, verdict_line
from fopro.runtime import ProgressFn, no_progress, resolve_device


def probe_transform(x: torch.Tensor, edges: Sequence[Sequence[float]], band: int, gain: float) -> torch.Tensor:
    """The probe's image transform: ``fourier.scale_band``; gain 1 returns ``x`` itself (the clean image)."""
    if float(gain) == 1.0:
        return x
    return scale_band(x, edges, band, float(gain))


def select_per_class(labels: Sequence[int], per_class: int, seed: int) -> list[int]:
    """At most ``per_class`` indices of each class, drawn with ``default_rng([seed, class])``; sorted."""
    labels = np.asarray(labels, dtype=np.int64)
    keep: list[int] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) > per_class:
            members = np.random.default_rng([seed, int(c)]).choice(members, per_class, replace=False)
        keep.extend(int(i) for i in members)
    return sorted(keep)


def native_image_size(manifest: Manifest) -> int:
    """The shorter side of the split's first readable image, within [16, 224] (the default probe size); a prepared
    cache's image size."""
    if manifest.prepared is not None:
        return manifest.prepared.image_size
    for path in manifest.paths[:5]:
        try:
            with Image.open(path) as image:
                side = min(image.size)
        except (OSError, ValueError, SyntaxError):
            continue
        return max(MIN_DEFAULT_IMAGE_SIZE, min(MAX_DEFAULT_IMAGE_SIZE, int(side)))
    return MAX_DEFAULT_IMAGE_SIZE


def load_probe_images(
    manifest: Manifest, size: int, options: ProbeOptions, skip_bad_images: bool
) -> tuple[torch.Tensor, np.ndarray, Manifest]:
    """The capped, seeded selection of the split as uint8 (N, 3, size, size), its labels and its manifest."""
    subset = manifest.subset(select_per_class(manifest.labels, options.per_class, options.seed))
    dataset = checked_dataset(subset, size, skip_bad_images)
    if len(dataset) == 0:
        raise FoproError(f"no readable image in the {manifest.split} split: check the data or pick another --split")
    images = torch.stack([dataset.raw(i) for i in range(len(dataset))])
    return images, np.asarray(dataset.manifest.labels, dtype=np.int64), dataset.manifest


def drop_tiny_classes(images: torch.Tensor, labels: np.ndarray, classes: list[str], split: str) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Leave out classes with fewer than 2 probed images (they cannot be cross-validated); notes say which."""
    counts = np.bincount(labels, minlength=len(classes))
    tiny = [c for c in range(len(classes)) if counts[c] == 1]
    notes = [f"class '{classes[c]}' has a single image in the {split} split: left out of the probe" for c in tiny]
    if tiny:
        keep = ~np.isin(labels, tiny)
        images, labels = images[torch.from_numpy(keep)], labels[keep]
    if int((np.bincount(labels, minlength=len(classes)) >= 2).sum()) < 2:
        raise FoproError(
            f"the probe needs at least 2 classes with 2 or more images in the {split} split: "
            "add images or pick another --split"
        )
    return images, labels, notes


def band_energy(images: torch.Tensor, edges: Sequence[Sequence[float]], batch_size: int) -> list[float]:
    """Fraction of the spectral energy (|fft2|^2, DC term excluded, all channels) in each band, over all images."""
    size = images.shape[-1]
    masks = band_masks(size, size, edges).to(torch.float64)
    masks[:, 0, 0] = 0.0
    total = torch.zeros(len(edges), dtype=torch.float64)
    for start in range(0, len(images), batch_size):
        amplitude, _ = amplitude_phase(images[start : start + batch_size].to(torch.float64) / 255.0)
        power = amplitude.pow(2).sum(dim=(0, 1))
        total += (masks * power).sum(dim=(1, 2))
    denominator = float(total.sum())
    return [float(v) / denominator if denominator > 0 else 0.0 for v in total]


@torch.no_grad()
def embed(
    teacher: Teacher,
    images: torch.Tensor,
    transform: Any,
    batch_size: int,
    device: torch.device,
    report: ProgressFn,
) -> np.ndarray:
    """Teacher embeddings (N, D) float64 of ``transform(raw images)``, batch by batch; ``report(done)``."""
    outputs = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device=device, dtype=torch.float32) / 255.0
        outputs.append(teacher(transform(x)).float().reshape(len(x), -1).cpu().numpy().astype(np.float64))
        report("teacher embeddings", start + len(x), len(images))
    return np.concatenate(outputs)


def tail_classes(splits: Any, classes: list[str], probed: list[int], options: ProbeOptions) -> tuple[dict, list[str]]:
    """The tail classes by TRAINING counts; null (with a note) without a train split or tail class probed."""
    definition = options.groups.definitions()["tail"]
    if "train" not in splits:
        return {"classes": None, "indices": None, "definition": definition, "train_counts": None}, [
            "no train split: tail classes are defined by training counts, so the tail metrics are null "
            "(give the train split with the same data options)"
        ]
    counts = splits["train"].class_counts()
    indices = [c for c in probed if options.groups.group_of(counts[c]) == "tail"]
    info = {"classes": [classes[c] for c in indices], "indices": indices, "definition": definition,
            "train_counts": dict(zip(classes, counts))}
    notes = []
    if not indices:
        info["classes"] = info["indices"] = None
        notes.append(f"no probed class is a tail class ({definition}, --tail-threshold): the tail metrics are null")
    return info, notes


def _load_data(data_options: DataOptions, split: str) -> tuple[Any, Manifest]:
    wanted = tuple(dict.fromkeys((split, "train")))
    splits = load_splits(data_options, splits=wanted)
    manifest = splits.require(split, f"give --{split}-csv or a {split}/ folder, or pick another --split")
    return splits, manifest


def _condition(base: dict, clean: dict, clean_embeddings: np.ndarray, embeddings: np.ndarray, labels: np.ndarray,
               tail: list[int] | None) -> dict:
    row = {**base, "cosine": mean_cosine(clean_embeddings, embeddings)}
    for key in ("balanced_accuracy", "tail_balanced_accuracy", "knn_balanced_accuracy", "knn_tail_balanced_accuracy"):
        row[f"delta_{key}"] = delta_of(base[key], clean[key])
    before, after = clean["_correct"], row.pop("_correct")
    row["se_delta_balanced_accuracy"] = paired_standard_error(labels, before, after, None)
    row["se_delta_tail_balanced_accuracy"] = paired_standard_error(labels, before, after, tail) if tail else None
    return row


@dataclass
class _Probed:
    """The frozen teacher and the probed images (uint8, at the teacher's input size) with their context."""

    teacher: Teacher
    images: torch.Tensor
    labels: np.ndarray
    classes: list[str]
    probed: list[int]
    tail: dict
    device: torch.device
    notes: list[str]
    splits: Any = None


def _prepare(teacher_options: TeacherOptions, data_options: DataOptions, options: ProbeOptions,
             edges: list[tuple[float, float]], teacher: Teacher | None) -> _Probed:
    splits, manifest = _load_data(data_options, options.split)
    notes: list[str] = []
    native = native_image_size(manifest)
    if teacher is None:
        teacher, teacher_notes = load_teacher(teacher_options, native)
        notes += teacher_notes
    size = teacher.preprocess.image_size
    check_bands_fit(edges, size, options.log_bands)
    device = resolve_device(options.device)
    images, labels, probed_manifest = load_probe_images(manifest, size, options, data_options.skip_bad_images)
    images, labels, tiny_notes = drop_tiny_classes(images, labels, splits.classes, options.split)
    notes += probed_manifest.notes + tiny_notes
    if native < size and native < MAX_DEFAULT_IMAGE_SIZE:
        notes.append(f"the images are about {native} px and are upsampled to {size} px: bands above "
                     f"{native / size:.2f} of Nyquist hold little real content")
    probed = sorted(int(c) for c in np.unique(labels))
    tail, tail_notes = tail_classes(splits, splits.classes, probed, options)
    return _Probed(teacher.to(device), images, labels, splits.classes, probed, tail, device, notes + tail_notes, splits)


def _score_conditions(data: _Probed, edges: list[tuple[float, float]], gains: list[float], options: ProbeOptions,
                      progress: ProgressFn) -> tuple[dict, list[dict], dict]:
    """Clean scores, one row per (band, gain) and the evaluation settings; each transform embedded once."""
    labels, num_classes, tail = data.labels, len(data.classes), data.tail["indices"]
    n_folds = fold_count(labels, options.folds)
    folds = stratified_folds(labels, n_folds, options.seed)
    k = knn_neighbours(labels, n_folds, options.neighbours)
    passes = 1 + len(edges) * sum(g != 1.0 for g in gains)
    state = {"done": 0}

    def report(description: str, done: int, _: int) -> None:
        progress(description, state["done"] + done, passes * len(labels))

    def embeddings_of(transform: Any) -> np.ndarray:
        out = embed(data.teacher, data.images, transform, options.batch_size, data.device, report)
        state["done"] += len(labels)
        return out

    clean_embeddings = embeddings_of(lambda x: x)
    clean = discriminability(clean_embeddings, labels, folds, k, num_classes, tail)
    results = []
    for band in range(len(edges)):
        for gain in gains:
            embeddings = clean_embeddings if gain == 1.0 else embeddings_of(
                lambda x, b=band, g=gain: probe_transform(x, edges, b, g))
            scores = discriminability(embeddings, labels, folds, k, num_classes, tail)
            base = {"band": band, "range": list(edges[band]), "gain": gain, **scores}
            results.append(_condition(base, clean, clean_embeddings, embeddings, labels, tail))
    evaluation = {
        "classifiers": "nearest class mean (balanced_accuracy) and k-NN with cosine similarity (knn_balanced_accuracy) "
                       "on embeddings centred on the training-fold mean and L2-normalised",
        "cross_validation": "stratified k-fold, the same folds for every condition",
        "folds": n_folds,
        "knn_k": k,
        "tail_metric": "mean recall of the tail classes",
    }
    return {key: value for key, value in clean.items() if key != "_correct"}, results, evaluation


def _linear_skip_reason(data: _Probed, options: ProbeOptions) -> str | None:
    """Why the linear probe cannot run on this data (a note), or None when it can."""
    if options.split == "train":
        return ("--split train: the linear probe is trained on the train split and not scored on its own "
                "training images; probe --split val or test for it")
    if "train" not in data.splits or len(data.splits["train"]) == 0:
        return ("no train split: no linear probe (it is trained on the train split; give it with the same "
                "data options)")
    empty = [name for name, count in zip(data.classes, data.splits["train"].class_counts()) if count == 0]
    if empty:
        return (f"class(es) {', '.join(empty)} have no training image: no linear probe (balanced softmax needs "
                "every class in the train split)")
    return None


def run_linear_probe(data: _Probed, data_options: DataOptions, options: ProbeOptions,
                     progress: ProgressFn) -> tuple[dict | None, list[str]]:
    """probe.json's ``linear_probe`` (see the module docstring) and notes; None with a note when it cannot run."""
    if not options.linear:
        return None, []
    reason = _linear_skip_reason(data, options)
    if reason is not None:
        return None, [reason]
    notes: list[str] = []
    linear = linear_options(options)
    augmentation = resolve_augment(options.augment)
    if linear.views > 1 and augmentation.is_identity:
        linear = replace(linear, views=1)
        notes.append(f"--augment {options.augment} draws nothing, so the linear probe's {options.linear_views} "
                     "train views would be identical: it uses 1 view")
    size, skip = data.teacher.preprocess.image_size, data_options.skip_bad_images
    train_manifest, eval_manifest = data.splits["train"], data.splits[options.split]
    train_set = checked_dataset(train_manifest, size, skip, train=True, seed=options.seed, augment_config=augmentation)
    eval_set = checked_dataset(eval_manifest, size, skip)
    for dataset, manifest in ((train_set, train_manifest), (eval_set, eval_manifest)):
        notes += [note for note in dataset.manifest.notes if note not in manifest.notes]
    counts = train_manifest.class_counts()
    scored = teacher_probe(data.teacher, train_set, {options.split: eval_set}, data.classes, counts,
                           options.groups, linear, data.device, progress,
                           embed_batch_size=options.batch_size)
    report = scored["splits"][options.split]
    groups = report["groups"] or {}
    result = {
        "trained_on": "train",
        "evaluated_on": options.split,
        "classifier": "linear layer on standardised teacher embeddings, balanced softmax on the training counts "
                      "+ L2 (weight l2), L-BFGS on the full batch; plain softmax at test time",
        "train_images": scored["train_images"],
        "views": scored["views"],
        "augment": options.augment,
        "augmentation": augmentation.as_dict(),
        "image_size": size,
        "embed_dim": scored["embed_dim"],
        "l2": scored["l2"],
        "options": scored["options"],
        "num_images": report["num_samples"],
        **{key: report[key] for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "tail_recall")},
        "group_recall": {group: info["mean_recall"] for group, info in groups.items()},
        "tail_classes": (groups.get("tail") or {}).get("classes"),
        "per_class_recall": {row["name"]: row["recall"] for row in report["per_class"]},
        "metrics": report,
    }
    return result, notes


def run_probe(
    teacher_options: TeacherOptions,
    data_options: DataOptions,
    options: ProbeOptions = ProbeOptions(),
    out_dir: str | Path | None = None,
    progress: ProgressFn = no_progress,
    teacher: Teacher | None = None,
) -> dict:
    """Probe the teacher's frequency preferences on one split, and (``options.linear``) fit the linear probe on
    the train split and score it on that split; returns probe.json's content (written to out_dir).

    ``teacher`` (optional) is an already built frozen Teacher to use instead of loading ``teacher_options``
    (which then only names it in the report).
    """
    edges, gains = check_options(options)
    if out_dir is not None:
        check_output_folder(out_dir, "--out", (data_options.data, data_options.images))
    data = _prepare(teacher_options, data_options, options, edges, teacher)
    linear, linear_notes = run_linear_probe(data, data_options, options, progress)  # first: bad train images fail fast
    clean, results, evaluation = _score_conditions(data, edges, gains, options, progress)
    pref = preference(results, edges, options.min_effect)
    classes, probed, size = data.classes, data.probed, data.teacher.preprocess.image_size
    name = teacher_options.teacher
    result = {
        "format": FORMAT,
        "teacher": {"teacher": name, "weights": None if teacher_options.weights is None else str(teacher_options.weights),
                    "image_size": size, "description": data.teacher.description},
        "data": data_options.describe(),
        "split": options.split,
        "image_size": size,
        "num_images": int(len(data.labels)),
        "classes": [classes[c] for c in probed],
        "class_names": list(classes),
        "images_per_class": {classes[c]: int((data.labels == c).sum()) for c in probed},
        "per_class_cap": options.per_class,
        "seed": options.seed,
        "bands": [list(e) for e in edges],
        "band_centres": [(low + high) / 2 for low, high in edges],
        "log_bands": bool(options.log_bands),
        "band_energy": band_energy(data.images, edges, options.batch_size),
        "gains": gains,
        "evaluation": evaluation,
        "tail": {key: value for key, value in data.tail.items() if key != "indices"},
        "clean": _named_recalls(clean, classes, probed),
        "results": [_named_recalls(row, classes, probed) for row in results],
        "preference": pref,
        "verdict": verdict_line(name, clean, pref, gains),
        "notes": data.notes + extra_notes(clean, gains, len(probed), options.min_effect) + linear_notes,
    }
    if linear is not None:
        result["linear_probe"] = linear
    if out_dir is not None:
        write_probe(result, Path(out_dir))
    return result


def _named_recalls(scores: dict, classes: list[str], probed: list[int]) -> dict:
    recalls = scores["per_class_recall"]
    return {**scores, "per_class_recall": {classes[c]: recalls[c] for c in probed}}


def write_probe(result: dict, out_dir: Path) -> dict[str, Path]:
    """probe.json and probe.png in ``out_dir``, each written atomically."""
    files = {"json": out_dir / "probe.json", "plot": out_dir / "probe.png"}
    write_json(files["json"], result)
    plot_probe(result, files["plot"])
    return files
