"""What the benchmark scripts share: options, the machine description, interleaved timing, the training
step of fopro/train.py, model builders with random weights, and the table / JSON output.

Every figure that a target is checked on is a RATIO of two timings taken in the same process, interleaved
(round-robin over the cases, warm-up first, median over repetitions), so machine noise hits both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never reach the hub
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep torch.profiler's start/stop chatter off stderr

import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python benchmarks/x.py` from anywhere uses this checkout's fopro
    sys.path.insert(0, str(REPO))

from fopro.fpg import FourierPromptGenerator  # noqa: E402
from fopro.losses import SupervisedLoss  # noqa: E402
from fopro.methods import Method, MethodConfig, build_method  # noqa: E402
from fopro.models import StudentOptions, Teacher, create_student  # noqa: E402
from fopro.preprocess import Preprocess  # noqa: E402
from fopro.schedule import set_step_schedule, step_seed  # noqa: E402
from fopro.train import optimisation_step  # noqa: E402

DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)


# --- options -------------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, 32 px, a few steps: checks that the script runs (figures meaningless)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write every figure, the targets and the machine to this JSON file")
    parser.add_argument("--plain", action="store_true", help="plain-text tables instead of rich ones")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    return parser


def apply_threads(threads: int | None, quick: bool = False) -> int | None:
    """--threads, or 1 thread for --quick (tiny ops on busy shared cores are far faster without OpenMP).

    Returns the thread count set, or None when torch keeps its own choice.
    """
    if threads is None and quick:
        threads = 1
    if threads is not None:
        if threads < 1:
            raise SystemExit("--threads must be at least 1")
        torch.set_num_threads(threads)
    return threads


# --- the machine ---------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """The CPU, cores, torch threads and library versions, printed with every result."""
    import timm

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    from fopro import __version__

    return {
        "cpu": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "onnxruntime": ort_version,
        "fopro": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "load_average_at_start": load,
    }


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (native libraries' chatter, e.g. the profiler's start/stop lines)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


# --- timing --------------------------------------------------------------------------------------------


def round_robin(
    cases: dict[str, Callable[[], Any]], warmup: int, repeats: int, per_call: dict[str, int] | None = None
) -> dict[str, list[float]]:
    """Seconds per unit of each case, timed interleaved: all cases once per repetition, in a rotating order.

    `warmup` untimed rounds come first. A case that does `per_call[name]` units per call (a block of training
    steps, say) is divided by it. Returns name -> list of `repeats` samples (in repetition order, so that
    samples of the same index were taken close in time: see `paired_ratio`).
    """
    names = list(cases)
    per_call = per_call or {}
    for _ in range(warmup):
        for name in names:
            cases[name]()
    samples: dict[str, list[float]] = {name: [0.0] * repeats for name in names}
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            cases[name]()
            samples[name][rep] = (time.perf_counter() - start) / per_call.get(name, 1)
    return samples


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median / min / max in milliseconds."""
    ms = [1000.0 * s for s in samples]
    return {"median_ms": round(statistics.median(ms), 4), "min_ms": round(min(ms), 4), "max_ms": round(max(ms), 4), "n": len(ms)}


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over repetitions of numerator[i] / denominator[i] (samples taken in the same round)."""
    return round(statistics.median(n / d for n, d in zip(numerator, denominator)), 4)


def target(name: str, value: float | None, limit: float, op: str = "<=", detail: str = "") -> dict[str, Any]:
    """A checked target: PASS when `value op limit`."""
    if value is None or not math.isfinite(value):
        passed = None
    else:
        passed = value <= limit if op == "<=" else value < limit if op == "<" else value >= limit if op == ">=" else value > limit
    return {"name": name, "value": value, "op": op, "limit": limit, "pass": passed, "detail": detail}


# --- the training step, as fopro/train.py runs it ------------------------------------------------------


def train_step(
    method: Method,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    images: torch.Tensor,
    labels: torch.Tensor,
    step: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    lr: float = 3e-4,
    lr_factor: float = 1.0,
    adversary: float = 1.0,
    grad_clip: float = 5.0,
) -> tuple[None, dict[str, float]]:
    """One optimisation step as `fopro.train.train_epoch` does it (same seeding, same library step and schedule
    functions); the caller gives the schedule's values (default: peak rate, full adversary); left out: the
    progress string and the running averages."""
    torch.manual_seed(step_seed(seed, epoch, step))
    set_step_schedule(method, optimizer, lr, lr_factor, adversary)
    parts, _ = optimisation_step(method, optimizer, scaler, images, labels, step, grad_clip)
    return None, parts


# --- models with random weights ------------------------------------------------------------------------


def random_teacher(name: str, image_size: int) -> Teacher:
    """A frozen fopro Teacher around timm.create_model(name, num_classes=0) with random weights."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = model.pretrained_cfg or {}
    preprocess = Preprocess(image_size, tuple(cfg.get("mean", DEFAULT_MEAN)), tuple(cfg.get("std", DEFAULT_STD)))
    return Teacher(model, preprocess, f"{name} with random weights (benchmark)")


class Trainee:
    """A method built by fopro.methods.build_method, its student optimiser (as train.py makes it) and a step counter."""

    def __init__(self, method: Method, lr: float = 3e-4):
        self.method = method
        self.optimizer = torch.optim.Adam(method.student_parameters(), lr=lr, weight_decay=0.0)
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)  # what train.py builds on the CPU
        self.lr = lr
        self.step_index = 0
        method.train()

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        _, parts = train_step(self.method, self.optimizer, self.scaler, images, labels, self.step_index, lr=self.lr)
        self.step_index += 1
        return parts


