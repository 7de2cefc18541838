#!/usr/bin/env python3
"""Where does the teacher's knowledge get lost? Diagnostics of finished `fopro distill` runs, on the VAL split.

    python examples/transfer_diagnosis.py --data DATA --runs RUN [RUN ...] --out DIR [--split val]

For each run (its best.safetensors, config.json and resume.safetensors):

* post-hoc logit adjustment: predictions argmax(log p - tau * log prior) for tau in TAUS. A gain at some tau != 0
  means the student's class prior is mis-set (information is there, the decision threshold is off); no gain
  means the tail information itself is missing.
* where the tail classes' errors go: the share of the tail classes' images predicted as a head, medium or
  other tail class.
* per-term gradient norms at the student's last block (the last top-level child with weights before the
  classifier), on a few training batches with the weights of the run's last epoch: which term drives the
  features (supervised, alignment, second head, probe distillation).

Writes DIR/diagnosis.json and DIR/diagnosis.md. Nothing here chooses anything on the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fopro.checkpoint import load_meta  # noqa: E402
from fopro.models.weights import build_model  # noqa: E402
from fopro.config_files import load_run_config  # noqa: E402
from fopro.data import DataOptions, checked_dataset, load_splits  # noqa: E402
from fopro.evaluate import TorchPredictor, predict  # noqa: E402
from fopro.metrics import DEFAULT_GROUPS  # noqa: E402
from fopro.preprocess import Preprocess  # noqa: E402
from fopro.state import load_state  # noqa: E402
from fopro.run import build_run  # noqa: E402

TAUS = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)
GRADIENT_BATCHES = 4


def balanced_scores(labels: np.ndarray, predictions: np.ndarray, classes: list[int], tail: list[int]) -> dict[str, float]:
    recalls = np.array([(predictions[labels == c] == c).mean() for c in classes])
    tail_recall = float(np.mean([recalls[c] for c in tail])) if tail else float("nan")
    return {"balanced_accuracy": float(recalls.mean()), "tail_recall": tail_recall}


def logit_adjustment(log_probs: np.ndarray, labels: np.ndarray, log_prior: np.ndarray, tail: list[int]) -> list[dict[str, float]]:
    classes = list(range(log_probs.shape[1]))
    return [{"tau": tau, **balanced_scores(labels, np.argmax(log_probs - tau * log_prior, axis=1), classes, tail)} for tau in TAUS]


def tail_errors(predictions: np.ndarray, labels: np.ndarray, groups: dict[int, str], tail: list[int]) -> dict[str, float]:
    """Shares of the tail classes' images by where they were predicted: correct, or a head / medium / other tail class."""
    mask = np.isin(labels, tail)
    counts = {"correct": 0, "head": 0, "medium": 0, "other tail": 0}
    for label, prediction in zip(labels[mask], predictions[mask]):
        if label == prediction:
            counts["correct"] += 1
        else:
            counts["other tail" if groups[prediction] == "tail" else groups[prediction]] += 1
    total = max(1, int(mask.sum()))
    return {key: value / total for key, value in counts.items()}


def last_block(student: torch.nn.Module) -> tuple[str, list[torch.nn.Parameter]]:
    classifier = student.get_classifier()
    children = [(name, child) for name, child in student.named_children() if child is not classifier and any(True for _ in child.parameters())]
    name, block = children[-1]
    return name, [p for p in block.parameters() if p.requires_grad]


def gradient_norms(run_dir: Path, data: Path) -> dict[str, Any]:
    """Per-term gradient norms at the student's last block, with the weights of the run's last epoch."""
    config = load_run_config(run_dir)
    config.data, config.teacher_probe, config.workers, config.device = str(data), False, 0, "cpu"
    with tempfile.TemporaryDirectory() as scratch:
        run = build_run(config, Path(scratch))
    state = load_state(run_dir / "resume.safetensors")
    for name, module in run.method.trainable_state().items():
        module.load_state_dict(state["modules"][name])
    method = run.method.train()
    block, parameters = last_block(method.student)
    norms: dict[str, list[float]] = {}
    generator = np.random.default_rng(0)
    for _ in range(GRADIENT_BATCHES):
        indices = generator.choice(len(run.train_set), size=config.batch_size, replace=False)
        items = [run.train_set[int(i)] for i in indices]
        images, labels = torch.stack([x for x, _, _ in items]), torch.tensor([y for _, y, _ in items])
        features, logits = method.student_forward(images)
        terms = {"sup": method.sup_loss(logits, labels)}
        if hasattr(method, "heads"):
            projected, second_logits = method.heads(features)
            with torch.no_grad():
                target = method.teacher(images)
            terms["align (x lambda)"] = config.ekd_weight * method.alignment(projected, target, labels)
            if second_logits is not None:
                terms["sup_t"] = method.sup_loss(second_logits, labels)
            if config.probe_kd > 0:
                terms["probe_kd (x weight)"] = config.probe_kd * method.probe_distillation(logits, target)
        for term, value in terms.items():
            grads = torch.autograd.grad(value, parameters, retain_graph=True, allow_unused=True)
            norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
            norms.setdefault(term, []).append(float(norm))
    return {"block": block, "epoch": int(state["epoch"]), "norms": {term: float(np.mean(values)) for term, values in norms.items()}}


