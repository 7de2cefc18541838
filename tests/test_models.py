"""Teacher sources (timm state_dicts, MoCo v2, torchvision ResNet, DINOv2, fopro checkpoints), the frozen
teacher, the student, and the one-line errors of weight loading."""

from __future__ import annotations

import copy
import os
import pickle
import socket
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from fopro.errors import FoproError
from fopro.losses import SupervisedLoss
from fopro.methods import MethodConfig, build_method
from fopro.models import StudentOptions, Teacher, TeacherOptions, create_student, features_and_logits, load_teacher
from fopro.models.teacher import teacher_image_size
from fopro.preprocess import Preprocess
from fopro.models.weights import load_weights, read_state_dict, strip_wrappers
from helpers import one_line as _one_line, tiny_checkpoint

SIZE = 32


def _images(n: int = 2, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _randomise_buffers(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and layer scales, so that a wrong or skipped tensor shows in the features."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_mean"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            elif name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith(".gamma"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
    return model.eval()


def _source(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return _randomise_buffers(timm.create_model(arch, pretrained=False, **kwargs), seed)


def _pooled(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _teacher_features(teacher: Teacher, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return teacher(x)


def _assert_same_features(teacher: Teacher, source: torch.nn.Module, x: torch.Tensor) -> None:
    expected = _pooled(source, teacher.preprocess(x))
    got = _teacher_features(teacher, x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()


# ------------------------------------------------------------------------------------------ timm state_dicts


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_state_dict_as_teacher(tmp_path: Path, suffix: str) -> None:
    source = _source("resnet10t", num_classes=10)
    path = tmp_path / f"resnet10t{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    teacher, notes = load_teacher(TeacherOptions("resnet10t", weights=path, pretrained=False), SIZE)
    assert notes == []
    assert teacher.embed_dim == 512
    assert teacher.preprocess.image_size == SIZE
    assert str(path) in teacher.description
    _assert_same_features(teacher, source, _images())


def test_ddp_prefixed_and_wrapped_state_dict(tmp_path: Path) -> None:
    source = _source("test_resnet", num_classes=5)
    path = tmp_path / "ddp.pth"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    teacher, _ = load_teacher(TeacherOptions("test_resnet", weights=path), SIZE)
    assert "prefix module." in teacher.description
    _assert_same_features(teacher, source, _images())


# ------------------------------------------------------------------------------------------ MoCo v2


def test_moco_v2_checkpoint_as_teacher(tmp_path: Path) -> None:
    source = _source("resnet10t", seed=1, num_classes=0)
    key_encoder = _source("resnet10t", seed=2, num_classes=0)
    generator = torch.Generator().manual_seed(0)
    state_dict = {f"module.encoder_q.{k}": v for k, v in source.state_dict().items()}
    state_dict |= {f"module.encoder_k.{k}": v for k, v in key_encoder.state_dict().items()}
    mlp = {"fc.0.weight": (512, 512), "fc.0.bias": (512,), "fc.2.weight": (128, 512), "fc.2.bias": (128,)}
    for name, shape in mlp.items():
        state_dict[f"module.encoder_q.{name}"] = torch.randn(shape, generator=generator)
        state_dict[f"module.encoder_k.{name}"] = torch.randn(shape, generator=generator)
    state_dict["module.queue"] = torch.randn(128, 64, generator=generator)
    state_dict["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    optimizer = torch.optim.SGD(source.parameters(), lr=0.03, momentum=0.9)
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet10t", "state_dict": state_dict, "optimizer": optimizer.state_dict()}, path)

    teacher, _ = load_teacher(TeacherOptions("resnet10t", weights=path), SIZE)
    assert "MoCo" in teacher.description
    _assert_same_features(teacher, source, _images())
    with pytest.raises(AssertionError):  # not the key encoder
        _assert_same_features(teacher, key_encoder, _images())


# ------------------------------------------------------------------------------------------ torchvision


def test_torchvision_resnet18_state_dict_as_teacher(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    reference = _randomise_buffers(torchvision.models.resnet18(weights=None), seed=3)
    path = tmp_path / "resnet18-torchvision.pth"
    torch.save(reference.state_dict(), path)
    teacher, _ = load_teacher(TeacherOptions("resnet18", weights=path), SIZE)
    assert teacher.embed_dim == 512
    x = _images()
    reference.fc = torch.nn.Identity()  # torchvision's forward: ... avgpool -> flatten -> fc
    with torch.no_grad():
        expected = reference(teacher.preprocess(x))
    got = _teacher_features(teacher, x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()


# ------------------------------------------------------------------------------------------ DINOv2


def _dinov2_original_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The keys of Meta's DINOv2 hub checkpoints: timm's names plus `mask_token`, `blocks.N.ls1.gamma`, no head."""
    state_dict = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert any(k.endswith("ls1.gamma") for k in state_dict)
    state_dict["mask_token"] = torch.zeros(1, model.embed_dim)
    return state_dict


@pytest.fixture(scope="module")
def dinov2_28() -> torch.nn.Module:
    """timm's DINOv2 ViT-S/14 (22M parameters) at 28 px, random weights: built once for the module.

    timm's truncated-normal initialisation of 22M weights is slow on 2 CPU cores: skip it, draw plain normals.
    """
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=28, weight_init="skip")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.normal_(1.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return _randomise_buffers(model)


def test_dinov2_teacher_with_original_keys(tmp_path: Path, dinov2_28: torch.nn.Module) -> None:
    source = dinov2_28
    path = tmp_path / "dinov2_vits14.pth"
    torch.save(_dinov2_original_layout(source), path)
    teacher, notes = load_teacher(TeacherOptions("vit_small_patch14_dinov2", weights=path), SIZE)
    assert teacher.preprocess.image_size == 28  # the student's 32 px rounded to the patch size 14
    assert any("28" in note and "14" in note for note in notes)
    assert teacher.embed_dim == 384
    _assert_same_features(teacher, source, _images())


def test_dinov2_checkpoint_at_518_px_is_resampled_like_timm(tmp_path: Path, dinov2_28: torch.nn.Module) -> None:
    state_dict = _dinov2_original_layout(dinov2_28)
    # the hub checkpoints are trained at 518 px: 1 + 37 x 37 position embeddings
    state_dict["pos_embed"] = torch.randn(1, 1 + 37 * 37, 384, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "dinov2_vits14_518.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    model = copy.deepcopy(dinov2_28)  # a 28 px model (2 x 2 patches), as load_teacher builds it
    with torch.no_grad():
        model.pos_embed.zero_()
    load_weights(model, read_state_dict(path), str(path), keep_classifier=False)
    assert model.pos_embed.shape == (1, 1 + 2 * 2, 384)
    # exactly what timm's own filter makes of the file (position embeddings resampled to 2 x 2)
    expected = sys.modules[type(model).__module__].checkpoint_filter_fn(dict(state_dict), model)
    assert set(expected) == set(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert not torch.equal(model.pos_embed, dinov2_28.pos_embed)


def test_teacher_image_size_rounding_and_errors() -> None:
    name = "vit_small_patch14_dinov2"
    assert teacher_image_size(name, None, 32)[0] == 28
    assert teacher_image_size(name, None, 64)[0] == 70
    assert teacher_image_size(name, None, 5)[0] == 14
    assert teacher_image_size(name, None, 224) == (224, None)
    assert teacher_image_size(name, 42, 32) == (42, None)
    with pytest.raises(FoproError, match=r"--teacher-image-size 30 is not a multiple of .*14: use 28 or 42") as info:
        teacher_image_size(name, 30, 32)
    assert "\n" not in str(info.value)
    with pytest.raises(FoproError, match="positive"):
        teacher_image_size("resnet18", 0, 32)
    assert teacher_image_size("resnet18", None, 33) == (33, None)
    assert teacher_image_size("resnet18", 50, 33) == (50, None)
    with pytest.raises(FoproError, match="not a multiple"):
        load_teacher(TeacherOptions(name, image_size=30, pretrained=False), SIZE)


# ------------------------------------------------------------------------------------------ fopro checkpoint


def test_fopro_checkpoint_as_teacher(tmp_path: Path) -> None:
    weights, source = tiny_checkpoint(tmp_path / "teacher", ["a", "b", "c"], arch="test_resnet", image_size=48)
    _randomise_buffers(source)
    for spec in (str(weights), str(weights.with_suffix(".json"))):
        teacher, _ = load_teacher(TeacherOptions(spec), SIZE)
        assert teacher.preprocess.image_size == 48  # the checkpoint's own size
        assert teacher.embed_dim == source.num_features
        assert "fopro checkpoint" in teacher.description
    weights, source = tiny_checkpoint(tmp_path / "teacher2", ["a", "b", "c"], arch="test_resnet", image_size=SIZE)
    teacher, _ = load_teacher(TeacherOptions(str(weights)), SIZE)
    _assert_same_features(teacher, source, _images())
    bare = tmp_path / "bare.pth"
    torch.save(source.state_dict(), bare)
    with pytest.raises(FoproError, match="--teacher-weights"):
        load_teacher(TeacherOptions(str(bare)), SIZE)


def test_teacher_is_frozen_but_passes_gradients_to_its_input(tmp_path: Path) -> None:
    teacher, notes = load_teacher(TeacherOptions("test_resnet", pretrained=False), SIZE)
    assert any("random" in note for note in notes)
    assert teacher.train() is teacher
    assert not teacher.training and not any(m.training for m in teacher.modules())
    wrapper = torch.nn.Sequential(teacher)
    wrapper.train()
    assert not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert sum(p.numel() for p in teacher.parameters() if p.requires_grad) == 0
    x = _images().requires_grad_(True)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = teacher(x)
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # eval mode: BatchNorm running statistics do not move
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_pretrained_teacher_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))

    def no_network(*args, **kwargs):
        raise AssertionError("the offline test tried to open a network connection")

    # pretrained=True is the point here (the hub path's offline error); any connection attempt fails the test
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(FoproError, match="pretrained weights of resnet10t.*offline") as info:
        load_teacher(TeacherOptions("resnet10t", pretrained=True), SIZE)
    assert "\n" not in str(info.value)
    with pytest.raises(FoproError, match="pretrained weights"):
        create_student(StudentOptions("resnet10t", SIZE, pretrained=True), 3)


# ------------------------------------------------------------------------------------------ errors


def test_missing_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FoproError) as info:
        load_teacher(TeacherOptions("test_resnet", weights=path), SIZE)
    _one_line(info, str(path), "does not exist")


def test_unknown_architecture(tmp_path: Path) -> None:
    with pytest.raises(FoproError) as info:
        load_teacher(TeacherOptions("resnet18x", pretrained=False), SIZE)
    _one_line(info, "resnet18x is not a timm model", "did you mean")


def test_key_mismatch_names_the_first_keys(tmp_path: Path) -> None:
    state_dict = _source("test_resnet").state_dict()
    state_dict["stem_conv.weight"] = state_dict.pop("conv1.0.weight")
    state_dict["extra.bias"] = torch.zeros(3)
    path = tmp_path / "renamed.safetensors"
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    with pytest.raises(FoproError) as info:
        load_teacher(TeacherOptions("test_resnet", weights=path), SIZE)
    _one_line(info, str(path), "1 missing key(s) (conv1.0.weight)", "2 unexpected key(s) (", "stem_conv.weight", "extra.bias")


def test_shape_mismatch_and_wrong_architecture(tmp_path: Path) -> None:
    state_dict = _source("test_resnet").state_dict()
    state_dict["conv1.0.weight"] = torch.zeros(7, 3, 3, 3)
    path = tmp_path / "shapes.pth"
    torch.save(state_dict, path)
    with pytest.raises(FoproError) as info:
        load_teacher(TeacherOptions("test_resnet", weights=path), SIZE)
    message = _one_line(info, str(path), "1 shape mismatch(es) (conv1.0.weight (7, 3, 3, 3) vs")
    assert "missing" not in message
    resnet = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in _source("resnet10t").state_dict().items()}, str(resnet))
    with pytest.raises(FoproError) as info:
        load_teacher(TeacherOptions("resnet18", weights=resnet), SIZE)
    _one_line(info, str(resnet), "does not fit resnet18", "missing key(s)")


def test_corrupted_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in _source("test_resnet").state_dict().items()}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FoproError) as info:
        read_state_dict(path)
    _one_line(info, str(path), "not a valid safetensors file")
    path.write_bytes(b"\x00" * 7)
    with pytest.raises(FoproError) as info:
        load_teacher(TeacherOptions("test_resnet", weights=path), SIZE)
    _one_line(info, str(path), "safetensors")


def test_unreadable_or_empty_pickles(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(FoproError) as info:
        read_state_dict(garbage)
    _one_line(info, str(garbage))
    numbers = tmp_path / "numbers.pth"
    torch.save([1, 2, 3], numbers)
    with pytest.raises(FoproError) as info:
        read_state_dict(numbers)
    _one_line(info, str(numbers), "no state_dict")
    no_tensors = tmp_path / "no_tensors.pth"
    torch.save({"epoch": 1, "lr": 0.1}, no_tensors)
    with pytest.raises(FoproError) as info:
        read_state_dict(no_tensors)
    _one_line(info, str(no_tensors), "no tensors")


class _RunsCode:
    """Unpickling this calls os.system / builtins.exec: a malicious checkpoint."""

    def __init__(self, call, argument: str):
        self.call = call
        self.argument = argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.parametrize("how", ["pickle-os-system", "torch-save-os-system", "torch-save-exec"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if how == "pickle-os-system":
        with open(path, "wb") as handle:
            pickle.dump({"state_dict": _RunsCode(os.system, f"touch {marker}")}, handle, protocol=2)
    elif how == "torch-save-os-system":
        torch.save({"conv1.0.weight": torch.zeros(1), "evil": _RunsCode(os.system, f"touch {marker}")}, path)
    else:
        import builtins

        torch.save({"x": _RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').close()")}, path)
    with pytest.raises(FoproError) as info:
        read_state_dict(path)
    _one_line(info, str(path), "refused")
    with pytest.raises(FoproError):
        load_teacher(TeacherOptions("test_resnet", weights=path), SIZE)
    assert not marker.exists()


def test_strip_wrappers() -> None:
    tensor = torch.zeros(1)
    assert strip_wrappers({"a": tensor})[1] == "plain"
    stripped, what = strip_wrappers({"module.a": tensor, "module.b": tensor})
    assert set(stripped) == {"a", "b"} and what == "prefix module."
    stripped, what = strip_wrappers({"module.encoder_q.a": tensor, "module.encoder_k.a": tensor, "module.queue": tensor})
    assert set(stripped) == {"a"} and "MoCo" in what
    stripped, _ = strip_wrappers({"module.a": tensor, "b": tensor})
    assert set(stripped) == {"module.a", "b"}


# ------------------------------------------------------------------------------------------ student


def test_student_and_its_weights(tmp_path: Path) -> None:
    model, preprocess = create_student(StudentOptions("test_resnet", image_size=SIZE), num_classes=3)
    assert preprocess.image_size == SIZE
    model.eval()
    x = preprocess(_images())
    features, logits = features_and_logits(model, x)
    assert features.shape == (2, model.num_features) and logits.shape == (2, 3)
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-6)
    # backbone weights from a file of another head size: the classifier is dropped, the backbone kept
    source = _source("test_resnet", seed=5, num_classes=1000)
    path = tmp_path / "student.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded, _ = create_student(StudentOptions("test_resnet", image_size=SIZE, weights=path), num_classes=3)
    loaded.eval()
    assert torch.allclose(_pooled(loaded, x), _pooled(source, x), atol=1e-5)
    assert loaded.get_classifier().out_features == 3


def test_load_weights_keeps_the_classifier_only_when_asked() -> None:
    source = _source("test_resnet", num_classes=4)
    target = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    load_weights(target, source.state_dict(), "source", keep_classifier=True)
    assert torch.equal(target.fc.weight, source.fc.weight)
    other = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    before = other.fc.weight.clone()
    load_weights(other, source.state_dict(), "source", keep_classifier=False)
    assert torch.equal(other.fc.weight, before)
    assert torch.equal(other.conv1[0].weight, source.conv1[0].weight)


def test_extra_batchnorm_counters_are_not_an_error() -> None:
    """Checkpoints from frameworks with frozen BatchNorm differ only in num_batches_tracked: that is no mismatch."""
    source = _source("test_resnet", num_classes=4)
    state_dict = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    state_dict["layer1.0.frozen_bn.num_batches_tracked"] = torch.tensor(7)
    target = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    load_weights(target, state_dict, "source", keep_classifier=True)
    x = _images()
    assert torch.allclose(_pooled(target, x), _pooled(source, x), atol=1e-6)


def test_models_whose_head_widens_the_pooled_features_distil() -> None:
    """MobileNetV3 has a layer after pooling (conv_head, 288 -> 1024 here): the teacher's embedding and the
    projector's input are that layer's width (timm's head_hidden_size), not num_features."""
    torch.manual_seed(0)
    source = _source("mobilenetv3_small_050", num_classes=0)
    teacher = Teacher(source, Preprocess(SIZE, (0.5,) * 3, (0.5,) * 3), "mobilenetv3_small_050")
    assert teacher.embed_dim == source(torch.rand(2, 3, SIZE, SIZE)).shape[1] == 1024 != source.num_features
    student, preprocess = create_student(StudentOptions("mobilenetv3_small_050", image_size=SIZE), 3)
    method = build_method(MethodConfig(name="ekd"), student, preprocess, SupervisedLoss("balanced_softmax", [8, 4, 2]), teacher, None)
    method.train()
    loss, parts = method.step(torch.rand(4, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 0]), 0)
    assert torch.isfinite(loss) and set(parts) >= {"sup", "kd"}
