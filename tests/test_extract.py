"""Extraction, catalogue, exports, object-level evaluation and the review panel, on synthetic volumes with known objects."""
import csv
import json
import math

import numpy as np
import pytest
import tifffile
import trimesh

import utils

CODES = ["background", "foraminifera", "ostracod"]


def ball(shape, center, r):
    g = np.indices(shape, dtype=np.float32)
    return sum((g[i] - c) ** 2 for i, c in enumerate(center)) <= r * r


def make_case(tmp_path, voxel_size=None):
    """A 40x64x72 volume: three balls (one cut by the border), a two-class specimen, specks; probabilities that
    make the two-class specimen an ostracod. Returns (vol, pred, work_dir, truth of each ball)."""
    shape = (40, 64, 72)
    pred = np.zeros(shape, np.uint8)
    objs = {"a": ((12, 16, 16), 7, 1), "b": ((24, 44, 50), 9, 2), "edge": ((36, 50, 16), 6, 1)}
    for c, r, k in objs.values():
        pred[ball(shape, c, r)] = k
    mixed = ball(shape, (12, 46, 20), 5)  # one specimen predicted as class 1 in its upper half, 2 in its lower half
    pred[mixed & (np.indices(shape)[0] < 12)] = 1
    pred[mixed & (np.indices(shape)[0] >= 12)] = 2
    for z, y, x in [(2, 2, 40), (30, 5, 60), (5, 60, 70), (20, 30, 35)]:  # specks of 1-8 voxels
        pred[z:z + 2, y:y + 2, x:x + 2] = 1
    images = np.where(pred > 0, 200, 60).astype(np.uint8)
    src = tmp_path / "ds"
    src.mkdir()
    if voxel_size is not None:
        (src / "voxel_size.txt").write_text(f"{voxel_size}  # micrometres\n")
    vol = utils.Volume(images=images, labels=None, codes=CODES, stems=[f"s{z}" for z in range(shape[0])], source=src)
    work = tmp_path / "run"
    (work / "predictions").mkdir(parents=True)
    save_probs(work, pred, mixed)
    return vol, pred, work, objs, mixed


def save_probs(work, pred, mixed=None):
    """`predictions/probs.npy` as 05 writes it: 200/255 for the predicted class; `mixed` voxels lean to ostracod."""
    probs = np.zeros((pred.shape[0], 3, *pred.shape[1:]), np.uint8)
    for k in range(3):
        probs[:, k] = np.where(pred == k, 200, 27)
    if mixed is not None:
        probs[:, 2][mixed], probs[:, 1][mixed] = 180, 60  # the mixed specimen: ostracod by mean probability
    np.save(work / "predictions" / "probs.npy", probs)


def test_read_voxel_size(tmp_path):
    assert utils.read_voxel_size(tmp_path)[0] == (1.0, 1.0, 1.0)
    assert utils.read_voxel_size(tmp_path, 2.5)[0] == (2.5, 2.5, 2.5)
    (tmp_path / "voxel_size.txt").write_text("# z y x\n5, 2.5 2.5\n")
    assert utils.read_voxel_size(tmp_path) == ((5.0, 2.5, 2.5), str(tmp_path / "voxel_size.txt"))
    assert utils.read_voxel_size(tmp_path, [1, 2, 3])[0] == (1.0, 2.0, 3.0)  # the parameter wins over the file
    (tmp_path / "voxel_size.txt").write_text("2.5 um\n")
    with pytest.raises(utils.DatasetError, match="voxel_size.txt"):
        utils.read_voxel_size(tmp_path)
    with pytest.raises(utils.DatasetError, match="voxel_size_um"):
        utils.read_voxel_size(tmp_path, -1)


