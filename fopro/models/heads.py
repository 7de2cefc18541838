"""The distillation heads of a student, and the classifier a checkpoint keeps.

Training adds a projector p(f) and EKD's second classifier fc_t(p(f)) to the timm student (backbone + fc). A
checkpoint keeps one classifier (its JSON's ``head``): ``fc``, the timm model as it is, or ``fc_t``, where the
timm model's classifier module is replaced by p followed by fc_t (ProjectedClassifier), so that the checkpoint is
still one timm model that eval, export and ONNX run unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled pre-logits feature f of a timm classifier."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


class DistillHeads(nn.Module):
    """Projector p(f) -> teacher embedding space, and the second classifier fc_t(p(f)) (EKD)."""

    def __init__(self, feature_dim: int, teacher_dim: int, num_classes: int, second_head: bool = True):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, feature_dim),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(inplace=True),
            nn.Linear(feature_dim, teacher_dim),
        )
        self.fc_t = nn.Linear(teacher_dim, num_classes) if second_head else None

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        projected = self.projector(features)
        return projected, (self.fc_t(projected) if self.fc_t is not None else None)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """fc_t(p(f)): the logits of head fc_t."""
        return self.fc_t(self.projector(features))


class ProjectedClassifier(DistillHeads):
    """fc_t(p(f)) in the place of a timm model's classifier: the deployed form of head ``fc_t``."""

    def __init__(self, feature_dim: int, teacher_dim: int, num_classes: int):
        super().__init__(feature_dim, teacher_dim, num_classes, second_head=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.classify(features)


class ProjectedStudent(nn.Module):
    """The live student with head ``fc_t`` (for validation in training): fc_t(p(f(x))) on the training weights."""

    def __init__(self, student: nn.Module, heads: DistillHeads):
        super().__init__()
        self.student, self.heads = student, heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads.classify(pooled_features(self.student, x))


def classifier_name(model: nn.Module) -> str:
    """The attribute path of a timm model's classifier module (resnet: fc; vit: head; convnext: head.fc)."""
    target = model.get_classifier()
    return next(name for name, module in model.named_modules() if module is target)


def set_classifier(model: nn.Module, module: nn.Module) -> None:
    parent, _, attribute = classifier_name(model).rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, module)


def projected_state(student: nn.Module, heads: DistillHeads) -> dict[str, torch.Tensor]:
    """The state dict of the student with head fc_t: its classifier's entries replaced by p's and fc_t's."""
    prefix = classifier_name(student) + "."
    state = {key: value for key, value in student.state_dict().items() if not key.startswith(prefix)}
    state.update({prefix + key: value for key, value in heads.state_dict().items()})
    return state
