"""Teacher probe (fopro 0.6, a97b211: Adam, weight decay 1e-4; 4 views of train) under each augmentation preset, VAL only:
probe_aug.py OUT TEACHER DATA PRESETS SEEDS."""
import json, sys
from pathlib import Path
import torch
from fopro.data import DataOptions, checked_dataset, load_splits
from fopro.data.augment import resolve_augment
from fopro.linear_probe import LinearProbeOptions, teacher_probe
from fopro.models.teacher import TeacherOptions, load_teacher
torch.manual_seed(0)
out, teacher_path, data = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
presets, seeds = sys.argv[4].split(","), [int(s) for s in sys.argv[5].split(",")]
splits = load_splits(DataOptions(data=data), splits=("train", "val"))
teacher, _ = load_teacher(TeacherOptions(teacher_path), 64)
teacher.eval()
val = checked_dataset(splits["val"], 64, False)
counts = splits["train"].class_counts()
rows = []
for preset in presets:
    for seed in seeds:
        aug = resolve_augment(preset)
        train = checked_dataset(splits["train"], 64, False, train=True, seed=seed, augment_config=aug)
        views = 1 if aug.is_identity else 4
        r = teacher_probe(teacher, train, {"val": val}, splits.classes, counts, options=LinearProbeOptions(views=views, seed=seed), device="cpu")
        v = r["splits"]["val"]
        rows.append({"teacher": teacher_path, "augment": preset, "seed": seed, "views": views, "val_balanced_accuracy": v["balanced_accuracy"], "val_tail_recall": v["tail_recall"]})
        print(json.dumps(rows[-1]), flush=True)
(out / "probe_aug.json").write_text(json.dumps(rows, indent=1))
