"""Finding 17's runs: one row per run (val from best.json; test from eval_test.json where the configuration was
chosen on val and read once), and the paired summaries. collect.py OUT.json"""
import json, statistics as st, sys
from pathlib import Path
ROOT = Path("/tmp/f17")
RUNS = {  # (teacher, configuration): run folders by seed
    ("t30", "ekd + pool, gamma 0"): [f"/tmp/lt30/runs/ekd-unl-seed{s}" for s in range(3)],
    ("t30", "none"): [f"/tmp/lt30/runs/none-seed{s}" for s in range(3)],
    ("t30", "fopro + pool, gamma 0"): [f"/tmp/lt30/runs/fopro-unl-seed{s}" for s in range(3)],
    ("t30", "ekd + pool, gamma 1"): [f"{ROOT}/runs/hard-seed{s}" for s in range(3)],
    ("t30", "ekd + pool, gamma 2"): [f"{ROOT}/runs/hard2-seed0", f"{ROOT}/runs/hard2-seed1", f"{ROOT}/runs_lt30/f2-seed2"],
    ("t30", "ekd + pool, gamma 3"): [f"{ROOT}/runs_lt30/f3-seed{s}" for s in range(3)],
    ("t30", "fopro + pool, gamma 2"): [f"{ROOT}/runs_lt30/fopro-f2-seed{s}" for s in range(3)],
    ("t30", "ekd + pool, centred target (not kept)"): [f"{ROOT}/runs/centre-seed0"],
    ("t30", "ekd, gamma 0"): [f"/tmp/lt30/runs/ekd-seed{s}" for s in range(3)],
    ("t30", "ekd, gamma 2"): [f"{ROOT}/runs_lt30/ekd-f2-seed{s}" for s in range(3)],
    ("t6", "ekd + pool, gamma 0"): [f"{ROOT}/runs_lt6/base-seed{s}" for s in range(3)],
    ("t6", "ekd + pool, gamma 2"): [f"{ROOT}/runs_lt6/f2-seed{s}" for s in range(3)],
}
rows = []
for (teacher, name), folders in RUNS.items():
    for folder in map(Path, folders):
        last = folder / "last.json"
        if not last.is_file() or json.loads(last.read_text())["epoch"] != json.loads((folder / "config.json").read_text())["epochs"]:
            continue  # finished runs only
        best, config = json.loads((folder / "best.json").read_text()), json.loads((folder / "config.json").read_text())
        row = {"teacher": teacher, "configuration": name, "run": str(folder), "seed": config["seed"], "method": config["method"],
               "align_focus": config.get("align_focus", 0.0), "best_epoch": best["epoch"],
               "val_balanced_accuracy": best["metrics"]["val"]["balanced_accuracy"], "val_tail_recall": best["metrics"]["val"]["tail_recall"]}
        if (folder / "eval_test.json").is_file():
            test = json.loads((folder / "eval_test.json").read_text())
            row.update(test_balanced_accuracy=test["balanced_accuracy"], test_tail_recall=test["tail_recall"])
        rows.append(row)
Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
def ms(v): return f"{100*st.mean(v):.1f} ± {100*st.stdev(v):.1f}" if len(v) > 1 else f"{100*v[0]:.1f}"
groups = {}
for r in rows: groups.setdefault((r["teacher"], r["configuration"]), []).append(r)
for (teacher, name), rs in groups.items():
    line = f"{teacher} {name:40s} seeds {[r['seed'] for r in rs]} val {ms([r['val_balanced_accuracy'] for r in rs])} tail {ms([r['val_tail_recall'] for r in rs])}"
    if all("test_balanced_accuracy" in r for r in rs):
        line += f" | test {ms([r['test_balanced_accuracy'] for r in rs])} tail {ms([r['test_tail_recall'] for r in rs])}"
    print(line)
def paired(a, b, key):
    A = {r["seed"]: r for r in groups.get(a, [])}; B = {r["seed"]: r for r in groups.get(b, [])}
    seeds = sorted(set(A) & set(B))
    if not seeds or not all(key in A[s] and key in B[s] for s in seeds):
        return None
    return ms([A[s][key] - B[s][key] for s in seeds]) + f" (seeds {seeds})"
for a, b in [(("t30", "ekd + pool, gamma 2"), ("t30", "none")), (("t30", "ekd + pool, gamma 2"), ("t30", "ekd + pool, gamma 0")),
             (("t30", "fopro + pool, gamma 2"), ("t30", "none")), (("t30", "fopro + pool, gamma 2"), ("t30", "ekd + pool, gamma 2")),
             (("t30", "fopro + pool, gamma 2"), ("t30", "fopro + pool, gamma 0")), (("t6", "ekd + pool, gamma 2"), ("t6", "ekd + pool, gamma 0")),
             (("t30", "ekd, gamma 2"), ("t30", "ekd, gamma 0"))]:
    for key in ("val_balanced_accuracy", "val_tail_recall", "test_balanced_accuracy", "test_tail_recall"):
        p = paired(a, b, key)
        if p: print(f"{a[1]} − {b[1]} ({a[0]}) {key}: {p}")
