"""The single source of preprocessing facts for a model: input size and normalisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocess:
    """What a model expects at its door: square `image_size` inputs normalised with `mean`/`std`."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.image_size and x.shape[-2] == self.image_size:
            return x
        downsampling = x.shape[-1] > self.image_size
        return F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=downsampling)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Raw images in [0, 1] (B, 3, H, W) -> the model's normalised input."""
        x = self.resize(x)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}
