"""Make the README's two pictures from a finished run: `docs/gallery.png` and `docs/prediction.png`.

    python run_pipeline.py --quick                                   # makes runs/sample_default_quick
    python docs/make_figures.py --work-dir runs/sample_default_quick

`gallery.png` is the top-left corner of `<work_dir>/exports/gallery.png` (the first `--rows` rows
and `--cols` columns of specimen tiles, largest specimens first), at full size so that the labels
stay readable. `prediction.png` is `<work_dir>/figures/predictions_test.png` (test slices:
the CT slice, the ground truth and the prediction) scaled down to `--prediction-width` px.
Both are reduced to a 256-colour palette and saved optimised. PIL only: no torch, no project import.
"""
import argparse
import json
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The gallery's layout, as `microfossil/exports.py:draw_gallery` draws it: a 22-px header (the class
# colours), then square tiles 6 px apart, each with a 32-px caption below it; the tile size is in
# `exports/gallery.json` beside the gallery.
PAD, HEADER, CAPTION, TILE = 6, 22, 32, 160


def _open(path, work_dir):
    """Open image `path`, or stop with what made it and how to make it."""
    if path.exists():
        return Image.open(path).convert("RGB")
    quick = ROOT / "runs" / "sample_default_quick"
    cmd = "python run_pipeline.py --quick" + ("" if work_dir == quick else f" --work-dir {work_dir}")
    hint = ""
    if path.name == "gallery.png" and (work_dir / "exports" / "fossils.csv").exists():
        hint = " The catalogue exists but has no gallery: the run found no specimen to show."
    sys.exit(f"{path} not found. Notebook 05_predict_export writes it; make the run first with:\n    {cmd}\n"
             f"then run this script again with --work-dir {work_dir}.{hint}")


def crop_gallery(img, rows, cols, tile=TILE):
    """The header and the first `rows` rows and `cols` columns of `tile`-px gallery tiles in `img` (fewer when the
    page has fewer)."""
    w, h = img.size
    pitch_x, pitch_y = tile + PAD, tile + CAPTION
    page_cols, page_rows = max(1, (w - PAD) // pitch_x), max(1, (h - HEADER) // pitch_y)
    cols, rows = min(cols, page_cols), min(rows, page_rows)
    return img.crop((0, 0, min(w, PAD + cols * pitch_x), min(h, HEADER + rows * pitch_y)))


def fit_width(img, width):
    """`img` scaled down (never up) to at most `width` px wide, aspect kept."""
    if img.size[0] <= width:
        return img
    return img.resize((width, max(1, round(img.size[1] * width / img.size[0]))), Image.Resampling.LANCZOS)


def save_small(img, path):
    """Save `img` as a 256-colour optimised PNG at `path`, atomically; return its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(tmp, format="PNG", optimize=True)
    tmp.replace(path)
    return path.stat().st_size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default=str(ROOT / "runs" / "sample_default_quick"),
                    help="the finished run (default: runs/sample_default_quick, made by run_pipeline.py --quick)")
    ap.add_argument("--out-dir", default=str(HERE), help="where the two PNGs go (default: docs/)")
    ap.add_argument("--rows", type=int, default=2, help="gallery rows of tiles to keep (default 2)")
    ap.add_argument("--cols", type=int, default=6, help="gallery columns of tiles to keep (default 6)")
    ap.add_argument("--prediction-width", type=int, default=720, help="width of prediction.png in px (default 720)")
    ap.add_argument("--max-width", type=int, default=900, help="no picture wider than this (default 900)")
    args = ap.parse_args(argv)
    if min(args.rows, args.cols, args.prediction_width, args.max_width) < 1:
        ap.error("--rows, --cols, --prediction-width and --max-width must be at least 1")
    work_dir, out_dir = Path(args.work_dir).expanduser().resolve(), Path(args.out_dir)
    if not work_dir.is_dir():
        sys.exit(f"{work_dir} is not a run folder. Make one with:\n    python run_pipeline.py --quick\n"
                 "(it is runs/sample_default_quick), or pass the run folder of another run with --work-dir.")

    gallery = _open(work_dir / "exports" / "gallery.png", work_dir)
    prediction = _open(work_dir / "figures" / "predictions_test.png", work_dir)
    layout = work_dir / "exports" / "gallery.json"
    tile = json.loads(layout.read_text())["layout"][1] if layout.exists() else TILE
    made = {
        out_dir / "gallery.png": fit_width(crop_gallery(gallery, args.rows, args.cols, tile), args.max_width),
        out_dir / "prediction.png": fit_width(prediction, min(args.prediction_width, args.max_width)),
    }
    for path, img in made.items():
        size = save_small(img, path)
        print(f"{path}: {img.size[0]} x {img.size[1]} px, {size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
