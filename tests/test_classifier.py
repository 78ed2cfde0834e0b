"""The specimen classifier: it tells shapes apart that the segmentation confused, learns from the review, and leaves
a catalogue without specimens alone."""
import csv
import json

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from conftest import volume_of
from microfossil.classifier import (NOT_A_FOSSIL, REJECT_FALLBACK, REJECT_FLOOR, SpecimenForests, classify_specimens,
                                   reject_threshold)
from microfossil.evaluation import evaluate_heldout, save_metrics
from microfossil.exports import draw_gallery
from microfossil.extraction import extract_fossils
from microfossil.review import ReviewSession, read_review
from microfossil.specimens import GREY_DESCRIPTORS, SIZE_DESCRIPTORS, SPECIMEN_FEATURES
from microfossil.split import split_volume


COLOURS = {"shell": (255, 127, 14), "chain": (44, 160, 44)}  # the figures' colours of classes 1 and 2


def _rotation(rng):
    q = rng.normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array([[a*a+b*b-c*c-d*d, 2*(b*c-a*d), 2*(b*d+a*c)], [2*(b*c+a*d), a*a-b*b+c*c-d*d, 2*(c*d-a*b)],
                     [2*(b*d-a*c), 2*(c*d+a*b), a*a-b*b-c*c+d*d]])


def shells_and_chains(tmp_path, seed=0):
    """A volume of elongated single shells (class 1, solid ellipsoids) and chains of three spheres (class 2) of the
    same length, brightness and random orientation, one per 18-voxel cell; the 'segmentation' calls all of them
    class 1. Returns (vol, pred)."""
    rng = np.random.default_rng(seed)
    cell = 18
    Z, H, W = 5 * cell, 4 * cell, 4 * cell
    labels = np.zeros((Z, H, W), np.uint8)
    g = np.indices((cell, cell, cell), dtype=np.float32).reshape(3, -1).T - (cell - 1) / 2
    for cz in range(5):
        for cy in range(4):
            for cx in range(4):
                R, length = _rotation(rng), rng.uniform(12, 15)
                p = g @ R.astype(np.float32)
                if rng.uniform() < 0.5:
                    a = np.array([length / 2, length / 2 * 0.42, length / 2 * 0.38]) * rng.uniform(0.9, 1.1, 3)
                    inside, k = ((p / a) ** 2).sum(1) <= 1, 1
                else:
                    r = length / 6 * rng.uniform(0.95, 1.1)
                    cs = np.array([[-2 * r, 0, 0], [0, 0, 0], [2 * r, 0, 0]])
                    inside, k = (((p[:, None, :] - cs[None]) ** 2).sum(2) <= (r * 1.08) ** 2).any(1), 2
                sl = tuple(slice(c * cell, (c + 1) * cell) for c in (cz, cy, cx))
                labels[sl][inside.reshape(cell, cell, cell)] = k
    images = np.where(labels > 0, 200, 60).astype(np.uint8)
    return volume_of(images, labels, tmp_path), (labels > 0).astype(np.uint8)


