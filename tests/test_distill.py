"""`fopro distill`: every method end to end on tiny data, the frozen teacher, the FPG step and mask,
determinism, config file / command-line precedence, option errors, run-folder protection, non-finite losses."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fopro.checkpoint import load_checkpoint
from fopro.models.weights import build_model
from fopro.cli import app
from fopro.config import DistillConfig, resolve_config
from fopro.config_files import read_config_file
from fopro.distill import distill
from fopro.errors import FoproError
from fopro.io import LOCK_NAME
from fopro.fpg import FourierPromptGenerator
from fopro.methods import FeatureKD, FoProKD
from fopro.state import load_state
from fopro.run import build_fpg, build_run
from fopro.train import train

from conftest import torch_threads

os.environ["HF_HUB_OFFLINE"] = "1"

TRAINING_ONLY = ("projector", "fc_t", "fpg", "teacher_head", "prompt", "heads")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one intra-op thread (see conftest.torch_threads), restored after this module."""
    with torch_threads(1):
        yield


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _cli_args(values: dict) -> list[str]:
    args = []
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def _error_line(result) -> str:
    """The one-line error a failed command prints on stderr (no traceback)."""
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()  # (progress lines may come first)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tree_bytes(folder: Path) -> dict[str, str]:
    """The files of a run folder by content (the run's lock, held only while it runs, left out)."""
    return {str(p.relative_to(folder)): _sha(p) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _snapshot(*modules: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in modules]


def _unchanged(module: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    state = module.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], snapshot[k]) for k in state)


@pytest.fixture
def captured_teachers(monkeypatch):
    """Record each teacher that train() builds, with a copy of its weights taken at load time."""
    import fopro.run

    seen: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []
    original = fopro.run.load_teacher

    def recording(options, default_image_size):
        teacher, notes = original(options, default_image_size)
        seen.append((teacher, {k: v.detach().clone() for k, v in teacher.model.state_dict().items()}))
        return teacher, notes

    monkeypatch.setattr(fopro.run, "load_teacher", recording)
    return seen


# ------------------------------------------------------------------------------- every method, 1 epoch

METHOD_CASES = {
    "none": dict(method="none"),
    "kd": dict(method="kd"),
    "ekd": dict(method="ekd"),
    "fopro": dict(method="fopro"),
    "fopro-no-akd": dict(method="fopro", adv_weight=0.0),
}
EXPECTED_PARTS = {
    "none": {"sup"},
    "kd": {"sup", "kd"},
    "ekd": {"sup", "kd", "sup_t"},
    "fopro": {"sup", "kd", "sup_t", "fpg", "fpg_explore", "fpg_adv", "fpg_mask"},
    "fopro-no-akd": {"sup", "kd", "sup_t", "fpg", "fpg_explore", "fpg_adv", "fpg_mask"},
}


