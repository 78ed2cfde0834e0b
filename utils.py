"""Shared code for the microfossil micro-CT notebooks.

Grouped by stage: paths and set-up -> data (reading, validating, the embedded
sample) -> training (DataLoaders, learner, metrics, checkpoints) -> prediction
-> extraction (3D specimens, catalogue, exports) -> review -> plots. The
notebooks in `notebooks/` stay thin and call into this file.

The data contract (see README): a dataset folder holds `train/` (one grayscale
image per CT slice, PNG or TIFF, 8 or 16 bit, or multi-page TIFF volumes),
`train_masks_labels/<stem>_GT<ext>` (integer class label per pixel) and
`codes.txt` (one class name per line, line index = label value, line 0 = the
background / rock matrix). Slices in natural name order are the z order.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")  # raised inside fastai's imports
import torch.nn.functional as F
from fastai.vision.all import (CrossEntropyLossFlat, CSVLogger, Callback, DataLoader, DataLoaders, Metric,
                               Normalize, Pipeline, TensorImage, TensorMask, Transform,
                               create_unet_model, imagenet_stats, unet_learner)
from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import valley
from fastai.learner import AvgLoss, AvgSmoothLoss
from fastai.learner import load_model as _fastai_load_model
from fastai.torch_core import find_bs
from fastai.optimizer import OptimWrapper
from fastai.vision.augment import RandTransform
from fastai.vision.learner import model_meta

__all__ = [
    # paths and set-up
    "ROOT", "resolve_paths", "fetch_dataset", "get_device",
    # data
    "DatasetError", "Volume", "load_volume", "read_codes", "split_slices", "describe_volume",
    "make_sample", "ensure_sample", "SAMPLE_SIZES",
    # training
    "STAGES", "stage_size", "make_dls", "build_learner", "seg_metrics", "load_stage",
    "find_lr", "train_phase", "phase_done",
    # metrics
    "confusion_matrix", "segmentation_scores",
    # prediction
    "load_model", "predict_volume", "save_metrics",
    # extraction
    "read_voxel_size", "extract_fossils", "evaluate_specimens", "MIN_VOXELS",
    # specimen classifier and evaluation table
    "classify_specimens", "NOT_A_FOSSIL", "SPECIMEN_FEATURES", "variant_name", "evaluation_row", "write_evaluation",
    "describe_specimen_scores",
    # review
    "ReviewSession", "ReviewPanel", "has_widget_frontend",
    # plots
    "plot_slice", "plot_orthoviews", "plot_histogram", "plot_history", "plot_predictions",
]

ROOT = Path(__file__).resolve().parent
IMAGE_EXTS = (".png", ".tif", ".tiff")
IS_COLAB = "google.colab" in sys.modules
DRIVE_RUNS = Path("/content/drive/MyDrive/microfossil_runs")

# ----------------------------------------------------------------------------
# Paths and set-up
# ----------------------------------------------------------------------------

# Sizes (slices, height, width) of the embedded sample. "default" runs the whole
# quick-mode demo on a 2-core CPU in minutes; "full" is the size of the published
# LAPiX volume (983 slices of 1004 x 956).
SAMPLE_SIZES = {"default": (48, 256, 256), "full": (983, 1004, 956)}


def resolve_paths(data_dir=None, work_dir=None, quick=False, data_url=None, sample_size="default", seed=0):
    """Return `(data_dir, work_dir)` as Paths, making the embedded sample or downloading `data_url` when needed.

    `data_dir=None` means the embedded sample of size `sample_size` (a key of
    `SAMPLE_SIZES`), generated once under `data/`. `work_dir=None` means
    `runs/<dataset>[_quick]` locally, and the same under MyDrive/microfossil_runs in Colab.
    """
    if data_url:
        data_dir = fetch_dataset(data_url)
    elif data_dir is None:
        if sample_size not in SAMPLE_SIZES:
            raise ValueError(f"sample_size must be one of {list(SAMPLE_SIZES)}, got {sample_size!r}")
        data_dir = ensure_sample(ROOT / "data" / f"sample_{sample_size}", *SAMPLE_SIZES[sample_size], seed=seed)
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise DatasetError(f"data_dir {data_dir} does not exist. Set `data_dir` to a folder holding "
                           "train/, train_masks_labels/ and codes.txt, or leave it None for the embedded sample.")
    if work_dir is None:
        base = DRIVE_RUNS if IS_COLAB else ROOT / "runs"
        work_dir = base / (data_dir.name + ("_quick" if quick else ""))
    work_dir = Path(work_dir).expanduser().resolve()
    if work_dir == data_dir or data_dir in work_dir.parents:
        raise DatasetError(f"work_dir {work_dir} is inside the dataset folder {data_dir}; "
                           "the dataset is never written to, so choose a work_dir outside it.")
    work_dir.mkdir(parents=True, exist_ok=True)
    return data_dir, work_dir


def fetch_dataset(data_url, dest=None):
    """Download and unzip the dataset at `data_url` (Google Drive id/URL, HTTP URL or local zip) once; return its folder.

    The zip is kept under `data/downloads/<hash>/` and reused on later calls. The
    returned folder is the one inside the archive that holds `train/`.
    """
    dest = Path(dest or ROOT / "data" / "downloads" / hashlib.sha1(data_url.encode()).hexdigest()[:10])
    done = dest / ".complete"
    if not done.exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = dest / "dataset.zip"
        print(f"Downloading {data_url} -> {archive}")
        try:
            if Path(data_url).expanduser().is_file():  # a zip already on disk
                shutil.copyfile(Path(data_url).expanduser(), archive)
            elif "drive.google.com" in data_url or not re.match(r"^[a-z]+://", data_url):
                import gdown  # Google Drive id or share link
                kw = {"url": data_url, "fuzzy": True} if "://" in data_url else {"id": data_url}
                if gdown.download(output=str(archive), quiet=False, **kw) is None:
                    raise OSError("gdown returned nothing (is the file shared as 'anyone with the link'?)")
            else:
                import urllib.request
                with urllib.request.urlopen(data_url, timeout=60) as r, open(archive, "wb") as f:
                    shutil.copyfileobj(r, f)
        except Exception as e:
            raise DatasetError(f"Could not download {data_url}: {e}. Check the link and the network, or "
                               "download the zip by hand, unzip it and set `data_dir` to its folder.") from e
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(dest / "unzipped")
        except zipfile.BadZipFile as e:
            raise DatasetError(f"{archive} downloaded from {data_url} is not a zip file. "
                               "Point `data_url` at a zipped dataset folder.") from e
        archive.unlink()
        done.write_text(data_url)
    roots = sorted(p.parent for p in (dest / "unzipped").rglob("train") if p.is_dir())
    if not roots:
        raise DatasetError(f"The archive from {data_url} holds no train/ folder; see the data contract in README.md.")
    return roots[0]


def get_device(verbose=True):
    """Return the torch device to use: CUDA, then Apple MPS, else CPU (with a visible message)."""
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        if verbose: print(f"Using GPU: {torch.cuda.get_device_name(0)}")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        dev = torch.device("mps")
        if verbose: print("Using Apple GPU (MPS)")
    else:
        dev = torch.device("cpu")
        if verbose: print("No GPU found: running on the CPU (fine for the sample and quick mode, slow for full volumes).")
    return dev


# ----------------------------------------------------------------------------
# Data: reading and validating a dataset
# ----------------------------------------------------------------------------

class DatasetError(ValueError):
    """A problem with the user's dataset; the message names the file and the fix."""


@dataclass
class Volume:
    """A CT volume held in memory: `images` (Z,H,W) uint8 after intensity windowing, `labels` (Z,H,W) or None."""
    images: np.ndarray
    labels: np.ndarray | None
    codes: list
    stems: list
    source: Path
    window: tuple = (0.0, 255.0)
    raw_dtype: str = "uint8"
    files: list = field(default_factory=list, repr=False)

    @property
    def shape(self): return self.images.shape


def _natural_key(p):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(p).name)]


def read_codes(path):
    """Read class names from `codes.txt` at `path` (one per line, line index = label value)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} is missing. Add codes.txt with one class name per line "
                           "(line 0 = background), e.g. 'background', 'foraminifera', 'ostracod'.")
    codes = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").splitlines()]
    while codes and not codes[-1]: codes.pop()
    if len(codes) < 2 or any(not c for c in codes):
        raise DatasetError(f"{path} must list at least two class names, one per line, with no blank lines "
                           f"in between (found {codes!r}).")
    if len(codes) > 255:
        raise DatasetError(f"{path} lists {len(codes)} classes; at most 255 are supported.")
    return codes


def _gray(arr, path):
    """One page as a 2D array: colour pages that are gray keep one channel, others become luminance."""
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        arr = rgb[..., 0] if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all() \
            else rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    if arr.ndim != 2 or arr.size == 0:
        raise DatasetError(f"{path} has pages of shape {arr.shape}; expected 2D grayscale slices.")
    return arr


def _is_tiff(path): return Path(path).suffix.lower() in (".tif", ".tiff")


def _n_pages(path):
    """Number of slices in image file `path` (TIFF pages; 1 for PNG), reading headers only."""
    if not _is_tiff(path):
        return 1
    import tifffile
    try:
        with tifffile.TiffFile(path) as t:
            return len(t.pages)
    except Exception as e:
        raise DatasetError(f"Cannot read {path}: {e}. The file is corrupt or not an image; "
                           "re-export it as PNG or TIFF, or remove it.") from e


def _iter_pages(path, step=1):
    """Yield every `step`-th slice of image `path`, one at a time, as 2D arrays; raise DatasetError if unreadable."""
    path = Path(path)
    try:
        if _is_tiff(path):
            import tifffile
            with tifffile.TiffFile(path) as t:
                for k in range(0, len(t.pages), step):
                    yield _gray(t.pages[k].asarray(), path)
        else:
            from PIL import Image
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im)
            yield _gray(arr, path)
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"Cannot read {path}: {e}. The file is corrupt or not an image; "
                           "re-export it as PNG or TIFF, or remove it.") from e


def _find_mask(masks_dir, img):
    stem = img.stem
    for ext in (img.suffix, *IMAGE_EXTS):
        for cand in (masks_dir / f"{stem}_GT{ext}", masks_dir / f"{stem}_GT{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def _window_of(pages):
    """Intensity window (lo, hi) from a sample of raw `pages`: identity for 8-bit, else 0.1-99.9 percentiles."""
    if pages[0].dtype == np.uint8:
        return 0.0, 255.0
    lo, hi = np.percentile(np.stack([p[::4, ::4] for p in pages]), [0.1, 99.9])
    return float(lo), float(max(hi, lo + 1.0))


def _to_uint8(raw, window):
    if raw.dtype == np.uint8:
        return raw
    lo, hi = window
    return np.clip((raw.astype(np.float32) - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)


def _cache_key(data_dir, files):
    h = hashlib.sha1(str(Path(data_dir).resolve()).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def load_volume(data_dir, require_labels=True, cache_dir=None):
    """Load and validate the dataset in `data_dir` into a `Volume`; never writes to `data_dir`.

    Raises `DatasetError` naming the file and the fix for: no images, a missing mask,
    image/mask size mismatch, a label with no line in codes.txt, an unreadable file,
    slices of different sizes. With `require_labels=False` a missing
    `train_masks_labels/` folder gives `labels=None` (prediction on new scans).
    Slices are read one at a time into one preallocated uint8 array. With `cache_dir`,
    that array is a `.npy` file there, and later calls on unchanged files
    memory-map it instead of decoding the images again (volumes larger than RAM work).
    """
    data_dir = Path(data_dir)
    img_dir, mask_dir = data_dir / "train", data_dir / "train_masks_labels"
    if not img_dir.is_dir():
        raise DatasetError(f"{img_dir} does not exist. Put one image per CT slice (PNG or TIFF) in "
                           f"{data_dir}/train/, or point data_dir at the folder that holds train/.")
    files = sorted((p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")),
                   key=_natural_key)
    if not files:
        raise DatasetError(f"No images in {img_dir}. Expected PNG or TIFF slices "
                           f"(found: {', '.join(sorted(p.name for p in img_dir.iterdir())[:5]) or 'nothing'}).")
    has_masks = mask_dir.is_dir()
    if require_labels and not has_masks:
        raise DatasetError(f"{mask_dir} does not exist. Add a label image <stem>_GT<ext> per slice there.")
    codes_path = data_dir / "codes.txt"
    codes = read_codes(codes_path) if (require_labels or codes_path.exists()) else None
    masks = []
    if has_masks:
        for f in files:
            m = _find_mask(mask_dir, f)
            if m is None:
                raise DatasetError(f"No mask for {f}: expected {mask_dir / (f.stem + '_GT' + f.suffix)}. "
                                   "Add it, or remove the slice from train/.")
            masks.append(m)
    counts = [_n_pages(f) for f in files]
    stems = [s for f, n in zip(files, counts) for s in ([f.stem] if n == 1 else [f"{f.stem}_{k:04d}" for k in range(n)])]

    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / _cache_key(data_dir, files + masks + ([codes_path] if codes_path.exists() else []))
        meta_file = cache / "volume.json"
        if meta_file.exists():
            meta = json.loads(meta_file.read_text())
            return Volume(images=np.load(cache / "images.npy", mmap_mode="r"),
                          labels=np.load(cache / "labels.npy", mmap_mode="r") if meta["has_labels"] else None,
                          codes=codes, stems=stems, source=data_dir, window=tuple(meta["window"]),
                          raw_dtype=meta["raw_dtype"], files=files)

    # the intensity window comes from a sample of about 32 slices spread over z
    first = next(_iter_pages(files[0]))
    shape, raw_dtype = first.shape, str(first.dtype)
    sample = [first] if first.dtype == np.uint8 else [
        p for f, n in list(zip(files, counts))[::max(1, len(files) // 32)] for p in _iter_pages(f, max(1, n // 32))]
    window = _window_of(sample)
    del sample

    Z = len(stems)
    tmp = None
    if cache is not None:
        tmp = cache.with_name(cache.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        alloc = lambda name: np.lib.format.open_memmap(tmp / name, "w+", np.uint8, (Z, *shape))  # noqa: E731
    else:
        alloc = lambda name: np.empty((Z, *shape), np.uint8)  # noqa: E731
    images = alloc("images.npy")
    labels = alloc("labels.npy") if has_masks else None
    z = 0
    for i, f in enumerate(files):
        z0 = z
        for page in _iter_pages(f):
            if page.shape != shape:
                raise DatasetError(f"{f} is {page.shape[1]}x{page.shape[0]} (WxH) but {files[0].name} is "
                                   f"{shape[1]}x{shape[0]}: all slices of a volume must have the same size. "
                                   "Crop or pad them to one size.")
            images[z] = _to_uint8(page, window)
            z += 1
        if not has_masks:
            continue
        m = masks[i]
        k = z0
        for lab in _iter_pages(m):
            if lab.shape != shape or k >= z:
                raise DatasetError(f"{m} does not match its image {f} ({z - z0} slice(s) of {shape[0]}x{shape[1]}, "
                                   f"HxW): a mask must match its slice pixel for pixel.")
            if np.issubdtype(lab.dtype, np.floating) and not np.array_equal(lab, np.round(lab)):
                raise DatasetError(f"{m} holds non-integer values; masks must hold integer class labels.")
            if lab.min() < 0 or lab.max() >= len(codes):
                bad = int(lab.max()) if lab.max() >= len(codes) else int(lab.min())
                raise DatasetError(f"{m} holds label {bad}, but {codes_path} lists only {len(codes)} classes "
                                   f"(labels 0..{len(codes) - 1}). Add a line for it to codes.txt or fix the mask.")
            labels[k] = lab
            k += 1
        if k != z:
            raise DatasetError(f"{m} has {k - z0} slice(s) but its image {f} has {z - z0}: "
                               "a mask must match its slice pixel for pixel.")
    if tmp is not None:
        images.flush()
        if labels is not None:
            labels.flush()
        del images, labels
        (tmp / "volume.json").write_text(json.dumps({"window": window, "raw_dtype": raw_dtype, "has_labels": has_masks}))
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
        return load_volume(data_dir, require_labels, cache_dir)
    return Volume(images=images, labels=labels, codes=codes, stems=stems, source=data_dir,
                  window=window, raw_dtype=raw_dtype, files=files)


def split_slices(n_slices, valid_pct=0.2):
    """Split `n_slices` into (train, valid) index arrays: the LAST `valid_pct` of z is one validation block.

    Neighbouring slices are nearly identical, so a random split would leak.
    """
    if not 0 <= valid_pct < 1:
        raise ValueError(f"valid_pct must be in [0, 1), got {valid_pct}")
    n_valid = int(round(n_slices * valid_pct))
    if valid_pct > 0:
        n_valid = max(1, n_valid)
    if n_slices - n_valid < 1:
        raise DatasetError(f"Only {n_slices} slice(s): need at least one training slice "
                           f"besides the {n_valid} validation slice(s). Lower valid_pct or add slices.")
    idx = np.arange(n_slices)
    return idx[: n_slices - n_valid], idx[n_slices - n_valid:]


def describe_volume(vol):
    """Summary of `vol`: slice count and size, intensity window and per-class pixel fractions."""
    z, h, w = vol.shape
    info = {"source": str(vol.source), "slices": z, "height": h, "width": w, "raw_dtype": vol.raw_dtype,
            "intensity_window": [round(v, 3) for v in vol.window]}
    if vol.labels is not None:
        n = len(vol.codes)
        counts, present = np.zeros(n, np.int64), np.zeros(n, np.int64)
        for lab in vol.labels:  # one pass, slice by slice
            bc = np.bincount(lab.ravel(), minlength=n)[:n]
            counts += bc
            present += bc > 0
        info["class_fraction"] = {c: float(k / counts.sum()) for c, k in zip(vol.codes, counts)}
        info["slices_with_class"] = {c: int(k) for c, k in zip(vol.codes, present)}
    return info


# ----------------------------------------------------------------------------
# Data: the embedded synthetic sample
# ----------------------------------------------------------------------------

SAMPLE_CODES = ["background", "foraminifera", "ostracod"]


def _rotation(rng):
    q = rng.normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array([[a*a+b*b-c*c-d*d, 2*(b*c-a*d), 2*(b*d+a*c)],
                     [2*(b*c+a*d), a*a-b*b+c*c-d*d, 2*(c*d-a*b)],
                     [2*(b*d-a*c), 2*(c*d+a*b), a*a-b*b-c*c+d*d]])


def _make_objects(shape, seed):
    """Draw the sample's objects (fossils, pores, grains) deterministically from `seed`."""
    Z, H, W = shape
    rng = np.random.default_rng(seed)
    scale = math.sqrt(min(H, W) / 256)
    core_r = 0.46 * min(H, W)
    core_vox = math.pi * core_r ** 2 * Z
    objs = []
    taken_c, taken_r = np.empty((0, 3)), np.empty(0)  # placed objects, for vectorised overlap checks

    def place(radius, tries=200, zrange=None):
        nonlocal taken_c, taken_r
        for _ in range(tries):
            rr = core_r - radius - 2
            if rr <= 0:
                return None
            a, d = rng.uniform(0, 2 * math.pi), rr * math.sqrt(rng.uniform())
            z = rng.uniform(*zrange) if zrange else rng.uniform(-radius * 0.3, Z - 1 + radius * 0.3)
            c = np.array([z, H / 2 + d * math.sin(a), W / 2 + d * math.cos(a)])
            if np.all(np.linalg.norm(taken_c - c, axis=1) > taken_r + radius + 2):
                taken_c, taken_r = np.vstack([taken_c, c]), np.append(taken_r, radius)
                return c
        return None

    n_foram = max(2, round(core_vox * 3.0e-6 / scale ** 3))
    n_ostra = max(2, round(core_vox * 2.0e-6 / scale ** 3))
    # the first specimen of each class lies in the last 20% of z (the default validation block), the second before it
    zranges = [(0.84 * Z, 0.96 * Z), (0.1 * Z, 0.7 * Z)]
    for kind, n in (("foram", n_foram), ("ostracod", n_ostra)):
        for i in range(n):
            zr = zranges[i] if i < len(zranges) else None
            R = _rotation(rng)
            if kind == "foram":
                n_ch, r0, g = rng.integers(4, 9), rng.uniform(2.5, 4.0) * scale, rng.uniform(1.15, 1.3)
                radii = r0 * g ** np.arange(n_ch)
                ang = np.cumsum(np.full(n_ch, rng.uniform(0.75, 1.0)))
                dist = 1.35 * radii
                local = np.stack([rng.uniform(-0.3, 0.3) * radii, dist * np.cos(ang), dist * np.sin(ang)], 1)
                local -= local.mean(0)
                extent = float(np.max(np.linalg.norm(local, axis=1) + radii))
                c = place(extent, zrange=zr)
                if c is None: continue
                objs.append(dict(kind="foram", label=1, center=c, extent=extent, R=R, chambers=local, radii=radii,
                                 wall=max(1.2, 0.12 * radii.max()), filled=bool(rng.uniform() < 0.4)))
            else:
                L = rng.uniform(7, 13) * scale
                axes = np.array([0.5, 0.65, 1.0]) * L * rng.uniform(0.9, 1.1, 3)
                c = place(float(axes.max()), zrange=zr)
                if c is None: continue
                objs.append(dict(kind="ostracod", label=2, center=c, extent=float(axes.max()), R=R, axes=axes,
                                 wall=max(1.2, 0.1 * axes.min()), filled=bool(rng.uniform() < 0.4)))
    for _ in range(max(4, round(core_vox * 1.5e-5 / scale ** 3))):  # pores: dark ellipsoids
        axes = rng.uniform(1.5, 6, 3) * scale
        c = place(float(axes.max()), tries=20)
        if c is not None:
            objs.append(dict(kind="pore", label=0, center=c, extent=float(axes.max()), R=_rotation(rng), axes=axes))
    for _ in range(max(4, round(core_vox * 1.0e-5 / scale ** 3))):  # dense mineral grains (pyrite)
        axes = rng.uniform(1.0, 3.5, 3) * scale
        c = place(float(axes.max()), tries=20)
        if c is not None:
            objs.append(dict(kind="grain", label=0, center=c, extent=float(axes.max()), R=_rotation(rng), axes=axes))
    return objs


