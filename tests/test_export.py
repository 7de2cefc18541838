"""`fopro export --onnx`: faithful graphs (ONNX vs PyTorch), batch axes, metadata, preprocessing/softmax inside,
fp16/int8, `fopro eval` on the .onnx alone, atomic writes and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image
from typer.testing import CliRunner

from fopro.checkpoint import CheckpointMeta, file_sha256, save_checkpoint, sidecar
from fopro.models.weights import build_model
from fopro.cli import app
from fopro.data import DataOptions
from fopro.errors import FoproError
from fopro.evaluate import load_predictor
from fopro.export import export_onnx
from fopro.export_options import ExportOptions
from fopro.onnx_model import OnnxPredictor

CLASSES = ["akiec", "bcc", "mel"]
SIZE = 32
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
# a quick check: the latency numbers are reported, not asserted
FAST = dict(latency_repeats=2, latency_warmup=1)


def make_data(root: Path, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def make_checkpoint(path: Path, arch: str) -> Path:
    torch.manual_seed(0)
    kwargs = {"img_size": SIZE} if arch.startswith("test_vit") else {}
    model = timm.create_model(arch, pretrained=False, num_classes=len(CLASSES), **kwargs)
    meta = CheckpointMeta(arch=arch, classes=CLASSES, image_size=SIZE, mean=MEAN, std=STD, train_counts=[30, 10, 4], epoch=1)
    return save_checkpoint(path, model.state_dict(), meta)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two shared CPU cores: one intra-op thread avoids oversubscription (latencies are reported, not asserted)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: make_checkpoint(root / arch, arch) for arch in ("resnet10t", "test_vit")}


def raw_images(n: int, seed: int = 1) -> torch.Tensor:
    """Raw [0, 1] images on the uint8 grid, like the dataset's."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=generator).float() / 255.0


@torch.no_grad()
def reference(checkpoint: Path, images: torch.Tensor, softmax: bool = False) -> np.ndarray:
    model, meta = build_model(checkpoint)
    out = model(meta.preprocess(images))
    return (torch.softmax(out, dim=1) if softmax else out).numpy()


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def normalised(images: torch.Tensor) -> np.ndarray:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return ((images - mean) / std).numpy().astype(np.float32)


@pytest.mark.parametrize("arch", ["resnet10t", "test_vit"])
def test_fp32_export_matches_pytorch_with_dynamic_batch(arch, checkpoints, data_root, tmp_path):
    out = tmp_path / f"{arch}.onnx"
    report = export_onnx(checkpoints[arch], out, ExportOptions(**FAST), DataOptions(data=data_root))
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    check = report["check"]
    assert check["passed"] is True and check["top1_agreement"] == 1.0 and check["max_abs_diff"] < 1e-4
    assert check["images"] == 12 and "val" in check["source"]
    assert set(check["latency"]) == {"batch_1", "batch_32"}
    assert all(row["pytorch_ms"] > 0 and row["onnxruntime_ms"] > 0 for row in check["latency"].values())
    assert report["size_bytes"] == out.stat().st_size and report["sha256"] == file_sha256(out)
    sess = session(out)
    assert not isinstance(sess.get_inputs()[0].shape[0], int)  # a symbolic batch axis
    for n in (1, 7):
        images = raw_images(n, seed=n)
        got = sess.run(None, {"images": normalised(images)})[0]
        assert got.shape == (n, 3)
        assert np.abs(got - reference(checkpoints[arch], images)).max() < 1e-4
    assert not list(tmp_path.glob(".*.tmp"))


def test_fixed_batch(checkpoints, tmp_path):
    out = tmp_path / "fixed.onnx"
    report = export_onnx(checkpoints["resnet10t"], out, ExportOptions(batch=8, **FAST))
    assert report["batch"] == 8 and "seeded random" in report["check"]["source"]
    assert set(report["check"]["latency"]) == {"batch_8"}  # batch 1 and 32 do not fit a fixed batch of 8
    sess = session(out)
    assert sess.get_inputs()[0].shape == [8, 3, SIZE, SIZE]
    images = raw_images(8)
    assert np.abs(sess.run(None, {"images": normalised(images)})[0] - reference(checkpoints["resnet10t"], images)).max() < 1e-4
    with pytest.raises(Exception):
        sess.run(None, {"images": normalised(raw_images(7))})
    # the predictor pads the last batch: 11 images through a batch-8 graph
    images = raw_images(11, seed=3)
    probs = OnnxPredictor(out).predict_proba(images)
    assert probs.shape == (11, 3)
    np.testing.assert_allclose(probs, load_predictor(checkpoints["resnet10t"], "cpu").predict_proba(images), atol=1e-5)