@pytest.mark.parametrize("case", list(METHOD_CASES))
def test_method_trains_one_epoch_and_writes_the_run(case, tmp_path, distill_values, distill_teacher, captured_teachers):
    config = resolve_config({}, distill_values(**METHOD_CASES[case]))
    teacher_sha = _sha(distill_teacher)
    run_dir = tmp_path / "run"
    summary = train(config, run_dir)

    # files of a run
    for name in ("best.safetensors", "best.json", "last.safetensors", "last.json", "metrics.jsonl", "config.json", "resume.safetensors"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "fpg.safetensors").is_file() == (config.method == "fopro")
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved == config.to_dict()
    assert saved["method"] == config.method and saved["adv_weight"] == config.adv_weight

    records = _metrics(run_dir)
    assert [r["epoch"] for r in records] == [1]
    assert set(records[0]["train"]) == EXPECTED_PARTS[case]
    assert all(math.isfinite(v) for v in records[0]["train"].values())
    assert 0.0 <= records[0]["val"]["balanced_accuracy"] <= 1.0
    assert records[0]["best"] is True

    # the test split was evaluated with the best checkpoint
    assert summary["method"] == config.method and summary["best_epoch"] == 1
    assert summary["test"]["split"] == "test"
    assert summary["test"]["num_samples"] == 16
    assert 0.0 <= summary["test"]["balanced_accuracy"] <= 1.0
    assert summary["best_val"] == records[0]["val"]
    # calibration: a temperature fitted on val, stored with the best checkpoint and applied by the test evaluation
    temperature = summary["calibration"]["temperature"]
    assert temperature > 0 and summary["calibration"]["fitted_on"] == "val"
    assert json.loads((run_dir / "best.json").read_text())["temperature"] == temperature
    assert summary["test"]["calibration"]["temperature"] == temperature
    stored = json.loads((run_dir / "best.json").read_text())["operating_points"]
    assert stored == summary["calibration"]["operating_points"] and set(stored) <= set(summary["classes"])
    applied = summary["test"]["val_operating_points"] or {}
    assert all(op["threshold"] in [s["threshold"] for s in stored[name]] for name, ops in applied.items() for op in ops)

    # checkpoints: the inference path only, loadable with build_model
    model, meta = build_model(run_dir / "last.safetensors")
    weights = load_file(str(run_dir / "last.safetensors"))
    assert set(weights) == set(model.state_dict())
    classifier = {k for k in weights if k.startswith("fc.")}
    if config.method in ("ekd", "fopro"):  # --deploy-head auto: p then fc_t in fc's place
        assert meta.head == "fc_t" and {k.split(".")[1] for k in classifier} == {"projector", "fc_t"}
    else:
        assert meta.head == "fc" and classifier == {"fc.weight", "fc.bias"}
    assert not [k for k in set(weights) - classifier if any(part in k for part in TRAINING_ONLY)]
    assert meta.arch == "test_resnet" and meta.num_classes == 4 and meta.image_size == 32 and meta.epoch == 1
    assert meta.train_counts == summary["train_counts"]
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 4) and torch.isfinite(out).all()
    best, _ = load_checkpoint(run_dir / "best")
    _assert_same_tensors(best, weights)  # one epoch: best is last

    # the frozen teacher: not one bit changed, in memory or on disk
    if config.method == "none":
        assert captured_teachers == [] and summary["teacher"] is None
    else:
        assert len(captured_teachers) == 1
        teacher, before = captured_teachers[0]
        after = teacher.model.state_dict()
        _assert_same_tensors(dict(after), before)
        on_disk = load_file(str(distill_teacher))
        for key, value in after.items():
            assert torch.equal(value, on_disk[key]), key
        assert set(on_disk) - set(after) == {"fc.weight", "fc.bias"}  # the teacher's classifier is not used
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
        assert not teacher.training
        assert _sha(distill_teacher) == teacher_sha


# ------------------------------------------------------------------------------------------ the FPG step


def _batch(run, n: int = 8):
    items = [run.train_set[i] for i in range(n)]
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[1] for item in items])
    return images, labels


def _fopro_run(tmp_path, values: dict):
    """A fopro run (method in train mode) and one batch of it."""
    run = build_run(resolve_config({}, values), tmp_path / "run")
    run.method.train()
    images, labels = _batch(run)
    return run, images, labels


def _parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _same_parameters(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[k]) for k, p in module.named_parameters())


def test_fopro_step_updates_the_fpg_and_the_student_learns_on_the_prompted_images(tmp_path, distill_values):
    run, images, labels = _fopro_run(tmp_path, distill_values(method="fopro", fpg_lr=0.01))
    method = run.method
    assert isinstance(method, FoProKD)
    student, heads, fpg, teacher_head = (_parameters(m) for m in (method.student, method.heads, method.fpg, method.teacher_head))
    teacher = _snapshot(method.teacher)[0]
    seen = []
    original_forward = method.student_forward
    method.student_forward = lambda x: (seen.append(x.detach().clone()), original_forward(x))[1]
    method.set_schedule(1.0, 1.0)
    with torch.no_grad():
        expected_input = method.fpg(images)[0]  # the FPG's prompt before this step's update
    loss, parts = method.step(images, labels, step=0)
    del method.student_forward
    assert {"fpg", "fpg_explore", "fpg_adv", "fpg_mask", "sup", "kd", "sup_t"} <= set(parts)
    assert len(seen) == 1, "one student forward serves both objectives"
    torch.testing.assert_close(seen[0], expected_input)
    # the FPG step moved the FPG and h_t, and put no gradient on the student, its heads or the teacher
    assert not _same_parameters(method.fpg, fpg) and not _same_parameters(method.teacher_head, teacher_head)
    assert _same_parameters(method.student, student) and _same_parameters(method.heads, heads)
    assert all(p.grad is None for p in list(method.student.parameters()) + list(method.heads.parameters()))
    assert _unchanged(method.teacher, teacher) and all(p.grad is None for p in method.teacher.parameters())
    # the student's own step moves the student only
    fpg_after, head_after = _parameters(method.fpg), _parameters(method.teacher_head)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    assert _same_parameters(method.fpg, fpg_after) and _same_parameters(method.teacher_head, head_after)
    assert not _same_parameters(method.student, student)
    optimised = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in list(method.fpg.parameters()) + list(method.teacher_head.parameters())}


