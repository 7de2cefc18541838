"""Finding 18: which classifier to keep. For each finished run (its last-epoch state, resume.safetensors), on VAL (or,
with --test DATA_ROOT, on that dataset's test split, read once for the configuration chosen on val): fc(f), EKD's
second head fc_t(p(f)), and on val the means of their log-probabilities and of their probabilities.
heads.py OUT [--test DATA_ROOT] RUN [RUN ...]"""
import json, sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "finding17"))
from student_probe import restored_run, Part  # noqa: E402
from fopro import linear_probe  # noqa: E402
from fopro.config import resolve_config  # noqa: E402
from fopro.data import checked_dataset, load_splits  # noqa: E402
from fopro.metrics import compute_metrics  # noqa: E402

torch.set_grad_enabled(False)


def score(run, labels, log_probs):
    r = compute_metrics(np.asarray(labels), torch.softmax(log_probs.double(), 1).numpy(), run.splits.classes, run.train_counts)
    return [round(100 * r["balanced_accuracy"], 2), round(100 * r["tail_recall"], 2)]


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    test_root = args[1] if args[0] == "--test" else None
    for run_dir in map(Path, args[2:] if test_root else args):
        run = restored_run(run_dir)
        dataset = run.val_set
        if test_root:
            splits = load_splits(resolve_config({}, {"data": test_root}).data_options())
            assert splits.classes == run.splits.classes
            dataset = checked_dataset(splits["test"], run.config.image_size, False)
        labels = list(dataset.manifest.labels)
        fc = torch.log_softmax(linear_probe.embed(Part(run.method, "logits"), dataset, 128, "cpu").double(), 1)
        row = {"run": str(run_dir), "split": "test" if test_root else "val", "method": run.config.method, "fc": score(run, labels, fc)}
        if run.config.method != "none":
            fc_t = torch.log_softmax(linear_probe.embed(Part(run.method, "second"), dataset, 128, "cpu").double(), 1)
            row["fc_t"] = score(run, labels, fc_t)
            if not test_root:
                row["mean_logp"] = score(run, labels, (fc + fc_t) / 2)
                row["mean_prob"] = score(run, labels, torch.log((fc.exp() + fc_t.exp()) / 2))
        print(json.dumps(row), flush=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
