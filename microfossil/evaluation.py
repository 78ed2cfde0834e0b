"""Honest scores of a run on its test block: voxels (IoU, Dice, the published metric) and specimens
(detection precision, recall and F1), and the evaluation table that puts the steps of a run side by side.

Every test figure comes from test data only. The test block is the one the model never trained
on and nothing was chosen on (no per-epoch score, `lr_find` or threshold reads it), with a gap
before it (`split`); voxels of a specimen that still reaches the training block are left out. The
extraction and the specimen classifier are run again on the test block alone (`evaluate_heldout`,
in `work_dir/heldout/`): a specimen's class there comes from its test voxels only, and the
classifier learns from the training block's ground truth and from review decisions on specimens
wholly in the training block, the same rule. The ground truth is never filtered: a missed small
fossil counts against recall. Every record of a score (`metrics.json`, each row of the evaluation
table) carries its provenance (`PROVENANCE_KEYS`): where the blocks were, which model, which
settings, which scan.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .classifier import Blocks, classify_specimens, reviews_in_training_block
from .extraction import extract_fossils
from .io import PREDICTION_RECORD, finish_commit, read_json, write_json, write_text
from .metrics import IGNORE, confusion_matrix, scores_from_confusion
from .sparse import fossil_voxels
from .specimens import label_components, majority_class
from .split import left_out_mask
from .volume import volume_fingerprint

HELDOUT = "heldout"  # the folder, in work_dir, of the test block's own extraction
# What every record of a score says about where it came from (`provenance`)
PROVENANCE_KEYS = ("split", "seed", "checkpoint", "project_version", "project_commit", "scan", "context_slices",
                   "triplanar", "tta", "fossil_threshold", "fossil_threshold_chosen_on", "classifier_seed",
                   "reject_threshold")


def _commit():
    """The git commit of the project's code when it runs from a git checkout (with "+changes" when files differ from
    it), else None (a Drive copy, an installed package)."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        run = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _chosen_on(chosen, split):
    """In words, the slices 05 chose the fossil threshold on (`prediction.json`'s record), by block of `split`."""
    if not chosen:
        return "given (a number, or the model bundle's)"
    zs = np.asarray(chosen["slices"])
    n_train = int(((zs >= split.train_start) & (zs < split.train_stop)).sum())
    n_valid = int(((zs >= split.valid_start) & (zs < split.valid_stop)).sum()) if not split.published else 0
    return f"{n_train} training-block slices" + (f" and {n_valid} validation-block slices" if n_valid else "")


def provenance(work_dir, vol, split, info=None):
    """Where a score of `work_dir` comes from: the split (blocks, gaps and their rules, what was left out), the training
    seed and the checkpoint (`info` from `load_model`), the project version (and git commit), the scan (`volume_fingerprint`), the
    prediction's options (`predictions/prediction.json`) and, once it ran on the test block, the specimen classifier's
    seed and reject threshold (`heldout/exports/classifier.json`; None before)."""
    from microfossil import __version__
    pred = read_json(Path(work_dir) / "predictions" / PREDICTION_RECORD) or {}
    clf = read_json(Path(work_dir) / HELDOUT / "exports" / "classifier.json") or {}
    chosen = pred.get("fossil_threshold_chosen_on")
    return {"split": split.record(), "seed": (info or {}).get("seed"), "checkpoint": (info or {}).get("checkpoint"),
            "project_version": __version__, "project_commit": _commit(), "scan": volume_fingerprint(vol),
            "context_slices": pred.get("context_slices"), "triplanar": pred.get("triplanar"), "tta": pred.get("tta"),
            "fossil_threshold": pred.get("fossil_threshold"),
            "fossil_threshold_chosen_on": _chosen_on(chosen, split),
            "classifier_seed": clf.get("seed"), "reject_threshold": clf.get("reject_threshold")}


