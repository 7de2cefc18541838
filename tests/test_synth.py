"""The synthetic default dataset: determinism, counts, class structure (frequency pairs), errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fopro.data.longtail import longtail_counts
from fopro.data.synth import SynthConfig, generate_synth
from fopro.errors import FoproError

TINY = dict(num_classes=4, image_size=32, imbalance=0.25, max_per_class=20, val_per_class=4, test_per_class=4,
            public_classes=3, public_per_class=5, public_val_per_class=2)


def tiny(**changes) -> SynthConfig:
    return SynthConfig(**{**TINY, **changes})


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def load_class(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))])


def high_frequency_fraction(image: np.ndarray) -> float:
    """Fraction of the (mean-removed) grayscale FFT energy above half-Nyquist (0.25 cycles/pixel)."""
    gray = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    gray -= gray.mean()
    power = np.abs(np.fft.fft2(gray)) ** 2
    fy, fx = np.fft.fftfreq(gray.shape[0]), np.fft.fftfreq(gray.shape[1])
    radius = np.hypot(fy[:, None], fx[None, :])
    return float(power[radius > 0.25].sum() / power.sum())


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> tuple[Path, dict, list[tuple[int, int]]]:
    out = tmp_path_factory.mktemp("synth") / "data"
    calls: list[tuple[int, int]] = []
    summary = generate_synth(out, tiny(), progress=lambda done, total: calls.append((done, total)))
    return out, summary, calls


@pytest.fixture(scope="module")
def balanced_set(tmp_path_factory) -> tuple[Path, dict]:
    """All 8 default classes, balanced, to compare the classes of each frequency pair."""
    out = tmp_path_factory.mktemp("synth_balanced")
    config = SynthConfig(image_size=32, imbalance=1.0, max_per_class=24, val_per_class=1, test_per_class=1,
                         public_classes=2, public_per_class=1, public_val_per_class=1, seed=3)
    return out, generate_synth(out, config)


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path, tiny_set):
    first, _, _ = tiny_set
    generate_synth(tmp_path / "again", tiny())
    generate_synth(tmp_path / "other", tiny(seed=1))
    hashes = file_hashes(first)
    assert hashes == file_hashes(tmp_path / "again")
    other = file_hashes(tmp_path / "other")
    assert other.keys() == hashes.keys()
    pngs = [k for k in hashes if k.endswith(".png")]
    differing = sum(hashes[k] != other[k] for k in pngs)
    assert differing == len(pngs)
    assert not [p for p in first.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_counts_folders_and_summary(tiny_set):
    out, summary, calls = tiny_set
    config = tiny()
    names = summary["target"]["classes"]
    assert len(names) == config.num_classes
    for split in ("train", "val", "test"):
        folders = sorted(p.name for p in (out / "target" / split).iterdir())
        assert folders == names  # sorted folder names give the class order
        counts = [len(list((out / "target" / split / n).glob("*.png"))) for n in names]
        expected = {"train": longtail_counts(20, 4, 0.25), "val": [4] * 4, "test": [4] * 4}[split]
        assert counts == expected
        assert list(summary["target"]["counts"][split].values()) == expected
    assert counts[0] == max(counts)
    pub = summary["public"]["classes"]
    assert len(pub) == 3 and not set(pub) & set(names)
    for split, n in (("train", 5), ("val", 2)):
        assert sorted(p.name for p in (out / "public" / split).iterdir()) == pub
        assert all(len(list((out / "public" / split / c).glob("*.png"))) == n for c in pub)
    assert [p.name for p in sorted((out / "target" / "train" / names[0]).iterdir())][:2] == ["00000.png", "00001.png"]
    image = Image.open(out / "target" / "train" / names[0] / "00000.png")
    assert image.mode == "RGB" and image.size == (32, 32)

    on_disk = json.loads((out / "synth.json").read_text())
    assert on_disk == summary
    assert on_disk["config"] == {**TINY, "seed": 0}
    assert [d["name"] for d in on_disk["target"]["designs"]] == names
    assert all(d["description"] for d in on_disk["target"]["designs"] + on_disk["public"]["designs"])
    rare, head = on_disk["frequency_pairs"][0]
    assert rare == names[-1] and head == names[0]
    total = sum(sum(c.values()) for corpus in ("target", "public") for c in on_disk[corpus]["counts"].values())
    assert on_disk["total_images"] == total
    assert calls[-1] == (total, total) and len(calls) == total and calls[0] == (1, total)


def test_default_class_names_and_pairs():
    from fopro.data.synth import plan

    summary = plan(SynthConfig())
    names = summary["target"]["classes"]
    assert names == sorted(names) and len(names) == 8
    assert all(n.startswith(f"c{i}_") for i, n in enumerate(names))
    assert list(summary["target"]["counts"]["train"].values()) == longtail_counts(500, 8, 0.01)
    assert summary["frequency_pairs"] == [[names[6], names[0]], [names[7], names[1]]]
    designs = {d["name"]: d for d in summary["target"]["designs"]}
    for rare, head in summary["frequency_pairs"]:
        assert (designs[rare]["shape"], designs[rare]["colour"]) == (designs[head]["shape"], designs[head]["colour"])
        assert (designs[rare]["texture"], designs[head]["texture"]) == ("fine", "coarse")
    assert len(summary["public"]["classes"]) == 10 and 2000 < summary["total_images"] < 6000
    many = plan(SynthConfig(num_classes=12))["target"]["classes"]
    assert many == sorted(many) and many[0].startswith("c00_") and len(set(many)) == 12


def test_frequency_pairs_differ_in_spectrum_not_colour(balanced_set):
    out, summary = balanced_set
    train = out / "target" / "train"
    assert len(summary["frequency_pairs"]) == 2
    names = summary["target"]["classes"]
    colour_of = {d["name"]: d["colour"] for d in summary["target"]["designs"]}
    centre = slice(12, 20)  # the middle of a 32 px image: mostly lesion
    images = {n: load_class(train / n) for n in names}
    lesion = {n: x[:, centre, centre].reshape(-1, 3).mean(0) for n, x in images.items()}
    for rare, head in summary["frequency_pairs"]:
        fine, coarse = images[rare], images[head]
        hf_fine = np.mean([high_frequency_fraction(x) for x in fine])
        hf_coarse = np.mean([high_frequency_fraction(x) for x in coarse])
        assert hf_fine > 2.0 * hf_coarse, (rare, head, hf_fine, hf_coarse)
        mean_fine, mean_coarse = fine.reshape(-1, 3).mean(0), coarse.reshape(-1, 3).mean(0)
        assert np.abs(mean_fine - mean_coarse).max() < 6.0, (rare, head, mean_fine, mean_coarse)
        # the lesion colour of the pair is close, much closer than any class of another colour family
        pair_distance = np.linalg.norm(lesion[rare] - lesion[head])
        other = min(np.linalg.norm(lesion[n] - lesion[head]) for n in names if colour_of[n] != colour_of[head])
        assert pair_distance < 20.0 and pair_distance < 0.65 * other, (rare, head, pair_distance, other)


def test_existing_dataset_needs_overwrite(tmp_path):
    out = tmp_path / "data"
    config = tiny(num_classes=2, max_per_class=2, val_per_class=1, test_per_class=1, public_classes=2,
                  public_per_class=1, public_val_per_class=1)
    generate_synth(out, config)
    with pytest.raises(FoproError, match="overwrite"):
        generate_synth(out, config)
    summary = generate_synth(out, tiny(**{**config.__dict__, "seed": 5, "num_classes": 3}), overwrite=True)
    assert sorted(p.name for p in (out / "target" / "train").iterdir()) == summary["target"]["classes"]
    assert len(summary["target"]["classes"]) == 3
    assert json.loads((out / "synth.json").read_text())["config"]["seed"] == 5
    (tmp_path / "file").write_text("x")
    with pytest.raises(FoproError):
        generate_synth(tmp_path / "file", config)


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"image_size": 8}, "--image-size"),
        ({"image_size": 32.5}, "--image-size"),
        ({"imbalance": 0.0}, "--imbalance"),
        ({"imbalance": 1.5}, "--imbalance"),
        ({"num_classes": 1}, "--num-classes"),
        ({"max_per_class": 0}, "--max-per-class"),
        ({"val_per_class": 0}, "--val-per-class"),
        ({"test_per_class": -1}, "--test-per-class"),
        ({"public_classes": 1}, "--public-classes"),
        ({"public_per_class": 0}, "--public-per-class"),
        ({"public_val_per_class": 0}, "--public-val-per-class"),
        ({"seed": -1}, "--seed"),
        ({"unlabeled": -1}, "--unlabeled"),
        ({"unlabeled": 2.5}, "--unlabeled"),
    ],
)
def test_bad_config_names_the_option(tmp_path, change, option):
    with pytest.raises(FoproError, match=option):
        generate_synth(tmp_path / "data", tiny(**change))
    assert not (tmp_path / "data").exists()
