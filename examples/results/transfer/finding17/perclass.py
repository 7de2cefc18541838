"""Finding 17: mean cos(p(f), z_t) per class on the clean train and val images of a run (its last-epoch state).
perclass.py RUN [OUT.jsonl]"""
import json, sys
from pathlib import Path
import torch, numpy as np
from fopro import linear_probe
from fopro.data import checked_dataset
sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_grad_enabled(False)
from student_probe import Part, restored_run  # noqa: E402
run_dir = Path(sys.argv[1])
run = restored_run(run_dir)
out = {}
for name, d in {"train": checked_dataset(run.splits["train"], 64, False), "val": run.val_set}.items():
    p, z = linear_probe.embed(Part(run.method, "p"), d, 128, "cpu"), linear_probe.embed(run.teacher, d, 128, "cpu")
    c = torch.nn.functional.cosine_similarity(p, z).numpy(); y = np.asarray(d.manifest.labels)
    out[name] = [round(float(c[y == k].mean()), 3) for k in range(8)]
out["run"] = str(run_dir)
print(json.dumps(out))
if len(sys.argv) > 2:
    with open(sys.argv[2], "a") as fh:
        fh.write(json.dumps(out) + "\n")
