"""Where the notebooks run: Google Colab (its Drive, the runtime's local disk, its GPU) or a machine of your own.

In Colab a run folder lives on Google Drive, which outlives the runtime but is slow, uploads
in the background (a file can reach Drive minutes after it was closed) and keeps every replaced
or deleted file in its trash, where it still counts against the 15 GB quota. So what is
written often or read at random stays on the runtime's local disk (`local_dir`): the
per-epoch checkpoints, `lr_find`'s temporary weights, the volume cache, `probs.npy`. Drive
gets the results, each phase's checkpoint when the phase ends and a resumable copy every few
minutes, overwritten in place (`copy_in_place`: the same Drive file, so nothing goes to the
trash), each with a record of its size and hash that a resume checks before trusting it.

Elsewhere the run folder is on a local disk and `local_dir` is the run folder itself.
The Colab paths hang off `/content`; `MICROFOSSIL_COLAB_ROOT` moves them (the tests' stub Colab).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
from pathlib import Path

DRIVE_RUNS = "microfossil_runs"  # MyDrive/microfossil_runs/<dataset>: the run folders, in Colab
REMOUNT = ("Choose Runtime > Disconnect and delete runtime, then run this notebook again from the top: the run folder "
           "on Drive is kept.")  # what to do when Colab cannot mount Drive again (the setup cell says the same)


def colab_root():
    """The Colab runtime's working folder, `/content` (`MICROFOSSIL_COLAB_ROOT` in the tests)."""
    return Path(os.environ.get("MICROFOSSIL_COLAB_ROOT", "/content"))


def drive_mount():
    """Where the setup cell mounts Google Drive."""
    return colab_root() / "drive"


def my_drive():
    """The user's Drive ("My Drive") under the mount."""
    return drive_mount() / "MyDrive"


def in_colab():
    """True in a Colab runtime: its notebook kernel, and the processes it starts (`!python run_pipeline.py`)."""
    if "google.colab" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):
        return False


def headless():
    """True when a notebook runs through `run_pipeline.py` (papermill): no widget, no Drive mount or flush."""
    return bool(os.environ.get("MICROFOSSIL_HEADLESS"))


def drive_mounted():
    return my_drive().is_dir()


def runs_home():
    """The folder run folders go in by default: `MyDrive/microfossil_runs` in Colab (a disconnect loses nothing), None
    elsewhere (the project's `runs/`). In Colab with Drive not mounted (`!python run_pipeline.py` before the setup
    cell), None with a warning: the run would be lost with the runtime."""
    if not in_colab():
        return None
    if drive_mounted():
        return my_drive() / DRIVE_RUNS
    print(f"WARNING: Google Drive is not mounted at {drive_mount()}: this run goes to the runtime's local disk and is "
          "lost when the runtime disconnects. Run the setup cell of a notebook (it mounts Drive) first, or pass "
          "--work-dir on Drive.", file=sys.stderr)
    return None


def on_drive(path):
    """True when `path` is on the Google Drive mount (whatever links lead there)."""
    path, mount = Path(path).resolve(), drive_mount()
    for root in {mount.absolute(), mount.resolve()}:
        if path == root or root in path.parents:
            return True
    return False


def require_mounted(path):
    """Stop when `path` is on the Drive mount while Drive is not mounted (after `flush_drive`): what was written
    there would go to the runtime's local disk instead, unseen, and block the next mount."""
    if on_drive(path) and not drive_mounted():
        raise RuntimeError(f"{path} is on Google Drive, which is not mounted (flush_drive unmounts it at the end of a "
                           "notebook): run the setup cell again, then this cell.")