def test_metadata_round_trip(checkpoints, tmp_path):
    ckpt = checkpoints["test_vit"]
    out = tmp_path / "vit.onnx"
    export_onnx(ckpt, out, ExportOptions(check=False))
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"]) == CLASSES
    assert int(props["image_size"]) == SIZE
    assert json.loads(props["mean"]) == pytest.approx(MEAN) and json.loads(props["std"]) == pytest.approx(STD)
    assert json.loads(props["train_counts"]) == [30, 10, 4]
    assert props["arch"] == "test_vit" and props["format"] == "fopro-onnx"
    assert props["source_sha256"] == file_sha256(sidecar(ckpt)[0])
    assert props["preprocess_included"] == "false" and props["softmax_included"] == "false"
    assert props["input_dtype"] == "float32" and props["input_layout"] == "NCHW"
    assert props["fopro_version"] and props["precision"] == "fp32" and props["opset"] == "17"
    predictor, torch_predictor = load_predictor(out), load_predictor(ckpt, "cpu")
    assert isinstance(predictor, OnnxPredictor)
    assert predictor.classes == torch_predictor.classes and predictor.train_counts == torch_predictor.train_counts
    assert predictor.preprocess == torch_predictor.preprocess
    assert "test_vit" in predictor.description


@pytest.mark.parametrize("arch", ["resnet10t", "test_vit"])
def test_preprocess_and_softmax_inside(arch, checkpoints, tmp_path):
    out = tmp_path / "pp.onnx"
    report = export_onnx(checkpoints[arch], out, ExportOptions(include_preprocess=True, softmax=True, **FAST))
    assert report["check"]["passed"] and report["check"]["output"] == "probabilities"
    sess = session(out)
    assert sess.get_inputs()[0].type == "tensor(uint8)" and sess.get_outputs()[0].name == "probabilities"
    uint8 = torch.randint(0, 256, (5, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    got = sess.run(None, {"images": uint8.numpy()})[0]
    expected = reference(checkpoints[arch], uint8.float() / 255.0, softmax=True)
    assert np.abs(got - expected).max() < 1e-5
    assert (got.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    # the predictor feeds raw [0, 1] images as round(x * 255) and does not apply softmax twice
    images = uint8.float() / 255.0
    np.testing.assert_allclose(
        OnnxPredictor(out).predict_proba(images), load_predictor(checkpoints[arch], "cpu").predict_proba(images), atol=1e-5
    )


def test_fp16_and_int8_report_agreement(checkpoints, data_root, tmp_path):
    ckpt, data = checkpoints["resnet10t"], DataOptions(data=data_root)
    fp16 = export_onnx(ckpt, tmp_path / "half.onnx", ExportOptions(fp16=True, **FAST), data)
    assert fp16["precision"] == "fp16" and fp16["check"]["passed"] is None
    assert 0.0 <= fp16["check"]["top1_agreement"] <= 1.0 and fp16["check"]["max_abs_diff"] < 0.05
    assert fp16["size_bytes"] < 0.6 * fp16["fp32_size_bytes"]
    sess = session(tmp_path / "half.onnx")
    assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[0].type == "tensor(float)"

    int8 = export_onnx(ckpt, tmp_path / "int8.onnx", ExportOptions(int8=True, calibration_images=9, **FAST), data)
    assert int8["precision"] == "int8" and int8["check"]["passed"] is None
    accuracy = int8["int8_accuracy"]
    assert accuracy["images"] == 9 and "train" in accuracy["source"]
    assert 0.0 <= accuracy["top1_agreement"] <= 1.0
    assert accuracy["accuracy_change"] == pytest.approx(accuracy["accuracy_int8"] - accuracy["accuracy_float"])
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8["size_bytes"] < 0.35 * int8["fp32_size_bytes"]
    assert OnnxPredictor(tmp_path / "int8.onnx").predict_proba(raw_images(3)).shape == (3, 3)
    checked = int8["int8_val"]  # float and int8 on the VAL split, class by class
    assert "val images" in checked["source"] and set(checked["per_class_recall_change"]) == set(CLASSES)
    assert checked["change"]["balanced_accuracy"] == pytest.approx(checked["int8"]["balanced_accuracy"] - checked["float"]["balanced_accuracy"])


def test_int8_that_loses_too_much_on_val_is_refused():
    from fopro.quantize import check_int8_drop

    options = ExportOptions(int8=True)
    check_int8_drop({"balanced_accuracy": -0.005, "tail_recall": -0.02}, options, "val")  # within 1 and 3 points
    with pytest.raises(FoproError, match="int8 loses 1.5 points of balanced accuracy on val .*--max-int8-drop 1.0.*--allow-int8-drop"):
        check_int8_drop({"balanced_accuracy": -0.015, "tail_recall": 0.0}, options, "val")
    with pytest.raises(FoproError, match="4.0 points of tail recall"):
        check_int8_drop({"balanced_accuracy": 0.0, "tail_recall": -0.04}, options, "val")
    check_int8_drop({"balanced_accuracy": -0.2, "tail_recall": None}, ExportOptions(int8=True, allow_int8_drop=True), "val")


def close(a, b, path="") -> None:
    """Recursive equality of two JSON reports, floats within 1e-5."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for key in a:
            close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, abs=1e-5), path
    else:
        assert a == b, path


def test_cli_export_then_eval_onnx_equals_checkpoint(checkpoints, data_root, tmp_path):
    runner = CliRunner()
    ckpt, out = checkpoints["resnet10t"], tmp_path / "student.onnx"
    result = runner.invoke(app, ["export", str(ckpt), "--onnx", str(out), "--data", str(data_root), "--include-preprocess", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["check"]["passed"] and report["onnx"] == str(out) and out.is_file()

    reports = {}
    for model, folder in ((out, "onnx"), (ckpt, "torch")):
        args = ["eval", str(model), "--data", str(data_root), "--device", "cpu", "--out", str(tmp_path / folder), "--json"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        reports[folder] = json.loads(result.stdout)
    for report in reports.values():
        report.pop("model"), report.pop("model_description")
    close(reports["onnx"], reports["torch"])
    rows = {k: (tmp_path / k / "predictions.csv").read_text().splitlines() for k in reports}
    assert [r.split(",")[:3] for r in rows["onnx"]] == [r.split(",")[:3] for r in rows["torch"]]  # image, label, pred
    np.testing.assert_allclose(
        np.array([r.split(",")[3:] for r in rows["onnx"][1:]], float),
        np.array([r.split(",")[3:] for r in rows["torch"][1:]], float),
        atol=2e-6,
    )


def test_cli_human_summary(checkpoints, tmp_path):
    result = CliRunner().invoke(app, ["export", str(checkpoints["resnet10t"]), "--onnx", str(tmp_path / "m.onnx"), "--batch", "4"])
    assert result.exit_code == 0, result.output
    assert "passed" in result.stdout and "wrote" in result.stdout and "latency" in result.stdout.lower()


def assert_clean_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_cli_errors(checkpoints, data_root, tmp_path):
    runner = CliRunner()
    # a checkpoint whose JSON is missing
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(checkpoints["resnet10t"], lonely)
    result = runner.invoke(app, ["export", str(lonely), "--onnx", str(tmp_path / "a.onnx")])
    assert_clean_error(result, "lonely.json", "missing")
    assert not (tmp_path / "a.onnx").exists()
    # an output path under a regular file: clear error, nothing written anywhere
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    before = sorted(tmp_path.rglob("*"))
    result = runner.invoke(app, ["export", str(checkpoints["resnet10t"]), "--onnx", str(blocker / "m.onnx")])
    assert_clean_error(result, "blocker", "not a folder")
    assert sorted(tmp_path.rglob("*")) == before
    # --int8 without data
    result = runner.invoke(app, ["export", str(checkpoints["resnet10t"]), "--onnx", str(tmp_path / "q.onnx"), "--int8"])
    assert_clean_error(result, "--int8", "calibration needs data options")
    assert not (tmp_path / "q.onnx").exists()
    # bad options
    result = runner.invoke(app, ["export", str(checkpoints["resnet10t"]), "--onnx", str(tmp_path / "b.onnx"), "--batch", "zero"])
    assert_clean_error(result, "--batch zero")
    result = runner.invoke(app, ["export", str(checkpoints["resnet10t"]), "--onnx", str(tmp_path / "m.txt")])
    assert_clean_error(result, ".onnx")
    result = runner.invoke(app, ["export", str(checkpoints["resnet10t"]), "--onnx", str(tmp_path / "c.onnx"), "--fp16", "--int8", "--data", str(data_root)])
    assert_clean_error(result, "--fp16 and --int8")


def test_failed_fp32_check_is_an_error_and_writes_nothing(checkpoints, tmp_path, monkeypatch):
    import fopro.export as export

    real = export.torch_outputs
    monkeypatch.setattr(export, "torch_outputs", lambda *args, **kwargs: real(*args, **kwargs) + 0.01)
    out = tmp_path / "bad.onnx"
    with pytest.raises(FoproError, match="disagrees with the PyTorch student"):
        export_onnx(checkpoints["resnet10t"], out, ExportOptions(**FAST))
    assert list(tmp_path.iterdir()) == []
    # fp16 agreement is reported, never an error
    report = export_onnx(checkpoints["resnet10t"], tmp_path / "half.onnx", ExportOptions(fp16=True, **FAST))
    assert report["check"]["passed"] is None and report["check"]["max_abs_diff"] > 1e-3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy exporter's notice
def test_onnx_without_fopro_metadata(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    path = tmp_path / "foreign.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 4, 4),), str(path), dynamo=False, input_names=["x"])
    with pytest.raises(FoproError, match="no fopro metadata"):
        OnnxPredictor(path)
    result = CliRunner().invoke(app, ["eval", str(path), "--data", str(tmp_path)])
    assert_clean_error(result, "no fopro metadata")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(FoproError, match="cannot be loaded"):
        OnnxPredictor(tmp_path / "junk.onnx")


def _close(a, b) -> bool:
    """Nested JSON values equal, numbers within 1e-6 (ONNX and PyTorch float arithmetic)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return abs(a - b) <= 1e-6
    return a == b


def test_a_calibrated_checkpoint_exports_its_temperature(checkpoints, data_root, tmp_path):
    """The temperature fitted on val (checkpoint JSON) is inside the graph: ONNX and PyTorch give the same probabilities."""
    import shutil

    from fopro.checkpoint import set_calibration
    from fopro.evaluate import load_predictor

    ckpt = tmp_path / "calibrated.safetensors"
    for suffix in (".safetensors", ".json"):
        shutil.copy(checkpoints["resnet10t"].with_suffix(suffix), ckpt.with_suffix(suffix))
    set_calibration(ckpt, 2.5, {"akiec": [{"target_specificity": 0.9, "threshold": 0.4}], "mel": [{"target_specificity": 0.95, "threshold": 0.35}]})
    out = tmp_path / "calibrated.onnx"
    export_onnx(ckpt, out, ExportOptions(softmax=True, **FAST))
    images = raw_images(6)
    onnx_model = OnnxPredictor(out)
    torch_model = load_predictor(ckpt, "cpu")
    assert onnx_model.temperature == torch_model.temperature == 2.5
    card = (tmp_path / "MODEL_CARD.md").read_text()  # written beside the model
    assert "## Quantisation" in card and "top-1 agreement 100.0 %" in card and "calibrated.onnx" in card
    np.testing.assert_allclose(onnx_model.predict_proba(images), torch_model.predict_proba(images), atol=1e-5)
    from fopro.evaluate import EvalOptions, evaluate

    from_onnx, from_checkpoint = (evaluate(model, DataOptions(data=data_root), EvalOptions(device="cpu", bootstrap=100)) for model in (out, ckpt))
    for key in ("balanced_accuracy", "intervals", "calibration", "val_operating_points"):  # the same report from the file alone
        assert from_onnx[key] == pytest.approx(from_checkpoint[key], abs=1e-6) if not isinstance(from_onnx[key], dict) else _close(from_onnx[key], from_checkpoint[key]), key
    plain = reference(checkpoints["resnet10t"], images)  # logits of the same weights
    np.testing.assert_allclose(torch_model.predict_proba(images), torch.softmax(torch.from_numpy(plain) / 2.5, dim=1).numpy(), atol=1e-5)
