"""One row per configuration of run.sh (val balanced accuracy and tail recall of the best epoch, mean +- std over
seeds, and paired against the plain student of the same epochs). collect.py LOGS"""
import glob, json, statistics as st, sys

runs = {}
for path in sorted(glob.glob(f"{sys.argv[1]}/*.json")):
    summary = json.load(open(path))
    name = path.rsplit("/", 1)[1][:-5]
    config, seed = name.rsplit("-s", 1)
    val = summary["best_val"]
    runs.setdefault(config, {})[int(seed)] = (100 * val["balanced_accuracy"], 100 * val["tail_recall"], summary["best_epoch"])


def spread(values):
    return f"{st.mean(values):.1f} ± {st.stdev(values) if len(values) > 1 else 0:.1f}"


for config, seeds in runs.items():
    base = runs[config.split("-")[0] + "-none"]
    paired = [seeds[s][0] - base[s][0] for s in seeds], [seeds[s][1] - base[s][1] for s in seeds]
    print(f"{config:14s} val {spread([v[0] for v in seeds.values()])} tail {spread([v[1] for v in seeds.values()])}"
          f"  - none {spread(paired[0])} / {spread(paired[1])}  seeds {sorted(seeds)} best epochs {[seeds[s][2] for s in sorted(seeds)]}")
