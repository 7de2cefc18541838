"""The teacher probe: a linear classifier on the FROZEN teacher's embeddings, "how much the teacher knows".

The contract
    * :func:`embed` runs the teacher (eval mode, ``torch.no_grad()``) over a dataset of raw [0, 1] images
      (items ``(image, label, index)``, as :class:`fopro.data.ImageDataset` gives them) and returns the
      embeddings (N, D) as float32 on the CPU, in the dataset's order.
    * :func:`fit_linear_probe` trains a :class:`LinearProbe` on (V*N, D) train embeddings: the features are
      standardised with the train mean and standard deviation (buffers), then one ``nn.Linear``. The objective
      is convex: balanced softmax (:func:`fopro.losses.balanced_softmax` with the log prior of
      ``train_counts``, the same long-tail correction the students get) plus ``l2 / 2 * ||W||^2``, minimised
      on the full batch by L-BFGS from zero weights, on the CPU, so the probe is the objective's optimum and
      deterministic (no seed, no draw from the global random state). The L2 weight is chosen from
      ``options.l2_grid`` by balanced accuracy on a selection split when one is given (a run's val split),
      else by 3-fold cross-validation on the train images (all views of an image in one fold). Until 0.6 the probe was minibatch Adam with weight decay 1e-4: on the
      synthetic protocol that under-regularised read-out moved by 2 to 5 points between seeds and fell 4 to 5
      points short of this one (examples/results/transfer/diagnosis.md, finding 16).
    * :meth:`LinearProbe.predict_proba` is the plain softmax of the logits: balanced softmax trains logits
      that are already balanced at test time, so no prior is subtracted.
    * :func:`teacher_probe` embeds ``options.views`` passes over the train split (view v is epoch v of an
      augmented :class:`~fopro.data.ImageDataset`, so each view is a different, deterministic augmentation;
      one view of an un-augmented set is allowed), fits the probe and scores it on each evaluation split with
      :func:`fopro.metrics.compute_metrics`, exactly the report a student gets (balanced accuracy, tail
      recall, head / medium / tail groups, per-class recall...); it is :func:`fit_teacher_probe` followed by
      :func:`score_probe`, which a distillation run calls apart (it fits the probe before training, for
      ``--probe-kd``, and scores it at the end).
    * A run's reference: :func:`run_options` (4 augmented views, 1 without augmentation),
      :func:`summarise_scores` (the numbers a run summary keeps) and :func:`transfer_ratios` (the student's
      numbers as fractions of the probe's).

Bad options raise :class:`fopro.errors.FoproError` with one line naming the option. Nothing is printed;
long work is reported through ``progress(description, done, total)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fopro.data.images import ImageDataset
from fopro.errors import FoproError
from fopro.losses import balanced_softmax, class_log_prior
from fopro.metrics import DEFAULT_GROUPS, LongTailGroups, balanced_accuracy, compute_metrics, confusion_matrix
from fopro.runtime import ProgressFn, no_progress, resolve_device

__all__ = ["LinearProbeOptions", "LinearProbe", "check_linear_options", "embed", "fit_linear_probe",
           "fit_teacher_probe", "embed_split", "embed_selection", "score_probe", "teacher_probe", "run_options", "summarise_scores", "transfer_ratios"]

#: Features whose train standard deviation is below this are only centred (not divided by ~0).
MIN_STD = 1e-6


#: L2 weights the probe chooses from (on val, or by cross-validation on train): on the synthetic protocol's val
#: split the best were 0.3 and 1 (two teachers, three augmentations, two seeds; diagnosis finding 16); the grid
#: reaches below them for larger train splits and lower-dimensional embeddings, which need less.
L2_GRID = (0.01, 0.1, 0.3, 1.0, 3.0)
CV_FOLDS = 3


@dataclass
class LinearProbeOptions:
    """How the linear probe is trained; checked on creation (FoproError naming the option)."""

    views: int = 4
    l2_grid: tuple[float, ...] = L2_GRID  # one value: that weight, no choice
    max_iter: int = 100  # L-BFGS iterations per L2 weight (as good as 500 on val, finding 16, at a third of the time)

    def __post_init__(self) -> None:
        check_linear_options(self)


def _whole(value: Any, option: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise FoproError(f"{option} must be a whole number >= {minimum} (got {value!r})")


def _real(value: Any, option: str, positive: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise FoproError(f"{option} must be a finite number {'> 0' if positive else '>= 0'} (got {value!r})")


def check_linear_options(options: LinearProbeOptions) -> LinearProbeOptions:
    """``options`` if every value is valid; FoproError naming the first bad one otherwise."""
    _whole(options.views, "--linear-views", 1)
    if not options.l2_grid:
        raise FoproError("LinearProbeOptions.l2_grid is empty: give at least one L2 weight")
    for value in options.l2_grid:
        _real(value, "LinearProbeOptions.l2_grid", positive=False)
    _whole(options.max_iter, "LinearProbeOptions.max_iter", 1)
    return options


# ---------------------------------------------------------------------------------------------- the classifier


class LinearProbe(nn.Module):
    """Standardise with the train mean / std (buffers), then one linear layer; forward(embeddings) -> logits."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("std", torch.ones(embed_dim))
        self.linear = _zero_linear(embed_dim, num_classes)  # fit_linear_probe starts from zero weights
        self.l2 = 0.0  # the L2 weight it was trained with, and {l2: balanced accuracy} of the choice among the grid
        self.selection: dict[float, float] = {}  # (on val or in cross-validation; set by fit_linear_probe)

    @property
    def embed_dim(self) -> int:
        return int(self.linear.in_features)

    @property
    def num_classes(self) -> int:
        return int(self.linear.out_features)

    def standardise(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (embeddings - self.mean) / self.std

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear(self.standardise(embeddings))

    @torch.no_grad()
    def predict_proba(self, embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
        """Softmax probabilities (N, C) as float64 numpy (rows sum to 1)."""
        x = torch.as_tensor(np.asarray(embeddings) if not torch.is_tensor(embeddings) else embeddings)
        if x.ndim != 2 or x.shape[1] != self.embed_dim:
            raise FoproError(f"the linear probe takes (N, {self.embed_dim}) embeddings, got shape {tuple(x.shape)}: "
                             "embed with the teacher it was trained on")
        logits = self.forward(x.to(device=self.mean.device, dtype=torch.float32))
        return torch.softmax(logits.double(), dim=1).cpu().numpy()


def _check_training_data(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise FoproError(f"the linear probe needs (N, D) train embeddings with N, D >= 1, got shape {tuple(x.shape)}")
    if y.ndim != 1 or len(y) != len(x):
        raise FoproError(f"{len(x)} train embeddings but labels of shape {tuple(y.shape)}: give one label per row")
    if not bool(torch.isfinite(x).all()):
        raise FoproError("the train embeddings contain NaN or infinity: the teacher's output is broken")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise FoproError(f"a train label is outside 0..{num_classes - 1}: train_counts gives {num_classes} classes")


def fit_linear_probe(
    train_embeddings: torch.Tensor | np.ndarray,
    labels: Any,
    train_counts: list[int],
    options: LinearProbeOptions = LinearProbeOptions(),
    progress: ProgressFn = no_progress,
    select: tuple[torch.Tensor | np.ndarray, Any] | None = None,
    images: Any = None,
) -> LinearProbe:
    """A :class:`LinearProbe` trained with balanced softmax + L2 on (V*N, D) embeddings; in eval mode, on the CPU.

    ``train_counts`` (one per class, the training images of each class) gives the number of classes and the
    log prior of balanced softmax; with equal counts the loss is plain cross-entropy. The L2 weight is the one
    of ``options.l2_grid`` with the best balanced accuracy (ties: the larger weight) on ``select``
    (embeddings, labels of a held-out split), else in 3-fold cross-validation on the train rows, the rows of
    one image (``images``: an image id per row; default each row its own) kept in one fold.
    """
    check_linear_options(options)
    x = _as_float_tensor(train_embeddings)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    log_prior = class_log_prior(list(train_counts))
    _check_training_data(x, y, len(log_prior))

    probe = LinearProbe(x.shape[1], len(log_prior))
    mean, std = x.double().mean(dim=0), x.double().std(dim=0, unbiased=False)
    probe.mean.copy_(mean.float())
    probe.std.copy_(torch.where(std < MIN_STD, torch.ones_like(std), std).float())
    features = probe.standardise(x)
    grid = sorted(options.l2_grid, reverse=True)  # strong to weak: each fit starts from the last one's weights
    if len(grid) > 1:
        if select is not None:
            select_x = probe.standardise(_as_float_tensor(select[0]))
            folds = [(slice(None), select_x, np.asarray(select[1], dtype=np.int64))]  # every train row: a view
        else:
            folds = _cv_folds(features, y, images)
        layers = [_zero_linear(x.shape[1], len(log_prior)) for _ in folds]  # one per fold, warm-started along the grid
        for done, l2 in enumerate(grid):
            matrix = np.zeros((len(log_prior), len(log_prior)), dtype=np.int64)
            for (train_rows, held_x, held_y), layer in zip(folds, layers):
                _minimise(layer, features[train_rows], y[train_rows], log_prior, l2, options.max_iter)
                matrix += confusion_matrix(held_y, layer(held_x).argmax(dim=1).numpy(), len(log_prior))
            probe.selection[float(l2)] = balanced_accuracy(matrix) or 0.0
            progress("linear probe: choosing the L2 weight", done + 1, len(grid))
        probe.l2 = max(grid, key=lambda l2: (probe.selection[float(l2)], l2))
    else:
        probe.l2 = float(grid[0])
    _minimise(probe.linear, features, y, log_prior, probe.l2, options.max_iter)
    return probe.requires_grad_(False).eval()


def _cv_folds(features: torch.Tensor, labels: torch.Tensor, images: Any) -> list[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """(train rows mask, held-out features, held-out labels) of each fold: each class's images dealt to the folds
    in turn, every row of an image in its image's fold."""
    image_of = np.arange(len(labels)) if images is None else np.asarray(images)
    fold_of_image: dict[Any, int] = {}
    dealt = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    for image, label in zip(image_of.tolist(), labels.tolist()):
        if image not in fold_of_image:
            fold_of_image[image] = int(dealt[label] % CV_FOLDS)
            dealt[label] += 1
    fold = torch.as_tensor([fold_of_image[image] for image in image_of.tolist()])
    return [(fold != k, features[fold == k], labels[fold == k].numpy()) for k in range(CV_FOLDS)]


def _zero_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.utils.skip_init(nn.Linear, in_features, out_features)  # no draw from the global random state
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    return layer


def _as_float_tensor(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(values) if not torch.is_tensor(values) else values)
    return x.detach().to(device="cpu", dtype=torch.float32)


def _minimise(linear: nn.Linear, features: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor, l2: float,
              max_iter: int) -> None:
    """balanced softmax + l2 / 2 * ||W||^2 on the full batch, by L-BFGS from the layer's current weights."""
    linear.requires_grad_(True)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = balanced_softmax(linear(features), labels, log_prior) + 0.5 * l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    linear.requires_grad_(False)


# ---------------------------------------------------------------------------------------------- the teacher


@torch.no_grad()
def embed(
    teacher: nn.Module,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    device: torch.device | str,
    progress: ProgressFn = no_progress,
) -> torch.Tensor:
    """The teacher's embeddings (N, D) float32 on the CPU of a dataset of raw [0, 1] images, in its order.

    The teacher must be on ``device``; it runs in eval mode (its mode is restored afterwards).
    """
    _whole(batch_size, "--batch-size", 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    was_training = teacher.training
    teacher.eval()
    outputs: list[torch.Tensor] = []
    done = 0
    try:
        for images, _, _ in loader:
            x = images.to(device=device, dtype=torch.float32)
            outputs.append(teacher(x).float().reshape(len(x), -1).cpu())
            done += len(x)
            progress("teacher embeddings", done, len(dataset))
    finally:
        teacher.train(was_training)
    if not outputs:
        raise FoproError("no image to embed: the dataset is empty (check the data options)")
    return torch.cat(outputs)


def _augmented(dataset: ImageDataset) -> bool:
    return bool(dataset.train) and not dataset.augment_config.is_identity


def fit_teacher_probe(
    teacher: nn.Module,
    train_set: ImageDataset,
    train_counts: list[int],
    options: LinearProbeOptions = LinearProbeOptions(),
    device: torch.device | str = "auto",
    progress: ProgressFn = no_progress,
    embed_batch_size: int = 64,
    select: tuple[torch.Tensor, Any] | None = None,
) -> LinearProbe:
    """A :class:`LinearProbe` fitted on ``options.views`` augmented passes over ``train_set`` (see the contract),
    its L2 weight chosen on ``select`` (the embeddings and labels of a run's val split: :func:`embed_selection`)
    when given.

    The teacher is moved to ``device``; the probe stays on the CPU (move it where it is used).
    """
    check_linear_options(options)
    if len(train_set) == 0:
        raise FoproError("the train split is empty: the linear probe has nothing to learn from")
    if options.views > 1 and not _augmented(train_set):
        raise FoproError(f"--linear-views {options.views}: the train set is not augmented, so every view would be "
                         "the same images: use --linear-views 1 or an augmentation preset")
    device = resolve_device(device) if isinstance(device, str) else device
    teacher = teacher.to(device)
    previous_epoch = train_set.epoch
    views = []
    try:
        for view in range(options.views):
            train_set.set_epoch(view)
            report = lambda _d, done, _t, v=view: progress("linear probe: teacher embeddings", v * len(train_set) + done, options.views * len(train_set))  # noqa: E731
            views.append(embed(teacher, train_set, embed_batch_size, device, report))
    finally:
        train_set.set_epoch(previous_epoch)
    labels = np.tile(np.asarray(train_set.manifest.labels, dtype=np.int64), options.views)
    images = np.tile(np.arange(len(train_set)), options.views)  # the views of an image stay in one fold
    return fit_linear_probe(torch.cat(views), labels, train_counts, options, progress, select, images)


def embed_split(teacher: nn.Module, dataset: ImageDataset, split: str, device: torch.device | str,
                progress: ProgressFn = no_progress, embed_batch_size: int = 64) -> torch.Tensor:
    """The teacher's embeddings of one evaluation split (the teacher is moved to ``device``)."""
    device = resolve_device(device) if isinstance(device, str) else device
    report = lambda _d, done, total: progress(f"linear probe: {split} embeddings", done, total)  # noqa: E731
    return embed(teacher.to(device), dataset, embed_batch_size, device, report)


def embed_selection(teacher: nn.Module, val_set: ImageDataset | None, device: torch.device | str,
                    progress: ProgressFn = no_progress) -> tuple[torch.Tensor, list[int]] | None:
    """(embeddings, labels) of a run's val split, on which the probe's L2 weight is chosen; None without one."""
    if val_set is None or not len(val_set):
        return None
    return embed_split(teacher, val_set, "val", device, progress), list(val_set.manifest.labels)


def _check_counts(classes: list[str], train_counts: list[int]) -> None:
    if len(train_counts) != len(classes):
        raise FoproError(f"{len(train_counts)} training counts for {len(classes)} classes: give one count per class")


def score_probe(
    probe: LinearProbe,
    teacher: nn.Module,
    eval_sets: dict[str, ImageDataset],
    classes: list[str],
    train_counts: list[int],
    groups: LongTailGroups = DEFAULT_GROUPS,
    device: torch.device | str = "auto",
    progress: ProgressFn = no_progress,
    embed_batch_size: int = 64,
    embedded: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict]:
    """{split: compute_metrics report} of a fitted probe on each evaluation set (the report a student gets);
    ``embedded``: the teacher's embeddings of splits already embedded (val, when it chose the L2 weight)."""
    _check_counts(classes, train_counts)
    splits = {}
    for split, dataset in eval_sets.items():
        embeddings = (embedded or {}).get(split)
        if embeddings is None:
            embeddings = embed_split(teacher, dataset, split, device, progress, embed_batch_size)
        probs = probe.predict_proba(embeddings)
        splits[split] = compute_metrics(np.asarray(dataset.manifest.labels), probs, classes, train_counts, groups)
    return splits


def teacher_probe(
    teacher: nn.Module,
    train_set: ImageDataset,
    eval_sets: dict[str, ImageDataset],
    classes: list[str],
    train_counts: list[int],
    groups: LongTailGroups = DEFAULT_GROUPS,
    options: LinearProbeOptions = LinearProbeOptions(),
    device: torch.device | str = "auto",
    progress: ProgressFn = no_progress,
    embed_batch_size: int = 64,
) -> dict:
    """Fit a linear probe on ``options.views`` augmented passes over ``train_set``; score it on ``eval_sets``.

    Returns ``{"options", "train_images", "views", "embed_dim", "l2" (the L2 weight, chosen in cross-validation),
    "splits": {split: compute_metrics report}}``.
    """
    _check_counts(classes, train_counts)
    probe = fit_teacher_probe(teacher, train_set, train_counts, options, device, progress, embed_batch_size)
    splits = score_probe(probe, teacher, eval_sets, classes, train_counts, groups, device, progress, embed_batch_size)
    return {"options": {**asdict(options), "l2_grid": list(options.l2_grid)}, "train_images": len(train_set), "views": options.views,
            "embed_dim": probe.embed_dim, "l2": probe.l2, "splits": splits}


# ---------------------------------------------------------------------------------------------- a run's reference

SUMMARY_KEYS = ("balanced_accuracy", "tail_recall", "macro_f1")


def run_options(train_set: ImageDataset) -> LinearProbeOptions:
    """The probe a distillation run fits: 4 augmented views of its train split (1 when it is not augmented)."""
    return LinearProbeOptions(views=4 if _augmented(train_set) else 1)


def summarise_scores(scores: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """{split: balanced accuracy, tail recall, macro-F1, head recall} of :func:`score_probe`'s reports."""
    return {
        split: {**{key: report[key] for key in SUMMARY_KEYS}, "head_recall": ((report.get("groups") or {}).get("head") or {}).get("mean_recall")}
        for split, report in scores.items()
    }


def transfer_ratios(student: dict[str, Any], probe: dict[str, Any]) -> dict[str, float | None]:
    """A student's numbers as fractions of the teacher probe's on the same split (1.0: all that the probe knows)."""
    return {key: student[key] / probe[key] if student.get(key) is not None and probe.get(key) else None for key in ("balanced_accuracy", "tail_recall")}
