"""`fopro probe`: the band transform, the NCM / k-NN scores vs scikit-learn, a real frequency effect on the
synthetic data, probe.json / probe.png, the learned-FPG view, band_gains_from_probe and the CLI errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import fopro.probe.fpg_report as fpg_report
import fopro.probe.frequency as frequency_probe
from fopro.cli import app
from fopro.config import DistillConfig
from fopro.data import DataOptions
from fopro.data.synth import SynthConfig, generate_synth
from fopro.errors import FoproError
from fopro.fourier import band_edges, band_masks, scale_band, symmetrize
from fopro.fpg import FourierPromptGenerator
from fopro.models.teacher import Teacher, TeacherOptions
from fopro.preprocess import Preprocess
from fopro.probe.crossval import cross_val_predictions, discriminability, knn_neighbours, stratified_folds
from fopro.probe.file import band_gains_from_probe
from fopro.probe.fpg_report import load_run_fpg, probe_fpg
from fopro.probe.frequency import probe_transform, run_probe
from fopro.probe.options import ProbeOptions, check_options

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
S = 32
FINE_CLASS = "c1_dysplastic_nevus_like"  # the fine-texture partner of c0_nevus_like (synth frequency pair), rare in train


def _laplacian(x: torch.Tensor) -> torch.Tensor:
    return 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]


class HighFrequencyEnergy(nn.Module):
    """A fixed 'teacher': log energy of the bi-Laplacian (response ~ |f|^4) in the image centre, per channel,
    and the mean colour. It sees fine texture, hardly coarse texture."""

    num_features = 6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        energy = _laplacian(_laplacian(x))[..., 6:-6, 6:-6].pow(2).mean(dim=(-2, -1))
        return torch.cat([torch.log(energy + 1e-6), x.mean(dim=(-2, -1))], dim=1)


def hand_teacher() -> Teacher:
    return Teacher(HighFrequencyEnergy(), Preprocess(S, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), "hand-made high-pass energy")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    """2 target classes differing only in texture frequency; train 30 / 6 (class 1 is tail), val 16 / 16."""
    root = tmp_path_factory.mktemp("synth")
    summary = generate_synth(root, SynthConfig(num_classes=2, image_size=S, imbalance=0.2, max_per_class=30,
                                               val_per_class=16, test_per_class=1, public_classes=2,
                                               public_per_class=1, public_val_per_class=1, seed=0))
    assert summary["frequency_pairs"] == [[FINE_CLASS, "c0_nevus_like"]]
    return root / "target"


@pytest.fixture(scope="module")
def probed(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    calls = []
    original = frequency_probe.scale_band

    def spy(x, edges, band, gain):
        calls.append((tuple(map(tuple, edges)), band, gain))
        return original(x, edges, band, gain)

    frequency_probe.scale_band = spy
    try:
        result = run_probe(TeacherOptions("hand-made"), DataOptions(data=synth), ProbeOptions(bands=2, gains="0,1,2"),
                           out_dir=out, teacher=hand_teacher())
    finally:
        frequency_probe.scale_band = original
    return result, out, calls


# ------------------------------------------------------------------------------------------ the transform


def test_gain_one_returns_the_image_unchanged():
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    edges = band_edges(4)
    for band in range(4):
        assert probe_transform(x, edges, band, 1.0) is x
        torch.testing.assert_close(scale_band(x, edges, band, 1.0), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("log", [False, True])
def test_transform_is_fourier_scale_band(log):
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    edges = band_edges(3, log=log)
    for band in range(3):
        for gain in (0.0, 0.5, 2.0):
            assert torch.equal(probe_transform(x, edges, band, gain), scale_band(x, edges, band, gain))
    removed = probe_transform(x, edges, 2, 0.0)
    amplitude = torch.fft.fft2(removed - removed.mean()).abs()  # sanity: little energy left in the removed band
    assert float((amplitude * band_masks(S, S, edges)[2]).sum()) < float((torch.fft.fft2(x).abs() * band_masks(S, S, edges)[2]).sum())


def test_the_probe_transforms_with_scale_band(probed):
    result, _, calls = probed
    edges = tuple(map(tuple, band_edges(2)))
    conditions = {(band, gain) for _, band, gain in calls}
    assert conditions == {(0, 0.0), (0, 2.0), (1, 0.0), (1, 2.0)}  # gain 1 is never transformed
    assert all(e == edges for e, _, _ in calls)
    ones = [r for r in result["results"] if r["gain"] == 1.0]
    assert len(ones) == 2
    for row in ones:
        assert row["cosine"] == pytest.approx(1.0)
        assert row["balanced_accuracy"] == result["clean"]["balanced_accuracy"]


# ------------------------------------------------------------------------------------------ classifiers vs sklearn


def _clusters(seed=0, counts=(25, 15, 12, 7), dim=16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (len(counts), dim)) + 3.0
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return centres[labels] + rng.normal(0, 1.2, (len(labels), dim)), labels


def _cl2n(train, test):
    mean = train.mean(axis=0, keepdims=True)
    norm = lambda a: (a - mean) / np.linalg.norm(a - mean, axis=1, keepdims=True)  # noqa: E731
    return norm(train), norm(test)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ncm_and_knn_match_sklearn(seed):
    from sklearn.metrics import balanced_accuracy_score, recall_score
    from sklearn.neighbors import KNeighborsClassifier, NearestCentroid

    x, y = _clusters(seed)
    folds = stratified_folds(y, 5, seed)
    for c in range(4):  # stratified: each class spread evenly over the folds
        per_fold = np.bincount(folds[y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    k = knn_neighbours(y, 5, 5)
    assert k == 5
    assert knn_neighbours(np.array([0, 0, 0, 1, 1, 1]), 3, 5) == 2  # tiny classes: fewer neighbours
    ref_ncm, ref_knn = np.empty_like(y), np.empty_like(y)
    for fold in range(5):
        train, test = folds != fold, folds == fold
        a, b = _cl2n(x[train], x[test])
        ref_ncm[test] = NearestCentroid().fit(a, y[train]).predict(b)
        ref_knn[test] = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(a, y[train]).predict(b)
    assert np.array_equal(cross_val_predictions(x, y, folds, "ncm"), ref_ncm)
    assert np.array_equal(cross_val_predictions(x, y, folds, "knn", k), ref_knn)
    scores = discriminability(x, y, folds, k, 4, tail=[2, 3])
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, ref_ncm))
    assert scores["knn_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, ref_knn))
    assert scores["tail_balanced_accuracy"] == pytest.approx(recall_score(y, ref_ncm, average=None)[[2, 3]].mean())
    assert scores["knn_tail_balanced_accuracy"] == pytest.approx(recall_score(y, ref_knn, average=None)[[2, 3]].mean())
    assert 0.3 < scores["balanced_accuracy"] < 1.0  # not a trivial case


# ------------------------------------------------------------------------------------------ the real effect


def test_removing_high_frequencies_hurts_the_fine_texture_classes(probed):
    result, _, _ = probed
    clean = result["clean"]
    assert result["tail"]["classes"] == [FINE_CLASS]
    assert clean["balanced_accuracy"] >= 0.7
    removed = next(r for r in result["results"] if r["band"] == 1 and r["gain"] == 0.0)
    assert removed["balanced_accuracy"] <= clean["balanced_accuracy"] - 0.15
    assert removed["delta_balanced_accuracy"] <= -0.15
    assert removed["delta_tail_balanced_accuracy"] <= -0.15
    assert removed["knn_balanced_accuracy"] <= clean["knn_balanced_accuracy"] - 0.15
    assert removed["cosine"] < 0.99
    assert result["preference"]["relies_most_on"] == 1
    assert result["preference"]["removal_hurts"][0]["band"] == 1
    assert "band 1 (0.50-1.00 of Nyquist)" in result["verdict"]


def test_probe_json_schema_and_png(probed):
    result, out, _ = probed
    data = json.loads((out / "probe.json").read_text())
    assert (out / "probe.png").read_bytes()[:8] == PNG_MAGIC
    assert data["bands"] == [[0.0, 0.5], [0.5, 1.0]]
    assert data["gains"] == [0.0, 1.0, 2.0]
    assert data["split"] == "val" and data["num_images"] == 32 and data["image_size"] == S
    assert data["teacher"]["teacher"] == "hand-made"
    for key in ("balanced_accuracy", "tail_balanced_accuracy", "knn_balanced_accuracy", "knn_tail_balanced_accuracy"):
        assert isinstance(data["clean"][key], float)
    assert len(data["results"]) == 2 * 3
    for row in data["results"]:
        for key in ("band", "gain", "cosine", "balanced_accuracy", "tail_balanced_accuracy", "knn_balanced_accuracy",
                    "knn_tail_balanced_accuracy", "delta_balanced_accuracy", "delta_tail_balanced_accuracy",
                    "per_class_recall", "range"):
            assert key in row, key
        assert row["delta_balanced_accuracy"] == pytest.approx(row["balanced_accuracy"] - data["clean"]["balanced_accuracy"])
    assert set(data["preference"]) >= {"amplify_helps", "removal_hurts", "diminish_helps", "suggested_gains", "per_band"}
    assert isinstance(data["verdict"], str) and "\n" not in data["verdict"]
    assert sum(data["band_energy"]) == pytest.approx(1.0)
    assert data == json.loads(json.dumps(result))


def test_no_train_split_gives_null_tail(tmp_path, synth):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synth / "val", root / "val")
    result = run_probe(TeacherOptions("hand-made"), DataOptions(data=root), ProbeOptions(bands=1, gains="0", per_class=6),
                       teacher=hand_teacher())
    assert result["num_images"] == 12
    assert result["clean"]["tail_balanced_accuracy"] is None and result["tail"]["classes"] is None
    assert any("no train split" in note for note in result["notes"])


# ------------------------------------------------------------------------------------------ bad options


@pytest.mark.parametrize("changes,option", [
    ({"bands": 0}, "--bands"), ({"bands": "x"}, "--bands"), ({"bands": -2}, "--bands"), ({"bands": 1000}, "--bands"),
    ({"gains": ""}, "--gains"), ({"gains": []}, "--gains"), ({"gains": "0,abc"}, "--gains"), ({"gains": "-1,2"}, "--gains"),
    ({"gains": "nan"}, "--gains"), ({"gains": "0,,2"}, "--gains"), ({"per_class": 1}, "--per-class"),
])
def test_bad_band_and_gain_lists(changes, option):
    with pytest.raises(FoproError, match=option):
        check_options(ProbeOptions(**changes))


def test_log_bands_too_fine_for_the_image(synth):
    with pytest.raises(FoproError, match="--bands 12 --log-bands"):
        run_probe(TeacherOptions("hand-made"), DataOptions(data=synth), ProbeOptions(bands=12, log_bands=True),
                  teacher=hand_teacher())


@pytest.mark.parametrize("args,fragment", [
    (["--bands", "0"], "--bands"), (["--bands", "many"], "--bands"), (["--gains", "-1"], "--gains"),
    (["--gains", ""], "--gains"), (["--gains", "0,x"], "--gains"),
])
def test_cli_bad_bands_and_gains(synth, args, fragment):
    result = CliRunner().invoke(app, ["probe", "--teacher", "resnet18", "--data", str(synth), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fragment in result.stderr


def test_cli_needs_teacher_or_fpg(synth):
    result = CliRunner().invoke(app, ["probe", "--data", str(synth)])
    assert result.exit_code == 2 and "--teacher" in result.stderr and "--fpg" in result.stderr


def test_cli_end_to_end_with_a_checkpoint_teacher(synth, tmp_path):
    from helpers import tiny_checkpoint

    ckpt, _ = tiny_checkpoint(tmp_path / "teacher.safetensors", ["a", "b"], arch="test_resnet", image_size=S)
    out = tmp_path / "out"
    args = ["probe", "--teacher", str(ckpt), "--data", str(synth), "--bands", "2", "--gains", "0,2", "--per-class", "6",
            "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_images"] == 12 and len(data["results"]) == 4
    assert (out / "probe.png").read_bytes()[:8] == PNG_MAGIC and (out / "probe.json").is_file()
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0, shown.output
    assert "x0 (removed)" in shown.stdout and data["verdict"][:30] in shown.stdout.replace("\n", "")


# ------------------------------------------------------------------------------------------ learned FPG


def _fake_run(root: Path, mode: str = "both", seed: int = 0, teacher: str = "hand-made") -> FourierPromptGenerator:
    torch.manual_seed(seed)
    fpg = FourierPromptGenerator(S, mode=mode, strength=0.5, hidden=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if fpg.prompt is not None:
            fpg.prompt.copy_(2.0 * torch.randn(fpg.prompt.shape, generator=g))
        if fpg.net is not None:
            fpg.net[-1].weight.copy_(0.1 * torch.randn(fpg.net[-1].weight.shape, generator=g))
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in fpg.state_dict().items()}, str(root / "fpg.safetensors"))
    config = DistillConfig(method="fopro", fpg_mode=mode, fpg_strength=0.5, fpg_hidden=4, image_size=S, teacher=teacher)
    (root / "config.json").write_text(json.dumps(config.to_dict()))
    return fpg


def test_load_run_fpg_roundtrip_and_errors(tmp_path):
    fpg = _fake_run(tmp_path / "run")
    loaded = load_run_fpg(tmp_path / "run")
    x = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded.mask(x), fpg.mask(x))
    assert not torch.equal(loaded.mask(x), torch.ones_like(loaded.mask(x)))
    with pytest.raises(FoproError, match="not a folder"):
        load_run_fpg(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FoproError, match="config.json"):
        load_run_fpg(tmp_path / "empty")
    (tmp_path / "run" / "fpg.safetensors").unlink()
    with pytest.raises(FoproError, match="fpg.safetensors"):
        load_run_fpg(tmp_path / "run")
    _fake_run(tmp_path / "other", mode="dataset")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    config["fpg_mode"] = "both"
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FoproError, match="does not match"):
        load_run_fpg(tmp_path / "other")


def test_probe_fpg_writes_mask_plot_and_json(tmp_path, synth, probed):
    _, probe_out, _ = probed
    fpg = _fake_run(tmp_path / "run", mode="dataset", teacher="another-teacher")
    out = tmp_path / "fpg_out"
    result = probe_fpg(tmp_path / "run", DataOptions(data=synth), ProbeOptions(bands=4, per_class=5), out,
                       probe_json=probe_out / "probe.json")
    assert (out / "fpg_mask.png").read_bytes()[:8] == PNG_MAGIC
    data = json.loads((out / "fpg.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert data["num_images"] == 10 and data["bands"] == [[0.0, 0.5], [0.5, 1.0]]  # the probe's bands
    # a dataset prompt does not depend on the image: the profile is the band mean of 1 + s tanh(sym(prompt)), 1 at DC
    mask = (1 + 0.5 * torch.tanh(symmetrize(fpg.prompt.detach())))[0, 0].double()
    mask[0, 0] = 1.0
    masks = band_masks(S, S, band_edges(2)).double()
    expected = ((masks * mask).sum(dim=(1, 2)) / masks.sum(dim=(1, 2))).tolist()
    assert [b["mean_gain"] for b in data["radial_profile"]] == pytest.approx(expected)
    assert {b["direction"] for b in data["radial_profile"]} <= {"amplified", "diminished", "unchanged"}
    assert data["probe"]["suggested_gains"] == json.loads((probe_out / "probe.json").read_text())["preference"]["suggested_gains"]
    assert any("another-teacher" in note for note in data["notes"])
    assert 0.5 <= data["mask"]["min"] <= data["mask"]["max"] <= 1.5


def test_cli_fpg(tmp_path, synth):
    _fake_run(tmp_path / "run", mode="both")
    result = CliRunner().invoke(app, ["probe", "--fpg", str(tmp_path / "run"), "--data", str(synth), "--bands", "4",
                                      "--per-class", "4"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "fpg_mask.png").read_bytes()[:8] == PNG_MAGIC  # default: written into RUN_DIR
    data = json.loads((tmp_path / "run" / "fpg.json").read_text())
    assert len(data["radial_profile"]) == 4 and data["probe"] is None
    assert "Mean FPG gain per frequency band" in result.stdout
    bad = CliRunner().invoke(app, ["probe", "--fpg", str(tmp_path / "nowhere"), "--data", str(synth)])
    assert bad.exit_code == 2 and "Traceback" not in bad.output and "--fpg" in bad.stderr


def test_probe_fpg_without_data_options_uses_the_runs_data(tmp_path, synth):
    _fake_run(tmp_path / "run", mode="dataset")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["data"] = str(synth)
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    result = probe_fpg(tmp_path / "run", DataOptions(), ProbeOptions(bands=2, per_class=3), tmp_path / "out")
    assert result["num_images"] > 0 and any(f"the run's own ({synth})" in note for note in result["notes"])


# ------------------------------------------------------------------------------------------ probe.json -> gains


def _row(band, gain, delta):
    return {"band": band, "gain": gain, "delta_balanced_accuracy": delta, "delta_tail_balanced_accuracy": None,
            "delta_knn_balanced_accuracy": None, "cosine": 0.9}


def test_band_gains_from_probe(tmp_path):
    results = [_row(0, 0.0, -0.10), _row(0, 0.5, -0.02), _row(0, 2.0, 0.05),   # amplification helps -> 2
               _row(1, 0.0, 0.03), _row(1, 0.5, 0.01), _row(1, 2.0, -0.04),    # removal helps -> 0
               _row(2, 0.0, 0.002), _row(2, 0.5, -0.004), _row(2, 2.0, 0.005)]  # below min_effect -> 1
    path = tmp_path / "probe.json"
    path.write_text(json.dumps({"bands": band_edges(3), "gains": [0.0, 0.5, 2.0], "results": results, "log_bands": False,
                                "preference": {"min_effect": 0.01}}))
    edges, gains = band_gains_from_probe(path)
    assert edges == band_edges(3) and gains == [2.0, 0.0, 1.0]
    edges6, gains6 = band_gains_from_probe(path, n_bands=6)
    assert edges6 == band_edges(6) and gains6 == [2.0, 2.0, 0.0, 0.0, 1.0, 1.0]
    fpg = FourierPromptGenerator(S, mode="dataset", strength=0.5)
    fpg.init_from_band_gains(edges, gains)
    x = torch.rand(1, 3, S, S)
    profile = fpg_report.radial_profile(fpg.mean_mask(x), edges)
    assert profile[0] > 1.4 and profile[1] < 0.6 and profile[2] == pytest.approx(1.0)
    with pytest.raises(FoproError, match="--probe-init"):
        band_gains_from_probe(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(FoproError, match="not a probe.json"):
        band_gains_from_probe(tmp_path / "bad.json")


def test_band_gains_from_a_real_probe(probed):
    result, out, _ = probed
    edges, gains = band_gains_from_probe(out / "probe.json")
    assert edges == [(0.0, 0.5), (0.5, 1.0)] and len(gains) == 2
    assert gains == result["preference"]["suggested_gains"]
    assert all(g >= 0 for g in gains)
