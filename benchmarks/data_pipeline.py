"""Does the data loader keep up with training? Images per second delivered versus images per second consumed.

    python benchmarks/data_pipeline.py                  # synthetic ImageFolder at 64 px, fopro resnet50 -> resnet18, batch 32
    python benchmarks/data_pipeline.py --quick --json-out /tmp/data.json

The loader is fopro's own: `ImageDataset` with the train augmentation, batches from `epoch_batches(epoch_order(...))`
and the DataLoader of `fopro.train.make_loader` (a new one per epoch, as training makes it, so worker start-up
counts), with the in-memory cache on or off and 0/1/2 worker processes. The consumer is a fopro training step
measured in the same run, interleaved with the loader passes. Also measured: fopro steps fed by the loader the
library picks by default (cache on -> workers 0, loading in series with the step), to see the real slowdown.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    Output,
    apply_threads,
    base_parser,
    build_trainee,
    paired_ratio,
    random_batches,
    random_teacher,
    round_robin,
    summary,
    synth_data,
    target,
)

import torch  # noqa: E402

from fopro.data import DataOptions, ImageDataset, load_splits  # noqa: E402
from fopro.schedule import epoch_batches, epoch_order  # noqa: E402
from fopro.train import make_loader  # noqa: E402

TARGET_LOADER_OVER_STEP = 1.0


def parse_args(argv: list[str] | None = None):
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="an existing ImageFolder ROOT (with train/) instead of the generated synthetic one")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the synthetic data is generated (default: a temporary folder, removed)")
    parser.add_argument("--max-per-class", type=int, default=200, help="synthetic training images of the most frequent class")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batches", type=int, default=16, help="batches per loader pass (at most one epoch)")
    parser.add_argument("--steps", type=int, default=3, help="fopro steps per timed consumer block")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.teacher, args.student = "resnet10t", "test_resnet"
        args.image_size, args.batch_size, args.max_per_class = 32, 4, 6
        args.batches, args.steps, args.warmup, args.repeats = 2, 1, 0, 2
    args.worker_counts = sorted({int(w) for w in str(args.workers).split(",") if w.strip()})
    if any(w < 0 for w in args.worker_counts) or not args.worker_counts or args.repeats < 1 or args.batches < 1:
        parser.error("--workers takes non-negative counts; --repeats and --batches at least 1")
    return args


def loader_pass(dataset: ImageDataset, order_labels: list[int], batch_size: int, batches: int, workers: int, epoch: dict[str, int]):
    """One pass of fopro.train.make_loader over `batches` batches (a fresh DataLoader each time, as each epoch gets)."""
    plan = epoch_batches(epoch_order(order_labels, 0, 0, False), batch_size)
    plan = (plan * (batches // len(plan) + 1))[:batches]
    run_like = SimpleNamespace(config=SimpleNamespace(workers=workers), train_set=dataset, device=torch.device("cpu"))

    def run() -> None:
        epoch["value"] += 1
        dataset.set_epoch(epoch["value"])  # new augmentation draws each pass
        for images, labels, _ in make_loader(run_like, dataset, plan):
            assert images.shape[0] == len(labels)

    return run, sum(len(b) for b in plan)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    apply_threads(args.threads, args.quick)
    out = Output("data_pipeline", args)
    out.machine()
    with tempfile.TemporaryDirectory(prefix="fopro-bench-data-") as tmp:
        root = args.data or synth_data(Path(args.work_dir or tmp) / "synth", args.image_size, args.max_per_class)
        splits = load_splits(DataOptions(data=root), splits=("train",))
        manifest = splits["train"]
        counts = manifest.class_counts()
        datasets = {
            "cache": ImageDataset(manifest, args.image_size, train=True, seed=args.seed, cache=True),
            "nocache": ImageDataset(manifest, args.image_size, train=True, seed=args.seed, cache=False),
        }
        datasets["cache"].scan()  # decode once into memory, as checked_dataset does before training
        out.note(
            f"data: {len(manifest)} training images of {root} ({len(counts)} classes), {args.image_size} px; "
            f"fopro {args.teacher} -> {args.student}, batch {args.batch_size}; {args.warmup} warm-up + {args.repeats} rounds, interleaved"
        )
        fed_run = SimpleNamespace(config=SimpleNamespace(workers=None), train_set=datasets["cache"], device=torch.device("cpu"))
        default_workers = make_loader(fed_run, fed_run.train_set, [[0]]).num_workers  # what training picks for cached data (--workers not given)
        epoch = {"value": 0}
        cases, units = {}, {}
        for cache_name, dataset in datasets.items():
            for workers in args.worker_counts:
                run, images = loader_pass(dataset, manifest.labels, args.batch_size, args.batches, workers, epoch)
                cases[f"loader_{cache_name}_w{workers}"], units[f"loader_{cache_name}_w{workers}"] = run, images

        teacher = random_teacher(args.teacher, args.image_size)
        trainee = build_trainee("fopro", teacher, args.student, args.image_size, counts, seed=args.seed)
        batches = random_batches(2, args.batch_size, args.image_size, len(counts), args.seed)

        def step_block() -> None:
            for i in range(args.steps):
                trainee.step(*batches[i % len(batches)])

        cases["fopro_step"], units["fopro_step"] = step_block, args.steps * args.batch_size
        fed_plan = epoch_batches(epoch_order(manifest.labels, 0, 0, False), args.batch_size)
        fed_plan = (fed_plan * (args.steps // len(fed_plan) + 1))[: args.steps]

        def fed_block() -> None:
            for images, labels, _ in make_loader(fed_run, fed_run.train_set, fed_plan):
                trainee.step(images, labels)

        cases["fopro_step_fed_by_loader"], units["fopro_step_fed_by_loader"] = fed_block, sum(len(b) for b in fed_plan)
        samples = round_robin(cases, args.warmup, args.repeats, per_call=units)  # seconds per image

    rates = {name: {"images_per_second": round(1.0 / (summary(values)["median_ms"] / 1000.0), 2), **summary(values)} for name, values in samples.items()}
    for value in rates.values():  # per-image times: keep the spread in microseconds
        for key in ("median_ms", "min_ms", "max_ms"):
            value[key.replace("_ms", "_us_per_image")] = round(1000.0 * value.pop(key), 3)
    step = samples["fopro_step"]
    ratios = {name: paired_ratio(step, values) for name, values in samples.items() if name.startswith("loader_")}
    rows = []
    for name, values in samples.items():
        ratio = ratios.get(name)
        rows.append([name, rates[name]["images_per_second"], rates[name]["median_us_per_image"], ratio])
    out.table(
        f"images per second ({args.image_size} px, batch {args.batch_size}); loader / step = how many times faster the loader delivers than a fopro step consumes",
        ["case", "images/s", "us/image", "loader / step"],
        rows,
    )
    fed_slowdown = paired_ratio(samples["fopro_step_fed_by_loader"], step)
    out.note(
        f"fopro steps fed by the default loader (cache on, {default_workers} workers"
        + (", loading in series with the step) " if default_workers == 0 else ") ")
        + 
        f"take {fed_slowdown:.3f} x the time of steps on ready tensors"
    )
    default_case = f"loader_cache_w{default_workers}"
    checks = []
    if default_case in ratios:
        checks.append(target(f"loader/step, default loader (cache on, {default_workers} workers)", ratios[default_case], TARGET_LOADER_OVER_STEP, ">=",
                             "the loader is not the bottleneck"))
    slowest = min(ratios, key=ratios.get)
    checks.append(target(f"loader/step, slowest configuration ({slowest})", ratios[slowest], TARGET_LOADER_OVER_STEP, ">="))
    out.targets(checks)
    out.payload.update(
        {
            "data": {"root": str(root) if args.data else "generated synthetic ImageFolder", "train_images": len(manifest), "classes": len(counts)},
            "rates": rates,
            "loader_over_step": ratios,
            "fed_step_over_plain_step": fed_slowdown,
            "default_workers_for_cached_data": default_workers,
            "samples_seconds_per_image": {name: [round(v, 9) for v in values] for name, values in samples.items()},
        }
    )
    return out.finish()


if __name__ == "__main__":
    main()
