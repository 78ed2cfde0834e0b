"""What the segmentation gets right, specimen by specimen: for each true specimen of one block of a finished run, its
class, whether its inside is empty (dark) or infilled (grey, sediment), and the share of its fossil-predicted voxels
(`predictions/labels.tif`) that have its class; then the 3D descriptors of the block's extracted specimens by true class.

    python bench/per_specimen.py --data-dir DATASET --work-dir RUN                  # the validation block (default)
    python bench/per_specimen.py --data-dir DATASET --work-dir RUN --block training
    python bench/per_specimen.py --data-dir DATASET --work-dir RUN --block test     # report only: never choose on it

The analysis behind docs/evaluation.md's "What the segmentation reads as the class: the infill, not the shape" (the
table of right-class shares by class and infill) and its descriptor statistics (`inner_walls` and the others by true
class). It reads the run's own split (`metrics.json`); a specimen counts in a block when it lies wholly in it (the
scan's ends may cut it). "Infilled": fewer than 1 % of its voxels darker than the matrix (the median grey of the
unlabelled voxels), where an empty specimen's dark inside puts 3 % or more of them (measured against the sample
generator's own record on development samples 0-2, 21 and 22: no specimen on the wrong side): a rule for any scan,
not the generator's record. Prints one JSON: `specimens` (one row each), `summary` (lowest-highest
right-class share and count per class and infill) and `descriptors` (min-max per true class of the specimens the
extraction found in the block, from `exports/features.csv`).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from microfossil.specimens import label_components, majority_class  # noqa: E402
from microfossil.volume import load_volume  # noqa: E402

DESCRIPTORS = ("inner_walls", "solidity", "principal_box_fill", "elongation", "log_voxels")


def _blocks(work_dir):
    """{block: (start, stop)} from the split the run recorded in `metrics.json`."""
    m = json.loads((Path(work_dir) / "metrics.json").read_text())
    split = (m.get("provenance") or {}).get("split") or m.get("split")
    if not split:
        raise SystemExit(f"{work_dir}/metrics.json records no split: run 05 with ground truth first")
    rng = lambda r: (r[0], r[1] + 1) if r else (0, 0)  # noqa: E731
    return {"training": rng(split["train_slices"]), "validation": rng(split.get("valid_slices")),
            "test": rng(split.get("test_slices", split.get("valid_slices")))}


DARK_SHARE = 0.01  # an infilled specimen has fewer of its voxels than this darker than the matrix


def matrix_grey(vol):
    """The matrix's grey level: the median of the unlabelled voxels of about 16 slices spread over the scan."""
    z = np.linspace(0, len(vol.images) - 1, min(16, len(vol.images))).round().astype(int)
    return float(np.median(np.concatenate([np.asarray(vol.images[k])[np.asarray(vol.labels[k]) == 0] for k in z])))


def specimen_rows(vol, pred, start, stop, connectivity=26):
    """One row per true specimen wholly in slices `[start, stop)`."""
    truth = np.asarray(vol.labels[start:stop])
    images, pred = np.asarray(vol.images[start:stop]), np.asarray(pred[start:stop])
    cc, n, counts, boxes = label_components(truth > 0, connectivity)
    cls = majority_class(cc, truth, n, len(vol.codes))
    matrix, rows = matrix_grey(vol), []
    for i in range(1, n + 1):
        bb = boxes[i]
        if (bb[0].start == 0 and start > 0) or (bb[0].stop == stop - start and stop < len(vol.images)):
            continue  # it reaches past the block (into a gap): not wholly in it
        mask = cc[bb] == i
        fossil = mask & (pred[bb] > 0)
        dark = float((images[bb][mask] < matrix).mean())
        rows.append({"z": [int(bb[0].start + start), int(bb[0].stop + start - 1)], "class": vol.codes[int(cls[i])],
                     "voxels": int(counts[i]), "infilled": bool(dark < DARK_SHARE), "darker_than_matrix": round(dark, 3),
                     "fossil_predicted": int(fossil.sum()),
                     "right_class_share": round(float((pred[bb][fossil] == cls[i]).mean()), 3) if fossil.any() else None})
    return rows


def summary(rows):
    """Per class and infill: how many specimens, and the lowest and highest right-class share."""
    out = {}
    for r in rows:
        out.setdefault(f"{r['class']}, {'infilled' if r['infilled'] else 'empty'}", []).append(r["right_class_share"])
    def spread(v):
        v = [x for x in v if x is not None]
        return [min(v), max(v)] if v else None
    return {k: {"specimens": len(v), "right_class_share": spread(v)} for k, v in sorted(out.items())}


def descriptor_ranges(work_dir, codes, start, stop):
    """Min-max of `DESCRIPTORS` per true class over the extracted specimens lying wholly in slices `[start, stop)`."""
    import pandas as pd
    exp = Path(work_dir) / "exports"
    feats, cat = pd.read_csv(exp / "features.csv"), pd.read_csv(exp / "fossils.csv")
    inside = cat.set_index("id").loc[feats["id"]]
    feats = feats[((inside["z0"] >= start) & (inside["z1"] <= stop)).to_numpy()]
    truth = feats[[f"truth_{c}" for c in codes]].to_numpy()
    true_class = np.where(truth[:, 0] * 2 >= truth.sum(1), "not a fossil", np.asarray(codes[1:])[truth[:, 1:].argmax(1)])
    return {c: {d: [round(float(feats.loc[true_class == c, d].min()), 3), round(float(feats.loc[true_class == c, d].max()), 3)]
                for d in DESCRIPTORS if d in feats} | {"specimens": int((true_class == c).sum())}
            for c in sorted(set(true_class))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="the labelled dataset the run predicted")
    ap.add_argument("--work-dir", required=True, help="the run folder (predictions/labels.tif, metrics.json, exports/)")
    ap.add_argument("--block", choices=["training", "validation", "test"], default="validation")
    ap.add_argument("--connectivity", type=int, default=26)
    args = ap.parse_args(argv)
    import tifffile
    vol = load_volume(args.data_dir)
    if vol.labels is None:
        raise SystemExit(f"{args.data_dir} has no ground truth: nothing to compare with")
    start, stop = _blocks(args.work_dir)[args.block]
    if stop <= start:
        raise SystemExit(f"the run has no {args.block} block")
    pred = tifffile.imread(Path(args.work_dir) / "predictions" / "labels.tif").reshape(vol.shape)
    rows = specimen_rows(vol, pred, start, stop, args.connectivity)
    out = {"block": args.block, "slices": [start, stop - 1], "specimens": rows, "summary": summary(rows),
           "descriptors": descriptor_ranges(args.work_dir, vol.codes, start, stop)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
