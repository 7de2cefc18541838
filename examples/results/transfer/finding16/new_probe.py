"""The 0.7 teacher probe (L-BFGS, L2 chosen on val) as a distillation run fits it: --augment reference, 4 views,
seed S; scored on val and test (fopro 0.7): new_probe.py OUT TEACHER DATA SEEDS."""
import json, sys
from pathlib import Path
from fopro.data import DataOptions, checked_dataset, load_splits
from fopro.data.augment import resolve_augment
from fopro import linear_probe
from fopro.linear_probe import fit_teacher_probe, score_probe
from fopro.models.teacher import TeacherOptions, load_teacher
out, teacher_path, data, seeds = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), [int(s) for s in sys.argv[4].split(",")]
splits = load_splits(DataOptions(data=data))
teacher, _ = load_teacher(TeacherOptions(teacher_path), 64)
val, test = checked_dataset(splits["val"], 64, False), checked_dataset(splits["test"], 64, False)
counts = splits["train"].class_counts()
rows = []
for seed in seeds:
    train = checked_dataset(splits["train"], 64, False, train=True, seed=seed, augment_config=resolve_augment("reference"))
    probe = fit_teacher_probe(teacher, train, counts, linear_probe.run_options(train), "cpu", select=linear_probe.embed_selection(teacher, val, "cpu"))
    scores = linear_probe.summarise_scores(score_probe(probe, teacher, {"val": val, "test": test}, splits.classes, counts, device="cpu"))
    rows.append({"teacher": teacher_path, "seed": seed, "l2": probe.l2, "l2_on_val": probe.selection, **scores})
    print(json.dumps(rows[-1]), flush=True)
(out / "new_probe.json").write_text(json.dumps(rows, indent=1))
