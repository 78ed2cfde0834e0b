"""Reading and validating a dataset: the CT slices, their label masks, `codes.txt` and the voxel size.

The data contract (README, "Your data"): a dataset folder holds `train/` (one grayscale
image per CT slice, PNG or TIFF, 8 or 16 bit or float, or multi-page TIFF volumes),
`train_masks_labels/<stem>_GT<ext>` (an integer class label per pixel) and `codes.txt`
(one class name per line, line index = label value, line 0 = the background). Slices in
natural name order are the z order. The dataset folder is only ever read.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .io import replacing

IMAGE_EXTS = (".png", ".tif", ".tiff")
VOXEL_SIZE_FILE = "voxel_size.txt"


class DatasetError(ValueError):
    """A problem with the user's dataset; the message names the file and the fix."""


@dataclass
class Volume:
    """A CT volume: `images` (Z,H,W) uint8 after intensity windowing, `labels` (Z,H,W) or None, class names `codes`."""
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


def _natural_key(p):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(p).name)]


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


def _unreadable(path, e):
    return DatasetError(f"Cannot read {path}: {e}. The file is corrupt or not an image; "
                        "re-export it as PNG or TIFF, or remove it.")


def _n_pages(path):
    """Number of slices in image file `path` (TIFF pages; 1 for PNG), reading headers only."""
    if not _is_tiff(path):
        return 1
    import tifffile
    try:
        with tifffile.TiffFile(path) as t:
            return len(t.pages)
    except Exception as e:
        raise _unreadable(path, e) from e


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
        raise _unreadable(path, e) from e


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


def _check_mask_page(lab, m, codes, codes_path):
    if np.issubdtype(lab.dtype, np.floating) and not np.array_equal(lab, np.round(lab)):
        raise DatasetError(f"{m} holds non-integer values; masks must hold integer class labels.")
    if lab.min() < 0 or lab.max() >= len(codes):
        bad = int(lab.max()) if lab.max() >= len(codes) else int(lab.min())
        raise DatasetError(f"{m} holds label {bad}, but {codes_path} lists only {len(codes)} classes "
                           f"(labels 0..{len(codes) - 1}). Add a line for it to codes.txt or fix the mask.")


def _read_into(images, labels, files, masks, shape, window, codes, codes_path):
    """Decode every slice (and mask) into the preallocated `images` (and `labels`), checking each as it comes."""
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
        if labels is None:
            continue
        m, k = masks[i], z0
        for lab in _iter_pages(m):
            if lab.shape != shape or k >= z:
                raise DatasetError(f"{m} does not match its image {f} ({z - z0} slice(s) of {shape[0]}x{shape[1]}, "
                                   f"HxW): a mask must match its slice pixel for pixel.")
            _check_mask_page(lab, m, codes, codes_path)
            labels[k] = lab
            k += 1
        if k != z:
            raise DatasetError(f"{m} has {k - z0} slice(s) but its image {f} has {z - z0}: "
                               "a mask must match its slice pixel for pixel.")


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
    codes = read_codes(codes_path) if (require_labels or has_masks or codes_path.exists()) else None
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
    info = dict(codes=codes, stems=stems, source=data_dir, files=files)

    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / _cache_key(data_dir, files + masks + ([codes_path] if codes_path.exists() else []))
        if (cache / "volume.json").exists():
            meta = json.loads((cache / "volume.json").read_text())
            return Volume(images=np.load(cache / "images.npy", mmap_mode="r"),
                          labels=np.load(cache / "labels.npy", mmap_mode="r") if meta["has_labels"] else None,
                          window=tuple(meta["window"]), raw_dtype=meta["raw_dtype"], **info)

    # the intensity window comes from a sample of about 32 slices spread over z
    first = next(_iter_pages(files[0]))
    shape, raw_dtype = first.shape, str(first.dtype)
    sample = [first] if first.dtype == np.uint8 else [
        p for f, n in list(zip(files, counts))[::max(1, len(files) // 32)] for p in _iter_pages(f, max(1, n // 32))]
    window = _window_of(sample)
    del sample
    full = (len(stems), *shape)
    if cache is None:
        images = np.empty(full, np.uint8)
        labels = np.empty(full, np.uint8) if has_masks else None
        _read_into(images, labels, files, masks, shape, window, codes, codes_path)
        return Volume(images=images, labels=labels, window=window, raw_dtype=raw_dtype, **info)
    with replacing(cache) as tmp:
        tmp.mkdir(parents=True)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, full)
        labels = np.lib.format.open_memmap(tmp / "labels.npy", "w+", np.uint8, full) if has_masks else None
        _read_into(images, labels, files, masks, shape, window, codes, codes_path)
        for a in (images, labels):
            if a is not None:
                a.flush()
        del images, labels
        (tmp / "volume.json").write_text(json.dumps({"window": window, "raw_dtype": raw_dtype, "has_labels": has_masks}))
    return load_volume(data_dir, require_labels, cache_dir)


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
