"""Scores of a run on its held-out block, from held-out data only: voxels, specimens, the metrics file, the table."""
import json

import numpy as np

import pandas as pd
import tifffile

from conftest import CODES, ball, make_case, save_probs
from microfossil.classifier import classify_specimens
from microfossil.evaluation import (describe_run, evaluate_heldout, evaluation_markdown, evaluation_row, match_specimens, save_metrics,
                                    write_evaluation)
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
    """An ostracod reaching from the gap into the held-out block, predicted right above the block and wrong in it:
    the catalogue (every voxel votes) calls it an ostracod, the held-out scores keep the error."""
    shape = (40, 32, 32)
    upper = np.indices(shape)[0] < 30
    vol, _, work = _labelled(tmp_path, shape, [((29, 16, 16), 5, 2), ((8, 16, 16), 4, 1)], [((8, 16, 16), 4, 1)])
    pred = np.where(ball(shape, (29, 16, 16), 5), np.where(upper, 2, 1), 0).astype(np.uint8)
    pred[ball(shape, (8, 16, 16), 4)] = 1
    save_probs(work, pred)
    split = split_volume(vol, 0.25)  # held out: 30-39; the ostracod starts at 24, so the gap is 24-29
    assert (split.n_train, split.valid_start) == (24, 30)
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
    assert metrics["split"]["train_slices"] == [0, 23] and metrics["split"]["gap_slices"] == 6
    assert metrics["seed"] == 3 and metrics["checkpoint"]["name"] == "full_unfrozen.attempt1"
    assert metrics["left_out"]["specimens"] == 0 and metrics["specimens"]["f1"] == 1.0


def test_review_of_a_held_out_specimen_leaves_the_reported_scores_unchanged(tmp_path):
    """Rejecting a false specimen of the held-out block in the review changes the catalogue, not the held-out F1."""
    shape = (60, 40, 40)
    train = [((6 + 10 * i, 10, 10), 3, 1) for i in range(3)] + [((8 + 10 * i, 28, 28), 6, 2) for i in range(3)]
    held = [((53, 10, 10), 3, 1)]
    false = ((54, 28, 28), 4)
    vol, pred, work = _labelled(tmp_path, shape, train + held, train + held + [(false[0], false[1], 1)], dark=[false])
    split = split_volume(vol, 0.2)
    assert split.n_train == split.valid_start == 48
    extract_fossils(vol, work, pred, min_voxels=20, max_exports=0)
    save_metrics(work, vol, pred, split)
    before = evaluate_heldout(vol, work, split, pred, review=read_review(work))
    assert before["classifier"] is not None and before["classifier"]["n_predicted"] == 2
    cat = pd.read_csv(work / "exports" / "fossils.csv")
    fp = int(cat.loc[(cat["centroid_z"] - 54).abs().lt(1) & (cat["centroid_y"] - 28).abs().lt(1), "id"].iloc[0])
    ReviewSession(work).set(fp, "rejected")
    classify_specimens(work, split, review=read_review(work))  # the catalogue: every decision counts
    assert pd.read_csv(work / "exports" / "fossils.csv").set_index("id").loc[fp, "flagged"]
    after = evaluate_heldout(vol, work, split, pred, review=read_review(work))
    for k in ("precision", "recall", "f1", "n_predicted"):
        assert after["classifier"][k] == before["classifier"][k], k
    assert json.loads((work / "metrics.json").read_text())["specimens_after_classifier"]["reviews_used"] == 0


def test_a_missed_small_fossil_counts_against_recall():
    shape = (20, 40, 40)
    truth = np.zeros(shape, np.uint8)
    truth[ball(shape, (10, 10, 10), 6)] = 1
    truth[ball(shape, (10, 30, 30), 3)] = 2  # 123 voxels, under the extraction's minimum of 250
    pred = np.where(ball(shape, (10, 10, 10), 6), 1, 0).astype(np.uint8)
    out = match_specimens(truth, pred, CODES, 26, 250)
    assert (out["n_true"], out["n_matched"], out["recall"], out["n_true_below_min_size"]) == (2, 1, 0.5, 1)