def diagnose(run_dir: Path, data: Path, split: str) -> dict[str, Any]:
    checkpoint = run_dir / "best.safetensors"
    meta = load_meta(checkpoint)
    model, _ = build_model(checkpoint)
    splits = load_splits(DataOptions(data=data), splits=(split,), classes=meta.classes)
    dataset = checked_dataset(splits[split], meta.image_size, skip_bad_images=False)
    predictor = TorchPredictor(model, Preprocess(meta.image_size, tuple(meta.mean), tuple(meta.std)), meta.classes, meta.train_counts, str(checkpoint))
    probs = predict(predictor, dataset, batch_size=128)
    labels = np.asarray(dataset.manifest.labels)
    counts = np.asarray(meta.train_counts, dtype=np.float64)
    log_prior = np.log(counts / counts.sum())
    groups = {c: DEFAULT_GROUPS.group_of(int(n)) for c, n in enumerate(meta.train_counts)}
    tail = [c for c, g in groups.items() if g == "tail"]
    log_probs = np.log(np.clip(probs, 1e-12, None))
    sweep = logit_adjustment(log_probs, labels, log_prior, tail)
    plain = next(row for row in sweep if row["tau"] == 0.0)
    best = max(sweep, key=lambda row: (row["balanced_accuracy"], -abs(row["tau"])))
    return {
        "run": str(run_dir),
        "method": load_run_config(run_dir).method,
        "split": split,
        "balanced_accuracy": plain["balanced_accuracy"],
        "tail_recall": plain["tail_recall"],
        "logit_adjustment": sweep,
        "best_tau": best["tau"],
        "best_tau_gain": best["balanced_accuracy"] - plain["balanced_accuracy"],
        "tail_errors": tail_errors(np.argmax(probs, axis=1), labels, groups, tail),
        "gradients": gradient_norms(run_dir, data) if (run_dir / "resume.safetensors").is_file() else None,
    }


def pct(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{100 * value:.1f}"


def render(results: list[dict[str, Any]], command: str) -> str:
    lines = ["# Transfer diagnosis (VAL split)", "", "Produced by:", "", "```bash", command, "```", ""]
    lines += ["## Balanced accuracy, tail recall and post-hoc logit adjustment", "",
              "| run | method | balanced acc. | tail recall | best tau | balanced acc. at best tau | gain |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        best = next(row for row in r["logit_adjustment"] if row["tau"] == r["best_tau"])
        lines.append(f"| {r['run']} | {r['method']} | {pct(r['balanced_accuracy'])} | {pct(r['tail_recall'])} | {r['best_tau']:g} | "
                     f"{pct(best['balanced_accuracy'])} | {100 * r['best_tau_gain']:+.1f} |")
    lines += ["", "## Where the tail classes' images go (share of the tail images)", "",
              "| run | correct | as head | as medium | as another tail class |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        e = r["tail_errors"]
        lines.append(f"| {r['run']} | {pct(e['correct'])} | {pct(e['head'])} | {pct(e['medium'])} | {pct(e['other tail'])} |")
    lines += ["", f"## Gradient norms at the student's last block (mean over {GRADIENT_BATCHES} train batches, last-epoch weights)", ""]
    for r in results:
        g = r["gradients"]
        if g:
            terms = ", ".join(f"{term} {value:.3g}" for term, value in g["norms"].items())
            lines.append(f"- {r['run']} (block `{g['block']}`, epoch {g['epoch']}): {terms}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="the ImageFolder root the runs were trained on")
    parser.add_argument("--runs", required=True, nargs="+", type=Path, help="fopro distill run folders")
    parser.add_argument("--split", default="val", help="the split to diagnose (default val; never choose anything on test)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = [diagnose(run, args.data, args.split) for run in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python examples/transfer_diagnosis.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / "diagnosis.json").write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n", encoding="utf-8")
    (args.out / "diagnosis.md").write_text(render(results, command), encoding="utf-8")
    print(render(results, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
