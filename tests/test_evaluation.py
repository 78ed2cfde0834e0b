"""Scores of a run on its test block, from test data only: voxels, specimens, the metrics file and its provenance, the
table."""
import json

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import CODES, ball, make_case, save_probs
from microfossil.classifier import classify_specimens
from microfossil.evaluation import (PROVENANCE_KEYS, describe_run, evaluate_heldout, evaluation_markdown, evaluation_row,
                                    match_specimens, provenance, save_metrics, write_evaluation)
from microfossil.extraction import extract_fossils
from microfossil.review import ReviewSession, read_review
from microfossil.split import left_out_mask, split_volume


def _labelled(tmp_path, shape, truth_balls, pred_balls, dark=()):
    """A volume whose truth and prediction are the given balls `(center, r, class)`; voxels of `dark` balls are dimmer
    (another kind of object to the classifier). Returns (vol, pred, work)."""
    vol, _, work, _, _ = make_case(tmp_path)
    truth, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    for c, r, k in truth_balls:
        truth[ball(shape, c, r)] = k
    for c, r, k in pred_balls:
        pred[ball(shape, c, r)] = k
    vol.images = np.where(pred > 0, 200, 60).astype(np.uint8)
    for c, r in dark:
        vol.images[ball(shape, c, r)] = 120
    vol.labels, vol.stems = truth, [f"s{z}" for z in range(shape[0])]
    save_probs(work, pred)
    return vol, pred, work


def test_held_out_extraction_keeps_its_own_errors(tmp_path):
    """An ostracod reaching from the gap into the test block, predicted right above the block and wrong in it: the
    catalogue (every voxel votes) calls it an ostracod, the test scores keep the error; metrics.json says where its
    scores come from."""
    shape = (40, 32, 32)
    upper = np.indices(shape)[0] < 30
    vol, _, work = _labelled(tmp_path, shape, [((29, 16, 16), 5, 2), ((8, 16, 16), 4, 1)], [((8, 16, 16), 4, 1)])
    pred = np.where(ball(shape, (29, 16, 16), 5), np.where(upper, 2, 1), 0).astype(np.uint8)
    pred[ball(shape, (8, 16, 16), 4)] = 1
    save_probs(work, pred)
    split = split_volume(vol, 0.25, 0.1)  # test: 30-39; the ostracod starts at 24, so the gap is 24-29
    assert (split.valid_stop, split.train_start, split.train_stop, split.test_start) == (4, 4, 24, 30)
    cat = extract_fossils(vol, work, pred, min_voxels=20, max_exports=0)
    assert sorted(cat["class"]) == ["foraminifera", "ostracod"]
    clean = tifffile.imread(work / "predictions" / "labels_clean.tif")
    assert (clean[30:][vol.labels[30:] == 2] == 2).all()  # the catalogue's repaint, from the whole specimen
    m = save_metrics(work, vol, pred, split, {"seed": 3, "checkpoint": {"name": "full_unfrozen.attempt1"}})
    assert m["iou"]["ostracod"] == 0.0
    out = evaluate_heldout(vol, work, split, pred, classify=False)
    assert out["extraction"]["labels_clean"]["iou"]["ostracod"] == 0.0  # the old extraction scored 1.00 here
    assert out["extraction"]["n_matched_same_class"] == 0 and out["extraction"]["class_f1"] == 0
    metrics = json.loads((work / "metrics.json").read_text())
    prov = metrics["provenance"]
    assert set(PROVENANCE_KEYS) <= set(prov) and metrics["test_slices"] == [30, 39]
    assert prov["split"]["train_slices"] == [4, 23] and prov["split"]["gap_before_test"] == [24, 29]
    assert prov["split"]["valid_slices"] == [0, 3] and prov["split"]["validation"] == "its own block"
    assert prov["seed"] == 3 and prov["checkpoint"]["name"] == "full_unfrozen.attempt1"
    assert prov["scan"]["shape"] == list(vol.shape) and prov["project_version"]
    assert prov["split"]["left_out"]["specimens"] == 0 and metrics["specimens"]["f1"] == 1.0
    assert prov["fossil_threshold_chosen_on"] == "given (a number, or the model bundle's)"
    record = json.loads((work / "predictions" / "prediction.json").read_text())
    record["fossil_threshold_chosen_on"] = {"slices": [0, 2, 3, 4, 9, 14, 23], "foreground_iou": {}}
    (work / "predictions" / "prediction.json").write_text(json.dumps(record))  # as 05 records `calibration_slices`
    chosen = provenance(work, vol, split)["fossil_threshold_chosen_on"]
    assert chosen == "4 training-block slices and 3 validation-block slices"