def test_classifier_tells_shells_from_chains(tmp_path, capsys):
    vol, pred = shells_and_chains(tmp_path)
    work = tmp_path / "run"
    cat0 = extract_fossils(vol, work, pred, min_voxels=50, max_exports=12)
    assert len(cat0) == 80 and (cat0["class"] == "shell").all()  # the segmentation confused every chain
    assert set(draw_gallery(work)["name"]) == {"shell"}
    assert (work / "exports" / "truth_features.csv").exists()
    split = split_volume(vol, 0.2, 0.1)
    assert split.train_stop == split.test_start == 72  # the cells keep every specimen in one block: no gap
    cat = classify_specimens(work, split)
    out = capsys.readouterr().out
    assert "Specimen classifier trained on" in out
    feats = pd.read_csv(work / "exports" / "features.csv")
    truth = np.where(feats["truth_chain"] > feats["truth_shell"], "chain", "shell")
    held_out = (cat["z0"] >= split.test_start).to_numpy()  # never seen by the classifier
    assert held_out.sum() >= 10
    acc = (cat["class"].to_numpy()[held_out] == truth[held_out]).mean()
    assert acc >= 0.9, acc
    assert (cat["seg_class"] == "shell").all() and cat["class_probability"].between(0, 1).all()
    p = cat[[c for c in cat.columns if c.startswith("prob_")]]  # every label's probability, the class's among them
    assert {"prob_shell", "prob_chain"} <= set(p.columns) and np.allclose(p.sum(1), 1)
    np.testing.assert_allclose(cat["class_probability"], [r[f"prob_{c}"] for _, r in cat.iterrows() for c in [r["class"]]])
    tiles = draw_gallery(work).set_index("id")  # classify_specimens drew them again: nothing left to draw
    assert not tiles["redrawn"].any() and len(tiles) == 12
    now = cat.set_index("id").loc[tiles.index, "class"]
    assert (tiles["name"] == now).all() and {"shell", "chain"} <= set(now)
    page = np.asarray(Image.open(work / "exports" / "gallery.png").convert("RGB"))
    for sid, t in tiles.iterrows():  # each tile's outline in its new class colour, none in the other
        px = page[t["top"]:t["top"] + t["size"], t["left"]:t["left"] + t["size"]].reshape(-1, 3)
        mine, other = (COLOURS["shell"], COLOURS["chain"])[::1 if t["name"] == "shell" else -1]
        assert (px == mine).all(1).sum() > 50 and not (px == other).all(1).any(), sid
    save_metrics(work, vol, pred, split)
    scores = evaluate_heldout(vol, work, split, pred)  # the held-out block on its own: the same gain
    before, after = scores["extraction"], scores["classifier"]
    assert not list((work / "heldout" / "exports").glob("gallery*"))  # max_exports=0 there: nothing drawn
    assert after["class_f1"] > before["class_f1"] + 0.3
    assert after["labels_clean"]["iou"]["chain"] > 0.8  # the held-out clean labels were repainted
    js = json.loads((work / "exports" / "classifier.json").read_text())
    assert js["from_truth"] > 0 and js["true_specimens"] > 0 and js["from_review"] == 0


def test_review_labels_change_the_classifier(tmp_path, capsys):
    """Reviewing (no ground truth used): chains rejected, shells accepted -> the other chains get flagged and leave the
    clean label volume; then the review renames the shells' taxon and the classifier follows."""
    vol, pred = shells_and_chains(tmp_path, seed=1)
    work = tmp_path / "run"
    extract_fossils(vol, work, pred, min_voxels=50, max_exports=6)
    assert classify_specimens(work, use_truth=False, review=read_review(work)) is None  # no review yet: nothing to learn from
    assert "not trained" in capsys.readouterr().out
    feats = pd.read_csv(work / "exports" / "features.csv")
    is_chain = (feats["truth_chain"] > feats["truth_shell"]).to_numpy()
    s = ReviewSession(work)
    reviewed = feats["id"].to_numpy()[:40]
    for sid, chain in zip(reviewed, is_chain[:40]):
        s.set(sid, "rejected" if chain else "accepted")
    cat = classify_specimens(work, use_truth=False, review=read_review(work))
    rest = ~np.isin(cat["id"], reviewed)
    assert (cat["flagged"].to_numpy()[rest] == is_chain[rest]).mean() >= 0.9
    assert set(cat.loc[cat["flagged"], "class"]) == {NOT_A_FOSSIL}
    clean = tifffile.imread(work / "predictions" / "labels_clean.tif")
    ids = tifffile.imread(work / "predictions" / "specimens.tif")
    flagged_ids = cat.loc[cat["flagged"], "id"].to_numpy()
    assert not clean[np.isin(ids, flagged_ids)].any() and clean[np.isin(ids, cat.loc[~cat["flagged"], "id"])].all()
    tiles = draw_gallery(work).set_index("id")  # the gallery shows each decision, then the classifier's flag
    assert not tiles["redrawn"].any()
    for sid, t in tiles.iterrows():
        d = s.get(sid)
        want = (d["taxon"] or "shell") if d and d["decision"] == "accepted" else NOT_A_FOSSIL if d or sid in flagged_ids \
            else cat.set_index("id").loc[sid, "class"]
        assert t["name"] == want and (t["marker"] == "x") == (want == NOT_A_FOSSIL), (sid, t["name"], want)
    # second round: the reviewer names the accepted shells; the classifier learns the taxon
    for sid, chain in zip(reviewed, is_chain[:40]):
        if not chain:
            s.set(sid, taxon="Cythereis")
    cat2 = classify_specimens(work, use_truth=False, review=read_review(work))
    assert set(cat2.loc[~cat2["flagged"], "class"]) == {"Cythereis"}
    clean2 = tifffile.imread(work / "predictions" / "labels_clean.tif")
    np.testing.assert_array_equal(clean2, clean)  # a taxon that is not a class keeps its segmentation class
    order = ReviewSession(work).order("all", "confidence")  # least certain first: by the classifier's probability
    probs = cat2.set_index("id").loc[order, "class_probability"].to_numpy()
    assert (np.diff(probs) >= 0).all()


