"""How each rule for where a specimen's outline runs would have done, on finished runs, without training anything again.

    python bench/outline_rules.py runs/robustness/no_weights/*_seed[01]

The rarer class's small specimens come out drawn inside their wall (docs/evaluation.md, "A family of volumes"):
this re-draws the test block's fossils from the run's saved fossil probability (`predictions/probs.npy`) by each
rule, and scores each class. A rule only moves outlines: each component of the new fossil mask takes the class the
run's final labels (`heldout/predictions/labels_clean.tif`, after the clean-up and the specimen classifier) give most
of its voxels, and one holding no final-label voxel is dropped, as the clean-up dropped it. Rules:
- `as run`: the fossil threshold the run's 05 chose (`prediction.json`), which gives back the run's final labels
  (but for touching specimens of two classes that the extraction split, `split_touching`: here one component, one
  class); on the training block alone for runs before 05 also took the validation block's slices;
- `chosen on the training block alone`: 05's rule before 2026-12-07 (up to 32 training-block slices), and `chosen
  on the training and validation blocks`: the rule of today (`prediction.calibration_slices`), both from the saved
  probabilities (uint8, so either may differ by a step from one chosen while predicting);
- `threshold T`: one threshold T for every class;
- `per class, chosen on the training block`: for each class the threshold whose outlines give that class its best
  IoU on the training block (classes from the whole volume's final labels, `predictions/labels_clean.tif`), as 05
  chooses one threshold for all; where two classes' outlines overlap, the class listed first in codes.txt keeps
  the voxel.
(Growing the chosen threshold's fossils into the voxels above a lower one connected to them, a hysteresis, gives
what that lower threshold gives here: a component with no final-label voxel is dropped either way.) IoU per class on
the test block (left-out voxels aside). Then each class's median fossil probability on its true wall (voxels with a
face neighbour outside the class), test block against training block. For choosing on development volumes: never on
a volume whose figures are to be called unseen.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from microfossil.metrics import confusion_matrix, scores_from_confusion  # noqa: E402
from microfossil.prediction import (FOSSIL_THRESHOLDS, calibration_slices, choose_fossil_threshold,  # noqa: E402
                                    threshold_counts)
from microfossil.specimens import label_components, majority_class  # noqa: E402
from microfossil.volume import load_volume  # noqa: E402

THRESHOLDS = (0.3, 0.4, 0.5, 0.6)  # the single thresholds shown


def classed(fossil, final, connectivity=26):
    """Boolean `fossil` as labels: each component (at `connectivity`) painted with the class `final` (labels) gives
    most of its voxels (`specimens.majority_class`), 0 where `final` gives it none."""
    cc, n, _, _ = label_components(fossil, connectivity)
    return majority_class(cc, final, n, int(final.max()) + 1).astype(final.dtype)[cc]


def class_iou(labels, truth, n_classes, ignore=None):
    """IoU of each fossil class (index 1...) of `labels` against `truth`."""
    iou = scores_from_confusion(confusion_matrix(labels, truth, n_classes, ignore=ignore),
                                [str(c) for c in range(n_classes)])["iou"]
    return [iou[str(c)] for c in range(1, n_classes)]


def wall_probability(fossil_p, truth, n_classes):
    """The median fossil probability `fossil_p` on each fossil class's wall: its true voxels with a face neighbour
    outside the class (None for a class absent from `truth`)."""
    from scipy import ndimage
    out = []
    for c in range(1, n_classes):
        mask = truth == c
        wall = mask & ~ndimage.binary_erosion(mask)
        out.append(float(np.median(fossil_p[wall])) if wall.any() else None)
    return out


def run_rules(work):
    """{rule: [IoU of each fossil class on the test block]} for finished run `work`, the class names, and
    {block: [median fossil probability on each class's wall]} on the test and the training block (`wall_probability`:
    a wall the model is less sure of on new slices than on those it learnt from is one the threshold cuts)."""
    import tifffile
    from microfossil.split import left_out_mask, recorded_split
    metrics = json.loads((work / "metrics.json").read_text())
    vol = load_volume(metrics["provenance"]["scan"]["dataset"])
    split = recorded_split(vol, metrics["provenance"]["split"])
    if not split.train_stop:
        raise SystemExit(f"{work}: a run of 05 with model_path (no training block to choose on): not one for this")
    codes, K = list(vol.codes), len(vol.codes)
    probs = np.load(work / "predictions" / "probs.npy", mmap_mode="r")
    chosen = json.loads((work / "predictions" / "prediction.json").read_text())["fossil_threshold"]
    fossil_p = lambda z0, z1: 1 - np.asarray(probs[z0:z1, 0], np.float32) / 255  # noqa: E731
    t0 = split.test_start
    truth = np.asarray(vol.labels[t0:])
    p = fossil_p(t0, len(vol.labels))
    final = tifffile.imread(work / "heldout" / "predictions" / "labels_clean.tif").reshape(truth.shape)
    ignore = left_out_mask(vol, split)
    conn = json.loads((work / "heldout" / "exports" / "extraction.json").read_text())["connectivity"]
    score = lambda fossil: class_iou(classed(fossil, final, conn), truth, K, ignore)  # noqa: E731
    out = {f"as run (threshold {chosen})": score(p > chosen)}
    counts = {z: threshold_counts(np.array(probs[z, 0:1]), np.asarray(vol.labels[z:z + 1]) > 0, 255)
              for z in calibration_slices(vol, split)}  # 05's rule of today, on the saved probabilities
    train = [z for z in counts if split.train_start <= z < split.train_stop]
    t_train = choose_fossil_threshold(sum(counts[z] for z in train))[0]
    t_both = choose_fossil_threshold(sum(counts.values()))[0]
    out[f"chosen on the training block alone (threshold {t_train})"] = score(p > t_train)
    out[f"chosen on the training and validation blocks (threshold {t_both})"] = score(p > t_both)
    out.update({f"threshold {t}": score(p > t) for t in THRESHOLDS})
    a, b = split.train_start, split.train_stop  # the training block: its outlines by each threshold, per class
    whole = tifffile.imread(work / "predictions" / "labels_clean.tif").reshape(np.asarray(vol.labels).shape)[a:b]
    p_train, truth_train = fossil_p(a, b), np.asarray(vol.labels[a:b])
    on_train = {t: class_iou(classed(p_train > t, whole, conn), truth_train, K) for t in FOSSIL_THRESHOLDS}
    best = [max(FOSSIL_THRESHOLDS, key=lambda t: -1 if on_train[t][c] is None else on_train[t][c]) for c in range(K - 1)]
    by_class = np.zeros(truth.shape, final.dtype)
    for c, t in enumerate(best, 1):
        lab = classed(p > t, final, conn)
        by_class[(lab == c) & (by_class == 0)] = c  # where two classes' outlines overlap, the first class keeps it
    out[f"per class, chosen on the training block ({' / '.join(map(str, best))})"] = class_iou(by_class, truth, K,
                                                                                               ignore)
    walls = {"test": wall_probability(p, truth, K), "training": wall_probability(p_train, truth_train, K)}
    return out, codes, walls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work_dirs", nargs="+", help="finished run folders (05 run with ground truth and save_probs)")
    args = ap.parse_args(argv)
    table, walls, codes = {}, {}, None
    for work in map(Path, args.work_dirs):
        if not (work / "heldout" / "predictions" / "labels_clean.tif").exists():
            print(f"{work}: not finished, left out", file=sys.stderr)
            continue
        table[work], codes, walls[work] = run_rules(work)
    if not table:
        raise SystemExit("no finished run")
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    rules = {}  # the rule names, "as run" and "per class" without the thresholds that differ by run
    for work, res in table.items():
        for name, v in res.items():
            rules.setdefault(name.split(" (")[0], {})[work] = (name, v)
    head = ["rule"] + [f"{w.parent.name}/{w.name}" for w in table] + [f"worst {c}" for c in codes[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rule, by_run in rules.items():
        cells = [" / ".join(map(f, by_run[w][1])) + (f" ({by_run[w][0].split(' (')[1]}" if " (" in by_run[w][0] else "")
                 if w in by_run else "n/a" for w in table]
        worst = [min((v[1][c] for v in by_run.values() if v[1][c] is not None), default=None)
                 for c in range(len(codes) - 1)]
        lines.append("| " + " | ".join([rule, *cells, *map(f, worst)]) + " |")
    print(f"Final IoU {' / '.join(codes[1:])} on each run's test block, outlines by each rule, classes as the run "
          "gave them.\n")
    print("\n".join(lines))
    print(f"\nMedian fossil probability on each class's wall ({' / '.join(codes[1:])}), test block against training "
          "block.\n")
    print("| run | test block | training block |\n|---|---|---|")
    for work, w in walls.items():
        print(f"| {work.parent.name}/{work.name} | {' / '.join(map(f, w['test']))} | {' / '.join(map(f, w['training']))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
