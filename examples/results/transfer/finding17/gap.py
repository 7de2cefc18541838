"""Finding 17: is the val/train mimicry gap a generalisation gap or an augmentation gap? cos(p(f), z_t) on clean and
augmented train and val, raw and centred with the teacher's train mean. gap.py RUN"""
import json, sys
from pathlib import Path
import torch
from fopro import linear_probe
from fopro.data import checked_dataset
sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_grad_enabled(False)
from student_probe import Part, restored_run  # noqa: E402
run_dir = Path(sys.argv[1])
run = restored_run(run_dir)
aug = run.train_set.augment_config
sets = {
    "train_clean": checked_dataset(run.splits["train"], 64, False),
    "train_aug": run.train_set,
    "val_clean": run.val_set,
    "val_aug": checked_dataset(run.splits["val"], 64, False, train=True, seed=0, augment_config=aug),
}
emb = {k: (linear_probe.embed(Part(run.method, "p"), d, 128, "cpu"), linear_probe.embed(run.teacher, d, 128, "cpu")) for k, d in sets.items()}
mu_z = emb["train_aug"][1].mean(0)
row = {"run": str(run_dir)}
for k, (p, z) in emb.items():
    row[k] = round(float(torch.nn.functional.cosine_similarity(p, z).mean()), 4)
    row[k + "_centred"] = round(float(torch.nn.functional.cosine_similarity(p - mu_z, z - mu_z).mean()), 4)
    row[k + "_rel_err"] = round(float(((p - z).norm(dim=1) / (z - mu_z).norm(dim=1)).mean()), 4)
z = emb["train_aug"][1]
row["teacher_mean_share"] = round(float(mu_z.norm() ** 2 / (z.norm(dim=1) ** 2).mean()), 4)
print(json.dumps(row))
