"""The specimen classifier: random forests on each specimen's 3D descriptors that re-class the catalogue.

In one slice a foraminifer and an ostracod can both look like a thin bright ring; their
3D shapes differ. It learns from the training block's ground truth and from the review
decisions (given as a table, `review`), and repaints `predictions/labels_clean.tif`. The
held-out evaluation trains it without the decisions on held-out specimens and applies it to
the held-out block's own extraction (`evaluation.evaluate_heldout`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import finish_commit, read_json, staged, write_csv, write_json
from .exports import draw_gallery
from .specimens import (GREY_DESCRIPTORS, LATER_DESCRIPTORS, NOT_A_FOSSIL, SIZE_DESCRIPTORS, SPECIMEN_FEATURES,
                        paint_classes)


def _training_labels(cat, feats, codes, blocks, review):
    """Labels to learn from, a Series by specimen id, and where each comes from.

    Ground truth (when `feats` has `truth_*` columns): specimens whose bounding box lies
    wholly in the training block (`blocks`, `Blocks`), labelled with their majority true
    fossil class, or `NOT_A_FOSSIL` when most of their voxels are background in the truth.
    Review (overrides the truth): accepted specimens get their taxon (their class at review
    time when no taxon was typed), rejected ones `NOT_A_FOSSIL`.
    """
    import pandas as pd
    labels, source = {}, {}
    tcols = [f"truth_{c}" for c in codes]
    if all(c in feats.columns for c in tcols):
        t = feats.set_index("id")[tcols].to_numpy()
        box = cat.set_index("id").loc[feats["id"]]
        inside = blocks.in_train(box["z0"].to_numpy(), box["z1"].to_numpy())
        for sid, counts, ok in zip(feats["id"], t, inside):
            if ok and counts.sum():  # (no labelled voxel under it, sparse labels: no truth)
                labels[int(sid)] = NOT_A_FOSSIL if counts[0] * 2 >= counts.sum() else codes[1 + int(np.argmax(counts[1:]))]
                source[int(sid)] = "truth"
    for d in ([] if review is None else review.to_dict("records")):
        sid = int(d["id"])
        if d.get("decision") == "rejected":
            labels[sid], source[sid] = NOT_A_FOSSIL, "review"
        elif d.get("decision") == "accepted":
            labels[sid], source[sid] = d.get("taxon") or d.get("predicted_class"), "review"
    return pd.Series(labels, dtype=object), source


REJECT_FLOOR = 0.5     # the classifier drops a specimen only with P(not a fossil) at least this...
REJECT_FALLBACK = 0.8  # ...and, with too few examples for out-of-bag probabilities (under 10), at least this


def reject_threshold(clf, y):
    """The probability of `NOT_A_FOSSIL` at or above which the classifier `clf` (a fitted random forest) may drop a
    specimen, and why: just above the highest out-of-bag probability of `NOT_A_FOSSIL` it gave any fossil among its
    own examples `y` (so that none of them would have been dropped), and at least `REJECT_FLOOR`. Out-of-bag: each
    example scored by the trees that did not see it, as a new specimen would be. (None, why) when it has no
    `NOT_A_FOSSIL` example (it then drops nothing)."""
    classes = list(clf.classes_)
    if NOT_A_FOSSIL not in classes:
        return None, f"no {NOT_A_FOSSIL!r} example"
    oob = getattr(clf, "oob_decision_function_", None)
    if oob is None:
        return REJECT_FALLBACK, "fixed (too few examples for out-of-bag probabilities)"
    p = oob[np.asarray(y) != NOT_A_FOSSIL, classes.index(NOT_A_FOSSIL)]
    p = p[~np.isnan(p)]
    if not len(p) or p.max() + 0.01 < REJECT_FLOOR:
        return REJECT_FLOOR, "the floor (every fossil example well below it, out of bag)"
    return round(float(p.max()) + 0.01, 4), "just above every fossil example's out-of-bag probability"


def random_forest(seed, n_examples):
    """The classifier's random forest, unfitted (out-of-bag probabilities from 10 examples up, for
    `reject_threshold`; they do not change what it predicts)."""
    from sklearn.ensemble import RandomForestClassifier
    return RandomForestClassifier(n_estimators=300, class_weight="balanced", random_state=seed, n_jobs=1,
                                  oob_score=n_examples >= 10)


# What the class forest does not read (`SpecimenForests`): a specimen's size and its grey levels
CLASS_LEAVE_OUT = SIZE_DESCRIPTORS + GREY_DESCRIPTORS


class SpecimenForests:
    """The specimen classifier's two random forests, fitted on descriptors `X` (columns `cols`) and labels `y`.

    Which fossil class: a forest on the fossil examples, reading the shape alone (all descriptors but `class_leave_out`,
    by default `CLASS_LEAVE_OUT`: `SIZE_DESCRIPTORS` and `GREY_DESCRIPTORS`): a specimen larger or smaller than the examples of its class,
    or filled otherwise, is judged by its shape, not by which class its size or its infill's grey falls nearest (both
    vary from core to core, and neither with the class). Whether a fossil at all: only when some example is
    `NOT_A_FOSSIL` (a review's rejection, predicted junk), a forest on every descriptor (size tells a grain or a
    fragment), with its `reject_threshold`. `proba(X)` gives (labels, probabilities): each fossil class's probability
    times that of a fossil, and `NOT_A_FOSSIL`'s."""
    def __init__(self, X, y, cols, seed=0, class_leave_out=CLASS_LEAVE_OUT):
        X, y = np.asarray(X, float), np.asarray(y).astype(str)
        self.cols = list(cols)
        self.class_cols = [c for c in self.cols if c not in class_leave_out]
        self._class_idx = [self.cols.index(c) for c in self.class_cols]
        fossil = y != NOT_A_FOSSIL
        self.forest = random_forest(seed, int(fossil.sum())).fit(X[fossil][:, self._class_idx], y[fossil])
        self.reject = random_forest(seed, len(y)).fit(X, y) if (~fossil).any() else None
        # (without a "not a fossil" example, the class forest has no such class: no threshold, and why)
        self.threshold, self.threshold_from = reject_threshold(self.forest if self.reject is None else self.reject, y)

    def proba(self, X):
        X = np.asarray(X, float)
        labels, p = list(self.forest.classes_), self.forest.predict_proba(X[:, self._class_idx])
        if self.reject is None:
            return labels, p
        p_not = self.reject.predict_proba(X)[:, list(self.reject.classes_).index(NOT_A_FOSSIL)]
        return labels + [NOT_A_FOSSIL], np.c_[p * (1 - p_not)[:, None], p_not]