def test_fpg_gradient_equals_direct_autograd_of_its_objective(tmp_path, distill_values, monkeypatch):
    """The FPG gradient carried by hand through the cut at x~ equals autograd on one uncut graph of L_fpg."""
    import fopro.methods

    run, images, labels = _fopro_run(tmp_path, distill_values(method="fopro", fpg_strength=0.6))
    method = run.method
    method.eval()  # BatchNorm on running statistics: the two computations see the same function
    with torch.no_grad():
        for p in method.fpg.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    monkeypatch.setattr(fopro.methods, "FPG_GRAD_CLIP", 1e9)
    monkeypatch.setattr(method.fpg_optimizer, "step", lambda: None)
    alpha = 0.7
    method.config.adv_weight = alpha
    method.set_schedule(1.0, 1.0)
    method.step(images, labels, step=0)
    carried = [p.grad.clone() for p in method.fpg.parameters()]

    method.fpg.zero_grad(set_to_none=True)
    prompted, mask = method.fpg(images)
    embedding = method.teacher(prompted)
    features, _ = method.student_forward(prompted)
    projected, _ = method.heads(features)
    explore = torch.nn.functional.cross_entropy(method.teacher_head(embedding) + method.sup_loss.log_prior, labels)
    adversarial = (2 - 2 * torch.nn.functional.cosine_similarity(projected, embedding, dim=1)).mean()
    objective = explore - alpha * adversarial + method.config.fpg_reg * (mask - 1).pow(2).mean()
    direct = torch.autograd.grad(objective, list(method.fpg.parameters()))
    assert any(g.abs().sum() > 0 for g in direct)
    for got, want in zip(carried, direct):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_adversary_ramps_in_and_the_fpg_rate_follows_the_schedule(tmp_path, distill_values):
    from fopro.schedule import adversary_ramp

    assert adversary_ramp(0, 10, 32) == 0.0 and adversary_ramp(16, 10, 32) == 0.5 and adversary_ramp(99, 10, 32) == 1.0
    assert adversary_ramp(50, 64, 32) == pytest.approx(50 / 64)
    run, images, labels = _fopro_run(tmp_path, distill_values(method="fopro", fpg_lr=0.02))
    method = run.method
    method.set_schedule(0.25, 0.0)  # in the warm-up: h_t learns, no adversary yet
    with torch.no_grad():
        for p in method.fpg.parameters():
            p.add_(0.1)  # a mask away from 1, so that the regulariser is not 0
    penalty = _mask_penalty(method, images)  # before the step updates the FPG
    _, parts = method.step(images, labels, step=0)
    assert penalty > 0
    assert float(parts["fpg"]) == pytest.approx(float(parts["fpg_explore"] + method.config.fpg_reg * penalty), abs=1e-6)
    assert method.fpg_optimizer.param_groups[0]["lr"] == pytest.approx(0.02 * 0.25)


def _mask_penalty(method, images) -> float:
    with torch.no_grad():
        return float((method.fpg.mask(images) - 1).pow(2).mean())


def test_prompt_fraction_keeps_the_rest_of_the_batch_clean(tmp_path, distill_values):
    run, images, labels = _fopro_run(tmp_path, distill_values(method="fopro", prompt_fraction=0.5))
    method = run.method
    with torch.no_grad():
        for p in method.fpg.parameters():
            p.add_(0.5)
    seen = []
    original_forward = method.student_forward
    method.student_forward = lambda x: (seen.append(x.detach().clone()), original_forward(x))[1]
    method.step(images, labels, step=1)
    assert torch.equal(seen[0][4:], images[4:])
    assert not torch.allclose(seen[0][:4], images[:4])


