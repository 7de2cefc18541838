#!/usr/bin/env python3
"""Does FoPro-KD help the rare classes? The whole protocol, end to end, on the embedded SYNTHETIC data.

Every step is a `fopro` command a user could type (run as `python -m fopro ...` in the output folder):

  1. fopro data synth data --val-per-class 100 --test-per-class 100 --unlabeled 3000
                                                               target (long-tailed) + unlabelled pool +
                                                               public corpus, seed 0
  2. fopro distill --data data/public --method none --loss ce  the teacher (resnet26), stand-in for a
                                                               public pre-trained model
  3. fopro probe --teacher teacher/best.safetensors --data data/target --split val --out probe
  4. fopro distill --config configs/M.yaml --data data/target ... --seed S
                                                               students: none, kd, ekd, fopro, fopro-no-akd,
                                                               ekd-unl, fopro-unl, 3 seeds; each run with a
                                                               teacher also fits and scores the teacher probe
  5. fopro eval RUN/best.safetensors --split test --json        each run's best-on-val checkpoint
     fopro export BEST/best.safetensors --onnx ... --check      the fopro student with the best VAL
                                                               balanced accuracy (never chosen on test)

Then it writes results.md, results.json and results.png (mean +- std over seeds of test balanced accuracy,
tail recall, head recall, macro-F1, val balanced accuracy, and each student's test balanced accuracy as a
fraction of the teacher probe's: a linear classifier on the frozen teacher's embeddings of train).

Every method gets the same epochs, batch size, learning rate and augmentation (fopro's defaults: Adam with
--lr auto, cosine schedule, chosen on val splits, examples/results/recipe/; --augment reference, the authors'
transform, chosen on val over dermoscopy in 0.6; the teacher is pre-trained with dermoscopy). A method's own
options are its file examples/configs/synthetic_lt/M.yaml, which says how they were chosen (on VAL only); model
selection (best epoch) uses the val split only. Steps whose outputs exist are skipped, an interrupted training
run is resumed (`fopro distill --resume`), so re-running the same command continues the protocol. A failing
sub-command stops the script with its error.

    python examples/synthetic_lt.py                 # default scale: 21 runs, ~70 min at the CPU rates below (2 cores)
    python examples/synthetic_lt.py --quick --out /tmp/lt   # smoke scale (tests), about a minute
    python examples/synthetic_lt.py --full          # GPU scale: resnet50 teacher, 100 epochs, cuda
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = "examples/out/synthetic_lt"

# Student methods: key -> label. Each method's options are its config file, CONFIGS / KEY.yaml (chosen on VAL:
# see the comments in each file), copied to OUT/configs/ and given to `fopro distill --config`.
METHODS: dict[str, str] = {
    "none": "supervised only (balanced softmax), no teacher",
    "kd": "feature distillation (MSE to the teacher's embedding)",
    "ekd": "effective KD: cosine alignment + second head (EKD)",
    "fopro": "FoPro-KD: EKD on Fourier-prompted images + adversarial FPG (AKD)",
    "fopro-no-akd": "the FPG without AKD (alpha = 0)",
    "ekd-unl": "EKD + the unlabelled pool in the alignment term",
    "fopro-unl": "FoPro-KD + the unlabelled pool in the alignment and FPG terms",
    "ekd-unl-focus": "EKD + the pool, each image's alignment term weighted by its distance squared (--align-focus 2)",
    "fopro-unl-focus": "FoPro-KD + the pool, with --align-focus 2",
}
DEFAULT_METHODS = list(METHODS)
CONFIGS = REPO / "examples" / "configs" / "synthetic_lt"

# The metrics of the table: key -> (column title, where it comes from).
METRICS: dict[str, str] = {
    "test_balanced_accuracy": "test balanced acc.",
    "test_tail_recall": "test tail recall",
    "test_head_recall": "test head recall",
    "test_macro_f1": "test macro-F1",
    "val_balanced_accuracy": "val balanced acc.",
}

# Throughput on 2 CPU cores at 64 px, batch 32 (images per second), for the time estimate:
# resnet18 student alone; + a resnet26 teacher forward (kd, ekd); + the FPG step (teacher fwd/bwd).
# (Single-thread CPU time measured here: 137, 87 (ekd) and 58 (fopro) images per CPU-second; resnet26 training 81.)
CPU_RATES = {"none": 270.0, "kd": 170.0, "ekd": 170.0, "fopro": 100.0, "fopro-no-akd": 110.0, "ekd-unl": 85.0, "fopro-unl": 50.0,
             "ekd-unl-focus": 85.0, "fopro-unl-focus": 50.0, "teacher": 150.0}
CPU_STARTUP_S = 8.0  # one `python -m fopro` start (torch + timm imports, data loading)


@dataclass
class Scale:
    """Everything that sets the size of the protocol; the class design of the data is never changed."""

    name: str
    image_size: int = 64
    synth: list[str] = field(default_factory=list)  # `fopro data synth` scale options
    student: str = "resnet18"
    teacher: str = "resnet26"
    epochs: int = 15
    teacher_epochs: int = 6
    teacher_lr: float | None = None  # None: fopro's --lr auto
    teacher_augment: str = "dermoscopy"
    batch_size: int = 32
    lr: float | None = None  # None: fopro's --lr auto
    augment: str = "reference"  # the authors' transform: chosen on val over dermoscopy (examples/results/synthetic_lt_06)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    device: str = "cpu"
    thresholds: list[str] = field(default_factory=list)  # --head-threshold/--tail-threshold, when not fopro's
    probe: list[str] = field(default_factory=list)  # extra `fopro probe` options (quick: fewer bands)


def preset(args: argparse.Namespace) -> Scale:
    if args.quick:
        scale = Scale(
            name="quick (smoke test)",
            image_size=32,
            synth=["--max-per-class", "24", "--val-per-class", "4", "--test-per-class", "4", "--unlabeled", "16",
                   "--public-classes", "3", "--public-per-class", "8", "--public-val-per-class", "4"],
            student="test_resnet",
            teacher="resnet10t",
            epochs=1,
            teacher_epochs=1,
            batch_size=8,
            seeds=[0],
            methods=["none", "fopro"],
            # 24 images in the most frequent class: head > 10, tail < 4 (fopro's 100 / 20 suit 500)
            thresholds=["--head-threshold", "10", "--tail-threshold", "4"],
            probe=["--bands", "2", "--gains", "0,2"],
        )
    elif args.full:
        scale = Scale(name="full (GPU)", synth=list(PROTOCOL_SYNTH), teacher="resnet50", epochs=100, teacher_epochs=30, device="cuda")
    else:
        scale = Scale(name="default (2 CPU cores)", synth=list(PROTOCOL_SYNTH))
    for key in ("image_size", "student", "teacher", "epochs", "teacher_epochs", "batch_size", "lr", "augment", "device"):
        value = getattr(args, key)
        if value is not None:
            setattr(scale, key, value)
    if args.seeds is not None:
        scale.seeds = parse_ints(args.seeds, "--seeds")
    if args.methods is not None:
        scale.methods = parse_methods(args.methods)
    if scale.image_size != 64 or args.quick:
        scale.synth = ["--image-size", str(scale.image_size), *scale.synth]
    return scale


def parse_ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"error: {option} {text!r}: give comma-separated integers, e.g. 0,1,2") from None
    if not values or len(set(values)) != len(values):
        raise SystemExit(f"error: {option} {text!r}: give at least one value, each once")
    return values


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise SystemExit(f"error: --methods {text!r}: choose among {', '.join(METHODS)} (comma-separated, each once)")
    return methods


# --- counts and the time estimate -------------------------------------------------------------------


SYNTH_DEFAULTS = {"num_classes": 8, "image_size": 64, "imbalance": 0.01, "max_per_class": 500, "val_per_class": 20,
                  "test_per_class": 20, "public_classes": 10, "public_per_class": 300, "public_val_per_class": 30, "seed": 0,
                  "unlabeled": 0}
# The protocol's sizes (the class design stays the generator's): val and test 100 images a class, so that one tail
# image is 1 point of recall, and an unlabelled pool of 3,000 drawn from the train distribution.
PROTOCOL_SYNTH = ["--val-per-class", "100", "--test-per-class", "100", "--unlabeled", "3000"]


def synth_config(scale: Scale) -> dict[str, Any]:
    """The `fopro data synth` config this scale asks for: its defaults (the class design) + the scale options."""
    config = dict(SYNTH_DEFAULTS)
    for option, value in zip(scale.synth[::2], scale.synth[1::2]):
        key = option[2:].replace("-", "_")
        config[key] = type(SYNTH_DEFAULTS[key])(value)
    return config


def synth_plan(scale: Scale) -> dict[str, int]:
    """Image counts the synth options give (the formula of `fopro data synth`: n_i = n_max * F^(i/(C-1)))."""
    c = synth_config(scale)
    classes = c["num_classes"]
    train = sum(max(1, math.floor(c["max_per_class"] * c["imbalance"] ** (i / (classes - 1)) + 1e-9)) for i in range(classes))
    return {
        "target_train": train,
        "target_val": classes * c["val_per_class"],
        "target_test": classes * c["test_per_class"],
        "public_train": c["public_classes"] * c["public_per_class"],
        "public_val": c["public_classes"] * c["public_val_per_class"],
        "target_unlabeled": c["unlabeled"],
    }


def estimate_seconds(scale: Scale, counts: dict[str, int]) -> dict[str, float] | None:
    """A rough wall-clock estimate on 2 CPU cores (rates measured for resnet18 / resnet26 at 64 px)."""
    if scale.device != "cpu":
        return None
    pixels = (scale.image_size / 64) ** 2
    seen = lambda n: max(1, n // scale.batch_size) * scale.batch_size  # full batches only  # noqa: E731
    infer = lambda n: n / (3 * CPU_RATES["none"]) * pixels  # noqa: E731  (a forward pass ~ 1/3 of a step)
    est = {"data": 20.0 + (counts["target_train"] + counts["target_unlabeled"]) / 100 + counts["public_train"] / 200}
    est["teacher"] = CPU_STARTUP_S + scale.teacher_epochs * (
        seen(counts["public_train"]) / CPU_RATES["teacher"] * pixels + infer(counts["public_val"]) * 2)
    est["probe"] = CPU_STARTUP_S + 30.0 * pixels
    students = 0.0
    for method in scale.methods:
        per_epoch = seen(counts["target_train"]) / CPU_RATES[method] * pixels + infer(counts["target_val"])
        students += CPU_STARTUP_S + scale.epochs * per_epoch + infer(counts["target_test"])
        if method != "none":  # the teacher probe: 4 augmented views of train, val and test through the teacher
            students += 2 * infer(4 * counts["target_train"] + counts["target_val"] + counts["target_test"])
    est["students"] = students * len(scale.seeds)
    est["eval"] = len(scale.methods) * len(scale.seeds) * (CPU_STARTUP_S + infer(counts["target_test"]))
    est["export"] = CPU_STARTUP_S + 10.0
    est["total"] = sum(est.values())
    return est


# --- running fopro commands -------------------------------------------------------------------------


class Protocol:
    """The output folder, the step counter and the clock; runs `python -m fopro` in OUT."""

    def __init__(self, out: Path, total_steps: int):
        self.out = out
        self.total = total_steps
        self.step = 0
        self.started = time.perf_counter()
        self.commands: list[str] = []
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
        env.setdefault("COLUMNS", "200")
        self.env = env

    def clock(self) -> str:
        seconds = int(time.perf_counter() - self.started)
        return f"{seconds // 60:02d}:{seconds % 60:02d}"

    def record(self, *args: str) -> None:
        """The step's command as a user would type it in OUT (listed in results.md, skipped steps included)."""
        self.commands.append("fopro " + shlex.join(args))

    def begin(self, what: str) -> float:
        self.step += 1
        print(f"[{self.clock()}] step {self.step}/{self.total}: {what}", flush=True)
        return time.perf_counter()

    def skip(self, why: str) -> None:
        print(f"           skipped: {why}", flush=True)

    def done(self, started: float, result: str = "") -> None:
        print(f"           done in {time.perf_counter() - started:.0f} s" + (f": {result}" if result else ""), flush=True)

    def fopro(self, *args: str, json_output: bool = True) -> Any:
        """Run one fopro command in OUT; its progress lines are echoed; a failure stops the script with its error."""
        command = [sys.executable, "-m", "fopro", *args]
        shown = "fopro " + shlex.join(args)
        print(f"           (in {self.out}) $ {shown}", flush=True)
        proc = subprocess.Popen(command, cwd=self.out, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        tail: collections.deque[str] = collections.deque(maxlen=30)

        def echo() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                line = line.rstrip("\n")
                tail.append(line)
                if line.strip():
                    print(f"           | {line}", file=sys.stderr, flush=True)

        reader = threading.Thread(target=echo, daemon=True)
        reader.start()
        try:
            stdout = proc.stdout.read() if proc.stdout else ""
            code = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reaches fopro too: a training run saves a resumable state first
            proc.wait()
            reader.join(timeout=5)
            print(f"\n[{self.clock()}] interrupted during `{shown}`; run the same command again to continue "
                  "(finished steps are skipped, an interrupted training run is resumed)", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
        reader.join()
        if code != 0:
            errors = [line for line in tail if "error" in line.lower()] or list(tail)[-5:]
            message = "\n".join(errors) if errors else "(no message)"
            print(f"\n[{self.clock()}] FAILED (exit code {code}) in {self.out}:\n  $ {shown}\n{message}", file=sys.stderr, flush=True)
            raise SystemExit(code)
        if not json_output:
            return None
        try:
            return json.loads(stdout)
        except json.JSONDecodeError:
            print(f"\nFAILED: `{shown}` did not print JSON on stdout:\n{stdout[-2000:]}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None


def write_text_atomically(path: Path, text: str) -> None:
    """Temporary file (named for this process), then rename: a half-written file never marks a step as done, and a
    process of synthetic_lt_parallel.sh never reads a file another one is writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json(path: Path, data: Any) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


PATH_OPTIONS = ("data", "teacher", "probe_init", "unlabeled")


def method_config(out: Path, method: str) -> dict[str, Any]:
    """Copy CONFIGS/METHOD.yaml to OUT/configs/ (the runs read it there) and return its options."""
    import yaml

    source = CONFIGS / f"{method}.yaml"
    text = source.read_text(encoding="utf-8")
    options = yaml.safe_load(text) or {}
    target = out / "configs" / source.name
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        # atomic: the parallel script's processes copy the same file while the others' runs read it
        write_text_atomically(target, text)
    return {key.replace("-", "_"): value for key, value in options.items()}


def check_run_options(run_dir: Path, expected: dict[str, Any], base: Path) -> None:
    """An existing run folder must have been made with the options of this protocol, else stop."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    saved = read_json(path)
    wrong = []
    for key, value in expected.items():
        have = saved.get(key)
        if key in PATH_OPTIONS and have is not None and value is not None:  # fopro saves absolute paths
            have, value = str(Path(have).resolve()), str((base / value).resolve())
        same = math.isclose(float(have), float(value)) if isinstance(value, float) and have is not None else have == value
        if not same:
            wrong.append(f"{key} = {have!r} (this protocol: {value!r})")
    if wrong:
        raise SystemExit(
            f"error: {run_dir} was made with other options: {'; '.join(wrong)}. "
            "Use another --out, or delete that folder to re-run it."
        )


def distill(proto: Protocol, name: str, run: str, options: list[str], expected: dict[str, Any], device: str) -> dict:
    """`fopro distill ... --out RUN --json`, or `--resume RUN` for an interrupted run, or nothing when done."""
    run_dir = proto.out / run
    summary_path = run_dir / "distill.json"
    started = proto.begin(name)
    proto.record("distill", *options, "--out", run, "--json")
    if summary_path.is_file() or (run_dir / "resume.safetensors").is_file():
        check_run_options(run_dir, expected, proto.out)  # a run that saved no epoch yet is simply started again
    if summary_path.is_file():
        proto.skip(f"{run}/distill.json exists")
        return read_json(summary_path)
    if (run_dir / "resume.safetensors").is_file():
        summary = proto.fopro("distill", "--resume", run, "--device", device, "--json")
    else:
        overwrite = ["--overwrite"] if (run_dir / "config.json").is_file() else []  # started, no epoch saved
        summary = proto.fopro("distill", *options, "--out", run, *overwrite, "--json")
    write_json(summary_path, summary)
    best = summary.get("best_val") or {}
    proto.done(started, f"best epoch {summary.get('best_epoch')}, val balanced accuracy {pct(best.get('balanced_accuracy'))}")
    return summary


# --- results ----------------------------------------------------------------------------------------


def lr_text(lr: float | None) -> str:
    return "auto" if lr is None else f"{lr:g}"


def options_text(options: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in options.items())


def lr_options(lr: float | None) -> list[str]:
    return ["--lr", "auto" if lr is None else f"{lr:g}"]


def epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; None with one value) of the defined values."""
    defined = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(defined) if defined else None,
        "std": statistics.stdev(defined) if len(defined) > 1 else None,
        "n": len(defined),
    }


def cell(stat: dict[str, Any]) -> str:
    """A table cell in percent: `mean ± std`, `mean ± n/a` with one seed, `n/a` when undefined."""
    if stat["mean"] is None:
        return "n/a"
    return f"{pct(stat['mean'])} ± {pct(stat['std'])}"


def run_metrics(summary: dict, report: dict) -> dict[str, Any]:
    groups = report.get("groups") or {}
    best = summary.get("best_val") or {}
    return {
        "val_balanced_accuracy": best.get("balanced_accuracy"),
        "test_balanced_accuracy": report.get("balanced_accuracy"),
        "test_tail_recall": report.get("tail_recall"),
        "test_head_recall": (groups.get("head") or {}).get("mean_recall"),
        "test_macro_f1": report.get("macro_f1"),
        "test_accuracy": report.get("accuracy"),
    }


def linear_probe_runs(summaries: dict[tuple[str, int], dict], methods: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Per seed, the teacher probe that the distillation runs of that seed report (None-free rows only)."""
    rows = []
    for seed in seeds:
        probe = next((summaries[m, seed]["teacher_probe"] for m in methods if summaries[m, seed].get("teacher_probe")), None)
        if probe is None:
            continue
        val, test = probe["splits"].get("val") or {}, probe["splits"].get("test") or {}
        rows.append({"seed": seed, "val_balanced_accuracy": val.get("balanced_accuracy"), "test_balanced_accuracy": test.get("balanced_accuracy"),
                     "test_tail_recall": test.get("tail_recall"), "test_head_recall": test.get("head_recall"), "test_macro_f1": test.get("macro_f1")})
    return rows


def render_markdown(results: dict) -> str:
    scale, counts = results["scale"], results["images"]
    lines = [
        "# Does FoPro-KD help the rare classes? (synthetic long-tailed data)",
        "",
        "Produced by:",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Scale ({scale['name']}): {scale['image_size']} px images; student {scale['student']}, "
        f"teacher {scale['teacher']} (pre-trained {epochs(scale['teacher_epochs'])} on the public corpus, Adam lr {lr_text(scale['teacher_lr'])}, --augment {scale['teacher_augment']}, cross-entropy); "
        f"students {epochs(scale['epochs'])}, batch {scale['batch_size']}, Adam lr {lr_text(scale['lr'])}, --augment {scale['augment']}, "
        f"seeds {', '.join(map(str, scale['seeds']))}; device {scale['device']}.",
        f"Images: target train {counts['target_train']} (long-tailed, imbalance 0.01), val {counts['target_val']}, "
        f"test {counts['target_test']} (balanced), unlabelled pool {counts.get('target_unlabeled', 0)} (drawn like train); "
        f"public train {counts['public_train']}, val {counts['public_val']}.",
        f"Wall-clock: {results['elapsed_seconds'] / 60:.1f} min for this invocation"
        + (f" (estimate for the whole protocol: {results['estimate_seconds']['total'] / 60:.0f} min)" if results.get("estimate_seconds") else "")
        + ".",
        "",
        "SYNTHETIC lesion-like images, not medical images. Every method has the same epochs, batch, learning "
        "rate and augmentation (fopro's default recipe, chosen on val splits: examples/results/recipe/); its own "
        "options are its config file (listed below, each says how its values were chosen, on VAL only); each run's "
        "checkpoint is its epoch with the best VAL balanced accuracy; the test split is used only for the numbers below.",
        "",
        f"Groups (by training count): {results['groups_text']}.",
        "",
        "## Students (percent, mean ± std over seeds; std is n/a with one seed)",
        "",
        "| method | seeds | " + " | ".join(METRICS.values()) + " | test balanced acc. / teacher probe's |",
        "| --- | --- | " + " | ".join("---:" for _ in METRICS) + " | ---: |",
    ]
    for key, method in results["methods"].items():
        cells = [cell(method["summary"][metric]) for metric in METRICS] + [cell(method["summary"]["test_balanced_accuracy_of_probe"])]
        lines.append(f"| {key} | {len(method['runs'])} | " + " | ".join(cells) + " |")
    linear = results["teacher"]["linear_probe"]
    if linear["runs"]:
        cells = [cell(linear["summary"][metric]) for metric in METRICS]
        lines.append(f"| teacher probe (linear) | {len(linear['runs'])} | " + " | ".join(cells) + " | 100.0 ± n/a |")
    lines += ["", "Methods:", ""]
    lines += [f"- `{key}`: {method['label']} (`--config {method['config']}`: {options_text(method['options'])})" for key, method in results["methods"].items()]
    lines += [f"- teacher probe (linear): {results['teacher']['linear_probe']['what']}"]
    teacher = results["teacher"]
    probe = teacher["probe"]
    lines += [
        "",
        "## Teacher (reference)",
        "",
        f"{teacher['arch']} pre-trained on the public corpus (`{teacher['checkpoint']}`), val balanced accuracy on the "
        f"public val split: {pct(teacher['public_val_balanced_accuracy'])}.",
        "",
        "Teacher probe on the target VAL split (`fopro probe`, clean images): the frozen teacher's embeddings classified "
        f"by {probe['evaluation']} — not a trained linear probe, and not the test split.",
        "",
        "| teacher probe (target val) | balanced acc. | tail balanced acc. |",
        "| --- | ---: | ---: |",
        f"| nearest class mean | {pct(probe['ncm_balanced_accuracy'])} | {pct(probe['ncm_tail_balanced_accuracy'])} |",
        f"| k-NN | {pct(probe['knn_balanced_accuracy'])} | {pct(probe['knn_tail_balanced_accuracy'])} |",
        "",
        f"Probe verdict: {probe['verdict']}",
        "",
        "## Runs",
        "",
        "| method | seed | best epoch | " + " | ".join(METRICS.values()) + " |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in METRICS) + " |",
    ]
    for key, method in results["methods"].items():
        for run in method["runs"]:
            lines.append(f"| {key} | {run['seed']} | {run['best_epoch']} | " + " | ".join(pct(run[m]) for m in METRICS) + " |")
    export = results.get("export")
    lines += ["", "## Export", ""]
    if export:
        check = export.get("check") or {}
        lines.append(
            f"The fopro student with the best val balanced accuracy (seed {export['seed']}, {pct(export['val_balanced_accuracy'])}) "
            f"exported to `{export['onnx']}`: check on val images {'passed' if check.get('passed') else 'NOT passed'} "
            f"(max |diff| {check['max_abs_diff'] if check.get('max_abs_diff') is None else format(check['max_abs_diff'], '.2g')}, "
            f"top-1 agreement {pct(check.get('top1_agreement'))})."
        )
    else:
        lines.append("No `fopro` run in --methods: nothing exported.")
    lines += ["", "## Commands (run in the output folder)", "", "```bash", *results["commands"], "```", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in METRICS if m != "val_balanced_accuracy"] + ["val_balanced_accuracy"]
    methods = list(results["methods"])
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(2.2 + 1.9 * len(metrics), 4.6))
    for i, key in enumerate(methods):
        summary = results["methods"][key]["summary"]
        means = [100 * (summary[m]["mean"] or 0.0) for m in metrics]
        stds = [100 * (summary[m]["std"] or 0.0) for m in metrics]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=key)
    probe = results["teacher"]["linear_probe"]["summary"]["test_balanced_accuracy"]["mean"]
    if probe is not None:
        ax.axhline(100 * probe, color="grey", linestyle="--", linewidth=1, label="teacher probe (linear, test balanced acc.)")
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels([METRICS[m] for m in metrics])
    ax.set_ylabel("percent (mean ± std over seeds)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Synthetic long-tailed data: {results['scale']['student']} students, {results['scale']['teacher']} teacher")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


