"""What each block of the split holds, on embedded samples or a dataset, before any training: the blocks and gaps, the
labelled voxels of each class per block and what each block's scores leave out (`split.describe_split`).

    python bench/split_blocks.py --sample-seeds 0 1 2                          # 64-slice samples, today's split
    python bench/split_blocks.py --sample-seeds 21 22 --sample-shape 96 192 192
    python bench/split_blocks.py --data-dir DATASET --valid-pct 0.15           # another size on your own data

The figures of docs/evaluation.md's "How the split's sizes were chosen". Reads labels only: it trains nothing and
scores nothing.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from microfossil.paths import data_home  # noqa: E402
from microfossil.sample import SAMPLE_SIZES, ensure_sample  # noqa: E402
from microfossil.split import describe_split, split_volume  # noqa: E402
from microfossil.volume import load_volume  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="a labelled dataset (instead of embedded samples)")
    ap.add_argument("--sample-seeds", nargs="+", type=int, default=[0], help="embedded samples to look at")
    ap.add_argument("--sample-shape", nargs=3, type=int, metavar=("Z", "H", "W"), default=list(SAMPLE_SIZES["default"]))
    ap.add_argument("--test-pct", type=float, default=0.2)
    ap.add_argument("--valid-pct", type=float, default=0.1)
    ap.add_argument("--gap-slices", type=int, default=None)
    args = ap.parse_args(argv)
    z, h, w = args.sample_shape
    folders = [Path(args.data_dir)] if args.data_dir else [
        ensure_sample(data_home() / (f"sample_{z}x{h}x{w}_seed{s}" if (z, h, w) != SAMPLE_SIZES["default"] else
                                     "sample_default" + (f"_seed{s}" if s else "")), z, h, w, seed=s)
        for s in args.sample_seeds]
    for folder in folders:
        split = split_volume(load_volume(folder), args.test_pct, args.valid_pct, args.gap_slices)
        print(f"== {folder}\n{describe_split(split)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
