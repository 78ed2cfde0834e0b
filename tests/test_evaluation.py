"""Scores of a run: object-level matching on the validation block, the metrics file and the evaluation table."""
import json

import numpy as np

from conftest import ball, make_case, save_probs
from microfossil.evaluation import evaluate_specimens, evaluation_markdown, evaluation_row, save_metrics, write_evaluation
from microfossil.extraction import extract_fossils


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
    extract_fossils(vol, work, pred, min_voxels=20)
    (work / "metrics.json").write_text(json.dumps({"mean_iou": 0.5}))
    out = evaluate_specimens(vol, work, valid_pct=0.2)
    assert (out["n_true"], out["n_predicted"], out["n_matched"], out["n_matched_same_class"]) == (2, 2, 1, 0)
    assert out["precision"] == 0.5 and out["recall"] == 0.5 and out["f1"] == 0.5 and out["class_f1"] == 0
    assert out["per_class"]["ostracod"] == {"true": 1, "predicted": 1, "matched": 0}
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["mean_iou"] == 0.5 and metrics["specimens"]["f1"] == 0.5


def test_save_metrics_scores_the_validation_block_only(tmp_path):
    labels = np.zeros((10, 4, 4), np.uint8)
    labels[8:, :2] = 1
    vol = make_case(tmp_path)[0]
    vol.images, vol.labels, vol.stems = np.zeros_like(labels), labels, [str(z) for z in range(10)]
    pred = labels.copy()
    pred[:8] = 1  # wrong everywhere in the training block: must not count
    m = save_metrics(tmp_path, vol, pred, 0.2, extra={"model": "x"})
    assert m["validation_slices"] == [8, 9] and m["iou"]["foraminifera"] == 1.0 and m["model"] == "x"
    assert json.loads((tmp_path / "metrics.json").read_text())["confusion_matrix"] == [[16, 0, 0], [0, 16, 0], [0, 0, 0]]


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
