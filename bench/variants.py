"""The accuracy table: train and score each segmentation variant on several seeds, then one table of mean and spread.

    python bench/variants.py --work-root runs/variants                 # published schedule (02-05) per variant
    python bench/variants.py --work-root runs/variants --variants k1 k3 --stages 04 \\
        -p init_from None -p run_lr_find False -p epochs_frozen 1 -p lr_frozen 1e-3 -p epochs_unfrozen 9 \\
        -p lr_unfrozen_lo 1e-4 -p lr_unfrozen_hi 1e-3 -p bs 4      # docs/evaluation.md's CPU table (full resolution)
    python bench/variants.py --work-root runs/variants --collect       # only gather the tables of finished runs
    python bench/variants.py --work-root runs/losses --variants ce ce_dice focal ce_weighted ce_balanced ce_dice_rare \
        --sample-seeds 0 1 2 --seeds 0 1 2 -p run_lr_find False -p epochs_frozen 1 -p lr_frozen 1e-3 \
        -p epochs_unfrozen 6 -p lr_unfrozen_lo 1e-4 -p lr_unfrozen_hi 1e-3 -p bs 8   # the loss table (docs/evaluation.md)
    python bench/variants.py --work-root runs/quick --quick --variants quick --sample-seeds 0 1 2 --seeds 0 1 2
    python bench/variants.py --work-root runs/cpu96 --variants defaults --sample-seeds 21 22 --sample-shape 96 192 192 \
        --seeds 0 1 -p run_lr_find False -p epochs_frozen 1 -p lr_frozen 1e-3 -p epochs_unfrozen 6 \
        -p lr_unfrozen_lo 1e-4 -p lr_unfrozen_hi 1e-3 -p bs 8     # every default on the CPU schedule, 96-slice samples

Each variant and seed is one run folder `<work-root>/<variant>/seed<k>` made by
`run_pipeline.py` with `-p seed k` and the same `-p` settings. With the embedded sample
(no `--data-dir`) each seed also draws its own sample, so the spread covers the data as well
as the initial weights, order and augmentation. With `--sample-seeds`, the samples and the
training seeds vary apart: every training seed on every sample, in
`<work-root>/<variant>/sample<s>_seed<k>` (the sample of seed s is the one `-p seed s` makes). Variants that only change prediction (flip
TTA) reuse the model of the variant they name, seed by seed. Notebook 05 of each run writes
its `evaluation.json` (all on the held-out block: segmentation, extraction, + specimen
classifier); this script gathers them into `<work-root>/evaluation.md` and
`evaluation.json`, each score as the mean over the seeds with the min-max in brackets, and
prints the markdown; `evaluation_short.md` is the same in short (raw and final IoU per class,
specimen recall before and after the specimen classifier, F1 with the right class), and
`evaluation_runs.md` one line per run (its specimens found and in their right class, the fossil threshold).

Every figure says what data it comes from: `--data-role development` (the default) for volumes
that any choice of the project has looked at (the embedded samples 0-8, 11, 21 and 22, a
dataset you tuned on), `--data-role test` only for volumes drawn afresh after every choice was
made; the role heads the tables and is in every row of `evaluation.json`, with each run's
provenance (split, seeds, checkpoint, threshold, TTA, tri-planar, context slices, classifier,
project version, scan: `microfossil.evaluation.PROVENANCE_KEYS`). All scores are on each run's
test block, which no per-epoch score, `lr_find` or attempt of it read.
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from microfossil.evaluation import compact_markdown, evaluation_markdown, summarize_seeds  # noqa: E402
from microfossil.io import write_json  # noqa: E402

# name: (notebook parameters, the variant whose trained model it reuses or None)
VARIANTS = {
    "k1": ({"context_slices": 1, "triplanar": False, "tta": False}, None),  # the published recipe
    "k1_tta": ({"tta": True}, "k1"),                                        # + flip test-time augmentation
    "k3": ({"context_slices": 3, "triplanar": False, "tta": False}, None),  # 3 adjacent slices as the RGB channels
    "k3_tta": ({"tta": True}, "k3"),
    "triplanar": ({"context_slices": 1, "triplanar": True, "tta": False}, None),  # + XZ and YZ training slices
    "triplanar_tta": ({"tta": True}, "triplanar"),
    # the loss and the sampling (the rare-class work), each on the notebooks' other settings (with --quick, the CPU demo's)
    "ce": ({"loss": "cross_entropy", "class_weights": None, "oversample_rare": 1.0}, None),  # the published loss
    "ce_dice": ({"loss": "ce_dice", "class_weights": None, "oversample_rare": 1.0}, None),
    "focal": ({"loss": "focal", "class_weights": None, "oversample_rare": 1.0}, None),
    "ce_weighted": ({"loss": "cross_entropy", "class_weights": "inverse_sqrt", "oversample_rare": 1.0}, None),
    "ce_balanced": ({"loss": "cross_entropy", "class_weights": "balance_fossils", "oversample_rare": 1.0}, None),
    "ce_dice_rare": ({"loss": "ce_dice", "class_weights": None, "oversample_rare": 4.0}, None),
    "ce_balanced_infill": ({"loss": "cross_entropy", "class_weights": "balance_fossils", "oversample_rare": 1.0,
                            "infill_augment": 0.5}, None),  # + insides refilled at random (augment.Infill)
    "quick": ({}, None),  # the notebooks' own settings: with --quick, README's first command
    "defaults": ({}, None),  # the same: every default, on the schedule the -p settings give
}


def _folder(sample_seed, seed):
    return f"seed{seed}" if sample_seed is None else f"sample{sample_seed}_seed{seed}"


def _work(root, name, sample_seed, seed):
    """The run folder of variant `name` on the sample of `sample_seed` (None: that of `seed`) with training `seed`."""
    return Path(root) / name / _folder(sample_seed, seed)


def _run(args, name, params, model_from, seed, sample_seed=None):
    work = _work(args.work_root, name, sample_seed, seed)
    stages = ["05"] if model_from else [*(s.zfill(2) for s in args.stages), "05"]
    if model_from:
        src = _work(args.work_root, model_from, sample_seed, seed) / "models"
        if not src.exists():
            raise SystemExit(f"{name} reuses the model of {model_from}: run that variant first ({src} not found)")
        shutil.copytree(src, work / "models", dirs_exist_ok=True)
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "--work-dir", str(work), "--only", *stages]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    elif sample_seed is not None and args.sample_shape:
        from microfossil.paths import data_home
        from microfossil.sample import ensure_sample
        z, h, w = args.sample_shape
        cmd += ["--data-dir", str(ensure_sample(data_home() / f"sample_{z}x{h}x{w}_seed{sample_seed}", z, h, w,
                                                seed=sample_seed))]
    elif sample_seed is not None:
        from microfossil.paths import resolve_paths
        cmd += ["--data-dir", str(resolve_paths(None, work, seed=sample_seed, smoke=args.smoke)[0])]
    if args.smoke:
        cmd.append("--smoke")
    if args.quick:
        cmd.append("--quick")
    import papermill as pm
    from microfossil.params import RUN_SETTINGS
    known = {k for nb in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb") if nb.name[:2] in stages
             for k in pm.inspect_notebook(str(nb))} | set(RUN_SETTINGS)  # (the run's: recorded by run_pipeline.py)
    for k, v in [*args.p, *((k, repr(v)) for k, v in {**params, "seed": seed}.items())]:
        if k in known:  # e.g. no training parameters for a variant that only predicts
            cmd += ["-p", k, str(v)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def collect(work_root, names, seeds, sample_seeds=None, data_role="development"):
    """Rows of every finished variant run under `work_root`, one per seed (and sample seed), with training and
    prediction seconds, the `data_role` and each run's provenance; each row's variant is the name given here (05's own
    description in `model`)."""
    rows, codes = [], None
    for name, sample_seed, seed in ((n, a, s) for n in names for a in (sample_seeds or [None]) for s in seeds):
        work = _work(work_root, name, sample_seed, seed)
        ev = work / "evaluation.json"
        if not ev.exists():
            print(f"{name}, {_folder(sample_seed, seed)}: no {ev} (not run, or no ground truth): left out")
            continue
        e = json.loads(ev.read_text())
        codes = codes or e["codes"]
        models = work / "models"
        train_s = sum(json.loads(p.read_text()).get("seconds", 0) for p in models.glob("*.json")
                      if not p.name.endswith(".progress.json")) if VARIANTS.get(name, ({}, None))[1] is None else None
        metrics = json.loads((work / "metrics.json").read_text())
        predict_s = metrics.get("predict_seconds")
        specimens = {"extraction": metrics.get("specimens"), "+ specimen classifier": metrics.get("specimens_after_classifier")}
        for r in e["rows"]:
            if r.get("n_matched_same_class") is None and specimens.get(r["step"]):  # (rows written before it was kept)
                r["n_matched_same_class"] = specimens[r["step"]].get("n_matched_same_class")
            if not r.get("provenance"):
                print(f"{name}, {_folder(sample_seed, seed)}: {ev} was written by an earlier version (its rows say "
                      "nothing of their split, model or settings): run it again; left out")
                break
            rows.append({**r, "variant": name, "model": r["variant"], "run": name, "seed": seed,
                         "sample_seed": sample_seed, "data_role": data_role, "train_seconds": train_s,
                         "predict_seconds": predict_s})
    return rows, codes


def runs_markdown(rows, codes):
    """One line per run: its raw and final IoU of each fossil class, the test specimens found after the extraction and
    after the clean-up (recall times their number), those matched with their right class, and the fossil threshold
    05 used (from the run's provenance)."""
    fossil, f = codes[1:], lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    head = (["run"] + [f"raw IoU {c}" for c in fossil] + [f"final IoU {c}" for c in fossil]
            + ["test specimens", "found: extraction", "final", "right class", "threshold"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    runs = {}
    for r in rows:
        runs.setdefault((r["variant"], r["sample_seed"], r["seed"]), {})[r["step"]] = r
    for (variant, sample_seed, seed), steps in runs.items():
        raw, ext = steps.get("segmentation"), steps.get("extraction")
        final = steps.get("+ specimen classifier") or ext
        if raw is None or ext is None:
            continue
        n = final.get("n_true")
        count = lambda r, k: "n/a" if r.get(k) is None or n is None else str(round(r[k] * n))  # noqa: E731
        right = final.get("n_matched_same_class")
        cells = ([f"{variant}, {_folder(sample_seed, seed)}"] + [f(raw["iou"].get(c)) for c in fossil]
                 + [f(final["iou"].get(c)) for c in fossil]
                 + [str(n), count(ext, "specimen_recall"), count(final, "specimen_recall"),
                    "n/a" if right is None else str(right), str((raw.get("provenance") or {}).get("fossil_threshold"))])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-root", required=True, help="one run folder per variant goes under it")
    ap.add_argument("--data-dir", help="labelled dataset (default: the embedded sample)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds to run each variant with")
    ap.add_argument("--sample-seeds", nargs="+", type=int,
                    help="embedded samples to run every seed on (default: each seed its own sample)")
    ap.add_argument("--sample-shape", nargs=3, type=int, metavar=("Z", "H", "W"),
                    help="with --sample-seeds: samples of this size (make_sample's), in data/sample_ZxHxW_seed<s>")
    ap.add_argument("--quick", action="store_true", help="run_pipeline.py's CPU demo schedule")
    ap.add_argument("--stages", nargs="+", default=["02", "03", "04"], help="training notebooks to run (e.g. 04)")
    ap.add_argument("--smoke", action="store_true", help="run_pipeline.py's smoke setting (checks the script runs)")
    ap.add_argument("--collect", action="store_true", help="do not run anything, only gather finished runs")
    ap.add_argument("--data-role", choices=["development", "test"], default="development",
                    help="development: volumes any choice looked at; test: volumes drawn afresh after every choice")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="notebook parameter for every variant, e.g. -p epochs_unfrozen 24")
    args = ap.parse_args(argv)
    if args.data_dir and args.sample_seeds:
        ap.error("--sample-seeds picks embedded samples: leave out --data-dir")
    if args.sample_shape and not args.sample_seeds:
        ap.error("--sample-shape sizes the samples of --sample-seeds: give those too")
    if not args.collect:
        for sample_seed in args.sample_seeds or [None]:
            for seed in args.seeds:
                for name in args.variants:
                    if (_work(args.work_root, name, sample_seed, seed) / "evaluation.json").exists():
                        continue  # finished earlier (delete its folder to run it again)
                    _run(args, name, *VARIANTS[name], seed, sample_seed)
    rows, codes = collect(args.work_root, args.variants, args.seeds, args.sample_seeds, args.data_role)
    if not rows:
        raise SystemExit(f"no finished variant run with an evaluation under {args.work_root}")
    summary = summarize_seeds(rows)
    shape = "x".join(map(str, args.sample_shape)) + " " if args.sample_shape else ""
    samples = (f"embedded {shape}samples {args.sample_seeds}" if args.sample_seeds else args.data_dir or
               f"embedded samples {args.seeds} (each training seed its own)")
    head = (f"Data: {args.data_role} volumes ({samples}); training seeds {args.seeds}; scores on each run's test "
            f"block{'' if args.data_role == 'test' else ', not an unseen figure'}.\n\n")
    md = head + evaluation_markdown(summary, codes, extra={"train s": "train_seconds", "predict s": "predict_seconds"})
    root = Path(args.work_root)
    write_json(root / "evaluation.json", {"codes": codes, "rows": rows, "summary": summary, "seeds": args.seeds,
                                          "sample_seeds": args.sample_seeds, "sample_shape": args.sample_shape,
                                          "data_role": args.data_role,
                                          "data_dir": args.data_dir, "quick": args.quick, "settings": dict(args.p)})
    (root / "evaluation.md").write_text(md)
    short = head + compact_markdown(summary, codes)
    (root / "evaluation_short.md").write_text(short)
    each = head + runs_markdown(rows, codes)
    (root / "evaluation_runs.md").write_text(each)
    print(md + "\nIn short (raw segmentation, final labels, the clean-up's recall):\n\n" + short
          + "\nRun by run:\n\n" + each)


if __name__ == "__main__":
    main()
