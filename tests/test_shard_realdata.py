"""shard_tools on the real photos in ../shared/data/mushvision4 (1,694 JPEGs, 4 species, known near-duplicates)."""
from __future__ import annotations

import pandas as pd
import pytest

from shard_fixtures import REAL_DATA
from shard_tools.build import build_dataset

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (REAL_DATA / "labels.csv").exists(),
                       reason=f"real photos not found at {REAL_DATA} (CI clones ../shared beside the repo)"),
]


def test_real_photos_build_with_leakage_free_split(tmp_path):
    out = tmp_path / "out"
    m = build_dataset(REAL_DATA / "images", REAL_DATA / "labels.csv", out, workers=2, shard_size=500, progress=False)
    rows = len(pd.read_csv(REAL_DATA / "labels.csv"))
    assert m.source["written"] + m.source["skipped"] == m.source["rows"] == rows
    assert m.splits["train"].num_samples + m.splits["val"].num_samples == m.source["written"]
    assert m.num_classes == 4
    # The photos hold a couple of hundred re-saved copies; each group must sit in one split.
    assert 150 <= m.duplicate_groups <= 300
    plan = pd.read_csv(out / "_plan" / "plan.csv")
    assert (plan.groupby("group")["split"].nunique() == 1).all()
    for total, val in zip(*(m.splits[s].class_counts for s in ("train", "val"))):
        assert abs(val / (total + val) - 0.1) < 0.03  # stratified 10% per class
    # Outdoor photos of mushrooms: mid-range, red > green > blue on average, and a healthy spread.
    assert all(0.2 < x < 0.6 for x in m.stats.mean) and m.stats.mean[0] > m.stats.mean[2]
    assert all(0.15 < x < 0.35 for x in m.stats.std)
