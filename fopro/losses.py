"""Long-tailed supervised losses (CE, balanced softmax, LDAM-DRW) and the distillation terms (EKD cosine, KD MSE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fopro.errors import FoproError

LOSSES = ("balanced_softmax", "ce", "ldam_drw")


def class_log_prior(train_counts: list[int]) -> torch.Tensor:
    counts = torch.tensor(train_counts, dtype=torch.float32)
    if (counts <= 0).any():
        raise FoproError("every class needs at least one training image for the long-tailed losses")
    return torch.log(counts / counts.sum())


def balanced_softmax(logits: torch.Tensor, labels: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on logits + log(prior): the label-shift-corrected softmax of Ren et al. (2020)."""
    return F.cross_entropy(logits + log_prior.to(logits.device, logits.dtype), labels)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean(2 - 2 cos(a, b)): the EKD alignment term (0 when aligned, 4 when opposite)."""
    return (2 - 2 * F.cosine_similarity(a.float(), b.float(), dim=1)).mean()


def feature_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a.float(), b.float())


class SupervisedLoss(nn.Module):
    """L_sup(logits, y) for one of LOSSES, with the training class counts it needs.

    LDAM-DRW (Cao et al., 2019): per-class margins C / n_j^(1/4) scaled to `max_margin`, logits scaled
    by `scale`, and class re-weighting (effective number, beta 0.9999) from epoch `drw_start` on.
    """

    def __init__(self, name: str, train_counts: list[int], max_margin: float = 0.5, scale: float = 30.0, drw_fraction: float = 0.8):
        super().__init__()
        if name not in LOSSES:
            raise FoproError(f"--loss {name} is not known: choose one of {', '.join(LOSSES)}")
        self.name = name
        self.register_buffer("log_prior", class_log_prior(train_counts))
        counts = torch.tensor(train_counts, dtype=torch.float32)
        margins = 1.0 / counts.pow(0.25)
        self.register_buffer("margins", margins * (max_margin / margins.max()))
        effective = (1.0 - 0.9999 ** counts) / (1.0 - 0.9999)
        weights = 1.0 / effective
        self.register_buffer("drw_weights", weights / weights.sum() * len(train_counts))
        self.scale = scale
        self.drw_fraction = drw_fraction
        self.reweight = False

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.reweight = self.name == "ldam_drw" and epoch >= int(self.drw_fraction * epochs)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.name == "balanced_softmax":
            return balanced_softmax(logits, labels, self.log_prior)
        if self.name == "ce":
            return F.cross_entropy(logits, labels)
        margin = self.margins[labels]
        shifted = logits - F.one_hot(labels, logits.shape[1]).to(logits.dtype) * margin[:, None]
        weight = self.drw_weights if self.reweight else None
        return F.cross_entropy(self.scale * shifted, labels, weight=weight)
