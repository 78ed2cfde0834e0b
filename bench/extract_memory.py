"""Peak RAM and time of the extraction on a full-size label volume; prints one JSON.

    python bench/extract_memory.py            # 983 x 1004 x 956, as the LAPiX volume
    python bench/extract_memory.py --tiny     # CPU smoke test: a small volume, only checks that every figure is produced

Step 1 writes, in a temporary folder, what 05 has when its extraction cell runs: the predicted label
volume (here the embedded sample's ground truth at that size, rendered without its CT texture, plus
`--specks` random cubic specks of 1 to 125 voxels, like those of a slice-by-slice prediction), a CT volume
as a memory-mapped `.npy` (as the volume cache is) and `predictions/probs.npy`.
Step 2 runs in a fresh process, so that its peak RSS is the extraction's own: it holds the labels in
RAM (as 05 does), runs `extract_fossils` and `evaluate_heldout` (the split, then the test block's own
extraction and its scores), and reports their
seconds, the counts, and the process's peak RSS sampled from /proc every 50 ms: `peak_rss_gb` (all
resident pages, including the memory-mapped CT and probabilities, which the kernel can drop) and
`peak_anon_gb` (the process's own arrays, the part that can run a machine out of memory).
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from microfossil.evaluation import evaluate_heldout  # noqa: E402
from microfossil.extraction import extract_fossils  # noqa: E402
from microfossil.io import file_stamp, write_json  # noqa: E402
from microfossil.sample import SAMPLE_CODES, SAMPLE_SIZES, _make_objects, _render_object  # noqa: E402
from microfossil.split import split_volume  # noqa: E402
from microfossil.volume import Volume  # noqa: E402


def write_inputs(d, shape, n_specks, seed=0):
    """The inputs of the extraction cell, in folder `d`: labels.npy (with specks), truth.npy, ct.npy, predictions/probs.npy."""
    Z, H, W = shape
    objs = _make_objects(shape, seed)
    (d / "predictions").mkdir(parents=True)
    truth = np.lib.format.open_memmap(d / "truth.npy", "w+", np.uint8, shape)
    for s0 in range(0, Z, 32):
        s1 = min(Z, s0 + 32)
        img, lab = np.zeros((s1 - s0, H, W), np.float32), np.zeros((s1 - s0, H, W), np.uint8)
        for o in objs:
            _render_object(o, img, lab, s0)
        truth[s0:s1] = lab
    pred = np.lib.format.open_memmap(d / "labels.npy", "w+", np.uint8, shape)
    pred[:] = truth
    rng = np.random.default_rng(seed)
    for z, y, x, s, k in zip(rng.integers(0, Z, n_specks), rng.integers(0, H, n_specks), rng.integers(0, W, n_specks),
                             rng.integers(1, 6, n_specks), rng.integers(1, 3, n_specks)):
        pred[z:z + s, y:y + s, x:x + s] = k
    ct = np.lib.format.open_memmap(d / "ct.npy", "w+", np.uint8, shape)
    probs = np.lib.format.open_memmap(d / "predictions" / "probs.npy", "w+", np.uint8, (Z, 3, H, W))
    for z in range(Z):
        ct[z] = np.where(pred[z] > 0, 200, 90)
        for k in range(3):
            probs[z, k] = np.where(pred[z] == k, 220, 17)
    for a in (truth, pred, ct, probs):
        a.flush()
    del probs
    write_json(d / "predictions" / "prediction.json",  # what predict_volume records: these probabilities go with these labels
               {"checkpoint": None, "shape": list(shape), "probs_file": file_stamp(d / "predictions" / "probs.npy")})


def _status():
    """(VmRSS, RssAnon) of this process in GB (Linux)."""
    f = {k: float(v.split()[0]) / 1e6 for k, v in (ln.split(":") for ln in open("/proc/self/status"))
         if k in ("VmRSS", "RssAnon")}
    return f["VmRSS"], f["RssAnon"]


class _Peak:
    """Peak (VmRSS, RssAnon) while the `with` block runs, sampled every 50 ms."""
    def __enter__(self):
        self.rss, self.anon = _status()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            r, a = _status()
            self.rss, self.anon = max(self.rss, r), max(self.anon, a)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run(d):
    """Step 2, in its own process: the extraction as 05 runs it; returns the figures."""
    pred = np.load(d / "labels.npy")  # in RAM, as predict_volume returns it
    vol = Volume(images=np.load(d / "ct.npy", mmap_mode="r"), labels=np.load(d / "truth.npy", mmap_mode="r"),
                       codes=list(SAMPLE_CODES), stems=[], source=d)
    before = _status()
    with _Peak() as peak:
        t = time.time()
        cat = extract_fossils(vol, d, pred)
        t_extract = time.time() - t
        t = time.time()
        split = split_volume(vol, 0.2)
        sp = evaluate_heldout(vol, d, split, pred, classify=False)["extraction"]
    info = json.loads((d / "exports" / "extraction.json").read_text())
    return {"extract_s": round(t_extract, 1), "evaluate_s": round(time.time() - t, 1),
            "peak_rss_gb": round(peak.rss, 2), "peak_anon_gb": round(peak.anon, 2),
            "rss_before_extraction_gb": round(before[0], 2),
            "n_components": info["n_components"], "n_dropped_small": info["n_dropped_small"],
            "n_specimens": len(cat), "n_exported": info["n_exported"], "per_class": info["per_class"],
            "object_f1_heldout": sp["f1"], "object_precision": sp["precision"], "object_recall": sp["recall"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small volume, CPU smoke test")
    ap.add_argument("--specks", type=int, default=None, help="random specks added to the prediction")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--step2", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step2:
        print(json.dumps(run(Path(args.step2))))
        return 0
    shape = (40, 128, 128) if args.tiny else SAMPLE_SIZES["full"]
    n_specks = args.specks if args.specks is not None else (200 if args.tiny else 20000)
    d = Path(tempfile.mkdtemp(prefix="extract_bench_"))
    try:
        t = time.time()
        write_inputs(d, shape, n_specks)
        prep = time.time() - t
        out = subprocess.run([sys.executable, __file__, "--step2", str(d)], check=True, capture_output=True, text=True)
        res = {"volume": list(shape), "specks_added": n_specks, "inputs_written_s": round(prep, 1),
               **json.loads(out.stdout.strip().splitlines()[-1])}
    finally:
        shutil.rmtree(d, ignore_errors=True)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