def _render_object(o, img, lab, z0):
    """Paint object `o` into the slab `img`/`lab` whose first slice is z index `z0`."""
    Zs, H, W = img.shape
    e = o["extent"] + 2
    lo = np.floor(o["center"] - e).astype(int)
    hi = np.ceil(o["center"] + e).astype(int) + 1
    lo_c = np.maximum(lo, [z0, 0, 0])
    hi_c = np.minimum(hi, [z0 + Zs, H, W])
    if np.any(hi_c <= lo_c):
        return
    g = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo_c, hi_c)], indexing="ij"), -1)
    p = (g - o["center"].astype(np.float32)) @ o["R"].astype(np.float32)  # local coordinates
    sl = tuple(slice(a - (z0 if i == 0 else 0), b - (z0 if i == 0 else 0)) for i, (a, b) in enumerate(zip(lo_c, hi_c)))
    sub_img, sub_lab = img[sl], lab[sl]
    if o["kind"] in ("pore", "grain"):
        inside = np.sum((p / o["axes"]) ** 2, -1) < 1
        sub_img[inside] = 0.14 if o["kind"] == "pore" else 0.97
        return
    if o["kind"] == "foram":
        d = np.stack([np.linalg.norm(p - c, axis=-1) - r for c, r in zip(o["chambers"], o["radii"])], 0)
        inside = (d < 0).any(0)
        wall = inside & (np.max(np.where(d < 0, d, -np.inf), 0) > -o["wall"])
    else:
        rho = np.linalg.norm(p / o["axes"], axis=-1)
        inside = rho < 1
        wall = inside & (rho > 1 - o["wall"] / o["axes"].min())
        wall &= ~((np.abs(p[..., 1]) < 0.6) & (p[..., 0] < 0))  # gape between the two valves
    sub_img[inside] = 0.52 if o["filled"] else 0.10
    sub_img[wall] = 0.82
    sub_lab[inside] = o["label"]


def _texture(zs, H, W, seed):
    """Smooth carbonate-matrix texture on slices `zs`: a sum of random 3D plane waves, seamless in z."""
    rng = np.random.default_rng(seed + 7919)
    k = rng.normal(size=(24, 3)) * np.array([0.05, 0.05, 0.05]) * rng.uniform(0.3, 3.0, (24, 1))
    ph, amp = rng.uniform(0, 2 * np.pi, 24), 1 / np.sqrt(24)
    y, x = np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32)
    out = np.zeros((len(zs), H, W), np.float32)
    for kk, p in zip(k, ph):
        ey, ex = np.exp(1j * kk[1] * y).astype(np.complex64), np.exp(1j * kk[2] * x).astype(np.complex64)
        plane = np.outer(ey, ex)
        for i, z in enumerate(zs):
            out[i] += amp * (plane * np.exp(1j * (kk[0] * z + p))).real
    return out


def _sample_slabs(shape, seed, bit_depth, s0, s1, objs):
    """Yield (z, image slice, label slice) of the sample for z in [s0, s1): one slab, blurred with a margin."""
    from scipy import ndimage
    Z, H, W = shape
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    r = np.hypot(yy - (H - 1) / 2, xx - (W - 1) / 2)
    core_r = 0.46 * min(H, W)
    core = r < core_r
    rng_r = np.random.default_rng(seed + 1)
    rings = sum(a * np.exp(-0.5 * ((r - r0) / 0.8) ** 2)
                for r0, a in zip(rng_r.uniform(0, core_r, 6), rng_r.uniform(-0.05, 0.05, 6))).astype(np.float32)
    maxval, dtype = (255, np.uint8) if bit_depth == 8 else (65535, np.uint16)
    m = 3  # margin for the 3D blur
    a0, a1 = max(0, s0 - m), min(Z, s1 + m)
    img = np.where(core, 0.45 + 0.07 * _texture(np.arange(a0, a1), H, W, seed), 0.04).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    for o in objs:
        _render_object(o, img, lab, a0)
    img[:, ~core] = 0.04
    img = ndimage.gaussian_filter(img, 0.9)[s0 - a0: s1 - a0]
    lab = lab[s0 - a0: s1 - a0]
    for i, z in enumerate(range(s0, s1)):
        noise = np.random.default_rng([seed, z]).normal(0, 0.035, (H, W)).astype(np.float32)
        sl = np.clip((img[i] + rings + noise) * 0.9 + 0.05, 0, 1)
        yield z, (sl * maxval + 0.5).astype(dtype), lab[i]


def _write_png_slab(out_dir, shape, seed, bit_depth, s0, s1, objs):
    from PIL import Image
    for z, sl, lab in _sample_slabs(shape, seed, bit_depth, s0, s1, objs):
        Image.fromarray(sl).save(out_dir / "train" / f"slice_{z:04d}.png")
        Image.fromarray(lab).save(out_dir / "train_masks_labels" / f"slice_{z:04d}_GT.png")


def make_sample(out_dir, n_slices=48, height=256, width=256, seed=0, bit_depth=8, fmt="png", slab=48, workers=None):
    """Write a synthetic micro-CT sample in the dataset layout to `out_dir`; deterministic from `seed`.

    A cylindrical carbonate core in air with pores, dense grains, foraminifera
    (chambers along a spiral, thin bright calcite walls, hollow or sediment-filled)
    and ostracods (two thin valves of an ellipsoid), then CT blur, noise and ring
    artefacts. Labels: 0 background, 1 foraminifera, 2 ostracod. `fmt` is "png"
    (one file per slice) or "tif-stack" (one multi-page TIFF). Works slab by slab,
    so the full 983 x 1004 x 956 size fits in a few GB of RAM; PNG slabs are written
    by up to `workers` processes (default: the CPU count, at most 8).
    """
    import tifffile
    out_dir = Path(out_dir)
    (out_dir / "train").mkdir(parents=True, exist_ok=True)
    (out_dir / "train_masks_labels").mkdir(parents=True, exist_ok=True)
    (out_dir / "codes.txt").write_text("\n".join(SAMPLE_CODES) + "\n")
    shape = (n_slices, height, width)
    objs = _make_objects(shape, seed)
    slabs = [(s0, min(n_slices, s0 + slab)) for s0 in range(0, n_slices, slab)]
    if fmt == "tif-stack":
        with tifffile.TiffWriter(out_dir / "train" / "volume.tif") as ti, \
                tifffile.TiffWriter(out_dir / "train_masks_labels" / "volume_GT.tif") as tl:
            for s0, s1 in slabs:
                for _, sl, lab in _sample_slabs(shape, seed, bit_depth, s0, s1, objs):
                    ti.write(sl, contiguous=True)
                    tl.write(lab, contiguous=True)
        return out_dir
    workers = min(len(slabs), workers or min(8, os.cpu_count() or 1))
    if workers > 1 and sys.platform.startswith("linux"):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for f in [pool.submit(_write_png_slab, out_dir, shape, seed, bit_depth, s0, s1, objs) for s0, s1 in slabs]:
                f.result()
    else:
        for s0, s1 in slabs:
            _write_png_slab(out_dir, shape, seed, bit_depth, s0, s1, objs)
    return out_dir


def ensure_sample(out_dir, n_slices=48, height=256, width=256, seed=0, **kw):
    """Generate the embedded sample into `out_dir` unless an identical one is already there; return `out_dir`.

    Written to a temporary folder and renamed, so an interrupted run never leaves a half sample.
    """
    out_dir = Path(out_dir)
    spec = dict(n_slices=n_slices, height=height, width=width, seed=seed, **kw)
    marker = out_dir / "sample.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.time()
    print(f"Generating the synthetic sample ({n_slices} slices of {height}x{width}) in {out_dir} ...")
    make_sample(tmp, **spec)
    (tmp / "sample.json").write_text(json.dumps(spec))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    print(f"  done in {time.time() - t:.1f}s")
    return out_dir


# ----------------------------------------------------------------------------
# Training: DataLoaders on the in-memory volume, batch transforms on the device
# ----------------------------------------------------------------------------

# The published schedule, one entry per training notebook.
STAGES = {
    "256": dict(size_frac=0.25, prev=None),
    "512": dict(size_frac=0.5, prev="256_unfrozen"),
    "full": dict(size_frac=1.0, prev="512_unfrozen"),
}


def stage_size(shape, size_frac, quick=False):
    """(height, width) for training at `size_frac` of slice `shape`.

    Quick mode caps the longest side (64 px at 1/4 and 1/2, 128 px at full); the
    shorter side never goes below 32 px (the encoder downsamples 32x) unless the slice is smaller.
    """
    h, w = shape[-2:]
    s = size_frac
    if quick:
        s = min(s, max(64, int(128 * size_frac)) / max(h, w))
    s = min(1.0, max(s, 32 / min(h, w)))
    return int(round(h * s)), int(round(w * s))


class _VolumeDL(DataLoader):
    """fastai DataLoader whose batches are gathered straight from the volume tensors (on the GPU when they fit).

    `planes` is a list of `(images, labels, lo, hi)`: uint8 tensors of slices stacked on
    dim 0 (the axial volume, or a permuted view of it for XZ / YZ slices), and the index
    range `[lo, hi)` that context slices are clamped to (so a training slice never takes
    context from the validation block). Items of plane 0 are the z indices `idx`; every
    epoch also draws `extra` random slices from each other plane (tri-planar training).
    A batch holds slices of one plane (`context` adjacent ones as channels) and is one
    indexing op: no per-slice Python, decoding or host-to-device copy on the training path.
    """
    def __init__(self, planes=None, idx=None, context=1, extra=0, dataset=None, **kwargs):
        self.planes, self.context, self.extra = planes, context, extra
        super().__init__(dataset=np.asarray(idx if idx is not None else dataset), **kwargs)

    def new(self, dataset=None, cls=None, **kwargs):  # fastai's `new` (get_preds, show_batch) with the planes kept
        return super().new(dataset, cls, **{"planes": self.planes, "context": self.context, "extra": self.extra, **kwargs})

    def _plane_sizes(self):
        return [len(self.dataset)] + [self.extra] * (len(self.planes) - 1)

    def __len__(self):
        nb = lambda n: n // self.bs if self.drop_last else -(-n // self.bs)  # noqa: E731
        return sum(nb(n) for n in self._plane_sizes())

    def create_batches(self, samps):
        groups = [np.asarray(self.dataset[list(samps)])]
        groups += [np.array([self.rng.randrange(len(p[0])) for _ in range(self.extra)], np.int64) for p in self.planes[1:]]
        batches = []  # (plane, start, stop) into the concatenated indices
        off = 0
        for p, g in enumerate(groups):
            stop = len(g) - len(g) % self.bs if self.drop_last else len(g)
            batches += [(p, off + i, off + min(i + self.bs, stop)) for i in range(0, stop, self.bs)]
            off += len(g)
        if len(groups) > 1 and self.shuffle:
            self.rng.shuffle(batches)
        # All the epoch's indices go to the volume's device in ONE copy: a per-batch host-to-device copy would
        # make the CPU wait for the GPU every step and stop it preparing the next batch.
        images = self.planes[0][0]
        idx = torch.as_tensor(np.concatenate(groups).astype(np.int64), device=images.device)
        offs = torch.arange(self.context, device=images.device) - self.context // 2
        for p, a, b in batches:
            imgs, labels, lo, hi = self.planes[p]
            z = idx[a:b]
            zz = (z[:, None] + offs).clamp_(lo, hi - 1)
            yield TensorImage(imgs[zz]), TensorMask(labels[z])