def test_reviews_outside_the_training_block_leave_the_reported_scores_unchanged(tmp_path):
    """Rejecting a false specimen of the test block, of the gap or of the validation block in the review changes the
    catalogue, not the test F1: only decisions about specimens wholly in the training block reach the classifier that
    is scored (the rule of its ground truth); the model bundle's examples leave out the test block's."""
    shape = (60, 40, 40)
    train = [((16 + 10 * i, 10, 10), 3, 1) for i in range(3)] + [((18 + 13 * i, 28, 28), 5, 2) for i in range(2)]
    held = [((53, 10, 10), 3, 1)]
    false = ((54, 28, 28), 4)
    gap = ((44, 30, 10), 2)  # a false specimen in the gap before the test block (slices 42-47)
    valid = ((2, 30, 30), 2)  # and one in the validation block (slices 0-5)
    vol, pred, work = _labelled(tmp_path, shape, train + held, train + held + [(c, r, 1) for c, r in (false, gap, valid)],
                                dark=[false, gap, valid])
    vol.labels[ball(shape, (45, 5, 35), 1)] = 2  # a true speck reaching the gap: not scored, not trained on
    split = split_volume(vol, 0.2, 0.1, gap_slices=6)
    assert split.plan() == {"train_slices": [12, 41], "valid_slices": [0, 5], "test_slices": [48, 59]}
    extract_fossils(vol, work, pred, min_voxels=20, max_exports=0)
    save_metrics(work, vol, pred, split)
    before = evaluate_heldout(vol, work, split, pred, review=read_review(work))
    assert before["classifier"] is not None and before["classifier"]["n_predicted"] == 2
    cat = pd.read_csv(work / "exports" / "fossils.csv")
    at = lambda c: int(cat.loc[(cat["centroid_z"] - c[0]).abs().lt(1) & (cat["centroid_y"] - c[1]).abs().lt(1)  # noqa: E731
                               & (cat["centroid_x"] - c[2]).abs().lt(1), "id"].iloc[0])
    fp, gp, vp = at(false[0]), at(gap[0]), at(valid[0])
    tr = at(train[0][0])  # a training-block specimen, accepted with its class: the one decision that counts
    review = ReviewSession(work)
    for sid in (fp, gp, vp):
        review.set(sid, "rejected")
    review.set(tr, "accepted")
    classify_specimens(work, split, review=read_review(work))  # the catalogue: every decision counts
    flagged = pd.read_csv(work / "exports" / "fossils.csv").set_index("id")["flagged"]
    assert flagged[fp] and flagged[gp] and flagged[vp] and not flagged[tr]
    bundle_examples = pd.read_csv(work / "exports" / "classifier_examples.csv")
    assert (bundle_examples["source"] == "review").sum() == 3  # the test block's review stays out of the bundle
    after = evaluate_heldout(vol, work, split, pred, review=read_review(work))
    for k in ("precision", "recall", "f1", "n_predicted"):
        assert after["classifier"][k] == before["classifier"][k], k
    m = json.loads((work / "metrics.json").read_text())
    assert m["specimens_after_classifier"]["reviews_used"] == 1
    clf = json.loads((work / "heldout" / "exports" / "classifier.json").read_text())
    assert clf["from_review"] == 1 and m["provenance"]["classifier_seed"] == clf["seed"] == 0
    assert m["provenance"]["reject_threshold"] == clf["reject_threshold"]


def test_a_missed_small_fossil_counts_against_recall():
    shape = (20, 40, 40)
    truth = np.zeros(shape, np.uint8)
    truth[ball(shape, (10, 10, 10), 6)] = 1
    truth[ball(shape, (10, 30, 30), 3)] = 2  # 123 voxels, under the extraction's minimum of 250
    pred = np.where(ball(shape, (10, 10, 10), 6), 1, 0).astype(np.uint8)
    out = match_specimens(truth, pred, CODES, 26, 250)
    assert (out["n_true"], out["n_matched"], out["recall"], out["n_true_below_min_size"]) == (2, 1, 0.5, 1)


def test_save_metrics_scores_the_test_block_only(tmp_path):
    labels = np.zeros((10, 4, 4), np.uint8)
    labels[8:, :2] = 1
    vol = make_case(tmp_path)[0]
    vol.images, vol.labels, vol.stems = np.zeros_like(labels), labels, [str(z) for z in range(10)]
    pred = labels.copy()
    pred[:8] = 1  # wrong everywhere outside the test block (the validation block too): must not count
    split = split_volume(vol, 0.2, 0.1, gap_slices=0)
    m = save_metrics(tmp_path, vol, pred, split, extra={"model": "x"})
    assert m["test_slices"] == [8, 9] and m["iou"]["foraminifera"] == 1.0 and m["model"] == "x"
    assert "mean_iou" not in m and m["mean_iou_fossils"] == 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["confusion_matrix"] == [[16, 0, 0], [0, 16, 0], [0, 0, 0]]


