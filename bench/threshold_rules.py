"""Fossil or background, by which rule: the raw segmentation of a finished run labelled from its saved probabilities by
the plain arg-max, by "the fossil classes together above 0.5", and by each fossil threshold 05 can choose, scored on
one block of the run's split.

    python bench/threshold_rules.py --data-dir DATASET --work-dir RUN                 # the validation block (default)
    python bench/threshold_rules.py --data-dir DATASET --work-dir RUN --block test    # report only: never choose on it

The analysis behind docs/evaluation.md's "Fossil or background" and "The fossil threshold, chosen on the training block"
(foreground IoU and per-class IoU, arg-max against the threshold rules). It reads `predictions/probs.npy` (05 with
`save_probs=True`, the default: uint8 probabilities, tri-planar ones averaged) and the split recorded in
`metrics.json`; the final labels under another rule need 05 run again with `-p fossil_threshold T`. Prints one JSON:
per rule, the foreground IoU (every fossil class together) and each class's IoU, and which threshold the run's 05 chose
(`prediction.json`).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from microfossil.metrics import confusion_matrix, scores_from_confusion  # noqa: E402
from microfossil.prediction import FOSSIL_THRESHOLDS, voxel_labels  # noqa: E402
from microfossil.volume import load_volume  # noqa: E402


def labels_by(probs, rule):
    """Labels of uint8 probabilities `probs` (N x classes x ...): "argmax", or a fossil threshold (a number)."""
    return probs.argmax(1) if rule == "argmax" else voxel_labels(probs, 255, rule)


def score_rules(probs, truth, codes, chunk=8):
    """{rule: {"foreground_iou", "iou"}} over the slices of `probs` and `truth` (a block), `chunk` slices at a time."""
    rules = ["argmax", *FOSSIL_THRESHOLDS]
    fg = {r: np.zeros(2, np.int64) for r in rules}
    cms = {r: 0 for r in rules}
    for z in range(0, len(truth), chunk):
        p, t = np.asarray(probs[z:z + chunk]), np.asarray(truth[z:z + chunk])
        for r in rules:
            lab = labels_by(p, r)
            fg[r] += [int(((lab > 0) & (t > 0)).sum()), int(((lab > 0) | (t > 0)).sum())]
            cms[r] = cms[r] + confusion_matrix(lab.astype(np.uint8), t, len(codes))
    return {str(r): {"foreground_iou": round(fg[r][0] / max(fg[r][1], 1), 4),
                     "iou": {c: None if v is None else round(v, 4)
                             for c, v in scores_from_confusion(cms[r], codes)["iou"].items()}} for r in rules}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="the labelled dataset the run predicted")
    ap.add_argument("--work-dir", required=True, help="the run folder (predictions/probs.npy, metrics.json)")
    ap.add_argument("--block", choices=["training", "validation", "test"], default="validation")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from per_specimen import _blocks
    work = Path(args.work_dir)
    vol = load_volume(args.data_dir)
    start, stop = _blocks(work)[args.block]
    if stop <= start:
        raise SystemExit(f"the run has no {args.block} block")
    record = json.loads((work / "predictions" / "prediction.json").read_text())
    path = Path(record.get("probs_path") or work / "predictions" / "probs.npy")
    if not path.exists():
        raise SystemExit(f"{path} not found: run 05 with save_probs=True")
    probs = np.load(path, mmap_mode="r")
    out = {"block": args.block, "slices": [start, stop - 1], "chosen": record.get("fossil_threshold"),
           "chosen_on": (record.get("fossil_threshold_chosen_on") or {}).get("slices"),
           "rules": score_rules(probs[start:stop], vol.labels[start:stop], vol.codes)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
