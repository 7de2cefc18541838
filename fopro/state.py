"""Resumable training state as safetensors + JSON (no pickle): nested dicts/lists of tensors and plain values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import save_file

from fopro.errors import FoproError
from fopro.io import atomic_path


def flatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors by references into `tensors`; keep dict keys' types (optimizer states use int keys)."""
    if isinstance(tree, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = tree.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(tree, dict):
        return {"__dict__": [[k, flatten(v, tensors)] for k, v in tree.items()]}
    if isinstance(tree, tuple):
        return {"__tuple__": [flatten(v, tensors) for v in tree]}
    if isinstance(tree, list):
        return [flatten(v, tensors) for v in tree]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"cannot store a {type(tree).__name__} in a training state")


def unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__tuple__" in tree:
            return tuple(unflatten(v, tensors) for v in tree["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in tree["__dict__"]}
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    return tree


def save_state(path: Path, state: dict[str, Any]) -> None:
    """One safetensors file, written atomically: the tensors, and the rest of the tree as JSON in its metadata."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"fopro_state": json.dumps(skeleton)})


def load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FoproError(f"{path} is missing: there is no resumable state in {path.parent}; start a new run instead")
    try:
        with safe_open(str(path), framework="pt") as handle:
            skeleton = json.loads((handle.metadata() or {})["fopro_state"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (json.JSONDecodeError, SafetensorError, KeyError, OSError) as err:
        raise FoproError(f"{path}: the resumable state is damaged ({err}); start a new run") from err
    return unflatten(skeleton, tensors)