def test_save_metrics_scores_the_held_out_block_only(tmp_path):
    labels = np.zeros((10, 4, 4), np.uint8)
    labels[8:, :2] = 1
    vol = make_case(tmp_path)[0]
    vol.images, vol.labels, vol.stems = np.zeros_like(labels), labels, [str(z) for z in range(10)]
    pred = labels.copy()
    pred[:8] = 1  # wrong everywhere outside the held-out block: must not count
    split = split_volume(vol, 0.2, gap_slices=0)
    m = save_metrics(tmp_path, vol, pred, split, extra={"model": "x"})
    assert m["heldout_slices"] == [8, 9] and m["iou"]["foraminifera"] == 1.0 and m["model"] == "x"
    assert json.loads((tmp_path / "metrics.json").read_text())["confusion_matrix"] == [[16, 0, 0], [0, 16, 0], [0, 0, 0]]


def test_left_out_voxels_are_not_scored(tmp_path):
    """A specimen taller than any gap reaches both blocks: its held-out voxels count nowhere, and a prediction lying on
    them is no false specimen."""
    shape = (40, 32, 32)
    vol, pred, work = _labelled(tmp_path, shape, [((24, 16, 16), 14, 2), ((36, 4, 28), 2, 1)],
                                [((24, 16, 16), 14, 1)])  # the tall one predicted as the wrong class everywhere
    split = split_volume(vol, 0.2)
    assert split.left_out["specimens"] == 1
    m = save_metrics(work, vol, pred, split)
    assert m["iou"]["ostracod"] is None and m["left_out"]["voxels"] > 0  # no ostracod voxel is scored
    out = match_specimens(vol.labels[32:], pred[32:], CODES, 26, 20, ignore=left_out_mask(vol, split))
    assert (out["n_true"], out["n_predicted"]) == (1, 0)


def test_evaluation_table(tmp_path):
    scores = {"iou": {"bg": 0.99, "foram": 0.5}, "dice": {"bg": 0.99, "foram": 0.667}, "mean_iou_fossils": 0.5,
              "pixel_acc_nonbg": 0.7}
    rows = [evaluation_row("k=3", "segmentation", scores, None),
            evaluation_row("k=3", "extraction", scores, {"precision": 1.0, "recall": 0.5, "f1": 0.667, "class_f1": 0.5})]
    md = write_evaluation(tmp_path, rows, ["bg", "foram"])
    assert md == (tmp_path / "evaluation.md").read_text() == evaluation_markdown(rows, ["bg", "foram"])
    lines = md.splitlines()
    assert lines[0].startswith("| variant | step | IoU bg | IoU foram | Dice foram | mean IoU fossils")
    assert lines[2] == "| k=3 | segmentation | 0.99 | 0.50 | 0.67 | 0.50 | 0.70 | n/a | n/a | n/a | n/a |"
    assert lines[3].endswith("| 1.00 | 0.50 | 0.67 | 0.50 |")
    assert json.loads((tmp_path / "evaluation.json").read_text())["rows"][1]["specimen_recall"] == 0.5


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
    write_evaluation(tmp_path, [evaluation_row("k=3", "segmentation", scores(0.4, None), None),
                                evaluation_row("k=3", "+ specimen classifier", scores(0.71, 0.35),
                                               {"recall": 0.75, "f1": 0.8, "class_f1": 0.6, "n_true": 4})], codes)
    (tmp_path / "metrics.json").write_text(json.dumps({"heldout_slices": [51, 63]}))
    lines = describe_run(tmp_path, "notebooks/06_review.ipynb").splitlines()
    assert lines[0] == "Specimens found: 3 (2 foram, 1 ostracod); 1 more flagged 'not a fossil'"
    assert lines[1] == "Held-out block (slices 51-63), final labels (+ specimen classifier): IoU foram 0.71, ostracod 0.35"
    assert lines[2] == "  specimens found 3 of 4: F1 0.80, with the right class 0.60"
    assert lines[3] == "  raw segmentation: IoU foram 0.40, ostracod n/a"
    assert lines[4] == f"Gallery:    {exp / 'gallery.png'}" and str(exp / "fossils.csv") in lines[5]
    assert "notebooks/06_review.ipynb" in lines[6]
    write_evaluation(tmp_path, [evaluation_row("k=3", "extraction", scores(0.0, 0.0),  # no true specimen held out
                                               {"recall": None, "f1": None, "class_f1": None, "n_true": 0})], codes)
    assert "  no true specimen in the held-out block: no specimen scores" in describe_run(tmp_path).splitlines()
