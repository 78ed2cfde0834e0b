"""Extraction on volumes with known objects: counts, sizes, classes, the cleaned label volumes, exports, caps."""
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import trimesh

from conftest import CODES, ball, make_case, record_prediction, save_probs
from microfossil.extraction import extract_fossils


def test_extract_known_objects(tmp_path, capsys):
    vol, pred, work, objs, mixed = make_case(tmp_path)
    cat = extract_fossils(vol, work, pred, min_voxels=20)
    assert "4 specimens" in capsys.readouterr().out
    assert len(cat) == 4  # the specks are dropped, the two-class specimen stays one
    assert (work / "exports" / "fossils.csv").exists()
    for name, (c, r, k) in objs.items():
        row = cat[(cat.centroid_z - c[0]).abs().lt(2) & (cat.centroid_y - c[1]).abs().lt(2) & (cat.centroid_x - c[2]).abs().lt(2)]
        assert len(row) == 1, name
        row = row.iloc[0]
        assert row["class"] == CODES[k]
        assert row["touches_border"] == (name == "edge")
        if name != "edge":
            assert row["volume_um3"] == pytest.approx(4 / 3 * math.pi * r ** 3, rel=0.04)
            assert 0.9 < row["sphericity"] < 1.05
            assert row["esd_um"] == pytest.approx(2 * r, rel=0.03)
            assert row["confidence"] == pytest.approx(200 / 255, abs=0.01)
            assert row["mean_intensity"] == pytest.approx(200)
    m = cat[cat.voxels == int(mixed.sum())].iloc[0]
    assert m["class"] == "ostracod" and 0.3 < m["frac_foraminifera"] < 0.7 and m["frac_foraminifera"] + m["frac_ostracod"] == pytest.approx(1)
    # the cleaned volume holds the specimens painted with their class; specimens.tif their ids
    clean = tifffile.imread(work / "predictions" / "labels_clean.tif")
    ids = tifffile.imread(work / "predictions" / "specimens.tif")
    assert clean.shape == ids.shape == vol.shape
    assert (clean[mixed] == 2).all() and clean[20:22, 30:32, 35:37].max() == 0
    for row in cat.itertuples():
        assert (ids == row.id).sum() == row.voxels
        assert (clean[ids == row.id] == CODES.index(row._2)).all()
    # exports of every specimen: CT and mask crops with a margin, a watertight STL in µm, a preview
    for row in cat.itertuples():
        d = work / "exports" / f"fossil_{row.id:04d}"
        ct, mask = tifffile.imread(d / f"{d.name}_ct.tif"), tifffile.imread(d / f"{d.name}_mask.tif")
        assert ct.shape == mask.shape and (mask > 0).sum() == row.voxels
        assert ct.shape[1] == min(row.y1 + 8, 64) - max(row.y0 - 8, 0)
        mesh = trimesh.load(d / f"{d.name}.stl")
        assert mesh.is_watertight and mesh.volume > 0  # closed, normals outward
        assert mesh.volume == pytest.approx(row.voxels, rel=0.15)
        assert mesh.area == pytest.approx(row.surface_um2, rel=1e-3)
        assert (d / f"{d.name}_preview.png").stat().st_size > 1000
    assert (work / "exports" / "gallery.png").exists()
    info = json.loads((work / "exports" / "extraction.json").read_text())
    assert info["n_specimens"] == 4 and info["n_dropped_small"] == 4


def test_voxel_size_scales_measurements(tmp_path):
    vol, pred, work, objs, _ = make_case(tmp_path, voxel_size=2.0)
    cat = extract_fossils(vol, work, pred, min_voxels=20)
    (c, r, _) = objs["b"]
    row = cat.loc[cat.voxels.idxmax()]
    assert row["volume_um3"] == pytest.approx(8 * row["voxels"])
    assert row["esd_um"] == pytest.approx(2 * 2 * r, rel=0.03)
    mesh = trimesh.load(next((work / "exports").glob(f"fossil_{row['id']:04d}/*.stl")))
    assert mesh.bounds[1][2] == pytest.approx(2 * (c[0] + r), abs=2.5)  # STL z in µm, in volume coordinates
    # a minimum size in µm³ applies through the voxel size: 4000 µm³ = 500 voxels drops the two small balls
    cat2 = extract_fossils(vol, work, pred, min_voxels=1, min_volume_um3=4000)
    assert sorted(cat2.voxels) == sorted(v for v in cat.voxels if v >= 500)


