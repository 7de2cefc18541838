"""What does inference cost? Teacher versus student, and PyTorch versus onnxruntime for the student.

    python benchmarks/inference.py                      # teacher resnet50 vs student resnet18, 64 px, batches 1 and 32
    python benchmarks/inference.py --quick --json-out /tmp/inference.json

Parameters and FLOPs (torch.utils.flop_counter.FlopCounterMode, one image) and PyTorch eager latency (CPU,
inference mode) of the teacher's embedding network and the student classifier; the student's speed-up over the
teacher is compared with their FLOP ratio. The student (random weights) is saved with fopro.checkpoint.save_checkpoint
and exported with fopro.export.export_onnx in fp32, fp16 and int8 (calibrated on a small synthetic dataset); the
sessions are timed against PyTorch eager on the same inputs, interleaved. The deploy paths (TorchPredictor and
OnnxPredictor on raw images, preprocessing and softmax included) and the export reports' own latency figures are
given for information.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    Output,
    apply_threads,
    base_parser,
    paired_ratio,
    parameter_count,
    random_teacher,
    round_robin,
    summary,
    synth_data,
    target,
    trained_like_batchnorm,
)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from fopro.checkpoint import CheckpointMeta, save_checkpoint  # noqa: E402
from fopro.data import DataOptions, load_splits  # noqa: E402
from fopro.evaluate import TorchPredictor  # noqa: E402
from fopro.export import export_onnx  # noqa: E402
from fopro.export_options import ExportOptions  # noqa: E402
from fopro.onnx_model import OnnxPredictor, graph_input, open_session  # noqa: E402
from fopro.models import StudentOptions, create_student  # noqa: E402

TARGET_SPEEDUP_EFFICIENCY = 0.8  # student speed-up >= 80 % of the FLOP ratio
TARGET_ORT_OVER_TORCH = 1.0  # onnxruntime fp32 at least as fast as PyTorch eager at batch 1
PRECISIONS = ("fp32", "fp16", "int8")


def parse_args(argv: list[str] | None = None):
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--calibration-images", type=int, default=64, help="int8 calibration images (synthetic train split)")
    parser.add_argument("--calls", type=int, default=10, help="calls per timed sample at batch 1 (fewer at larger batches)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the checkpoint, the .onnx files and the data here (default: temporary)")
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher, args.student, args.image_size = "resnet10t", "test_resnet", 32
        args.batches, args.calibration_images, args.calls, args.warmup, args.repeats = "1,4", 8, 2, 0, 2
    args.batch_sizes = sorted({int(b) for b in str(args.batches).split(",") if b.strip()})
    if not args.batch_sizes or min(args.batch_sizes) < 1 or args.repeats < 1 or args.calls < 1:
        parser.error("--batches takes positive sizes; --repeats and --calls at least 1")
    return args


def flops_per_image(model: torch.nn.Module, image_size: int) -> int:
    x = torch.randn(1, 3, image_size, image_size)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def session(path: Path, threads: int | None):
    """fopro's own session (onnxruntime's default threads); with --threads, the same thread count as torch."""
    if threads is None:
        return open_session(path)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def conv_fusion(path: Path, optimised: Path) -> dict[str, int]:
    """How many convolutions of the int8 model onnxruntime fuses into QLinearConv (the rest run in float between Q/DQ)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(optimised)
    ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    ops = [node.op_type for node in onnx.load(str(optimised)).graph.node]
    return {"qlinear_conv": ops.count("QLinearConv"), "float_conv": ops.count("Conv") + ops.count("FusedConv"), "dequantize": ops.count("DequantizeLinear")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = apply_threads(args.threads, args.quick)
    out = Output("inference", args)
    out.machine()
    size = args.image_size
    with tempfile.TemporaryDirectory(prefix="fopro-bench-infer-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data_root = synth_data(work / "synth", size, max_per_class=max(8, args.calibration_images // 2), eval_per_class=2)
        classes = load_splits(DataOptions(data=data_root), splits=("train",)).classes

        torch.manual_seed(args.seed)
        teacher = random_teacher(args.teacher, size).model.eval()  # the embedding network used in distillation
        student, preprocess = create_student(StudentOptions(arch=args.student, image_size=size), len(classes))
        trained_like_batchnorm(teacher, args.seed)
        trained_like_batchnorm(student.eval(), args.seed + 1)
        meta = CheckpointMeta(arch=args.student, classes=classes, image_size=size, mean=list(preprocess.mean), std=list(preprocess.std))
        checkpoint = save_checkpoint(work / "student", student.state_dict(), meta)

        reports, sessions = {}, {}
        for precision in PRECISIONS:
            options = ExportOptions(
                fp16=precision == "fp16",
                int8=precision == "int8",
                calibration_images=args.calibration_images,
                check_images=8 if args.quick else 64,
                latency_repeats=2 if args.quick else 10,
                latency_warmup=1,
                seed=args.seed,
            )
            path = work / f"student-{precision}.onnx"
            reports[precision] = export_onnx(checkpoint, path, options, data=DataOptions(data=data_root))
            sessions[precision] = session(path, threads)
        int8_fusion = conv_fusion(work / "student-int8.onnx", work / "student-int8-optimised.onnx")
        predictors = {"torch": TorchPredictor.from_checkpoint(checkpoint, device="cpu"), "onnx": OnnxPredictor(work / "student-fp32.onnx")}

        models = {
            "teacher": {"arch": args.teacher, "params": parameter_count(teacher), "flops_per_image": flops_per_image(teacher, size)},
            "student": {"arch": args.student, "params": parameter_count(student), "flops_per_image": flops_per_image(student, size)},
        }
        flop_ratio = models["teacher"]["flops_per_image"] / models["student"]["flops_per_image"]
        out.table(
            f"models at {size} px (FLOPs per image, FlopCounterMode: 2 per multiply-add)",
            ["model", "arch", "parameters (M)", "GFLOPs / image"],
            [[name, m["arch"], m["params"] / 1e6, m["flops_per_image"] / 1e9] for name, m in models.items()]
            + [["teacher / student", "", models["teacher"]["params"] / models["student"]["params"], flop_ratio]],
        )

        generator = torch.Generator().manual_seed(args.seed + 1)
        cases, per_call = {}, {}
        for batch in args.batch_sizes:
            raw = torch.rand(batch, 3, size, size, generator=generator)
            x = preprocess(raw)
            feed = graph_input(raw, meta.preprocess, False)  # float32, normalised: what the exported graph takes
            calls = max(1, args.calls // batch) if batch > 1 else args.calls

            def torch_case(model, tensor=x, n=calls):
                def run() -> None:
                    with torch.inference_mode():
                        for _ in range(n):
                            model(tensor)

                return run

            def ort_case(session, array=feed, n=calls):
                name = session.get_inputs()[0].name

                def run() -> None:
                    for _ in range(n):
                        session.run(None, {name: array})

                return run

            cases[f"teacher_torch_b{batch}"] = torch_case(teacher)
            cases[f"student_torch_b{batch}"] = torch_case(student)
            for precision in PRECISIONS:
                cases[f"student_ort_{precision}_b{batch}"] = ort_case(sessions[precision])
            if batch == 1:
                for kind, predictor in predictors.items():
                    cases[f"deploy_{kind}_predictor_b1"] = (lambda p=predictor, r=raw, n=calls: [p.predict_proba(r) for _ in range(n)])
            for name in cases:
                per_call.setdefault(name, calls)
        samples = round_robin(cases, args.warmup, args.repeats, per_call=per_call)

    timings = {name: summary(values) for name, values in samples.items()}
    rows, speedups, ort = [], {}, {}
    for batch in args.batch_sizes:
        t, s = f"teacher_torch_b{batch}", f"student_torch_b{batch}"
        speedups[batch] = paired_ratio(samples[t], samples[s])
        for name in [t, s] + [f"student_ort_{p}_b{batch}" for p in PRECISIONS]:
            ort[name] = paired_ratio(samples[name], samples[s])
            rows.append([name, batch, timings[name]["median_ms"], timings[name]["min_ms"], 1000.0 * batch / timings[name]["median_ms"], ort[name]])
    for kind in ("torch", "onnx"):
        name = f"deploy_{kind}_predictor_b1"
        if name in samples:
            ort[name] = paired_ratio(samples[name], samples["student_torch_b1"] if "student_torch_b1" in samples else samples[name])
            rows.append([name, 1, timings[name]["median_ms"], timings[name]["min_ms"], 1000.0 / timings[name]["median_ms"], ort[name]])
    out.table(
        "latency per call (PyTorch eager, inference mode; onnxruntime CPUExecutionProvider)",
        ["case", "batch", "median ms", "min ms", "images/s", "x student torch"],
        rows,
    )
    efficiency = {batch: round(speedups[batch] / flop_ratio, 4) for batch in args.batch_sizes}
    out.table(
        "student speed-up over the teacher versus their FLOP ratio",
        ["batch", "speed-up (teacher ms / student ms)", "FLOP ratio", "speed-up / FLOP ratio"],
        [[batch, speedups[batch], flop_ratio, efficiency[batch]] for batch in args.batch_sizes],
    )
    report_rows = []
    for precision, report in reports.items():
        check = report.get("check") or {}
        for key, lat in (check.get("latency") or {}).items():
            report_rows.append([precision, lat["batch"], lat["pytorch_ms"], lat["onnxruntime_ms"], report.get("size_bytes"), check.get("max_abs_diff"), check.get("top1_agreement")])
    out.table(
        "fopro export reports (their own check: median of a few calls, not interleaved; for information)",
        ["precision", "batch", "pytorch ms", "onnxruntime ms", "file bytes", "max |diff| vs torch", "top-1 agreement"],
        report_rows,
    )
    out.note(
        f"onnxruntime threads: {'its default (fopro.onnx_model.open_session)' if threads is None else threads} | torch threads: "
        f"{torch.get_num_threads()} | int8 graph after onnxruntime's optimisation: {int8_fusion['qlinear_conv']} QLinearConv, "
        f"{int8_fusion['float_conv']} float Conv, {int8_fusion['dequantize']} DequantizeLinear"
        + (" (convolutions left in float: int8 pays quantise/dequantise around float kernels)" if int8_fusion["float_conv"] else "")
    )
    checks = []
    for batch in args.batch_sizes:
        checks.append(target(f"student speed-up / FLOP ratio, batch {batch}", efficiency[batch], TARGET_SPEEDUP_EFFICIENCY, ">=",
                             "speed-up close to the FLOP ratio (above is fine)"))
    first = args.batch_sizes[0]
    checks.append(target(f"onnxruntime fp32 / PyTorch eager, batch {first}", ort[f"student_ort_fp32_b{first}"], TARGET_ORT_OVER_TORCH, "<=",
                         "onnxruntime at least as fast"))
    out.targets(checks)
    out.payload.update(
        {
            "models": models,
            "flop_ratio": round(flop_ratio, 4),
            "timings": timings,
            "samples_ms": {name: [round(1000 * v, 4) for v in values] for name, values in samples.items()},
            "speedup": {str(b): v for b, v in speedups.items()},
            "speedup_over_flop_ratio": {str(b): v for b, v in efficiency.items()},
            "over_student_torch": ort,
            "onnxruntime_threads": threads,
            "int8_conv_fusion": int8_fusion,
            "export_reports": {
                p: {"size_bytes": r.get("size_bytes"), "check": r.get("check"), "int8_accuracy": r.get("int8_accuracy"), "notes": r.get("notes")}
                for p, r in reports.items()
            },
        }
    )
    return out.finish()


if __name__ == "__main__":
    main()