def local_dir(work_dir, *parts):
    """A folder on the local disk for run folder `work_dir`'s scratch files (`parts` below it), created if needed:
    the run folder itself, unless it is on Drive; then `/content/microfossil_local/<run>/`, lost with the runtime."""
    work_dir = Path(work_dir)
    require_mounted(work_dir)
    base = work_dir
    if on_drive(work_dir):
        tag = hashlib.sha1(str(work_dir.resolve()).encode()).hexdigest()[:6]  # two runs of one name stay apart
        base = colab_root() / "microfossil_local" / f"{work_dir.name}-{tag}"
    folder = base.joinpath(*parts)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cache_dirs(work_dir):
    """Where `volume.load_volume` caches the decoded scan of run folder `work_dir`: `local_dir(work_dir, "cache")`;
    with the run folder on Drive, `(that, work_dir/cache)`: a copy kept on Drive, which the next notebook's fresh
    runtime copies back (one file read) instead of decoding every slice from Drive again."""
    local = local_dir(work_dir, "cache")
    return (local, Path(work_dir) / "cache") if on_drive(work_dir) else local


def copy_in_place(src, dst, block=1 << 22):
    """Copy file `src` over `dst` by rewriting `dst`'s own bytes (opened for writing, never renamed or deleted: on
    Drive the same file, so nothing is left in the trash); return `{"size", "sha256"}` of what was written. Not
    atomic: a kill mid-copy leaves `dst` cut short, which its recorded size and hash then reveal (`matches`)."""
    h, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for chunk in iter(lambda: fin.read(block), b""):
            fout.write(chunk)
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def write_in_place(path, text):
    """Write `text` (str or bytes) over file `path` in place (see `copy_in_place`), unlike `io.write_text`, which
    replaces the file: small records, the history and the review's decisions on Drive."""
    Path(path).write_bytes(text.encode() if isinstance(text, str) else text)


