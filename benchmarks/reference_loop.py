"""Does fopro train as well as a plain PyTorch loop? Both on the same ImageFolder, student and epochs.

The reference is the loop anyone would write in 60 lines, independent of fopro: torchvision's
ImageFolder, a timm student from random init, Adam at a constant learning rate, cross-entropy,
translation-only augmentation (RandomAffine, shifts up to 10 %), the student's mean/std. It reports
the val and test balanced accuracy of the last epoch and of the best-val epoch (the checkpoint fopro
keeps). fopro runs `fopro distill --method none` (its defaults, plus `--fopro-args`) through its
command line, on the same data (with `--threads N`, on N threads too). Accuracy, not speed: this is the one benchmark whose figures depend on
the weights, so it is seeded and runs on the CPU by default.

    python benchmarks/reference_loop.py --data fopro-data/fundus8 --student resnet18 --epochs 40 \\
        --fopro-args "--augment radiograph" --json-out benchmarks/results/reference_loop_fundus8.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Mean over the classes present in `labels` of their recall (scikit-learn's definition)."""
    return float(np.mean([np.mean(predictions[labels == c] == c) for c in np.unique(labels)]))


def folder(root: Path, split: str, image_size: int, mean: tuple, std: tuple, train: bool) -> datasets.ImageFolder:
    steps = [transforms.Resize((image_size, image_size)), transforms.ToTensor()]
    if train:
        steps.append(transforms.RandomAffine(degrees=0, translate=(0.1, 0.1)))
    steps.append(transforms.Normalize(mean, std))
    return datasets.ImageFolder(str(root / split), transform=transforms.Compose(steps))


@torch.no_grad()
def score(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    labels, predictions = [], []
    for images, targets in loader:
        predictions.append(model(images).argmax(1).numpy())
        labels.append(targets.numpy())
    return balanced_accuracy(np.concatenate(labels), np.concatenate(predictions))


def reference_loop(data: Path, student: str, epochs: int, batch_size: int, image_size: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    probe = timm.create_model(student, pretrained=False)
    mean, std = probe.pretrained_cfg["mean"], probe.pretrained_cfg["std"]
    train_set = folder(data, "train", image_size, mean, std, train=True)
    model = timm.create_model(student, pretrained=False, num_classes=len(train_set.classes))
    loaders = {
        split: torch.utils.data.DataLoader(folder(data, split, image_size, mean, std, train=False), batch_size=128)
        for split in ("val", "test")
        if (data / split).is_dir()
    }
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=len(train_set) > batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    history, started = [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for images, targets in train_loader:
            loss = F.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        history.append({"epoch": epoch + 1, **{split: score(model, loader) for split, loader in loaders.items()}})
    best = max(history, key=lambda row: row.get("val", 0.0))
    return {"last": history[-1], "best_val_epoch": best, "history": history, "seconds": round(time.perf_counter() - started, 1)}


def fopro_run(data: Path, student: str, epochs: int, batch_size: int, image_size: int, seed: int, extra: list[str],
              threads: int | None = None) -> dict:
    """`fopro distill --method none` through the real command line; its JSON summary and metrics.jsonl."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "fopro", "distill", "--method", "none", "--data", str(data), "--student", student,
                   "--epochs", str(epochs), "--batch-size", str(batch_size), "--image-size", str(image_size),
                   "--seed", str(seed), "--device", "cpu", "--out", str(Path(out) / "run"), "--json", *extra]
        started = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        finished = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
        if finished.returncode != 0:
            raise SystemExit(f"fopro distill failed ({finished.returncode}): {finished.stderr.strip().splitlines()[-1:]}")
        summary = json.loads(finished.stdout)
        history = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    return {
        "best_val_epoch": {"epoch": summary["best_epoch"], "val": summary["best_val"].get("balanced_accuracy"),
                           "test": (summary.get("test") or {}).get("balanced_accuracy")},
        "last": {"epoch": epochs, "val": history[-1]["val"].get("balanced_accuracy")},
        "command": shlex.join(["fopro", *command[3:]]),
        "augmentation": summary.get("augmentation_text"),
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="ImageFolder root with train/, val/ (and test/)")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="the reference loop's constant Adam learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fopro-args", default="", help='extra `fopro distill` options, e.g. "--augment radiograph --lr 1e-3"')
    parser.add_argument("--skip-fopro", action="store_true")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    result["reference"] = reference_loop(args.data, args.student, args.epochs, args.batch_size, args.image_size, args.lr, args.seed)
    if not args.skip_fopro:
        result["fopro"] = fopro_run(args.data, args.student, args.epochs, args.batch_size, args.image_size, args.seed, shlex.split(args.fopro_args),
                                   args.threads)
    for name in ("reference", "fopro"):
        if name in result:
            best, last = result[name]["best_val_epoch"], result[name]["last"]
            print(f"{name:9s}  best-val epoch {best['epoch']:3d}: val {best.get('val', float('nan')):.4f} test {best.get('test') or float('nan'):.4f}"
                  f"  | last epoch: val {last.get('val') or float('nan'):.4f}  ({result[name]['seconds']} s)")
    if "fopro" in result and result["reference"]["best_val_epoch"].get("test") is not None and result["fopro"]["best_val_epoch"]["test"] is not None:
        gap = result["fopro"]["best_val_epoch"]["test"] - result["reference"]["best_val_epoch"]["test"]
        result["fopro_minus_reference_test_points"] = round(100 * gap, 2)
        print(f"fopro - reference (test balanced accuracy of the best-val epoch): {100 * gap:+.1f} points")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