def test_fpg_step_runs_every_k_steps(tmp_path, distill_values):
    run, images, labels = _fopro_run(tmp_path, distill_values(method="fopro", fpg_every=2))
    method = run.method
    fpg, teacher_head = _parameters(method.fpg), _parameters(method.teacher_head)
    _, parts = method.step(images, labels, step=1)  # not due
    assert not any(k.startswith("fpg") for k in parts)
    assert _same_parameters(method.fpg, fpg) and _same_parameters(method.teacher_head, teacher_head)
    method.step(images, labels, step=2)  # due
    assert not _same_parameters(method.fpg, fpg)


def test_fpg_is_the_identity_at_init(distill_values):
    config = resolve_config({}, distill_values(method="fopro"))
    fpg = build_fpg(config)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompted, mask = fpg(x)
    assert torch.equal(mask, torch.ones_like(mask))
    reference = np.clip(np.fft.ifft2(np.fft.fft2(x.double().numpy(), axes=(-2, -1)), axes=(-2, -1)).real, 0, 1)
    np.testing.assert_allclose(prompted.detach().numpy(), reference, atol=1e-5)
    np.testing.assert_allclose(prompted.detach().numpy(), x.numpy(), atol=1e-5)  # x~ == x


# -------------------------------------------------------------------- a 2-epoch fopro run, twice: same bits


@pytest.fixture(scope="module")
def twin_runs(fopro_two_epoch_run, tmp_path_factory) -> tuple[Path, Path]:
    """The session's straight 2-epoch fopro run, and the same options (seed 0) run again in another folder."""
    values, first = fopro_two_epoch_run
    second = tmp_path_factory.mktemp("twin") / "run"
    train(resolve_config({}, values), second)
    return first, second


def test_same_seed_gives_bit_identical_weights(twin_runs):
    a, b = twin_runs
    for name in ("last.safetensors", "best.safetensors", "fpg.safetensors"):
        _assert_same_tensors(load_file(str(a / name)), load_file(str(b / name)))
    state_a, state_b = load_state(a / "resume.safetensors"), load_state(b / "resume.safetensors")
    for module in ("student", "heads", "fpg", "teacher_head"):
        _assert_same_tensors(state_a["modules"][module], state_b["modules"][module])
    strip = lambda records: [{k: v for k, v in r.items() if k != "images_per_second"} for r in records]  # noqa: E731
    assert strip(_metrics(a)) == strip(_metrics(b))
    assert [r["epoch"] for r in _metrics(a)] == [1, 2]


def test_the_seed_sets_init_and_data_order(tmp_path, distill_values):
    """The bit-identical check above is not vacuous: another seed starts from other weights and another order."""
    from fopro.schedule import epoch_order

    runs = [build_run(resolve_config({}, distill_values(seed=seed)), tmp_path / str(seed)) for seed in (0, 0, 1)]
    states = [run.method.student.state_dict() for run in runs]
    _assert_same_tensors(states[0], states[1])
    assert any(not torch.equal(states[0][k], states[2][k]) for k in states[0] if states[0][k].is_floating_point())
    labels = runs[0].train_set.manifest.labels
    assert np.array_equal(epoch_order(labels, 1, 0, False), epoch_order(labels, 1, 0, False))
    assert not np.array_equal(epoch_order(labels, 1, 0, False), epoch_order(labels, 1, 1, False))
    assert not np.array_equal(epoch_order(labels, 0, 0, False), epoch_order(labels, 1, 0, False))


