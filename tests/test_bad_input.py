"""Reliability: bad input. One matrix of the mistakes a user can make, each run through the REAL CLI.

Every case asserts what the user sees: a non-zero exit code (2: an error the user can fix), ONE line on
stderr (besides progress lines) that names the file or option and says what to do, and no traceback.
`len(CASES)` is the number of cases (the README quotes it); `CASES_PER_KIND` splits it by kind.
A few tests at the end check that `fopro --debug` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import traceback
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fopro.cli import app
from fopro.errors import FoproError
from fopro.io import folder_lock
from helpers import make_image_folder, tiny_checkpoint, truncate, write_csv

CLASSES = ["a", "b", "c"]
COUNTS = {"train": {"a": 2, "b": 3, "c": 4}, "val": {"a": 1, "b": 1, "c": 1}, "test": {"a": 2, "b": 2, "c": 2}}
PROGRESS_LINE = re.compile(r"^.+: \d+/\d+ (done in \d+:\d\d:\d\d|so far, .+ elapsed.*)$")  # progress_bar's lines without a terminal
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# --- shared material ---------------------------------------------------------------------------------


@dataclass
class Shared:
    """Built once per module: a tiny ImageFolder, a fopro checkpoint of its classes, local weight files."""

    root: Path
    data: Path
    checkpoint: Path

    def weights_file(self, arch: str) -> Path:
        """Random `arch` embedding weights (num_classes=0) as a local .safetensors, built on first use."""
        path = self.root / "weights" / f"{arch}.safetensors"
        if not path.exists():
            import timm
            import torch
            from safetensors.torch import save_file

            torch.manual_seed(0)
            model = timm.create_model(arch, pretrained=False, num_classes=0)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return path

    def checkpoint_copy(self, tmp: Path, name: str = "model") -> Path:
        """A copy of the checkpoint (weights + JSON) under tmp, to damage; returns its .safetensors path."""
        target = tmp / "ckpt" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".safetensors", ".json"):
            target.with_suffix(suffix).write_bytes(self.checkpoint.with_suffix(suffix).read_bytes())
        return target.with_suffix(".safetensors")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Shared:
    root = tmp_path_factory.mktemp("bad-input")
    data = make_image_folder(root / "data", COUNTS)
    checkpoint, _ = tiny_checkpoint(root / "ckpt" / "model", CLASSES, train_counts=[2, 3, 4])
    return Shared(root, data, checkpoint)


def distill_args(s: Shared, tmp: Path, *extra, data: Path | None = None, teacher: object = None) -> list:
    """`fopro distill` of the tiny kind (test_resnet, 32 px, 1 epoch, CPU) into tmp/run, plus `extra`."""
    return ["distill", "--data", data or s.data, "--teacher", teacher or s.checkpoint, "--student", "test_resnet",
            "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--workers", "0",
            "--out", tmp / "run", *extra]


class _RunsCode:
    """A pickled object that would create `path` when unpickled (builtins.open(path, 'w'))."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


# --- the cases -----------------------------------------------------------------------------------------

Build = Callable[[Shared, Path], tuple[list, list[str]]]  # -> (argv, strings the message must name)


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # data | options | models | outputs
    build: Build  # writes what the case needs under tmp and returns (argv, names)
    fix: tuple[str, ...]  # the "what to do" part of the message (substrings)
    after: Callable[[Shared, Path, str], None] | None = field(default=None)  # extra checks (tmp, the message)


def _data_missing(s, tmp):
    return ["data", "info", "--data", tmp / "nope"], [str(tmp / "nope"), "does not exist"]


def _data_empty(s, tmp):
    (tmp / "empty").mkdir()
    return ["data", "info", "--data", tmp / "empty"], [str(tmp / "empty"), "none of the split folders"]


def _class_folder_without_images(s, tmp):
    root = make_image_folder(tmp / "d", {"train": {"a": 2, "b": 2}})
    (root / "train" / "empty_class").mkdir()
    (root / "train" / "empty_class" / "notes.txt").write_text("not an image")
    return ["data", "info", "--data", root], [str(root / "train"), "empty_class", "hold no images"]


def _class_name_with_escapes(s, tmp):
    root = make_image_folder(tmp / "d", {"train": {"a": 2, "b\x1b[2Jc": 2}})
    return ["data", "info", "--data", root], ["'b\\x1b[2Jc'", "control characters"]