def _to_tensor(arr, where, size=None, mask=False, compute=None, chunk=64):
    """Copy a (possibly memory-mapped) uint8 (Z, H, W) array to a tensor on `where`, chunk by chunk (no full host copy).

    With `size` (height, width), every slice is resized on the way, on `compute` (the
    training device), exactly as `_ResizeBatch` would resize it in a batch (`mask`: nearest).
    A training stage below full resolution thus resizes each slice once, not once per batch
    it appears in, and keeps only the small volume.
    """
    full = tuple(arr.shape[1:])
    size = full if size is None else tuple(size)
    out = torch.empty((len(arr), *size), dtype=torch.uint8, device=where)
    for z in range(0, len(arr), chunk):
        x = torch.from_numpy(np.ascontiguousarray(arr[z:z + chunk]))
        if size != full:
            x = x.to(compute or where)
            x = _resize_masks(x, size) if mask else _resize_images(x[:, None], size)[:, 0]
        out[z:z + chunk].copy_(x)
    return out


def _volume_device(nbytes, device):
    """The GPU when `nbytes` (the uint8 training volume) take at most a third of its free memory, else the CPU
    (batches are then copied)."""
    if device.type != "cuda":
        return torch.device("cpu")
    return device if nbytes < torch.cuda.mem_get_info(device)[0] / 3 else torch.device("cpu")


def _resize_images(x, size):
    """uint8 (B, C, H, W) -> (B, C, *size): bilinear with antialiasing, rounded back to uint8."""
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False,
                         antialias=True).round_().clamp_(0, 255).to(torch.uint8)


def _resize_masks(x, size):
    """uint8 label slices (B, H, W) -> (B, *size), nearest (labels are never blended)."""
    return F.interpolate(x[:, None].float(), size=size, mode="nearest-exact")[:, 0].to(torch.uint8)


class _ResizeBatch(Transform):
    """Resize a batch on its device: bilinear (antialiased) for images, nearest for masks.

    `size` is the output (height, width), or a dict from input to output size (tri-planar
    batches come in several shapes). A side under 32 px is then padded (edge pixels
    repeated, masks alike) to 32, the encoder's downsampling factor.
    """
    order = 1

    def __init__(self, size=None):
        super().__init__()
        self.size = size if size is None or isinstance(size, dict) else tuple(size)

    def _out(self, shape):
        return self.size.get(tuple(shape), tuple(shape)) if isinstance(self.size, dict) else self.size

    @staticmethod
    def _pad(x):
        ph, pw = max(0, 32 - x.shape[-2]), max(0, 32 - x.shape[-1])
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x

    def encodes(self, x: TensorImage):
        size = self._out(x.shape[-2:])
        if size is not None and tuple(x.shape[-2:]) != size:
            x = _resize_images(x, size)
        return TensorImage(self._pad(x))

    def encodes(self, x: TensorMask):  # noqa: F811  (fastai type dispatch)
        size = self._out(x.shape[-2:])
        if size is not None and tuple(x.shape[-2:]) != size:
            x = _resize_masks(x, size)
        return TensorMask(self._pad(x[:, None])[:, 0])


class _ToFloat3(Transform):
    """uint8 (B,k,H,W) -> float [0,1]; one gray channel is repeated to the 3 the ImageNet encoder expects; masks -> long."""
    order = 10

    def encodes(self, x: TensorImage):
        x = x.float().div_(255)
        return TensorImage(x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x)

    def encodes(self, x: TensorMask): return TensorMask(x.long())  # noqa: F811


def _n_in(context):
    """Input channels of the model for `context` slices: one gray slice is fed as 3 identical channels."""
    if not isinstance(context, (int, np.integer)) or context < 1 or context % 2 == 0:
        raise ValueError(f"context_slices must be an odd number >= 1 (the slice and as many neighbours on each side), "
                         f"not {context!r}")
    return 3 if context == 1 else int(context)


def _normalize(context, cuda):
    """ImageNet normalisation; with k != 3 context slices every channel gets the mean of the 3 channels' statistics."""
    n = _n_in(context)
    if n == 3:
        return Normalize.from_stats(*imagenet_stats, cuda=cuda)
    m, sd = (float(np.mean(v)) for v in imagenet_stats)
    return Normalize.from_stats([m] * n, [sd] * n, cuda=cuda)


class _Augment(RandTransform):
    """Training augmentation for a whole batch in a few tensor ops on its device; masks follow their image.

    Per slice: horizontal and vertical flips, rotation up to `max_rotate` degrees and zoom
    up to `max_zoom` (one affine `grid_sample`, with probability `p_affine`), and
    brightness/contrast up to `max_lighting` (probability `p_lighting`). It replaces
    fastai's `aug_transforms`, which cost more GPU time than a 1/4-size training step.
    """
    split_idx, order = 0, 20

    def __init__(self, max_rotate=10.0, max_zoom=1.1, max_lighting=0.2, p_affine=0.75, p_lighting=0.75):
        super().__init__(p=1.0)
        self.max_rotate, self.max_zoom, self.max_lighting = max_rotate, max_zoom, max_lighting
        self.p_affine, self.p_lighting = p_affine, p_lighting

    def before_call(self, b, split_idx):
        super().before_call(b, split_idx)
        x = b[0] if isinstance(b, tuple) else b
        n, dev = x.shape[0], x.device
        u = lambda: torch.rand(n, device=dev)  # noqa: E731
        on = u() < self.p_affine
        ang = torch.where(on, (2 * u() - 1) * math.radians(self.max_rotate), 0.0)
        inv_zoom = torch.where(on, 1 / (1 + u() * (self.max_zoom - 1)), 1.0)
        fx, fy = torch.where(u() < 0.5, -1.0, 1.0), torch.where(u() < 0.5, -1.0, 1.0)
        c, s, z = torch.cos(ang) * inv_zoom, torch.sin(ang) * inv_zoom, torch.zeros(n, device=dev)
        theta = torch.stack([torch.stack([c * fx, -s * fy, z], 1), torch.stack([s * fx, c * fy, z], 1)], 1)
        self.grid = F.affine_grid(theta, (n, 1, *x.shape[-2:]), align_corners=False)
        lit = u() < self.p_lighting
        self.contrast = torch.where(lit, torch.exp((2 * u() - 1) * math.log1p(self.max_lighting)), 1.0).view(-1, 1, 1, 1)
        self.brightness = torch.where(lit, (2 * u() - 1) * self.max_lighting / 2, 0.0).view(-1, 1, 1, 1)

    def encodes(self, x: TensorImage):
        x = F.grid_sample(x, self.grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)
        return TensorImage(((x - 0.5) * self.contrast + 0.5 + self.brightness).clamp_(0, 1))

    def encodes(self, x: TensorMask):  # noqa: F811
        m = F.grid_sample(x[:, None].float(), self.grid, mode="nearest", padding_mode="reflection", align_corners=False)
        return TensorMask(m[:, 0].long())


class _ChannelsLast(Transform):
    """Last batch transform on CUDA: channels_last images, the memory layout the mixed-precision convolutions prefer."""
    order = 100

    def encodes(self, x: TensorImage): return x.contiguous(memory_format=torch.channels_last)


def _batch_tfms(size=None, augment=False, device=None, context=1):
    """Batch transforms run on the device: resize to `size`, to float, augment, ImageNet-normalise."""
    cuda = device is not None and device.type == "cuda"
    tfms = [_ResizeBatch(size), _ToFloat3()]
    if augment:
        tfms.append(_Augment())
    tfms.append(_normalize(context, cuda))
    return tfms + [_ChannelsLast()] if cuda else tfms


def _orthogonal_planes(images, labels, n_train):
    """XZ and YZ slices cut from the training block only (z < `n_train`): `(images, labels, lo, hi)` per plane."""
    out = []
    for perm in ((1, 0, 2), (2, 0, 1)):  # XZ: (y, z, x); YZ: (x, z, y)
        im, lb = images[:n_train].permute(*perm), labels[:n_train].permute(*perm)
        out.append((im, lb, 0, len(im)))
    return out


def make_dls(vol, size_frac=1.0, bs=8, valid_pct=0.2, quick=False, augment=True, device=None, seed=0,
             context_slices=1, triplanar=False):
    """fastai DataLoaders over `vol` at `size_frac` of full resolution; the last `valid_pct` of z validates.

    The uint8 volume is resized to the stage size once and held as one tensor (on the GPU
    when it fits); batches are gathered from it, then augmented and normalised batch-wise
    on `device`: no image is decoded or resized per batch. `context_slices` (odd k) feeds
    each slice with its k-1 neighbours as input channels (clamped at the ends of its block).
    `triplanar` also trains on XZ and YZ slices cut from the training block (never from the
    validation block): every epoch sees each axial training slice and as many random XZ and
    as many random YZ slices, resized by the same factor; validation stays on the axial
    validation block.
    """
    if vol.labels is None:
        raise DatasetError(f"{vol.source} has no train_masks_labels/: training needs masks.")
    _n_in(context_slices)
    device = device or get_device(verbose=False)
    train_idx, valid_idx = split_slices(len(vol.images), valid_pct)
    size = stage_size(vol.shape, size_frac, quick)
    bs = max(1, min(bs, len(train_idx)))
    # The volume is held once at the stage size (tri-planar: at full size, since its XZ/YZ slices are resized
    # along z too); batches are then gathered from it with no per-batch resize.
    held = vol.shape[1:] if triplanar else size
    where = _volume_device(2 * len(vol.images) * held[0] * held[1], device)
    images = _to_tensor(vol.images, where, held, compute=device)
    labels = _to_tensor(vol.labels, where, held, mask=True, compute=device)
    n_train = len(train_idx)
    planes = [(images, labels, 0, n_train)]
    train_size = size
    if triplanar:
        planes += _orthogonal_planes(images, labels, n_train)
        (H, W), s = vol.shape[1:], size[0] / vol.shape[1]
        train_size = {(H, W): size, (n_train, W): (max(1, round(n_train * s)), size[1]),
                      (n_train, H): (max(1, round(n_train * s)), size[0])}
    common = dict(bs=bs, num_workers=0, device=device, context=context_slices)
    train = _VolumeDL(planes=planes, idx=train_idx, shuffle=True, drop_last=n_train >= 2 * bs,
                      extra=n_train if triplanar else 0,
                      after_batch=Pipeline(_batch_tfms(train_size, augment, device, context_slices), split_idx=0), **common)
    valid = _VolumeDL(planes=[(images, labels, int(valid_idx[0]) if len(valid_idx) else 0, len(vol.images))],
                      idx=valid_idx, shuffle=False,
                      after_batch=Pipeline(_batch_tfms(size, False, device, context_slices), split_idx=1), **common)
    dls = DataLoaders(train, valid, device=device)
    dls.c, dls.codes, dls.size, dls.valid_idx = len(vol.codes), vol.codes, size, valid_idx
    dls.context_slices, dls.triplanar = int(context_slices), bool(triplanar)
    return dls


def _arch(arch):
    import torchvision.models as tvm
    fn = getattr(tvm, arch, None) if isinstance(arch, str) else arch
    if fn is None or not callable(fn):
        raise ValueError(f"Unknown encoder {arch!r}; use a torchvision ResNet name such as 'resnet34'.")
    return fn


def _imagenet_weights_ok(arch):
    """True when ImageNet weights for `arch` are cached or can be downloaded now (30 s limit)."""
    import torchvision.models as tvm
    w = model_meta.get(_arch(arch), {}).get("weights", "DEFAULT")
    try:
        enum = tvm.get_model_weights(_arch(arch))
        url = (enum.DEFAULT if w == "DEFAULT" else enum[w] if isinstance(w, str) else w).url
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu")
        finally:
            socket.setdefaulttimeout(old)
        return True
    except Exception as e:
        warnings.warn(f"ImageNet weights for {arch} could not be loaded ({type(e).__name__}: {e}); "
                      "training starts from RANDOM initialisation, which needs more epochs. "
                      "Connect to the internet (or put the weights in the torch hub cache) for transfer learning.")
        return False


def _amp_dtype(device):
    """bf16 on Ampere and newer GPUs, fp16 on older ones (the Colab T4), None (full precision) off CUDA."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def _mixed_precision(learn):
    """Mixed precision and a channels_last model on CUDA; full precision elsewhere."""
    dt = _amp_dtype(learn.dls.device)
    if dt is None:
        return learn
    learn.model.to(memory_format=torch.channels_last)
    return learn.to_bf16() if dt == torch.bfloat16 else learn.to_fp16()


def _adamw(params, **kwargs):
    """PyTorch's multi-tensor AdamW behind fastai's optimizer API (same hyper-parameters as fastai's Adam:
    decoupled weight decay, eps 1e-5). fastai's own Adam steps each parameter tensor in Python."""
    return OptimWrapper(params, torch.optim.AdamW, eps=1e-5, foreach=True, **kwargs)


class _DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's smoothed training loss, kept on the loss's device.

    fastai's version copies every batch's loss to the CPU, which makes the CPU wait for
    the GPU once per step: it cannot queue the next step while the current one runs,
    and that idle GPU time costs most at 1/4 size, where a step is shortest.
    """
    def accumulate(self, learn):
        self.count += 1
        loss = learn.loss.detach().mean().float()
        self.val = loss * (1 - self.beta) if self.count == 1 else torch.lerp(loss, self.val, self.beta)


class _DeviceAvgLoss(AvgLoss):
    """fastai's validation loss, summed on the loss's device (read once per epoch, not once per batch)."""
    def accumulate(self, learn):
        bs = find_bs(learn.yb)
        self.total = self.total + learn.loss.detach().mean().float() * bs
        self.count += bs


class _NoStepSync(Callback):
    """No GPU-to-CPU copy on the training step: the recorder's losses stay on the device during an epoch.

    The Recorder's loss list is copied to the CPU in one go at the end of each training
    pass and of each fit (lr_find stops mid-epoch), so lr_find's suggestion, its plot
    and `plot_loss` see plain CPU values, as with fastai's own recorder.
    """
    order = 51  # after the Recorder (50)

    def before_fit(self):
        rec = self.learn.recorder
        # vars(): a Callback's setattr warns that `learn.loss` exists, which is another thing (the batch's loss)
        vars(rec).update(smooth_loss=_DeviceSmoothLoss(beta=rec.smooth_loss.beta), loss=_DeviceAvgLoss())

    def _to_host(self):
        losses = self.learn.recorder.losses
        dev = [i for i, v in enumerate(losses) if isinstance(v, torch.Tensor) and v.device.type != "cpu"]
        if dev:
            host = torch.stack([losses[i] for i in dev]).cpu()
            for i, v in zip(dev, host):
                losses[i] = v

    def after_train(self): self._to_host()
    def after_fit(self): self._to_host()


class _Progress(ProgressCallback):
    """fastai's progress bars, with the running loss read from the GPU at most once a second, not every batch.

    (fastai's `learn.no_bar()` puts fastai's own bar back when it exits.)
    """
    name = "progress"  # what fastai's `no_bar` looks for
    _shown = 0.0

    def after_batch(self):
        self.pbar.update(self.iter + 1)
        now = time.monotonic()
        if hasattr(self, "smooth_loss") and now - self._shown >= 1.0:
            self._shown, self.pbar.comment = now, f"{float(self.smooth_loss):.4f}"


def build_learner(dls, arch="resnet34", pretrained=True, wd=1e-2, work_dir=".", metrics=True):
    """fastai U-Net learner on `dls` with encoder `arch`; ImageNet weights when they can be had, else random init.

    With `dls.context_slices` = k other than 1 or 3 the first convolution takes k channels
    (fastai adapts the pretrained filters to them); k = 3 uses the ImageNet RGB filters as they are.
    """
    if pretrained:
        pretrained = _imagenet_weights_ok(arch)
    context = getattr(dls, "context_slices", 1)
    learn = unet_learner(dls, _arch(arch), normalize=False, n_out=len(dls.codes), pretrained=pretrained,
                         n_in=_n_in(context), loss_func=CrossEntropyLossFlat(axis=1), wd=wd, path=Path(work_dir), opt_func=_adamw,
                         metrics=seg_metrics(dls.codes) if metrics else None)
    learn.remove_cb(ProgressCallback)
    learn.add_cbs([_Progress(), _NoStepSync()])
    learn.freeze()  # the published schedule starts frozen even without ImageNet weights
    learn.arch_name, learn.used_pretrained = arch if isinstance(arch, str) else arch.__name__, pretrained
    return _mixed_precision(learn)


# ----------------------------------------------------------------------------
# Metrics: true per-class IoU and Dice, and the published metric under its real name
# ----------------------------------------------------------------------------

def confusion_matrix(pred, target, n_classes, chunk=1 << 24):
    """Confusion matrix (rows = true class, columns = predicted) of integer arrays/tensors `pred` and `target`.

    Counted `chunk` voxels at a time, so a whole validation block (196 M voxels for a
    full-size volume) is never widened to int64 at once.
    """
    p, t = torch.as_tensor(pred).reshape(-1), torch.as_tensor(target).reshape(-1)
    cm = torch.zeros(n_classes, n_classes, dtype=torch.long)
    for i in range(0, p.numel(), chunk):
        cm += _confusion(p[i:i + chunk], t[i:i + chunk], n_classes).cpu()
    return cm.numpy()


def _confusion(pred, target, n_classes, scatter=None):
    """`confusion_matrix` as an int64 tensor on `pred`'s device.

    On CUDA (or with `scatter=True`) it is counted with a scatter-add, not `torch.bincount`,
    which reads its input's min and max back to the host: a wait for the GPU at every
    validation batch. The adds go to 256 interleaved copies of the n x n counters, summed at
    the end, so that fewer of the GPU's atomic adds hit the same counter.
    """
    p = torch.as_tensor(pred).reshape(-1).long()
    t = torch.as_tensor(target).reshape(-1).to(p.device).long()
    idx = t * n_classes + p
    if not (p.device.type == "cuda" if scatter is None else scatter):
        return torch.bincount(idx, minlength=n_classes ** 2).reshape(n_classes, n_classes)
    lanes = 256
    idx += (torch.arange(idx.numel(), device=idx.device) % lanes) * n_classes ** 2
    counts = torch.zeros(lanes * n_classes ** 2, dtype=torch.long, device=idx.device)
    counts.index_add_(0, idx, torch.ones_like(idx))
    return counts.view(lanes, n_classes, n_classes).sum(0)


def segmentation_scores(cm, codes, background=0):
    """Per-class IoU and Dice, their means, and pixel accuracy over non-`background` pixels from confusion `cm`.

    A class absent from both prediction and truth has IoU/Dice None and is left
    out of the means. `pixel_acc_nonbg` is what the published study called "IoU".
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp, true, pred = np.diag(cm), cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (true + pred - tp)
        dice = 2 * tp / (true + pred)
    fg = [i for i in range(len(codes)) if i != background]
    nan_none = lambda v: None if np.isnan(v) else float(v)  # noqa: E731
    mean = lambda v, idx: nan_none(np.nanmean(v[idx])) if not np.isnan(v[idx]).all() else None  # noqa: E731
    fg_true = true[fg].sum()
    return {
        "iou": {c: nan_none(v) for c, v in zip(codes, iou)},
        "dice": {c: nan_none(v) for c, v in zip(codes, dice)},
        "mean_iou": mean(iou, list(range(len(codes)))),
        "mean_iou_fossils": mean(iou, fg),
        "mean_dice": mean(dice, list(range(len(codes)))),
        "pixel_acc": float(tp.sum() / cm.sum()) if cm.sum() else None,
        "pixel_acc_nonbg": float(tp[fg].sum() / fg_true) if fg_true else None,
    }