def test_extract_known_objects(tmp_path, capsys):
    vol, pred, work, objs, mixed = make_case(tmp_path)
    cat = utils.extract_fossils(vol, work, pred, min_voxels=20)
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
    cat = utils.extract_fossils(vol, work, pred, min_voxels=20)
    (c, r, _) = objs["b"]
    row = cat.loc[cat.voxels.idxmax()]
    assert row["volume_um3"] == pytest.approx(8 * row["voxels"])
    assert row["esd_um"] == pytest.approx(2 * 2 * r, rel=0.03)
    mesh = trimesh.load(next((work / "exports").glob(f"fossil_{row['id']:04d}/*.stl")))
    assert mesh.bounds[1][2] == pytest.approx(2 * (c[0] + r), abs=2.5)  # STL z in µm, in volume coordinates
    # a minimum size in µm³ applies through the voxel size: 4000 µm³ = 500 voxels drops the two small balls
    cat2 = utils.extract_fossils(vol, work, pred, min_voxels=1, min_volume_um3=4000)
    assert sorted(cat2.voxels) == sorted(v for v in cat.voxels if v >= 500)


def test_extract_empty_prediction(tmp_path, capsys):
    vol, pred, work, _, _ = make_case(tmp_path)
    save_probs(work, np.zeros_like(pred))
    cat = utils.extract_fossils(vol, work, np.zeros_like(pred))
    assert len(cat) == 0 and "No specimen found" in capsys.readouterr().out
    with open(work / "exports" / "fossils.csv") as fh:
        assert next(csv.reader(fh))[:3] == ["id", "class", "voxels"]
    assert tifffile.imread(work / "predictions" / "labels_clean.tif").max() == 0


def test_many_small_objects_capped_exports(tmp_path, capsys):
    vol, pred, work, _, _ = make_case(tmp_path)
    pred = np.zeros_like(pred)
    pred[::4, ::4, ::4] = 1  # 10 x 16 x 18 isolated voxels
    save_probs(work, pred)
    cat = utils.extract_fossils(vol, work, pred, min_voxels=1, max_exports=5)
    assert len(cat) == 10 * 16 * 18 and cat.exported.sum() == 5
    assert len(list((work / "exports").glob("fossil_*"))) == 5
    assert "capped" in capsys.readouterr().out
    # a new extraction replaces the old folders
    utils.extract_fossils(vol, work, pred, min_voxels=1, max_exports=2)
    assert len(list((work / "exports").glob("fossil_*"))) == 2


def test_split_touching(tmp_path):
    vol, pred, work, _, _ = make_case(tmp_path)
    pred = np.zeros_like(pred)
    pred[ball(pred.shape, (20, 32, 26), 8) | ball(pred.shape, (20, 32, 40), 8)] = 1
    save_probs(work, pred)
    assert len(utils.extract_fossils(vol, work, pred, min_voxels=20)) == 1
    cat = utils.extract_fossils(vol, work, pred, min_voxels=20, split_touching=True, split_min_distance_um=6)
    assert len(cat) == 2 and cat.voxels.sum() == (pred > 0).sum()
    ids = tifffile.imread(work / "predictions" / "specimens.tif")
    assert sorted(np.unique(ids)) == [0, 1, 2]


def test_evaluate_specimens(tmp_path):
    vol, pred, work, objs, mixed = make_case(tmp_path)
    shape = vol.shape
    truth = np.zeros(shape, np.uint8)
    truth[ball(shape, (32, 16, 16), 6)] = 1  # found (in the validation block z >= 32 with valid_pct 0.2)
    truth[ball(shape, (34, 44, 50), 5)] = 2  # missed
    pred = np.zeros(shape, np.uint8)
    pred[ball(shape, (32, 16, 17), 6)] = 2  # matches the first, wrong class
    pred[ball(shape, (34, 30, 60), 4)] = 1  # false positive
    pred[ball(shape, (10, 30, 30), 6)] = 1  # outside the validation block: not counted
    save_probs(work, pred)
    vol.labels = truth
    utils.extract_fossils(vol, work, pred, min_voxels=20)
    (work / "metrics.json").write_text(json.dumps({"mean_iou": 0.5}))
    out = utils.evaluate_specimens(vol, work, valid_pct=0.2)
    assert (out["n_true"], out["n_predicted"], out["n_matched"], out["n_matched_same_class"]) == (2, 2, 1, 0)
    assert out["precision"] == 0.5 and out["recall"] == 0.5 and out["f1"] == 0.5 and out["class_f1"] == 0
    assert out["per_class"]["ostracod"] == {"true": 1, "predicted": 1, "matched": 0}
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["mean_iou"] == 0.5 and metrics["specimens"]["f1"] == 0.5


