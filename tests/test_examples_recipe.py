"""The recipe example's dataset builder (real fundus patches from scikit-image) and its search grid."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "recipe"))

pytest.importorskip("skimage")

import fundus_patches  # noqa: E402
import search  # noqa: E402


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_fundus_patches_counts_classes_and_determinism(tmp_path):
    written = fundus_patches.build(tmp_path / "a", size=32, most=6, fewest=2, per_class_eval=1)
    assert list(written) == ["train", "val", "test"]
    train = list(written["train"].values())
    assert train[0] == 6 and train[-1] == 2 and train == sorted(train, reverse=True)
    assert sorted(written["train"]) == [f"c{i}_{name}" for i, name in enumerate(fundus_patches.OCTANTS)]
    assert all(count == 1 for count in written["test"].values())
    assert len(list((tmp_path / "a").rglob("*.png"))) == sum(train) + 16
    fundus_patches.build(tmp_path / "b", size=32, most=6, fewest=2, per_class_eval=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


def test_opposite_octants_are_mirror_images_of_the_fundus(tmp_path):
    """The class is a direction: octant k and its horizontal mirror (4 - k mod 8) sample mirrored places."""
    import math

    import numpy as np

    assert fundus_patches.OCTANTS[0] == "temporal" and fundus_patches.OCTANTS[4] == "nasal"
    angles = [math.radians(45 * k) for k in range(8)]
    mirrored = [(4 - k) % 8 for k in range(8)]
    for k, m in enumerate(mirrored):
        assert np.isclose(math.cos(angles[k]), -math.cos(angles[m])) and np.isclose(math.sin(angles[k]), math.sin(angles[m]))


def test_search_grid_reads_no_test_split():
    rows = search.grid()
    assert len({(d, n) for d, n, _ in rows}) == len(rows)
    assert {d for d, _, _ in rows} == set(search.DATASETS)
    for _, _, options in rows:
        assert "test" not in " ".join(options)
