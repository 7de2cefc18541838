"""Long-tailed supervised losses (CE, balanced softmax) and the distillation terms (EKD cosine, KD MSE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fopro.data.manifest import UNLABELED
from fopro.errors import FoproError

# LDAM (Cao et al., 2019) needs a cosine classifier (normalised features and weights, scale 30); on the plain
# linear head of a timm student its margins act on unbounded logits, so it was removed rather than kept wrong.
REMOVED_LOSSES = {"ldam_drw": "was removed (LDAM needs a cosine classifier, which fopro's students do not have): use balanced_softmax"}


def class_log_prior(train_counts: list[int]) -> torch.Tensor:
    counts = torch.tensor(train_counts, dtype=torch.float32)
    if (counts <= 0).any():
        raise FoproError("every class needs at least one training image for the long-tailed losses")
    return torch.log(counts / counts.sum())


def balanced_softmax(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on logits + log(prior): the label-shift-corrected softmax of Ren et al. (2020)."""
    return F.cross_entropy(logits + log_prior.to(logits.device, logits.dtype), labels, ignore_index=UNLABELED)


def cosine_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(a_i, b_i) per row (0 when aligned, 4 when opposite), in float32: EKD's alignment distance."""
    return 2 - 2 * F.cosine_similarity(a.float(), b.float(), dim=1)


def squared_errors(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per row, in float32: kd's alignment distance."""
    return (a.float() - b.float()).pow(2).mean(dim=1)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """mean(values), or with per-row `weights` sum(w v) / sum(w): the alignment term of kd / ekd / fopro is the
    (weighted) mean of cosine_distances or squared_errors."""
    return values.mean() if weights is None else (weights * values).sum() / weights.sum()


ALIGN_WEIGHTS = ("none", "balanced")


def class_balanced_weights(log_prior: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image weight 1 / (C p_y) of the alignment term (the authors' `balanced_free` idea: a rare class's images
    count as much as a frequent class's); 1 over the training distribution on average, and 1 for unlabelled images."""
    class_weights = 1.0 / (len(log_prior) * log_prior.exp())
    weights = torch.ones(len(labels), dtype=class_weights.dtype, device=labels.device)
    labelled = labels != UNLABELED
    weights[labelled] = class_weights[labels[labelled]]
    return weights


def focus_weights(distances: torch.Tensor, power: float) -> torch.Tensor:
    """Per-image weight d_i^gamma / mean(d^gamma) of the alignment term (``--align-focus gamma``), detached: the
    images the student matches worst count most, whatever their class, unlabelled ones too (all 1 when every
    distance is 0)."""
    d = distances.detach().float().pow(power)
    mean = d.mean()
    return torch.where(mean > 0, d / mean.clamp_min(torch.finfo(d.dtype).tiny), torch.ones_like(d))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Plain cross-entropy (the prior is not used)."""
    return F.cross_entropy(logits, labels, ignore_index=UNLABELED)


# --loss name -> L(logits, labels, log prior of the training counts); the valid names are its keys
LOSS_FUNCTIONS = {"balanced_softmax": balanced_softmax, "ce": cross_entropy}
LOSSES = tuple(LOSS_FUNCTIONS)


class SupervisedLoss(nn.Module):
    """L_sup(logits, y) for one of LOSSES, with the training class counts that balanced softmax needs;
    images labelled UNLABELED (-1) are left out of the mean."""

    def __init__(self, name: str, train_counts: list[int]):
        super().__init__()
        check_loss(name)
        self.name = name
        self.register_buffer("log_prior", class_log_prior(train_counts))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return LOSS_FUNCTIONS[self.name](logits.float(), labels, self.log_prior)


def check_loss(name: str) -> None:
    if name in REMOVED_LOSSES:
        raise FoproError(f"--loss {name} {REMOVED_LOSSES[name]}")
    if name not in LOSSES:
        raise FoproError(f"--loss {name} is not known: choose one of {', '.join(LOSSES)}")