def file_digest(path, block=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def matches(path, size, sha256):
    """True when file `path` exists with this size and SHA-256: the file its record describes, fully uploaded."""
    path = Path(path)
    return path.is_file() and path.stat().st_size == size and file_digest(path) == sha256


_BEFORE_FLUSH = {}  # key -> what `flush_drive` runs before it unmounts Drive (`before_flush`)


def before_flush(key, fn):
    """Have `flush_drive` call `fn()` before it unmounts Drive (one per `key`): the review registers the copy of
    the drawings it made on the local disk (`exports.publish_drawings`)."""
    _BEFORE_FLUSH[key] = fn


def flush_drive():
    """End of a notebook in Colab: wait until everything written to Drive is uploaded (`drive.flush_and_unmount`),
    so the next notebook, on a fresh runtime, finds it. Drive is unmounted: re-run the setup cell to write again."""
    if not in_colab():
        print("Run folder on a local disk: nothing to flush.")
        return False
    if headless():
        print("Headless run: Drive is flushed when the runtime's notebook calls drive.flush_and_unmount().")
        return False
    if not drive_mounted():
        print("Drive is not mounted: nothing to flush.")
        return False
    from google.colab import drive
    t = time.time()
    for key, fn in list(_BEFORE_FLUSH.items()):
        try:
            fn()
        except Exception as e:  # a drawing not copied is drawn again later; the flush goes on
            print(f"WARNING: {key}: {e}", file=sys.stderr)
    drive.flush_and_unmount()
    print(f"Drive flushed in {time.time() - t:.0f}s: everything this notebook wrote is on Drive. Drive is now "
          f"unmounted; re-run the setup cell before running more cells here. If it cannot mount Drive again: {REMOUNT}")
    return True


def check_gpu(cuda, cpu_ok):
    """In Colab, stop a full run on a CPU runtime (`cuda` False) unless `cpu_ok` (quick or smoke mode)."""
    if in_colab() and not cuda and not cpu_ok:
        raise RuntimeError("This Colab runtime has no GPU, and the full schedule would take days on its CPU. Choose "
                           "Runtime > Change runtime type > T4 GPU (or any GPU), then run the notebook again from the "
                           "top; or set quick = True in the parameters cell for the CPU demo.")


TRAIN_BYTES_PER_PIXEL = 2600  # GPU memory per input pixel of a training batch (ResNet34 U-Net, mixed precision),
                              # from the peak GPU memory of bench/benchmark.py at 1/2 and full size, bs 16 and 4
MODEL_RESERVE = 1.5e9  # the model, its gradients, AdamW's state and the convolution workspaces
CPU_BATCH_PIXELS = 4_000_000  # off a GPU: the published recipe's batches (16 at 1/4 and 1/2, 4 at full size of 1000^2)
MAX_AUTO_BS = 16  # the recipe's largest batch: a larger GPU is not a reason to change the schedule's dynamics


def batch_size_for(size, device):
    """The batch size that training at `size` (H, W) fits on `device` (bs=None in a parameters cell): on CUDA, from the
    GPU's free memory now (the volume already there), `TRAIN_BYTES_PER_PIXEL` a pixel, with a fifth kept spare; else
    `CPU_BATCH_PIXELS`; within 1..`MAX_AUTO_BS`. Returns `(bs, why)`. An out-of-memory error later halves it anyway
    (`halve_on_oom`)."""
    pixels = int(size[0]) * int(size[1])
    if getattr(device, "type", str(device)) == "cuda":
        import torch
        free = torch.cuda.mem_get_info(device)[0]
        bs = int(0.8 * (free - MODEL_RESERVE) // (TRAIN_BYTES_PER_PIXEL * pixels))
        why = f"from the GPU's {free / 1e9:.1f} GB free"
    else:
        bs, why = CPU_BATCH_PIXELS // pixels, f"{CPU_BATCH_PIXELS / 1e6:.0f} M pixels a batch off a GPU"
    return max(1, min(MAX_AUTO_BS, bs)), why


def _out_of_memory(e):
    """True for torch's CUDA out-of-memory error (`torch.OutOfMemoryError`, a RuntimeError in older torch)."""
    return type(e).__name__ == "OutOfMemoryError" or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def halve_on_oom(run, bs, what="training"):
    """`run(bs)`; when CUDA runs out of memory, again with half the batch, down to 1, saying so each time. Returns
    `(run's result, the batch size it ran with)`."""
    while True:
        try:
            return run(bs), bs
        except Exception as e:
            if not _out_of_memory(e) or bs <= 1:
                raise
        torch = sys.modules.get("torch")  # (outside the except clause: its traceback, which holds the batch, is gone)
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"{what}: CUDA out of memory at batch size {bs}; going on with batch size {bs // 2}")
        bs //= 2


def widgets_major():
    """The major version of the installed ipywidgets (7 in Colab, 8 in current Jupyter)."""
    import ipywidgets
    return int(ipywidgets.__version__.split(".")[0])


def enable_colab_widgets():
    """In Colab with ipywidgets 8 or later, turn on the custom widget manager they need there. Colab renders its own
    ipywidgets 7 natively, and the custom manager is known to hide core widgets then: with 7, nothing is done.
    Returns True when the manager was turned on."""
    if "google.colab" not in sys.modules or widgets_major() < 8:
        return False
    try:
        from google.colab import output
        output.enable_custom_widget_manager()
        return True
    except Exception:
        return False


class Progress:
    """A progress bar (fastprogress, as fastai's own) over `total` units of work, with the rate (`unit` per second)
    and the time left: `bar = Progress(Z, "slices")`, then `bar.step(n)` after each n done; the bar ends at `total`."""

    def __init__(self, total, unit="slices"):
        from fastprogress.fastprogress import progress_bar
        self.total, self.unit, self.done, self.t0 = int(total), unit, 0, time.time()
        self.bar = progress_bar(range(self.total), total=self.total) if self.total else None
        if self.bar is not None:
            self.bar.update(0)

    def step(self, n=1):
        if self.bar is None or self.done >= self.total:
            return
        self.done = min(self.total, self.done + int(n))
        self.bar.comment = f"{self.done / max(time.time() - self.t0, 1e-9):.1f} {self.unit}/s"
        self.bar.update(self.done)
