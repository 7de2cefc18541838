"""The end-to-end examples: the synthetic protocol at its smoke scale, and the ISIC-2019 script's syntax."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "synthetic_lt.py"
RUN_SH = REPO / "examples" / "isic2019" / "run.sh"
METRICS = ["test_balanced_accuracy", "test_tail_recall", "test_head_recall", "test_macro_f1", "val_balanced_accuracy"]


def pct(value):
    return "n/a" if value is None else f"{100 * value:.1f}"


def cell(stat):
    return "n/a" if stat["mean"] is None else f"{pct(stat['mean'])} ± {pct(stat['std'])}"


def table_rows(markdown: str, header_start: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header row starts with `header_start`, as lists of cells."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("examples") / "lt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return out, proc


def test_quick_protocol_writes_results(quick_run):
    out, proc = quick_run
    for name in ("results.json", "results.md", "results.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    assert {"command", "scale", "images", "methods", "teacher", "export", "commands", "groups"} <= set(results)
    assert list(results["methods"]) == ["none", "fopro"]
    scale = results["scale"]
    assert (scale["image_size"], scale["student"], scale["teacher"], scale["epochs"], scale["seeds"]) == (32, "test_resnet", "resnet10t", 1, [0])
    for method in results["methods"].values():
        assert [run["seed"] for run in method["runs"]] == [0]
        assert set(METRICS) <= set(method["summary"])
        for metric in METRICS:
            stat = method["summary"][metric]
            assert stat["n"] == 1 and stat["std"] is None and 0.0 <= stat["mean"] <= 1.0, (metric, stat)
    probe = results["teacher"]["probe"]
    assert probe["split"] == "val" and 0.0 <= probe["ncm_balanced_accuracy"] <= 1.0
    export = results["export"]
    assert export["seed"] == 0 and export["check"]["passed"] is True
    assert (out / export["onnx"]).is_file()
    # every step is a fopro command that the user can read back
    commands = results["commands"]
    assert commands[0].startswith("fopro data synth data --seed 0")
    assert any(c.startswith("fopro distill --data data/public --method none --loss ce --student resnet10t") for c in commands)
    assert any(c.startswith("fopro probe --teacher teacher/best.safetensors --data data/target --split val") for c in commands)
    assert any("--config configs/fopro.yaml" in c and "--seed 0" in c for c in commands)
    assert (out / "configs" / "fopro.yaml").read_text() == (REPO / "examples" / "configs" / "synthetic_lt" / "fopro.yaml").read_text()
    assert any(c.startswith("fopro eval runs/fopro-seed0/best.safetensors") and "--split test" in c for c in commands)
    assert any(c.startswith("fopro export runs/fopro-seed0/best.safetensors --onnx") and "--check" in c for c in commands)
    assert "step 1/" in proc.stdout and "done in" in proc.stdout


def test_markdown_numbers_equal_json(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    assert results["command"] in markdown and "--quick" in results["command"]
    assert "32 px" in markdown and "test_resnet" in markdown and "resnet10t" in markdown
    rows = {row[0]: row for row in table_rows(markdown, "| method | seeds |")}
    linear = results["teacher"]["linear_probe"]
    assert set(rows) == set(results["methods"]) | {"teacher probe (linear)"}
    for key, method in results["methods"].items():
        assert rows[key][1] == str(len(method["runs"]))
        assert rows[key][2:] == [cell(method["summary"][m]) for m in METRICS] + [cell(method["summary"]["test_balanced_accuracy_of_probe"])]
    assert rows["teacher probe (linear)"][2:-1] == [cell(linear["summary"][m]) for m in METRICS]
    fopro_run = results["methods"]["fopro"]["runs"][0]
    summary = json.loads((out / "runs" / "fopro-seed0" / "distill.json").read_text())
    assert linear["runs"][0]["test_balanced_accuracy"] == summary["teacher_probe"]["splits"]["test"]["balanced_accuracy"]
    assert fopro_run["test_balanced_accuracy_of_probe"] == pytest.approx(fopro_run["test_balanced_accuracy"] / linear["runs"][0]["test_balanced_accuracy"])
    runs = table_rows(markdown, "| method | seed |")
    expected = [[key, str(r["seed"]), str(r["best_epoch"]), *[pct(r[m]) for m in METRICS]]
                for key, method in results["methods"].items() for r in method["runs"]]
    assert runs == expected
    probe = results["teacher"]["probe"]
    teacher_rows = {row[0]: row[1:] for row in table_rows(markdown, "| teacher probe (target val) |")}
    assert teacher_rows["nearest class mean"] == [pct(probe["ncm_balanced_accuracy"]), pct(probe["ncm_tail_balanced_accuracy"])]
    assert teacher_rows["k-NN"] == [pct(probe["knn_balanced_accuracy"]), pct(probe["knn_tail_balanced_accuracy"])]
    # the JSON numbers are the sub-commands' own numbers
    report = json.loads((out / "runs" / "fopro-seed0" / "eval_test.json").read_text())
    run = results["methods"]["fopro"]["runs"][0]
    assert run["test_balanced_accuracy"] == report["balanced_accuracy"]
    assert run["test_tail_recall"] == report["tail_recall"]
    assert run["test_head_recall"] == report["groups"]["head"]["mean_recall"]
    assert run["test_macro_f1"] == report["macro_f1"]


def test_rerun_skips_finished_steps(quick_run):
    out, _ = quick_run
    before = (out / "runs" / "none-seed0" / "best.safetensors").stat().st_mtime_ns
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("skipped:") >= 6
    assert "$ fopro" not in proc.stdout  # nothing was run again
    assert (out / "runs" / "none-seed0" / "best.safetensors").stat().st_mtime_ns == before


def test_interrupted_run_is_resumed(quick_run):
    """A run folder without its summary (as after an interruption) is continued with `fopro distill --resume`."""
    out, _ = quick_run
    before = json.loads((out / "results.json").read_text())["methods"]["none"]["runs"]
    (out / "runs" / "none-seed0" / "distill.json").unlink()
    (out / "runs" / "none-seed0" / "eval_test.json").unlink()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "$ fopro distill --resume runs/none-seed0 --device cpu --json" in proc.stdout
    assert "$ fopro eval runs/none-seed0/best.safetensors" in proc.stdout
    assert proc.stdout.count("$ fopro") == 2
    after = json.loads((out / "results.json").read_text())["methods"]["none"]["runs"]
    assert after == before


def test_other_options_refused_in_existing_out(quick_run):
    out, _ = quick_run
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--epochs", "2", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "epochs" in (proc.stdout + proc.stderr) and "another --out" in (proc.stdout + proc.stderr)


def test_failing_subcommand_stops_with_its_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--teacher", "no_such_model_xyz", "--out", str(tmp_path / "lt")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "FAILED" in proc.stderr and "no_such_model_xyz" in proc.stderr
    assert not (tmp_path / "lt" / "results.json").exists()


def test_presets_and_estimate():
    """--dry-run prints the scale and the estimate (9 methods x 3 seeds: about 1 h 40 min at the measured CPU rates);
    --full is the GPU scale."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = lambda *a: subprocess.run([sys.executable, str(SCRIPT), "--dry-run", *a], cwd=REPO, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    default = run()
    assert default.returncode == 0, default.stderr
    assert "target train 1028" in default.stdout and "public train 3000" in default.stdout
    assert "teacher resnet26: 6 epochs" in default.stdout and "student resnet18: 15 epochs, batch 32, lr auto, --augment reference" in default.stdout
    assert "27 student runs" in default.stdout and "val 800, test 800" in default.stdout
    minutes = int(re.search(r"estimate on 2 CPU cores: ~(\d+) min", default.stdout).group(1))
    assert 40 <= minutes <= 120
    full = run("--full")
    assert full.returncode == 0, full.stderr
    assert "64 px" in full.stdout and "teacher resnet50" in full.stdout and "100 epochs" in full.stdout and "device cuda" in full.stdout
    both = run("--full", "--quick")
    assert both.returncode != 0


