"""How much labelling buys: the quick schedule trained on every 2nd ... 32nd slice of the training block, or on 5 or
10 slices drawn at random, against every slice labelled.

    python bench/sparse_labels.py --work-root runs/sparse_labels                   # every setting x seeds 0 1
    python bench/sparse_labels.py --work-root runs/sparse_labels --settings all every8 --seeds 0
    python bench/sparse_labels.py --work-root runs/sparse_labels --collect         # only the table and the plot

One synthetic volume (`microfossil.sample.make_sample`, `SHAPE` = 300 slices of 96 x 96, volume seed
`--volume-seed`, 300 by default: development data) is split once, every slice labelled (`split_volume`'s defaults;
its gaps are pinned with `gap_slices` for every setting, so that all train, validate and test on the same blocks).
Each setting is a copy of the dataset (the images linked, not copied) whose `train_masks_labels/` keeps the masks of
the validation and test blocks and of the chosen training slices only, read with `sparse_labels=True`; it is
trained and scored with `run_pipeline.py --quick` (02-05, the schedule a laptop runs) and every training seed, in
`<work-root>/<setting>_seed<k>`. An epoch draws as many slices as the training block holds whatever the setting
(`loaders.make_dls`), so every run trains as many steps. Scores are on the test block, which every setting leaves
fully labelled: the raw segmentation's IoU per class, the final labels' IoU per class (extraction and specimen
classifier) and the specimen F1 with the right class.

The table (`<work-root>/sparse_labels.md` and `.json`) gives, per setting, the labelled training slices and each
score as the mean and the range over the seeds; the plot (`--plot`, default `<work-root>/sparse_labels.png`) the
final IoU per class against the labelled training slices.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from microfossil.io import write_json, write_text  # noqa: E402

SHAPE = (300, 96, 96)
SETTINGS = {"all": ("every", 1), "every2": ("every", 2), "every4": ("every", 4), "every8": ("every", 8),
            "every16": ("every", 16), "every32": ("every", 32), "random5": ("random", 5), "random10": ("random", 10)}
ORDER = ["all", "every8", "every32", "random5", "every2", "every16", "random10", "every4"]  # the runs' order: the
#                                                                                          curve's ends first


def dense_volume(volume_seed):
    from microfossil.paths import data_home
    from microfossil.sample import ensure_sample
    z, h, w = SHAPE
    return ensure_sample(data_home() / "sparse_labels" / f"dense_{z}x{h}x{w}_v{volume_seed}", *SHAPE, seed=volume_seed)


def blocks(dense):
    """The split of the fully labelled volume (the defaults) and the gap that pins it for every setting."""
    from microfossil.split import split_volume
    from microfossil.volume import load_volume
    s = split_volume(load_volume(dense))
    return s, max(s.train_start - s.valid_stop, s.test_start - s.train_stop)


def labelled_training_slices(split, setting):
    kind, k = SETTINGS[setting]
    train = np.arange(split.train_start, split.train_stop)
    if kind == "every":
        return train[k // 2::k] if k > 1 else train
    rng = np.random.default_rng(1000 + k)  # the same draw for every seed
    return np.sort(rng.choice(train, k, replace=False))


def sparse_copy(dense, split, setting, root):
    """The dataset of `setting`: `train/` and `codes.txt` linked, the masks of the kept slices linked."""
    out = Path(root) / "data" / setting
    if setting == "all":
        return dense, len(split.train)
    keep = set(labelled_training_slices(split, setting).tolist())
    keep |= set(range(split.valid_start, split.valid_stop)) | set(range(split.test_start, split.n_slices))
    if not (out / "done").exists():
        shutil.rmtree(out, ignore_errors=True)
        (out / "train_masks_labels").mkdir(parents=True)
        os.symlink(Path(dense, "train").resolve(), out / "train")
        os.symlink(Path(dense, "codes.txt").resolve(), out / "codes.txt")
        images = sorted(Path(dense, "train").iterdir())  # the sample's names sort in z order
        for z, img in enumerate(images):
            if z in keep:
                m = Path(dense, "train_masks_labels", f"{img.stem}_GT{img.suffix}").resolve()
                os.symlink(m, out / "train_masks_labels" / m.name)
        (out / "done").write_text("")
    return out, len(labelled_training_slices(split, setting))


def run(args, setting, seed, dense, split, gap):
    work = Path(args.work_root) / f"{setting}_seed{seed}"
    data, _ = sparse_copy(dense, split, setting, args.work_root)
    if (work / "evaluation.json").exists():
        return
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "--quick", "--work-dir", str(work), "--data-dir", str(data),
           "--only", "01", "02", "03", "04", "05", "-p", "seed", str(seed), "-p", "gap_slices", str(gap),
           "-p", "sparse_labels", str(setting != "all")]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    if not args.keep_models:  # 1.5 GB of checkpoints a run: the table needs none of them
        for f in (work / "models").glob("*.pth"):
            f.unlink()


def row(work):
    scan = json.loads((work / "metrics.json").read_text())["provenance"]["scan"]
    if tuple(scan["shape"]) != SHAPE:
        raise SystemExit(f"{work} was scored on {scan['dataset']} {scan['shape']}, not the benchmark's volume")
    ev = json.loads((work / "evaluation.json").read_text())
    rows = {r["step"]: r for r in ev["rows"]}
    final = rows.get("+ specimen classifier") or rows["extraction"]
    return {"codes": ev["codes"], "raw_iou": rows["segmentation"]["iou"], "final_iou": final["iou"],
            "specimen_class_f1": final.get("specimen_class_f1"), "specimen_f1": final.get("specimen_f1")}


def collect(args, split):
    table = []
    for setting in sorted(ORDER, key=lambda s: -len(labelled_training_slices(split, s))):
        runs = [(s, Path(args.work_root) / f"{setting}_seed{s}") for s in args.seeds]
        rows = [row(w) for s, w in runs if (w / "evaluation.json").exists()]
        if rows:
            table.append({"setting": setting, "labelled": len(labelled_training_slices(split, setting)),
                          "seeds": [s for s, w in runs if (w / "evaluation.json").exists()], "rows": rows})
    write_json(Path(args.work_root) / "sparse_labels.json", table)
    if not table:
        print("no finished run")
        return
    codes = table[0]["rows"][0]["codes"][1:]

    def spread(values):
        v = [x for x in values if x is not None]
        return "n/a" if not v else f"{np.mean(v):.2f} ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else f"{v[0]:.2f}"
    head = (["labelled training slices", "seeds"] + [f"raw IoU {c}" for c in codes] + [f"final IoU {c}" for c in codes]
            + ["specimen F1, right class"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        r = t["rows"]
        cells = [f"{t['setting']}: {t['labelled']}", ", ".join(map(str, t["seeds"]))]
        cells += [spread([x["raw_iou"][c] for x in r]) for c in codes] + [spread([x["final_iou"][c] for x in r])
                                                                          for c in codes]
        cells.append(spread([x["specimen_class_f1"] for x in r]))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write_text(Path(args.work_root) / "sparse_labels.md", text)
    print(text)
    plot(table, codes, args.plot or Path(args.work_root) / "sparse_labels.png")


def plot(table, codes, path):
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for k, c in enumerate(codes):
        xs = np.array([t["labelled"] for t in table], float)
        v = [[x["final_iou"][c] for x in t["rows"]] for t in table]
        m, lo, hi = (np.array([f(x) for x in v]) for f in (np.mean, np.min, np.max))
        o = np.argsort(xs)
        ax.errorbar(xs[o] * (1 + 0.03 * k), m[o], yerr=[m[o] - lo[o], hi[o] - m[o]], marker="o", capsize=3, label=c)
    ax.set_xscale("log")
    ax.set_xticks(sorted({t["labelled"] for t in table}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("labelled training slices (of the training block's %d)" % max(t["labelled"] for t in table))
    ax.set_ylabel("final IoU, test block")
    ax.set_title("how much labelling buys (quick schedule; mean and range over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    print("plot:", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-root", default="runs/sparse_labels")
    ap.add_argument("--settings", nargs="+", default=ORDER, choices=ORDER)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--volume-seed", type=int, default=300)
    ap.add_argument("--collect", action="store_true")
    ap.add_argument("--plot")
    ap.add_argument("--keep-models", action="store_true", help="keep each run's checkpoints (about 1.5 GB a run)")
    args = ap.parse_args()
    dense = dense_volume(args.volume_seed)
    split, gap = blocks(dense)
    print(f"blocks: {split.plan()}, gap_slices {gap}")
    if not args.collect:
        for seed in args.seeds:
            for setting in [s for s in ORDER if s in args.settings]:
                run(args, setting, seed, dense, split, gap)
    collect(args, split)


if __name__ == "__main__":
    main()
