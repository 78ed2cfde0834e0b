"""How big are the false specimens? Component sizes of a finished run's prediction against the ground truth, on the
training block (or the validation block), never on the test block.

    python bench/min_size.py --data-dir DATASET --work-dir RUN     # a run that went through 05, on a labelled dataset
    python bench/min_size.py --data-dir DATASET --work-dir RUN --block validation   # slices the model never trained on

Prints one JSON, to choose `min_voxels` (05's smallest specimen) for a kind of data:
- `predicted_components`: the 3D components of the raw prediction (`predictions/labels.tif`) in the
  training (or validation) block, by size bin: how many are true (half or more of their voxels on ground-truth
  fossil voxels) and how many are false;
- `true_specimens`: the sizes of the ground-truth specimens there (smallest, 5th percentile, median);
- `by_min_voxels`: object precision, recall and F1 on that block (IoU >= 0.5, as in
  metrics.json) for a range of `min_voxels`. A threshold is chosen there, never on the
  test block, whose scores would then no longer be unseen. Every true specimen counts,
  however small: a threshold that drops small fossils pays for them in recall.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from microfossil.evaluation import match_specimens  # noqa: E402
from microfossil.split import split_volume  # noqa: E402
from microfossil.volume import load_volume  # noqa: E402

BINS = [1, 10, 50, 100, 150, 250, 500, 1000, 5000, 10 ** 12]
THRESHOLDS = [1, 10, 25, 50, 100, 150, 250, 500, 1000]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="the labelled dataset the run predicted")
    ap.add_argument("--work-dir", required=True, help="the run folder (with predictions/labels.tif)")
    ap.add_argument("--test-pct", type=float, default=0.2, help="as in the notebooks")
    ap.add_argument("--valid-pct", type=float, default=0.1, help="as in the notebooks")
    ap.add_argument("--gap-slices", type=int, default=None, help="as in the notebooks (default: automatic)")
    ap.add_argument("--block", choices=["training", "validation"], default="training",
                    help="where to look: the training block (as min_voxels=150 was chosen) or the validation block "
                         "(slices the model never trained on); never the test block")
    ap.add_argument("--connectivity", type=int, default=26)
    args = ap.parse_args(argv)
    import cc3d
    import tifffile
    vol = load_volume(args.data_dir)
    split = split_volume(vol, args.test_pct, args.valid_pct, args.gap_slices)
    if args.block == "validation" and split.published:
        raise SystemExit("--block validation with --valid-pct 0: the validation block is the test block; choose on the "
                         "training block, or give the run's valid_pct")
    # the training or the validation block only: nothing here may look at the test block
    z0, z1 = (split.train_start, split.train_stop) if args.block == "training" else (split.valid_start, split.valid_stop)
    pred = tifffile.imread(Path(args.work_dir) / "predictions" / "labels.tif").reshape(vol.shape)[z0:z1]
    truth = np.asarray(vol.labels[z0:z1])
    cc, n = cc3d.connected_components(pred, connectivity=args.connectivity, binary_image=True, return_N=True)
    sizes = np.bincount(cc.ravel(), minlength=n + 1)
    on_truth = np.bincount(cc.ravel(), weights=(truth > 0).ravel(), minlength=n + 1)
    true_comp = on_truth >= 0.5 * sizes
    bins = []
    for lo, hi in zip(BINS[:-1], BINS[1:]):
        sel = (sizes >= lo) & (sizes < hi)
        sel[0] = False
        bins.append({"voxels": f"{lo}-{hi - 1}" if hi < 10 ** 12 else f">={lo}",
                     "true": int((sel & true_comp).sum()), "false": int((sel & ~true_comp).sum())})
    gt_cc, m = cc3d.connected_components(truth, connectivity=args.connectivity, binary_image=True, return_N=True)
    gt_sizes = np.bincount(gt_cc.ravel())[1:]
    by_min = []
    for t in THRESHOLDS:
        r = match_specimens(truth, pred, vol.codes, args.connectivity, t)
        by_min.append({k: r[k] for k in ("min_voxels", "n_true", "n_predicted", "n_matched", "precision", "recall", "f1")})
    out = {"volume": list(vol.shape), "predicted_components": {"n": int(n), "by_size": bins},
           "true_specimens": {"n": int(m), "smallest": int(gt_sizes.min()) if m else None,
                              "p5": float(np.percentile(gt_sizes, 5)) if m else None,
                              "median": float(np.median(gt_sizes)) if m else None},
           "block": args.block, "slices": [z0, z1 - 1], "by_min_voxels": by_min}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
