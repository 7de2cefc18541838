"""The frozen teacher: a pooled-embedding model with its own input size and normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from fopro.checkpoint import sidecar
from fopro.errors import FoproError
from fopro.preprocess import Preprocess
from fopro.models.weights import (
    build_model,
    check_input_size,
    create_timm_model,
    embedding_dim,
    load_weights,
    patch_size,
    read_state_dict,
    strip_wrappers,
)


@dataclass
class TeacherOptions:
    """A timm model name (weights from --teacher-weights, or timm's hub when online) or a fopro checkpoint."""

    teacher: str
    weights: Path | None = None
    image_size: int | None = None
    pretrained: bool = True


class Teacher(nn.Module):
    """Frozen: always in eval mode, no gradients to its weights; forward(raw [0,1] images) -> (B, D) embeddings.

    Gradients still flow to the input, which is how the Fourier Prompt Generator learns through it.
    """

    def __init__(self, model: nn.Module, preprocess: Preprocess, description: str):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self.description = description
        self.embed_dim = embedding_dim(model)
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.preprocess(x))


def is_fopro_checkpoint(spec: str) -> bool:
    weights, meta = sidecar(spec)
    return spec.endswith((".safetensors", ".json")) and meta.is_file() and weights.is_file()


def load_teacher(options: TeacherOptions, default_image_size: int) -> tuple[Teacher, list[str]]:
    """Build the frozen teacher; returns it with notes for the user (source, image size choices)."""
    notes: list[str] = []
    spec = options.teacher
    if spec.endswith((".safetensors", ".json")) or Path(spec).suffix in (".pth", ".tar", ".pt", ".bin"):
        if not is_fopro_checkpoint(spec):
            raise FoproError(
                f"--teacher {spec} is not a fopro checkpoint (NAME.safetensors with NAME.json): for other weight "
                "files give the architecture with --teacher and the file with --teacher-weights"
            )
        model, meta = build_model(spec, head=False)
        if options.image_size not in (None, meta.image_size) and patch_size(model):
            notes.append(f"the checkpoint teacher is fixed at {meta.image_size} px; --teacher-image-size ignored")
        size = options.image_size if options.image_size and not patch_size(model) else meta.image_size
        check_teacher_size(model, spec, size)
        preprocess = Preprocess(size, tuple(meta.mean), tuple(meta.std))
        return Teacher(model, preprocess, f"fopro checkpoint {spec} ({meta.arch})"), notes
    size, size_note = teacher_image_size(spec, options.image_size, default_image_size)
    if size_note:
        notes.append(size_note)
    if options.weights is not None:
        model = create_timm_model(spec, 0, size, option="--teacher")
        state_dict, recognised = strip_wrappers(read_state_dict(options.weights))
        load_weights(model, state_dict, str(options.weights), keep_classifier=False)
        description = f"{spec} with weights from {options.weights}" + (f" [{recognised}]" if recognised != "plain" else "")
    elif options.pretrained:
        model = create_timm_model(spec, 0, size, option="--teacher", pretrained=True)
        description = f"{spec} with timm's pretrained weights"
    else:
        model = create_timm_model(spec, 0, size, option="--teacher")
        description = f"{spec} with RANDOM weights (no pretrained teacher: only useful for tests)"
        notes.append("the teacher has random weights")
    check_teacher_size(model, spec, size)
    cfg = model.pretrained_cfg
    preprocess = Preprocess(size, tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225))))
    return Teacher(model, preprocess, description), notes


def check_teacher_size(model: nn.Module, spec: str, size: int) -> None:
    """Fail now, naming --teacher-image-size, if the teacher cannot take `size`-px images (not mid-training)."""
    problem = check_input_size(model, size)
    if problem is not None:
        error, smallest = problem
        fix = f"use --teacher-image-size {smallest} or larger" if smallest else "use a larger --teacher-image-size"
        raise FoproError(f"--teacher {spec} cannot take {size}-px images ({error}): {fix}")


def teacher_image_size(name: str, requested: int | None, default: int) -> tuple[int, str | None]:
    """The teacher's input size: as requested, else the student's, rounded to the patch size of ViT teachers."""
    patch = _patch_of(name)
    if requested is not None:
        if requested <= 0:
            raise FoproError(f"--teacher-image-size {requested} must be a positive number of pixels")
        if patch and requested % patch:
            lower, upper = (requested // patch) * patch, (requested // patch + 1) * patch
            raise FoproError(
                f"--teacher-image-size {requested} is not a multiple of {name}'s patch size {patch}: use {lower or upper} or {upper}"
            )
        return requested, None
    if patch and default % patch:
        size = max(patch, int(round(default / patch)) * patch)
        return size, f"teacher image size {size} px (the student's {default} px rounded to {name}'s patch size {patch})"
    return default, None


def _patch_of(name: str) -> int | None:
    if not timm.is_model(name):
        return None
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return None
    try:
        with torch.device("meta"):  # only the patch size is needed: no memory, no weight initialisation
            model = timm.create_model(name, pretrained=False, num_classes=0)
    except Exception:  # a constructor that needs real tensors
        model = timm.create_model(name, pretrained=False, num_classes=0)
    return patch_size(model)
