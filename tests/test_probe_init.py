"""`fopro distill --probe-init probe.json`: the dataset-level prompt starts from the probe's preference."""

from __future__ import annotations

import json

import pytest
import torch

from fopro.config import DistillConfig
from fopro.data import DataOptions
from fopro.fourier import band_gain_mask
from fopro.models.teacher import TeacherOptions
from fopro.probe.frequency import run_probe
from fopro.probe.options import ProbeOptions
from fopro.run import build_fpg
from fopro.train import train


@pytest.fixture(scope="module")
def probe_json(distill_data, distill_teacher, tmp_path_factory):
    """A real probe.json whose result for (band 3, gain 2) is edited to a clear, significant gain."""
    out = tmp_path_factory.mktemp("probe")
    run_probe(TeacherOptions(str(distill_teacher)), DataOptions(data=distill_data), ProbeOptions(bands=4, gains="0,2", per_class=4), out_dir=out)
    path = out / "probe.json"
    data = json.loads(path.read_text())
    for result in data["results"]:
        strong = result["band"] == 3 and result["gain"] == 2.0
        result["delta_balanced_accuracy"] = 0.2 if strong else 0.0
        result["se_delta_balanced_accuracy"] = 0.01
    path.write_text(json.dumps(data))
    return path


def test_probe_init_amplifies_the_preferred_band(probe_json):
    config = DistillConfig(image_size=32, fpg_mode="dataset", fpg_strength=0.5, probe_init=str(probe_json))
    fpg = build_fpg(config)
    edges = json.loads(probe_json.read_text())["bands"]
    expected = band_gain_mask(32, 32, edges, [1.0, 1.0, 1.0, 1 + 0.95 * 0.5])
    mask = fpg.mask(torch.rand(1, 3, 32, 32))[0, 0]
    torch.testing.assert_close(mask, expected.to(mask.dtype), atol=1e-4, rtol=0)


def test_distill_runs_from_a_probe_init(probe_json, distill_values, tmp_path):
    values = distill_values(probe_init=str(probe_json))
    config = DistillConfig(**values)
    summary = train(config, tmp_path / "run")
    assert summary["best_epoch"] == 1
    assert (tmp_path / "run" / "fpg.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["probe_init"] == str(probe_json)