class _SharedConfusion:
    """One confusion matrix per validation pass, shared by all metric columns (one argmax per batch).

    It is summed on the predictions' device and copied to the CPU once, when the epoch's
    figures are read, not once per batch.
    """
    def __init__(self, n): self.n, self._sum, self._last, self._host = n, None, None, None

    def reset(self): self._sum, self._last, self._host = None, None, None

    def update(self, pred, y):
        if pred is self._last: return
        self._last, self._host = pred, None
        cm = _confusion(pred.argmax(1), y, self.n)
        self._sum = cm if self._sum is None else self._sum + cm

    @property
    def cm(self):
        if self._host is None:
            self._host = (np.zeros((self.n, self.n), np.int64) if self._sum is None else self._sum.cpu().numpy())
        return self._host


def seg_metrics(codes, background=0):
    """fastai metrics reporting per-class IoU and Dice, mean IoU and `acc_nonbg` (the published metric) each epoch."""
    shared = _SharedConfusion(len(codes))

    class _M(Metric):
        def __init__(self, name, get): self._name, self.get = name, get
        def reset(self): shared.reset()
        def accumulate(self, learn): shared.update(learn.pred, learn.y)
        @property
        def value(self):
            v = self.get(segmentation_scores(shared.cm, codes, background))
            return float("nan") if v is None else v
        @property
        def name(self): return self._name

    safe = lambda c: re.sub(r"\W+", "_", c).strip("_")  # noqa: E731
    ms = [_M("mean_iou", lambda s: s["mean_iou"])]
    ms += [_M(f"iou_{safe(c)}", lambda s, c=c: s["iou"][c]) for c in codes]
    ms += [_M(f"dice_{safe(c)}", lambda s, c=c: s["dice"][c]) for c in codes]
    return ms + [_M("acc_nonbg", lambda s: s["pixel_acc_nonbg"])]


# ----------------------------------------------------------------------------
# Training: checkpoints, resume after a disconnect, the published schedule
# ----------------------------------------------------------------------------

def _models_dir(learn): return Path(learn.path) / learn.model_dir


def _atomic_save(learn, name, with_opt):
    """`learn.save` to a temporary name, then rename: a disconnect mid-write never leaves a corrupt checkpoint."""
    d = _models_dir(learn)
    learn.save(f"{name}.partial", with_opt=with_opt)
    os.replace(d / f"{name}.partial.pth", d / f"{name}.pth")


@contextmanager
def _replacing(path):
    """Yield a temporary path beside `path`; when the block succeeds, rename it over `path` (atomic on one disk)."""
    tmp = Path(str(path) + ".partial")
    yield tmp
    os.replace(tmp, path)


def _write_json(path, obj):
    with _replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def phase_done(work_dir, name):
    """True when phase checkpoint `name` (e.g. "256_frozen") is finished in `work_dir/models/`."""
    d = Path(work_dir) / "models"
    return (d / f"{name}.pth").exists() and (d / f"{name}.json").exists()


def load_stage(learn, name):
    """Load finished checkpoint `name` (e.g. the previous stage's "256_unfrozen") strictly into `learn`."""
    if name is None:
        return learn
    if not phase_done(learn.path, name):
        raise FileNotFoundError(f"{_models_dir(learn) / (name + '.pth')} not found: run the notebook that trains "
                                f"'{name.split('_')[0]}' first with the same work_dir, or set init_from=None "
                                "to start from ImageNet weights.")
    prev = json.loads((_models_dir(learn) / f"{name}.json").read_text())
    k, k_prev = getattr(learn.dls, "context_slices", 1), prev.get("context_slices", 1)
    if _n_in(k) != _n_in(k_prev):
        raise ValueError(f"stage {name} was trained with context_slices={k_prev}, this one has context_slices={k}: "
                         f"use the same value in every training notebook (or init_from=None to start afresh).")
    learn.load(name, with_opt=False, strict=True)
    print(f"Loaded weights of stage {name}")
    return learn


def find_lr(learn, name, quick=False, force=False):
    """Run `lr_find` before phase `name`, show and save its plot (`figures/lr_find_<name>.png`); return the suggestion.

    Skipped (returns None) when the phase is already trained and `force` is False.
    """
    import matplotlib.pyplot as plt
    if phase_done(learn.path, name) and not force:
        print(f"{name} is already trained: lr_find skipped")
        return None
    num_it = 12 if quick else 100
    learn.lr_find(num_it=num_it, show_plot=False, suggest_funcs=None)
    sug = _lr_valley(learn.recorder.lrs, learn.recorder.losses, num_it)
    learn.recorder.plot_lr_find()
    if sug is None:
        print(f"lr_find before {name}: the loss diverged after {len(learn.recorder.losses)} steps, no suggestion; "
              "keep the learning rate of the parameters cell, or lower it if training diverges too")
    plt.title(f"lr_find before {name} " + ("(no suggestion: the loss diverged at once)" if sug is None
                                            else f"(valley {sug:.1e})"))
    _save(plt.gcf(), Path(learn.path) / "figures" / f"lr_find_{name}.png")
    plt.show()
    return sug


