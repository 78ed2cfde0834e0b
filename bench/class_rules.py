"""How each rule for a specimen's class would have done, on finished runs, without training anything again.

    python bench/class_rules.py runs/robustness/defaults/*_seed0 runs/robustness/no_weights/*_seed0

For every specimen of each run's test-block extraction (`heldout/`, extracted from the test
slices alone) that lies mostly on a true fossil, its true class (the majority of the truth under
it) against the class each rule gives it:
- `segmentation: mean probability`: today's extraction (the fossil class of highest mean
  probability over the specimen's voxels, `predictions/probs.npy`);
- `segmentation: mean log probability`: the same on log probabilities (a per-voxel vote that a
  few very sure voxels do not decide);
- `segmentation: loss weights undone`: mean log probability less the log of the class weight
  the model was trained with (`class_weights` in its record): the class the training block's own
  class ratio would give;
- `segmentation: balanced`: less also the log of each fossil class's share of the training
  block's fossil voxels: every fossil class equally likely before the voxels are seen, whatever
  the training block's ratio;
- `classifier`: the specimen classifier the run used (`prob_<class>` in the catalogue); `classifier refit`: today's
  class forest (`classifier.SpecimenForests`: no size descriptor, no grey level) fitted on the examples the run's
  classifier learnt from (`heldout/exports/classifier_examples.csv`); `classifier refit, with size`: one forest on
  every descriptor, size included (the classifier until b4eadf4), on the same examples; `classifier refit, with
  grey levels`: no size descriptor but the grey levels (the class forest from b4eadf4 until the grey levels left
  it); `classifier refit + reshaped copies`: today's with more examples, reshaped copies of the training block's
  true specimens (broken caps, a voxel thinner or thicker; `reshaped_examples`; not for a run of 05 with
  `model_path`);
- `classifier x segmentation (...)`: the classifier's probabilities times the segmentation's
  (normalised over the fossil classes; the segmentation's as the rule named gives them);
- `classifier, the segmentation's (balanced) where it is unsure`: the classifier's class unless its
  likeliest fossil class has a probability under `UNSURE`.
Counts the specimens given their right class, and the share of their voxels so (a large
specimen moves a class's IoU more). For choosing on development volumes: never on a volume whose
figures are to be called unseen.

A run of 05 with `model_path` (another scan, every slice its test block; `bench/robustness.py --shift`) is read the
same way: the training block whose class ratio the balanced rule undoes, the loss weights and the forest's examples
are those of the model bundle it predicted with (`bundle.json`'s `trained_on`, the record of the run that made the
bundle when it sits in that run's folder, and the bundle's `classifier_examples.csv`).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from microfossil.classifier import CLASS_LEAVE_OUT  # noqa: E402
from microfossil.specimens import SIZE_DESCRIPTORS  # noqa: E402
from microfossil.volume import load_volume  # noqa: E402

EPS = 1 / 255  # probs.npy holds probabilities in 1/255 steps: a 0 is "below 1/255"


def _model_weights(work):
    """The class weights the run's last model trained with (None when it had none, or when no record of its training
    is found: said on stderr)."""
    from ast import literal_eval
    record = work / "models" / "full_unfrozen.json"
    if not record.exists():
        print(f"{record} not found: the rules that undo the loss weights read the model as unweighted", file=sys.stderr)
        return None
    rec = json.loads(record.read_text())
    plan = literal_eval(rec["plan"]) if isinstance(rec["plan"], str) else rec["plan"]
    w = plan.get("class_weights")
    return None if w is None else np.asarray(w, float)


def specimens(work):
    """One dict per test-block specimen of run `work` lying mostly on a true fossil: its true class, voxels, the
    segmentation's mean probability and mean log probability of each class, and the classifier's probabilities."""
    import pandas as pd
    import tifffile
    metrics = json.loads((work / "metrics.json").read_text())
    prov = metrics["provenance"]
    vol = load_volume(prov["scan"]["dataset"])
    codes, K = list(vol.codes), len(vol.codes)
    t0 = prov["split"]["test_slices"][0]
    tr, train_labels, bundle = prov["split"]["train_slices"], vol.labels, None
    if not tr:  # 05 with model_path: the model, its training block and its classifier's examples are the bundle's
        bundle = Path(prov["checkpoint"]["source"])
        trained_on = json.loads((bundle / "bundle.json").read_text())["trained_on"]
        tr, train_labels = trained_on["train_slices"], load_volume(trained_on["dataset"]).labels
    weights = _model_weights(work if bundle is None else bundle.parent)  # (the run that made the bundle, beside it)
    held = work / "heldout"
    ids = tifffile.imread(held / "predictions" / "specimens.tif").reshape(vol.labels[t0:].shape)
    truth = np.asarray(vol.labels[t0:])
    probs = np.load(work / "predictions" / "probs.npy", mmap_mode="r")[t0:]
    cat = pd.read_csv(held / "exports" / "fossils.csv").set_index("id")
    train_counts = np.bincount(np.asarray(train_labels[tr[0]: tr[1] + 1]).ravel(), minlength=K).astype(float)
    prior = train_counts[1:] / train_counts[1:].sum()
    out = []
    for sid in cat.index:
        m = ids == sid
        t = np.bincount(truth[m], minlength=K)
        if t[0] * 2 >= t.sum():
            continue  # mostly background: no true class to get right
        p = np.stack([probs[:, k][m] for k in range(K)]).astype(float) / 255  # (K, voxels)
        row = {"id": int(sid), "true": codes[1 + int(np.argmax(t[1:]))], "voxels": int(m.sum()),
               "mean_p": p[1:].mean(1), "mean_logp": np.log(np.maximum(p[1:], EPS)).mean(1)}
        clf = [f"prob_{c}" for c in codes[1:]]
        row["clf"] = (cat.loc[sid, clf].to_numpy(float) if all(c in cat.columns for c in clf) else None)
        out.append(row)
    if (held / "exports" / "classifier_examples.csv").exists() and out:
        seed = prov.get("classifier_seed") or 0
        forests = [("refit", CLASS_LEAVE_OUT, None), ("with size", None, None), ("with grey levels", SIZE_DESCRIPTORS, None)]
        if bundle is None:  # (a bundle's run: its training specimens are on another scan)
            ext = json.loads((held / "exports" / "extraction.json").read_text())  # the true specimens' connectivity, size
            forests.append(("reshaped", CLASS_LEAVE_OUT,
                            reshaped_examples(vol, tr, seed, ext["connectivity"], ext["min_voxels"])))
        for name, class_leave_out, extra in forests:  # (None: one forest on every descriptor, size included)
            probs_of = refit(work, codes, seed, bundle, extra, class_leave_out)
            for row in out:
                row[f"clf {name}"] = probs_of[row["id"]]
    return out, codes, prior, weights



def reshaped_examples(vol, train_slices, seed=0, connectivity=26, min_voxels=150):
    """Descriptors (and true class, `label`) of reshaped copies of the true specimens wholly in the training block
    (`train_slices`: first and last; components of the ground truth at `connectivity`, `min_voxels` or more, as the
    run's extraction found its true specimens): two with a cap of 15-40 % of their voxels cut off by a
    plane of random direction (a broken shell), one a voxel thinner (if it keeps half its voxels), one a voxel
    thicker. Examples from which a forest could learn that a broken or differently outlined shell keeps its class."""
    import pandas as pd
    from scipy import ndimage
    from microfossil.specimens import descriptors, find_specimens
    labels, images, codes = np.asarray(vol.labels), np.asarray(vol.images), list(vol.codes)
    cc, _, _, parts = find_specimens(labels > 0, connectivity, min_voxels)
    rng = np.random.default_rng(seed)
    rows = []
    for i, box, _ in parts:
        if box[0].start < train_slices[0] or box[0].stop - 1 > train_slices[1]:
            continue
        lo, hi = (train_slices[0], 0, 0), (train_slices[1] + 1, *labels.shape[1:])  # room to grow, in the block
        box = tuple(slice(max(a, b.start - 1), min(z, b.stop + 1)) for b, a, z in zip(box, lo, hi))
        mask = cc[box] == i
        label = codes[1 + int(np.bincount(labels[box][mask], minlength=len(codes))[1:].argmax())]
        pts = np.argwhere(mask)
        copies = [ndimage.binary_dilation(mask, ndimage.generate_binary_structure(3, 1))]
        thinner = ndimage.binary_erosion(mask)
        copies += [thinner] if thinner.sum() * 2 >= mask.sum() else []
        for _ in range(2):
            d = rng.normal(size=3)
            along = (pts - pts.mean(0)) @ (d / np.linalg.norm(d))
            broken = mask.copy()
            broken[tuple(pts[along > np.quantile(along, rng.uniform(0.6, 0.85))].T)] = False
            lab, n = ndimage.label(broken, np.ones((3, 3, 3)))
            broken = lab == 1 + int(np.bincount(lab.ravel())[1:].argmax()) if n > 1 else broken  # the larger piece
            copies += [broken] if broken.sum() >= min_voxels // 3 else []
        rows += [{**descriptors(images[box], m), "label": label} for m in copies]
    return pd.DataFrame(rows)


def refit(work, codes, seed=0, bundle=None, extra=None, class_leave_out=CLASS_LEAVE_OUT):
    """{specimen id: probabilities of the fossil classes} from the class forest of 05's classifier
    (`classifier.SpecimenForests`, without the descriptors `class_leave_out`: today's `CLASS_LEAVE_OUT`, or
    `SIZE_DESCRIPTORS` alone as until the grey levels left it; None: one forest on every descriptor, as before
    b4eadf4), fitted on the examples the run's test-block evaluation learnt from
    (`heldout/exports/classifier_examples.csv`: the training block's; and the model bundle's,
    `bundle/classifier_examples.csv`, for a run of 05 with `model_path`; and `extra`, a table of more); applied to
    the test-block specimens' descriptors."""
    import pandas as pd
    from microfossil.classifier import NOT_A_FOSSIL, SpecimenForests, random_forest
    from microfossil.specimens import SPECIMEN_FEATURES
    files = [work / "heldout" / "exports" / "classifier_examples.csv"]
    files += [] if bundle is None else [bundle / "classifier_examples.csv"]
    ex = pd.concat([pd.read_csv(f) for f in files if f.exists()] + ([] if extra is None else [extra]))
    feats = pd.read_csv(work / "heldout" / "exports" / "features.csv").set_index("id")
    cols = list(SPECIMEN_FEATURES)
    X, y, new = ex[cols].fillna(0.0).to_numpy(), ex["label"].astype(str).to_numpy(), feats[cols].fillna(0.0).to_numpy()
    if class_leave_out is None:
        clf = random_forest(seed, len(y)).fit(X, y)
        labels, proba = list(clf.classes_), clf.predict_proba(new)
    else:  # (the class forest alone: "not a fossil" has no share in the fossil classes' probabilities here)
        keep = y != NOT_A_FOSSIL
        labels, proba = SpecimenForests(X[keep], y[keep], cols, seed, class_leave_out).proba(new)
    fossil = np.stack([proba[:, labels.index(c)] if c in labels else np.zeros(len(proba)) for c in codes[1:]], 1)
    return dict(zip(feats.index.astype(int), fossil))


def _norm(logits):
    e = np.exp(logits - logits.max())
    return e / e.sum()


def rules(row, prior, weights):
    """{rule: class index among the fossil classes} for one specimen."""
    w = np.ones(len(prior)) if weights is None else weights[1:]
    seg = {"mean probability": np.log(np.maximum(row["mean_p"], EPS)), "mean log probability": row["mean_logp"],
           "loss weights undone": row["mean_logp"] - np.log(w),
           "balanced": row["mean_logp"] - np.log(w) - np.log(np.maximum(prior, 1e-9))}
    out = {f"segmentation: {k}": int(np.argmax(v)) for k, v in seg.items()}
    if row.get("clf reshaped") is not None:
        out["classifier refit + reshaped copies"] = int(np.argmax(row["clf reshaped"]))
    for key, name in (("clf", "classifier"), ("clf refit", "classifier refit"), ("clf with size", "classifier refit, with size"),
                      ("clf with grey levels", "classifier refit, with grey levels")):
        if row.get(key) is None:
            continue
        c = row[key] / max(row[key].sum(), 1e-9)  # over the fossil classes ("not a fossil" aside)
        out[name] = int(np.argmax(c))
        for k in ("mean probability", "loss weights undone", "balanced"):
            out[f"{name} x segmentation ({k})"] = int(np.argmax(np.log(np.maximum(c, 1e-3)) + np.log(_norm(seg[k]))))
        out[f"{name}, the segmentation's (balanced) where it is unsure"] = (
            int(np.argmax(c)) if c.max() >= UNSURE else int(np.argmax(seg["balanced"])))
    return out


UNSURE = 0.6  # below this probability of its likeliest fossil class, the classifier is "unsure"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work_dirs", nargs="+", help="finished run folders (05 run with ground truth and save_probs)")
    ap.add_argument("--json", action="store_true", help="also print every run's counts as one JSON")
    args = ap.parse_args(argv)
    table, total = {}, {}
    for work in map(Path, args.work_dirs):
        if not (work / "metrics.json").exists():  # a run still training (a glob catches it): not one to count
            print(f"{work}: not finished, left out", file=sys.stderr)
            continue
        rows, codes, prior, weights = specimens(work)
        fossil = codes[1:]
        per = {}
        for r in rows:
            for rule, k in rules(r, prior, weights).items():
                a = per.setdefault(rule, [0, 0, 0, 0])
                right = fossil[k] == r["true"]
                a[0] += right
                a[1] += 1
                a[2] += r["voxels"] * right
                a[3] += r["voxels"]
        table[str(work)] = {rule: {"right": a[0], "of": a[1], "voxel_share": a[2] / max(a[3], 1)}
                            for rule, a in per.items()}
        for rule, a in per.items():
            t = total.setdefault(rule, [0, 0, 1.0])
            t[0] += a[0]
            t[1] += a[1]
            t[2] = min(t[2], a[2] / max(a[3], 1))
    runs = list(table)
    head = ["rule"] + [Path(r).parent.name + "/" + Path(r).name for r in runs] + ["all runs", "worst voxel share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rule, (right, n, worst) in total.items():
        cells = [f"{table[r][rule]['right']}/{table[r][rule]['of']} ({table[r][rule]['voxel_share']:.2f})"
                 if rule in table[r] else "n/a" for r in runs]
        lines.append("| " + " | ".join([rule, *cells, f"{right}/{n}", f"{worst:.2f}"]) + " |")
    print("Right class: specimens (share of their voxels), test blocks of development runs.\n")
    print("\n".join(lines))
    if args.json:
        print(json.dumps({"runs": table}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
