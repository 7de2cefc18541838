"""Reading weight files safely (safetensors, or pickles with weights_only=True), key remapping, strict loading
into timm models with one-line errors that name the mismatched keys."""

from __future__ import annotations

import difflib
import pickle
import re
import sys
import warnings
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from fopro.checkpoint import CheckpointMeta, load_checkpoint, sidecar
from fopro.errors import FoproError, first_line
from fopro.models.heads import ProjectedClassifier, classifier_name, set_classifier

MAX_LISTED = 3
# Wrappers around a model's state_dict in common checkpoint files, tried in this order.
CONTAINER_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "module", "teacher", "student")
# Prefixes added by training frameworks; MoCo v2 keeps the query encoder under module.encoder_q.
MOCO_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.")
WRAPPER_PREFIXES = ("module.", "backbone.", "encoder.", "model.")


def read_state_dict(path: str | Path, option: str = "--teacher-weights") -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a (weights-only) pickle; never runs code from the file."""
    path = Path(path)
    if not path.is_file():
        raise FoproError(f"{option} {path} does not exist: give the path of a local .safetensors or .pth file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise FoproError(f"{path} is not a valid safetensors file ({first_line(err)}): the file may be corrupted; copy it again") from err
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols: noise next to the one-line error
            warnings.filterwarnings("ignore", message=".*weights_only.*", category=UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise FoproError(
            f"{path} was refused: loading it would run code from the file ({_refusal_reason(err)}); "
            "convert it to safetensors (or a plain state_dict) in a trusted environment"
        ) from err
    except Exception as err:  # corrupt pickles raise assorted errors (IndexError, KeyError, RuntimeError, EOFError...)
        raise FoproError(f"{path} is not a readable PyTorch weights file ({first_line(err)}): check the file") from err
    return _unwrap(loaded, path)


def _refusal_reason(err: BaseException) -> str:
    """What the weights-only unpickler refused (e.g. 'it imports os.system'), without torch's multi-line advice
    on how to load the file anyway, nor its terminal escape codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found:
        return f"it imports {found.group(1)}"
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    return found.group(1).strip()[:200] if found else first_line(Exception(text))


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(loaded, dict) and not _is_state_dict(loaded):
        inner = next((loaded[k] for k in CONTAINER_KEYS if isinstance(loaded.get(k), dict)), None)
        if inner is None:
            break
        loaded = inner
    if not isinstance(loaded, dict):
        raise FoproError(f"{path} holds no state_dict (found {type(loaded).__name__}): save model.state_dict()")
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise FoproError(f"{path} holds no tensors: save model.state_dict()")
    return tensors


def _is_state_dict(candidate: dict) -> bool:
    return bool(candidate) and sum(isinstance(v, torch.Tensor) for v in candidate.values()) >= len(candidate) / 2


