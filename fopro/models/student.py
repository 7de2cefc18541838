"""The student: a timm classifier (backbone + fc), random init or local weights (its heads: fopro.models.heads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fopro.errors import FoproError
from fopro.preprocess import Preprocess
from fopro.models.heads import pooled_features
from fopro.models.weights import check_input_size, create_timm_model, load_weights, read_state_dict

DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


@dataclass
class StudentOptions:
    arch: str = "resnet18"
    image_size: int = 64
    pretrained: bool = False
    weights: Path | None = None


def create_student(options: StudentOptions, num_classes: int) -> tuple[nn.Module, Preprocess]:
    """A timm classifier whose head is `fc`; random init unless pretrained weights are asked for."""
    if options.weights is not None:
        model = create_timm_model(options.arch, num_classes, options.image_size, option="--student")
        load_weights(model, read_state_dict(options.weights, "--student-weights"), str(options.weights), keep_classifier=False)
    else:
        model = create_timm_model(options.arch, num_classes, options.image_size, option="--student", pretrained=options.pretrained)
    problem = check_input_size(model, options.image_size)
    if problem is not None:
        error, smallest = problem
        fix = f"use --image-size {smallest} or larger" if smallest else "use a larger --image-size or another --student"
        raise FoproError(f"--image-size {options.image_size} is too small for --student {options.arch} ({error}): {fix}")
    cfg = model.pretrained_cfg
    preprocess = Preprocess(
        options.image_size, tuple(cfg.get("mean", DEFAULT_MEAN)), tuple(cfg.get("std", DEFAULT_STD))
    )
    return model, preprocess


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pooled feature f and fc(f) of a timm classifier, with one backbone pass."""
    features = pooled_features(model, x)
    return features, model.get_classifier()(features)
