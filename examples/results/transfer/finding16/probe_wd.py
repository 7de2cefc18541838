"""The 0.6 probe (minibatch Adam) on VAL with a range of weight decays, on the embeddings probe_lbfgs.py cached in
OUT/emb.pt: probe_wd.py OUT 1e-4,1e-3,1e-2,1e-1,1 (the numbers of probe_adam_weight_decay_t6.json were made by an
earlier form of this script that embedded the images itself, the same way)."""
import json, sys
from pathlib import Path
import torch
from fopro.linear_probe import LinearProbeOptions, fit_linear_probe  # fopro 0.6 (commit a97b211): Adam
from fopro.metrics import compute_metrics
out, wds = Path(sys.argv[1]), [float(w) for w in sys.argv[2].split(",")]
E = torch.load(out / "emb.pt", weights_only=False)
(val_x, val_y), counts, classes = E["val"], E["counts"], E["classes"]
rows = []
for key in [k for k in E if isinstance(k, tuple)]:
    x, y = E[key]
    for wd in wds:
        probe = fit_linear_probe(x, y, counts, LinearProbeOptions(views=1, seed=key[1], weight_decay=wd))
        m = compute_metrics(val_y, probe.predict_proba(val_x), classes, train_counts=counts)
        rows.append({"augment": key[0], "seed": key[1], "wd": wd, "val": m["balanced_accuracy"], "val_tail": m["tail_recall"]})
        print(json.dumps(rows[-1]), flush=True)
(out / "probe_wd.json").write_text(json.dumps(rows, indent=1))
