"""Metrics against hand-computed values."""
import math

import numpy as np
import torch

import utils


def test_sync_free_confusion_counts_like_bincount(monkeypatch):
    """The scatter-add count used on the GPU (no read-back of the input's min and max, which `torch.bincount` does
    there) gives bincount's counts, for any number of classes and voxels; the chunked public version too."""
    g = torch.Generator().manual_seed(0)
    for n, numel in ((3, 1000), (5, 257), (2, 1), (4, 0)):
        pred, target = torch.randint(0, n, (numel,), generator=g), torch.randint(0, n, (numel,), generator=g)
        want = torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)
        with monkeypatch.context() as m:
            m.setattr(torch, "bincount", None)  # the scatter path must not use it
            got = utils._confusion(pred, target, n, scatter=True)
        assert got.dtype == torch.long and torch.equal(got, want), (n, numel)
        assert np.array_equal(utils.confusion_matrix(pred.numpy(), target.numpy(), n, chunk=100), want.numpy())


def test_confusion_and_scores_by_hand():
    target = np.array([[0, 0, 1, 1],
                       [0, 2, 2, 1]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 0, 0]])
    cm = utils.confusion_matrix(pred, target, 3)
    # rows = truth, cols = prediction
    assert cm.tolist() == [[2, 1, 0],
                           [1, 2, 0],
                           [1, 0, 1]]
    s = utils.segmentation_scores(cm, ["rock", "foram", "ostracod"])
    # IoU = tp / (true + pred - tp): rock 2/(3+4-2), foram 2/(3+3-2), ostracod 1/(2+1-1)
    assert math.isclose(s["iou"]["rock"], 2 / 5)
    assert math.isclose(s["iou"]["foram"], 2 / 4)
    assert math.isclose(s["iou"]["ostracod"], 1 / 2)
    # Dice = 2 tp / (true + pred)
    assert math.isclose(s["dice"]["rock"], 4 / 7)
    assert math.isclose(s["dice"]["foram"], 4 / 6)
    assert math.isclose(s["dice"]["ostracod"], 2 / 3)
    assert math.isclose(s["mean_iou"], (2 / 5 + 1 / 2 + 1 / 2) / 3)
    assert math.isclose(s["mean_iou_fossils"], 1 / 2)
    assert math.isclose(s["pixel_acc"], 5 / 8)
    # the published "IoU": accuracy over pixels whose TRUE class is not background: (2 + 1) / (3 + 2)
    assert math.isclose(s["pixel_acc_nonbg"], 3 / 5)


def test_absent_class_is_none_and_left_out_of_means():
    cm = np.array([[5, 0, 0], [0, 3, 0], [0, 0, 0]])
    s = utils.segmentation_scores(cm, ["bg", "a", "b"])
    assert s["iou"]["b"] is None and s["dice"]["b"] is None
    assert s["mean_iou"] == 1.0 and s["mean_iou_fossils"] == 1.0


def test_background_never_predicted_gives_zero_not_nan():
    cm = np.array([[0, 4], [0, 4]])
    s = utils.segmentation_scores(cm, ["bg", "fossil"])
    assert s["iou"]["bg"] == 0.0 and s["pixel_acc_nonbg"] == 1.0


def test_seg_metrics_accumulate_over_batches():
    """The fastai metrics share one confusion matrix and give the same numbers as the whole-array scores."""
    codes = ["bg", "a", "b"]
    ms = utils.seg_metrics(codes)
    names = [m.name for m in ms]
    assert names == ["mean_iou", "iou_bg", "iou_a", "iou_b", "dice_bg", "dice_a", "dice_b", "acc_nonbg"]
    rng = np.random.default_rng(0)
    ys = [torch.from_numpy(rng.integers(0, 3, (2, 5, 6))) for _ in range(3)]
    logits = [torch.randn(2, 3, 5, 6) for _ in range(3)]

    class FakeLearn:
        pass
    for m in ms:
        m.reset()
    for y, p in zip(ys, logits):
        learn = FakeLearn()
        learn.pred, learn.y = p, y
        for m in ms:  # fastai calls every metric once per batch
            m.accumulate(learn)
    allp = torch.cat([p.argmax(1) for p in logits])
    s = utils.segmentation_scores(utils.confusion_matrix(allp, torch.cat(ys), 3), codes)
    vals = dict(zip(names, (m.value for m in ms)))
    assert math.isclose(vals["iou_a"], s["iou"]["a"]) and math.isclose(vals["dice_b"], s["dice"]["b"])
    assert math.isclose(vals["acc_nonbg"], s["pixel_acc_nonbg"]) and math.isclose(vals["mean_iou"], s["mean_iou"])
