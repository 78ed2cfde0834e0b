"""Run the numbered notebooks in order, headless, with papermill: the "start it in the evening" mode.

    python run_pipeline.py                           # embedded sample, published schedule
    python run_pipeline.py --quick                   # the CPU demo: a small real model in about 5 minutes
    python run_pipeline.py --smoke                   # CI's smoke test: seconds per notebook, learns nothing
    python run_pipeline.py --data-dir D --work-dir W -p bs 4 -p lr_frozen 1e-4

Executed notebooks (with their outputs, plots and errors) are kept in
`<work_dir>/notebooks/`, and the time taken by each in `<work_dir>/run_times.json`.
"""
import argparse
import ast
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def _value(text):
    """Parse a `-p` value as a Python literal (1e-4, True, None, 'x'), else keep it as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _select(notebooks, only, ap):
    """The notebooks named in `--only`: each by number (`4`, `04`) or name (`04_train_full`, with or without .ipynb)."""
    chosen = []
    for want in only:
        w = want.strip().removesuffix(".ipynb")
        hits = [nb for nb in notebooks if w == nb.stem or (w.isdigit() and int(w) == int(nb.name[:2]))]
        if not hits:
            ap.error(f"--only {want}: no such notebook; choose among "
                     f"{', '.join(nb.name[:2] for nb in notebooks)} ({', '.join(nb.stem for nb in notebooks)})")
        chosen += hits
    return [nb for nb in notebooks if nb in chosen]  # in their numbered order


def main(argv=None):
    sys.path.insert(0, str(ROOT))
    from microfossil.params import FORCE_SINCE, PASSED
    kept = {k: os.environ.get(k) for k in (PASSED, FORCE_SINCE)}  # for this run's kernels only
    try:
        return _main(argv)
    finally:  # a later run in this process (a test, a bench script) must not inherit them
        for k, v in kept.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="dataset folder (default: the embedded synthetic sample)")
    ap.add_argument("--work-dir", help="run folder (default: runs/<dataset>[_quick])")
    ap.add_argument("--data-url", help="Google Drive id/URL or HTTP URL of a zipped dataset")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="the CPU demo: a short schedule (set in each training notebook) that trains a small real "
                      "model; a -p value is kept over it")
    mode.add_argument("--smoke", action="store_true",
                      help="smoke test (CI): tiny images, one epoch per phase; checks that everything runs")
    ap.add_argument("--force", action="store_true",
                    help="train every phase once more, even when finished with the same plan; an interrupted --force "
                    "run, started again with --force, resumes where it stopped")
    ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="any other notebook parameter, e.g. -p bs 4 (given to every notebook that has it)")
    ap.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks, e.g. --only 04 05")
    args = ap.parse_args(argv)

    import papermill as pm
    os.environ["MICROFOSSIL_HEADLESS"] = "1"  # the kernels inherit it: 06_review skips its widget panel
    from microfossil.evaluation import describe_run
    from microfossil.params import FORCE_SINCE, PASSED, RUN_SETTINGS, ParameterError, check_params
    from microfossil.paths import record_run, resolve_paths
    from microfossil.runtime import in_colab, on_drive

    params = {k: _value(v) for k, v in args.p}
    kernel_env = {PASSED: ",".join(params)}  # the kernels inherit it: quick mode keeps these (params.use_schedule)
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if args.only:
        notebooks = _select(notebooks, args.only, ap)
    for nb in notebooks:  # each notebook's values as it will run them: a bad one stops now, not hours later
        defaults = {k: _value(v["default"]) for k, v in pm.inspect_notebook(str(nb)).items()}
        try:
            check_params({**defaults, **{k: v for k, v in params.items() if k in defaults}})
        except ParameterError as e:
            ap.error(f"{nb.name}: {e}")
    data_dir, work_dir = resolve_paths(args.data_dir, args.work_dir, args.quick, args.data_url,
                                             params.get("sample_size", "default"), params.get("seed", 0), args.smoke)
    params.update(data_dir=str(data_dir), work_dir=str(work_dir), quick=args.quick, smoke=args.smoke)
    if args.data_url:
        params["data_url"] = args.data_url
    # the run's settings, for the notebooks that do not declare them (each reads work_dir/run.json: paths.use_run)
    record_run(work_dir, {k: v for k, v in params.items() if k in RUN_SETTINGS}, "run_pipeline.py")
    mp = params.get("model_path")  # the notebooks run in notebooks/: a relative folder means one from here
    if isinstance(mp, str) and Path(mp).exists():  # (a link or a Drive id names no folder: passed as it is)
        params["model_path"] = str(Path(mp).absolute())
    force_file = work_dir / "models" / "force_run.json"  # when this --force run began, kept until it completes
    if args.force:
        params["force"] = True
        since = json.loads(force_file.read_text())["since"] if force_file.exists() else time.time()
        force_file.parent.mkdir(parents=True, exist_ok=True)
        force_file.write_text(json.dumps({"since": since}))
        kernel_env[FORCE_SINCE] = str(since)  # a phase trained since then is not trained again
        if since < time.time() - 1:
            print(f"--force: going on with the interrupted --force run begun {time.ctime(since)}: the phases it "
                  "finished are loaded, the one it stopped in resumes")
    out_dir = work_dir / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    times_file = work_dir / "run_times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    print(f"data_dir: {data_dir}\nwork_dir: {work_dir}")
    os.environ.update(kernel_env)
    for nb in notebooks:
        known = pm.inspect_notebook(str(nb))
        unknown = set(params) - set(known) - {"work_dir", "force"} - set(RUN_SETTINGS)  # (those: run.json)
        if unknown and nb == notebooks[0]:
            missing_everywhere = [k for k in unknown if not any(k in pm.inspect_notebook(str(n)) for n in notebooks)]
            if missing_everywhere:
                ap.error(f"no notebook has a parameter named {', '.join(sorted(missing_everywhere))}")
        t = time.time()
        print(f"--- {nb.name} ...", flush=True)
        try:
            pm.execute_notebook(str(nb), str(out_dir / nb.name), cwd=str(nb.parent), kernel_name="python3",
                                parameters={k: v for k, v in params.items() if k in known}, progress_bar=False,
                                extra_arguments=["--IPKernelApp.log_level=ERROR"])  # no transport warnings
        except pm.PapermillExecutionError as e:
            print(f"\n{nb.name} failed: {e.ename}: {e.evalue}\nThe executed notebook with the full traceback is "
                  f"{out_dir / nb.name}", file=sys.stderr)
            return 1
        times[nb.stem] = round(time.time() - t, 1)
        times_file.write_text(json.dumps(times, indent=2))
        print(f"    done in {times[nb.stem]:.0f}s", flush=True)
    force_file.unlink(missing_ok=True)  # complete: the next --force trains every phase again
    print(f"\nAll done in {sum(times.get(nb.stem, 0) for nb in notebooks):.0f}s.")
    if any(nb.name.startswith("05") for nb in notebooks):
        print(describe_run(work_dir, "notebooks/06_review.ipynb"))
    print(f"Executed notebooks (outputs, figures): {out_dir}")
    if in_colab() and on_drive(work_dir):
        print("Colab: Drive uploads in the background; before the runtime ends, run "
              "`from google.colab import drive; drive.flush_and_unmount()` in a cell so that Drive has it all.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
