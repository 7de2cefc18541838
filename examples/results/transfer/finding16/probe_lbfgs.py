"""Embed once, for solvers.py and probe_wd.py: probe_lbfgs.py OUT TEACHER DATA PRESETS SEEDS caches in OUT/emb.pt the teacher's
embeddings of val and of 4 views (1 without augmentation) of train per (preset, seed)."""
import json, sys
from pathlib import Path
import numpy as np, torch
from fopro.data import DataOptions, checked_dataset, load_splits
from fopro.data.augment import resolve_augment
from fopro.linear_probe import embed
from fopro.losses import balanced_softmax, class_log_prior
from fopro.metrics import compute_metrics
from fopro.models.teacher import TeacherOptions, load_teacher
out, teacher_path, data = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
presets, seeds = sys.argv[4].split(","), [int(s) for s in sys.argv[5].split(",")]
cache = out / "emb.pt"
if cache.exists():
    E = torch.load(cache)
else:
    splits = load_splits(DataOptions(data=data), splits=("train", "val"))
    teacher, _ = load_teacher(TeacherOptions(teacher_path), 64); teacher.eval()
    val = checked_dataset(splits["val"], 64, False)
    E = {"val": (embed(teacher, val, 64, "cpu"), np.asarray(val.manifest.labels)), "counts": splits["train"].class_counts(), "classes": splits.classes}
    for preset in presets:
        for seed in seeds:
            aug = resolve_augment(preset); views = 1 if aug.is_identity else 4
            train = checked_dataset(splits["train"], 64, False, train=True, seed=seed, augment_config=aug)
            xs = []
            for v in range(views):
                train.set_epoch(v); xs.append(embed(teacher, train, 64, "cpu"))
            E[preset, seed] = (torch.cat(xs), np.tile(np.asarray(train.manifest.labels), views))
            if aug.is_identity: break
    torch.save(E, cache)