def test_the_classifier_reads_the_review_as_people_leave_it(tmp_path, capsys):
    """05's classify cell (`read_review`, then `classify_specimens`) with review.csv re-saved by a spreadsheet
    (semicolons, decimal commas, Windows-1252), with an unquoted comma in a taxon, and emptied."""
    vol, pred = shells_and_chains(tmp_path, seed=1)
    work = tmp_path / "run"
    extract_fossils(vol, work, pred, min_voxels=50, max_exports=0)
    feats = pd.read_csv(work / "exports" / "features.csv")
    is_chain = (feats["truth_chain"] > feats["truth_shell"]).to_numpy()
    s = ReviewSession(work)
    for sid, chain in zip(feats["id"].to_numpy()[:40], is_chain[:40]):
        s.set(sid, "rejected" if chain else "accepted", "" if chain else "Ammonia, sp.")
    path = work / "exports" / "review.csv"
    ours = path.read_bytes()
    rows = list(csv.reader(open(path, encoding="utf-8-sig")))
    path.write_bytes("\r\n".join(";".join(v.replace(".", ",") if v.replace(".", "").isdigit() else v for v in r)
                                   for r in rows).encode("cp1252"))
    for review in [None, ours.replace(b'"Ammonia, sp."', b"Ammonia, sp.")]:
        if review:
            path.write_bytes(review)
        cat = classify_specimens(work, use_truth=False, review=read_review(work))
        assert json.loads((work / "exports" / "classifier.json").read_text())["from_review"] == 40
        assert set(cat["class"]) == {"Ammonia, sp.", NOT_A_FOSSIL}
    path.write_bytes(b"")
    capsys.readouterr()
    assert classify_specimens(work, use_truth=False, review=read_review(work)) is None
    out = capsys.readouterr().out
    assert f"{path} is empty" in out and "not trained" in out


def test_classifier_with_no_specimen(tmp_path, capsys):
    """An empty prediction (a quick model) on a labelled volume: true specimens to learn from, none to classify."""
    vol, pred = shells_and_chains(tmp_path)
    work = tmp_path / "run"
    extract_fossils(vol, work, pred * 0, min_voxels=50, max_exports=0)
    assert len(pd.read_csv(work / "exports" / "truth_features.csv")) == 80
    assert classify_specimens(work) is None
    assert "no specimen in the catalogue" in capsys.readouterr().out


def test_reject_threshold_sits_above_every_fossil_example_out_of_bag():
    """The classifier may drop a specimen only at a "not a fossil" probability above the highest one it gave (out of
    bag) to any fossil among its examples, and never below the floor; fixed when too few examples for out-of-bag
    scores; never when it has no "not a fossil" example."""
    from types import SimpleNamespace
    classes = np.array(["chain", NOT_A_FOSSIL, "shell"])
    oob = np.array([[0.2, 0.7, 0.1], [0.1, 0.3, 0.6], [np.nan, np.nan, np.nan], [0.0, 0.95, 0.05], [0.5, 0.2, 0.3]])
    y = np.array(["chain", "shell", "shell", NOT_A_FOSSIL, "chain"])
    t, why = reject_threshold(SimpleNamespace(classes_=classes, oob_decision_function_=oob), y)
    assert t == 0.71 and "out-of-bag" in why  # above the chain example given 0.7; the unscored one left out
    low = oob.copy()
    low[0] = [0.8, 0.1, 0.1]
    assert reject_threshold(SimpleNamespace(classes_=classes, oob_decision_function_=low), y)[0] == REJECT_FLOOR
    assert reject_threshold(SimpleNamespace(classes_=classes), y)[0] == REJECT_FALLBACK
    assert reject_threshold(SimpleNamespace(classes_=np.array(["chain", "shell"])), y)[0] is None


