"""How much memory does training take? Peak resident memory of `fopro distill`, run as a subprocess.

    python benchmarks/memory.py                         # fopro, resnet50 -> resnet18, 64 px, batch 32, 1 epoch, CPU
    python benchmarks/memory.py --methods ekd,fopro --json-out /tmp/memory.json
    python benchmarks/memory.py --quick

The teacher is a random-weight resnet50 saved as a fopro checkpoint (fopro.checkpoint.save_checkpoint: no
download); the data is a small synthetic ImageFolder (fopro.data.synth). Each run is a separate process whose
peak resident set size is read from the kernel when it is reaped (os.wait4: the figure `/usr/bin/time -v`
prints as "Maximum resident set size"). For scale, the same figure for a process that only imports fopro,
torch and timm is measured too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, Output, apply_threads, base_parser, synth_data, target  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402

from fopro.checkpoint import CheckpointMeta, save_checkpoint  # noqa: E402

GIB = 1024**3
TARGET_PEAK_BYTES = 3 * GIB


def parse_args(argv: list[str] | None = None):
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="resnet50", help="architecture of the random teacher checkpoint")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--methods", default="fopro", help="comma-separated fopro distill --method values, each one run")
    parser.add_argument("--max-per-class", type=int, default=100, help="synthetic training images of the most frequent class")
    parser.add_argument("--extra", default="", help="more `fopro distill` options, e.g. '--workers 2' (split on spaces)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the data, the teacher and the runs here (default: temporary)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher, args.student, args.image_size, args.batch_size, args.max_per_class = "test_resnet", "test_resnet", 32, 4, 6
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.method_list:
        parser.error("--methods needs at least one method")
    return args


def peak_rss(command: list[str], log: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run `command`; its peak resident set size (bytes) from os.wait4, its wall time and exit status."""
    start = time.perf_counter()
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: kilobytes on Linux, bytes on macOS
    return {
        "peak_rss_bytes": int(usage.ru_maxrss) * scale,
        "wall_s": round(time.perf_counter() - start, 2),
        "exit_code": process.returncode,
        "user_cpu_s": round(usage.ru_utime, 2),
        "log": str(log),
    }


def teacher_checkpoint(path: Path, arch: str, image_size: int, seed: int) -> Path:
    """A random-weight timm model saved as a fopro checkpoint (what `--teacher CKPT.safetensors` reads)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=2)
    cfg = model.pretrained_cfg or {}
    meta = CheckpointMeta(
        arch=arch,
        classes=["a", "b"],
        image_size=image_size,
        mean=list(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=list(cfg.get("std", (0.229, 0.224, 0.225))),
    )
    return save_checkpoint(path, model.state_dict(), meta)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    apply_threads(args.threads, args.quick)
    out = Output("memory", args)
    out.machine()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)  # this checkout's fopro
    if args.threads is not None or args.quick:
        env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fopro-bench-memory-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = synth_data(work / "synth", args.image_size, args.max_per_class, eval_per_class=2 if args.quick else 10)
        teacher = teacher_checkpoint(work / "teacher", args.teacher, args.image_size, args.seed)
        baselines = [] if args.quick else [("import_torch", "import torch"), ("import_fopro", "import fopro.cli, fopro.train, torch, timm")]
        for name, code in baselines:
            runs[name] = peak_rss([sys.executable, "-c", code], work / f"{name}.log", args.timeout, env)
        for method in args.method_list:
            run_dir = work / f"run-{method}"
            command = [
                sys.executable, "-m", "fopro", "distill",
                "--data", str(data), "--teacher", str(teacher), "--student", args.student,
                "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--epochs", "1",
                "--method", method, "--device", "cpu", "--seed", str(args.seed), "--out", str(run_dir), "--overwrite", "--json",
            ] + args.extra.split()
            result = peak_rss(command, work / f"distill-{method}.log", args.timeout, env)
            result["command"] = " ".join(command)
            metrics = run_dir / "metrics.jsonl"
            if metrics.is_file():
                first = json.loads(metrics.read_text(encoding="utf-8").splitlines()[0])
                result["train_images_per_second"] = first.get("images_per_second")
            if result["exit_code"] != 0:
                tail = (work / f"distill-{method}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
                out.note(f"fopro distill --method {method} failed (exit {result['exit_code']}):\n{tail}")
            runs[f"distill_{method}"] = result
        train_images = sum(1 for _ in (data / "train").rglob("*.png"))
        if args.work_dir is None:  # the logs go with the temporary folder
            for result in runs.values():
                result.pop("log", None)

    base = runs["import_fopro"]["peak_rss_bytes"] if "import_fopro" in runs else None
    rows = []
    for name, result in runs.items():
        rows.append([name, result["peak_rss_bytes"] / GIB, None if base is None else (result["peak_rss_bytes"] - base) / 1024**2, result["wall_s"], result.get("train_images_per_second"), result["exit_code"]])
    out.table(
        f"peak resident memory ({args.teacher} checkpoint -> {args.student}, {args.image_size} px, batch {args.batch_size}, 1 epoch of {train_images} images)",
        ["process", "peak RSS (GiB)", "MiB above import_fopro", "wall s", "train images/s", "exit"],
        rows,
    )
    out.note("import_torch / import_fopro (not with --quick): a process that only imports them (the floor any fopro command "
             "pays); distill_*: the whole command (data check, training, validation, checkpoints, test evaluation)")
    checks = []
    for method in args.method_list:
        result = runs[f"distill_{method}"]
        value = result["peak_rss_bytes"] / GIB if result["exit_code"] == 0 else None
        checks.append(target(f"fopro distill --method {method}: peak RSS < 3 GiB", value, TARGET_PEAK_BYTES / GIB, "<", "GiB; n/a when the run failed"))
    out.targets(checks)
    out.payload.update({"runs": runs, "train_images": train_images, "peak_rss_gib": {k: round(v["peak_rss_bytes"] / GIB, 4) for k, v in runs.items()},
                        "above_import_mib": {k: round((v["peak_rss_bytes"] - base) / 1024**2, 1) for k, v in runs.items()} if base else None})
    payload = out.finish()
    if any(r["exit_code"] != 0 for r in runs.values()):
        raise SystemExit(1)
    return payload


if __name__ == "__main__":
    main()