def test_trained_fpg_mask_is_bounded_and_symmetric(twin_runs, distill_data):
    run_dir = twin_runs[0]
    config = json.loads((run_dir / "config.json").read_text())
    eps = config["fpg_strength"]
    fpg = FourierPromptGenerator(config["image_size"], mode=config["fpg_mode"], strength=eps, hidden=config["fpg_hidden"])
    fpg.load_state_dict(load_file(str(run_dir / "fpg.safetensors")), strict=True)
    from fopro.data import ImageDataset, load_splits
    from fopro.data import DataOptions

    splits = load_splits(DataOptions(data=Path(distill_data)))
    val = ImageDataset(splits["val"], 32)
    x = torch.stack([val[i][0] for i in range(8)])
    with torch.no_grad():
        prompted, mask = fpg(x)
    m = mask.double().numpy()
    assert m.shape == (8, 1, 32, 32)
    assert not np.all(m == 1.0), "the FPG did not move in 2 epochs"
    assert m.min() >= 1 - eps - 1e-6 and m.max() <= 1 + eps + 1e-6
    assert np.abs(m - 1).max() > 0.01
    n = 32
    mirror = (-np.arange(n)) % n
    np.testing.assert_array_equal(m, m[..., mirror[:, None], mirror[None, :]])  # M[k] == M[-k]
    spectrum = np.fft.ifft2(m * np.fft.fft2(x.double().numpy(), axes=(-2, -1)), axes=(-2, -1))
    assert np.abs(spectrum.imag).max() < 1e-6  # a symmetric real mask keeps images real
    np.testing.assert_allclose(prompted.numpy(), np.clip(spectrum.real, 0, 1), atol=1e-5)


# ----------------------------------------------------------------- config file, command line, precedence

