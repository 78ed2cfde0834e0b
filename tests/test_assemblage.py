"""The assemblage along the core: counts and volumes per depth interval, with the review's decisions."""
import numpy as np
import pandas as pd
import pytest

from conftest import make_case
from microfossil.assemblage import SLICES_PER_INTERVAL, write_assemblage
from microfossil.extraction import extract_fossils


def test_counts_and_volumes_per_interval_follow_the_catalogue_and_the_review(tmp_path):
    vol, pred, work, _, _ = make_case(tmp_path, voxel_size=2.0)  # 40 slices of 2 µm: 0.08 mm of core
    cat = extract_fossils(vol, work, pred, min_voxels=20)
    first = write_assemblage(work, depth_interval_mm=0.02)  # 10 slices an interval
    assert list(first["depth_from_mm"]) == pytest.approx([0, 0.02, 0.04, 0.06])
    for k, row in first.iterrows():
        at = cat[(cat.centroid_z >= 10 * k) & (cat.centroid_z < 10 * (k + 1))]
        for c in ("foraminifera", "ostracod"):
            assert row[f"{c}_count"] == (at["class"] == c).sum()
            assert row[f"{c}_volume_mm3"] == pytest.approx(at.loc[at["class"] == c, "volume_um3"].sum() / 1e9)
    assert first["total_count"].sum() == len(cat)

    rejected, renamed = cat.iloc[0], cat.iloc[1]
    pd.DataFrame([{"id": r.id, "decision": d, "taxon": t, "centroid_z": r.centroid_z, "centroid_y": r.centroid_y,
                   "centroid_x": r.centroid_x} for r, d, t in ((rejected, "rejected", ""),
                                                                (renamed, "accepted", "Globigerina"))]
                 ).to_csv(work / "exports" / "review.csv", index=False)
    after = write_assemblage(work, depth_interval_mm=0.02)
    assert after["total_count"].sum() == len(cat) - 1
    assert after["Globigerina_count"].sum() == 1
    assert after[f"{renamed['class']}_count"].sum() == first[f"{renamed['class']}_count"].sum() - 1 - (
        rejected["class"] == renamed["class"])
    assert (work / "exports" / "assemblage.csv").exists() and (work / "figures" / "assemblage.png").exists()


def test_without_a_voxel_size_the_intervals_are_slices(tmp_path):
    vol, pred, work, _, _ = make_case(tmp_path)
    cat = extract_fossils(vol, work, pred, min_voxels=20)
    table = write_assemblage(work)
    assert list(table.columns[:2]) == ["depth_from_slice", "depth_to_slice"]
    assert SLICES_PER_INTERVAL > vol.shape[0] and len(table) == 1 and table["depth_to_slice"].iloc[0] == vol.shape[0]
    assert table["foraminifera_volume_voxels"].sum() == cat.loc[cat["class"] == "foraminifera", "voxels"].sum()
    assert np.isfinite(table.iloc[:, 2:].to_numpy(float)).all()
