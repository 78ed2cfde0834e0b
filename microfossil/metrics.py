"""Segmentation scores: true per-class IoU and Dice, and the published metric under its real name.

The study's "98 % IoU" is the pixel accuracy over the pixels whose true class is not the
background; here it is `pixel_acc_nonbg`, reported beside the per-class IoU it was mistaken for.
"""
from __future__ import annotations

import numpy as np

from .sparse import UNLABELLED as IGNORE  # a label value no score and no loss counts: voxels left unlabelled (sparse
#                                           labels), or of a specimen that also reaches another block


def confusion_matrix(pred, target, n_classes, chunk=1 << 24, ignore=None):
    """Confusion matrix (rows = true class, columns = predicted) of integer label arrays `pred` and `target`.

    Counted `chunk` voxels at a time, so a whole held-out block (196 M voxels for a
    full-size volume) is never widened to int64 at once. Voxels where boolean `ignore` is
    True, or whose `target` is `IGNORE`, are left out.
    """
    p, t = np.asarray(pred).reshape(-1), np.asarray(target).reshape(-1)
    keep = None if ignore is None else ~np.asarray(ignore, bool).reshape(-1)
    cm = np.zeros((n_classes, n_classes), np.int64)
    for i in range(0, p.size, chunk):
        pc, tc = p[i:i + chunk], t[i:i + chunk]
        if keep is not None:
            pc, tc = pc[keep[i:i + chunk]], tc[keep[i:i + chunk]]
        counted = tc != IGNORE
        if not counted.all():
            pc, tc = pc[counted], tc[counted]
        idx = tc.astype(np.int64) * n_classes + pc
        cm += np.bincount(idx, minlength=n_classes ** 2).reshape(n_classes, n_classes)
    return cm


def scores_from_confusion(cm, codes, background=0):
    """Per-class IoU and Dice, the fossil classes' means, and pixel accuracy over non-`background` pixels, from
    confusion `cm`.

    A class absent from both prediction and truth has IoU/Dice None and is left out of the
    means. The means are over the classes other than `background` only: the background,
    nearly every voxel, would lift a mean with it in to near 1 whatever the fossils score.
    `pixel_acc_nonbg` is what the published study called "IoU".
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp, true, pred = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (true + pred - tp)
        dice = 2 * tp / (true + pred)
    fg = [i for i in range(len(codes)) if i != background]
    nan_none = lambda v: None if np.isnan(v) else float(v)  # noqa: E731
    mean = lambda v, idx: nan_none(np.nanmean(v[idx])) if not np.isnan(v[idx]).all() else None  # noqa: E731
    fg_true = true[fg].sum()
    return {
        "iou": {c: nan_none(v) for c, v in zip(codes, iou)},
        "dice": {c: nan_none(v) for c, v in zip(codes, dice)},
        "mean_iou_fossils": mean(iou, fg),
        "mean_dice_fossils": mean(dice, fg),
        "pixel_acc": float(tp.sum() / cm.sum()) if cm.sum() else None,
        "pixel_acc_nonbg": float(tp[fg].sum() / fg_true) if fg_true else None,
    }


FOSSIL_THRESHOLDS = tuple(round(0.2 + 0.05 * i, 2) for i in range(13))  # 0.2 ... 0.8: the thresholds tried


def choose_fossil_threshold(counts):
    """The threshold of `FOSSIL_THRESHOLDS` with the highest foreground IoU for `counts` (`threshold_counts`),
    the one nearest 0.5 among equals; 0.5 when there is no fossil in the truth or the prediction. Returns
    `(threshold, {threshold: IoU})`."""
    inter, union = np.asarray(counts, float)
    if union.max() == 0:
        return 0.5, {}
    iou = inter / np.maximum(union, 1)
    best = max(range(len(iou)), key=lambda i: (round(iou[i], 6), -abs(FOSSIL_THRESHOLDS[i] - 0.5)))
    return FOSSIL_THRESHOLDS[best], {t: round(float(v), 4) for t, v in zip(FOSSIL_THRESHOLDS, iou)}
