"""Defaults judged by their worst case: the pipeline over a grid of volumes that vary as real cores do.

    python bench/robustness.py --work-root runs/robustness                  # every cell x training seeds 0 1
    python bench/robustness.py --work-root runs/robustness --cells ratio_1to30 other_scanner --seeds 0
    python bench/robustness.py --work-root runs/robustness --variant balance_fossils -p class_weights balance_fossils
    python bench/robustness.py --work-root runs/robustness --shift          # + each model on a second volume, as
                                                                            #   it is and through another scanner
    python bench/robustness.py --work-root runs/robustness --collect        # only the table of finished runs
    python bench/robustness.py --work-root runs/robustness --redo 05        # 05 again on the finished runs (after
                                                                            #   a change to what 05 does)

Each cell of `GRID` is a family of volumes (`microfossil.sample.make_sample`'s `style`: the
class ratio, the number and size of each class's specimens, their infills, broken shells and
touching specimens, the scanner's contrast, noise, blur and rings), drawn with a seed of its own
(`--volume-seed` + the cell's index, in data/robustness/). Every cell is trained and scored with
every training seed through `run_pipeline.py` (02-05), on the CPU schedule `CPU_SCHEDULE` (each
stage 1 frozen epoch at 1e-3 + 6 unfrozen at slice(1e-4, 1e-3), bs 8, no lr_find) unless `-p`
says otherwise, in `<work-root>/<variant>/<cell>_seed<k>`.

The table (`<work-root>/<variant>/robustness.md` and `.json`) has one line per finished run of the variant (whichever
`--cells` and `--seeds` the call names): the training
block's fossil pixel ratio, the raw segmentation's foreground IoU and IoU per class, the final
labels' IoU per class, the same had every specimen its right class (the gap between the two is the
classes named wrong; what stays below 1 is the outline and the clean-up), the test specimens, those
the raw segmentation found, those found after the clean-up (extraction and specimen classifier) and
with their right class, and those the clean-up lost. Then the worst over all runs of each column, and the worst cell: the figure that
decides whether a default holds is the worst line, not a mean. All on each run's test block.

`--shift`: each trained model (05 with `model_path`) on a second volume of its cell (another
seed), once as drawn and once as another scanner gives it (`SCANNER_SHIFT`: gamma 0.8, contrast
x0.85, +12 grey levels, more noise, stronger rings), every slice scored; the table gives the final
IoU of both and their difference.

`--volume-seed`: 100 (the default) draws the development grid; a figure may be called unseen
only from a grid drawn afresh (another `--volume-seed`, `--data-role test`) after every choice.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from microfossil.io import write_json  # noqa: E402

# cell: make_sample style (only the knobs it changes; microfossil.sample.STYLE_DEFAULTS has them all)
GRID = {
    "base": {},                                                                  # the embedded sample's family
    "ratio_1to1": {"foram_density": 0.5},                                        # as many ostracod as foram voxels
    "ratio_1to10": {"ostracod_density": 0.5, "ostracod_size": 0.75},             # ostracods ~10x rarer (pixels)
    "ratio_1to30": {"ostracod_density": 0.3, "ostracod_size": 0.7},              # ~30x rarer
    "ostracods_commoner": {"foram_density": 0.35, "foram_size": 0.75, "ostracod_density": 1.5},
    "big_hollow_forams": {"foram_size": 1.3, "foram_infill": (1.0, 0.0, 0.0), "ostracod_infill": (0.0, 1.0, 0.0),
                          "ostracod_density": 0.6},                              # infill that points the wrong way
    "spar_infill": {"foram_infill": (0.2, 0.2, 0.6), "ostracod_infill": (0.2, 0.2, 0.6)},
    "broken_touching": {"broken": 0.5, "touching": 0.5},
    "other_scanner": {"noise": 0.06, "blur": 1.3, "rings": 0.1, "contrast": 0.8, "gamma": 0.8, "offset": 0.05},
    "all_hollow_1to7": {"foram_size": 1.3, "foram_infill": (1.0, 0.0, 0.0), "ostracod_infill": (1.0, 0.0, 0.0),
                        "ostracod_density": 0.5, "ostracod_size": 0.85},  # big forams, every inside empty, ~1:7
}  # (a new cell goes at the end: a cell's volume seed is its place)
SHAPE = (96, 192, 192)  # slices, height, width: the size of the independent test volume the grid is modelled on
CPU_SCHEDULE = {"run_lr_find": "False", "epochs_frozen": "1", "lr_frozen": "1e-3", "epochs_unfrozen": "6",
                "lr_unfrozen_lo": "1e-4", "lr_unfrozen_hi": "1e-3", "bs": "8"}
# another scanner: gamma 0.8, contrast x0.85, +12 of 255 grey levels, noise sigma +8 grey levels, rings twice as strong
SCANNER_SHIFT = {"gamma": 0.8, "contrast": 0.85, "offset": 12 / 255, "noise": float(np.hypot(0.035, 8 / 255 / 0.9)),
                 "rings": 0.1}


def volume_dir(cell, volume_seed, shape=SHAPE, second=False, shifted=False):
    """The folder of `cell`'s volume (drawn once, then reused): data/robustness/<cell>_<Z>x<H>x<W>_v<seed>[...]."""
    from microfossil.paths import data_home
    z, h, w = shape
    return (data_home() / "robustness" /
            f"{cell}_{z}x{h}x{w}_v{volume_seed}{'_second' if second else ''}{'_shifted' if shifted else ''}")


