"""Honest scores of a run on its validation block: voxels (IoU, Dice, the published metric) and specimens
(detection precision, recall and F1), and the evaluation table that puts the steps of a run side by side."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .io import write_json, write_text
from .metrics import confusion_matrix, scores_from_confusion
from .specimens import label_components, majority_class
from .volume import split_slices


def save_metrics(work_dir, vol, pred, valid_pct=0.2, extra=None):
    """Score `pred` against `vol.labels` on the validation block; write and return `work_dir/metrics.json`."""
    _, valid_idx = split_slices(len(vol.images), valid_pct)
    n = len(vol.codes)
    cm = sum(confusion_matrix(pred[z], vol.labels[z], n) for z in valid_idx)
    out = {"validation_slices": [int(valid_idx[0]), int(valid_idx[-1])] if len(valid_idx) else [],
           "n_validation_slices": int(len(valid_idx)), **scores_from_confusion(cm, vol.codes),
           "confusion_matrix": np.asarray(cm).tolist(), "codes": vol.codes, **(extra or {})}
    write_json(Path(work_dir) / "metrics.json", out)
    return out


def _specimens_of(labels, connectivity, min_voxels):
    """Components of `labels > 0` with at least `min_voxels` voxels (smaller ones set to 0), their counts and ids."""
    cc, n, counts, _ = label_components(labels > 0, connectivity)
    small = counts < min_voxels
    small[0] = False
    if small.any():
        cc[small[cc]] = 0
    return cc, counts, np.flatnonzero(~small)[1:] if n else np.zeros(0, np.int64)


def match_specimens(truth, pred, codes, connectivity, min_voxels, iou_threshold=0.5):
    """Object-level scores of label volume `pred` against `truth`.

    Specimens are components (`connectivity`) of at least `min_voxels` voxels; a predicted
    and a true one match when their IoU is at least `iou_threshold`.
    """
    gt, gt_counts, gt_ids = _specimens_of(truth, connectivity, min_voxels)
    pr, pr_counts, pr_ids = _specimens_of(pred, connectivity, min_voxels)
    K = len(codes)
    gt_cls = majority_class(gt, truth, len(gt_counts) - 1, K)
    pr_cls = majority_class(pr, pred, len(pr_counts) - 1, K)
    both = (gt > 0) & (pr > 0)
    pairs, inter = np.unique(gt[both].astype(np.int64) * len(pr_counts) + pr[both], return_counts=True)
    g, p = pairs // len(pr_counts), pairs % len(pr_counts)
    ok = inter / (gt_counts[g] + pr_counts[p] - inter) >= iou_threshold  # above 0.5 a specimen matches one at most
    g, p = g[ok], p[ok]
    same = gt_cls[g] == pr_cls[p]

    def prf(tp, n_pred, n_true):
        return (tp / n_pred if n_pred else None, tp / n_true if n_true else None,
                2 * tp / (n_pred + n_true) if n_pred + n_true else None)
    precision, recall, f1 = prf(len(g), len(pr_ids), len(gt_ids))
    return {"iou_threshold": iou_threshold, "min_voxels": min_voxels,
            "connectivity": connectivity, "n_true": len(gt_ids), "n_predicted": len(pr_ids), "n_matched": int(len(g)),
            "n_matched_same_class": int(same.sum()), "precision": precision, "recall": recall, "f1": f1,
            "class_f1": prf(int(same.sum()), len(pr_ids), len(gt_ids))[2],
            "n_true_below_min_size": int((gt_counts[1:] < min_voxels).sum()),
            "per_class": {c: {"true": int((gt_cls[gt_ids] == k).sum()), "predicted": int((pr_cls[pr_ids] == k).sum()),
                              "matched": int(((gt_cls[g] == k) & same).sum())}
                          for k, c in enumerate(codes) if k}}


def evaluate_specimens(vol, work_dir, valid_pct=0.2, iou_threshold=0.5):
    """Object-level detection on the validation block: predicted vs true specimens matched at IoU >= `iou_threshold`.

    True specimens are the 3D components of the ground-truth fossil mask, predicted ones
    those of `predictions/labels_clean.tif`, both inside the validation block (the last
    `valid_pct` of slices) and both with the connectivity and minimum size of the
    extraction. Adds `specimens` to `work_dir/metrics.json` and returns it: counts,
    precision, recall, F1, and `class_f1` (a match counts only with the right class); and
    `labels_clean`, the voxel scores (IoU, Dice, ...) of `labels_clean.tif` on the block
    (specks dropped, classes from the extraction or the specimen classifier).
    """
    import tifffile
    work_dir = Path(work_dir)
    if vol.labels is None:
        raise ValueError(f"{vol.source} has no train_masks_labels/: nothing to evaluate against.")
    info = json.loads((work_dir / "exports" / "extraction.json").read_text())
    _, valid_idx = split_slices(len(vol.images), valid_pct)
    if len(valid_idx) == 0:
        return None
    z0, z1 = int(valid_idx[0]), int(valid_idx[-1]) + 1
    codes = list(vol.codes)
    truth = np.asarray(vol.labels[z0:z1])
    pred = tifffile.imread(work_dir / "predictions" / "labels_clean.tif", key=range(z0, z1)).reshape(truth.shape)
    out = {"validation_slices": [z0, z1 - 1],
           **match_specimens(truth, pred, codes, info["connectivity"], info["min_voxels"], iou_threshold),
           "labels_clean": scores_from_confusion(confusion_matrix(pred, truth, len(codes)), codes)}
    path = work_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics["specimens"] = out
    write_json(path, metrics)
    return out


def describe_specimen_scores(sp):
    """One line for the object-level scores returned by `evaluate_specimens`."""
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"validation block: {sp['n_true']} true specimens, {sp['n_predicted']} predicted, {sp['n_matched']} matched "
            f"(IoU >= {sp['iou_threshold']}): precision {f(sp['precision'])}, recall {f(sp['recall'])}, "
            f"F1 {f(sp['f1'])}, F1 with the right class {f(sp['class_f1'])}")


def variant_name(context_slices=1, triplanar=False, tta=False):
    """Short name of a segmentation variant, e.g. "k=3, tri-planar, flip TTA" ("k=1" is the published recipe)."""
    return ", ".join([f"k={int(context_slices)}"] + (["tri-planar"] if triplanar else []) + (["flip TTA"] if tta else []))


def evaluation_row(variant, step, scores, specimens):
    """One row of the evaluation table: voxel `scores` (from `scores_from_confusion`) and object `specimens` scores."""
    sp = specimens or {}
    return {"variant": variant, "step": step, "iou": scores["iou"], "dice": scores["dice"],
            "mean_iou_fossils": scores["mean_iou_fossils"], "pixel_acc_nonbg": scores["pixel_acc_nonbg"],
            "specimen_precision": sp.get("precision"), "specimen_recall": sp.get("recall"), "specimen_f1": sp.get("f1"),
            "specimen_class_f1": sp.get("class_f1"), "n_true": sp.get("n_true"), "n_predicted": sp.get("n_predicted")}


def evaluation_markdown(rows, codes, extra=None):
    """The evaluation table as markdown: per-class IoU and Dice, the published metric, specimen P / R / F1;
    `extra` maps more column titles to row keys (numbers shown to the unit)."""
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    fossil, extra = codes[1:], extra or {}
    head = (["variant", "step"] + [f"IoU {c}" for c in codes] + [f"Dice {c}" for c in fossil]
            + ["mean IoU fossils", "acc. non-bg (published 'IoU')", "specimen P", "R", "F1", "F1 right class", *extra])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["variant"], r["step"]] + [f(r["iou"].get(c)) for c in codes] + [f(r["dice"].get(c)) for c in fossil]
                 + [f(r[k]) for k in ("mean_iou_fossils", "pixel_acc_nonbg", "specimen_precision", "specimen_recall",
                                      "specimen_f1", "specimen_class_f1")]
                 + ["n/a" if r.get(k) is None else f"{r[k]:.0f}" for k in extra.values()])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_evaluation(work_dir, rows, codes):
    """Write this run's evaluation rows to `work_dir/evaluation.json` and `evaluation.md`; return the markdown."""
    work_dir = Path(work_dir)
    md = evaluation_markdown(rows, codes)
    write_json(work_dir / "evaluation.json", {"codes": list(codes), "rows": rows})
    write_text(work_dir / "evaluation.md", md)
    return md
