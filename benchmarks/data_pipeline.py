"""Does the data loader keep up with training? Images per second delivered versus images per second consumed.

    python benchmarks/data_pipeline.py                  # synthetic ImageFolder at 64 px, fopro resnet50 -> resnet18, batch 32
    python benchmarks/data_pipeline.py --quick --json-out /tmp/data.json
    python benchmarks/data_pipeline.py --jpeg-cache --threads 1   # 1024-px JPEGs: decoding them vs a prepared cache

The loader is fopro's own: `ImageDataset` with the train augmentation, batches from `epoch_batches(epoch_order(...))`
and the DataLoader of `fopro.train.make_loader` (a new one per epoch, as training makes it, so worker start-up
counts), with the in-memory cache on or off and 0/1/2 worker processes. The consumer is a fopro training step
measured in the same run, interleaved with the loader passes. Also measured: fopro steps fed by the loader the
library picks by default (cache on -> workers 0, loading in series with the step), to see the real slowdown.

With --jpeg-cache: N photo-like 1024 x 768 JPEGs (quality 90), per core, to the training size: full decode then
resize, the loader's draft-mode decode (`load_image`), a re-encoded PNG at the training size, and a read from the
cache of `fopro data prepare`; then whole training items (decode or cache read + augmentation), set against the
throughput of a data-centre GPU (A100_IMAGES_PER_SECOND, published).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from fopro.data import DataOptions, ImageDataset, load_image, load_splits  # noqa: E402
from fopro.data.images import square_resize, to_rgb_array  # noqa: E402
from fopro.data.prepare import PrepareOptions, prepare_cache  # noqa: E402
from fopro.schedule import epoch_batches, epoch_order  # noqa: E402
from fopro.train import make_loader  # noqa: E402

TARGET_LOADER_OVER_STEP = 1.0
# ResNet-50 v1.5 training on one A100 80GB, mixed precision, batch 256: NVIDIA DeepLearningExamples,
# PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Training performance: NVIDIA DGX A100 (8x A100 80GB)",
# pytorch-21.03 NGC container (938 img/s in TF32). A fopro step (teacher forward + student + FPG) is slower per image.
A100_IMAGES_PER_SECOND = 2470
TARGET_CORES_PER_GPU = 8  # cores a GPU of a typical data-centre node can count on


def parse_args(argv: list[str] | None = None):
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="an existing ImageFolder ROOT (with train/) instead of the generated synthetic one")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the synthetic data is generated (default: a temporary folder, removed)")
    parser.add_argument("--max-per-class", type=int, default=200, help="synthetic training images of the most frequent class")
    parser.add_argument("--image-size", type=int, default=None, help="training size (default 64; 224 with --jpeg-cache)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--batches", type=int, default=16, help="batches per loader pass (at most one epoch)")
    parser.add_argument("--steps", type=int, default=3, help="fopro steps per timed consumer block")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jpeg-cache", action="store_true", help="decode 1024-px JPEGs vs read the cache of fopro data prepare, per core")
    parser.add_argument("--jpegs", type=int, default=200, help="--jpeg-cache: generated JPEGs")
    parser.add_argument("--source-size", type=int, default=1024, help="--jpeg-cache: long side of the generated JPEGs")
    args = parser.parse_args(argv)
    if args.image_size is None:
        args.image_size = 224 if args.jpeg_cache else 64
    if args.quick:
        args.teacher, args.student = "resnet10t", "test_resnet"
        args.image_size, args.batch_size, args.max_per_class = 32, 4, 6
        args.batches, args.steps, args.warmup, args.repeats = 2, 1, 0, 2
        args.jpegs, args.source_size = 6, 256
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
    if args.jpeg_cache:
        return jpeg_cache_main(args, out)
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


# --- --jpeg-cache: decoding large JPEGs every epoch vs reading the prepared cache ---------------------------


def photo_like(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A uint8 H x W x 3 image with a photo's statistics for JPEG: smooth multi-scale colour noise, a few soft-edged
    shapes (lesion-like blobs) and fine sensor grain, so the file decodes about like a dermoscopy photo."""
    field = torch.zeros(1, 3, height, width)
    for cells, weight in ((3, 45.0), (12, 20.0), (48, 8.0)):
        coarse = torch.from_numpy(rng.normal(0.0, 1.0, (1, 3, cells * height // width + 2, cells + 2))).float()
        field += weight * F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    base = torch.tensor([190.0, 140.0, 120.0]).view(1, 3, 1, 1)
    image = Image.fromarray((base + field)[0].permute(1, 2, 0).clamp(0, 255).byte().numpy())
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        radius = int(rng.integers(height // 12, height // 4))
        cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
        colour = tuple(int(v) for v in rng.integers(30, 140, size=3))
        draw.ellipse((cx - radius, cy - radius * 3 // 4, cx + radius, cy + radius * 3 // 4), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=width / 256))
    grain = rng.normal(0.0, 3.0, (height, width, 3))
    return np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8)


def write_jpegs(root: Path, count: int, long_side: int, seed: int) -> Path:
    """ROOT/train/<class>/<i>.jpg: `count` photo-like JPEGs of long_side x 3/4 long_side, quality 90, two classes
    (files already there from an earlier run in the same --work-dir are kept: each image has its own seed)."""
    for index in range(count):
        path = root / "train" / f"class{index % 2}" / f"{index:05d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = photo_like(np.random.default_rng([seed, index]), long_side, long_side * 3 // 4)
            Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return root


def full_decode(path: Path, size: int, draft: bool = False) -> torch.Tensor:
    """Every pixel of the file, then the loader's resize; with `draft`, JPEG draft mode at the smallest DCT scale
    that keeps `size` (fewer pixels than the loader's, which keeps 2 x size: not the cache's pixels)."""
    with Image.open(path) as image:
        if draft:
            image.draft("RGB", (size, size))
        image.load()
        return square_resize(to_rgb_array(image), size)


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def jpeg_cache_main(args, out: Output) -> dict[str, Any]:
    size = args.image_size
    with tempfile.TemporaryDirectory(prefix="fopro-bench-jpeg-") as tmp:
        work = Path(args.work_dir or tmp)
        jpegs = write_jpegs(work / "jpegs", args.jpegs, args.source_size, args.seed)
        start = time.perf_counter()
        prepared = prepare_cache(DataOptions(data=jpegs), work / "cache", PrepareOptions(image_size=size, workers=1, overwrite=True))
        prepare_rate = prepared["images"] / (time.perf_counter() - start)
        original = load_splits(DataOptions(data=jpegs), splits=("train",))["train"]
        cached = load_splits(DataOptions(data=work / "cache"), splits=("train",))["train"]
        pngs = []
        for index, path in enumerate(original.paths):  # the other lossless format: a re-encoded file per image
            pngs.append(work / f"{index:05d}.png")
            Image.fromarray(cached.prepared.image(index).permute(1, 2, 0).numpy()).save(pngs[-1])
        mean_kb = sum(p.stat().st_size for p in original.paths) / len(original) / 1024
        out.note(
            f"{len(original)} photo-like JPEGs of {args.source_size} x {args.source_size * 3 // 4} (quality 90, {mean_kb:.0f} KiB on average) "
            f"to {size} px; torch threads {torch.get_num_threads()}; {args.warmup} warm-up + {args.repeats} rounds, interleaved"
        )
        on_files = ImageDataset(original, size, train=True, seed=args.seed, cache=False)
        on_cache = ImageDataset(cached, size, train=True, seed=args.seed, cache=False)
        count = len(original)
        cases = {
            "jpeg_full_decode": lambda: [full_decode(path, size) for path in original.paths],
            "jpeg_loader_decode": lambda: [load_image(path, size) for path in original.paths],
            "jpeg_draft_to_size_decode": lambda: [full_decode(path, size, draft=True) for path in original.paths],
            "png_reencoded_read": lambda: [read_rgb(path) for path in pngs],
            "cache_read": lambda: [cached.prepared.image(i) for i in range(count)],
            "train_item_from_jpeg": lambda: [on_files[i] for i in range(count)],
            "train_item_from_cache": lambda: [on_cache[i] for i in range(count)],
        }
        samples = round_robin(cases, args.warmup, args.repeats, per_call={name: count for name in cases})
    rates = {name: round(1.0 / statistics.median(values), 1) for name, values in samples.items()}
    speedups = {
        "cache_over_jpeg_full_decode": paired_ratio(samples["jpeg_full_decode"], samples["cache_read"]),
        "cache_over_jpeg_loader_decode": paired_ratio(samples["jpeg_loader_decode"], samples["cache_read"]),
        "cache_over_jpeg_draft_to_size_decode": paired_ratio(samples["jpeg_draft_to_size_decode"], samples["cache_read"]),
        "cache_over_png": paired_ratio(samples["png_reencoded_read"], samples["cache_read"]),
        "loader_decode_over_full_decode": paired_ratio(samples["jpeg_full_decode"], samples["jpeg_loader_decode"]),
        "draft_to_size_over_full_decode": paired_ratio(samples["jpeg_full_decode"], samples["jpeg_draft_to_size_decode"]),
        "train_item_cache_over_jpeg": paired_ratio(samples["train_item_from_jpeg"], samples["train_item_from_cache"]),
    }
    cores = {name: round(A100_IMAGES_PER_SECOND / rates[name], 2) for name in ("jpeg_full_decode", "jpeg_loader_decode", "jpeg_draft_to_size_decode", "train_item_from_jpeg", "train_item_from_cache")}
    out.table(
        f"images per second per core to {size} px; cores to feed one A100 training ResNet-50 at {A100_IMAGES_PER_SECOND} img/s (NVIDIA's published AMP figure)",
        ["case", "images/s per core", "us/image", "cores per A100"],
        [[name, rates[name], round(1e6 / rates[name], 1), cores.get(name)] for name in samples],
    )
    out.table("speed-ups (same-round ratios of time per image)", ["ratio", "x"], [[name, value] for name, value in speedups.items()])
    out.note(f"fopro data prepare (1 worker): {prepare_rate:.1f} images/s; the cache: {prepared['bytes'] / 1e6:.1f} MB")
    out.targets([
        target("cores per A100 for training items from the cache", cores["train_item_from_cache"], TARGET_CORES_PER_GPU, "<=",
               "a node's cores per GPU keep up with the GPU"),
        target("speed-up of training items: cache over JPEG", speedups["train_item_cache_over_jpeg"], 1.0, ">="),
    ])
    out.payload.update({
        "jpegs": {"count": count, "long_side": args.source_size, "mean_kib": round(mean_kb, 1), "image_size": size},
        "rates_per_core": rates,
        "speedups": speedups,
        "cores_per_a100": cores,
        "a100_images_per_second": A100_IMAGES_PER_SECOND,
        "prepare_images_per_second_one_worker": round(prepare_rate, 1),
        "samples_seconds_per_image": {name: [round(v, 9) for v in values] for name, values in samples.items()},
    })
    return out.finish()


if __name__ == "__main__":
    main()