def test_left_out_voxels_are_not_scored(tmp_path):
    """A specimen taller than any gap reaches both blocks: its test voxels count nowhere, and a prediction lying on
    them is no false specimen."""
    shape = (40, 32, 32)
    vol, pred, work = _labelled(tmp_path, shape, [((24, 16, 16), 14, 2), ((36, 4, 28), 2, 1)],
                                [((24, 16, 16), 14, 1)])  # the tall one predicted as the wrong class everywhere
    split = split_volume(vol, 0.2, 0.1)
    assert split.left_out["specimens"] == 1
    m = save_metrics(work, vol, pred, split)
    assert m["iou"]["ostracod"] is None and m["provenance"]["split"]["left_out"]["voxels"] > 0  # none scored
    out = match_specimens(vol.labels[32:], pred[32:], CODES, 26, 20, ignore=left_out_mask(vol, split))
    assert (out["n_true"], out["n_predicted"]) == (1, 0)


PROVENANCE = {k: None for k in PROVENANCE_KEYS}  # as save_metrics records it


def test_evaluation_table(tmp_path):
    """Every row carries its provenance, the run's from metrics.json where the row has none; rows without one (no
    scoring cell ran) are refused."""
    scores = {"iou": {"bg": 0.99, "foram": 0.5}, "dice": {"bg": 0.99, "foram": 0.667}, "mean_iou_fossils": 0.5,
              "pixel_acc_nonbg": 0.7}
    rows = [evaluation_row("k=3", "segmentation", scores, None),
            evaluation_row("k=3", "extraction", scores, {"precision": 1.0, "recall": 0.5, "f1": 0.667, "class_f1": 0.5})]
    with pytest.raises(ValueError, match="provenance"):
        write_evaluation(tmp_path, rows, ["bg", "foram"])
    (tmp_path / "metrics.json").write_text(json.dumps({"provenance": {**PROVENANCE, "seed": 4}}))
    md = write_evaluation(tmp_path, rows, ["bg", "foram"])
    assert md == (tmp_path / "evaluation.md").read_text() == evaluation_markdown(rows, ["bg", "foram"])
    lines = md.splitlines()
    assert lines[0].startswith("| variant | step | IoU bg | IoU foram | Dice foram | mean IoU fossils")
    assert lines[2] == "| k=3 | segmentation | 0.99 | 0.50 | 0.67 | 0.50 | 0.70 | n/a | n/a | n/a | n/a |"
    assert lines[3].endswith("| 1.00 | 0.50 | 0.67 | 0.50 |")
    written = json.loads((tmp_path / "evaluation.json").read_text())["rows"]
    assert written[1]["specimen_recall"] == 0.5 and all(r["provenance"]["seed"] == 4 for r in written)


def test_describe_run_says_what_was_found_how_well_and_where(tmp_path):
    """The end-of-run summary: specimens by class (flagged ones apart), the held-out IoU of the final labels beside the
    raw segmentation's, specimens found and F1, and where the gallery, catalogue and review notebook are."""
    text = describe_run(tmp_path)
    assert "no catalogue" in text and "no ground truth" in text
    exp = tmp_path / "exports"
    exp.mkdir()
    pd.DataFrame({"id": [1, 2, 3, 4], "class": ["foram", "foram", "ostracod", "not a fossil"],
                  "flagged": [False, False, False, True]}).to_csv(exp / "fossils.csv", index=False)
    (exp / "gallery.png").write_bytes(b"")
    codes = ["bg", "foram", "ostracod"]
    scores = lambda f, o: {"iou": {"bg": 0.99, "foram": f, "ostracod": o}, "dice": {}, "mean_iou_fossils": 0,  # noqa: E731
                           "pixel_acc_nonbg": 0}
    (tmp_path / "metrics.json").write_text(json.dumps({"test_slices": [51, 63], "provenance": PROVENANCE}))
    write_evaluation(tmp_path, [evaluation_row("k=3", "segmentation", scores(0.4, None), None),
                                evaluation_row("k=3", "+ specimen classifier", scores(0.71, 0.35),
                                               {"recall": 0.75, "f1": 0.8, "class_f1": 0.6, "n_true": 4})], codes)
    lines = describe_run(tmp_path, "notebooks/06_review.ipynb").splitlines()
    assert lines[0] == "Specimens found: 3 (2 foram, 1 ostracod); 1 more flagged 'not a fossil'"
    assert lines[1] == "Test block (slices 51-63), final labels (+ specimen classifier): IoU foram 0.71, ostracod 0.35"
    assert lines[2] == "  specimens found 3 of 4: F1 0.80, with the right class 0.60"
    assert lines[3] == "  raw segmentation: IoU foram 0.40, ostracod n/a"
    assert lines[4] == f"Gallery:    {exp / 'gallery.png'}" and str(exp / "fossils.csv") in lines[5]
    assert "notebooks/06_review.ipynb" in lines[6]
    write_evaluation(tmp_path, [evaluation_row("k=3", "extraction", scores(0.0, 0.0),  # no true specimen held out
                                               {"recall": None, "f1": None, "class_f1": None, "n_true": 0})], codes)
    assert "  no true specimen in the test block: no specimen scores" in describe_run(tmp_path).splitlines()