def test_bad_methods_option():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--methods", "none,bogus"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "bogus" in proc.stderr


def test_isic_run_sh_syntax():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    proc = subprocess.run([bash, "-n", str(RUN_SH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = RUN_SH.read_text()
    assert "set -euo pipefail" in text
    for option in ("-csv", "--images", "--teacher-weights", "--epochs", "--resume", " eval "):
        assert option in text, option


def test_isic_run_sh_usage_without_arguments():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    proc = subprocess.run([bash, str(RUN_SH)], capture_output=True, text=True, timeout=30, env={**os.environ, "PATH": os.environ.get("PATH", "")})
    assert proc.returncode != 0
    assert re.search(r"usage", proc.stderr, re.IGNORECASE)


FAKE_FOPRO = r'''#!PYTHON
"""A stand-in for fopro: logs its arguments; distill makes a finished run folder, eval prints a report."""
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
if args[0] == "distill":
    out = Path(args[args.index("--out") + 1] if "--out" in args else args[args.index("--resume") + 1])
    out.mkdir(parents=True, exist_ok=True)
    epochs = int(args[args.index("--epochs") + 1]) if "--epochs" in args else 2
    (out / "best.safetensors").write_text("x")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e + 1, "val": {}}) + "\n" for e in range(epochs)))
elif args[0] == "eval":
    fold = int(args[1].split("fold")[1].split("/")[0])
    print(json.dumps({"balanced_accuracy": 0.5 + fold / 100, "tail_recall": 0.25, "macro_f1": 0.4, "accuracy": 0.6}))
elif args[0] == "probe":
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text("{}")
'''


def test_isic_run_sh_commands(tmp_path):
    """run.sh with a stand-in fopro: the commands of the paper's protocol, 5 folds, the summary, and re-runs skip."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    fake = tmp_path / "fopro"
    fake.write_text(FAKE_FOPRO.replace("PYTHON", sys.executable))
    fake.chmod(0o755)
    images, csvs, weights = tmp_path / "images", tmp_path / "csv", tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    images.mkdir()
    csvs.mkdir()
    weights.write_text("w")
    for fold in range(1, 6):
        for split in ("train", "val", "test"):
            (csvs / f"{split}_skin{fold}_0.002.csv").write_text("image,finding_name,finding\nISIC_0000000,1,0\n")
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "FOPRO": str(fake), "PYTHON": sys.executable, "FAKE_LOG": str(log), "OUT": str(tmp_path / "runs"),
           "METHODS": "none fopro-no-akd"}
    command = [bash, str(RUN_SH), str(images), str(csvs), "moco", str(weights), "0.002"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    distills = [c for c in calls if c[0] == "distill"]
    evals = [c for c in calls if c[0] == "eval"]
    assert len(distills) == 10 and len(evals) == 10
    first = distills[0]
    joined = " ".join(first)
    assert f"--train-csv {csvs}/train_skin1_0.002.csv --val-csv {csvs}/val_skin1_0.002.csv --test-csv {csvs}/test_skin1_0.002.csv" in joined
    assert f"--images {images}" in joined
    for option in ("--student resnet18", "--image-size 224", "--method none", "--epochs 100", "--batch-size 32", "--lr 3e-4", "--augment dermoscopy",
                   "--ekd-weight 3", "--device cuda"):
        assert option in joined, option
    assert "--teacher" not in first  # the supervised baseline has no teacher
    akd = " ".join(distills[1])
    assert "--method fopro --adv-weight 0" in akd and f"--teacher resnet50 --teacher-weights {weights}" in akd
    assert all("--split" in c and c[c.index("--split") + 1] == "test" and "--json" in c for c in evals)
    summary = json.loads((tmp_path / "runs" / "moco-0.002" / "summary.json").read_text())
    assert summary["none"]["folds"] == 5
    assert summary["none"]["balanced_accuracy"]["mean"] == pytest.approx(0.53)
    assert "53.00 ± 1.58" in (tmp_path / "runs" / "moco-0.002" / "summary.md").read_text()
    # a second invocation finds every run done
    log.write_text("")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text() == ""
    # DINOv2: the ViT teacher at 224 px
    env["OUT"], env["METHODS"], env["FOLDS"] = str(tmp_path / "dino"), "fopro", "1"
    proc = subprocess.run([bash, str(RUN_SH), str(images), str(csvs), "dinov2", str(weights), "0.002"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    call = " ".join(json.loads(log.read_text().splitlines()[0]))
    assert f"--teacher vit_small_patch14_dinov2 --teacher-weights {weights} --teacher-image-size 224" in call


PARALLEL_SH = REPO / "examples" / "synthetic_lt_parallel.sh"
needs_parallel_tools = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("bash", "taskset", "setsid")), reason="needs bash, taskset and setsid (util-linux)"
)


def run_parallel(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(PARALLEL_SH), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@needs_parallel_tools
def test_parallel_protocol_fills_the_same_folder_as_the_script(quick_run, tmp_path):
    out, _ = quick_run
    parallel = tmp_path / "lt"
    parallel.mkdir()
    for shared in ("data", "teacher", "probe"):  # the quick protocol's, so only the student runs are made here
        (parallel / shared).symlink_to(out / shared, target_is_directory=True)
    proc = run_parallel(str(parallel), "none", "1,2", "--quick")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    for seed in (1, 2):
        assert (parallel / "runs" / f"none-seed{seed}" / "eval_test.json").is_file()
        assert "train student none, seed" in (parallel / "logs" / f"none-seed{seed}.log").read_text()
    results = json.loads((parallel / "results.json").read_text())
    assert list(results["methods"]) == ["none"] and results["scale"]["seeds"] == [1, 2]
    assert [run["seed"] for run in results["methods"]["none"]["runs"]] == [1, 2]
    again = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--methods", "none", "--seeds", "1,2", "--out", str(parallel)],
                           cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "$ fopro" not in again.stdout  # the plain script finds every step of the parallel one done


@needs_parallel_tools
def test_parallel_protocol_stops_when_the_first_process_makes_no_probe(tmp_path):
    proc = run_parallel(str(tmp_path / "lt"), "none", "0", "--quick", "--dry-run", timeout=120)
    assert proc.returncode == 1
    assert "ended before" in proc.stderr and "probe.json" in proc.stderr
    assert not (tmp_path / "lt" / "runs").exists()


@needs_parallel_tools
def test_parallel_protocol_refuses_bad_arguments_before_writing(tmp_path):
    usage = run_parallel(timeout=30)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    unknown = run_parallel(str(tmp_path / "lt"), "none,bogus", "0", timeout=30)
    assert unknown.returncode == 2 and "unknown method 'bogus'" in unknown.stderr
    assert not (tmp_path / "lt").exists()