def save_metrics(work_dir, vol, pred, split, info=None, extra=None):
    """Score the raw prediction `pred` against `vol.labels` on the test block of `split` (left-out voxels aside); write
    and return `work_dir/metrics.json`, which also records its `provenance` (the split, what it left out, the model's
    seed and checkpoint from `info` (`load_model`), the prediction's options, the project version and the scan)."""
    t0 = split.test_start
    n = len(vol.codes)
    ignore = left_out_mask(vol, split)
    cm = confusion_matrix(np.asarray(pred[t0:]), np.asarray(vol.labels[t0:]), n, ignore=ignore)
    out = {"scores": "test block, full resolution, raw segmentation (predictions/labels.tif)" if len(split.test) else
           f"none: no test block ({split.gap_rule})",
           "provenance": provenance(work_dir, vol, split, info), "test_slices": split.plan()["test_slices"],
           "n_test_slices": int(len(split.test)), **scores_from_confusion(cm, vol.codes),
           "confusion_matrix": np.asarray(cm).tolist(), "codes": vol.codes, **(extra or {})}
    write_json(Path(work_dir) / "metrics.json", out)
    return out


def _specimens_of(labels, connectivity, min_voxels):
    """Components of the fossil voxels of `labels` with at least `min_voxels` voxels (smaller ones set to 0), their
    counts and ids."""
    cc, n, counts, _ = label_components(fossil_voxels(labels), connectivity)
    small = counts < min_voxels
    small[0] = False
    if small.any():
        cc[small[cc]] = 0
    return cc, counts, np.flatnonzero(~small)[1:] if n else np.zeros(0, np.int64)


def match_specimens(truth, pred, codes, connectivity, min_voxels, iou_threshold=0.5, ignore=None):
    """Object-level scores of label volume `pred` against `truth`.

    True specimens are every component of `truth` (`connectivity`), however small: a missed
    small fossil counts against recall. Predicted ones are the components of at least
    `min_voxels` voxels (the extraction's minimum). A predicted and a true one match when
    their IoU is at least `iou_threshold`. Voxels where `ignore` is True (specimens left out
    of the test scores) are no true specimen, and a predicted one lying mostly on them
    is left out too.
    """
    truth, pred = np.asarray(truth), np.asarray(pred)
    if ignore is not None and ignore.any():
        truth = np.where(ignore, 0, truth)
        pc, pn, pcounts, _ = label_components(pred > 0, connectivity)
        on = np.bincount(pc[ignore], minlength=pn + 1)
        drop = on * 2 >= pcounts
        drop[0] = False
        pred = np.where(drop[pc], 0, pred)
    gt, gt_counts, gt_ids = _specimens_of(truth, connectivity, 1)
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
            "n_true_below_min_size": int((gt_counts[gt_ids] < min_voxels).sum()),
            "per_class": {c: {"true": int((gt_cls[gt_ids] == k).sum()), "predicted": int((pr_cls[pr_ids] == k).sum()),
                              "matched": int(((gt_cls[g] == k) & same).sum())}
                          for k, c in enumerate(codes) if k}}


def _score_labels(folder, truth, codes, connectivity, min_voxels, ignore, iou_threshold):
    """Specimen and voxel scores of `folder/predictions/labels_clean.tif` (the test block) against `truth`."""
    import tifffile
    pred = tifffile.imread(Path(folder) / "predictions" / "labels_clean.tif").reshape(truth.shape)
    voxels = scores_from_confusion(confusion_matrix(pred, truth, len(codes), ignore=ignore), codes)
    if np.any(truth == IGNORE):  # sparse labels: no whole specimen to match against, only labelled voxels to score
        return {"not_measured": NOT_MEASURED, "iou_threshold": iou_threshold, "labels_clean": voxels}
    scores = match_specimens(truth, pred, codes, connectivity, min_voxels, iou_threshold, ignore)
    return {**scores, "labels_clean": voxels}


NOT_MEASURED = ("specimens not measured: the test block has unlabelled slices or voxels (sparse labels), so its "
                "specimens are not whole in the labels; its voxel scores count the labelled voxels")


