"""MODEL_CARD.md: every section, and the numbers of the files it is generated from (checkpoint JSON, test/metrics.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from fopro.cli import app
from fopro.data import DataOptions
from fopro.evaluate import EvalOptions, evaluate
from fopro.model_card import SECTIONS
from helpers import make_image_folder, tiny_checkpoint

os.environ["HF_HUB_OFFLINE"] = "1"
CLASSES = ["nevus", "melanoma", "rare"]


def test_a_card_for_a_run_has_every_section_and_its_numbers(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "synth" / "target", {"test": {name: 4 for name in CLASSES}})
    weights, _ = tiny_checkpoint(tmp_path / "run" / "best", CLASSES, train_counts=[120, 40, 6])
    meta_path = weights.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["config"] = {"method": "ekd", "teacher": "resnet26", "epochs": 3, "seed": 0, "data": str(data)}
    meta_path.write_text(json.dumps(meta))
    report = evaluate(tmp_path / "run" / "best", DataOptions(data=data), EvalOptions(device="cpu", bootstrap=200), out_dir=tmp_path / "run" / "test")

    result = CliRunner().invoke(app, ["card", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    card = Path(json.loads(result.stdout)["model_card"]).read_text()
    assert Path(json.loads(result.stdout)["model_card"]) == tmp_path / "run" / "MODEL_CARD.md"
    assert [line[3:] for line in card.splitlines() if line.startswith("## ")] == list(SECTIONS)
    low, high = report["intervals"]["balanced_accuracy"]
    assert f"Balanced accuracy {100 * report['balanced_accuracy']:.1f} % [{100 * low:.1f}, {100 * high:.1f}]" in card
    for row in report["per_class"]:
        assert f"| {row['name']} | {row['support']} | {100 * row['recall']:.1f} %" in card
    assert "| rare | 6 | tail |" in card and "| nevus | 120 | head |" in card
    assert "SYNTHETIC" in card and "fopro's reconstruction" in card and "`fopro distill --method ekd`" in card


def test_a_card_without_an_evaluation_says_so(tmp_path: Path) -> None:
    weights, _ = tiny_checkpoint(tmp_path / "model", CLASSES, train_counts=[10, 5, 2])
    out = tmp_path / "card.md"
    result = CliRunner().invoke(app, ["card", str(weights), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "No test evaluation of this checkpoint was found" in out.read_text()
    missing = CliRunner().invoke(app, ["card", str(tmp_path / "nothing-here")])
    assert missing.exit_code == 2 and "give a run folder" in missing.stderr
