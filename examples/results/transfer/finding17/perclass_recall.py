"""Finding 17: per-class VAL recall of the teacher probe (0.7, fitted as a run fits it, seed 0) against the students
(best.json of each run). perclass_recall.py TEACHER DATA RUN..."""
import json, sys
from pathlib import Path
import numpy as np
from fopro.data import DataOptions, checked_dataset, load_splits
from fopro.data.augment import resolve_augment
from fopro import linear_probe
from fopro.linear_probe import fit_teacher_probe, score_probe
from fopro.models.teacher import TeacherOptions, load_teacher
teacher_path, data = sys.argv[1], Path(sys.argv[2])
splits = load_splits(DataOptions(data=data))
teacher, _ = load_teacher(TeacherOptions(teacher_path), 64)
val = checked_dataset(splits["val"], 64, False)
counts = splits["train"].class_counts()
train = checked_dataset(splits["train"], 64, False, train=True, seed=0, augment_config=resolve_augment("reference"))
probe = fit_teacher_probe(teacher, train, counts, linear_probe.run_options(train), "cpu", select=linear_probe.embed_selection(teacher, val, "cpu"))
report = score_probe(probe, teacher, {"val": val}, splits.classes, counts, device="cpu")["val"]
rows = {"teacher probe (seed 0)": [round(100 * c["recall"], 1) for c in report["per_class"]]}
for run in sys.argv[3:]:
    recall = json.loads((Path(run) / "best.json").read_text())["metrics"]["val"]["class_recall"]
    rows[run] = [round(100 * recall[c], 1) for c in splits.classes]
print(json.dumps({"classes": splits.classes, "val_recall": rows}))
