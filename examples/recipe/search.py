"""The search behind fopro's default training recipe: learning rate, schedule and augmentation, on VAL only.

Three datasets, each at the budget it is used with:
  fundus8    real fundus-photograph patches, orientation-dependent classes, 278 long-tailed train images
             (examples/recipe/fundus_patches.py), resnet18, 40 epochs
  synthetic  the embedded synthetic long-tailed target (`fopro data synth`), resnet18, 15 epochs (the protocol)
  public     the synthetic public corpus: pre-training the demo teacher, resnet26, 6 epochs, cross-entropy
Every run is `fopro distill --method none` with the options of its row; the number kept is the best val
balanced accuracy over epochs (the checkpoint fopro keeps). The test split is never read here.
Results go to examples/results/recipe/search.jsonl (one line per run, with its command; finished runs
are skipped when the script is run again) and search.md.

    python examples/recipe/fundus_patches.py fopro-data/fundus8
    fopro data synth fopro-data/synth
    python examples/recipe/search.py --jobs 2
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "examples" / "results" / "recipe"
OLD_AUGMENT = ["--augment", "none", "--scale", "0.5,1", "--hflip", "0.5", "--vflip", "0.5", "--color-jitter", "0.1"]
DATASETS = {
    "fundus8": ["--data", "fopro-data/fundus8", "--student", "resnet18", "--epochs", "40"],
    "synthetic": ["--data", "fopro-data/synth/target", "--student", "resnet18", "--epochs", "15"],
    "public": ["--data", "fopro-data/synth/public", "--student", "resnet26", "--epochs", "6", "--loss", "ce"],
}


def grid() -> list[tuple[str, str, list[str]]]:
    """(dataset, row name, options) of every run."""
    rows = []
    for dataset in DATASETS:
        rows.append((dataset, "before: lr 3e-4 cosine, flips + crop 0.5-1 + colour 0.1", ["--lr", "3e-4", *OLD_AUGMENT]))
        for lr in ("3e-4", "1e-3", "2e-3", "4e-3"):
            rows.append((dataset, f"standard, lr {lr} cosine", ["--augment", "standard", "--lr", lr]))
        if dataset == "public":  # 5-8 minutes a run on one core: the learning rate and the one preset that fits
            rows.append((dataset, "dermoscopy, lr 1e-3 cosine", ["--augment", "dermoscopy", "--lr", "1e-3"]))
            rows = [row for row in rows if not (row[0] == "public" and "4e-3" in row[1])]
            continue
        rows.append((dataset, "standard, lr 1e-3 constant", ["--augment", "standard", "--lr", "1e-3", "--schedule", "constant"]))
        rows.append((dataset, "standard, lr 1e-3 cosine, no warm-up", ["--augment", "standard", "--lr", "1e-3", "--warmup-epochs", "0"]))
        for preset in ("radiograph", "dermoscopy", "none"):
            rows.append((dataset, f"{preset}, lr 1e-3 cosine", ["--augment", preset, "--lr", "1e-3"]))
        rows.append((dataset, "dermoscopy, lr 2e-3 cosine", ["--augment", "dermoscopy", "--lr", "2e-3"]))
    return rows


def run(dataset: str, name: str, options: list[str], seed: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        args = ["distill", "--method", "none", *DATASETS[dataset], *options, "--seed", str(seed), "--device", "cpu"]
        command = [sys.executable, "-m", "fopro", *args, "--out", str(Path(out) / "run"), "--json"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{dataset} / {name}: {done.stderr.strip()[-500:]}")
        history = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [row["val"] for row in history]
    best = max(range(len(val)), key=lambda i: val[i]["balanced_accuracy"])
    return {
        "dataset": dataset, "name": name, "seed": seed, "command": shlex.join(["fopro", *args]),
        "best_val_balanced_accuracy": val[best]["balanced_accuracy"], "best_epoch": best + 1,
        "best_val_tail_recall": val[best]["tail_recall"], "last_val_balanced_accuracy": val[-1]["balanced_accuracy"],
        "val_curve": [round(v["balanced_accuracy"], 4) for v in val], "seconds": round(time.perf_counter() - started, 1),
    }


def render(rows: list[dict]) -> str:
    lines = ["# Recipe search (val only)", "", "Produced by `python examples/recipe/search.py`; one seed (0); percent.", ""]
    for dataset in DATASETS:
        chosen = [r for r in rows if r["dataset"] == dataset]
        if not chosen:
            continue
        lines += [f"## {dataset}: `fopro distill --method none {shlex.join(DATASETS[dataset])}` + the row's options", "",
                  "| row | best val bal. acc. (epoch) | last-epoch val bal. acc. | val tail recall | s | options |",
                  "| --- | ---: | ---: | ---: | ---: | --- |"]
        for r in chosen:
            options = r["command"].split(shlex.join(DATASETS[dataset]))[-1].replace("--seed 0 --device cpu", "").strip()
            tail = "" if r["best_val_tail_recall"] is None else f"{100 * r['best_val_tail_recall']:.1f}"
            lines.append(f"| {r['name']} | {100 * r['best_val_balanced_accuracy']:.1f} ({r['best_epoch']}) | "
                         f"{100 * r['last_val_balanced_accuracy']:.1f} | {tail} | {r['seconds']:.0f} | `{options}` |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", help="only these rows: DATASET:ROW NAME items separated by ';' (default: the whole grid)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    log = RESULTS / "search.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    finished = {(r["dataset"], r["name"], r["seed"]) for r in done}
    wanted = set(args.datasets.split(","))
    todo = [row for row in grid() if row[0] in wanted and (row[0], row[1], args.seed) not in finished]
    if args.rows:
        picked = [tuple(item.strip().split(":", 1)) for item in args.rows.split(";") if item.strip()]
        unknown = [p for p in picked if p not in {(d, n) for d, n, _ in grid()}]
        if unknown:
            raise SystemExit(f"unknown row(s): {unknown}")
        todo = [row for p in picked for row in todo if (row[0], row[1]) == p]
    # the slow public-corpus runs first (so that the jobs end together), then the synthetic target, then fundus8
    priority = {"public": 0, "synthetic": 1, "fundus8": 2}
    todo.sort(key=lambda row: priority[row[0]])
    print(f"{len(todo)} run(s) to do, {len(finished)} done")

    def one(row: tuple[str, str, list[str]]) -> dict:
        result = run(*row, seed=args.seed)
        with log.open("a") as handle:
            handle.write(json.dumps(result) + "\n")
        print(f"{result['dataset']:9s} {result['name']:55s} best val {100 * result['best_val_balanced_accuracy']:.1f} "
              f"(epoch {result['best_epoch']}), {result['seconds']:.0f} s", flush=True)
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    order = {(d, n): i for i, (d, n, _) in enumerate(grid())}
    rows.sort(key=lambda r: order.get((r["dataset"], r["name"]), 1e9))
    (RESULTS / "search.md").write_text(render(rows) + "\n")


if __name__ == "__main__":
    main()