def cell_volume(cell, volume_seed, shape=SHAPE, second=False, shifted=False):
    """Draw (or find) the volume of `cell`: its seed is `volume_seed` + the cell's place in `GRID` (+ 1000 for the
    second volume of `--shift`, the same objects through `SCANNER_SHIFT` when `shifted`)."""
    from microfossil.sample import ensure_sample
    seed = volume_seed + list(GRID).index(cell) + (1000 if second else 0)
    style = {**GRID[cell], **(SCANNER_SHIFT if shifted else {})}
    return ensure_sample(volume_dir(cell, volume_seed, shape, second, shifted), *shape, seed=seed, style=style)


def _pipeline(work, data_dir, params, stages, smoke=False):
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "--work-dir", str(work), "--data-dir", str(data_dir),
           "--only", *stages] + (["--smoke"] if smoke else [])
    for k, v in params.items():
        cmd += ["-p", k, str(v)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_cell(args, cell, seed):
    """Train and score `cell` with training `seed` (skipped when finished), then its `--shift` runs."""
    work = Path(args.work_root) / args.variant / f"{cell}_seed{seed}"
    params = {**CPU_SCHEDULE, **dict(args.p), "seed": seed}
    predict = {k: v for k, v in params.items() if k in PREDICT_PARAMS}
    if not (work / "evaluation.json").exists():
        _pipeline(work, cell_volume(cell, args.volume_seed, args.shape), params, ["02", "03", "04", "05"], args.smoke)
    elif args.redo:  # (05 alone refuses the training notebooks' parameters)
        _pipeline(work, cell_volume(cell, args.volume_seed, args.shape),
                  predict if args.redo == ["05"] else params, args.redo, args.smoke)
    if args.shift:
        for shifted in (False, True):
            out = work / ("shifted" if shifted else "second")
            if not (out / "evaluation.json").exists() or "05" in args.redo:
                _pipeline(out, cell_volume(cell, args.volume_seed, args.shape, True, shifted),
                          {**predict, "model_path": str(work)}, ["05"], args.smoke)


# 05's parameters a -p may set for the --shift runs (the training ones do not apply to a model from elsewhere)
PREDICT_PARAMS = {"bs", "tta", "save_probs", "fossil_threshold", "match_intensity", "min_voxels", "min_volume_um3",
                  "connectivity", "split_touching", "classify", "seed", "test_pct", "valid_pct", "gap_slices"}


def _final(ev):
    rows = {r["step"]: r for r in ev["rows"]}
    return rows.get("+ specimen classifier") or rows["extraction"]


def raw_found(work, vol, split, connectivity):
    """How many test specimens the raw segmentation (`predictions/labels.tif`) found, matched at IoU >= 0.5 whatever
    their size or class, as the evaluation matches the final labels (left-out voxels aside)."""
    import tifffile
    from microfossil.evaluation import match_specimens
    from microfossil.split import left_out_mask
    t0 = split.test_start
    raw = tifffile.imread(work / "predictions" / "labels.tif").reshape(np.asarray(vol.labels).shape)
    m = match_specimens(np.asarray(vol.labels[t0:]), raw[t0:], list(vol.codes), connectivity, 1,
                        ignore=left_out_mask(vol, split))
    return m["n_matched"]


def right_class_iou(work, vol, split):
    """The final labels' IoU per class had the classifier named every specimen right: each specimen of the test
    block's extraction (`heldout/predictions/specimens.tif`) painted with the commonest true fossil class under it,
    one the classifier rejected as not a fossil included; one on no true fossil keeps what the final labels
    (`labels_clean.tif`) give it. What stays below 1 is the outline and the clean-up's; the rest of the gap down to
    the final IoU is the classes named wrong. None when the run has no such files (an evaluation without the
    held-out extraction)."""
    import tifffile
    from microfossil.metrics import confusion_matrix, scores_from_confusion
    from microfossil.specimens import majority_class
    from microfossil.split import left_out_mask
    held = work / "heldout" / "predictions"
    if not (held / "labels_clean.tif").exists() or not (held / "specimens.tif").exists():
        return None
    t0, codes = split.test_start, list(vol.codes)
    truth = np.asarray(vol.labels[t0:])
    final = tifffile.imread(held / "labels_clean.tif").reshape(truth.shape)
    ids = tifffile.imread(held / "specimens.tif").reshape(truth.shape)  # its own dtype: a full block is large
    n = int(ids.max())
    right = majority_class(ids, truth, n, len(codes))
    own = np.zeros(n + 1, final.dtype)
    own[ids] = final  # 0 (background) stays 0: `ids` is 0 there
    cls = np.where(right > 0, right, own).astype(final.dtype)
    cm = confusion_matrix(cls[ids], truth, len(codes), ignore=left_out_mask(vol, split))
    return scores_from_confusion(cm, codes)["iou"]


def run_row(work, data_dir, cell, seed):
    """One line of the table: what run folder `work` (trained and scored on `data_dir`) measured."""
    from microfossil.split import recorded_split
    from microfossil.volume import load_volume
    ev = json.loads((work / "evaluation.json").read_text())
    metrics = json.loads((work / "metrics.json").read_text())
    codes, cm = ev["codes"], np.asarray(metrics["confusion_matrix"])  # rows: truth, columns: prediction
    fg = cm[1:, 1:].sum() / max(1, cm[1:, 1:].sum() + cm[1:, 0].sum() + cm[0, 1:].sum())
    vol = load_volume(data_dir)
    split = recorded_split(vol, metrics["provenance"]["split"])
    raw = {r["step"]: r for r in ev["rows"]}["segmentation"]
    final = _final(ev)
    n = final["n_true"]
    found = round(final["specimen_recall"] * n) if final.get("specimen_recall") is not None else None
    raw_n = raw_found(work, vol, split, (metrics.get("specimens") or {}).get("connectivity", 26))
    row = {"cell": cell, "seed": seed, "ratio": training_ratio(vol, split),
           "raw_foreground_iou": float(fg), "raw_iou": raw["iou"], "final_iou": final["iou"], "n_true": n,
           "found_raw": raw_n, "found": found, "right_class": final.get("n_matched_same_class"),
           "lost_by_cleanup": None if found is None else max(0, raw_n - found),
           "threshold": (raw.get("provenance") or {}).get("fossil_threshold"), "codes": codes,
           "right_class_iou": right_class_iou(work, vol, split)}
    for name in ("second", "shifted"):
        ev2 = work / name / "evaluation.json"
        if ev2.exists():
            row[f"{name}_final_iou"] = _final(json.loads(ev2.read_text()))["iou"]
    return row


def training_ratio(vol, split):
    """The commonest fossil class's voxels over the rarest's in the training block of `split` (inf when one is
    absent)."""
    lab = np.asarray(vol.labels[split.train_start: split.train_stop])
    counts = np.bincount(lab.ravel(), minlength=len(vol.codes))[1:]
    return float(counts.max() / counts.min()) if counts.min() else float("inf")


def table(rows):
    """The markdown table of `rows` (`run_row`), then the worst of each column over them and the worst cell."""
    codes = rows[0]["codes"]
    fossil = codes[1:]
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    shift = any("shifted_final_iou" in r for r in rows)
    head = (["cell", "seed", "fossil ratio (training)", "raw foreground IoU"] + [f"raw IoU {c}" for c in fossil]
            + [f"final IoU {c}" for c in fossil] + [f"final IoU {c}, every class right" for c in fossil]
            + ["test specimens", "found raw", "found final", "right class", "lost by clean-up", "threshold"]
            + ([f"second volume: final IoU {c}" for c in fossil] + [f"other scanner: final IoU {c}" for c in fossil]
               if shift else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(r):
        out = [r["cell"], str(r["seed"]), f"{r['ratio']:.1f}", f(r["raw_foreground_iou"])]
        out += [f(r["raw_iou"].get(c)) for c in fossil] + [f(r["final_iou"].get(c)) for c in fossil]
        out += [f((r.get("right_class_iou") or {}).get(c)) for c in fossil]
        out += [str(r[k]) for k in ("n_true", "found_raw", "found", "right_class", "lost_by_cleanup", "threshold")]
        if shift:
            out += [f((r.get("second_final_iou") or {}).get(c)) for c in fossil]
            out += [f((r.get("shifted_final_iou") or {}).get(c)) for c in fossil]
        return out
    for r in rows:
        lines.append("| " + " | ".join(cells(r)) + " |")
    w = worst(rows)
    lines.append("| **worst** | | | " + " | ".join(
        [f"**{f(w['raw_foreground_iou'])}**"] + [f"**{f(w['raw_iou'][c])}**" for c in fossil]
        + [f"**{f(w['final_iou'][c])}**" for c in fossil] + [f"**{f(w['right_class_iou'][c])}**" for c in fossil]
        + ["", "", "", "n/a" if w["right_class_share"] is None else f"**{w['right_class_share']:.0%} right class**",
           f"**{w['lost_by_cleanup']}**", ""]
        + ([""] * len(fossil) + [_drop(w["shift_drop"].get(c)) for c in fossil] if shift else [])) + " |")
    if w["cell"] is None:
        return "\n".join(lines) + "\n\nNo fossil in any run's test block: no worst cell.\n"
    return ("\n".join(lines) + f"\n\nWorst cell (lowest final IoU of a class): **{w['cell']}** (training seed "
            f"{w['cell_seed']}, {w['cell_final']:.2f}).\n")


def _drop(d):
    """The worst cell's change of final IoU on the other scanner, as words: "0.06 lower", "0.11 higher", "n/a"."""
    return "n/a" if d is None else f"**{abs(d):.2f} {'lower' if d >= 0 else 'higher'}**"


def worst(rows):
    """The worst over `rows` of each column (lowest IoU, lowest share of test specimens with their right class, most
    specimens lost by the clean-up, largest drop of final IoU on the other scanner), and the run with the lowest
    final IoU of a class."""
    fossil = rows[0]["codes"][1:]
    low = lambda key, c: min((r[key].get(c) for r in rows if (r.get(key) or {}).get(c) is not None),  # noqa: E731
                             default=None)
    drops = {c: [r["second_final_iou"][c] - r["shifted_final_iou"][c] for r in rows
                 if r.get("second_final_iou") and r.get("shifted_final_iou")
                 and None not in (r["second_final_iou"].get(c), r["shifted_final_iou"].get(c))] for c in fossil}
    lowest = {id(r): min((v for c, v in r["final_iou"].items() if c in fossil and v is not None), default=None)
              for r in rows}  # each run's lowest final IoU of a fossil class (None: no fossil in its test block)
    by_final = min((r for r in rows if lowest[id(r)] is not None), key=lambda r: lowest[id(r)], default=None)
    return {"raw_foreground_iou": min(r["raw_foreground_iou"] for r in rows),
            "raw_iou": {c: low("raw_iou", c) for c in fossil}, "final_iou": {c: low("final_iou", c) for c in fossil},
            "right_class_iou": {c: low("right_class_iou", c) for c in fossil},
            "right_class_share": min(((r["right_class"] or 0) / r["n_true"] for r in rows if r["n_true"]), default=None),
            "lost_by_cleanup": max(r["lost_by_cleanup"] or 0 for r in rows),
            "shift_drop": {c: max(d) if d else None for c, d in drops.items()},
            "cell": by_final and by_final["cell"], "cell_seed": by_final and by_final["seed"],
            "cell_final": by_final and lowest[id(by_final)]}


def finished_runs(variant_dir):
    """(cell, training seed, folder) of every finished run under `variant_dir` (`<cell>_seed<k>` with its
    `evaluation.json`), in the order of `GRID` and of the seeds."""
    found = []
    for cell in GRID:
        for work in Path(variant_dir).glob(f"{cell}_seed*"):
            seed = work.name[len(cell) + len("_seed"):]
            if seed.isdigit() and (work / "evaluation.json").exists():
                found.append((cell, int(seed), work))
    return sorted(found, key=lambda f: (list(GRID).index(f[0]), f[1]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-root", required=True, help="one run folder per cell and seed goes under <it>/<variant>/")
    ap.add_argument("--variant", default="defaults", help="a name for the -p settings (a folder of its own)")
    ap.add_argument("--cells", nargs="+", default=list(GRID), choices=list(GRID))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds")
    ap.add_argument("--volume-seed", type=int, default=100, help="the first cell's volume seed (the others follow)")
    ap.add_argument("--shape", nargs=3, type=int, default=list(SHAPE), metavar=("Z", "H", "W"))
    ap.add_argument("--shift", action="store_true", help="also each model on a second volume, as is and shifted")
    ap.add_argument("--smoke", action="store_true", help="run_pipeline.py's smoke setting (checks the script runs)")
    ap.add_argument("--collect", action="store_true", help="run nothing, only gather the finished runs")
    ap.add_argument("--redo", nargs="+", default=[], metavar="NN", choices=["02", "03", "04", "05"],
                    help="run these notebooks again on finished runs (their results replaced), e.g. --redo 05 after "
                         "a change to prediction, extraction or the classifier; training notebooks resume as they do")
    ap.add_argument("--data-role", choices=["development", "test"], default="development")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="notebook parameter for every run (after the CPU schedule's), e.g. -p class_weights None")
    args = ap.parse_args(argv)
    args.shape = tuple(args.shape)
    if not args.collect:
        for seed in args.seeds:
            for cell in args.cells:
                run_cell(args, cell, seed)
    out = Path(args.work_root) / args.variant
    for cell in args.cells:
        for seed in args.seeds:
            if not (out / f"{cell}_seed{seed}" / "evaluation.json").exists():
                print(f"{out / f'{cell}_seed{seed}'}: not finished, left out")
    rows = [run_row(work, volume_dir(cell, args.volume_seed, args.shape), cell, seed)
            for cell, seed, work in finished_runs(out)]  # the variant's table: every finished run, not only this call's
    if not rows:
        raise SystemExit(f"no finished run under {out}")
    z, h, w = args.shape
    head = (f"Data: {args.data_role} volumes (bench/robustness.py's grid, {z}x{h}x{w}, volume seed {args.volume_seed} + "
            f"the cell's place); variant {args.variant!r}, settings {dict(CPU_SCHEDULE, **dict(args.p))}; training "
            f"seeds {sorted({r['seed'] for r in rows})}; scores on each run's test block"
            f"{'' if args.data_role == 'test' else ', not unseen'}.\n\n")
    md = head + table(rows)
    (out / "robustness.md").write_text(md)
    write_json(out / "robustness.json", {"rows": rows, "worst": worst(rows), "shape": list(args.shape),
                                         "volume_seed": args.volume_seed, "data_role": args.data_role,
                                         "settings": {**CPU_SCHEDULE, **dict(args.p)}, "grid": GRID})
    print(md)


if __name__ == "__main__":
    main()
