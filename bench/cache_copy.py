"""What a fresh runtime pays to open a scan: decoding every slice again, or copying back the cache kept beside the run.

    python bench/cache_copy.py --slices 1000 --size 1000        # a 1000 x 1000 x 1000 16-bit scan, ~2 GB of TIFF
    python bench/cache_copy.py --slices 200 --size 512 --keep /content/drive/MyDrive/bench   # the kept copy on Drive

Writes a synthetic 16-bit scan (one TIFF per slice, a label PNG per slice: a few percent fossil) to `--work`, then
times `load_volume` three ways: decoding every slice into the cache (what each notebook's fresh Colab runtime does
without a kept copy), writing the kept copy (`--keep`: in Colab a folder on Drive; by default a local folder), and a
fresh runtime's load from the kept copy (local cache removed: the copy is read back). Prints the seconds and the
sizes. Run in Colab with `--keep` on Drive and the scan itself on Drive (`--work`) for the figures that matter there:
on a local disk both reads come from the page cache after the first pass.
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from microfossil.volume import load_volume  # noqa: E402


def make_scan(folder, slices, size, seed=0):
    import tifffile
    from PIL import Image
    rng = np.random.default_rng(seed)
    (folder / "train").mkdir(parents=True, exist_ok=True)
    (folder / "train_masks_labels").mkdir(exist_ok=True)
    (folder / "codes.txt").write_text("background\nforaminifera\nostracod\n")
    yy, xx = np.mgrid[:size, :size]
    centres = rng.uniform(0, size, (max(4, size // 40), 2))
    for z in range(slices):
        lab = np.zeros((size, size), np.uint8)
        for k, (cy, cx) in enumerate(centres):
            r = 6 + 4 * np.sin(z / 15 + k)
            lab[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1 + k % 2
        img = (20000 + 9000 * (lab > 0) + rng.normal(0, 1500, (size, size))).clip(0, 65535).astype(np.uint16)
        tifffile.imwrite(folder / "train" / f"s{z:04d}.tif", img)
        Image.fromarray(lab).save(folder / "train_masks_labels" / f"s{z:04d}_GT.png")


def du(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=1000)
    ap.add_argument("--size", type=int, default=1000)
    ap.add_argument("--work", default="runs/bench_cache")
    ap.add_argument("--keep", default=None, help="the kept copy's folder (default: WORK/kept)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    scan, local = work / f"scan_{args.slices}x{args.size}", work / "local"
    keep = Path(args.keep) if args.keep else work / "kept"
    if not (scan / "codes.txt").exists():
        t = time.time()
        make_scan(scan, args.slices, args.size)
        print(f"scan written in {time.time() - t:.0f}s: {du(scan) / 1e9:.2f} GB in {scan}")
    for d in (local, keep):
        shutil.rmtree(d, ignore_errors=True)
    t = time.time()
    load_volume(scan, cache_dir=local)
    decode = time.time() - t
    t = time.time()
    load_volume(scan, cache_dir=(local, keep))
    write_kept = time.time() - t
    shutil.rmtree(local)
    t = time.time()
    vol = load_volume(scan, cache_dir=(local, keep))
    restore = time.time() - t
    print("| scan | decode every slice | write the kept copy | a fresh runtime from the kept copy | kept copy size |")
    print("|---|---|---|---|---|")
    print(f"| {vol.shape[0]} x {vol.shape[1]} x {vol.shape[2]}, 16-bit TIFF, {du(scan) / 1e9:.2f} GB | {decode:.1f} s | "
          f"{write_kept:.1f} s | {restore:.1f} s | {du(keep) / 1e9:.2f} GB (local cache {du(local) / 1e9:.2f} GB) |")


if __name__ == "__main__":
    main()
