"""What the transfer needs around the methods: `fopro distill --unlabeled` (unlabelled images join the alignment
and FPG terms only, in a deterministic order; the supervised losses skip them; bad uses get one-line errors)
and the teacher probe that every distillation run reports its student against."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fopro.cli import app
from fopro.config import resolve_config
from fopro.data.manifest import UNLABELED
from fopro.distributed import DistEnv
from fopro.errors import FoproError
from fopro.losses import SupervisedLoss
from fopro.schedule import unlabeled_batches
from fopro.run import build_run
from fopro.train import train

from conftest import torch_threads

os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("name", ["balanced_softmax", "ce"])
def test_supervised_losses_skip_unlabelled_images(name):
    generator = torch.Generator().manual_seed(0)
    loss = SupervisedLoss(name, [20, 5, 1])
    logits = torch.randn(7, 3, generator=generator)
    labels = torch.tensor([0, 2, 1, 0, UNLABELED, UNLABELED, UNLABELED])
    shift = loss.log_prior if name == "balanced_softmax" else torch.zeros(3)
    expected = F.cross_entropy(logits[:4] + shift, labels[:4])
    torch.testing.assert_close(loss(logits, labels), expected)


def test_unlabeled_batches_cover_the_pool_and_split_it_between_processes():
    single = unlabeled_batches(10, steps=4, per_step=3, epoch=2, seed=5, env=DistEnv())
    assert [len(b) for b in single] == [3, 3, 3, 3]
    flat = [i for batch in single for i in batch]
    assert sorted(flat[:10]) == list(range(10))  # one pass over the pool before any image repeats
    assert single == unlabeled_batches(10, steps=4, per_step=3, epoch=2, seed=5, env=DistEnv())
    assert single != unlabeled_batches(10, steps=4, per_step=3, epoch=3, seed=5, env=DistEnv())
    # two processes take the halves of the global batch that one process with twice the batch would take
    ranks = [unlabeled_batches(10, steps=4, per_step=3, epoch=2, seed=5, env=DistEnv(rank=r, world_size=2, local_rank=r)) for r in (0, 1)]
    global_batches = unlabeled_batches(10, steps=4, per_step=6, epoch=2, seed=5, env=DistEnv())
    assert [ranks[0][step] + ranks[1][step] for step in range(4)] == global_batches


@pytest.mark.parametrize("method", ["ekd", "fopro"])
def test_each_step_gets_the_labelled_batch_then_the_unlabelled_images(tmp_path, distill_values, distill_data, method):
    values = distill_values(method=method, unlabeled=str(distill_data / "val"), unlabeled_batch=5, prompt_fraction=0.5)
    run = build_run(resolve_config({}, values), tmp_path / "run")
    assert len(run.unlabeled_set) == 16 and any("--unlabeled: 16 images, 5 per step" in note for note in run.notes)
    seen = []
    original = run.method.step

    def spy(images, labels, step):
        seen.append((images.shape[0], labels.clone()))
        if method == "fopro":
            selection = run.method.prompt_selection(labels)
            labelled = int((labels != UNLABELED).sum())
            assert selection[:labelled].sum() == -(-labelled // 2) and selection[labelled:].sum() == 3  # ceil(5 / 2)
        return original(images, labels, step)

    run.method.step = spy
    from fopro.train import train_epoch

    train_epoch(run, torch.amp.GradScaler("cuda", enabled=False), {"stop": False}, lambda *a: None)
    assert seen and all(size == 8 + 5 for size, _ in seen)
    for _, labels in seen:
        assert (labels[:8] >= 0).all() and (labels[8:] == UNLABELED).all()


def test_a_run_with_unlabelled_images_trains_and_reports_them(tmp_path, distill_values, distill_data):
    summary = train(resolve_config({}, distill_values(method="ekd", unlabeled=str(distill_data / "val"))), tmp_path / "run")
    assert summary["unlabeled_images"] == 16
    assert np.isfinite(summary["best_val"]["balanced_accuracy"])
    config = (tmp_path / "run" / "config.json").read_text()
    assert str(distill_data / "val") in config  # saved as an absolute path by the CLI; as given by the library


def test_unlabeled_needs_a_teacher_method(distill_values, distill_data):
    with pytest.raises(FoproError, match="--unlabeled needs a teacher"):
        resolve_config({}, distill_values(method="none", unlabeled=str(distill_data / "val")))
    with pytest.raises(FoproError, match="--unlabeled-batch 0 must be at least 1"):
        resolve_config({}, distill_values(method="ekd", unlabeled=str(distill_data / "val"), unlabeled_batch=0))


def test_cli_names_a_missing_unlabeled_folder(tmp_path, distill_values):
    values = distill_values(method="ekd", epochs=1)
    args = ["distill"]
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(app, [*args, "--unlabeled", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    assert result.exit_code != 0
    assert "--unlabeled" in result.output and "nowhere" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_distill_reports_the_student_next_to_the_teacher_probe(tmp_path, distill_values):
    values = distill_values(method="ekd")
    args = ["distill"]
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "teacher probe (linear classifier on the frozen teacher's embeddings of train" in result.output
    summary = train(resolve_config({}, values), tmp_path / "again")
    probe = summary["teacher_probe"]
    assert set(probe["splits"]) == {"val", "test"} and probe["views"] == 4  # the default preset augments: 4 views
    for split in ("val", "test"):
        assert 0 <= probe["splits"][split]["balanced_accuracy"] <= 1
    assert summary["transfer"]["balanced_accuracy"] == pytest.approx(
        summary["test"]["balanced_accuracy"] / probe["splits"]["test"]["balanced_accuracy"])
    without = train(resolve_config({}, {**values, "teacher_probe": False}), tmp_path / "without")
    assert "teacher_probe" not in without and "transfer" not in without
    assert "teacher_probe" not in train(resolve_config({}, distill_values(method="none")), tmp_path / "none")


def test_probe_distillation_is_the_kl_from_the_probe_to_the_student(tmp_path, distill_values, distill_data):
    run = build_run(resolve_config({}, distill_values(method="ekd", probe_kd=2.0, unlabeled=str(distill_data / "val"))), tmp_path / "run")
    method = run.method
    assert method.probe is run.teacher_probe and not any(p.requires_grad for p in method.probe.parameters())
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=generator)
    target = torch.randn(6, method.teacher.embed_dim, generator=generator)
    p = torch.softmax(method.probe(target), dim=1).double().numpy()
    q = torch.softmax(logits, dim=1).double().numpy()
    terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - np.log(q)), 0.0)  # 0 log 0 = 0
    expected = float(terms.sum(axis=1).mean())
    assert float(method.probe_distillation(logits, target)) == pytest.approx(expected, rel=1e-5)
    images = torch.stack([run.train_set[i][0] for i in range(4)] + [run.unlabeled_set[i][0] for i in range(3)])
    labels = torch.tensor([run.train_set[i][1] for i in range(4)] + [UNLABELED] * 3)
    _, parts = method.step(images, labels, step=0)
    assert parts["probe_kd"] > 0
    with pytest.raises(FoproError, match="--probe-kd distils the teacher probe"):
        resolve_config({}, distill_values(method="none", probe_kd=1.0))


def test_transfer_diagnosis_reports_the_runs_own_val_numbers(tmp_path, distill_values, distill_data):
    import importlib.util

    from sklearn.metrics import balanced_accuracy_score

    spec = importlib.util.spec_from_file_location("transfer_diagnosis", Path(__file__).resolve().parents[1] / "examples" / "transfer_diagnosis.py")
    diagnosis = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnosis)
    runs = {}
    for method in ("none", "ekd"):
        runs[method] = tmp_path / method
        train(resolve_config({}, distill_values(method=method, teacher_probe=False)), runs[method])
    out = tmp_path / "diagnosis"
    assert diagnosis.main(["--data", str(distill_data), "--runs", str(runs["none"]), str(runs["ekd"]), "--out", str(out)]) == 0
    results = json.loads((out / "diagnosis.json").read_text())["results"]
    assert [r["method"] for r in results] == ["none", "ekd"]
    for result, method in zip(results, ("none", "ekd")):
        metrics = [json.loads(line) for line in (runs[method] / "metrics.jsonl").read_text().splitlines()]
        assert result["balanced_accuracy"] == pytest.approx(metrics[-1]["val"]["balanced_accuracy"])  # 1 epoch: best = last
        assert [row["tau"] for row in result["logit_adjustment"]] == list(diagnosis.TAUS)
        assert sum(result["tail_errors"].values()) == pytest.approx(1.0)
    assert set(results[1]["gradients"]["norms"]) == {"sup", "align (x lambda)", "sup_t"}
    assert set(results[0]["gradients"]["norms"]) == {"sup"}
    # the logit-adjusted predictions are scored as scikit-learn scores them
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4]])
    labels, log_prior = np.array([0, 1, 2, 2]), np.log(np.array([0.7, 0.2, 0.1]))
    for row in diagnosis.logit_adjustment(np.log(probs), labels, log_prior, tail=[2]):
        predictions = np.argmax(np.log(probs) - row["tau"] * log_prior, axis=1)
        assert row["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert f"| {runs['none']} | none |" in (out / "diagnosis.md").read_text()