def test_the_clean_up_drops_junk_but_no_true_specimen(tmp_path, capsys):
    """Predicted junk (dim 4-voxel cubes where the truth is background) besides every other specimen: the classifier
    learns "not a fossil" from the training block's junk, flags the held-out junk, and keeps every true held-out
    specimen (the held-out block's recall after it is the extraction's); classifier.json records its threshold."""
    vol, pred = shells_and_chains(tmp_path, seed=1)
    for cz in range(5):
        for cy in range(4):
            for cx in range(0, 4, 2):
                z, y, x = 18 * cz, 18 * cy, 18 * (cx + cy % 2)
                pred[z:z + 4, y:y + 4, x:x + 4] = 1  # junk: image 60 (background), truth 0
    work = tmp_path / "run"
    extract_fossils(vol, work, pred, min_voxels=50, max_exports=0)
    split = split_volume(vol, 0.2)
    save_metrics(work, vol, pred, split)
    scores = evaluate_heldout(vol, work, split, pred)
    before, after = scores["extraction"], scores["classifier"]
    assert before["n_predicted"] > before["n_true"]  # the junk is in the held-out extraction...
    assert after["recall"] == before["recall"] == 1.0  # ...no true specimen is lost to the clean-up...
    assert after["precision"] > before["precision"]  # ...and the junk goes
    js = json.loads((work / "heldout" / "exports" / "classifier.json").read_text())
    assert REJECT_FLOOR <= js["reject_threshold"] <= 1.01 and js["flagged"] > 0
    assert "only at P >=" in capsys.readouterr().out


def test_examples_and_extractions_from_before_a_descriptor(tmp_path, capsys):
    """A bundle's examples measured before a descriptor existed (the column absent, or empty on its older rows): the
    classifier reads the descriptors every example has, says so, and still classes the specimens. A features.csv
    from before it stops with the file named and the fix (re-run the extraction)."""
    vol, pred = shells_and_chains(tmp_path)
    work = tmp_path / "run"
    extract_fossils(vol, work, pred, min_voxels=50, max_exports=0)
    split = split_volume(vol, 0.2)
    classify_specimens(work, split)
    mine = pd.read_csv(work / "exports" / "classifier_examples.csv")
    truth = pd.read_csv(work / "exports" / "features.csv")
    truth = np.where(truth["truth_chain"] > truth["truth_shell"], "chain", "shell")
    absent = mine.drop(columns="inner_walls")
    pd.concat([absent, mine]).to_csv(tmp_path / "merged.csv", index=False)  # as update_bundle merges old and new rows
    emptied = pd.read_csv(tmp_path / "merged.csv")
    assert emptied["inner_walls"].isna().sum() == len(mine)
    for old in (absent, emptied):
        old.attrs["source"] = "bundle old v1"
        capsys.readouterr()
        cat = classify_specimens(work, split, examples=old)  # this run's truth too: its examples are measured anew
        assert "bundle old v1 predate the descriptor(s) ['inner_walls']" in capsys.readouterr().out
        js = json.loads((work / "exports" / "classifier.json").read_text())
        assert "inner_walls" not in js["features"] and "solidity" in js["features"] and js["from_bundle"] == len(old)
        assert js["left_out"] == ["inner_walls"]
        assert (cat["class"].to_numpy() == truth).mean() >= 0.9
        kept = pd.read_csv(work / "exports" / "classifier_examples.csv")  # this run's own examples keep it, measured
        assert kept["inner_walls"].notna().all() and len(kept) == len(mine)
    oldest = mine.drop(columns="inner_walls").rename(columns={"principal_box_fill": "box_fill"})  # before both
    oldest["box_fill"] = 0.0  # the scan-axes fill, under its own name: not a feature now (asserted below)
    oldest.attrs["source"] = "bundle oldest v1"
    cat = classify_specimens(work, split, examples=oldest)
    assert "predate the descriptor(s) ['principal_box_fill', 'inner_walls']" in capsys.readouterr().out
    js = json.loads((work / "exports" / "classifier.json").read_text())
    assert js["left_out"] == ["principal_box_fill", "inner_walls"] and "box_fill" not in js["features"]
    assert (cat["class"].to_numpy() == truth).mean() >= 0.9
    with pytest.raises(ValueError, match=r"bundle other v1 lack the descriptor\(s\) \['solidity'\]"):
        other = mine.drop(columns=["solidity", "inner_walls"])  # a descriptor every bundle has had: not ours
        other.attrs["source"] = "bundle other v1"
        classify_specimens(work, split, use_truth=False, examples=other)
    feats = pd.read_csv(work / "exports" / "features.csv")
    feats.drop(columns="inner_walls").to_csv(work / "exports" / "features.csv", index=False)
    with pytest.raises(ValueError, match=r"features.csv lacks the descriptor\(s\) \['inner_walls'\].*Re-run the extraction"):
        classify_specimens(work, split)


