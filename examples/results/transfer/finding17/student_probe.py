"""Finding 17: where the teacher's lead is lost. For each finished run (its last-epoch state, resume.safetensors), on VAL:
the student's fc, fc_t(p(f)), a linear probe (fopro 0.7's: L-BFGS balanced softmax + L2, lambda on val) on the student's
features f and on its projection p(f) (4 augmented views of train, like the teacher probe), the teacher probe read
through the student's projection (probe_t(p(f))), and the cosine between p(f) and z_t on train / val / the pool.
student_probe.py OUT RUN [RUN ...]"""
import json, sys
from pathlib import Path
import numpy as np, torch
from torch import nn
from fopro import linear_probe
from fopro.config_files import load_run_config
from fopro.run import build_run
from fopro.run_state import restore
from fopro.state import load_state
from fopro.metrics import compute_metrics

torch.set_grad_enabled(False)


class Part(nn.Module):
    def __init__(self, method, part):
        super().__init__()
        self.method, self.part = method, part

    def forward(self, x):
        f, logits = self.method.student_forward(x)
        if self.part == "f":
            return f
        if self.part == "logits":
            return logits
        p, second = self.method.heads(f)
        return p if self.part == "p" else second


def views(module, dataset, n):
    out = []
    for v in range(n):
        dataset.set_epoch(v)
        out.append(linear_probe.embed(module, dataset, 128, "cpu"))
    dataset.set_epoch(0)
    return torch.cat(out)


def tail(m):
    return m["tail_recall"]


def summary(labels, logits, run):
    probs = torch.softmax(logits.double(), 1).numpy()
    m = compute_metrics(np.asarray(labels), probs, run.splits.classes, run.train_counts)
    return [round(100 * m["balanced_accuracy"], 2), round(100 * tail(m), 2)]


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean())


def restored_run(run_dir: Path):
    """A finished run rebuilt from its config.json, with its last-epoch state, in eval mode."""
    run = build_run(load_run_config(run_dir), run_dir)
    restore(run, load_state(run_dir / "resume.safetensors"))
    run.method.eval()
    return run


def main() -> None:
    out = Path(sys.argv[1])
    rows = []
    teacher_cache = {}
    for run_dir in map(Path, sys.argv[2:]):
        run = restored_run(run_dir)
        config = run.config
        val, train = run.val_set, run.train_set
        yv = list(val.manifest.labels)
        ytr = np.tile(np.asarray(train.manifest.labels), 4)
        row = {"run": str(run_dir), "method": config.method, "seed": config.seed, "epoch": run.epoch}
        f_val = linear_probe.embed(Part(run.method, "f"), val, 128, "cpu")
        row["fc"] = summary(yv, linear_probe.embed(Part(run.method, "logits"), val, 128, "cpu"), run)
        f_train = views(Part(run.method, "f"), train, 4)
        probe_f = linear_probe.fit_linear_probe(f_train, ytr, run.train_counts, select=(f_val, yv), images=None)
        row["probe_on_f"] = summary(yv, probe_f(f_val), run) + [probe_f.l2]
        if run.teacher is not None:
            key = config.teacher
            if key not in teacher_cache:
                z_val = linear_probe.embed(run.teacher, val, 128, "cpu")
                z_train = views(run.teacher, train, 4)
                probe_t = linear_probe.fit_linear_probe(z_train, ytr, run.train_counts, select=(z_val, yv))
                teacher_cache[key] = (z_val, z_train, probe_t)
            z_val, z_train, probe_t = teacher_cache[key]
            row["teacher_probe"] = summary(yv, probe_t(z_val), run) + [probe_t.l2]
        if config.method in ("ekd", "fopro"):
            p_val = linear_probe.embed(Part(run.method, "p"), val, 128, "cpu")
            p_train = views(Part(run.method, "p"), train, 4)
            row["fc_t"] = summary(yv, linear_probe.embed(Part(run.method, "second"), val, 128, "cpu"), run)
            probe_p = linear_probe.fit_linear_probe(p_train, ytr, run.train_counts, select=(p_val, yv))
            row["probe_on_p"] = summary(yv, probe_p(p_val), run) + [probe_p.l2]
            row["teacher_probe_on_p"] = summary(yv, probe_t(p_val), run)
            row["agree_teacher_probe"] = float((probe_t(p_val).argmax(1) == probe_t(z_val).argmax(1)).float().mean())
            row["cos_val"] = cosine(p_val, z_val)
            row["cos_train_aug"] = cosine(p_train, z_train)
            if run.unlabeled_set is not None:
                sub = torch.utils.data.Subset(run.unlabeled_set, range(0, len(run.unlabeled_set), 6))
                run.unlabeled_set.set_epoch(0)
                row["cos_pool_aug"] = cosine(linear_probe.embed(Part(run.method, "p"), sub, 128, "cpu"), linear_probe.embed(run.teacher, sub, 128, "cpu"))
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
