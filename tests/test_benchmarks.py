"""The benchmark scripts run (--quick, as subprocesses) and write the JSON they promise; no timing assertions.

Also: the training step the benchmarks time is the one fopro/train.py runs (same weights, bit for bit).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MACHINE_KEYS = {"cpu", "cores_logical", "cores_usable", "torch_threads", "torch"}
TIMEOUT_S = 240

# script -> (top-level keys, dotted paths that must hold positive numbers)
EXPECTED = {
    "step_cost": (
        {"machine", "settings", "timings", "ratios", "fft", "targets", "samples_ms", "images_per_second"},
        [
            "timings.lower_bound.median_ms",
            "timings.teacher_forward.median_ms",
            "timings.none.median_ms",
            "timings.kd.median_ms",
            "timings.ekd.median_ms",
            "timings.ekd_focus.median_ms",
            "timings.fopro.median_ms",
            "timings.fopro_every2.median_ms",
            "timings.fopro_no_akd.median_ms",
            "timings.fpg_isolated.median_ms",
            "ratios.ekd_over_lower_bound",
            "ratios.fopro_over_ekd",
            "ratios.ekd_focus_over_ekd",
            "ratios.fopro_every2_over_ekd",
            "fft.fft_ms_per_step",
            "fft.share_of_fopro_step",
            "ratios.fopro_no_akd_over_ekd",
        ],
    ),
    "data_pipeline": (
        {"machine", "settings", "rates", "loader_over_step", "fed_step_over_plain_step", "targets"},
        [
            "rates.loader_cache_w0.images_per_second",
            "rates.loader_cache_w1.images_per_second",
            "rates.loader_cache_w2.images_per_second",
            "rates.loader_nocache_w0.images_per_second",
            "rates.loader_nocache_w1.images_per_second",
            "rates.loader_nocache_w2.images_per_second",
            "rates.fopro_step.images_per_second",
            "rates.fopro_step_fed_by_loader.images_per_second",
            "loader_over_step.loader_cache_w0",
            "loader_over_step.loader_nocache_w2",
            "fed_step_over_plain_step",
        ],
    ),
    "inference": (
        {"machine", "settings", "models", "flop_ratio", "timings", "speedup", "speedup_over_flop_ratio", "over_student_torch", "export_reports", "targets"},
        [
            "models.teacher.params",
            "models.teacher.flops_per_image",
            "models.student.params",
            "models.student.flops_per_image",
            "flop_ratio",
            "timings.teacher_torch_b1.median_ms",
            "timings.student_torch_b1.median_ms",
            "timings.student_ort_fp32_b1.median_ms",
            "timings.student_ort_fp16_b1.median_ms",
            "timings.student_ort_int8_b1.median_ms",
            "timings.student_torch_b4.median_ms",
            "timings.deploy_onnx_predictor_b1.median_ms",
            "speedup.1",
            "speedup_over_flop_ratio.4",
            "over_student_torch.student_ort_fp32_b1",
            "export_reports.int8.size_bytes",
        ],
    ),
    "memory": (
        {"machine", "settings", "runs", "peak_rss_gib", "train_images", "targets"},
        [
            "runs.distill_fopro.peak_rss_bytes",
            "runs.distill_fopro.wall_s",
            "peak_rss_gib.distill_fopro",
            "train_images",
        ],
    ),
}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """All four scripts with --quick, started together (they are independent) and awaited."""
    out = tmp_path_factory.mktemp("benchmarks")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    processes = {}
    for name in EXPECTED:
        log = open(out / f"{name}.log", "wb")
        command = [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--plain", "--json-out", str(out / f"{name}.json")]
        processes[name] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out), log)
    results = {}
    for name, (process, log) in processes.items():
        try:
            code = process.wait(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        log.close()
        text = (out / f"{name}.log").read_text(encoding="utf-8", errors="replace")
        path = out / f"{name}.json"
        payload = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        results[name] = (code, text, payload)
    return results


def lookup(payload: dict, dotted: str):
    value = payload
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"{dotted}: '{part}' missing (have {sorted(value) if isinstance(value, dict) else value!r})"
        value = value[part]
    return value


@pytest.mark.parametrize("name", list(EXPECTED))
def test_quick_run_writes_expected_json(quick_runs, name):
    code, log, payload = quick_runs[name]
    assert code == 0, f"{name}.py --quick exited with {code}:\n{log[-4000:]}"
    assert payload is not None, f"{name}.py wrote no JSON:\n{log[-4000:]}"
    keys, positives = EXPECTED[name]
    assert keys <= set(payload), f"missing keys {keys - set(payload)}"
    assert payload["benchmark"] == name and payload["quick"] is True
    assert MACHINE_KEYS <= set(payload["machine"])
    assert payload["machine"]["torch_threads"] >= 1
    for dotted in positives:
        value = lookup(payload, dotted)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{dotted} = {value!r} is not a number"
        assert math.isfinite(value) and value > 0, f"{dotted} = {value!r} is not a positive number"
    for item in payload["targets"]:
        assert {"name", "value", "limit", "pass"} <= set(item)
        assert item["pass"] in (True, False, None)
    assert "targets" in log and "machine:" in log  # the table and the machine line were printed


def test_quick_runs_print_machine_and_verdicts(quick_runs):
    for name, (code, log, _) in quick_runs.items():
        assert code == 0, name
        assert ("PASS" in log) or ("MISS" in log), f"{name}: no PASS/MISS verdict printed"


def test_round_robin_interleaves_and_divides():
    from benchmarks.common import paired_ratio, round_robin

    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    samples = round_robin(cases, warmup=1, repeats=3, per_call={"a": 2})
    assert calls[:3] == ["a", "b", "c"]  # warm-up round
    assert calls[3:6] == ["a", "b", "c"] and calls[6:9] == ["b", "c", "a"] and calls[9:] == ["c", "a", "b"]
    assert all(len(v) == 3 and all(s >= 0 for s in v) for v in samples.values())
    assert paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]) == 2.0


def test_benchmark_step_is_the_training_loop_step(tmp_path):
    """benchmarks.common.train_step (what step_cost times) gives the same weights as fopro.train.train_epoch."""
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_image_folder, tiny_checkpoint

    from benchmarks.common import train_step
    from fopro.config import DistillConfig
    from fopro.runtime import no_progress
    from fopro.schedule import adversary_ramp, epoch_batches, epoch_order, lr_factor
    from fopro.run import build_run
    from fopro.train import make_loader, train_epoch

    root = make_image_folder(tmp_path / "data", {"train": {"a": 7, "b": 5}}, size=32)
    teacher, _ = tiny_checkpoint(tmp_path / "teacher", ["x", "y"], arch="test_resnet", image_size=32)
    config = DistillConfig(
        data=str(root), teacher=str(teacher), student="test_resnet", image_size=32, batch_size=4, epochs=2,
        method="fopro", fpg_every=2, device="cpu", workers=0, seed=3,
    )
    reference = build_run(config, tmp_path / "reference")
    train_epoch(reference, torch.amp.GradScaler("cuda", enabled=False), {"stop": False}, no_progress)

    mirror = build_run(config, tmp_path / "mirror")
    mirror.train_set.set_epoch(0)
    batches = epoch_batches(epoch_order(mirror.train_set.manifest.labels, 0, config.seed, config.balanced_sampler), config.batch_size)
    assert len(batches) == 3  # FPG steps at 0 and 2, a plain step at 1
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    mirror.method.train()
    for step, (images, labels, _) in enumerate(make_loader(mirror, mirror.train_set, batches)):
        warmup = int(config.warmup_epochs * len(batches))
        factor = lr_factor(step, config.epochs * len(batches), warmup)
        train_step(mirror.method, mirror.optimizer, scaler, images, labels, step, seed=config.seed, epoch=0, lr=mirror.lr,
                   lr_factor=factor, adversary=adversary_ramp(step, warmup, len(batches)), grad_clip=config.grad_clip)

    for name, module in reference.method.trainable_state().items():
        other = mirror.method.trainable_state()[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, other[key]), f"{name}.{key} differs: the benchmark step no longer mirrors train_epoch"


def test_reference_loop_and_fopro_on_one_folder(tmp_path):
    """benchmarks/reference_loop.py trains the plain loop and `fopro distill --method none` on the same folder."""
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers import make_image_folder

    root = make_image_folder(tmp_path / "data", {"train": {"a": 6, "b": 4}, "val": {"a": 2, "b": 2}, "test": {"a": 2, "b": 2}}, size=32)
    out = tmp_path / "ref.json"
    command = [sys.executable, str(BENCHMARKS / "reference_loop.py"), "--data", str(root), "--student", "test_resnet",
               "--epochs", "2", "--batch-size", "4", "--image-size", "32", "--threads", "1",
               "--fopro-args", "--augment radiograph --workers 0", "--json-out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["epoch"] for row in result["reference"]["history"]] == [1, 2]
    for name in ("reference", "fopro"):
        best = result[name]["best_val_epoch"]
        assert 0 <= best["val"] <= 1 and 0 <= best["test"] <= 1 and best["epoch"] in (1, 2)
    assert "--augment radiograph" in result["fopro"]["command"] and result["fopro"]["augmentation"].startswith("radiograph")
    assert result["fopro_minus_reference_test_points"] == pytest.approx(
        100 * (result["fopro"]["best_val_epoch"]["test"] - result["reference"]["best_val_epoch"]["test"]), abs=0.01)
    assert "fopro - reference" in done.stdout


def test_reference_balanced_accuracy_is_scikit_learns():
    from sklearn.metrics import balanced_accuracy_score

    from benchmarks.reference_loop import balanced_accuracy

    rng = np.random.default_rng(0)
    labels, predictions = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    assert balanced_accuracy(labels, predictions) == pytest.approx(balanced_accuracy_score(labels, predictions))