def build_trainee(
    name: str,
    teacher: Teacher | None,
    student_arch: str,
    image_size: int,
    train_counts: list[int],
    fpg_every: int = 1,
    adv_weight: float = 1.0,
    seed: int = 0,
    align_focus: float = 0.0,
) -> Trainee:
    """The library's method object (build_method) with a real student (create_student), as build_run makes them."""
    torch.manual_seed(seed)
    student, student_preprocess = create_student(StudentOptions(arch=student_arch, image_size=image_size), len(train_counts))
    fpg = FourierPromptGenerator(image_size) if name == "fopro" else None  # DistillConfig defaults: both, 0.5, 16
    config = MethodConfig(name=name, fpg_every=fpg_every, adv_weight=adv_weight, align_focus=align_focus)
    method = build_method(config, student, student_preprocess, SupervisedLoss("balanced_softmax", train_counts), teacher if name != "none" else None, fpg)
    return Trainee(method)


def random_batches(count: int, batch: int, image_size: int, num_classes: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Raw [0, 1] images and labels, as the loader delivers them."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(batch, 3, image_size, image_size, generator=generator), torch.randint(0, num_classes, (batch,), generator=generator))
        for _ in range(count)
    ]


@torch.no_grad()
def trained_like_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm trained-looking affine parameters and running statistics (in place).

    Freshly initialised BatchNorms (weight 1, bias 0, mean 0, var 1) fold into identical all-zero conv
    biases at ONNX export; the exporter then shares them through Identity nodes, which the int8 quantiser
    cannot fuse: an untrained model would give int8 timings no trained checkpoint has. Speed is otherwise
    unaffected by the values.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            n = module.num_features
            if module.weight is not None:
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- synthetic data ------------------------------------------------------------------------------------


def synth_data(root: Path, image_size: int, max_per_class: int, num_classes: int = 8, imbalance: float = 0.1, eval_per_class: int = 4) -> Path:
    """A small synthetic dataset (fopro.data.synth) under root; returns the ImageFolder root of the target task."""
    from fopro.data.synth import SynthConfig, generate_synth, is_synth_dataset

    if not is_synth_dataset(root):
        config = SynthConfig(
            num_classes=num_classes,
            image_size=image_size,
            imbalance=imbalance,
            max_per_class=max_per_class,
            val_per_class=eval_per_class,
            test_per_class=eval_per_class,
            public_classes=2,
            public_per_class=1,
            public_val_per_class=1,
        )
        generate_synth(root, config)
    return root / "target"


# --- output --------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 10 ** (-digits)):
            return f"{value:.{digits}g}"
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class Output:
    """Tables on stdout (rich, or plain text), collected into one JSON payload."""

    def __init__(self, benchmark: str, args: argparse.Namespace):
        self.plain = args.plain
        self.json_out = args.json_out
        self.payload: dict[str, Any] = {
            "benchmark": benchmark,
            "quick": bool(args.quick),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": machine_info(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("json_out", "plain")},
        }
        self.console = None
        if not self.plain:
            try:
                from rich.console import Console

                # piped output (a log file, a test) gets a wide fixed width instead of rich's 80 columns
                self.console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
            except ImportError:
                self.plain = True

    def table(self, title: str, columns: list[str], rows: list[list[Any]]) -> None:
        cells = [[fmt(c) for c in row] for row in rows]
        if self.console is not None:
            from rich.table import Table

            table = Table(title=title, title_justify="left")
            for i, column in enumerate(columns):
                table.add_column(column, justify="left" if i == 0 else "right")
            for row in cells:
                table.add_row(*row)
            self.console.print(table)
            return
        widths = [max(len(str(c)) for c in col) for col in zip(columns, *cells)]
        line = lambda row: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
        print(title)
        print(line(columns))
        print("  ".join("-" * w for w in widths))
        for row in cells:
            print(line(row))
        print()

    def machine(self) -> None:
        m = self.payload["machine"]
        text = (
            f"machine: {m['cpu']} | {m['cores_usable']}/{m['cores_logical']} cores usable | torch threads {m['torch_threads']} | "
            f"torch {m['torch']} | timm {m['timm']} | onnxruntime {m['onnxruntime']} | load average {m['load_average_at_start']}"
        )
        self.note(text)
        if self.payload["quick"]:
            self.note("--quick: tiny models and a few repetitions; the figures only show that the script runs")

    def note(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, markup=False)
        else:
            print(text)

    def targets(self, targets: list[dict[str, Any]]) -> None:
        self.payload["targets"] = targets
        rows = []
        for t in targets:
            verdict = "n/a" if t["pass"] is None else "PASS" if t["pass"] else "MISS"
            rows.append([t["name"], fmt(t["value"], 4), f"{t['op']} {fmt(t['limit'], 4)}", verdict, t["detail"]])
        self.table("targets", ["target", "measured", "limit", "result", "detail"], rows)

    def finish(self) -> dict[str, Any]:
        if self.json_out is not None:
            self.json_out.parent.mkdir(parents=True, exist_ok=True)
            self.json_out.write_text(json.dumps(self.payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
            self.note(f"results written to {self.json_out}")
        return self.payload