def _write_config(path: Path, values: dict) -> Path:
    if path.suffix == ".toml":
        lines = []
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        path.write_text("\n".join(lines) + "\n")
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_config_file_then_command_line(suffix, tmp_path, distill_values, runner):
    file_values = distill_values(method="none", epochs=2, lr=0.01)
    file_values["batch-size"] = file_values.pop("batch_size")  # dashes work too
    path = _write_config(tmp_path / f"run{suffix}", file_values)
    read = read_config_file(path)
    assert read["epochs"] == 2 and read["lr"] == 0.01 and read["batch_size"] == 8
    config = resolve_config(read, {"lr": 0.001})
    assert (config.epochs, config.lr, config.batch_size) == (2, 0.001, 8)
    assert config.weight_decay == DistillConfig().weight_decay  # untouched: the default

    out = tmp_path / "out"
    if suffix == ".yaml":
        summary = distill({"lr": 0.001, "out": str(out)}, config_file=path)
        assert summary["epochs"] == 2
    else:  # through the command line: options left at their defaults must not override the file
        result = runner.invoke(app, ["distill", "--config", str(path), "--lr", "0.001", "--out", str(out), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["epochs"] == 2
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["lr"] == 0.001 and saved["batch_size"] == 8
    assert saved["out"] == str(out)
    assert [r["epoch"] for r in _metrics(out)] == [1, 2]
    assert load_checkpoint(out / "last")[1].config["lr"] == 0.001


def test_config_unknown_keys_suggest_the_close_name(tmp_path, runner, distill_values):
    path = _write_config(tmp_path / "bad.yaml", {"epoch": 2, "batchsize": 8, "lr": 0.01})
    with pytest.raises(FoproError) as err:
        read_config_file(path)
    message = str(err.value)
    assert str(path) in message
    assert "epoch (did you mean epochs?)" in message
    assert "batchsize (did you mean batch_size?)" in message
    assert "lr" not in message.split("unknown key(s):")[1].replace("(did you mean", "")

    toml = tmp_path / "bad.toml"
    toml.write_text('learning_rate = 0.1\nseeed = 3\n')
    with pytest.raises(FoproError, match=r"seeed \(did you mean seed\?\)"):
        read_config_file(toml)

    result = runner.invoke(app, ["distill", "--config", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "did you mean epochs?" in _error_line(result)
    assert not (tmp_path / "out").exists()


def test_config_file_errors(tmp_path):
    with pytest.raises(FoproError, match="does not exist"):
        read_config_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.toml"
    broken.write_text("epochs = = 2\n")
    with pytest.raises(FoproError, match="not valid TOML"):
        read_config_file(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(FoproError, match="mapping"):
        read_config_file(listing)
    with pytest.raises(FoproError, match="--epochs 0 must be at least 1"):
        resolve_config(read_config_file(_write_config(tmp_path / "zero.yaml", {"epochs": 0})), {})
    with pytest.raises(FoproError, match="epochs .* wrong type"):
        resolve_config({"epochs": "many"}, {})


@pytest.mark.parametrize(
    "args, option",
    [
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--lr", "0"], "--lr"),
        (["--imbalance", "1.5"], "--imbalance"),
        (["--method", "distil"], "--method"),
        (["--loss", "focal"], "--loss"),
    ],
)
def test_bad_option_values_exit_2_with_one_line(args, option, tmp_path, runner, distill_values):
    out = tmp_path / "out"
    base = distill_values(epochs=1)
    result = runner.invoke(app, ["distill", *_cli_args(base), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    assert result.stderr.strip() == line  # nothing else: the options are checked before any work
    assert option in line and args[1] in line, line
    assert not out.exists()


def test_output_folder_with_a_run_is_not_overwritten(tmp_path, runner, distill_values):
    out = tmp_path / "out"
    args = ["distill", *_cli_args(distill_values(method="none")), "--out", str(out)]
    first = runner.invoke(app, [*args, "--json"])
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["run_dir"] == str(out)
    before = _tree_bytes(out)
    assert "last.safetensors" in before

    again = runner.invoke(app, args)
    assert again.exit_code == 2
    line = _error_line(again)
    assert "--overwrite" in line and "--resume" in line and str(out) in line
    assert _tree_bytes(out) == before

    with pytest.raises(FoproError, match="already holds a run"):
        train(resolve_config({}, distill_values(method="none")), out)
    assert _tree_bytes(out) == before

    replaced = runner.invoke(app, [*args, "--overwrite", "--seed", "5"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((out / "config.json").read_text())["seed"] == 5


# ------------------------------------------------------------------------------------ non-finite losses


def test_huge_lr_stops_with_a_clear_error_and_no_nan_weights(tmp_path, distill_values):
    out = tmp_path / "out"
    config = resolve_config({}, distill_values(method="none", lr=1e30, warmup_epochs=0))
    with pytest.raises(FoproError) as err:
        train(config, out)
    message = str(err.value)
    assert "non-finite loss" in message and "--lr" in message and str(out) in message
    for path in out.glob("*.safetensors"):  # nothing finished: nothing written, and never NaN weights
        assert all(torch.isfinite(t).all() for t in load_file(str(path)).values() if t.is_floating_point())
    assert not (out / "last.safetensors").exists()


def test_nan_loss_keeps_the_last_good_checkpoint(tmp_path, runner, distill_values, monkeypatch):
    out = tmp_path / "out"
    steps_per_epoch = 31 // 8
    calls = {"n": 0, "snapshot": None}
    original = FeatureKD.step

    def poisoned(self, images, labels, step):
        calls["n"] += 1
        loss, parts = original(self, images, labels, step)
        if calls["n"] == steps_per_epoch + 2:  # epoch 2, step 2: after a good epoch and a good step
            calls["snapshot"] = _tree_bytes(out)
            loss = loss * float("nan")
            parts = {**parts, "sup": float("nan")}
        return loss, parts

    monkeypatch.setattr(FeatureKD, "step", poisoned)
    result = runner.invoke(app, ["distill", *_cli_args(distill_values(method="ekd", epochs=3)), "--out", str(out)])
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    assert "non-finite loss at epoch 2, step 2" in line and "--lr" in line
    assert calls["snapshot"] is not None and "last.safetensors" in calls["snapshot"]
    assert _tree_bytes(out) == calls["snapshot"]  # the good epoch-1 files, byte for byte
    assert [r["epoch"] for r in _metrics(out)] == [1]
    for name in ("last.safetensors", "best.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(out / name)).values() if t.is_floating_point())
    state = load_state(out / "resume.safetensors")
    assert state["epoch"] == 1 and state["step"] == 0
    assert all(torch.isfinite(t).all() for t in state["modules"]["student"].values() if t.is_floating_point())


def test_a_non_finite_fpg_loss_leaves_the_fpg_and_teacher_head_unchanged(tmp_path, distill_values):
    run, images, labels = _fopro_run(tmp_path, distill_values(method="fopro"))
    method = run.method
    fpg, teacher_head = _snapshot(method.fpg, method.teacher_head)
    with torch.no_grad():
        method.teacher_head.bias[0] = float("nan")  # makes the explore term, hence L_fpg, NaN
    teacher_head["bias"] = method.teacher_head.bias.detach().clone()
    _, parts = method.step(images, labels, step=0)
    assert math.isnan(parts["fpg"])
    assert _unchanged(method.fpg, fpg), "a NaN FPG loss updated the FPG"
    assert torch.equal(method.teacher_head.weight.detach(), teacher_head["weight"])