def _lr_valley(lrs, losses, num_it):
    """fastai's "valley" suggestion from the recorded lr_find steps, or None when there is nothing to suggest from.

    fastai drops the first tenth and the last five steps, which leaves nothing when the
    loss diverged early (`stop_div`; likely with a short `num_it`) and then fails with an
    IndexError; here all the recorded steps before the first NaN are used instead.
    """
    lrs, losses = torch.as_tensor(list(map(float, lrs))), torch.as_tensor(list(map(float, losses)))
    nan = torch.nonzero(torch.isnan(losses)).flatten()
    if len(nan):
        lrs, losses = lrs[:nan[0]], losses[:nan[0]]
    trimmed = slice(num_it // 10, -5)
    if len(losses[trimmed]) >= 3:
        lrs, losses = lrs[trimmed], losses[trimmed]
    return float(valley(lrs, losses, num_it)[0]) if len(losses) else None


class _EpochCheckpoint(Callback):
    """After every epoch save weights + optimizer and the epoch reached, so a disconnect costs one epoch at most."""
    order = 65  # after the Recorder has logged the epoch

    def __init__(self, name, plan): self.ck_name, self.plan = name, plan

    def after_epoch(self):
        _atomic_save(self.learn, f"{self.ck_name}.progress", with_opt=True)
        _write_json(_models_dir(self.learn) / f"{self.ck_name}.progress.json", dict(self.plan, epoch=self.epoch))


def train_phase(learn, name, epochs, lr, pct_start=0.25, force=False):
    """`fit_one_cycle(epochs, lr, pct_start)` saved as checkpoint `name`, skipped when done, resumed after a disconnect.

    A checkpoint is written every epoch (`models/<name>.progress.*`); re-running the
    same call after an interruption continues from the last finished epoch.
    """
    d = _models_dir(learn)
    d.mkdir(parents=True, exist_ok=True)
    if phase_done(learn.path, name) and not force:
        learn.load(name, with_opt=False, strict=True)
        print(f"{name}: already trained, loaded models/{name}.pth (set force=True to retrain)")
        return json.loads((d / f"{name}.json").read_text())
    lr_repr = [lr.start, lr.stop] if isinstance(lr, slice) else lr
    plan = dict(epochs=epochs, lr=lr_repr, pct_start=pct_start, size=list(learn.dls.size), wd=learn.wd,
                context_slices=getattr(learn.dls, "context_slices", 1), triplanar=getattr(learn.dls, "triplanar", False))
    start = 0
    prog = d / f"{name}.progress.json"
    if prog.exists() and not force:
        saved = json.loads(prog.read_text())
        if {k: saved.get(k) for k in plan} == json.loads(json.dumps(plan)):
            learn.load(f"{name}.progress", with_opt=True, strict=True)
            start = saved["epoch"] + 1
            print(f"{name}: resuming after epoch {saved['epoch'] + 1} of {epochs}")
        else:
            print(f"{name}: settings changed since the interrupted run, starting this phase again")
    t = time.time()
    if start < epochs:
        hist = Path("history") / f"{name}.csv"  # CSVLogger writes relative to learn.path
        (Path(learn.path) / "history").mkdir(exist_ok=True)
        learn.fit_one_cycle(epochs, lr, pct_start=pct_start, start_epoch=start,
                            cbs=[_EpochCheckpoint(name, plan), CSVLogger(hist, append=start > 0)])
    _atomic_save(learn, name, with_opt=False)
    names = learn.recorder.metric_names[1:-1]  # drop "epoch" and "time"
    last = learn.recorder.values[-1] if learn.recorder.values else []
    info = dict(plan, name=name, arch=learn.arch_name, pretrained=learn.used_pretrained, codes=list(learn.dls.codes),
                seconds=round(time.time() - t, 1), final=dict(zip(names, map(float, last))))
    _write_json(d / f"{name}.json", info)
    for p in (prog, d / f"{name}.progress.pth"):
        p.unlink(missing_ok=True)
    f = info["final"]
    print(f"{name}: saved models/{name}.pth after {info['seconds']:.0f}s; validation mean IoU "
          f"{f.get('mean_iou', float('nan')):.3f}, acc_nonbg {f.get('acc_nonbg', float('nan')):.3f}")
    return info


# ----------------------------------------------------------------------------
# Prediction: every slice at full resolution, PNGs + a multi-page TIFF, metrics
# ----------------------------------------------------------------------------

def load_model(work_dir, name="full_unfrozen", device=None):
    """Rebuild the U-Net saved as `work_dir/models/<name>` and load its weights; return `(model, info)`.

    `info` (the phase's JSON) holds what prediction must repeat: `context_slices` and `triplanar`.
    """
    d = Path(work_dir) / "models"
    if not phase_done(work_dir, name):
        raise FileNotFoundError(f"{d / (name + '.pth')} not found: run the training notebooks (02-04) first "
                                "with the same work_dir, or set model_name to a checkpoint in models/.")
    info = json.loads((d / f"{name}.json").read_text())
    info.setdefault("context_slices", 1)  # checkpoints from before these options
    info.setdefault("triplanar", False)
    device = device or get_device(verbose=False)
    model = create_unet_model(_arch(info["arch"]), len(info["codes"]), tuple(info["size"]), pretrained=False,
                              n_in=_n_in(info["context_slices"]))
    _fastai_load_model(d / f"{name}.pth", model, None, with_opt=False, device=device, strict=True)
    return model.to(device).eval(), info


def _padded_forward(model, x, tfms, dtype):
    """Class logits of uint8 slices `x` (B,k,H,W): reflect-pad H and W to multiples of 32, predict, crop back."""
    h, w = x.shape[-2:]
    ph, pw = -h % 32, -w % 32
    xp = tfms(TensorImage(x))
    if ph or pw:
        xp = TensorImage(F.pad(torch.Tensor(xp), (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate"))
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        return model(xp)[..., :h, :w]


TTA_FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, left-right, up-down, both: the flips of the slice plane


def _forward_probs(model, x, tfms, dtype, tta=False):
    """Class probabilities (float, B x classes x H x W) of uint8 slices `x` (B,k,H,W).

    With `tta`, the mean over the four flips of the slice plane, each prediction flipped
    back before averaging (so the result does not depend on the slice's orientation).
    """
    out = None
    for f in TTA_FLIPS if tta else ((),):
        p = _padded_forward(model, x.flip(f) if f else x, tfms, dtype).float().softmax(1)
        p = p.flip(f) if f else p
        out = p if out is None else out.add_(p)
    return out.div_(4) if tta else out


def _prediction_setup(model, out_dir, device, context_slices):
    """What every prediction path needs: `(model, device, out_dir, batch transforms, autocast dtype)`; the output
    folder is created and, on CUDA, the model is made channels_last."""
    device = device or next(model.parameters()).device
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, device, out_dir, Pipeline(_batch_tfms(None, False, device, context_slices), split_idx=1), _amp_dtype(device)


def _slices_with_context(arr, idx, context=1, axis=0):
    """uint8 array (B, k, a, b): the slices `idx` of volume `arr` cut across `axis`, each with its k-1 neighbours
    along `axis` as channels (clamped at the volume's ends). Axis 1 gives XZ slices (rows z), axis 2 YZ slices."""
    idx = np.asarray(idx)
    ctx = np.clip(idx[:, None] + np.arange(context) - context // 2, 0, arr.shape[axis] - 1)
    x = np.take(arr, ctx.ravel(), axis=axis)
    x = np.moveaxis(x, axis, 0)
    return np.ascontiguousarray(x.reshape(len(idx), context, *x.shape[1:]))


# One page of a label TIFF: fast zlib, no metadata, so that uniform pages read back as one (Z, H, W) stack.
_LABEL_PAGE = {"compression": "zlib", "compressionargs": {"level": 1}, "metadata": None}


def predict_volume(model, vol, out_dir, bs=4, device=None, save_probs=True, context_slices=1, tta=False,
                   triplanar=False):
    """Predict every slice of `vol` at full resolution; write `<stem>.png` per slice, `labels.tif`, `probs.npy`.

    PNG values are class indices, same size as the input slice; `labels.tif` is the
    label volume as one multi-page TIFF; `probs.npy` (when `save_probs`) holds the
    class probabilities as uint8 (0-255), shape (Z, classes, H, W), memory-mapped and
    written block by block, never whole in RAM. Mixed precision on CUDA; files are
    written by background threads while the GPU works on the next batch. Returns the
    label volume (uint8, Z x H x W).

    `context_slices` must be the value the model was trained with (its `info`). `tta`
    averages the four flips of each slice (4x the model time). `triplanar` also predicts
    every XZ and YZ slice and averages the three probabilities per voxel (3x; see
    `_predict_triplanar`).
    """
    if triplanar:
        return _predict_triplanar(model, vol, out_dir, bs, device, save_probs, context_slices, tta)
    import collections
    import queue
    import threading
    import tifffile
    from PIL import Image
    from concurrent.futures import ThreadPoolExecutor
    model, device, out_dir, tfms, dtype = _prediction_setup(model, out_dir, device, context_slices)
    Z, H, W = vol.shape
    pred = np.empty((Z, H, W), np.uint8)
    probs = None
    pages = queue.Queue(maxsize=8)
    tiff_tmp = out_dir / "labels.tif.partial"

    tiff_error = []

    def write_tiff():  # one writer thread: pages arrive in z order; uniform plain pages read back as one stack
        try:
            with tifffile.TiffWriter(tiff_tmp) as tif:
                for _ in range(Z):
                    tif.write(pages.get(), **_LABEL_PAGE)
        except Exception as e:
            tiff_error.append(e)

    def put_page(sl):
        while True:
            try:
                return pages.put(sl, timeout=1)
            except queue.Full:
                if not tiff_thread.is_alive():
                    raise OSError(f"writing {tiff_tmp} failed: {tiff_error}") from None

    tiff_thread = threading.Thread(target=write_tiff, daemon=True)
    tiff_thread.start()

    def store(z0, p, pr):  # host-side work for one batch, on a worker thread while the GPU runs the next
        if pr is not None:
            probs[z0:z0 + len(p)] = pr
        for k, sl in enumerate(p):
            Image.fromarray(sl).save(out_dir / f"{vol.stems[z0 + k]}.png", compress_level=1)

    # Double buffering: batch i+1 is launched on the GPU before batch i's results are collected (through
    # pinned buffers and an event), so the GPU never waits for the host-side work.
    cuda = device.type == "cuda"
    bufs = {}

    def launch(z0):
        x = torch.from_numpy(_slices_with_context(vol.images, np.arange(z0, min(Z, z0 + bs)), context_slices))
        p = _forward_probs(model, x.to(device, non_blocking=True), tfms, dtype, tta)
        out = [p.argmax(1).to(torch.uint8)]
        if save_probs:
            out.append((p * 255).round_().to(torch.uint8))
        slot = (z0 // bs) % 2
        host = []
        for j, t in enumerate(out):
            if (slot, j) not in bufs or bufs[slot, j].shape[1:] != t.shape[1:]:
                bufs[slot, j] = torch.empty((bs, *t.shape[1:]), dtype=torch.uint8, pin_memory=cuda)
            host.append(bufs[slot, j][:len(t)].copy_(t, non_blocking=cuda))
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        return z0, host, event

    def collect(item):
        nonlocal probs
        z0, host, event = item
        if event is not None:
            event.synchronize()
        p = host[0].numpy().copy()
        pr = host[1].numpy().copy() if save_probs else None
        if pr is not None and probs is None:
            probs = np.lib.format.open_memmap(out_dir / "probs.npy.partial", "w+", np.uint8, (Z, pr.shape[1], H, W))
        pred[z0:z0 + len(p)] = p
        for sl in p:
            put_page(sl)
        pending.append(pool.submit(store, z0, p, pr))
        while len(pending) > 6:  # bounded backlog: at most a few batches held in RAM
            pending.popleft().result()

    pending = collections.deque()
    with ThreadPoolExecutor(3) as pool, torch.inference_mode():
        prev = None
        for z0 in range(0, Z, bs):
            cur = launch(z0)
            if prev is not None:
                collect(prev)
            prev = cur
        collect(prev)
        while pending:
            pending.popleft().result()  # re-raises a failed write
    tiff_thread.join()
    if tiff_error:
        raise OSError(f"writing {tiff_tmp} failed: {tiff_error[0]}")
    os.replace(tiff_tmp, out_dir / "labels.tif")
    if probs is not None:
        probs.flush()
        del probs
        os.replace(out_dir / "probs.npy.partial", out_dir / "probs.npy")
    return pred


def _predict_triplanar(model, vol, out_dir, bs, device, save_probs, context_slices, tta):
    """`predict_volume` with tri-planar averaging: every axial, XZ and YZ slice is predicted and the three class
    probabilities of each voxel are averaged in `probs.npy.partial` (uint8, memory-mapped, a running mean), one block
    of slices at a time (256 MB of probabilities, about 1 GB of RAM at the peak; big blocks, because a block of YZ
    slices touches every page of the file); then the labels are its arg-max, written as in `predict_volume`."""
    import tifffile
    from PIL import Image
    from concurrent.futures import ThreadPoolExecutor
    model, device, out_dir, tfms, dtype = _prediction_setup(model, out_dir, device, context_slices)
    Z, H, W = vol.shape
    K = None
    probs = None
    part = out_dir / "probs.npy.partial"
    with torch.inference_mode():
        for j, axis in enumerate((0, 1, 2)):  # pass j averages its prediction into the mean of the j before it
            n, plane = vol.shape[axis], [d for a, d in enumerate(vol.shape) if a != axis]
            blk = max(bs, 2 ** 28 // max(1, (K or 4) * int(np.prod(plane))))  # 256 MB of uint8 probabilities
            for b0 in range(0, n, blk):
                chunk = []
                for i0 in range(b0, min(n, b0 + blk), bs):
                    idx = np.arange(i0, min(n, i0 + bs, b0 + blk))
                    x = torch.from_numpy(_slices_with_context(vol.images, idx, context_slices, axis)).to(device)
                    chunk.append((_forward_probs(model, x, tfms, dtype, tta) * 255).round_().to(torch.uint8).cpu().numpy())
                p = np.concatenate(chunk)  # (slices of the block, K, a, b), uint8
                if probs is None:
                    K = p.shape[1]
                    probs = np.lib.format.open_memmap(part, "w+", np.uint8, (Z, K, H, W))
                # to (Z, K, H, W) order: axis 1 blocks are (y, K, z, x), axis 2 blocks (x, K, z, y)
                p = p if axis == 0 else p.transpose(2, 1, 0, 3) if axis == 1 else p.transpose(2, 1, 3, 0)
                where = (np.s_[b0:b0 + blk], np.s_[:, :, b0:b0 + blk], np.s_[:, :, :, b0:b0 + blk])[axis]
                if j:  # running mean in integers (rounded): (old * j + new) / (j + 1)
                    p = ((probs[where].astype(np.uint16) * j + p + (j + 1) // 2) // (j + 1)).astype(np.uint8)
                probs[where] = p
    pred = np.empty((Z, H, W), np.uint8)
    with _replacing(out_dir / "labels.tif") as tmp, tifffile.TiffWriter(tmp) as tif, ThreadPoolExecutor(2) as pool:
        for z0 in range(0, Z, bs):
            pred[z0:z0 + bs] = np.asarray(probs[z0:z0 + bs]).argmax(1)
            for z in range(z0, min(Z, z0 + bs)):
                tif.write(pred[z], **_LABEL_PAGE)
            list(pool.map(lambda z: Image.fromarray(pred[z]).save(out_dir / f"{vol.stems[z]}.png", compress_level=1),
                          range(z0, min(Z, z0 + bs))))
    probs.flush()
    del probs
    if save_probs:
        os.replace(part, out_dir / "probs.npy")
    else:
        part.unlink()
    return pred


def save_metrics(work_dir, vol, pred, valid_pct=0.2, extra=None):
    """Score `pred` against `vol.labels` on the validation block; write and return `work_dir/metrics.json`."""
    _, valid_idx = split_slices(len(vol.images), valid_pct)
    n = len(vol.codes)
    cm = sum(confusion_matrix(pred[z], vol.labels[z], n) for z in valid_idx)
    out = {"validation_slices": [int(valid_idx[0]), int(valid_idx[-1])] if len(valid_idx) else [],
           "n_validation_slices": int(len(valid_idx)), **segmentation_scores(cm, vol.codes),
           "confusion_matrix": np.asarray(cm).tolist(), "codes": vol.codes, **(extra or {})}
    _write_json(Path(work_dir) / "metrics.json", out)
    return out


# ----------------------------------------------------------------------------
# Extraction: 3D specimens, measurements, exports, object-level evaluation
# ----------------------------------------------------------------------------

VOXEL_SIZE_FILE = "voxel_size.txt"
MIN_VOXELS = 250  # default smallest specimen, in voxels: see README "Extraction" for the measurement behind it


def read_voxel_size(data_dir=None, voxel_size_um=None):
    """Voxel size `(z, y, x)` in µm and where it came from: `voxel_size_um`, else `data_dir/voxel_size.txt`, else 1.0.

    `voxel_size.txt` holds one number (isotropic voxels, e.g. `2.5`) or three, z y x
    (e.g. `5 2.5 2.5`), in µm; text after `#` is a comment.
    """
    def check(values, where):
        try:
            vs = np.asarray(values, float).ravel()
        except (TypeError, ValueError):
            vs = np.zeros(0)
        if vs.size not in (1, 3) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
            raise DatasetError(f"{where}: expected one positive voxel size in µm (e.g. 2.5) or three, z y x "
                               f"(e.g. 5 2.5 2.5); got {values!r}. Fix it or remove it (sizes are then in voxels).")
        return tuple(float(v) for v in np.broadcast_to(vs, (3,)))
    if voxel_size_um is not None:
        return check(voxel_size_um, "parameter voxel_size_um"), "parameter voxel_size_um"
    path = Path(data_dir) / VOXEL_SIZE_FILE if data_dir is not None else None
    if path is not None and path.is_file():
        text = " ".join(line.split("#")[0] for line in path.read_text(errors="replace").splitlines())
        try:
            values = [float(t) for t in text.replace(",", " ").split()]
        except ValueError:
            values = text.strip()
        return check(values, str(path)), str(path)
    return (1.0, 1.0, 1.0), "the default: no voxel_size_um and no voxel_size.txt, so sizes are in voxels"


def _mesh(mask, spacing, max_voxels=2 ** 24):
    """Watertight triangle mesh of boolean `mask` in µm: `(verts (n, 3) z y x, faces (m, 3))`, outward normals.

    Marching cubes on the mask smoothed by a 0.5-voxel Gaussian, each mask voxel kept inside
    (so one-voxel-thin walls survive). A sphere's area comes out within ~4% (a plain binary
    mesh overestimates it by ~9%). Masks over `max_voxels` are meshed on a coarser grid
    (block occupancy), so a huge false specimen cannot exhaust memory.
    """
    from scipy import ndimage
    from skimage.measure import marching_cubes
    spacing = np.asarray(spacing, float)
    f = max(1, math.ceil((mask.size / max_voxels) ** (1 / 3)))
    if f == 1:
        pad = 2
        m = np.pad(mask, pad).astype(np.float32)
        field = np.maximum(ndimage.gaussian_filter(m, 0.5), 0.55 * m)
    else:
        pad = 1
        shape = [math.ceil(s / f) * f for s in mask.shape]
        m = np.zeros(shape, np.float32)
        m[tuple(slice(0, s) for s in mask.shape)] = mask
        blocks = m.reshape(shape[0] // f, f, shape[1] // f, f, shape[2] // f, f)
        field = np.pad(np.maximum(blocks.mean((1, 3, 5)), 0.55 * blocks.max((1, 3, 5))), pad)
    verts, faces, _, _ = marching_cubes(field, 0.5, allow_degenerate=False)
    verts = ((verts - pad) * f + (f - 1) / 2) * spacing  # back to the voxel grid of `mask`, then µm
    tri = verts[faces]
    if np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() < 0:
        faces = faces[:, ::-1]  # orient the normals outwards
    return verts.astype(np.float32), np.ascontiguousarray(faces)


def _write_stl(path, verts, faces):
    """Binary STL of a mesh whose `verts` are z, y, x in µm (written as x, y, z); atomic."""
    xyz = verts[:, ::-1].astype(np.float32)
    tri = xyz[faces[:, ::-1]]  # swapping z and x mirrors the mesh: reverse the winding to keep normals outward
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    rec = np.zeros(len(tri), dtype=[("normal", "<f4", (3,)), ("verts", "<f4", (3, 3)), ("attr", "<u2")])
    rec["normal"], rec["verts"] = n, tri
    with _replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(b"microfossil-ct specimen mesh, units: micrometres".ljust(80, b" "))
        fh.write(np.uint32(len(rec)).tobytes())
        fh.write(rec.tobytes())


def _write_stack(path, arr, spacing):
    """Multi-page TIFF with the voxel size in ImageJ/Fiji metadata (µm); atomic."""
    import tifffile
    with _replacing(path) as tmp:
        tifffile.imwrite(tmp, arr, imagej=True, resolution=(1 / spacing[2], 1 / spacing[1]),
                         metadata={"spacing": spacing[0], "unit": "um", "axes": "ZYX"}, compression="zlib")


def _fit(img, size):
    """Resize 2D uint8/RGB `img` so that its longest side is `size` (nearest neighbour when enlarging)."""
    from PIL import Image
    im = Image.fromarray(img)
    s = size / max(im.size)
    return im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))),
                     Image.NEAREST if s >= 1 else Image.BILINEAR)


def _outlined(ct, mask):
    """RGB of CT slice `ct` with the outline of `mask` drawn in red."""
    from scipy import ndimage
    rgb = np.repeat(ct[..., None], 3, -1)
    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    rgb[edge] = (255, 40, 40)
    return rgb


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError):
        return ImageFont.load_default()


def _centroid(mask):
    """Centroid (z, y, x) of boolean `mask`, from its projections (no coordinate list of every voxel)."""
    n = max(1, int(mask.sum()))
    return np.array([(mask.sum(tuple(j for j in range(3) if j != i)) * np.arange(mask.shape[i])).sum() / n
                     for i in range(3)])


def _preview(ct, mask, title, panel=180):
    """Preview image: three orthogonal mid-slices (mask outlined) and the specimen's maximum-intensity projection."""
    from PIL import Image, ImageDraw
    zc, yc, xc = (int(round(c)) for c in _centroid(mask)) if mask.any() else (s // 2 for s in mask.shape)
    views = [("z (YX)", _outlined(ct[zc], mask[zc])), ("y (ZX)", _outlined(ct[:, yc], mask[:, yc])),
             ("x (ZY)", _outlined(ct[:, :, xc], mask[:, :, xc])),
             ("MIP of specimen", np.where(mask, ct, 0).max(0))]
    out = Image.new("RGB", (4 * (panel + 6) + 6, panel + 44), (255, 255, 255))
    draw, font = ImageDraw.Draw(out), _font(13)
    draw.text((6, 3), title, fill=(0, 0, 0), font=font)
    for k, (name, img) in enumerate(views):
        im = _fit(img, panel)
        x0 = 6 + k * (panel + 6)
        out.paste(im, (x0 + (panel - im.size[0]) // 2, 22 + (panel - im.size[1]) // 2))
        draw.text((x0, panel + 26), name, fill=(80, 80, 80), font=font)
    return out, views[-1][1]


def _write_gallery(exp_dir, tiles, per_page=100, tile=128):
    """`gallery.png` (then `gallery_02.png`, ...): specimen thumbnails `(id, class, image)` in the given order."""
    from PIL import Image, ImageDraw
    for old in exp_dir.glob("gallery*.png"):
        old.unlink()
    cols, pages = min(10, max(1, len(tiles))), []
    for p0 in range(0, len(tiles), per_page):
        page = tiles[p0:p0 + per_page]
        rows = math.ceil(len(page) / cols)
        out = Image.new("RGB", (cols * (tile + 4) + 4, rows * (tile + 18) + 4), (255, 255, 255))
        draw, font = ImageDraw.Draw(out), _font(11)
        for k, (sid, cls, img) in enumerate(page):
            x0, y0 = 4 + (k % cols) * (tile + 4), 4 + (k // cols) * (tile + 18)
            im = _fit(img, tile)
            out.paste(im, (x0 + (tile - im.size[0]) // 2, y0 + (tile - im.size[1]) // 2))
            draw.text((x0, y0 + tile + 2), f"#{sid}  {cls}"[:24], fill=(0, 0, 0), font=font)
        path = exp_dir / ("gallery.png" if not pages else f"gallery_{len(pages) + 1:02d}.png")
        out.save(path)
        pages.append(path)
    return pages


def _open_probs(pred_dir, shape):
    """`predictions/probs.npy` memory-mapped when it exists and matches `shape` (Z, classes, H, W), else None."""
    path = Path(pred_dir) / "probs.npy"
    if not path.exists():
        print(f"No {path}: each specimen's class is its majority predicted class and confidence is empty "
              "(run 05 with save_probs=True for the mean class probability).")
        return None
    probs = np.load(path, mmap_mode="r")
    if probs.shape != tuple(shape):
        print(f"{path} has shape {probs.shape}, expected {tuple(shape)} (left from another run?): ignored; "
              "re-run the prediction cell to rewrite it.")
        return None
    return probs


def _masked_class_sums(probs, bb, mask):
    """Sum over the voxels of `mask` (the crop `bb` of the volume) of each class's probability (0-255 scale)."""
    z0, y0, x0 = (s.start for s in bb)
    dz, dy, dx = mask.shape
    out = np.zeros(probs.shape[1], np.float64)
    step = max(1, 2 ** 26 // (probs.shape[1] * dy * dx))  # at most ~64 MB of probabilities at once
    for a in range(0, dz, step):
        m = mask[a:a + step]
        if m.any():
            p = np.asarray(probs[z0 + a:z0 + a + len(m), :, y0:y0 + dy, x0:x0 + dx])
            out += p.transpose(1, 0, 2, 3)[:, m].sum(1, dtype=np.float64)
    return out


def _split_touching(mask, spacing, min_distance_um):
    """Watershed on the distance transform of `mask`: int labels 1..n of the parts (n = 1 when nothing to split)."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed
    dist = ndimage.distance_transform_edt(mask, sampling=spacing)
    md = max(1, int(round(min_distance_um / min(spacing))))
    peaks = peak_local_max(dist, min_distance=md, labels=mask.astype(np.uint8), exclude_border=False)
    if len(peaks) < 2:
        return mask.astype(np.int32)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=mask)


def _specimen_label_volumes(cc, lut_cls, lut_id, id_dtype, out_dir):
    """Write `labels_clean.tif` (each kept specimen painted with its class) and `specimens.tif` (its id), page by page."""
    import tifffile
    with _replacing(out_dir / "labels_clean.tif") as tmp_c, _replacing(out_dir / "specimens.tif") as tmp_s, \
            tifffile.TiffWriter(tmp_c) as tc, tifffile.TiffWriter(tmp_s) as ts:
        for page in cc:
            tc.write(lut_cls[page], **_LABEL_PAGE)
            ts.write(lut_id[page].astype(id_dtype), **_LABEL_PAGE)


def _find_specimens(pred, connectivity, min_vox, split_touching, spacing, split_min_distance_um):
    """Components of `pred > 0` of at least `min_vox` voxels, optionally split by watershed.

    Returns `(cc, n, n_kept, parts)`: the component labels (split parts relabelled in place),
    the number of components, how many were big enough, and one `(label in cc, bounding box,
    voxel count)` per specimen.
    """
    import cc3d
    cc, n = cc3d.connected_components(pred, connectivity=connectivity, binary_image=True, return_N=True)
    stats = cc3d.statistics(cc) if n else {"voxel_counts": np.zeros(1, np.int64), "bounding_boxes": [None]}
    counts, boxes = stats["voxel_counts"], stats["bounding_boxes"]
    kept = [i for i in range(1, n + 1) if counts[i] >= min_vox]
    parts = []  # (label value in cc, bounding box, voxel count)
    if split_touching and kept:
        if cc.dtype == np.uint16:
            cc = cc.astype(np.uint32)  # room for the labels of new parts
        md = split_min_distance_um if split_min_distance_um is not None else 10 * min(spacing)
        nxt = n + 1
        for i in kept:
            bb = boxes[i]
            sub = _split_touching(cc[bb] == i, spacing, md) if counts[i] >= 2 * min_vox else None
            if sub is None or sub.max() < 2:
                parts.append((i, bb, int(counts[i])))
                continue
            view = cc[bb]
            for j in range(1, int(sub.max()) + 1):
                m = sub == j
                if not m.any():
                    continue
                lbl = i if j == 1 else nxt
                if j > 1:
                    view[m] = lbl
                    nxt += 1
                nz = [np.flatnonzero(m.any(tuple(j for j in range(3) if j != ax))) for ax in range(3)]
                lo, hi = [a[0] for a in nz], [a[-1] + 1 for a in nz]
                parts.append((lbl, tuple(slice(s.start + a, s.start + b) for s, a, b in zip(bb, lo, hi)), int(m.sum())))
        parts = [p for p in parts if p[2] >= min_vox]
    else:
        parts = [(i, boxes[i], int(counts[i])) for i in kept]
    return cc, n, len(kept), parts


def _export_specimen(d, images, cc, lbl, bb, margin, spacing, verts, faces, title):
    """Write folder `d`: CT crop and mask TIFFs (`bb` plus `margin`), the STL mesh, the preview; return the MIP."""
    d.mkdir()
    crop = tuple(slice(max(0, s.start - margin), min(size, s.stop + margin)) for s, size in zip(bb, cc.shape))
    ct = np.asarray(images[crop])
    mask = cc[crop] == lbl
    _write_stack(d / f"{d.name}_ct.tif", ct, spacing)
    _write_stack(d / f"{d.name}_mask.tif", mask.astype(np.uint8) * 255, spacing)
    _write_stl(d / f"{d.name}.stl", verts, faces)
    img, mip = _preview(ct, mask, title)
    img.save(d / f"{d.name}_preview.png")
    return mip


CATALOGUE_COLUMNS = ["id", "class", "voxels", "volume_um3", "surface_um2", "esd_um", "sphericity",
                     "z0", "y0", "x0", "z1", "y1", "x1", "centroid_z", "centroid_y", "centroid_x",
                     "mean_intensity", "confidence", "touches_border"]


def extract_fossils(vol, work_dir, pred=None, voxel_size_um=None, min_voxels=MIN_VOXELS, min_volume_um3=0.0,
                    connectivity=26, split_touching=False, split_min_distance_um=None, margin=8, max_exports=500):
    """Find every specimen in the predicted labels, measure it and export it; return the catalogue (a DataFrame).

    A specimen is a 3D connected component of the fossil mask (every class but 0
    together; `connectivity` 26, 18 or 6). Components below `min_voxels` voxels or
    `min_volume_um3` µm³ are dropped; `split_touching` splits touching specimens by a
    watershed on the distance transform, seeds at least `split_min_distance_um` apart.
    Each specimen gets the fossil class with the highest mean predicted probability over
    its voxels (`predictions/probs.npy`; without it, its majority class).

    Writes, in `work_dir`:
    - `predictions/labels_clean.tif` (kept specimens painted with their class) and
      `predictions/specimens.tif` (specimen ids), beside the raw `labels.tif`;
    - `exports/fossils.csv`, one row per specimen (see README), and `exports/extraction.json`;
    - `exports/features.csv`: each specimen's 3D descriptors (`SPECIMEN_FEATURES`) for the
      specimen classifier and, when the volume has masks, the ground-truth voxel count of
      each class under it (`truth_<class>`); with masks also `exports/truth_features.csv`,
      the same for every true specimen (more examples for the classifier);
    - for the `max_exports` largest specimens, `exports/fossil_<id>/` with the CT crop
      (`margin` voxels around) and its mask as multi-page TIFFs (voxel size in the ImageJ
      metadata), an STL mesh in µm and a preview PNG; and `exports/gallery*.png`.
    `pred` is the label volume from `predict_volume` (default: read `predictions/labels.tif`).
    Works inside each specimen's bounding box; `exports/review.csv` is never touched.
    """
    import pandas as pd
    import tifffile
    from skimage.measure import mesh_surface_area
    t0 = time.time()
    work_dir = Path(work_dir)
    pred_dir, exp_dir = work_dir / "predictions", work_dir / "exports"
    if pred is None:
        if not (pred_dir / "labels.tif").exists():
            raise FileNotFoundError(f"{pred_dir / 'labels.tif'} not found: run the prediction cell of 05 first "
                                    "(same work_dir).")
        pred = tifffile.imread(pred_dir / "labels.tif")
    if pred.shape != vol.shape:
        raise ValueError(f"predicted labels in {pred_dir} are {pred.shape} but the volume in {vol.source} is "
                         f"{vol.shape}: they come from another dataset; re-run the prediction cell of 05.")
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity!r}")
    codes, K = list(vol.codes), len(vol.codes)
    spacing, vs_source = read_voxel_size(vol.source, voxel_size_um)
    voxel_um3 = float(np.prod(spacing))
    min_vox = max(1, int(min_voxels), math.ceil(float(min_volume_um3 or 0) / voxel_um3))
    exp_dir.mkdir(parents=True, exist_ok=True)
    pred_dir.mkdir(parents=True, exist_ok=True)
    probs = _open_probs(pred_dir, (vol.shape[0], K, *vol.shape[1:]))

    cc, n, n_kept, parts = _find_specimens(pred, connectivity, min_vox, split_touching, spacing,
                                           split_min_distance_um)
    parts.sort(key=lambda p: (p[1][0].start, p[1][1].start, p[1][2].start, p[0]))
    N = len(parts)
    width = max(4, len(str(N)))
    exported_ids = {k + 1 for k in sorted(range(N), key=lambda k: -parts[k][2])[:max(0, int(max_exports))]}

    for old in exp_dir.glob("fossil_*"):  # a previous extraction's folders (review.csv is kept)
        if old.is_dir() and re.fullmatch(r"fossil_\d+", old.name):
            shutil.rmtree(old)
    Z, H, W = vol.shape
    lut_cls = np.zeros(int(cc.max()) + 1 if cc.size else 1, np.uint8)
    lut_id = np.zeros(len(lut_cls), np.uint32)
    rows, tiles, feats = [], [], []
    for sid, (lbl, bb, nv) in enumerate(parts, 1):
        local = cc[bb] == lbl
        feats.append({"id": sid, **_descriptors(np.asarray(vol.images[bb]), local)})
        if vol.labels is not None:  # the ground truth under the specimen: what the classifier learns from
            truth = np.bincount(np.asarray(vol.labels[bb])[local], minlength=K)[:K]
            feats[-1].update({f"truth_{c}": int(truth[k]) for k, c in enumerate(codes)})
        off = np.array([s.start for s in bb])
        centroid = _centroid(local) + off
        frac = np.bincount(pred[bb][local], minlength=K)[:K] / nv
        if probs is not None:
            mean_p = _masked_class_sums(probs, bb, local) / nv / 255
            cls = 1 + int(np.argmax(mean_p[1:]))
            conf = float(mean_p[cls])
        else:
            cls, conf = 1 + int(np.argmax(frac[1:])), float("nan")
        verts, faces = _mesh(local, spacing)
        verts += off * np.asarray(spacing, np.float32)  # volume coordinates: all the STLs load in place together
        area = float(mesh_surface_area(verts.astype(np.float64), faces))
        volume = nv * voxel_um3
        lut_cls[lbl], lut_id[lbl] = cls, sid
        rows.append({
            "id": sid, "class": codes[cls], "voxels": nv, "volume_um3": volume, "surface_um2": area,
            "esd_um": (6 * volume / math.pi) ** (1 / 3),
            "sphericity": math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area if area > 0 else float("nan"),
            "z0": bb[0].start, "y0": bb[1].start, "x0": bb[2].start, "z1": bb[0].stop, "y1": bb[1].stop, "x1": bb[2].stop,
            "centroid_z": centroid[0], "centroid_y": centroid[1], "centroid_x": centroid[2],
            "mean_intensity": float(vol.images[bb][local].mean()), "confidence": conf,
            "touches_border": bool(bb[0].start == 0 or bb[1].start == 0 or bb[2].start == 0
                                   or bb[0].stop == Z or bb[1].stop == H or bb[2].stop == W),
            **{f"frac_{c}": float(frac[k]) for k, c in enumerate(codes) if k},
            "exported": sid in exported_ids,
        })
        if sid in exported_ids:
            title = (f"#{sid}  {codes[cls]}  volume {volume:.4g} um^3  ESD {rows[-1]['esd_um']:.3g} um  "
                     f"sphericity {rows[-1]['sphericity']:.2f}  confidence {conf:.2f}")
            mip = _export_specimen(exp_dir / f"fossil_{sid:0{width}d}", vol.images, cc, lbl, bb, margin, spacing,
                                   verts, faces, title)
            tiles.append((nv, sid, codes[cls], mip))
    cat = pd.DataFrame(rows, columns=CATALOGUE_COLUMNS + [f"frac_{c}" for c in codes[1:]] + ["exported"])
    with _replacing(exp_dir / "fossils.csv") as tmp:
        cat.to_csv(tmp, index=False, float_format="%.6g")
    with _replacing(exp_dir / "features.csv") as tmp:
        pd.DataFrame(feats, columns=["id", *SPECIMEN_FEATURES] + ([f"truth_{c}" for c in codes] if vol.labels is not None
                                                               else [])).to_csv(tmp, index=False, float_format="%.6g")
    (exp_dir / "classifier.json").unlink(missing_ok=True)  # it described the previous extraction's specimens
    _specimen_label_volumes(cc, lut_cls, lut_id, np.uint16 if N < 65535 else np.uint32, pred_dir)
    del cc
    if vol.labels is not None:
        _truth_features(vol, pred, connectivity, min_vox, exp_dir / "truth_features.csv")
    tiles.sort(key=lambda t: (-t[0], t[1]))
    pages = _write_gallery(exp_dir, [t[1:] for t in tiles])
    info = {"n_components": int(n), "n_dropped_small": int(n - n_kept), "n_split_parts": N - n_kept if split_touching else 0,
            "n_specimens": N, "n_exported": len(exported_ids), "min_voxels": min_vox,
            "min_voxels_param": int(min_voxels), "min_volume_um3": float(min_volume_um3 or 0),
            "voxel_size_um": spacing, "voxel_size_source": vs_source, "connectivity": connectivity,
            "split_touching": bool(split_touching), "margin": margin, "max_exports": int(max_exports),
            "class_from": "mean probability" if probs is not None else "majority predicted class",
            "gallery_pages": [p.name for p in pages], "seconds": round(time.time() - t0, 1),
            "codes": codes, "shape": list(vol.shape),
            "per_class": {c: int((cat["class"] == c).sum()) for c in codes[1:]}}
    _write_json(exp_dir / "extraction.json", info)
    if N == 0:
        print(f"No specimen found: {'nothing was predicted as a fossil' if n == 0 else f'all {n} components are below {min_vox} voxels'}. "
              f"An empty catalogue was written to {exp_dir / 'fossils.csv'}.")
    else:
        print(f"{N} specimens ({', '.join(f'{v} {k}' for k, v in info['per_class'].items())}) from {n} components "
              f"({n - n_kept} below {min_vox} voxels dropped) in {info['seconds']:.0f}s; voxel size {spacing} µm, "
              f"from {vs_source}.")
        if len(exported_ids) < N:
            print(f"Exports and previews capped: the {len(exported_ids)} largest of {N} specimens have a folder in "
                  f"{exp_dir}; the catalogue lists all {N}. Raise max_exports to export more.")
    return cat


def _components(mask, connectivity, min_vox):
    """3D components of `mask` with at least `min_vox` voxels: `(labels, counts)`, dropped ones set to 0."""
    import cc3d
    cc, n = cc3d.connected_components(mask, connectivity=connectivity, binary_image=True, return_N=True)
    counts = np.asarray(cc3d.statistics(cc)["voxel_counts"], np.int64) if n else np.zeros(1, np.int64)
    small = counts < min_vox
    small[0] = False
    if small.any():
        cc[small[cc]] = 0
    return cc, counts


def _component_class(cc, labels, n_comp, K):
    """Majority class in `labels` of each component of `cc` (index = component)."""
    m = cc > 0
    table = np.bincount(cc[m].astype(np.int64) * K + labels[m], minlength=(n_comp + 1) * K).reshape(-1, K)
    table[:, 0] = 0  # a fossil specimen's class is its majority fossil class
    return table.argmax(1)


def _match_specimens(truth, pred, codes, conn, min_vox, iou_threshold=0.5):
    """Object-level scores of label volume `pred` against `truth`.

    Specimens are components (connectivity `conn`) of at least `min_vox` voxels; a predicted
    and a true one match when their IoU is at least `iou_threshold`.
    """
    gt, gt_counts = _components(truth > 0, conn, min_vox)
    pr, pr_counts = _components(pred > 0, conn, min_vox)
    gt_ids, pr_ids = (np.flatnonzero(c >= min_vox) for c in (gt_counts, pr_counts))
    gt_ids, pr_ids = gt_ids[gt_ids > 0], pr_ids[pr_ids > 0]
    K = len(codes)
    gt_cls, pr_cls = _component_class(gt, truth, len(gt_counts) - 1, K), _component_class(pr, pred, len(pr_counts) - 1, K)
    both = (gt > 0) & (pr > 0)
    keys = gt[both].astype(np.int64) * len(pr_counts) + pr[both]
    pairs, inter = np.unique(keys, return_counts=True)
    g, p = pairs // len(pr_counts), pairs % len(pr_counts)
    iou = inter / (gt_counts[g] + pr_counts[p] - inter)
    ok = iou >= iou_threshold  # above 0.5 a specimen can match at most one other: no assignment problem
    g, p = g[ok], p[ok]
    same = gt_cls[g] == pr_cls[p]

    def prf(tp, n_pred, n_true):
        prec = tp / n_pred if n_pred else None
        rec = tp / n_true if n_true else None
        f1 = 2 * tp / (n_pred + n_true) if n_pred + n_true else None
        return prec, rec, f1
    precision, recall, f1 = prf(len(g), len(pr_ids), len(gt_ids))
    return {"iou_threshold": iou_threshold, "min_voxels": min_vox,
            "connectivity": conn, "n_true": len(gt_ids), "n_predicted": len(pr_ids), "n_matched": int(len(g)),
            "n_matched_same_class": int(same.sum()), "precision": precision, "recall": recall, "f1": f1,
            "class_f1": prf(int(same.sum()), len(pr_ids), len(gt_ids))[2],
            "n_true_below_min_size": int((gt_counts[1:] < min_vox).sum()),
            "per_class": {c: {"true": int((gt_cls[gt_ids] == k).sum()), "predicted": int((pr_cls[pr_ids] == k).sum()),
                              "matched": int(((gt_cls[g] == k) & same).sum())}
                          for k, c in enumerate(codes) if k}}


def evaluate_specimens(vol, work_dir, valid_pct=0.2, iou_threshold=0.5):
    """Object-level detection on the validation block: predicted vs true specimens matched at IoU >= `iou_threshold`.

    True specimens are the 3D components of the ground-truth fossil mask, predicted ones
    those of `predictions/labels_clean.tif`, both inside the validation block (the last
    `valid_pct` of slices) and both with the connectivity and minimum size of the
    extraction. Adds `specimens` to `work_dir/metrics.json` and returns it: counts,
    precision, recall, F1, and `class_f1` (a match counts only with the right class); and
    `labels_clean`, the voxel scores (IoU, Dice, ...) of `labels_clean.tif` on the block
    (specks dropped, classes from the extraction or the specimen classifier).
    """
    import tifffile
    work_dir = Path(work_dir)
    if vol.labels is None:
        raise ValueError(f"{vol.source} has no train_masks_labels/: nothing to evaluate against.")
    info = json.loads((work_dir / "exports" / "extraction.json").read_text())
    _, valid_idx = split_slices(len(vol.images), valid_pct)
    if len(valid_idx) == 0:
        return None
    z0, z1 = int(valid_idx[0]), int(valid_idx[-1]) + 1
    codes = list(vol.codes)
    truth = np.asarray(vol.labels[z0:z1])
    pred = tifffile.imread(work_dir / "predictions" / "labels_clean.tif", key=range(z0, z1))
    pred = pred.reshape(truth.shape)
    out = {"validation_slices": [z0, z1 - 1],
           **_match_specimens(truth, pred, codes, info["connectivity"], info["min_voxels"], iou_threshold),
           "labels_clean": segmentation_scores(confusion_matrix(pred, truth, len(codes)), codes)}
    path = work_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics["specimens"] = out
    _write_json(path, metrics)
    return out


# ----------------------------------------------------------------------------
# Specimen classifier: 3D descriptors, trained on the ground truth and the review
# ----------------------------------------------------------------------------

NOT_A_FOSSIL = "not a fossil"
SPECIMEN_FEATURES = ["log_voxels", "surface_share", "elongation", "flatness", "box_fill", "solidity", "enclosed", "n_peaks",
                     "peaks_per_1000_voxels", "max_thickness", "mean_thickness", "intensity_p10", "intensity_p50",
                     "intensity_p90", "intensity_std"]


def _descriptors(ct, mask):
    """3D shape and intensity descriptors of one specimen, in voxel units (names: `SPECIMEN_FEATURES`).

    `mask` is the specimen in its bounding box, `ct` the CT crop of the same box.
    surface_share: share of its voxels on its surface; elongation / flatness: square roots of the ratios of the principal second moments
    (2nd/1st, 3rd/2nd); box_fill: share of the bounding box filled; solidity: volume over
    convex-hull volume; enclosed: share of the filled-in shape that is an inner cavity;
    n_peaks: local maxima of the distance to the surface, a proxy for chambers; thickness:
    the largest and mean distance to the surface (relative to the size); intensity percentiles.
    """
    import itertools
    from scipy import ndimage
    from scipy.spatial import ConvexHull
    from skimage.feature import peak_local_max
    nv = int(mask.sum())
    pts = np.argwhere(mask).astype(np.float64)
    c = pts - pts.mean(0)
    ev = np.sort(np.linalg.eigvalsh(c.T @ c / nv))[::-1] + 1 / 12  # + a voxel's own moment: no zero for flat shapes
    surface = np.argwhere(mask & ~ndimage.binary_erosion(mask))
    corners = (surface[:, None, :] + np.array(list(itertools.product((-0.5, 0.5), repeat=3)))[None]).reshape(-1, 3)
    try:
        hull = ConvexHull(np.unique(corners, axis=0)).volume
    except Exception:  # a flat or tiny specimen has no 3D hull
        hull = nv
    filled = int(ndimage.binary_fill_holes(mask).sum())
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    peaks = peak_local_max(dist, min_distance=2, threshold_abs=1.5, labels=mask.astype(np.uint8), exclude_border=False)
    vals = ct[mask].astype(np.float64)
    p10, p50, p90 = np.percentile(vals, [10, 50, 90])
    size = nv ** (1 / 3)
    return {"log_voxels": math.log10(nv), "surface_share": len(surface) / nv, "elongation": math.sqrt(ev[1] / ev[0]), "flatness": math.sqrt(ev[2] / ev[1]),
            "box_fill": nv / mask.size, "solidity": min(1.0, nv / max(hull, 1e-9)), "enclosed": 1 - nv / filled,
            "n_peaks": len(peaks), "peaks_per_1000_voxels": 1000 * len(peaks) / nv,
            "max_thickness": float(dist.max()) / size, "mean_thickness": float(dist[mask].mean()) / size,
            "intensity_p10": p10, "intensity_p50": p50, "intensity_p90": p90, "intensity_std": float(vals.std())}


def _truth_features(vol, pred, connectivity, min_vox, path):
    """Descriptors of every true specimen (component of the ground-truth fossil mask, `min_vox` voxels or more) in
    `path`: its box, `SPECIMEN_FEATURES`, the predicted class fractions `frac_*` under it and its true voxel counts."""
    import pandas as pd
    codes, K = list(vol.codes), len(vol.codes)
    cc, _, _, parts = _find_specimens(np.asarray(vol.labels) > 0, connectivity, min_vox, False, None, None)
    rows = []
    for i, bb, nv in parts:
        local = cc[bb] == i
        frac = np.bincount(pred[bb][local], minlength=K)[:K] / nv
        truth = np.bincount(np.asarray(vol.labels[bb])[local], minlength=K)[:K]
        rows.append({"id": len(rows) + 1, "z0": bb[0].start, "z1": bb[0].stop,
                     **_descriptors(np.asarray(vol.images[bb]), local),
                     **{f"frac_{c}": float(frac[k]) for k, c in enumerate(codes) if k},
                     **{f"truth_{c}": int(truth[k]) for k, c in enumerate(codes)}})
    cols = ["id", "z0", "z1", *SPECIMEN_FEATURES, *[f"frac_{c}" for c in codes[1:]], *[f"truth_{c}" for c in codes]]
    with _replacing(path) as tmp:
        pd.DataFrame(rows, columns=cols).to_csv(tmp, index=False, float_format="%.6g")


def _training_labels(cat, feats, codes, n_train, review):
    """Labels to learn from, a Series by specimen id, and where each comes from.

    Ground truth (when `feats` has `truth_*` columns): specimens whose bounding box lies
    wholly in the training block (z1 <= `n_train`), labelled with their majority true
    fossil class, or `NOT_A_FOSSIL` when most of their voxels are background in the truth.
    Review (overrides the truth): accepted specimens get their taxon (their class at review
    time when no taxon was typed), rejected ones `NOT_A_FOSSIL`.
    """
    import pandas as pd
    labels, source = {}, {}
    tcols = [f"truth_{c}" for c in codes]
    if all(c in feats.columns for c in tcols):
        t = feats.set_index("id")[tcols].to_numpy()
        inside = cat.set_index("id").loc[feats["id"], "z1"].to_numpy() <= n_train
        for sid, counts, ok in zip(feats["id"], t, inside):
            if ok:
                labels[int(sid)] = NOT_A_FOSSIL if counts[0] * 2 >= counts.sum() else codes[1 + int(np.argmax(counts[1:]))]
                source[int(sid)] = "truth"
    for sid, d in (review or {}).items():
        if d.get("decision") == "rejected":
            labels[sid], source[sid] = NOT_A_FOSSIL, "review"
        elif d.get("decision") == "accepted":
            labels[sid], source[sid] = d.get("taxon") or d.get("predicted_class"), "review"
    return pd.Series(labels, dtype=object), source


def classify_specimens(work_dir, valid_pct=0.2, use_truth=True, use_review=True, min_examples=4, seed=0):
    """Train the specimen classifier and re-score every specimen; one call after each round of review.

    A random forest on the 3D descriptors of `exports/features.csv` and the segmentation's
    class fractions (`frac_*` in the catalogue), trained on the ground truth of the
    training-block specimens (`use_truth`: the predicted ones, labelled as in
    `_training_labels`, and the true ones of `exports/truth_features.csv`) and the
    decisions in `exports/review.csv` (`use_review`). Then, in `exports/fossils.csv`: `class` is the
    classifier's class and `class_probability` its probability; the segmentation's class
    stays in `seg_class`; specimens it calls `NOT_A_FOSSIL` are `flagged` (kept, not
    deleted). `predictions/labels_clean.tif` is repainted (flagged specimens as background;
    a typed taxon that is not one of the classes keeps its segmentation class there).
    Writes `exports/classifier.json`. With no specimen, fewer than `min_examples` labelled
    specimens or a single label, nothing changes and None is returned; else the new catalogue.
    """
    import pandas as pd
    import tifffile
    from sklearn.ensemble import RandomForestClassifier
    exp_dir, pred_dir = Path(work_dir) / "exports", Path(work_dir) / "predictions"
    for p in (exp_dir / "fossils.csv", exp_dir / "features.csv", exp_dir / "extraction.json", pred_dir / "specimens.tif"):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: run the extraction cell of 05_predict_export first (same work_dir).")
    cat, feats = pd.read_csv(exp_dir / "fossils.csv"), pd.read_csv(exp_dir / "features.csv")
    if len(feats) != len(cat) or not (feats["id"].to_numpy() == cat["id"].to_numpy()).all():
        raise ValueError(f"{exp_dir / 'features.csv'} does not describe the specimens of {exp_dir / 'fossils.csv'}: "
                         "re-run the extraction cell of 05_predict_export.")
    if not len(cat):
        print("Specimen classifier: no specimen in the catalogue, nothing to classify.")
        return None
    if "seg_class" not in cat.columns:
        cat.insert(2, "seg_class", cat["class"])
    extraction = json.loads((exp_dir / "extraction.json").read_text())
    codes = extraction["codes"]
    n_train = len(split_slices(extraction["shape"][0], valid_pct)[0])
    review = {}
    if use_review and (exp_dir / "review.csv").exists():
        review = ReviewSession(work_dir).decisions
    y, source = _training_labels(cat, feats if use_truth else feats[["id"]], codes, n_train, review)
    cols = SPECIMEN_FEATURES + [f"frac_{c}" for c in codes[1:]]
    X = feats.set_index("id")[SPECIMEN_FEATURES].join(cat.set_index("id")[cols[len(SPECIMEN_FEATURES):]]).fillna(0.0)
    X_fit, y_fit = X.loc[y.index].to_numpy(), y.to_numpy().astype(str)
    n_from = {k: list(source.values()).count(k) for k in ("truth", "review")}
    n_from["true specimens"] = 0
    tf_path = exp_dir / "truth_features.csv"
    if use_truth and tf_path.exists():  # the true specimens of the training block: more (and cleaner) examples
        tf = pd.read_csv(tf_path)
        tf = tf[tf["z1"] <= n_train]
        t = tf[[f"truth_{c}" for c in codes[1:]]].to_numpy()
        if len(tf):
            X_fit = np.concatenate([X_fit, tf[cols].fillna(0.0).to_numpy()])
            y_fit = np.concatenate([y_fit, np.asarray(codes[1:])[t.argmax(1)]])
        n_from["true specimens"] = len(tf)
    sources = (f"{n_from['truth']} predicted specimens labelled from the ground truth, {n_from['true specimens']} true "
               f"specimens, {n_from['review']} from the review")
    if len(y_fit) < min_examples or len(set(y_fit)) < 2:
        print(f"Specimen classifier not trained: {len(y_fit)} examples ({sources}) with {len(set(y_fit))} different "
              f"label(s); it needs {min_examples} or more and two labels. Classes stay those of the segmentation.")
        return None
    clf = RandomForestClassifier(n_estimators=300, class_weight="balanced", random_state=seed, n_jobs=1,
                                 oob_score=len(y_fit) >= 20)
    clf.fit(X_fit, y_fit)
    proba = clf.predict_proba(X.to_numpy())
    best = proba.argmax(1)
    cat["class"] = clf.classes_[best]
    cat["class_probability"] = proba[np.arange(len(best)), best]
    cat["flagged"] = cat["class"] == NOT_A_FOSSIL
    with _replacing(exp_dir / "fossils.csv") as tmp:
        cat.to_csv(tmp, index=False, float_format="%.6g")
    index = {c: k for k, c in enumerate(codes)}
    lut = np.zeros(int(cat["id"].max()) + 1 if len(cat) else 1, np.uint8)
    for sid, cls, seg in zip(cat["id"], cat["class"], cat["seg_class"]):
        lut[sid] = 0 if cls == NOT_A_FOSSIL else index.get(cls, index.get(seg, 0))
    with _replacing(pred_dir / "labels_clean.tif") as tmp, tifffile.TiffFile(pred_dir / "specimens.tif") as src, \
            tifffile.TiffWriter(tmp) as dst:
        for page in src.pages:
            dst.write(lut[page.asarray()], **_LABEL_PAGE)
    info = {"n_examples": len(y_fit), "from_truth": n_from["truth"], "true_specimens": n_from["true specimens"],
            "from_review": n_from["review"],
            "examples_per_label": {str(k): int(v) for k, v in zip(*np.unique(y_fit, return_counts=True))},
            "classes": [str(c) for c in clf.classes_], "oob_accuracy": getattr(clf, "oob_score_", None),
            "features": list(X.columns), "importance": dict(zip(X.columns, np.round(clf.feature_importances_, 4).tolist())),
            "changed_class": int((cat["class"] != cat["seg_class"]).sum()), "flagged": int(cat["flagged"].sum()),
            "per_class": {str(k): int(v) for k, v in cat["class"].value_counts().items()}}
    _write_json(exp_dir / "classifier.json", info)
    print(f"Specimen classifier trained on {len(y_fit)} examples ({sources}): "
          f"{info['changed_class']} of {len(cat)} specimens changed class, "
          f"{info['flagged']} flagged as {NOT_A_FOSSIL!r}. Now: {info['per_class']}.")
    return cat


def describe_specimen_scores(sp):
    """One line for the object-level scores returned by `evaluate_specimens`."""
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"validation block: {sp['n_true']} true specimens, {sp['n_predicted']} predicted, {sp['n_matched']} matched "
            f"(IoU >= {sp['iou_threshold']}): precision {f(sp['precision'])}, recall {f(sp['recall'])}, "
            f"F1 {f(sp['f1'])}, F1 with the right class {f(sp['class_f1'])}")


def variant_name(context_slices=1, triplanar=False, tta=False):
    """Short name of a segmentation variant, e.g. "k=3, tri-planar, flip TTA" ("k=1" is the published recipe)."""
    return ", ".join([f"k={int(context_slices)}"] + (["tri-planar"] if triplanar else []) + (["flip TTA"] if tta else []))


EVALUATION_COLUMNS = ["variant", "step", "iou", "dice", "mean_iou_fossils", "pixel_acc_nonbg", "specimen_precision",
                      "specimen_recall", "specimen_f1", "specimen_class_f1", "n_true", "n_predicted"]


def evaluation_row(variant, step, scores, specimens):
    """One row of the evaluation table: voxel `scores` (from `segmentation_scores`) and object `specimens` scores."""
    sp = specimens or {}
    return {"variant": variant, "step": step, "iou": scores["iou"], "dice": scores["dice"],
            "mean_iou_fossils": scores["mean_iou_fossils"], "pixel_acc_nonbg": scores["pixel_acc_nonbg"],
            "specimen_precision": sp.get("precision"), "specimen_recall": sp.get("recall"), "specimen_f1": sp.get("f1"),
            "specimen_class_f1": sp.get("class_f1"), "n_true": sp.get("n_true"), "n_predicted": sp.get("n_predicted")}


def evaluation_markdown(rows, codes, extra=None):
    """The evaluation table as markdown: per-class IoU and Dice, the published metric, specimen P / R / F1;
    `extra` maps more column titles to row keys (numbers shown to the unit)."""
    f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    fossil, extra = codes[1:], extra or {}
    head = (["variant", "step"] + [f"IoU {c}" for c in codes] + [f"Dice {c}" for c in fossil]
            + ["mean IoU fossils", "acc. non-bg (published 'IoU')", "specimen P", "R", "F1", "F1 right class", *extra])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ([r["variant"], r["step"]] + [f(r["iou"].get(c)) for c in codes] + [f(r["dice"].get(c)) for c in fossil]
                 + [f(r[k]) for k in ("mean_iou_fossils", "pixel_acc_nonbg", "specimen_precision", "specimen_recall",
                                      "specimen_f1", "specimen_class_f1")]
                 + ["n/a" if r.get(k) is None else f"{r[k]:.0f}" for k in extra.values()])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_evaluation(work_dir, rows, codes):
    """Write this run's evaluation rows to `work_dir/evaluation.json` and `evaluation.md`; return the markdown."""
    work_dir = Path(work_dir)
    md = evaluation_markdown(rows, codes)
    _write_json(work_dir / "evaluation.json", {"codes": list(codes), "rows": rows})
    with _replacing(work_dir / "evaluation.md") as tmp:
        tmp.write_text(md)
    return md


# ----------------------------------------------------------------------------
# Review: accept / reject / name each specimen; every click saved to review.csv
# ----------------------------------------------------------------------------

REVIEW_COLUMNS = ["id", "decision", "taxon", "predicted_class", "confidence", "voxels",
                  "centroid_z", "centroid_y", "centroid_x", "updated"]
REVIEW_ORDERS = {"confidence": "least certain first", "confidence_desc": "most certain first",
                 "size": "largest first", "size_asc": "smallest first", "id": "by id"}


class ReviewSession:
    """The review of the catalogue `work_dir/exports/fossils.csv`, saved in `exports/review.csv`.

    Each decision (`accepted` / `rejected`, with a taxon) is written at once with an atomic
    replace, so a disconnect loses nothing. Decisions are tied to a specimen by its id and
    centroid: after a new extraction (other parameters, new ids) they follow their specimen
    when its centroid moved less than `tol` voxels; the others are kept in the file
    untouched (`stale`) and not shown.
    """

    def __init__(self, work_dir, tol=3.0):
        import pandas as pd
        self.exp_dir = Path(work_dir) / "exports"
        self.path = self.exp_dir / "review.csv"
        cat_path = self.exp_dir / "fossils.csv"
        if not cat_path.exists():
            raise FileNotFoundError(f"{cat_path} not found: run 05_predict_export (its extraction cell) first, "
                                    "with the same work_dir.")
        self.cat = pd.read_csv(cat_path).set_index("id", drop=False).rename_axis(None)
        self.codes = [c[5:] for c in self.cat.columns if c.startswith("frac_")]
        self.decisions, self.stale = {}, []
        self._folders = {int(d.name[7:]): d for d in self.exp_dir.glob("fossil_*") if d.name[7:].isdigit()}
        if self.path.exists():
            cents = self.cat[["centroid_z", "centroid_y", "centroid_x"]].to_numpy(float)
            for r in pd.read_csv(self.path, dtype=str, keep_default_na=False).to_dict("records"):
                sid = self._match(r, cents, tol)
                if sid is None or sid in self.decisions:
                    self.stale.append(r)
                else:
                    self.decisions[sid] = {**r, "id": sid}

    def _match(self, r, cents, tol):
        try:
            c = np.array([float(r["centroid_z"]), float(r["centroid_y"]), float(r["centroid_x"])])
        except (KeyError, ValueError):
            return None
        if not len(cents):
            return None
        d = np.linalg.norm(cents - c, axis=1)
        same = self.cat.index == int(float(r.get("id") or -1))
        k = int(np.flatnonzero(same)[0]) if same.any() and d[same][0] <= tol else int(np.argmin(d))
        return int(self.cat.index[k]) if d[k] <= tol else None

    def taxa(self):
        """Taxa to offer: the model's fossil classes, then every taxon typed so far."""
        seen = [d["taxon"] for d in self.decisions.values() if d.get("taxon")] + [r.get("taxon", "") for r in self.stale]
        return list(dict.fromkeys([*self.codes, *sorted(t for t in seen if t)]))

    def get(self, sid):
        """The decision row of specimen `sid`, or None when it is not reviewed yet."""
        return self.decisions.get(int(sid))

    def set(self, sid, decision=None, taxon=None):
        """Record `decision` ("accepted", "rejected" or "" to undo) and/or `taxon` for specimen `sid`; saved at once."""
        sid = int(sid)
        if decision not in (None, "", "accepted", "rejected"):
            raise ValueError(f"decision must be 'accepted', 'rejected' or '', not {decision!r}")
        row = self.cat.loc[sid]
        d = self.decisions.get(sid) or {"decision": "", "taxon": ""}
        d.update({"id": sid, "predicted_class": row["class"], "confidence": row[self._confidence_column()],
                  "voxels": row["voxels"],
                  "centroid_z": row["centroid_z"], "centroid_y": row["centroid_y"], "centroid_x": row["centroid_x"],
                  "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if decision is not None:
            d["decision"] = decision
        if taxon is not None:
            d["taxon"] = str(taxon).strip()
        self.decisions[sid] = d
        self.save()
        return d

    def save(self):
        """Write `review.csv` (decisions, then the stale rows) to a temporary file and rename it over the old one."""
        import csv
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        with _replacing(self.path) as tmp, open(tmp, "w", newline="") as fh:
            wr = csv.DictWriter(fh, REVIEW_COLUMNS, extrasaction="ignore")
            wr.writeheader()
            for sid in sorted(self.decisions):
                wr.writerow(self.decisions[sid])
            wr.writerows(self.stale)

    def order(self, cls="all", sort="confidence"):
        """Specimen ids of class `cls` ("all" for every class) in the order `sort` (a key of `REVIEW_ORDERS`)."""
        if sort not in REVIEW_ORDERS:
            raise ValueError(f"sort must be one of {list(REVIEW_ORDERS)}, not {sort!r}")
        c = self.cat if cls == "all" else self.cat[self.cat["class"] == cls]
        conf = self._confidence_column()
        key, asc = {"confidence": (conf, True), "confidence_desc": (conf, False),
                    "size": ("voxels", False), "size_asc": ("voxels", True), "id": ("id", True)}[sort]
        return [int(i) for i in c.sort_values([key, "id"], ascending=[asc, True], na_position="first")["id"]]

    def _confidence_column(self):
        """The specimen classifier's probability once it has run (`classify_specimens`), else the segmentation's."""
        return "class_probability" if "class_probability" in self.cat.columns else "confidence"

    def first_unreviewed(self, ids):
        """Position in `ids` of the first specimen without a decision (0 when all are reviewed)."""
        return next((k for k, sid in enumerate(ids) if not (self.get(sid) or {}).get("decision")), 0)

    def summary(self):
        dec = [d.get("decision") for d in self.decisions.values()]
        return {"specimens": len(self.cat), "accepted": dec.count("accepted"), "rejected": dec.count("rejected"),
                "to_review": len(self.cat) - dec.count("accepted") - dec.count("rejected"), "stale_rows": len(self.stale)}

    def preview(self, sid):
        """Path of specimen `sid`'s preview PNG, or None when its export was capped."""
        d = self._folders.get(int(sid))
        p = d / f"{d.name}_preview.png" if d is not None else None
        return p if p is not None and p.exists() else None


def has_widget_frontend():
    """True in a live Jupyter or Colab kernel; False in plain Python and in headless runs (`run_pipeline.py`)."""
    if os.environ.get("MICROFOSSIL_HEADLESS"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and hasattr(ip, "kernel")


class ReviewPanel:
    """ipywidgets panel over a `ReviewSession`: one specimen at a time; show it with `display(panel.box)`.

    Preview and measurements; accept / reject (then on to the next); a taxon field
    offering the classes seen so far; previous / next; filter by class; sort by
    confidence or size. Opens on the first specimen not reviewed yet.
    """

    def __init__(self, work_dir):
        import ipywidgets as w
        if IS_COLAB:  # Colab needs this for ipywidgets 8
            try:
                from google.colab import output
                output.enable_custom_widget_manager()
            except Exception:
                pass
        self.session = s = ReviewSession(work_dir)
        self.filter = w.Dropdown(options=["all", *sorted(set(s.cat["class"]))], description="class")
        self.sort = w.Dropdown(options=[(v, k) for k, v in REVIEW_ORDERS.items()], value="confidence", description="order")
        self.image = w.Image(format="png", layout=w.Layout(max_width="100%"))
        self.info = w.HTML()
        self.taxon = w.Combobox(options=s.taxa(), placeholder="taxon", description="taxon", ensure_option=False,
                                continuous_update=False)
        self.prev_b, self.next_b = w.Button(description="◀ previous"), w.Button(description="next ▶")
        self.accept_b = w.Button(description="accept", button_style="success")
        self.reject_b = w.Button(description="reject", button_style="danger")
        self.status = w.HTML()
        self.ids, self.pos = [], 0
        self.prev_b.on_click(lambda _: self.go(-1))
        self.next_b.on_click(lambda _: self.go(+1))
        self.accept_b.on_click(lambda _: self.decide("accepted"))
        self.reject_b.on_click(lambda _: self.decide("rejected"))
        self.filter.observe(lambda _: self.refresh(), "value")
        self.sort.observe(lambda _: self.refresh(), "value")
        self.taxon.observe(self._on_taxon, "value")
        self.box = w.VBox([w.HBox([self.filter, self.sort]), self.image, self.info,
                           w.HBox([self.prev_b, self.accept_b, self.reject_b, self.next_b]), self.taxon, self.status])
        self.refresh()

    @property
    def current(self):
        return self.ids[self.pos] if self.ids else None

    def refresh(self):
        """Re-apply the class filter and the order; go to the first specimen not reviewed yet."""
        self.ids = self.session.order(self.filter.value, self.sort.value)
        self.pos = self.session.first_unreviewed(self.ids)
        self.show()

    def go(self, step):
        if self.ids:
            self.pos = (self.pos + step) % len(self.ids)
        self.show()

    def decide(self, decision):
        """Record `decision` for the current specimen, with the taxon typed (default: its predicted class); next."""
        sid = self.current
        if sid is None:
            return
        taxon = self.taxon.value or (self.session.cat.loc[sid, "class"] if decision == "accepted" else "")
        self.session.set(sid, decision, taxon)
        self.taxon.options = self.session.taxa()
        self.go(+1)

    def _on_taxon(self, change):
        if self.current is not None and not self._showing:
            self.session.set(self.current, taxon=change["new"])
            self.taxon.options = self.session.taxa()
            self._show_status()

    _showing = False

    def show(self):
        s, sid = self.session, self.current
        self._showing = True
        try:
            if sid is None:
                self.image.value, self.info.value, self.taxon.value = b"", "<b>No specimen to review.</b>", ""
            else:
                row, d = s.cat.loc[sid], s.get(sid) or {}
                p = s.preview(sid)
                self.image.value = p.read_bytes() if p else b""
                fields = [f for f in ["class", "class_probability", "seg_class", "confidence", "voxels", "volume_um3",
                                      "surface_um2", "esd_um", "sphericity", "mean_intensity", "touches_border"]
                          if f in row.index]
                cells = "".join(f"<td><b>{f}</b><br>{row[f]:.4g}</td>" if isinstance(row[f], float)
                                else f"<td><b>{f}</b><br>{row[f]}</td>" for f in fields)
                note = "" if p else "<br><i>no preview: exports were capped (max_exports); re-run the extraction with a larger max_exports</i>"
                self.info.value = (f"<b>specimen #{sid}</b> ({self.pos + 1} of {len(self.ids)}), box z {row['z0']}-{row['z1']}, "
                                   f"y {row['y0']}-{row['y1']}, x {row['x0']}-{row['x1']}<table><tr>{cells}</tr></table>{note}")
                self.taxon.value = d.get("taxon", "")
        finally:
            self._showing = False
        self._show_status()

    def _show_status(self):
        sm, d = self.session.summary(), self.session.get(self.current) if self.current is not None else None
        mine = f"this one: <b>{d['decision'] or 'not decided'}</b> {d.get('taxon', '')}" if d else "this one: not reviewed"
        self.status.value = (f"{mine} · reviewed {sm['accepted'] + sm['rejected']} of {sm['specimens']} "
                             f"({sm['accepted']} accepted, {sm['rejected']} rejected) · saved to {self.session.path}")


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------

def _cmap(n):
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt
    cols = plt.get_cmap("tab10" if n <= 10 else "tab20")(np.arange(n) % (10 if n <= 10 else 20))
    cols[0, 3] = 0  # background transparent
    return mcolors.ListedColormap(cols)


def _overlay(ax, img, lab, n, title=None):
    ax.imshow(img, cmap="gray", vmin=0, vmax=255)
    if lab is not None:
        ax.imshow(lab, cmap=_cmap(n), vmin=-0.5, vmax=n - 0.5, alpha=0.45, interpolation="nearest")
    ax.set_axis_off()
    if title: ax.set_title(title, fontsize=9)


def _legend(fig, codes):
    import matplotlib.patches as mpatches
    cm = _cmap(len(codes))
    fig.legend(handles=[mpatches.Patch(color=cm(i), label=c) for i, c in enumerate(codes) if i],
               loc="lower center", ncol=min(6, len(codes)), fontsize=8, frameon=False)


def _save(fig, path):
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90, bbox_inches="tight")


def plot_slice(vol, z=None, path=None):
    """Slice `z` (default: the one with most fossil pixels) beside its mask overlay."""
    import matplotlib.pyplot as plt
    if z is None:
        z = int(np.argmax([(vol.labels[k] > 0).sum() for k in range(len(vol.images))])) if vol.labels is not None \
            else len(vol.images) // 2
    fig, axs = plt.subplots(1, 2, figsize=(10, 5))
    _overlay(axs[0], vol.images[z], None, 1, f"slice {z}: {vol.stems[z]}")
    _overlay(axs[1], vol.images[z], vol.labels[z] if vol.labels is not None else None, len(vol.codes), "labels")
    if vol.labels is not None: _legend(fig, vol.codes)
    _save(fig, path)
    return fig


def plot_orthoviews(vol, labels=None, path=None):
    """Orthogonal views XY, XZ and YZ through the volume centre, image on top and labels overlaid below."""
    import matplotlib.pyplot as plt
    labels = vol.labels if labels is None else labels
    Z, H, W = vol.shape
    views = [("XY (z=%d)" % (Z // 2), lambda a: a[Z // 2]), ("XZ (y=%d)" % (H // 2), lambda a: a[:, H // 2]),
             ("YZ (x=%d)" % (W // 2), lambda a: a[:, :, W // 2])]
    rows = 1 if labels is None else 2
    fig, axs = plt.subplots(rows, 3, figsize=(14, 4.5 * rows), squeeze=False)
    for j, (t, f) in enumerate(views):
        _overlay(axs[0, j], f(vol.images), None, 1, t)
        if labels is not None:
            _overlay(axs[1, j], f(vol.images), f(labels), len(vol.codes), t + " + labels")
    if labels is not None: _legend(fig, vol.codes)
    _save(fig, path)
    return fig


def plot_histogram(vol, path=None):
    """Intensity histogram of the volume, per class when labels exist (log counts)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    step = max(1, len(vol.images) // 32)
    imgs = vol.images[::step]
    if vol.labels is None:
        ax.hist(imgs.ravel(), bins=128, range=(0, 255), log=True, color="gray")
    else:
        labs = vol.labels[::step]
        cm = _cmap(len(vol.codes))
        for i, c in enumerate(vol.codes):
            v = imgs[labs == i]
            if v.size:
                ax.hist(v, bins=128, range=(0, 255), log=True, histtype="step", label=c,
                        color=cm(i)[:3] if i else "gray")
        ax.legend(fontsize=8)
    lo, hi = vol.window
    ax.set_xlabel(f"intensity (uint8; raw {vol.raw_dtype} window {lo:.4g}..{hi:.4g} mapped to 0..255)")
    ax.set_ylabel("voxels")
    _save(fig, path)
    return fig


def plot_history(work_dir, names, path=None):
    """Loss and mean IoU per epoch from `history/<name>.csv` for each phase in `names`."""
    import matplotlib.pyplot as plt
    import pandas as pd
    fig, axs = plt.subplots(1, 2, figsize=(12, 4))
    off = 0
    for n in names:
        f = Path(work_dir) / "history" / f"{n}.csv"
        if not f.exists(): continue
        h = pd.read_csv(f)
        h = h[pd.to_numeric(h["epoch"], errors="coerce").notna()]
        x = off + np.arange(len(h))
        axs[0].plot(x, h["train_loss"].astype(float), "-", label=f"{n} train")
        axs[0].plot(x, h["valid_loss"].astype(float), "--", label=f"{n} valid")
        axs[1].plot(x, h["mean_iou"].astype(float), "-o", ms=3, label=n)
        off += len(h)
    axs[0].set(xlabel="epoch", ylabel="loss"); axs[1].set(xlabel="epoch", ylabel="mean IoU (validation block)")
    for a in axs: a.legend(fontsize=8)
    _save(fig, path)
    return fig


def plot_predictions(vol, pred, idx, path=None):
    """Image, ground truth and prediction side by side for slices `idx`."""
    import matplotlib.pyplot as plt
    idx = list(idx)
    fig, axs = plt.subplots(len(idx), 3, figsize=(12, 4 * len(idx)), squeeze=False)
    for r, z in enumerate(idx):
        _overlay(axs[r, 0], vol.images[z], None, 1, f"slice {z}")
        _overlay(axs[r, 1], vol.images[z], vol.labels[z] if vol.labels is not None else None, len(vol.codes),
                 "ground truth")
        _overlay(axs[r, 2], vol.images[z], pred[z], len(vol.codes), "prediction")
    _legend(fig, vol.codes)
    _save(fig, path)
    return fig
