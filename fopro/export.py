"""`fopro export --onnx`: the student's inference path as a verified, self-describing ONNX model.

The exported graph is the checkpoint's backbone + classifier (`build_model`), optionally with the
input scaling/normalisation (uint8 NCHW input) and a softmax inside. Everything needed to use it
(classes, input size, mean/std, what is inside the graph, provenance) is stored in the model's
`metadata_props`, so `fopro eval OUT.onnx` works on the file alone (`OnnxPredictor`).
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.transformers.float16 import convert_float_to_float16
from onnxruntime.transformers.onnx_model import OnnxModel
from torch import nn

from fopro import __version__
from fopro.checkpoint import CheckpointMeta, file_sha256, sidecar
from fopro.models.weights import build_model
from fopro.data import DataOptions, checked_dataset, load_splits
from fopro.errors import FoproError, first_line
from fopro.io import atomic_path
from fopro.metrics import compute_metrics
from fopro.model_card import export_summary, write_card
from fopro.onnx_model import FORMAT, FORMAT_VERSION, INPUT_LAYOUT, graph_input, open_session, ort_errors, run_batched
from fopro.preprocess import Preprocess
from fopro.runtime import ProgressFn, no_progress

DEFAULT_OPSET = 17
MIN_OPSET = 11
MIN_INT8_OPSET = 13  # per-channel QDQ (axis on QuantizeLinear/DequantizeLinear)
FP32_MAX_DIFF = 1e-3
CHECK_SPLITS = ("val", "test", "train")
CALIBRATION_SPLITS = ("train", "val")
LATENCY_BATCHES = (1, 32)
CALIBRATION_BATCH = 16


@dataclass
class ExportOptions:
    """How to export: graph contents, batch axis, precision, and the verification to run."""

    opset: int = DEFAULT_OPSET
    batch: int | None = None  # None: dynamic batch axis; N: the graph accepts exactly N images
    include_preprocess: bool = False
    softmax: bool = False
    fp16: bool = False
    int8: bool = False
    calibration_images: int = 200
    val_images: int = 2000  # the int8 model is compared with the float one on (up to) this many VAL images
    max_int8_drop: float = 0.01  # a larger loss of val balanced accuracy (fraction) is an error ...
    max_int8_tail_drop: float = 0.03  # ... and of val tail recall
    allow_int8_drop: bool = False
    check: bool = True
    check_images: int = 64
    latency_repeats: int = 10
    latency_warmup: int = 2
    seed: int = 0

    @property
    def precision(self) -> str:
        return "int8" if self.int8 else "fp16" if self.fp16 else "fp32"

    def validate(self, data: DataOptions | None) -> None:
        max_opset = _max_opset()
        if not MIN_OPSET <= self.opset <= max_opset:
            raise FoproError(f"--opset {self.opset} is not supported: choose an opset from {MIN_OPSET} to {max_opset} (default {DEFAULT_OPSET})")
        if self.batch is not None and self.batch <= 0:
            raise FoproError(f"--batch {self.batch} must be 'dynamic' or a positive number of images")
        if self.fp16 and self.int8:
            raise FoproError("--fp16 and --int8 exclude each other: choose one precision")
        if self.int8 and (data is None or not data.given()):
            raise FoproError(
                "--int8 calibration needs data options: pass --data ROOT (or --train-csv/--val-csv with --images) "
                "so the quantiser can see real images"
            )
        if self.int8 and self.opset < MIN_INT8_OPSET:
            raise FoproError(f"--int8 needs --opset {MIN_INT8_OPSET} or later (per-channel quantisation); got {self.opset}")
        if self.max_int8_drop < 0 or self.max_int8_tail_drop < 0:
            raise FoproError("--max-int8-drop and --max-int8-tail-drop are losses in points: give numbers >= 0")
        if self.calibration_images <= 0:
            raise FoproError(f"--calibration-images {self.calibration_images} must be greater than 0")
        if self.check_images <= 0 or self.latency_repeats <= 0 or self.latency_warmup < 0:
            raise FoproError("the check needs at least one image and one latency repetition")


def _max_opset() -> int:
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

        return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except ImportError:  # private constant moved: the exporter still validates the opset itself
        return 20


# --- the graph -------------------------------------------------------------------------------------


class ExportWrapper(nn.Module):
    """Student + optional input preprocessing (uint8 -> /255 -> mean/std) + optional softmax."""

    def __init__(self, model: nn.Module, preprocess: Preprocess, include_preprocess: bool, softmax: bool, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.include_preprocess = include_preprocess
        self.softmax = softmax
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.include_preprocess:
            x = (x.to(torch.float32) / 255.0 - self.mean) / self.std
        out = self.model(x)
        if self.temperature != 1.0:  # the calibration fitted on val (checkpoint JSON 'temperature')
            out = out / self.temperature
        return torch.softmax(out, dim=1) if self.softmax else out


def _names(softmax: bool) -> tuple[str, str]:
    return "images", "probabilities" if softmax else "logits"


def _torch_export(wrapper: ExportWrapper, meta: CheckpointMeta, options: ExportOptions, path: Path) -> None:
    input_name, output_name = _names(options.softmax)
    batch = options.batch or 2
    shape = (batch, 3, meta.image_size, meta.image_size)
    if options.include_preprocess:
        example = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(options.seed))
    else:
        example = torch.randn(shape, generator=torch.Generator().manual_seed(options.seed))
    dynamic = None if options.batch else {input_name: {0: "batch"}, output_name: {0: "batch"}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # the TorchScript exporter is deprecated but is the one that works here; silence only that notice
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(
                wrapper,
                (example,),
                str(path),
                dynamo=False,
                opset_version=options.opset,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
    except RuntimeError as err:  # OnnxExporterError and UnsupportedOperatorError are RuntimeErrors
        raise FoproError(
            f"{meta.arch} cannot be exported to ONNX opset {options.opset} ({first_line(err, 300)}): "
            f"try another --opset (up to {_max_opset()})"
        ) from err


def metadata_props(meta: CheckpointMeta, options: ExportOptions, source: Path, sha256: str) -> dict[str, str]:
    """The string key/values stored in the model; `OnnxPredictor` reads them back."""
    input_name, output_name = _names(options.softmax)
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "classes": json.dumps(meta.classes),
        "num_classes": str(meta.num_classes),
        "image_size": str(meta.image_size),
        "mean": json.dumps(list(meta.mean)),
        "std": json.dumps(list(meta.std)),
        "preprocess_included": json.dumps(options.include_preprocess),
        "softmax_included": json.dumps(options.softmax),
        "input_name": input_name,
        "output_name": output_name,
        "input_dtype": "uint8" if options.include_preprocess else "float32",
        "input_range": "0-255" if options.include_preprocess else "normalised with mean/std",
        "input_layout": INPUT_LAYOUT,
        "batch": "dynamic" if options.batch is None else str(options.batch),
        "precision": options.precision,
        "opset": str(options.opset),
        "arch": meta.arch,
        "train_counts": json.dumps(meta.train_counts),
        "temperature": json.dumps(meta.temperature),
        "operating_points": json.dumps(meta.operating_points),
        "source_checkpoint": source.name,
        "source_sha256": sha256,
        "fopro_version": __version__,
    }


def _set_metadata(model: Any, props: dict[str, str]) -> None:
    onnx.helper.set_model_props(model, props)
    model.producer_name = "fopro"
    model.producer_version = __version__
    model.doc_string = f"fopro student {props['arch']} ({props['num_classes']} classes), exported from {props['source_checkpoint']}"


# --- data for the check and the calibration --------------------------------------------------------


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
    session: Any, wrapper: ExportWrapper, meta: CheckpointMeta, options: ExportOptions, batches: tuple[int, ...]
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


# --- export ----------------------------------------------------------------------------------------


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    options: ExportOptions = ExportOptions(),
    data: DataOptions | None = None,
    progress: ProgressFn = no_progress,
) -> dict:
    """Export a checkpoint's inference path to `out` (.onnx), verify it, and return the JSON-ready report.

    The file appears only once it is complete and (with `options.check`) verified: a float32 export that
    disagrees with the PyTorch student raises FoproError and leaves nothing at `out`.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix.lower() != ".onnx":
        raise FoproError(f"--onnx {out} must end in .onnx (fopro eval recognises ONNX models by the suffix)")
    if out.is_dir():
        raise FoproError(f"--onnx {out} is a folder: give a file path ending in .onnx")
    blocking = next((parent for parent in out.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        raise FoproError(f"cannot write --onnx {out}: {blocking} is a file, not a folder; choose a writable output path")
    options.validate(data)
    steps = 2 + options.int8 + options.check
    progress("exporting", 0, steps)
    model, meta = build_model(checkpoint)
    model = model.cpu().eval()
    weights_path, _ = sidecar(checkpoint)
    sha256 = file_sha256(weights_path)
    wrapper = ExportWrapper(model, meta.preprocess, options.include_preprocess, options.softmax, meta.temperature).eval()
    have_data = data is not None and data.given()
    # read the data first: a data mistake should fail before minutes of export/quantisation
    calibration = sample_images(data, meta, CALIBRATION_SPLITS, options.calibration_images, options.seed) if options.int8 else None
    check_sample = None
    if options.check:
        check_sample = sample_images(data, meta, CHECK_SPLITS, options.check_images, options.seed) if have_data else random_sample(
            meta, options.check_images, options.seed
        )
    props = metadata_props(meta, options, weights_path, sha256)
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256,
        "onnx": str(out),
        "arch": meta.arch,
        "precision": options.precision,
        "opset": options.opset,
        "batch": "dynamic" if options.batch is None else options.batch,
        "input": {
            "name": props["input_name"],
            "dtype": props["input_dtype"],
            "layout": INPUT_LAYOUT,
            "shape": [options.batch or "batch", 3, meta.image_size, meta.image_size],
            "preprocess_included": options.include_preprocess,
        },
        "output": {"name": props["output_name"], "softmax_included": options.softmax, "num_classes": meta.num_classes},
        "metadata": props,
        "options": asdict(options),
        "notes": [],
    }
    with atomic_path(out) as tmp, tempfile.TemporaryDirectory(prefix="fopro-export-") as work:
        fp32_path = Path(work) / "fp32.onnx"
        _torch_export(wrapper, meta, options, fp32_path)
        progress("exporting", 1, steps)
        float_model = onnx.load(str(fp32_path))
        _set_metadata(float_model, props)
        report["fp32_size_bytes"] = fp32_path.stat().st_size
        if options.fp16:
            final = _to_fp16(float_model, meta)
        elif options.int8:
            final = _quantize(fp32_path, Path(work), props, calibration, meta, options)
            int8_path = Path(work) / "int8_check.onnx"  # saved once; both checks run this one session
            onnx.save(final, str(int8_path))
            int8_session = open_session(int8_path)
            report["int8_accuracy"] = _int8_accuracy(int8_session, model, meta, calibration, options)
            report["int8_val"] = int8_on_val(int8_session, model, meta, data, options)
            progress("exporting", 2, steps)
        else:
            final = float_model
        _set_metadata(final, props)
        try:
            onnx.checker.check_model(final, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
            raise FoproError(f"the exported {meta.arch} graph fails the ONNX checker ({first_line(err, 300)}): try another --opset") from err
        try:
            onnx.save(final, str(tmp))
        except OSError as err:
            raise FoproError(f"cannot write {out}: {err.strerror}; choose a writable output path with free space") from err
        report["size_bytes"] = tmp.stat().st_size
        if options.check and check_sample is not None:
            report["check"] = _check(tmp, model, wrapper, meta, options, check_sample)
        progress("exporting", steps, steps)
    report["sha256"] = file_sha256(out)
    if options.fp16:
        report["notes"].append(
            "float16 targets GPUs (onnxruntime CUDA/TensorRT providers); on the CPU it runs through casts and is usually slower than float32"
        )
    if options.int8:
        report["notes"].append("int8 speed on the CPU depends on its int8 instructions (AVX-512 VNNI / AMX); compare the latencies above")
    report["model_card"] = str(write_card(checkpoint, out.with_name("MODEL_CARD.md"), export_summary(report)))
    return report


def _check(path: Path, model: nn.Module, wrapper: ExportWrapper, meta: CheckpointMeta, options: ExportOptions, sample: Sample) -> dict:
    session = open_session(path)
    feed = graph_input(sample.images, meta.preprocess, options.include_preprocess)
    exported = run_batched(session, feed, options.batch)
    reference = torch_outputs(model, meta, sample.images, options.softmax)
    result: dict[str, Any] = {"images": len(feed), "source": sample.source, "output": "probabilities" if options.softmax else "logits"}
    result.update(compare(reference, exported))
    if sample.labels is not None:
        result["accuracy_pytorch"] = float((reference.argmax(1) == sample.labels).mean())
        result["accuracy_onnx"] = float((exported.argmax(1) == sample.labels).mean())
    strict = options.precision == "fp32"
    result["passed"] = result["top1_agreement"] >= 1.0 and result["max_abs_diff"] <= FP32_MAX_DIFF if strict else None
    if strict and not result["passed"]:
        raise FoproError(
            f"the exported model disagrees with the PyTorch student on {sample.source} "
            f"(max |diff| {result['max_abs_diff']:.3g} > {FP32_MAX_DIFF:g} or top-1 agreement "
            f"{100 * result['top1_agreement']:.1f}% < 100%): nothing was written; try another --opset and report the architecture"
        )
    batches = LATENCY_BATCHES if options.batch is None else (options.batch,)
    result["latency"] = measure_latency(session, wrapper, meta, options, batches)
    result["latency_repeats"] = options.latency_repeats
    return result


def _to_fp16(float_model: Any, meta: CheckpointMeta) -> Any:
    """float16 weights and computation, float32 (or uint8) inputs and outputs."""
    try:
        model = convert_float_to_float16(float_model, keep_io_types=True)
        # the converter appends the input casts at the end of the node list: restore topological order
        OnnxModel.graph_topological_sort(model.graph)
    except (RuntimeError, ValueError) as err:
        raise FoproError(f"float16 conversion of {meta.arch} failed ({first_line(err, 300)}): export without --fp16") from err
    return model


class CalibrationReader:
    """An onnxruntime.quantization.CalibrationDataReader (it checks `get_next` by duck typing) over graph inputs."""

    def __init__(self, input_name: str, feed: np.ndarray, batch: int | None):
        self.input_name = input_name
        self.batches = []
        step = batch or CALIBRATION_BATCH
        for start in range(0, len(feed), step):
            part = feed[start : start + step]
            if batch and len(part) < batch:  # a fixed batch: pad the last one with copies of its first image
                part = np.concatenate([part, np.repeat(part[:1], batch - len(part), axis=0)])
            self.batches.append(part)
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def rewind(self) -> None:
        self.position = 0


def _quantize(fp32_path: Path, work: Path, props: dict[str, str], sample: Sample, meta: CheckpointMeta, options: ExportOptions) -> Any:
    feed = graph_input(sample.images, meta.preprocess, options.include_preprocess)
    reader = CalibrationReader(props["input_name"], feed, options.batch)
    int8_path = work / "int8.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice ("run pre-processing") through the root logger
    try:
        quantize_static(
            str(fp32_path),
            str(int8_path),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    except ort_errors() as err:
        raise FoproError(f"int8 quantisation of {meta.arch} failed ({first_line(err, 300)}): export without --int8, or try --fp16") from err
    finally:
        root.setLevel(level)
    return onnx.load(str(int8_path))


def int8_on_val(session: Any, model: nn.Module, meta: CheckpointMeta, data: DataOptions, options: ExportOptions) -> dict:
    """The int8 model against the float one on the VAL split (not the calibration images), class by class: the
    change of balanced accuracy and of tail recall; a drop beyond the limits stops the export (unless allowed)."""
    try:
        sample = sample_images(data, meta, ("val",), options.val_images, options.seed)
    except FoproError as err:
        return {"skipped": f"no val images to check the int8 model on ({err})"}
    reference, quantised = _float_and_int8(session, model, meta, sample, options)
    report = {name: compute_metrics(sample.labels, _as_probs(outputs, options.softmax), meta.classes, meta.train_counts)
              for name, outputs in (("float", reference), ("int8", quantised))}
    change = {key: _change(report["float"][key], report["int8"][key]) for key in ("balanced_accuracy", "tail_recall")}
    result = {
        "source": sample.source,
        "float": {key: report["float"][key] for key in ("balanced_accuracy", "tail_recall")},
        "int8": {key: report["int8"][key] for key in ("balanced_accuracy", "tail_recall")},
        "change": change,
        "per_class_recall_change": {
            row["name"]: _change(row["recall"], q["recall"]) for row, q in zip(report["float"]["per_class"], report["int8"]["per_class"])
        },
    }
    check_int8_drop(change, options, sample.source)
    return result


def check_int8_drop(change: dict[str, float | None], options: ExportOptions, source: str) -> None:
    """Refuse an int8 model that loses more val balanced accuracy or tail recall than the limits (unless allowed)."""
    limits = {"balanced_accuracy": (options.max_int8_drop, "--max-int8-drop"), "tail_recall": (options.max_int8_tail_drop, "--max-int8-tail-drop")}
    too_much = [key for key, (limit, _) in limits.items() if change.get(key) is not None and -change[key] > limit + 1e-12]
    if too_much and not options.allow_int8_drop:
        key = too_much[0]
        limit, flag = limits[key]
        raise FoproError(
            f"int8 loses {-100 * change[key]:.1f} points of {key.replace('_', ' ')} on val ({source}), more than {flag} "
            f"{100 * limit:.1f}: nothing was written; export fp32 / fp16, or pass --allow-int8-drop"
        )


def _as_probs(outputs: np.ndarray, softmax_included: bool) -> np.ndarray:
    return outputs if softmax_included else torch.softmax(torch.from_numpy(outputs).double(), dim=1).numpy()


def _change(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _float_and_int8(session: Any, model: nn.Module, meta: CheckpointMeta, sample: Sample, options: ExportOptions) -> tuple[np.ndarray, np.ndarray]:
    """The PyTorch student's outputs and the int8 session's on the same images."""
    quantised = run_batched(session, graph_input(sample.images, meta.preprocess, options.include_preprocess), options.batch)
    return torch_outputs(model, meta, sample.images, options.softmax), quantised


def _int8_accuracy(session: Any, model: nn.Module, meta: CheckpointMeta, sample: Sample, options: ExportOptions) -> dict:
    """Top-1 agreement of the int8 model with the float model, and both accuracies, on the calibration images."""
    reference, quantised = _float_and_int8(session, model, meta, sample, options)
    result: dict[str, Any] = {"images": len(quantised), "source": sample.source}
    result.update(compare(reference, quantised))
    accuracy_float = float((reference.argmax(1) == sample.labels).mean())
    accuracy_int8 = float((quantised.argmax(1) == sample.labels).mean())
    result.update(accuracy_float=accuracy_float, accuracy_int8=accuracy_int8, accuracy_change=accuracy_int8 - accuracy_float)
    return result