def test_the_label_volumes_open_to_scale_with_their_class_names(tmp_path):
    """specimens.tif and labels_clean.tif carry the voxel size as Fiji writes it; segmentation.seg.nrrd, read by
    pynrrd as 3D Slicer reads it, holds the kept specimens in mm with a named, coloured segment each."""
    import nrrd
    vol, pred, work, objs, _ = make_case(tmp_path, voxel_size=2.0)
    (vol.source / "voxel_size.txt").write_text("4 2 2\n")
    cat = extract_fossils(vol, work, pred, min_voxels=20)
    for name in ("specimens.tif", "labels_clean.tif"):
        with tifffile.TiffFile(work / "predictions" / name) as t:
            assert t.imagej_metadata["spacing"] == 4.0 and t.imagej_metadata["unit"] == "um"
            x, y = t.pages[0].tags["XResolution"].value, t.pages[0].tags["YResolution"].value
            assert x[1] / x[0] == pytest.approx(2.0) and y[1] / y[0] == pytest.approx(2.0)
            assert t.series[0].shape == vol.shape
    data, head = nrrd.read(str(work / "predictions" / "segmentation.seg.nrrd"), index_order="C")
    ids = tifffile.imread(work / "predictions" / "specimens.tif")
    np.testing.assert_array_equal(data, ids)
    np.testing.assert_allclose(np.abs(head["space directions"]).sum(0), [0.002, 0.002, 0.004])  # x y z, in mm
    names = {int(head[f"Segment{k}_LabelValue"]): head[f"Segment{k}_Name"] for k in range(len(cat))}
    assert names == {int(r.id): f"fossil_{int(r.id):04d} {r['class']}" for _, r in cat.iterrows()}


def test_without_a_voxel_size_the_label_volumes_claim_none(tmp_path):
    vol, pred, work, _, _ = make_case(tmp_path)
    extract_fossils(vol, work, pred, min_voxels=20)
    with tifffile.TiffFile(work / "predictions" / "labels_clean.tif") as t:
        assert not t.imagej_metadata


def test_extract_empty_prediction(tmp_path, capsys):
    vol, pred, work, _, _ = make_case(tmp_path)
    save_probs(work, np.zeros_like(pred))
    cat = extract_fossils(vol, work, np.zeros_like(pred))
    assert len(cat) == 0 and "No specimen found" in capsys.readouterr().out
    with open(work / "exports" / "fossils.csv") as fh:
        assert next(csv.reader(fh))[:3] == ["id", "class", "voxels"]
    assert tifffile.imread(work / "predictions" / "labels_clean.tif").max() == 0


def test_many_small_objects_capped_exports(tmp_path, capsys):
    vol, pred, work, _, _ = make_case(tmp_path)
    pred = np.zeros_like(pred)
    pred[::4, ::4, ::4] = 1  # 10 x 16 x 18 isolated voxels
    save_probs(work, pred)
    cat = extract_fossils(vol, work, pred, min_voxels=1, max_exports=5)
    assert len(cat) == 10 * 16 * 18 and cat.exported.sum() == 5
    assert len(list((work / "exports").glob("fossil_*"))) == 5
    assert "capped" in capsys.readouterr().out
    # a new extraction replaces the old folders
    extract_fossils(vol, work, pred, min_voxels=1, max_exports=2)
    assert len(list((work / "exports").glob("fossil_*"))) == 2


def test_split_touching(tmp_path):
    vol, pred, work, _, _ = make_case(tmp_path)
    pred = np.zeros_like(pred)
    pred[ball(pred.shape, (20, 32, 26), 8) | ball(pred.shape, (20, 32, 40), 8)] = 1
    save_probs(work, pred)
    assert len(extract_fossils(vol, work, pred, min_voxels=20)) == 1
    cat = extract_fossils(vol, work, pred, min_voxels=20, split_touching=True, split_min_distance_um=6)
    assert len(cat) == 2 and cat.voxels.sum() == (pred > 0).sum()
    ids = tifffile.imread(work / "predictions" / "specimens.tif")
    assert sorted(np.unique(ids)) == [0, 1, 2]


def test_probabilities_of_another_prediction_are_refused(tmp_path, capsys):
    """probs.npy decides each specimen's class only when the record of the prediction vouches for it: one left by an
    earlier prediction (here: the labels were predicted again without save_probs) stops the extraction, and one no
    record describes is set aside, with a message each time."""
    vol, pred, work, objs, mixed = make_case(tmp_path)
    cat = extract_fossils(vol, work, pred, min_voxels=20, max_exports=0)
    assert cat["confidence"].notna().all()  # from probs.npy
    assert json.loads((work / "exports" / "extraction.json").read_text())["checkpoint"]["name"] == "test.attempt1"
    record_prediction(work, pred.shape, {"name": "other.attempt2", "sha256": "1" * 64})  # a newer run: no probs saved
    (work / "predictions" / "prediction.json").write_text(
        (work / "predictions" / "prediction.json").read_text().replace('"probs_file": [', '"old": ['))
    with pytest.raises(ValueError, match="left from another run"):
        extract_fossils(vol, work, pred, min_voxels=20, max_exports=0)
    (work / "predictions" / "prediction.json").unlink()  # a prediction from before predictions were recorded
    cat = extract_fossils(vol, work, pred, min_voxels=20, max_exports=0)
    assert "is not used: no prediction.json" in capsys.readouterr().out
    assert cat["confidence"].isna().all()  # each specimen's majority class: no probability used
    assert json.loads((work / "exports" / "extraction.json").read_text())["class_from"] == "majority predicted class"