class Blocks:
    """The blocks of a split the classifier needs: the training block `[train_start, train_stop)` and where the test
    block starts (`test_start`; None: the scan has no test block, e.g. no ground truth)."""
    def __init__(self, train_start, train_stop, test_start=None):
        self.train_start, self.train_stop, self.test_start = train_start, train_stop, test_start

    def in_train(self, z0, z1):
        """True where a box `[z0, z1)` along z (numbers or arrays) lies wholly in the training block."""
        return (np.asarray(z0) >= self.train_start) & (np.asarray(z1) <= self.train_stop)

    def reaches_test(self, z1):
        """True where a box ending before slice `z1` reaches into the test block."""
        return np.zeros(np.shape(z1), bool) if self.test_start is None else np.asarray(z1) > self.test_start

    @classmethod
    def of(cls, split):
        """The blocks of a `split.Split`."""
        return cls(split.train_start, split.train_stop, split.test_start if len(split.test) else None)

    @classmethod
    def recorded(cls, work_dir):
        """The blocks of the split 05 recorded in `metrics.json` (None when it recorded none: no ground truth). A run of
        an earlier version recorded it at the top level, its test block as `valid_slices`."""
        m = read_json(Path(work_dir) / "metrics.json") or {}
        split = (m.get("provenance") or {}).get("split") or m.get("split") or {}
        if not split:
            return None
        train = split.get("train_slices") or []
        test = split.get("test_slices", split.get("valid_slices")) or []
        return cls(train[0] if train else 0, train[1] + 1 if train else 0, test[0] if test else None)


def reviews_in_training_block(review, cat, blocks):
    """The review decisions (a table with `id`) on specimens of catalogue `cat` that lie wholly in the training block of
    `blocks` (`Blocks`): the decisions a scored classifier may learn from, by the rule of the ground truth."""
    if review is None or not len(review) or blocks is None:
        return review
    inside = cat.loc[blocks.in_train(cat["z0"], cat["z1"]), "id"]
    return review[review["id"].isin(set(inside))]