def test_review_survives_restart_and_reextraction(tmp_path):
    vol, pred, work, _, _ = make_case(tmp_path)
    cat = utils.extract_fossils(vol, work, pred, min_voxels=20)
    s = utils.ReviewSession(work)
    order = s.order(sort="confidence")
    assert set(order) == set(cat.id) and s.first_unreviewed(order) == 0
    first, second = order[0], order[1]
    s.set(first, "accepted", "Globigerina")
    s.set(second, "rejected")
    assert not list((work / "exports").glob("*.partial"))
    s2 = utils.ReviewSession(work)  # a disconnect: a new session reads everything back
    assert s2.get(first)["decision"] == "accepted" and s2.get(first)["taxon"] == "Globigerina"
    assert s2.get(second)["decision"] == "rejected"
    assert "Globigerina" in s2.taxa() and s2.taxa()[:2] == ["foraminifera", "ostracod"]
    assert s2.order(sort="confidence")[s2.first_unreviewed(order)] not in (first, second)
    assert s2.order("ostracod") == list(cat[cat["class"] == "ostracod"].id)
    assert s2.order(sort="size")[0] == int(cat.loc[cat.voxels.idxmax(), "id"])
    # a new extraction renumbers the specimens (specks kept now): decisions follow their specimen by centroid
    cen = s.cat.loc[first, ["centroid_z", "centroid_y", "centroid_x"]].to_numpy(float)
    cat2 = utils.extract_fossils(vol, work, pred, min_voxels=1)
    new_first = int(cat2.loc[((cat2[["centroid_z", "centroid_y", "centroid_x"]] - cen) ** 2).sum(axis=1).idxmin(), "id"])
    assert new_first != first
    s3 = utils.ReviewSession(work)
    assert s3.get(new_first)["taxon"] == "Globigerina"
    assert s3.summary()["accepted"] == 1 and s3.summary()["rejected"] == 1
    # rows that match no specimen any more are kept in the file, untouched
    cat3 = utils.extract_fossils(vol, work, np.zeros_like(pred))
    assert len(cat3) == 0
    s4 = utils.ReviewSession(work)
    assert s4.summary()["stale_rows"] == 2
    s4.save()
    rows = list(csv.DictReader(open(work / "exports" / "review.csv")))
    assert {r["taxon"] for r in rows} == {"Globigerina", ""}


def test_review_panel_clicks(tmp_path):
    pytest.importorskip("ipywidgets")
    vol, pred, work, _, _ = make_case(tmp_path)
    utils.extract_fossils(vol, work, pred, min_voxels=20)
    assert not utils.has_widget_frontend()  # pytest: no kernel, the notebook would skip the panel
    p = utils.ReviewPanel(work)
    first = p.current
    assert p.image.value[:4] == b"\x89PNG" and f"specimen #{first}" in p.info.value
    p.taxon.value = "Ammonia"  # typing a taxon is saved at once
    assert utils.ReviewSession(work).get(first)["taxon"] == "Ammonia"
    p.accept_b.click()
    assert p.current != first
    p.reject_b.click()
    p.prev_b.click()
    p.next_b.click()
    rows = {int(r["id"]): r for r in csv.DictReader(open(work / "exports" / "review.csv"))}
    assert rows[first]["decision"] == "accepted" and rows[first]["taxon"] == "Ammonia"
    assert sorted(r["decision"] for r in rows.values()) == ["accepted", "rejected"]
    p2 = utils.ReviewPanel(work)  # reopening resumes at the first specimen not reviewed yet
    assert not (p2.session.get(p2.current) or {}).get("decision")
    p2.filter.value = "ostracod"
    assert all(p2.session.cat.loc[i, "class"] == "ostracod" for i in p2.ids)
    p2.sort.value = "size"
    assert p2.ids == p2.session.order("ostracod", "size")
