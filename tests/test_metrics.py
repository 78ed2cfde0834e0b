"""Metrics against hand-computed values."""
import math

import numpy as np

from microfossil.metrics import IGNORE, confusion_matrix, scores_from_confusion


def test_confusion_and_scores_by_hand():
    target = np.array([[0, 0, 1, 1],
                       [0, 2, 2, 1]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 0]])
    cm = confusion_matrix(pred, target, 3)
    # rows = truth, cols = prediction
    assert cm.tolist() == [[2, 1, 0],
                           [1, 2, 0],
                           [1, 0, 1]]
    s = scores_from_confusion(cm, ["rock", "foram", "ostracod"])
    # IoU = tp / (true + pred - tp): rock 2/(3+4-2), foram 2/(3+3-2), ostracod 1/(2+1-1)
    assert math.isclose(s["iou"]["rock"], 2 / 5)
    assert math.isclose(s["iou"]["foram"], 2 / 4)
    assert math.isclose(s["iou"]["ostracod"], 1 / 2)
    # Dice = 2 tp / (true + pred)
    assert math.isclose(s["dice"]["rock"], 4 / 7)
    assert math.isclose(s["dice"]["foram"], 4 / 6)
    assert math.isclose(s["dice"]["ostracod"], 2 / 3)
    assert math.isclose(s["mean_iou_fossils"], 1 / 2) and math.isclose(s["mean_dice_fossils"], (4 / 6 + 2 / 3) / 2)
    assert "mean_iou" not in s and "mean_dice" not in s  # no mean with the background in it (it lifts it to near 1)
    assert math.isclose(s["pixel_acc"], 5 / 8)
    # the published "IoU": accuracy over pixels whose TRUE class is not background: (2 + 1) / (3 + 2)
    assert math.isclose(s["pixel_acc_nonbg"], 3 / 5)


def test_confusion_counted_in_chunks_equals_one_pass():
    rng = np.random.default_rng(0)
    for n, numel in ((3, 1000), (5, 257), (2, 1), (4, 0)):
        pred, target = rng.integers(0, n, numel, dtype=np.uint8), rng.integers(0, n, numel, dtype=np.uint8)
        want = np.zeros((n, n), np.int64)
        np.add.at(want, (target, pred), 1)
        assert np.array_equal(confusion_matrix(pred, target, n, chunk=100), want), (n, numel)


def test_voxels_labelled_ignore_are_counted_nowhere():
    pred, target = np.array([0, 1, 2, 1], np.uint8), np.array([0, 1, IGNORE, IGNORE], np.uint8)
    assert confusion_matrix(pred, target, 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_absent_class_is_none_and_left_out_of_means():
    cm = np.array([[5, 0, 0], [0, 3, 0], [0, 0, 0]])
    s = scores_from_confusion(cm, ["bg", "a", "b"])
    assert s["iou"]["b"] is None and s["dice"]["b"] is None
    assert s["mean_iou_fossils"] == 1.0 and s["mean_dice_fossils"] == 1.0


def test_background_never_predicted_gives_zero_not_nan():
    cm = np.array([[0, 4], [0, 4]])
    s = scores_from_confusion(cm, ["bg", "fossil"])
    assert s["iou"]["bg"] == 0.0 and s["pixel_acc_nonbg"] == 1.0