def _checkpoint_class_with_escapes(s, tmp):
    weights = s.checkpoint_copy(tmp)
    meta_path = weights.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["classes"] = ["a", "b\x1b]0;pwned\x07", "c"]
    meta_path.write_text(json.dumps(meta))
    return ["eval", weights, "--data", s.data, "--device", "cpu"], [str(meta_path), "control characters"]


def _fifo_is_not_an_image(s, tmp):
    root = make_image_folder(tmp / "d", {"train": {"a": 2, "b": 2}})
    (root / "train" / "pipe").mkdir()
    os.mkfifo(root / "train" / "pipe" / "x.png")  # reading it would block forever
    return ["data", "info", "--data", root], [str(root / "train"), "pipe", "hold no images"]


def _class_folder_links_into_the_data(s, tmp):
    root = make_image_folder(tmp / "d", {"train": {"a": 2, "b": 2}})
    (root / "train" / "again").symlink_to(root / "train", target_is_directory=True)
    return ["data", "info", "--data", root], [str(root / "train" / "again"), "count twice"]


def _csv_column_twice(s, tmp):
    csv_path = write_csv(tmp / "train.csv", ["image", "label", "label"], [["train/a/a_000.png", "a", "b"]])
    return ["data", "info", "--train-csv", csv_path, "--images", s.data], [str(csv_path), "'label' appears twice"]


def _csv_empty_label(s, tmp):
    csv_path = write_csv(tmp / "train.csv", ["image", "label"], [["train/a/a_000.png", "a"], ["train/b/b_000.png", ""]])
    return ["data", "info", "--train-csv", csv_path, "--images", s.data], [f"{csv_path}:3", "'label' cell is empty"]


