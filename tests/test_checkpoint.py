"""fopro checkpoints: NAME.safetensors + NAME.json round trip, atomic writes, and one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fopro import __version__
from fopro.checkpoint import CheckpointMeta, file_sha256, load_checkpoint, load_meta, save_checkpoint, sidecar
from fopro.models.weights import build_model
from fopro.errors import FoproError
from helpers import one_line as _one_line, tiny_checkpoint

CLASSES = ["nv", "mel", "bcc"]


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    return tiny_checkpoint(tmp_path / "run" / "best", CLASSES, arch="test_resnet", train_counts=[50, 10, 2])


def test_round_trip_gives_the_same_logits(checkpoint) -> None:
    weights, source = checkpoint
    assert weights.name == "best.safetensors"
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = source(x)
    for spec in (weights, weights.with_suffix(".json"), weights.with_suffix(""), str(weights)):
        model, meta = build_model(spec)
        assert not model.training
        with torch.no_grad():
            assert torch.allclose(model(x), expected, atol=1e-6)
        assert meta.classes == CLASSES and meta.arch == "test_resnet"
    state_dict, meta = load_checkpoint(weights)
    assert set(state_dict) == set(source.state_dict())
    assert all(torch.equal(state_dict[k], v) for k, v in source.state_dict().items())
    backbone, _ = build_model(weights, head=False)
    with torch.no_grad():
        features = backbone(x)
        assert features.shape == (2, source.num_features)
        assert torch.allclose(features, source.forward_head(source.forward_features(x), pre_logits=True), atol=1e-6)


def test_json_fields_and_hash(checkpoint) -> None:
    weights, _ = checkpoint
    data = json.loads(weights.with_suffix(".json").read_text())
    assert data["format"] == "fopro-checkpoint" and data["format_version"] == 1
    assert data["arch"] == "test_resnet"
    assert data["classes"] == CLASSES and data["num_classes"] == 3
    assert data["image_size"] == 32
    assert data["mean"] == [0.485, 0.456, 0.406] and data["std"] == [0.229, 0.224, 0.225]
    assert data["train_counts"] == [50, 10, 2]
    assert data["epoch"] == 3
    assert data["metrics"] == {"val_balanced_accuracy": 0.5}
    assert data["config"] == {"seed": 0}
    assert data["fopro_version"] == __version__
    assert data["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest() == file_sha256(weights)
    meta = load_meta(weights)
    assert meta.train_counts == [50, 10, 2] and meta.num_classes == 3
    assert meta.preprocess.image_size == 32 and meta.preprocess.mean == (0.485, 0.456, 0.406)
    assert CheckpointMeta.from_dict(meta.to_dict(), "x").to_dict() == meta.to_dict()


def test_writes_are_atomic(tmp_path: Path, checkpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    weights, source = checkpoint
    assert sorted(p.name for p in weights.parent.iterdir()) == ["best.json", "best.safetensors"]
    before = weights.read_bytes(), weights.with_suffix(".json").read_bytes()

    # a failure while writing leaves the previous checkpoint and no temporary file
    import fopro.checkpoint as checkpoint_module

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", broken_save)
    meta = load_meta(weights)
    with pytest.raises(FoproError, match=f"cannot write {weights}: disk full"):  # one line for the user
        save_checkpoint(weights, source.state_dict(), meta)
    monkeypatch.undo()
    assert sorted(p.name for p in weights.parent.iterdir()) == ["best.json", "best.safetensors"]
    assert (weights.read_bytes(), weights.with_suffix(".json").read_bytes()) == before

    # non-finite weights are refused before anything is written
    bad = dict(source.state_dict())
    bad["fc.weight"] = bad["fc.weight"].clone()
    bad["fc.weight"][0, 0] = float("nan")
    with pytest.raises(FoproError, match="fc.weight is not finite"):
        save_checkpoint(tmp_path / "other" / "nan", bad, meta)
    assert not (tmp_path / "other" / "nan.safetensors").exists()

    # overwriting in place works and leaves only the two files
    save_checkpoint(weights.with_suffix(""), source.state_dict(), meta)
    assert sorted(p.name for p in weights.parent.iterdir()) == ["best.json", "best.safetensors"]


def test_sidecar_names() -> None:
    for spec in ("a/b", "a/b.safetensors", "a/b.json"):
        assert sidecar(spec) == (Path("a/b.safetensors"), Path("a/b.json"))
    assert sidecar("a/model.v2") == (Path("a/model.v2.safetensors"), Path("a/model.v2.json"))


# ------------------------------------------------------------------------------------------ errors


def test_missing_files(tmp_path: Path, checkpoint) -> None:
    weights, _ = checkpoint
    absent = tmp_path / "absent.safetensors"
    with pytest.raises(FoproError) as info:
        build_model(absent)
    _one_line(info, str(absent), "does not exist")
    weights.with_suffix(".json").unlink()
    with pytest.raises(FoproError) as info:
        build_model(weights)
    _one_line(info, str(weights.with_suffix(".json")), "is missing")


def test_corrupted_weights(checkpoint) -> None:
    weights, _ = checkpoint
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    with pytest.raises(FoproError) as info:
        build_model(weights)
    _one_line(info, str(weights), "not a valid safetensors file")
    weights.write_bytes(b"{not safetensors at all")
    with pytest.raises(FoproError) as info:
        load_checkpoint(weights)
    _one_line(info, str(weights), "corrupted")


def test_json_that_disagrees_with_its_weights(tmp_path: Path) -> None:
    weights, _ = tiny_checkpoint(tmp_path / "five", ["a", "b", "c", "d", "e"])
    meta_path = weights.with_suffix(".json")
    data = json.loads(meta_path.read_text())
    data["classes"] = ["a", "b", "c"]
    data["num_classes"] = 3
    data["train_counts"] = None
    meta_path.write_text(json.dumps(data))
    with pytest.raises(FoproError) as info:
        build_model(weights)
    _one_line(info, str(meta_path), "3 classes", "5 outputs")
    # another architecture in the JSON: the key mismatch names the weights file and the first keys
    data = json.loads(meta_path.read_text())
    data |= {"classes": ["a", "b", "c", "d", "e"], "num_classes": 5, "arch": "test_efficientnet"}
    meta_path.write_text(json.dumps(data))
    with pytest.raises(FoproError) as info:
        build_model(weights)
    _one_line(info, str(weights), "does not fit", "missing key(s) (conv_stem.weight", "unexpected key(s) (conv1.0.weight")


def test_weights_with_a_missing_tensor(checkpoint) -> None:
    weights, _ = checkpoint
    tensors = load_file(str(weights))
    del tensors["layer1.0.conv1.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(FoproError) as info:
        build_model(weights)
    _one_line(info, str(weights), "1 missing key(s) (layer1.0.conv1.weight)")


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d.update(image_size="32"), "'image_size'"),
        (lambda d: d.update(image_size=True), "'image_size'"),
        (lambda d: d.update(image_size=4), "'image_size'"),
        (lambda d: d.update(classes="nv,mel,bcc"), "'classes'"),
        (lambda d: d.update(classes=["nv", "mel", 3]), "'classes'"),
        (lambda d: d.update(classes=["nv", "nv", "bcc"]), "unique"),
        (lambda d: d.update(classes=[]), "'classes'"),
        (lambda d: d.update(num_classes=4), "'num_classes' 4"),
        (lambda d: d.update(mean=[0.5, 0.5]), "'mean'"),
        (lambda d: d.update(std=[0.5, "x", 0.5]), "'std'"),
        (lambda d: d.update(std=[0.5, 0.0, 0.5]), "'std' values must be positive"),
        (lambda d: d.update(mean=[0.5, float("nan"), 0.5]), "'mean'"),
        (lambda d: d.update(std=[0.5, float("inf"), 0.5]), "'std'"),
        (lambda d: d.update(mean=[True, 0.5, 0.5]), "'mean'"),
        (lambda d: d.update(train_counts=[1, 2]), "'train_counts'"),
        (lambda d: d.update(train_counts=[1, -2, 3]), "'train_counts'"),
        (lambda d: d.update(arch=None), "'arch'"),
        (lambda d: d.update(format="something-else"), "'format'"),
        (lambda d: d.update(format_version=99), "'format_version' 99"),
        (lambda d: d.pop("format_version"), "'format_version'"),
    ],
)
def test_json_with_bad_types(checkpoint, change, expected: str) -> None:
    weights, _ = checkpoint
    meta_path = weights.with_suffix(".json")
    data = json.loads(meta_path.read_text())
    change(data)
    meta_path.write_text(json.dumps(data))
    with pytest.raises(FoproError) as info:
        build_model(weights)
    _one_line(info, str(meta_path), expected, "metadata is invalid")


@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]", "null", "\udcff"])
def test_json_that_is_not_an_object(checkpoint, text: str) -> None:
    weights, _ = checkpoint
    meta_path = weights.with_suffix(".json")
    meta_path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(FoproError) as info:
        load_meta(weights)
    _one_line(info, str(meta_path))


def test_unknown_architecture_in_json(checkpoint) -> None:
    weights, _ = checkpoint
    meta_path = weights.with_suffix(".json")
    data = json.loads(meta_path.read_text())
    data["arch"] = "no_such_model_xyz"
    meta_path.write_text(json.dumps(data))
    with pytest.raises(FoproError) as info:
        build_model(weights)
    _one_line(info, str(meta_path), "no_such_model_xyz is not a timm model")


def test_checkpoint_files_get_the_usual_permissions(checkpoint) -> None:
    """Readable by the group and others under the usual umask (a colleague evaluates the run), though mkstemp and
    safetensors make 0600 files."""
    umask = os.umask(0)
    os.umask(umask)
    for path in sidecar(checkpoint[0]):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