def evaluate_heldout(vol, work_dir, split, pred=None, classify=True, review=None, seed=0, iou_threshold=0.5,
                     examples=None):
    """Object-level scores on the test block, from test data only; adds them to `work_dir/metrics.json`.

    Run after 05's extraction (and classifier) of the whole volume, with its parameters
    (`exports/extraction.json`). The prediction's test block is extracted again on its
    own into `work_dir/heldout/` (so no specimen's class there depends on a prediction in
    the other slices); the result is scored (`extraction`); with `classify`, the specimen
    classifier is trained on the training block and on the decisions of `review` about
    specimens wholly in the training block (the rule of the ground truth: no decision about a
    specimen of the gaps, the validation or the test block), applied to the test specimens,
    and scored again (`classifier`). Specimens are matched at IoU >= `iou_threshold`; each
    score gives counts, precision, recall, F1, `class_f1` (a match counts only with the
    right class) and `labels_clean`, the voxel scores of the cleaned labels. Returns
    `{"extraction": ..., "classifier": ... or None}`. `examples`: the classifier examples of a
    model from elsewhere (a bundle), as `classify_specimens` takes them; with a model
    trained on another volume, `split` makes every slice the test block (`split.whole_volume_test`).
    `metrics.json`'s `provenance` then gets the classifier's seed and reject threshold.
    """
    import pandas as pd
    work_dir = Path(work_dir)
    finish_commit(work_dir)  # a prediction or an extraction a kill cut in the middle of its swap
    if vol.labels is None:
        raise ValueError(f"{vol.source} has no labels: nothing to evaluate against.")
    if not len(split.test):
        return None
    params = read_json(work_dir / "exports" / "extraction.json")
    if params is None:
        raise FileNotFoundError(f"{work_dir / 'exports' / 'extraction.json'} not found: run the extraction cell first.")
    made_by = (read_json(work_dir / "predictions" / PREDICTION_RECORD) or {}).get("checkpoint")
    if params.get("checkpoint") != made_by:
        raise ValueError(f"The extraction in {work_dir / 'exports'} was made from another prediction (model "
                         f"{(params.get('checkpoint') or {}).get('name')}) than predictions/labels.tif (model "
                         f"{(made_by or {}).get('name')}): re-run the extraction cell.")
    t0, codes = split.test_start, list(vol.codes)
    held = work_dir / HELDOUT
    extract_fossils(vol, held, pred, params["voxel_size_um"], params["min_voxels_param"], params["min_volume_um3"],
                    params["connectivity"], params["split_touching"], params.get("split_min_distance_um"),
                    margin=params["margin"], max_exports=0, slices=slice(t0, None),
                    predictions=work_dir / "predictions")
    truth = np.asarray(vol.labels[t0:])
    ignore = left_out_mask(vol, split)
    score = lambda: _score_labels(held, truth, codes, params["connectivity"],  # noqa: E731
                                  json.loads((held / "exports" / "extraction.json").read_text())["min_voxels"],
                                  ignore, iou_threshold)
    out = {"extraction": score(), "classifier": None}
    (held / "exports" / "classifier.json").unlink(missing_ok=True)  # a classifier of an earlier run is no provenance
    if classify:
        review = reviews_in_training_block(review, pd.read_csv(work_dir / "exports" / "fossils.csv"), Blocks.of(split))
        if classify_specimens(work_dir, split, review=review, seed=seed, apply_to=held,
                              examples=examples) is not None:
            out["classifier"] = score()
    path = work_dir / "metrics.json"
    metrics = read_json(path, {})
    metrics["specimens"] = {"scores": "test block, its own extraction", "test_slices": split.plan()["test_slices"],
                            **out["extraction"]}
    metrics["specimens_after_classifier"] = out["classifier"] and {
        "scores": "test block, its own extraction, classifier trained on the training block only (ground truth and "
                  "reviews)", "reviews_used": 0 if review is None else len(review), **out["classifier"]}
    clf = read_json(held / "exports" / "classifier.json") or {}
    metrics.setdefault("provenance", {}).update(classifier_seed=clf.get("seed"),
                                                reject_threshold=clf.get("reject_threshold"))
    write_json(path, metrics)
    return out


def describe_specimen_scores(sp):
    """One line for the object-level scores of `evaluate_heldout` (its "extraction" or "classifier" entry)."""
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    if sp.get("not_measured"):
        return f"test block: {sp['not_measured']}"
    return (f"test block: {sp['n_true']} true specimens, {sp['n_predicted']} predicted, {sp['n_matched']} matched "
            f"(IoU >= {sp['iou_threshold']}): precision {f(sp['precision'])}, recall {f(sp['recall'])}, "
            f"F1 {f(sp['f1'])}, F1 with the right class {f(sp['class_f1'])}")


def variant_name(context_slices=1, triplanar=False, tta=False):
    """Short name of a segmentation variant, e.g. "k=3, tri-planar, flip TTA" ("k=1" is the published recipe)."""
    return ", ".join([f"k={int(context_slices)}"] + (["tri-planar"] if triplanar else []) + (["flip TTA"] if tta else []))


