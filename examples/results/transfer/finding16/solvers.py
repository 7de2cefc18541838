"""solvers.py OUT L2S (e.g. 0.01,0.1,0.3,1,3,10): on OUT/emb.pt (probe_lbfgs.py), the 0.6 probe (Adam, weight decay 1e-4)
and full-batch L-BFGS at each L2 weight, VAL balanced accuracy and tail recall; run with fopro 0.6 (a97b211)."""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from fopro.linear_probe import LinearProbeOptions, fit_linear_probe
from fopro.losses import balanced_softmax, class_log_prior
from fopro.metrics import compute_metrics
E = torch.load(Path(sys.argv[1]) / "emb.pt", weights_only=False)
vx, vy = E["val"]; counts, classes = E["counts"], E["classes"]
lp = class_log_prior(list(counts))
L2S = [float(v) for v in sys.argv[2].split(",")]
def score(probs): m = compute_metrics(vy, probs, classes, train_counts=counts); return round(100*m["balanced_accuracy"], 1), round(100*m["tail_recall"], 1)
def lbfgs(x, y, l2):
    x = x.double(); mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
    f = (x - mean) / std; yt = torch.as_tensor(y)
    W = torch.zeros(len(counts), x.shape[1], dtype=torch.float64, requires_grad=True); b = torch.zeros(len(counts), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=1000, tolerance_grad=1e-9, tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")
    def closure():
        opt.zero_grad(); loss = balanced_softmax(f @ W.T + b, yt, lp.double()) + 0.5 * l2 * (W ** 2).sum(); loss.backward(); return loss
    opt.step(closure)
    with torch.no_grad(): return torch.softmax(((vx.double() - mean) / std) @ W.T + b, 1).numpy()
for key in [k for k in E if isinstance(k, tuple)]:
    x, y = E[key]
    row = {"key": key}
    t = time.time(); row["adam_wd1e-4"] = score(fit_linear_probe(x, y, counts, LinearProbeOptions(views=1, seed=key[1])).predict_proba(vx)); row["t_adam"] = round(time.time() - t, 1)
    for l2 in L2S:
        t = time.time(); row[f"lbfgs_{l2}"] = score(lbfgs(x, y, l2)); row[f"t_{l2}"] = round(time.time() - t, 1)
    print(json.dumps(row), flush=True)