def strip_wrappers(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Remove MoCo / DDP / framework prefixes; returns the state_dict and what was recognised."""
    for prefix in MOCO_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}, f"MoCo ({prefix})"
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items()}, f"prefix {prefix}"
    return state_dict, "plain"


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, keep_classifier: bool) -> None:
    """Load `state_dict` into a timm model strictly, through the model's own timm checkpoint filter.

    The classifier is taken from the file only with `keep_classifier` (a fopro checkpoint of the same
    classes); otherwise it is dropped, as timm does when the class count differs.
    """
    state_dict, _ = strip_wrappers(state_dict)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as err:  # timm filters raise assorted errors on foreign layouts
            raise FoproError(f"{source} does not fit {_arch(model)}: {first_line(err)}") from err
    heads = classifier_prefixes(model)
    if not keep_classifier:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(heads)}
    expected = model.state_dict()
    skippable = heads if not keep_classifier else ()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked") and not k.startswith(skippable)]
    # BatchNorm step counters carry no weights: neither missing nor extra ones are worth an error
    unexpected = [k for k in state_dict if k not in expected and not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state_dict
        if k in expected and state_dict[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s) ({', '.join(missing[:MAX_LISTED])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) ({', '.join(unexpected[:MAX_LISTED])})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es) ({'; '.join(mismatched[:MAX_LISTED])})")
    if problems:
        raise FoproError(f"{source} does not fit {_arch(model)}: {', '.join(problems)}; give the architecture these weights belong to")
    model.load_state_dict(state_dict, strict=False)


def _arch(model: nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def check_model_name(name: str, option: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models() for the names"
        raise FoproError(f"{option} {name} is not a timm model: {hint}")


def create_timm_model(name: str, num_classes: int, image_size: int | None, option: str, pretrained: bool = False) -> nn.Module:
    """A timm model; fixed-size models (ViTs) are built for `image_size`."""
    check_model_name(name, option)
    kwargs = {}
    cfg = timm.get_pretrained_cfg(name)
    if image_size is not None and cfg is not None and getattr(cfg, "fixed_input_size", False):
        kwargs["img_size"] = image_size
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except Exception as err:  # hub and model-constructor failures come in many types
        if pretrained:
            raise FoproError(
                f"cannot get the pretrained weights of {name} ({first_line(err)}): offline machines need a local "
                "file: download it elsewhere and pass it with the weights option"
            ) from err
        raise FoproError(f"cannot build {option} {name}: {first_line(err)}") from err


def embedding_dim(model: nn.Module) -> int:
    """Width of the pooled pre-logits features: timm's head_hidden_size, which differs from num_features when the
    head has its own layer after pooling (MobileNetV3's conv_head: 576 -> 1024)."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def patch_size(model: nn.Module) -> int | None:
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "patch_size", None)
    if size is None:
        return None
    return int(size[0]) if isinstance(size, (tuple, list)) else int(size)


# sizes tried, smallest first, to tell the user which input size an architecture does take
CANDIDATE_SIZES = (16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def forward_error(model: nn.Module, size: int) -> str | None:
    """Why one blank `size` x `size` image cannot go through `model` (None when it can).

    Eval mode and no gradients: running statistics, RNG and weights are left untouched.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except Exception as err:  # layers fail on too-small inputs with assorted errors (RuntimeError, ValueError, AssertionError)
        return first_line(err)
    finally:
        model.train(was_training)
    return None


def check_input_size(model: nn.Module, size: int) -> tuple[str, int | None] | None:
    """None when `model` takes `size`-px images; else (the failure, the smallest candidate size that works or None).

    Fixed-size models (ViTs) are built for one size, so no other size is tried for them.
    """
    error = forward_error(model, size)
    if error is None:
        return None
    fixed = bool((getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size"))
    larger = () if fixed else [s for s in CANDIDATE_SIZES if s > size]
    return error, next((s for s in larger if forward_error(model, s) is None), None)


# --- fopro checkpoints -------------------------------------------------------------------------------


def build_model(path: str | Path, head: bool = True) -> tuple[nn.Module, CheckpointMeta]:
    """The timm model of a checkpoint with its weights; with head=False the classifier is removed."""
    state_dict, meta = load_checkpoint(path)
    weights_path, meta_path = sidecar(path)
    model = create_timm_model(meta.arch, meta.num_classes, meta.image_size, option=f"{meta_path} arch")
    if meta.head == "fc_t":
        set_classifier(model, ProjectedClassifier(embedding_dim(model), projection_dim(model, state_dict, str(weights_path)), meta.num_classes))
    check_head(model, state_dict, meta, str(meta_path))
    load_weights(model, state_dict, str(weights_path), keep_classifier=True)
    if not head:
        model.reset_classifier(0)
    model.eval()
    return model, meta


def projection_dim(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> int:
    """The width of p(f) in the weights of a head-fc_t checkpoint (the teacher's embedding size)."""
    key = f"{classifier_name(model)}.fc_t.weight"
    if key not in state_dict or state_dict[key].ndim != 2:
        raise FoproError(f"{source} has no {key}, which its JSON's head fc_t needs: the JSON does not belong to these weights")
    return int(state_dict[key].shape[1])


def check_head(model: nn.Module, state_dict: dict[str, torch.Tensor], meta: CheckpointMeta, source: str) -> None:
    names = {id(p): n for n, p in model.named_parameters()}
    name = names.get(id(getattr(model.get_classifier(), "weight", None)))
    if name and name in state_dict and state_dict[name].shape[0] != meta.num_classes:
        raise FoproError(
            f"{source} lists {meta.num_classes} classes but the weights' classifier has {state_dict[name].shape[0]} outputs: "
            "the JSON does not belong to these weights"
        )
