"""`fopro export`'s options: graph contents, batch axis, precision and the checks to run, validated before
anything is read."""

from __future__ import annotations

from dataclasses import dataclass

from fopro.data import DataOptions
from fopro.errors import FoproError

DEFAULT_OPSET = 17

MIN_OPSET = 11

MIN_INT8_OPSET = 13  # per-channel QDQ (axis on QuantizeLinear/DequantizeLinear)


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
        max_opset = supported_max_opset()
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


def supported_max_opset() -> int:
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

        return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except ImportError:  # private constant moved: the exporter still validates the opset itself
        return 20