def test_without_a_split_the_classifier_learns_from_the_training_block_05_recorded(tmp_path):
    """06's retrain cell passes no split: the classifier reads the training block from the split 05 recorded in
    metrics.json (its provenance; a run of an earlier version recorded it at the top level, its test block as
    `valid_slices`), and stops, naming the cell to run, when there is none."""
    vol, pred = shells_and_chains(tmp_path)
    work = tmp_path / "run"
    extract_fossils(vol, work, pred, min_voxels=50, max_exports=0)
    with pytest.raises(FileNotFoundError, match="run the scoring cell of 05_predict_export first"):
        classify_specimens(work)
    split = split_volume(vol, 0.2, 0.1)
    save_metrics(work, vol, pred, split)
    classify_specimens(work)
    js = json.loads((work / "exports" / "classifier.json").read_text())
    assert js["training_slices"] == split.plan()["train_slices"]
    (work / "metrics.json").write_text(json.dumps({"split": {"train_slices": [0, 71], "valid_slices": [72, 89]}}))
    classify_specimens(work)  # the earlier two-block record: training 0-71, its test block 72-89
    assert json.loads((work / "exports" / "classifier.json").read_text())["training_slices"] == [0, 71]


def test_the_class_comes_from_the_shape_and_not_the_size_whether_a_fossil_from_both():
    """Examples whose classes differ by solidity and by size alike (every shell larger than every chain): a shell
    smaller than any example shell is still a shell (the class forest reads no size descriptor); examples of junk
    that differ from the fossils by their size alone teach the other forest to call a junk-sized specimen no fossil."""
    rng = np.random.default_rng(0)
    cols, n = list(SPECIMEN_FEATURES), 40
    y = np.where(np.arange(n) % 2, "shell", "chain")
    X = rng.normal(0.5, 0.1, (n, len(cols)))
    X[:, cols.index("solidity")] = np.where(y == "shell", 0.8, 0.7) + rng.normal(0, 0.01, n)
    for c, shell, chain in (("log_voxels", 3.2, 2.6), ("surface_share", 0.3, 0.5), ("n_peaks", 4, 1)):
        X[:, cols.index(c)] = np.where(y == "shell", shell, chain) + rng.normal(0, 0.05, n)
    small_shell = X[y == "chain"][:1].copy()  # a chain's size...
    small_shell[0, cols.index("solidity")] = 0.8  # ...and a shell's shape
    f = SpecimenForests(X, y, cols)
    assert f.reject is None and f.threshold is None and not set(SIZE_DESCRIPTORS + GREY_DESCRIPTORS) & set(f.class_cols)
    labels, p = f.proba(small_shell)
    assert labels[int(p.argmax())] == "shell" and p.sum() == pytest.approx(1)
    junk = X[:10].copy()
    junk[:, cols.index("log_voxels")] = 1.6 + rng.normal(0, 0.05, 10)
    f = SpecimenForests(np.r_[X, junk], np.r_[y, [NOT_A_FOSSIL] * 10], cols)
    labels, p = f.proba(np.r_[junk[:1] + 0.001, small_shell])
    assert labels[-1] == NOT_A_FOSSIL and p[0, -1] >= f.threshold > p[1, -1]
    assert p.sum(1) == pytest.approx([1, 1]) and labels[int(p[1].argmax())] == "shell"


def test_the_class_comes_from_the_shape_and_not_the_infills_grey():
    """Examples whose classes differ by solidity and by their grey levels alike (every shell of the training block
    spar-filled, bright; every chain hollow, dark): a hollow shell is still a shell, as the infill is the core's and
    not the animal's; the forest that judges whether a specimen is a fossil at all still reads the grey levels."""
    rng = np.random.default_rng(1)
    cols, n = list(SPECIMEN_FEATURES), 40
    y = np.where(np.arange(n) % 2, "shell", "chain")
    X = rng.normal(0.5, 0.1, (n, len(cols)))
    X[:, cols.index("solidity")] = np.where(y == "shell", 0.8, 0.7) + rng.normal(0, 0.01, n)
    for c in GREY_DESCRIPTORS:
        X[:, cols.index(c)] = np.where(y == "shell", 220, 60) + rng.normal(0, 5, n)
    hollow_shell = X[y == "chain"][:1].copy()  # a chain's grey levels...
    hollow_shell[0, cols.index("solidity")] = 0.8  # ...and a shell's shape
    f = SpecimenForests(X, y, cols)
    labels, p = f.proba(hollow_shell)
    assert labels[int(p.argmax())] == "shell" and p.max() > 0.6, p
    junk = X[:10].copy()
    junk[:, [cols.index(c) for c in GREY_DESCRIPTORS]] = 128 + rng.normal(0, 2, (10, len(GREY_DESCRIPTORS)))
    f = SpecimenForests(np.r_[X, junk], np.r_[y, [NOT_A_FOSSIL] * 10], cols)
    assert set(GREY_DESCRIPTORS) <= set(f.cols) and f.reject.n_features_in_ == len(cols)
