"""The classifier a checkpoint keeps (--deploy-head): with fc_t, EKD's second head on the projection, p then fc_t
take the place of the timm model's classifier, so that the checkpoint is still one timm model that eval, export,
ONNX and the teacher / student-weights loaders run unchanged; the reference is the training modules themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch

from fopro.checkpoint import CheckpointMeta, save_checkpoint
from fopro.errors import FoproError
from fopro.export import export_onnx
from fopro.export_options import ExportOptions
from fopro.losses import SupervisedLoss
from fopro.methods import MethodConfig, build_method
from fopro.model_card import build_card
from fopro.models import StudentOptions, Teacher, TeacherOptions, create_student, load_teacher
from fopro.models.heads import pooled_features
from fopro.models.weights import build_model
from fopro.preprocess import Preprocess
from helpers import one_line

SIZE = 32
CLASSES = ["a", "b", "c"]


def _trained_method(arch: str, deploy_head: str = "fc_t", seed: int = 0):
    """An EKD method (random teacher of another width), its heads' BatchNorm statistics made non-trivial."""
    torch.manual_seed(seed)
    teacher = Teacher(timm.create_model("test_vit", num_classes=0).eval(), Preprocess(SIZE, (0.5,) * 3, (0.5,) * 3), "test_vit")
    student, preprocess = create_student(StudentOptions(arch, image_size=SIZE), len(CLASSES))
    method = build_method(MethodConfig(name="ekd", deploy_head=deploy_head), student, preprocess,
                          SupervisedLoss("balanced_softmax", [8, 4, 2]), teacher, None)
    with torch.no_grad():
        batchnorm = method.heads.projector[1]
        batchnorm.running_mean.normal_(0, 0.3)
        batchnorm.running_var.uniform_(0.5, 2.0)
    return method.eval(), preprocess


def _save(method, preprocess: Preprocess, path: Path, arch: str) -> Path:
    meta = CheckpointMeta(arch=arch, classes=CLASSES, image_size=SIZE, mean=list(preprocess.mean), std=list(preprocess.std),
                          head=method.config.deploy_head)
    return save_checkpoint(path, method.deployed_state(), meta)


def _images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["test_resnet", "test_convnext", "test_vit", "test_mambaout"])
def test_a_fc_t_checkpoint_computes_fc_t_of_p_of_f(arch: str, tmp_path: Path) -> None:
    """resnet: fc; convnext and mambaout: head.fc (mambaout's pooled feature is wider than num_features); vit: head."""
    method, preprocess = _trained_method(arch)
    x = preprocess(_images())
    with torch.no_grad():
        expected = method.heads.fc_t(method.heads.projector(pooled_features(method.student, x)))
        assert torch.allclose(method.deployed()(x), expected, atol=1e-6)  # what validation scores in training
        model, meta = build_model(_save(method, preprocess, tmp_path / "best", arch))
        assert meta.head == "fc_t" and not model.training
        assert torch.allclose(model(x), expected, atol=1e-5)
        assert not torch.allclose(expected, method.student(x), atol=1e-3)  # not the student's own fc


def test_the_model_card_names_the_classifier(tmp_path: Path) -> None:
    for head, says in (("fc_t", "classifier `fc_t(p(f))`, EKD's second head"), ("fc", "classifier `fc(f)`, its own")):
        method, preprocess = _trained_method("test_resnet", deploy_head=head)
        assert says in build_card(_save(method, preprocess, tmp_path / head, "test_resnet"))


def test_a_fc_checkpoint_is_the_plain_timm_student(tmp_path: Path) -> None:
    method, preprocess = _trained_method("test_resnet", deploy_head="fc")
    weights = _save(method, preprocess, tmp_path / "best", "test_resnet")
    assert json.loads(weights.with_suffix(".json").read_text())["head"] == "fc"
    model, _ = build_model(weights)
    x = preprocess(_images())
    with torch.no_grad():
        assert torch.allclose(model(x), method.student(x), atol=1e-6) and method.deployed() is method.student


def test_the_onnx_export_of_a_fc_t_checkpoint_matches_onnxruntime(tmp_path: Path) -> None:
    method, preprocess = _trained_method("test_resnet")
    weights = _save(method, preprocess, tmp_path / "best", "test_resnet")
    out = tmp_path / "student.onnx"
    report = export_onnx(weights, out, ExportOptions(check_images=8, latency_repeats=1, latency_warmup=0))
    assert report["check"]["passed"] is True
    x = preprocess(_images(5))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy().astype(np.float32)})[0]
    with torch.no_grad():
        expected = method.heads.fc_t(method.heads.projector(pooled_features(method.student, x))).numpy()
    assert np.abs(got - expected).max() < 1e-4
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert metadata["head"] == "fc_t"


def test_a_fc_t_checkpoint_as_teacher_and_as_student_weights(tmp_path: Path) -> None:
    """As a teacher its embedding is the pooled feature f (the classifier, p and fc_t, is dropped); as
    --student-weights the backbone is kept and a fresh fc made for the new classes."""
    method, preprocess = _trained_method("test_resnet")
    weights = _save(method, preprocess, tmp_path / "best", "test_resnet")
    x = preprocess(_images())
    teacher, _ = load_teacher(TeacherOptions(str(weights)), SIZE)
    with torch.no_grad():
        assert teacher.embed_dim == method.student.num_features
        assert torch.allclose(teacher.model(x), pooled_features(method.student, x), atol=1e-5)
    student, _ = create_student(StudentOptions("test_resnet", image_size=SIZE, weights=weights), num_classes=5)
    student.eval()
    with torch.no_grad():
        assert isinstance(student.get_classifier(), torch.nn.Linear) and student(x).shape == (4, 5)
        assert torch.allclose(pooled_features(student, x), pooled_features(method.student, x), atol=1e-5)


def test_a_head_the_weights_do_not_have_is_one_clear_error(tmp_path: Path) -> None:
    method, preprocess = _trained_method("test_resnet", deploy_head="fc")
    weights = _save(method, preprocess, tmp_path / "best", "test_resnet")
    meta = weights.with_suffix(".json")
    data = json.loads(meta.read_text())
    meta.write_text(json.dumps({**data, "head": "fc_t"}))
    with pytest.raises(FoproError) as info:
        build_model(weights)
    one_line(info, str(weights), "fc.fc_t.weight", "does not belong")
    meta.write_text(json.dumps({**data, "head": "projector"}))
    with pytest.raises(FoproError) as info:
        build_model(weights)
    one_line(info, str(meta), "'head'", "fc, fc_t")


@pytest.mark.parametrize("name, second_head", [("kd", True), ("ekd", False)])
def test_fc_t_needs_the_second_head(name: str, second_head: bool) -> None:
    teacher = Teacher(timm.create_model("test_resnet", num_classes=0).eval(), Preprocess(SIZE, (0.5,) * 3, (0.5,) * 3), "t")
    student, preprocess = create_student(StudentOptions("test_resnet", image_size=SIZE), 3)
    with pytest.raises(FoproError, match="second head"):
        build_method(MethodConfig(name=name, second_head=second_head, deploy_head="fc_t"), student, preprocess,
                     SupervisedLoss("balanced_softmax", [8, 4, 2]), teacher, None)
