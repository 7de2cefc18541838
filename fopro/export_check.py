"""Checking an exported model: image samples (data or seeded random), the PyTorch student's reference outputs,
their agreement with the exported ones, and latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fopro.checkpoint import CheckpointMeta
from fopro.data import DataOptions, checked_dataset, load_splits
from fopro.errors import FoproError
from fopro.export_options import ExportOptions
from fopro.onnx_model import graph_input


@dataclass
class Sample:
    images: torch.Tensor  # raw [0, 1] (N, 3, S, S)
    labels: np.ndarray | None
    source: str


def sample_images(
    data: DataOptions, meta: CheckpointMeta, splits: tuple[str, ...], limit: int, seed: int
) -> Sample:
    """Up to `limit` images (seeded choice) of the first present split in `splits`, decoded and checked."""
    loaded = load_splits(data, splits=splits, classes=meta.classes)
    split = next((s for s in splits if s in loaded and len(loaded[s]) > 0), None)
    if split is None:
        raise FoproError(f"no images in the {'/'.join(splits)} split(s) of {data.describe()}: add images or give another split")
    manifest = loaded[split]
    indices = list(range(len(manifest)))
    if len(indices) > limit:
        indices = sorted(np.random.default_rng(seed).choice(len(manifest), size=limit, replace=False).tolist())
    dataset = checked_dataset(manifest.subset(indices), meta.image_size, data.skip_bad_images)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return Sample(images, np.asarray(dataset.manifest.labels), f"{len(dataset)} {split} images of {data.describe()}")


def random_sample(meta: CheckpointMeta, limit: int, seed: int) -> Sample:
    generator = torch.Generator().manual_seed(seed)
    shape = (limit, 3, meta.image_size, meta.image_size)
    images = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8).float() / 255.0
    return Sample(images, None, f"{limit} seeded random images (no data options given)")


def _median_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000.0 * statistics.median(times), 4)


def measure_latency(
    session: Any, wrapper: nn.Module, meta: CheckpointMeta, options: ExportOptions, batches: tuple[int, ...]
) -> dict[str, dict[str, float]]:
    """Median milliseconds per call of PyTorch eager (CPU) and onnxruntime (CPU), per batch size."""
    name = session.get_inputs()[0].name
    result = {}
    generator = torch.Generator().manual_seed(options.seed + 1)
    for batch in batches:
        raw = torch.randint(0, 256, (batch, 3, meta.image_size, meta.image_size), generator=generator).float() / 255.0
        feed = graph_input(raw, meta.preprocess, options.include_preprocess)
        tensor = torch.from_numpy(feed)

        def torch_call() -> None:
            with torch.inference_mode():
                wrapper(tensor)

        result[f"batch_{batch}"] = {
            "batch": batch,
            "pytorch_ms": _median_ms(torch_call, options.latency_warmup, options.latency_repeats),
            "onnxruntime_ms": _median_ms(lambda: session.run(None, {name: feed}), options.latency_warmup, options.latency_repeats),
        }
    return result


@torch.no_grad()
def torch_outputs(model: nn.Module, meta: CheckpointMeta, images: torch.Tensor, softmax: bool, chunk: int = 32) -> np.ndarray:
    """The PyTorch student's logits / temperature (or probabilities) on raw images, through the reference preprocessing."""
    outputs = []
    for start in range(0, len(images), chunk):
        out = model(meta.preprocess(images[start : start + chunk])) / meta.temperature
        outputs.append(torch.softmax(out, dim=1) if softmax else out)
    return torch.cat(outputs).float().numpy()


def compare(reference: np.ndarray, exported: np.ndarray) -> dict[str, float]:
    return {
        "max_abs_diff": float(np.abs(reference - exported).max()),
        "top1_agreement": float((reference.argmax(1) == exported.argmax(1)).mean()),
    }