# --- the protocol -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="FoPro-KD vs baselines on the embedded synthetic long-tailed data: every step a fopro command.",
        epilog="Explicit options override the preset (default, --quick or --full). Every step runs inside --out.",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"Output folder: data, teacher, probe, runs, export, results.* (default {DEFAULT_OUT}).")
    parser.add_argument("--epochs", type=int, help="Student epochs (default 15; --full 100; --quick 1).")
    parser.add_argument("--teacher-epochs", type=int, help="Teacher pre-training epochs (default 6; --full 30; --quick 1).")
    parser.add_argument("--seeds", help="Comma-separated student seeds (default 0,1,2; --quick 0).")
    parser.add_argument("--methods", help=f"Comma-separated methods among {','.join(METHODS)} (default all; --quick none,fopro).")
    parser.add_argument("--image-size", type=int, help="Image side in pixels, of the data and the models (default 64; --quick 32).")
    parser.add_argument("--student", help="Student timm model (default resnet18; --quick test_resnet).")
    parser.add_argument("--teacher", help="Teacher timm model, trained on the public corpus (default resnet26; --full resnet50; --quick resnet10t).")
    parser.add_argument("--batch-size", type=int, help="Batch size of every run (default 32; --quick 8).")
    parser.add_argument("--lr", type=float, help="Adam learning rate of every student (default: fopro's --lr auto).")
    parser.add_argument("--augment", help="Augmentation preset of every student (default reference; the teacher keeps dermoscopy).")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default cpu; --full cuda).")
    parser.add_argument("--dry-run", action="store_true", help="Print the scale and the time estimate, run nothing.")
    scale_group = parser.add_mutually_exclusive_group()
    scale_group.add_argument("--full", action="store_true", help="GPU scale: 64 px data, resnet50 teacher (30 epochs), students 100 epochs, --device cuda.")
    scale_group.add_argument("--quick", action="store_true", help="Smoke scale (tests): tiny data, test_resnet / resnet10t, 1 epoch, 1 seed, none and fopro.")
    args = parser.parse_args(argv)

    scale = preset(args)
    for option, value in (("--epochs", scale.epochs), ("--teacher-epochs", scale.teacher_epochs), ("--batch-size", scale.batch_size)):
        if value < 1:
            parser.error(f"{option} must be at least 1")
    if scale.image_size < 16:
        parser.error("--image-size must be at least 16")
    out = Path(args.out).resolve()
    script = os.path.relpath(sys.argv[0]) if argv is None else "examples/synthetic_lt.py"
    command = shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])

    counts = synth_plan(scale)
    runs = [(method, seed) for method in scale.methods for seed in scale.seeds]
    has_export = "fopro" in scale.methods
    proto = Protocol(out, total_steps=3 + 2 * len(runs) + has_export + 1)
    estimate = estimate_seconds(scale, counts)
    print(f"FoPro-KD synthetic long-tailed protocol — scale: {scale.name}")
    print(f"  images: {scale.image_size} px; target train {counts['target_train']} (long-tailed), val {counts['target_val']}, "
          f"test {counts['target_test']}, unlabelled {counts['target_unlabeled']}; public train {counts['public_train']}, val {counts['public_val']}")
    print(f"  teacher {scale.teacher}: {epochs(scale.teacher_epochs)} on the public corpus; student {scale.student}: "
          f"{epochs(scale.epochs)}, batch {scale.batch_size}, lr {lr_text(scale.lr)}, --augment {scale.augment}; methods {', '.join(scale.methods)}; "
          f"seeds {', '.join(map(str, scale.seeds))}; device {scale.device}")
    print(f"  {len(runs)} student runs; output folder {out}")
    if estimate:
        parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in estimate.items() if k != "total")
        basis = "" if (scale.student, scale.teacher) == ("resnet18", "resnet26") else "; rates of resnet18 / resnet26, other models differ"
        print(f"  estimate on 2 CPU cores: ~{estimate['total'] / 60:.0f} min ({parts} min; finished steps are skipped{basis})")
    else:
        print(f"  no time estimate for device {scale.device} (the estimate is for 2 CPU cores)")
    print(f"  command: {command}", flush=True)
    if args.dry_run:
        return 0
    out.mkdir(parents=True, exist_ok=True)

    # 1. data
    started = proto.begin("generate the synthetic target and public data (fopro data synth, seed 0)")
    synth_args = ["data", "synth", "data", "--seed", "0", *scale.synth, "--json"]
    proto.record(*synth_args)
    synth_json = out / "data" / "synth.json"
    if synth_json.is_file():
        synth = read_json(synth_json)
        wanted = synth_config(scale)
        have = {k: synth["config"].get(k, SYNTH_DEFAULTS[k]) for k in wanted}  # (synth.json leaves out an empty pool)
        wrong = {k: have[k] for k, v in wanted.items() if have[k] != v}
        if wrong:
            raise SystemExit(f"error: {synth_json} was generated with other options ({wrong}; this protocol: "
                             f"{ {k: wanted[k] for k in wrong} }): use another --out")
        proto.skip("data/synth.json exists")
    else:
        synth = proto.fopro(*synth_args)
        proto.done(started, f"{synth.get('total_images')} images")
    counts = {
        f"{corpus}_{split}": sum(synth[corpus]["counts"][split].values())
        for corpus, splits in (("target", ("train", "val", "test")), ("public", ("train", "val")))
        for split in splits
    }
    counts["target_unlabeled"] = (synth["target"].get("unlabeled") or {}).get("size", 0)

    # 2. teacher: the stand-in for a public pre-trained model
    teacher_options = ["--data", "data/public", "--method", "none", "--loss", "ce", "--student", scale.teacher,
                       "--image-size", str(scale.image_size), "--epochs", str(scale.teacher_epochs),
                       "--batch-size", str(scale.batch_size), *lr_options(scale.teacher_lr), "--augment", scale.teacher_augment,
                       "--device", scale.device, "--seed", "0"]
    teacher_expected = {"data": "data/public", "student": scale.teacher, "image_size": scale.image_size,
                        "epochs": scale.teacher_epochs, "batch_size": scale.batch_size, "method": "none", "loss": "ce"}
    teacher = distill(proto, f"pre-train the teacher {scale.teacher} on the public corpus", "teacher", teacher_options, teacher_expected, scale.device)
    teacher_ckpt = "teacher/best.safetensors"

    # 3. probe the teacher's frequency preferences on the target val split
    started = proto.begin("probe the teacher on the target val split (fopro probe)")
    probe_args = ["probe", "--teacher", teacher_ckpt, "--data", "data/target", "--split", "val", "--out", "probe",
                  "--device", scale.device, *scale.probe, *scale.thresholds, "--json"]
    proto.record(*probe_args)
    probe_json = out / "probe" / "probe.json"
    if probe_json.is_file():
        probe = read_json(probe_json)
        proto.skip("probe/probe.json exists")
    else:
        probe = proto.fopro(*probe_args)
        if not probe_json.is_file():
            write_json(probe_json, probe)
        proto.done(started, f"clean nearest-class-mean balanced accuracy {pct(probe['clean']['balanced_accuracy'])}")

    # 4. students: each method's options are its config file (copied into OUT/configs/), plus the shared scale
    summaries: dict[tuple[str, int], dict] = {}
    method_options = {method: method_config(out, method) for method in scale.methods}
    for method, seed in runs:
        options = ["--config", f"configs/{method}.yaml", "--data", "data/target", "--student", scale.student, "--image-size", str(scale.image_size)]
        if method != "none":
            options += ["--teacher", teacher_ckpt]
        options += ["--epochs", str(scale.epochs), "--batch-size", str(scale.batch_size), *lr_options(scale.lr), "--augment", scale.augment,
                    "--device", scale.device, "--seed", str(seed), *scale.thresholds]
        expected = {"data": "data/target", "student": scale.student, "image_size": scale.image_size, "epochs": scale.epochs,
                    "batch_size": scale.batch_size, "lr": scale.lr, "augment": scale.augment, "seed": seed,
                    "teacher": None if method == "none" else teacher_ckpt, **method_options[method]}
        summaries[method, seed] = distill(proto, f"train student {method}, seed {seed}", f"runs/{method}-seed{seed}", options, expected, scale.device)

    # 5. evaluate every best-on-val checkpoint on the test split
    reports: dict[tuple[str, int], dict] = {}
    for method, seed in runs:
        run = f"runs/{method}-seed{seed}"
        started = proto.begin(f"evaluate {method}, seed {seed} on the test split (fopro eval)")
        eval_args = ["eval", f"{run}/best.safetensors", "--data", "data/target", "--split", "test", "--device", scale.device,
                     *scale.thresholds, "--json"]
        proto.record(*eval_args)
        path = out / run / "eval_test.json"
        if path.is_file():
            reports[method, seed] = read_json(path)
            proto.skip(f"{run}/eval_test.json exists")
            continue
        report = proto.fopro(*eval_args)
        write_json(path, report)
        reports[method, seed] = report
        proto.done(started, f"balanced accuracy {pct(report.get('balanced_accuracy'))}, tail recall {pct(report.get('tail_recall'))}")

    # export the fopro student with the best VAL balanced accuracy (ties: lowest seed)
    export = None
    if has_export:
        val = {seed: (summaries["fopro", seed].get("best_val") or {}).get("balanced_accuracy") or -1.0 for seed in scale.seeds}
        best_seed = max(scale.seeds, key=lambda s: (val[s], -s))
        checkpoint = f"runs/fopro-seed{best_seed}/best.safetensors"
        started = proto.begin(f"export the best-on-val fopro student (seed {best_seed}) to ONNX and check it (fopro export)")
        export_args = ["export", checkpoint, "--onnx", "export/student.onnx", "--check", "--data", "data/target", "--json"]
        proto.record(*export_args)
        path = out / "export" / "export.json"
        previous = read_json(path) if path.is_file() else None
        if previous and previous.get("checkpoint") == checkpoint and (out / "export" / "student.onnx").is_file():
            report = previous
            proto.skip("export/export.json exists")
        else:
            report = proto.fopro(*export_args)
            write_json(path, report)
            proto.done(started, f"check passed: {(report.get('check') or {}).get('passed')}")
        check = report.get("check") or {}
        if check.get("passed") is False:
            raise SystemExit(f"error: the ONNX check failed for {checkpoint}: {check}")
        export = {"seed": best_seed, "checkpoint": checkpoint, "selected_by": "val balanced accuracy (best over seeds)",
                  "val_balanced_accuracy": val[best_seed], "onnx": "export/student.onnx",
                  "check": {k: check.get(k) for k in ("passed", "source", "max_abs_diff", "top1_agreement", "accuracy_pytorch", "accuracy_onnx")}}

    # results
    started = proto.begin("write results.md, results.json, results.png")
    methods_out: dict[str, Any] = {}
    for method in scale.methods:
        rows = []
        for seed in scale.seeds:
            summary, report = summaries[method, seed], reports[method, seed]
            rows.append({"seed": seed, "run_dir": f"runs/{method}-seed{seed}", "best_epoch": summary.get("best_epoch"),
                         **run_metrics(summary, report)})
        methods_out[method] = {
            "label": METHODS[method],
            "config": f"examples/configs/synthetic_lt/{method}.yaml",
            "options": method_options[method],
            "runs": rows,
            "summary": {metric: mean_std([r[metric] for r in rows]) for metric in [*METRICS, "test_accuracy"]},
        }
    probe_rows = linear_probe_runs(summaries, scale.methods, scale.seeds)
    by_seed = {row["seed"]: row for row in probe_rows}
    for method, entry in methods_out.items():
        for row in entry["runs"]:
            probe_row = by_seed.get(row["seed"])
            row["test_balanced_accuracy_of_probe"] = (
                row["test_balanced_accuracy"] / probe_row["test_balanced_accuracy"] if probe_row and probe_row["test_balanced_accuracy"] else None
            )
        entry["summary"]["test_balanced_accuracy_of_probe"] = mean_std([r["test_balanced_accuracy_of_probe"] for r in entry["runs"]])
    first = reports[runs[0]]
    groups = first.get("groups") or {}
    groups_text = "; ".join(f"{g} ({info['definition']}): {', '.join(info['classes']) or 'none'}" for g, info in groups.items())
    clean = probe["clean"]
    evaluation = probe.get("evaluation") or {}
    results = {
        "format": "fopro-example-synthetic-lt/1",
        "command": command,
        "scale": {**asdict(scale), "teacher_lr": scale.teacher_lr},
        "images": counts,
        "estimate_seconds": estimate,
        "elapsed_seconds": round(time.perf_counter() - proto.started, 1),
        "units": "fractions in [0, 1]; results.md shows them in percent with one decimal",
        "metrics": {m: title for m, title in METRICS.items()},
        "groups": groups,
        "groups_text": groups_text,
        "methods": methods_out,
        "teacher": {
            "arch": scale.teacher,
            "checkpoint": teacher_ckpt,
            "public_val_balanced_accuracy": (teacher.get("best_val") or {}).get("balanced_accuracy"),
            "linear_probe": {
                "what": "a linear classifier (balanced softmax + L2, its weight chosen on val; 4 augmented views) on the frozen teacher's embeddings of the target "
                        "TRAIN split, fitted by each distillation run (the same for every method of a seed), scored on val and test",
                "runs": probe_rows,
                "summary": {metric: mean_std([r[metric] for r in probe_rows]) for metric in METRICS},
            },
            "probe": {
                "split": probe.get("split"),
                "num_images": probe.get("num_images"),
                "ncm_balanced_accuracy": clean.get("balanced_accuracy"),
                "ncm_tail_balanced_accuracy": clean.get("tail_balanced_accuracy"),
                "knn_balanced_accuracy": clean.get("knn_balanced_accuracy"),
                "knn_tail_balanced_accuracy": clean.get("knn_tail_balanced_accuracy"),
                "evaluation": f"nearest class mean and k-NN (k={evaluation.get('knn_k')}) with "
                              f"{evaluation.get('folds')}-fold stratified cross-validation on the val images",
                "verdict": probe.get("verdict"),
            },
        },
        "export": export,
        "commands": proto.commands,
    }
    write_json(out / "results.json", results)
    (out / "results.md.tmp").write_text(render_markdown(results), encoding="utf-8")
    (out / "results.md.tmp").replace(out / "results.md")
    plot(results, out / "results.png")
    proto.done(started)
    print()
    print(render_markdown(results).split("## Teacher")[0].rstrip())
    print(f"\n[{proto.clock()}] wrote {out / 'results.md'}, results.json, results.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