def evaluation_row(variant, step, scores, specimens, provenance=None):
    """One row of the evaluation table: voxel `scores` (from `scores_from_confusion`) and object `specimens` scores,
    with their `provenance` (`write_evaluation` puts in the run's, from `metrics.json`, where it is None)."""
    sp = specimens or {}
    return {"variant": variant, "step": step, "provenance": provenance, "iou": scores["iou"], "dice": scores["dice"],
            "mean_iou_fossils": scores["mean_iou_fossils"], "pixel_acc_nonbg": scores["pixel_acc_nonbg"],
            "specimen_precision": sp.get("precision"), "specimen_recall": sp.get("recall"), "specimen_f1": sp.get("f1"),
            "specimen_class_f1": sp.get("class_f1"), "n_true": sp.get("n_true"), "n_predicted": sp.get("n_predicted"),
            "n_matched": sp.get("n_matched"), "n_matched_same_class": sp.get("n_matched_same_class")}


SCORE_KEYS = ("mean_iou_fossils", "pixel_acc_nonbg", "specimen_precision", "specimen_recall", "specimen_f1",
              "specimen_class_f1")


def summarize_seeds(rows):
    """One row per (variant, step) from rows of several seeds: every score as `(mean, min, max, n)` over the seeds
    that have it (`n_seeds` is how many rows there were)."""
    groups = {}
    for r in rows:
        groups.setdefault((r["variant"], r["step"]), []).append(r)

    def spread(values):
        v = [x for x in values if x is not None]
        return (float(np.mean(v)), float(min(v)), float(max(v)), len(v)) if v else None
    out = []
    for (variant, step), rs in groups.items():
        row = {"variant": variant, "step": step, "n_seeds": len(rs)}
        for key in ("iou", "dice"):
            row[key] = {c: spread([r[key].get(c) for r in rs]) for c in rs[0][key]}
        for key in SCORE_KEYS + ("n_true", "n_predicted", "train_seconds", "predict_seconds"):
            row[key] = spread([r.get(key) for r in rs])
        out.append(row)
    return out


def _cell(v, digits=2):
    """A score as text: a number, or `mean (min-max)` for a spread over seeds; n/a when missing."""
    if v is None:
        return "n/a"
    if isinstance(v, (tuple, list)):
        mean, lo, hi, _ = v
        lo, hi = f"{lo:.{digits}f}", f"{hi:.{digits}f}"
        return f"{mean:.{digits}f} ({lo}–{hi})" if hi != lo else f"{mean:.{digits}f}"
    return f"{v:.{digits}f}"