def _read_run(folder):
    """The catalogue and descriptors of the extraction in `folder`, checked to describe the same specimens."""
    import pandas as pd
    finish_commit(folder)  # an extraction a kill cut in the middle of its commit
    exp_dir, pred_dir = Path(folder) / "exports", Path(folder) / "predictions"
    for p in (exp_dir / "fossils.csv", exp_dir / "features.csv", exp_dir / "extraction.json", pred_dir / "specimens.tif"):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: run the extraction cell of 05_predict_export first (same work_dir).")
    cat, feats = pd.read_csv(exp_dir / "fossils.csv"), pd.read_csv(exp_dir / "features.csv")
    if len(feats) != len(cat) or not (feats["id"].to_numpy() == cat["id"].to_numpy()).all():
        raise ValueError(f"{exp_dir / 'features.csv'} does not describe the specimens of {exp_dir / 'fossils.csv'}: "
                         "re-run the extraction cell of 05_predict_export.")
    absent = [c for c in SPECIMEN_FEATURES if c not in feats.columns]
    if absent:
        raise ValueError(f"{exp_dir / 'features.csv'} lacks the descriptor(s) {absent}: an earlier version of the "
                         "project wrote it. Re-run the extraction cell of 05_predict_export (the review is kept).")
    return cat, feats, read_json(exp_dir / "extraction.json")


