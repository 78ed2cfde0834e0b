"""What a run and a review write to Google Drive in Colab, measured on the tests' stub Colab (tests/colab_stub).

    python bench/drive_writes.py --mode quick --clicks 100 --out runs/drive_writes.json

The stub Drive is a local folder mounted where Colab mounts Drive; the project is copied to it (as a user uploads
it) and its notebooks 01-05 run on it through papermill, as in Colab (run folder on Drive, scratch files on the
runtime's local disk), then a review of `--clicks` clicks in the panel (accept, reject, a taxon typed every fifth
click) and `flush_drive`. A thread looks at every file on the stub Drive every `--poll` seconds and counts, as
Drive's client would: a file created or changed is uploaded whole once it stops changing (its size counts as
written); a file deleted or replaced by another (a rename over it) goes to Drive's bin (its old size counts as
binned); a file renamed to a new name, or a temporary file that never settled, is neither. A file rewritten in
place keeps its earlier content as a Drive version (counted as written, not binned). Writes closer together than
the poll are seen as one, so the counts are lower bounds.

`--project` measures another copy of the project (an earlier commit's clone: the figures before a change);
`--review-of RUN` skips the notebooks and reviews a copy of finished run folder RUN's `exports/` on the stub Drive.
Prints one JSON object: per notebook and for the review, bytes written and binned, files binned, and Drive's size.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUB = ROOT / "tests" / "colab_stub"


class DriveWatch(threading.Thread):
    """Polls folder `root` and counts bytes written (created or changed files, whole) and binned (deleted or replaced
    files) since the last `take()`."""

    def __init__(self, root, poll):
        super().__init__(daemon=True)
        self.root, self.poll, self.lock, self.stop = Path(root), poll, threading.Lock(), threading.Event()
        self.state, self.counts, self.pending, self.counted = self._scan(), self._zero(), set(), set()
        self.counted = {ino for ino, _, _ in self.state.values()}

    @staticmethod
    def _zero():
        return {"written_bytes": 0, "written_files": 0, "binned_bytes": 0, "binned_files": 0}

    def _scan(self):
        out = {}
        for dirpath, _, files in os.walk(self.root, followlinks=False):
            for f in files:
                p = os.path.join(dirpath, f)
                try:
                    st = os.stat(p)
                except OSError:  # gone between the listing and the stat
                    continue
                out[p] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return out

    def _step(self):
        """One look: a changed file counts as written once it has stopped changing (one upload of what it settled
        to, as Drive's client uploads a closed file); one deleted or replaced after it settled counts as binned."""
        new = self._scan()
        with self.lock:
            old, c, pending = self.state, self.counts, self.pending
            new_inodes = {v[0] for v in new.values()}
            for p, (ino, size, _) in old.items():
                now = new.get(p)
                if now is not None and now[0] == ino:
                    continue
                if p in pending:  # never settled (a temporary file): never uploaded, so never in the bin
                    pending.discard(p)
                elif not (now is None and ino in new_inodes):  # (renamed: not in the bin)
                    c["binned_bytes"] += size
                    c["binned_files"] += 1
            for p, st in new.items():
                was = old.get(p)
                if was != st:
                    moved = (was is None or was[0] != st[0]) and st[0] in self.counted  # a settled file renamed here
                    if not moved:
                        pending.add(p)
                elif p in pending:  # unchanged since the last look: settled
                    pending.discard(p)
                    self.counted.add(st[0])
                    c["written_bytes"] += st[1]
                    c["written_files"] += 1
            self.state = new

    def run(self):
        while not self.stop.is_set():
            self._step()
            time.sleep(self.poll)

    def take(self):
        for _ in range(3):  # what is still settling is counted now
            self._step()
            time.sleep(self.poll)
        with self.lock:
            counts, self.counts = self.counts, self._zero()
        counts["drive_bytes"] = sum(s for _, s, _ in self.state.values())
        return counts


def _colab(tmp):
    """The stub Colab (tests/colab_stub/stub_env.py) under `tmp`, its environment set in this process (the notebooks'
    kernels inherit it); no clone can be made: the project must come from its copy on the stub Drive."""
    sys.path.insert(0, str(STUB))
    from stub_env import colab_env
    content, gdrive, env = colab_env(tmp)
    os.environ.update(env, GIT_ALLOW_PROTOCOL="none")
    os.environ.pop("MICROFOSSIL_HEADLESS", None)
    return content, gdrive


def _review(project, work, clicks, watch, content, pause):
    """`clicks` clicks in the review panel of run folder `work`, then `flush_drive`; the counts of each."""
    sys.path[:0] = [str(project), str(STUB)]  # (this process: the stub google.colab, as the kernels have it)
    import fastprogress.fastprogress  # noqa: F401  (before google.colab: it would pick its notebook bar)
    from google.colab import drive
    from microfossil import runtime
    from microfossil.review import ReviewPanel
    runtime.in_colab = lambda: True
    drive.mount(str(content / "drive"))
    watch.take()
    panel = ReviewPanel(work)
    opened = watch.take()
    n = len(panel.ids)
    for k in range(clicks):
        if k % 5 == 4:
            panel.taxon.value = f"Taxon {k}"
        else:
            panel.decide(["accepted", "rejected"][(k // max(n, 1)) % 2])
        time.sleep(pause)  # a person's pace, more or less: each click's files settle before the next
    review = watch.take()
    t = time.time()
    runtime.flush_drive()
    flush = {**watch.take(), "seconds": round(time.time() - t, 2)}
    return {"specimens": n, "clicks": clicks, "open": opened, "clicks_total": review, "flush": flush}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["quick", "smoke"], default="quick", help="the run's schedule (run_pipeline's)")
    ap.add_argument("--clicks", type=int, default=100)
    ap.add_argument("--poll", type=float, default=0.1, help="seconds between two looks at the stub Drive")
    ap.add_argument("--pause", type=float, default=0.4, help="seconds between two clicks")
    ap.add_argument("--project", default=str(ROOT), help="the project copy to measure (default: this one)")
    ap.add_argument("--review-of", help="a finished run folder: review a copy of its exports, run no notebook")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    import papermill as pm
    tmp = Path(tempfile.mkdtemp(prefix="drive_writes_"))
    try:
        content, gdrive = _colab(tmp)
        from stub_env import copy_project  # (on the path since `_colab`)
        copy = copy_project(args.project, gdrive / "MyDrive" / "microfossil-ct")
        watch = DriveWatch(gdrive, args.poll)
        watch.start()
        out, result = tmp / "executed", {"mode": args.mode, "notebooks": {}}
        out.mkdir()
        if args.review_of:
            shutil.copytree(Path(args.review_of) / "exports", gdrive / "MyDrive" / "microfossil_runs" / "run" / "exports")
        for nb in sorted((copy / "notebooks").glob("0[1-5]_*.ipynb")) if not args.review_of else []:
            t = time.time()
            pm.execute_notebook(str(nb), str(out / nb.name), cwd=str(content), kernel_name="python3",
                                parameters={args.mode: True}, progress_bar=False,
                                extra_arguments=["--IPKernelApp.log_level=ERROR"])
            result["notebooks"][nb.stem] = {**watch.take(), "seconds": round(time.time() - t, 1)}
            print(nb.stem, json.dumps(result["notebooks"][nb.stem]), file=sys.stderr, flush=True)
        runs = gdrive / "MyDrive" / "microfossil_runs"
        work = next(p for p in runs.iterdir() if p.is_dir())
        result["review"] = _review(copy, content / "drive" / "MyDrive" / "microfossil_runs" / work.name, args.clicks,
                                   watch, content, args.pause)
        watch.stop.set()
        if result["notebooks"]:
            total = {k: sum(v[k] for v in result["notebooks"].values()) for k in DriveWatch._zero()}
            result["run_total"] = {**total, "drive_bytes": result["notebooks"][max(result["notebooks"])]["drive_bytes"]}
        print(json.dumps(result, indent=1))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