def evaluation_markdown(rows, codes, extra=None):
    """The evaluation table as markdown: per-class IoU and Dice, the published metric, specimen P / R / F1;
    `extra` maps more column titles to row keys (numbers shown to the unit). A score over several seeds (rows from
    `summarize_seeds`) shows as `mean (min–max)`."""
    f = _cell
    fossil, extra = codes[1:], extra or {}
    head = (["variant", "step"] + [f"IoU {c}" for c in codes] + [f"Dice {c}" for c in fossil]
            + ["mean IoU fossils", "acc. non-bg (published 'IoU')", "specimen P", "R", "F1", "F1 right class", *extra])
    seeds = any("n_seeds" in r for r in rows)
    if seeds:
        head.insert(2, "seeds")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["variant"], r["step"]] + ([str(r.get("n_seeds", 1))] if seeds else [])
                 + [f(r["iou"].get(c)) for c in codes] + [f(r["dice"].get(c)) for c in fossil]
                 + [f(r[k]) for k in SCORE_KEYS]
                 + [_cell(r.get(k), 0) for k in extra.values()])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compact_markdown(summary, codes):
    """The accuracy table in short, one line per variant from `summarize_seeds` rows: the raw segmentation's and the
    final labels' IoU of each fossil class, specimen recall before and after the specimen classifier (a clean-up that
    drops no true specimen keeps it), and the final specimen F1 with the right class; each `mean (min–max)`."""
    by = {}
    for r in summary:
        by.setdefault(r["variant"], {})[r["step"]] = r
    fossil = codes[1:]
    head = (["variant", "runs"] + [f"raw IoU {c}" for c in fossil] + [f"final IoU {c}" for c in fossil]
            + ["recall: extraction", "final", "final F1 right class"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, steps in by.items():
        raw, ext = steps.get("segmentation"), steps.get("extraction")
        final = steps.get("+ specimen classifier") or ext
        if raw is None or ext is None:
            continue
        cells = ([variant, str(raw["n_seeds"])] + [_cell(raw["iou"].get(c)) for c in fossil]
                 + [_cell(final["iou"].get(c)) for c in fossil]
                 + [_cell(ext["specimen_recall"]), _cell(final["specimen_recall"]), _cell(final["specimen_class_f1"])])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_evaluation(work_dir, rows, codes):
    """Write this run's evaluation rows to `work_dir/evaluation.json` and `evaluation.md`, each row with its provenance
    (the run's `metrics.json` one where a row has none); return the markdown."""
    work_dir = Path(work_dir)
    run = (read_json(work_dir / "metrics.json") or {}).get("provenance")
    rows = [{**r, "provenance": r.get("provenance") or run} for r in rows]
    missing = [k for r in rows for k in PROVENANCE_KEYS if k not in (r["provenance"] or {})]
    if missing:
        raise ValueError(f"Evaluation rows without their provenance ({sorted(set(missing))}): run 05's scoring cell "
                         f"first, so that {work_dir / 'metrics.json'} records it.")
    md = evaluation_markdown(rows, codes)
    write_json(work_dir / "evaluation.json", {"codes": list(codes), "rows": rows})
    write_text(work_dir / "evaluation.md", md)
    return md


def describe_run(work_dir, review_notebook="notebooks/06_review.ipynb"):
    """A few lines a person reads at the end of a run: the specimens found by class, the test scores of the
    final labels (after extraction and the specimen classifier) beside the raw segmentation's, and where to look."""
    import pandas as pd
    work_dir = Path(work_dir)
    lines, exp = [], work_dir / "exports"
    cat_file = exp / "fossils.csv"
    if cat_file.exists():
        cat = pd.read_csv(cat_file)
        flagged = cat["flagged"].astype(bool) if "flagged" in cat else pd.Series(False, index=cat.index)
        counts = cat.loc[~flagged, "class"].value_counts()
        per_class = ", ".join(f"{n} {c}" for c, n in counts.items()) or "none"
        lines.append(f"Specimens found: {int((~flagged).sum())} ({per_class})"
                     + (f"; {int(flagged.sum())} more flagged 'not a fossil'" if flagged.any() else ""))
    else:
        lines.append("Specimens found: no catalogue (05_predict_export did not run)")
    ev = read_json(work_dir / "evaluation.json")
    if ev and ev.get("rows"):
        codes, rows = ev["codes"], ev["rows"]
        final, raw = rows[-1], rows[0]
        m = read_json(work_dir / "metrics.json") or {}
        iou = lambda r: ", ".join(f"{c} {r['iou'][c]:.2f}" if r["iou"].get(c) is not None else f"{c} n/a"  # noqa: E731
                                  for c in codes[1:])
        hs = m.get("test_slices") or m.get("heldout_slices") or ["?", "?"]
        lines.append(f"Test block (slices {hs[0]}-{hs[1]}), final labels ({final['step']}): "
                     f"IoU {iou(final)}")
        n_true, recall = final.get("n_true"), final.get("specimen_recall")
        num = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        if n_true == 0:
            lines.append("  no true specimen in the test block: no specimen scores")
        elif n_true is not None or final.get("specimen_f1") is not None:
            found = "?" if recall is None or n_true is None else round(recall * n_true)
            lines.append(f"  specimens found {found} of {n_true if n_true is not None else '?'}: "
                         f"F1 {num(final.get('specimen_f1'))}, with the right class {num(final.get('specimen_class_f1'))}")
        if raw is not final:
            lines.append(f"  raw segmentation: IoU {iou(raw)}")
    elif (work_dir / "metrics.json").exists():
        lines.append("Test block: see metrics.json (no evaluation table)")
    else:
        lines.append("Test block: no ground truth, nothing scored")
    gallery = exp / "gallery.png"
    if gallery.exists():
        lines.append(f"Gallery:    {gallery}")
    if cat_file.exists():
        lines.append(f"Catalogue:  {cat_file} (one folder per specimen beside it: CT and mask TIFFs, STL mesh, preview)")
    lines.append(f"Review:     open {review_notebook} (same work_dir) to accept, reject or re-class specimens")
    return "\n".join(lines)