_KILLABLE_05 = """
import os, signal, sys
from pathlib import Path
sys.path[:0] = [{root!r}, {tests!r}]
import torch
from PIL import Image
from conftest import make_case
import microfossil.extraction as extraction
from microfossil.extraction import extract_fossils
from microfossil.prediction import predict_volume

class Bright(torch.nn.Module):  # bright voxels are a fossil: class 1 (model "A") or class 2 (model "B")
    def __init__(self, cls): super().__init__(); self.cls = cls
    def forward(self, x):
        m = x.mean(1, keepdim=True) * 10
        return torch.cat([-m, m * (1.0 if self.cls == 1 else 0.5), m * (1.0 if self.cls == 2 else 0.5)], 1)

def kill_at(n, fn):  # SIGKILL on the n-th call of fn: no clean-up runs, as when Colab drops the runtime
    calls = [0]
    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*a, **k)
    return wrapped

model, step, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
vol = make_case(Path(sys.argv[4]))[0]
if step == "predict-killed":
    Image.Image.save = kill_at(len(vol.images) // 2, Image.Image.save)  # half the PNGs written
if step in ("all", "predict-killed", "extract-killed"):
    predict_volume(Bright(1 if model == "A" else 2), vol, work / "predictions", 4, torch.device("cpu"), True, slice_pngs=True)
if step == "extract-killed":
    extraction.export_specimen = kill_at(2, extraction.export_specimen)  # one specimen folder written
extract_fossils(vol, work, min_voxels=20)
"""


def _contents(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_a_kill_during_prediction_or_extraction_leaves_all_old_or_all_new(tmp_path):
    """Fault injection with real processes: 05's prediction killed (SIGKILL) with half its PNGs written, then its
    extraction killed with one specimen folder written, each leave the previous complete outputs; run to the end,
    the outputs are those of a run that was never interrupted."""
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    script = tmp_path / "step.py"
    script.write_text(_KILLABLE_05.format(root=str(ROOT), tests=str(ROOT / "tests")))

    def run(model, step, work):
        case = tmp_path / f"case{len(list(tmp_path.glob('case*')))}"  # the same volume, made afresh for each process
        case.mkdir()
        return subprocess.run([sys.executable, str(script), model, step, str(work), str(case)],
                              capture_output=True, text=True, timeout=300)
    work, clean = tmp_path / "run", tmp_path / "clean"
    assert run("A", "all", work).returncode == 0
    old_pred, old_exp = _contents(work / "predictions"), _contents(work / "exports")
    assert any(k.startswith("fossil_") for k in old_exp) and "gallery.png" in old_exp

    r = run("B", "predict-killed", work)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _contents(work / "predictions") == old_pred and _contents(work / "exports") == old_exp

    r = run("B", "extract-killed", work)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert _contents(work / "exports") == old_exp  # the prediction is B's now, the extraction still A's, whole
    new_pred = _contents(work / "predictions")
    assert new_pred["labels.tif"] != old_pred["labels.tif"]
    assert all(new_pred[k] == old_pred[k] for k in ("specimens.tif", "labels_clean.tif"))  # they go with exports/

    assert run("B", "all", work).returncode == 0 and run("B", "all", clean).returncode == 0
    done, want = _contents(work / "exports"), _contents(clean / "exports")
    assert sorted(done) == sorted(want) and done["fossils.csv"] == want["fossils.csv"] != old_exp["fossils.csv"]
    assert _contents(work / "predictions")["labels_clean.tif"] == _contents(clean / "predictions")["labels_clean.tif"]
    assert not [p.name for p in work.iterdir() if p.name not in ("predictions", "exports")]  # no stage left behind


def test_a_new_extraction_replaces_only_its_own_files(tmp_path):
    """The previous extraction's specimen folders go; the review and a person's files beside them stay."""
    vol, pred, work, _, _ = make_case(tmp_path)
    extract_fossils(vol, work, pred, min_voxels=20)
    exp = work / "exports"
    (exp / "review.csv").write_text("id,decision\n1,accepted\n")
    (exp / "fossil_notes.xlsx").write_text("mine")
    n_before = len(list(exp.glob("fossil_0*")))
    extract_fossils(vol, work, pred, min_voxels=600)  # fewer specimens: the folders of the others go
    assert 0 < len(list(exp.glob("fossil_0*"))) < n_before
    assert (exp / "fossil_notes.xlsx").read_text() == "mine" and (exp / "review.csv").read_text().startswith("id,")