def classify_specimens(work_dir, split=None, use_truth=True, review=None, min_examples=4, seed=0, apply_to=None,
                       examples=None):
    """Train the specimen classifier and re-score every specimen; one call after each round of review.

    Random forests (`SpecimenForests`: the class among the fossils from the descriptors that do not measure size,
    whether a fossil at all from all of them) on the 3D descriptors of `exports/features.csv` (not on the
    segmentation's class fractions: see the comment where its columns are chosen), trained on the ground truth of the
    training-block specimens (`use_truth`: the predicted ones, labelled as in
    `_training_labels`, and the true ones of `exports/truth_features.csv`) and on `review`,
    the review decisions (a table with `id`, `decision`, `taxon`, `predicted_class`, as
    `read_review` returns it). The training block is that of `split` (a `split.Split`;
    None: the split 05 recorded in `metrics.json`). Then, in `exports/fossils.csv` of
    `apply_to` (default `work_dir`; the held-out evaluation applies it to its own
    extraction): `class` is the classifier's class and `class_probability` its
    probability; the segmentation's class stays in `seg_class`; specimens it calls
    `NOT_A_FOSSIL` are `flagged` (kept, not deleted). `predictions/labels_clean.tif` is
    repainted (flagged specimens as background; a typed taxon that is not one of the
    classes keeps its segmentation class there), and the previews and gallery tiles whose
    class changed are drawn again (`exports.draw_gallery`). Writes `exports/classifier.json`. With no
    specimen, fewer than `min_examples` labelled specimens or a single label, nothing
    changes and None is returned; else the new catalogue.

    Calibrated to keep true specimens: a specimen is called `NOT_A_FOSSIL` only when that
    probability reaches `reject_threshold` (above what its forest gave, out of bag, to any
    fossil among its examples); otherwise it takes the likeliest fossil class. Only a review
    rejects a specimen below it.

    `examples` (a table of the 3D descriptors, with `label`) are more examples,
    from elsewhere: a model bundle's (`bundle.bundle_examples`, which names it in
    `examples.attrs["source"]`, as the catalogue's `classified_by` column does); examples measured before a descriptor
    of `LATER_DESCRIPTORS` existed make the forest read the others (`left_out` in classifier.json). The examples this run gives (labelled predicted
    specimens, true specimens, reviews) are written to `exports/classifier_examples.csv`, with
    their `source` and `origin` (this run), for the run's model bundle (`bundle.update_bundle`).
    """
    import pandas as pd
    cat, feats, extraction = _read_run(work_dir)
    target = Path(apply_to) if apply_to is not None else Path(work_dir)
    out_cat, out_feats, out_extraction = (cat, feats, extraction) if target == Path(work_dir) else _read_run(target)
    pred_dir = target / "predictions"
    if not len(out_cat):
        print("Specimen classifier: no specimen in the catalogue, nothing to classify.")
        return None
    for c in (cat, out_cat):
        if "seg_class" not in c.columns:
            c.insert(2, "seg_class", c["class"])
    codes = extraction["codes"]
    has_truth = use_truth and all(f"truth_{c}" in feats.columns for c in codes)
    blocks = Blocks.of(split) if split is not None else Blocks.recorded(work_dir)
    if has_truth and blocks is None:
        raise FileNotFoundError(f"No split recorded in {Path(work_dir) / 'metrics.json'}: run the scoring cell of "
                                "05_predict_export first, so that the classifier learns from the training block only.")
    y, source = _training_labels(cat, feats if has_truth else feats[["id"]], codes, blocks, review)
    # The 3D descriptors only, not the segmentation's class fractions (`frac_*`): on the training block those come
    # from a U-Net trained on those very voxels, far better than on new slices, and a forest taught by them learns
    # to repeat the segmentation's class where it is wrong (measured: docs/evaluation.md, "Class imbalance").
    cols = list(SPECIMEN_FEATURES)

    def table(cat, feats):
        return feats.set_index("id")[cols].fillna(0.0)
    X = table(cat, feats)
    X_fit, y_fit = X.loc[y.index].to_numpy(), y.to_numpy().astype(str)
    n_from = {"truth": list(source.values()).count("truth"), "review": list(source.values()).count("review"),
              "true specimens": 0}
    tf_path = Path(work_dir) / "exports" / "truth_features.csv"
    if has_truth and tf_path.exists():  # the true specimens of the training block: more (and cleaner) examples
        tf = pd.read_csv(tf_path)
        tf = tf[blocks.in_train(tf["z0"], tf["z1"])]
        if len(tf):
            t = tf[[f"truth_{c}" for c in codes[1:]]].to_numpy()
            X_fit = np.concatenate([X_fit, tf[cols].fillna(0.0).to_numpy()])
            y_fit = np.concatenate([y_fit, np.asarray(codes[1:])[t.argmax(1)]])
        n_from["true specimens"] = len(tf)
    src = [source[i] for i in y.index] + ["true specimen"] * n_from["true specimens"]
    mine = pd.DataFrame(X_fit, columns=cols).assign(label=y_fit, source=src, origin=Path(work_dir).resolve().name)
    # The run's examples travel in its model bundle: not the reviews of specimens in the test block, which would
    # teach the bundle's classifier the answers of the block that scores it (05 with model_path on this scan).
    if blocks is not None and blocks.test_start is not None:
        z1 = cat.set_index("id").loc[y.index, "z1"].to_numpy()
        test_review = np.r_[(np.asarray([source[i] for i in y.index]) == "review") & blocks.reaches_test(z1),
                            np.zeros(n_from["true specimens"], bool)]
        mine = mine[~test_review].reset_index(drop=True)
    n_from["bundle"], examples_from = 0, (examples.attrs.get("source", "other examples") if examples is not None else None)
    if examples is not None and len(examples):
        absent = [c for c in cols if c not in examples.columns or examples[c].isna().any()]
        foreign = [c for c in absent if c not in LATER_DESCRIPTORS]
        if foreign:
            raise ValueError(f"The classifier examples of {examples_from} lack the descriptor(s) {foreign}: they come "
                             "from another program or version; predict with a model bundle made by this one.")
        if absent:  # examples measured before a descriptor existed: the forest reads the descriptors all examples have
            print(f"Some classifier examples of {examples_from} predate the descriptor(s) {absent}: the classifier reads "
                  "the other descriptors (re-run 05 on the scans that gave them, with this version, to add them).")
            keep = [k for k, c in enumerate(cols) if c not in absent]
            X_fit, cols = X_fit[:, keep], [cols[k] for k in keep]
        X_fit = np.concatenate([X_fit, examples[cols].to_numpy()])  # no gap left: a descriptor with one is in `absent`
        y_fit = np.concatenate([y_fit, examples["label"].astype(str).to_numpy()])
        n_from["bundle"] = len(examples)
    sources = (f"{n_from['truth']} predicted specimens labelled from the ground truth, {n_from['true specimens']} true "
               f"specimens, {n_from['review']} from the review"
               + (f", {n_from['bundle']} from {examples_from}" if n_from["bundle"] else ""))
    write_csv(target / "exports" / "classifier_examples.csv", mine)  # even when too few to train on: a bundle keeps them
    if len(y_fit) < min_examples or len(set(y_fit)) < 2:
        print(f"Specimen classifier not trained: {len(y_fit)} examples ({sources}) with {len(set(y_fit))} different "
              f"label(s); it needs {min_examples} or more and two labels. Classes stay those of the segmentation.")
        return None
    forests = SpecimenForests(X_fit, y_fit, cols, seed)
    threshold, threshold_from = forests.threshold, forests.threshold_from
    cat = out_cat
    X = table(out_cat, out_feats)
    labels, proba = forests.proba(X.to_numpy())
    fossil = np.array([k for k, c in enumerate(labels) if c != NOT_A_FOSSIL])
    best = fossil[proba[:, fossil].argmax(1)]  # the likeliest fossil class...
    p_best = proba[np.arange(len(best)), best]
    p_not = proba[:, labels.index(NOT_A_FOSSIL)] if threshold is not None else np.zeros(len(proba))
    reject = p_not >= threshold if threshold is not None else np.zeros(len(proba), bool)  # ...unless sure enough
    cat["class"] = np.where(reject, NOT_A_FOSSIL, np.asarray(labels)[best])
    cat["class_probability"] = np.where(reject, p_not, p_best)
    cat["flagged"] = reject
    cat.drop(columns=[c for c in cat.columns if c.startswith("prob_")], inplace=True)  # an earlier round's labels
    for k, label in enumerate(labels):  # every label's probability, for the review and for bench/class_rules.py
        cat[f"prob_{label}"] = proba[:, k]
    cat["classified_by"] = " + ".join(([str(examples_from)] if n_from["bundle"] else [])
                                      + ([f"this run ({len(mine)} examples)"] if len(mine) else []))
    index = {c: k for k, c in enumerate(codes)}
    class_of_id = np.zeros(int(cat["id"].max()) + 1, np.uint8)
    for sid, cls, seg in zip(cat["id"], cat["class"], cat["seg_class"]):
        class_of_id[sid] = 0 if cls == NOT_A_FOSSIL else index.get(cls, index.get(seg, 0))
    info = {"n_examples": len(y_fit), "from_truth": n_from["truth"], "true_specimens": n_from["true specimens"],
            "from_review": n_from["review"], "from_bundle": n_from["bundle"], "bundle": examples_from,
            "training_slices": [blocks.train_start, blocks.train_stop - 1] if blocks and blocks.train_stop else None,
            "seed": seed,
            "examples_per_label": {str(k): int(v) for k, v in zip(*np.unique(y_fit, return_counts=True))},
            "classes": [str(c) for c in labels], "oob_accuracy": getattr(forests.forest, "oob_score_", None),
            "features": forests.class_cols, "reject_features": forests.cols if forests.reject is not None else None,
            "left_out": [c for c in SPECIMEN_FEATURES if c not in cols],
            "importance": dict(zip(forests.class_cols, np.round(forests.forest.feature_importances_, 4).tolist())),
            "changed_class": int((cat["class"] != cat["seg_class"]).sum()), "flagged": int(cat["flagged"].sum()),
            "reject_threshold": threshold, "reject_threshold_from": threshold_from,
            "kept_below_threshold": int(((p_not > p_best) & ~reject).sum()),  # "not a fossil" likeliest, yet kept
            "per_class": {str(k): int(v) for k, v in cat["class"].value_counts().items()},
            "checkpoint": out_extraction.get("checkpoint")}
    with staged(target) as stage:  # the catalogue, the cleaned labels and the record together, or none of them
        (stage / "exports").mkdir()
        (stage / "predictions").mkdir()
        write_csv(stage / "exports" / "fossils.csv", cat)
        paint_classes(pred_dir, class_of_id, stage / "predictions", codes)
        write_json(stage / "exports" / "classifier.json", info)
    draw_gallery(target)  # the previews and tiles whose class changed
    print(f"Specimen classifier trained on {len(y_fit)} examples ({sources}): "
          f"{info['changed_class']} of {len(cat)} specimens changed class, "
          f"{info['flagged']} flagged as {NOT_A_FOSSIL!r}"
          + (f" (only at P >= {threshold:.2f}, {threshold_from}; {info['kept_below_threshold']} more kept below it)"
             if threshold is not None else "") + f". Now: {info['per_class']}.")
    return cat