def _png_bomb(s, tmp):
    root = make_image_folder(tmp / "d", {"test": {"a": 2, "b": 2, "c": 2}})
    bomb = root / "test" / "b" / "b_001.png"
    data = bytearray(bomb.read_bytes())  # a 32 px PNG whose header claims 20000 x 20000 pixels
    data[16:24] = struct.pack(">II", 20000, 20000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    bomb.write_bytes(bytes(data))
    return ["eval", s.checkpoint, "--data", root, "--device", "cpu"], [str(bomb), "1 image(s) of the test split"]


def _split_missing(s, tmp):
    root = make_image_folder(tmp / "d", {"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "b": 1, "c": 1}})
    return ["eval", s.checkpoint, "--data", root, "--split", "test", "--device", "cpu"], [str(root), "test/"]


def _csv_missing_file(s, tmp):
    return ["data", "info", "--train-csv", tmp / "train.csv", "--images", s.data], [str(tmp / "train.csv"), "--train-csv"]


def _csv_missing_columns(s, tmp):
    csv_path = write_csv(tmp / "train.csv", ["file", "comment"], [["train/a/a_000.png", "fine"]])
    return ["data", "info", "--train-csv", csv_path, "--images", s.data], [str(csv_path), "label column", "file, comment"]


def _csv_unknown_column(s, tmp):
    csv_path = write_csv(tmp / "train.csv", ["image", "label"], [["train/a/a_000.png", "a"]])
    return (["data", "info", "--train-csv", csv_path, "--images", s.data, "--label-column", "diagnosis"],
            [str(csv_path), "'diagnosis'", "--label-column", "image, label"])


def _csv_unknown_labels(s, tmp):
    rows = [["train/a/a_000.png", "a"], ["train/b/b_000.png", "b"], ["train/c/c_000.png", "zebra"]]
    csv_path = write_csv(tmp / "train.csv", ["image", "label"], rows)
    return ["data", "info", "--train-csv", csv_path, "--images", s.data, "--classes", "a,b,c"], [str(csv_path), "zebra"]


def _csv_duplicates(s, tmp):
    rows = [["train/a/a_000.png", "a"], ["train/b/b_000.png", "b"], ["train/a/a_000.png", "a"]]
    csv_path = write_csv(tmp / "train.csv", ["image", "label"], rows)
    return ["data", "info", "--train-csv", csv_path, "--images", s.data], [str(csv_path), "1 duplicate row", "a_000.png"]


def _csv_images_missing(s, tmp):
    rows = [[f"scan_{i:02d}.png", "a" if i % 2 else "b"] for i in range(12)]
    csv_path = write_csv(tmp / "train.csv", ["image", "label"], rows)
    images = tmp / "images"
    images.mkdir()
    listed = [str(images / f"scan_{i:02d}.png") for i in range(5)]  # the first few, then the count
    return ["data", "info", "--train-csv", csv_path, "--images", images], [str(csv_path), "12 of 12 images", *listed]


def _no_sixth_listed(s, tmp, message):
    assert "scan_05.png" not in message, "only the first few missing images are listed"


def _truncated_png(s, tmp):
    root = make_image_folder(tmp / "d", {"test": {"a": 2, "b": 2, "c": 2}})
    bad = truncate(root / "test" / "b" / "b_001.png", keep=0.4)
    return ["eval", s.checkpoint, "--data", root, "--device", "cpu"], [str(bad), "1 image(s) of the test split"]


def _not_an_image_png(s, tmp):
    root = make_image_folder(tmp / "d", {"train": COUNTS["train"], "val": COUNTS["val"]})
    bad = root / "train" / "c" / "readme.png"
    bad.write_text("this is a text file with a .png name")
    return distill_args(s, tmp, data=root), [str(bad), "train split"]


def _test_class_unknown_to_checkpoint(s, tmp):
    root = make_image_folder(tmp / "d", {"test": {"a": 1, "b": 1, "zebra": 2}})
    return ["eval", s.checkpoint, "--data", root, "--device", "cpu"], [str(root / "test"), "zebra", "not among the classes of the model"]


def _imbalance_empties_a_class(s, tmp):
    return (["data", "info", "--data", s.data, "--classes", "a,b,c,d", "--imbalance", "0.0001"],
            ["class(es) d", "--imbalance 0.0001", str(s.data / "train")])


def _distill_class_without_training_images(s, tmp):
    return distill_args(s, tmp, "--classes", "a,b,c,d"), ["class(es) d", "no training image"]


def _image_size_too_small_for_student(s, tmp):
    args = distill_args(s, tmp, "--method", "none")
    args[args.index("test_resnet")] = "test_convnext"
    args[args.index("--image-size") + 1] = "16"
    return args, ["--image-size 16", "--student test_convnext"]


def _images_too_small_for_teacher(s, tmp):
    root = make_image_folder(tmp / "d", {"val": {"a": 3, "b": 3}}, size=8)  # probed at their own (tiny) size
    return (["probe", "--data", root, "--teacher", "test_convnext", "--teacher-weights", s.weights_file("test_convnext"),
             "--device", "cpu"], ["--teacher test_convnext", "16-px"])


def _option(name: str, value: str, command: str = "distill") -> Build:
    def build(s, tmp):
        if command == "distill":
            return distill_args(s, tmp, name, value), [f"{name} {value}"]
        if command == "eval":
            return ["eval", s.checkpoint, "--data", s.data, "--device", "cpu", name, value], [f"{name} {value}"]
        return ["data", "info", "--data", s.data, name, value], [f"{name} {value}"]

    return build


def _before_data(name: str, value: str, *more: str) -> Build:
    """A bad distill option given with data that would fail if scanned: the option's error must come first."""

    def build(s, tmp):
        return distill_args(s, tmp, name, value, *more, data=tmp / "never-scanned"), [f"{name} {value}"]

    return build


def _data_not_reached(s, tmp, message):
    assert "never-scanned" not in message, "the options are checked before any data is read"


def _dinov2_patch(s, tmp):
    return distill_args(s, tmp, teacher="vit_small_patch14_dinov2") + ["--teacher-image-size", "100"], [
        "--teacher-image-size 100", "patch size 14"]


def _unknown_student(s, tmp):
    args = distill_args(s, tmp)
    args[args.index("test_resnet")] = "resnet_18"
    return args, ["--student resnet_18", "not a timm model"]


def _unknown_teacher(command: str) -> Build:
    def build(s, tmp):
        if command == "probe":
            return ["probe", "--data", s.data, "--teacher", "resnet_18", "--device", "cpu"], ["--teacher resnet_18"]
        return distill_args(s, tmp, teacher="resnet_18"), ["--teacher resnet_18", "not a timm model"]

    return build


def _config_unknown_key(key: str) -> Build:
    def build(s, tmp):
        config = tmp / "run.yaml"
        config.write_text(f"lr: 0.001\n{key}: 1\n")
        return distill_args(s, tmp, "--config", config), [f"--config {config}", f"unknown key(s): {key}"]

    return build


def _config_value(text: str, key: str, suffix: str = ".yaml") -> Build:
    """A config file whose `key` has a value of the wrong kind (a key the command line of the case does not set)."""

    def build(s, tmp):
        config = tmp / f"run{suffix}"
        config.write_text(text)
        return distill_args(s, tmp, "--config", config), [f"option {key} = "]

    return build


_HELD_LOCKS: dict[Path, contextlib.AbstractContextManager] = {}


def _run_folder_in_use(s, tmp):
    (tmp / "run").mkdir()
    held = folder_lock(tmp / "run", "--out")  # as a live fopro process holds it (flock is per open file)
    held.__enter__()
    _HELD_LOCKS[tmp] = held
    return distill_args(s, tmp), [f"--out {tmp / 'run'}", "is in use by fopro process"]


def _lock_kept(s, tmp, message):
    assert (tmp / "run" / ".fopro.lock").read_text() == str(os.getpid()), "the other process's lock is left alone"
    assert sorted(p.name for p in (tmp / "run").iterdir()) == [".fopro.lock"], "nothing is written beside it"
    _HELD_LOCKS.pop(tmp).__exit__(None, None, None)


def _out_under_a_file(s, tmp):
    (tmp / "afile").write_text("a file")
    return distill_args(s, tmp, "--out", tmp / "afile" / "run"), [str(tmp / "afile"), "is a file"]


def _out_inside_data(command: str) -> Build:
    def build(s, tmp):
        out = s.data / "train" / "run1"
        args = distill_args(s, tmp, "--out", out) if command == "distill" else [
            "eval", s.checkpoint, "--data", s.data, "--device", "cpu", "--out", out]
        return args, [f"--out {out}", f"inside the data folder {s.data}"]

    return build


def _nothing_inside_data(s, tmp, message):
    assert not (s.data / "train" / "run1").exists(), "nothing is written into the data"


def _config_invalid_yaml(s, tmp):
    config = tmp / "run.yaml"
    config.write_text("epochs: [1, 2\nlr: : 0.1\n")
    return distill_args(s, tmp, "--config", config), [f"--config {config}", "not valid YAML", "line 2"]


def _config_invalid_toml(s, tmp):
    config = tmp / "run.toml"
    config.write_text("epochs = [1\n")
    return distill_args(s, tmp, "--config", config), [f"--config {config}", "not valid TOML"]


def _teacher_weights_do_not_fit(s, tmp):
    weights = s.weights_file("test_convnext")
    return (distill_args(s, tmp, "--teacher-weights", weights, teacher="test_resnet"),
            [str(weights), "test_resnet", "missing key(s) (conv1.0.weight", "unexpected key(s) (head.norm.bias"])


def _teacher_weights_wrong_shape(s, tmp):
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(s.weights_file("test_resnet")))
    shape = tuple(tensors["conv1.0.weight"].shape)
    tensors["conv1.0.weight"] = torch.zeros(shape[0], 1, *shape[2:])  # a 1-channel (grayscale) stem
    weights = tmp / "gray_stem.safetensors"
    save_file(tensors, str(weights))
    return (["probe", "--data", s.data, "--teacher", "test_resnet", "--teacher-weights", weights, "--device", "cpu"],
            [str(weights), "1 shape mismatch", "conv1.0.weight"])


def _json_disagrees(command: str) -> Build:
    def build(s, tmp):
        weights = s.checkpoint_copy(tmp)
        meta_path = weights.with_suffix(".json")
        meta = json.loads(meta_path.read_text())
        meta.update(classes=["a", "b", "c", "d"], num_classes=4, train_counts=[2, 3, 4, 1])
        meta_path.write_text(json.dumps(meta))
        args = ["eval", weights, "--data", s.data, "--device", "cpu"] if command == "eval" else [
            "export", weights, "--onnx", tmp / "model.onnx"]
        return args, [str(meta_path), "4 classes", "3 outputs"]

    return build


def _json_not_json(s, tmp):
    weights = s.checkpoint_copy(tmp)
    weights.with_suffix(".json").write_text('{"format": "fopro-checkpoint", "arch": ')
    return ["eval", weights, "--data", s.data, "--device", "cpu"], [str(weights.with_suffix(".json")), "not valid JSON"]


def _corrupted_checkpoint(s, tmp):
    weights = s.checkpoint_copy(tmp)
    truncate(weights, keep=0.5)
    return ["eval", weights, "--data", s.data, "--device", "cpu"], [str(weights), "not a valid safetensors file"]


def _corrupted_teacher_weights(s, tmp):
    weights = tmp / "teacher.safetensors"
    weights.write_bytes(s.weights_file("test_resnet").read_bytes()[:300])
    return (distill_args(s, tmp, "--teacher-weights", weights, teacher="test_resnet"),
            [str(weights), "not a valid safetensors file"])


def _checkpoint_without_json(command: str) -> Build:
    def build(s, tmp):
        weights = s.checkpoint_copy(tmp)
        weights.with_suffix(".json").unlink()
        args = ["eval", weights, "--data", s.data, "--device", "cpu"] if command == "eval" else [
            "export", weights, "--onnx", tmp / "model.onnx"]
        return args, [str(weights.with_suffix(".json")), "is missing"]

    return build


def _malicious_pickle(how: str) -> Build:
    def build(s, tmp):
        import torch

        path = tmp / "moco_v2_800ep_pretrain.pth.tar"
        payload = {"state_dict": {"module.encoder_q.conv1.weight": _RunsCode(tmp / "pwned")}}
        if how == "torch.save":
            torch.save(payload, path)
            return distill_args(s, tmp, "--teacher-weights", path, teacher="test_resnet"), [str(path), "refused", "it imports io.open"]
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
        return (["probe", "--data", s.data, "--teacher", "test_resnet", "--teacher-weights", path, "--device", "cpu"],
                [str(path), "refused", "it imports io.open"])

    return build


def _nothing_ran(s, tmp, message):
    assert not (tmp / "pwned").exists(), "the pickle's code ran"
    assert "trust the source" not in message, "torch's advice on loading the file anyway leaked into the message"


def _existing_run(s, tmp):
    run = tmp / "run"
    run.mkdir()
    (run / "config.json").write_text("{}\n")
    (run / "last.safetensors").write_bytes(b"kept")
    return distill_args(s, tmp), [f"--out {run}", "already holds a run"]


def _existing_run_untouched(s, tmp, message):
    assert (tmp / "run" / "last.safetensors").read_bytes() == b"kept"
    assert (tmp / "run" / "config.json").read_text() == "{}\n"


def _out_is_a_file(s, tmp):
    (tmp / "run").write_text("a file")
    return distill_args(s, tmp), [f"--out {tmp / 'run'}", "is a file"]


def _eval_out_under_a_file(s, tmp):
    (tmp / "results").write_text("a file")
    out = tmp / "results" / "eval"
    return ["eval", s.checkpoint, "--data", s.data, "--device", "cpu", "--out", out], [str(out), "which is a file"]


def _export_onnx_under_a_file(s, tmp):
    (tmp / "models").write_text("a file")
    onnx = tmp / "models" / "student.onnx"
    return ["export", s.checkpoint, "--onnx", onnx], [f"--onnx {onnx}", str(tmp / "models"), "is a file"]


def _export_onnx_suffix(s, tmp):
    return ["export", s.checkpoint, "--onnx", tmp / "student.txt"], [f"--onnx {tmp / 'student.txt'}", ".onnx"]


CASES: list[Case] = [
    # ---- data
    Case("data-path-missing", "data", _data_missing, ("give the folder that holds train/",)),
    Case("data-empty-directory", "data", _data_empty, ("ROOT/<split>/<class name>/<image>",)),
    Case("data-class-folder-without-images", "data", _class_folder_without_images, ("add images or remove the folder",)),
    Case("data-split-missing-eval", "data", _split_missing, ("add test/<class name>/<image>", "another --split")),
    Case("class-name-with-terminal-escapes", "data", _class_name_with_escapes, ("rename that class",)),
    Case("fifo-named-like-an-image", "data", _fifo_is_not_an_image, ("add images or remove the folder",)),
    Case("class-folder-links-into-the-data", "data", _class_folder_links_into_the_data, ("remove the link",)),
    Case("csv-column-twice", "data", _csv_column_twice, ("rename or remove one",)),
    Case("csv-empty-label", "data", _csv_empty_label, ("fill it in or remove the row",)),
    Case("png-decompression-bomb", "data", _png_bomb, ("--skip-bad-images",)),
    Case("csv-path-missing", "data", _csv_missing_file, ("check the --train-csv path",)),
    Case("csv-missing-columns", "data", _csv_missing_columns, ("name it with --label-column",)),
    Case("csv-named-column-absent", "data", _csv_unknown_column, ("its columns are",)),
    Case("csv-unknown-labels", "data", _csv_unknown_labels, ("fix the labels or the class list",)),
    Case("csv-duplicate-rows", "data", _csv_duplicates, ("list each image once",)),
    Case("csv-images-missing", "data", _csv_images_missing, ("check --images and the image column",), _no_sixth_listed),
    Case("truncated-png-eval", "data", _truncated_png, ("--skip-bad-images",)),
    Case("non-image-png-distill", "data", _not_an_image_png, ("--skip-bad-images",)),
    Case("test-class-unknown-to-checkpoint", "data", _test_class_unknown_to_checkpoint, ("leave those images out or relabel",)),
    Case("imbalance-leaves-class-empty", "data", _imbalance_empties_a_class, ("add training images", "--classes")),
    Case("class-without-training-images-distill", "data", _distill_class_without_training_images, ("add images or drop the class",)),
    Case("image-size-too-small-for-student", "data", _image_size_too_small_for_student, ("use --image-size 32 or larger",)),
    Case("images-too-small-for-teacher-probe", "data", _images_too_small_for_teacher, ("use --teacher-image-size 32 or larger",)),
    # ---- options
    Case("epochs-zero", "options", _option("--epochs", "0"), ("must be at least 1",)),
    Case("epochs-negative", "options", _option("--epochs", "-3"), ("must be at least 1",)),
    Case("batch-size-zero", "options", _option("--batch-size", "0"), ("must be at least 2",)),
    Case("batch-size-negative", "options", _option("--batch-size", "-8"), ("must be at least 2",)),
    Case("lr-zero", "options", _option("--lr", "0.0"), ("must be greater than 0",)),
    Case("lr-negative", "options", _option("--lr", "-0.001"), ("must be greater than 0",)),
    Case("eval-batch-size-zero", "options", _option("--batch-size", "0", "eval"), ("must be greater than 0",)),
    Case("eval-bootstrap-negative", "options", _option("--bootstrap", "-1", "eval"), ("0 turns the intervals off",)),
    Case("eval-specificity-outside-0-1", "options", _option("--specificity", "0.9,1.5", "eval"), ("give targets in (0, 1)",)),
    Case("imbalance-zero", "options", _option("--imbalance", "0.0"), ("outside (0, 1]", "e.g. 0.01")),
    Case("imbalance-above-one", "options", _option("--imbalance", "1.5"), ("outside (0, 1]", "e.g. 0.01")),
    Case("imbalance-negative", "options", _option("--imbalance", "-0.1"), ("outside (0, 1]", "e.g. 0.01")),
    Case("imbalance-above-one-data-info", "options", _option("--imbalance", "1.5", "data"), ("outside (0, 1]", "e.g. 0.01")),
    Case("teacher-image-size-not-patch-multiple", "options", _dinov2_patch, ("use 98 or 112",)),
    Case("unknown-student", "options", _unknown_student, ("did you mean resnet18",)),
    Case("unknown-teacher-distill", "options", _unknown_teacher("distill"), ("did you mean resnet18",)),
    Case("unknown-teacher-probe", "options", _unknown_teacher("probe"), ("did you mean resnet18",)),
    Case("unknown-method", "options", _option("--method", "fopro-kd"), ("choose one of none, kd, ekd, fopro",)),
    Case("unknown-loss", "options", _option("--loss", "focal"), ("choose one of balanced_softmax, ce",)),
    Case("fpg-strength-outside-range", "options", _before_data("--fpg-strength", "1.5"), ("e.g. 0.5",), _data_not_reached),
    Case("fpg-mode-unknown", "options", _before_data("--fpg-mode", "spatial"), ("choose one of dataset, conditional, both",), _data_not_reached),
    Case("fpg-hidden-zero", "options", _before_data("--fpg-hidden", "0"), ("must be at least 1",), _data_not_reached),
    Case("momentum-one", "options", _before_data("--momentum", "1.0"), ("must be in [0, 1)",), _data_not_reached),
    Case("tail-threshold-above-head", "options", _before_data("--tail-threshold", "50", "--head-threshold", "10"),
         ("choose tail <= head",), _data_not_reached),
    Case("probe-init-missing", "options", _before_data("--probe-init", "missing-probe.json"), ("give the probe.json written by fopro probe",),
         _data_not_reached),
    Case("batch-size-one", "options", _option("--batch-size", "1"), ("must be at least 2",)),
    Case("image-size-huge", "options", _before_data("--image-size", "100000"), ("between 16 and 2048",), _data_not_reached),
    Case("device-unknown", "options", _before_data("--device", "mps"), ("use auto, cpu, cuda or cuda:N",), _data_not_reached),
    Case("config-bool-for-integer", "options", _config_value("fpg_hidden = true\n", "fpg_hidden", ".toml"), ("expected an integer",)),
    Case("config-list-for-path", "options", _config_value("images: [a, b]\n", "images"), ("expected text",)),
    Case("config-number-for-path", "options", _config_value("probe_init: 5\n", "probe_init"), ("expected text",)),
    Case("config-classes-mapping", "options", _config_value("classes: {a: 1}\n", "classes"), ("a list of class names",)),
    Case("config-classes-nested-list", "options", _config_value("classes: [[a], b]\n", "classes"), ("a list of class names",)),
    Case("config-lr-infinite", "options", _config_value("lr: .inf\n", "lr"), ("not a finite number",)),
    Case("config-unknown-key-close-name", "options", _config_unknown_key("epoch"), ("(did you mean epochs?)",)),
    Case("config-unknown-key-no-close-name", "options", _config_unknown_key("learning_rate"), ("options of `fopro distill --help`",)),
    Case("config-invalid-yaml", "options", _config_invalid_yaml, ("fix the syntax",)),
    Case("config-invalid-toml", "options", _config_invalid_toml, ("fix the syntax",)),
    # ---- models
    Case("teacher-weights-do-not-fit", "models", _teacher_weights_do_not_fit, ("give the architecture these weights belong to",)),
    Case("teacher-weights-shape-mismatch-probe", "models", _teacher_weights_wrong_shape, ("give the architecture these weights belong to",)),
    Case("checkpoint-json-disagrees-eval", "models", _json_disagrees("eval"), ("does not belong to these weights",)),
    Case("checkpoint-json-disagrees-export", "models", _json_disagrees("export"), ("does not belong to these weights",)),
    Case("checkpoint-class-name-with-terminal-escapes", "models", _checkpoint_class_with_escapes, ("rename that class",)),
    Case("checkpoint-json-not-json", "models", _json_not_json, ("restore it from the run",)),
    Case("checkpoint-corrupted-safetensors", "models", _corrupted_checkpoint, ("copy it again",)),
    Case("teacher-weights-corrupted-safetensors", "models", _corrupted_teacher_weights, ("copy it again",)),
    Case("checkpoint-without-json-eval", "models", _checkpoint_without_json("eval"), ("NAME.json beside it",)),
    Case("checkpoint-without-json-export", "models", _checkpoint_without_json("export"), ("NAME.json beside it",)),
    Case("malicious-pickle-torch-save", "models", _malicious_pickle("torch.save"), ("convert it to safetensors",), _nothing_ran),
    Case("malicious-pickle-protocol-2", "models", _malicious_pickle("pickle"), ("convert it to safetensors",), _nothing_ran),
    # ---- outputs
    Case("distill-into-existing-run", "outputs", _existing_run, ("--overwrite", "--resume"), _existing_run_untouched),
    Case("distill-out-is-a-file", "outputs", _out_is_a_file, ("give a folder for the run",)),
    Case("eval-out-under-a-file", "outputs", _eval_out_under_a_file, ("give a folder for the output",)),
    Case("distill-run-folder-in-use", "outputs", _run_folder_in_use, ("wait for it to finish",), _lock_kept),
    Case("distill-out-under-a-file", "outputs", _out_under_a_file, ("give a folder for the output",)),
    Case("distill-out-inside-data", "outputs", _out_inside_data("distill"), ("choose a folder outside it",), _nothing_inside_data),
    Case("eval-out-inside-data", "outputs", _out_inside_data("eval"), ("choose a folder outside it",), _nothing_inside_data),
    Case("export-onnx-under-a-file", "outputs", _export_onnx_under_a_file, ("choose a writable output path",)),
    Case("export-onnx-wrong-suffix", "outputs", _export_onnx_suffix, ("must end in .onnx",)),
]
CASES_PER_KIND = dict(Counter(case.kind for case in CASES))


def error_line(result) -> str:
    """The one error line of a failed command: everything else on stderr is a progress line, no traceback."""
    assert "Traceback" not in result.output, result.output
    assert result.stdout == "", f"stdout of a failed command: {result.stdout!r}"
    lines = [line for line in ANSI.sub("", result.stderr).splitlines() if line.strip()]
    messages = [line for line in lines if not PROGRESS_LINE.match(line)]
    assert len(messages) == 1, f"expected one error line, got:\n{result.stderr}"
    assert messages[0].startswith("error: "), messages[0]
    assert lines[-1] == messages[0], "the error is the last thing printed"
    return messages[0]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_case_ids_are_unique_and_every_kind_is_covered() -> None:
    assert len({case.id for case in CASES}) == len(CASES)
    assert set(CASES_PER_KIND) == {"data", "options", "models", "outputs"}


def test_the_readme_quotes_the_number_of_cases() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"**Bad input: {len(CASES)} cases**" in readme
    for kind, number in CASES_PER_KIND.items():
        assert re.search(rf"{number}\s+{kind[:-1] if kind != 'data' else kind} cases", readme), (kind, number)


@pytest.mark.parametrize("case", CASES, ids=[f"{case.kind}:{case.id}" for case in CASES])
def test_bad_input_gives_one_clear_line(case: Case, shared: Shared, tmp_path: Path, runner: CliRunner) -> None:
    args, names = case.build(shared, tmp_path)
    result = runner.invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 2, f"exit code {result.exit_code}: {result.output}"
    message = error_line(result)
    for expected in (*names, *case.fix):
        assert expected in message, f"{expected!r} not in: {message}"
    if args[0] == "distill" and case.kind != "outputs":
        assert not (tmp_path / "run" / "config.json").exists(), "a failed distill left a run folder behind"
    if case.after is not None:
        case.after(shared, tmp_path, message)


# --- the successful side of two cases --------------------------------------------------------------------


def test_skip_bad_images_succeeds_and_says_how_many(shared: Shared, tmp_path: Path, runner: CliRunner) -> None:
    root = make_image_folder(tmp_path / "d", {"test": {"a": 2, "b": 2, "c": 2}})
    truncate(root / "test" / "b" / "b_001.png", keep=0.4)
    (root / "test" / "c" / "readme.png").write_text("not an image")
    result = runner.invoke(app, ["eval", str(shared.checkpoint), "--data", str(root), "--device", "cpu",
                                 "--skip-bad-images", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_samples"] == 5  # 7 files, 2 unreadable
    assert any("skipped 2 unreadable image(s)" in note for note in report["notes"]), report["notes"]


def test_tiny_imbalance_keeps_one_image_per_class(shared: Shared, runner: CliRunner) -> None:
    """--imbalance never empties a class by itself: the long-tail profile keeps at least one image each."""
    result = runner.invoke(app, ["data", "info", "--data", str(shared.data), "--imbalance", "0.0001", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["splits"]["train"] == {"c": 4, "b": 1, "a": 1}


# --- --debug shows the traceback -------------------------------------------------------------------------


# One interpreter runs the command twice (importing torch once costs seconds): first plainly, then with
# --debug, where the FoproError is left to Python, which prints the traceback and exits with 1.
REAL_PROCESS = """
import sys
from fopro.cli import app
args = ["data", "info", "--data", sys.argv[1]]
try:
    app(args, prog_name="fopro")
except SystemExit as stop:
    sys.stderr.write(f"--- exit {stop.code} ---\\n")
app(["--debug", *args], prog_name="fopro")
"""


def test_debug_prints_the_traceback_in_a_real_process(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", REAL_PROCESS, str(missing)], capture_output=True, text=True,
                          env=env, timeout=180)
    plain, _, debug = done.stderr.partition("--- exit 2 ---\n")
    assert debug, f"the plain run did not exit with 2:\n{done.stderr}"
    assert plain.strip().splitlines() == [f"error: --data {missing} does not exist: give the folder that holds train/, val/ and test/"]
    assert done.stdout == ""
    assert done.returncode == 1
    assert debug.startswith("Traceback (most recent call last)")
    assert f"fopro.errors.FoproError: --data {missing} does not exist" in debug
    assert "_read_image_folder" in debug  # the frame that raised


@pytest.mark.parametrize(
    "build, raised_in",
    [
        (_checkpoint_without_json("eval"), "load_meta"),
        (_option("--epochs", "0"), "validate"),
        (_malicious_pickle("torch.save"), "read_state_dict"),
    ],
    ids=["eval-checkpoint-without-json", "distill-epochs-zero", "distill-malicious-pickle"],
)
def test_debug_lets_the_error_through_with_its_traceback(build: Build, raised_in: str, shared: Shared, tmp_path: Path,
                                                         runner: CliRunner) -> None:
    args, names = build(shared, tmp_path)
    result = runner.invoke(app, ["--debug", *[str(arg) for arg in args]])
    assert result.exit_code != 0
    assert isinstance(result.exception, FoproError), repr(result.exception)
    assert "error: " not in result.stderr  # not turned into the one-line message
    text = "".join(traceback.format_exception(*result.exc_info))
    assert text.startswith("Traceback (most recent call last)")
    assert f"in {raised_in}" in text
    assert all(name in str(result.exception) for name in names)
    assert not (tmp_path / "pwned").exists()
