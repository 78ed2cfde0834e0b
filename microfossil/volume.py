"""Reading and validating a dataset: the CT slices, their label masks, `codes.txt` and the voxel size.

The data contract (README, "Your data"): a dataset folder holds `train/` (one grayscale
image per CT slice, PNG or TIFF, 1, 8 or 16 bit or float, all of one bit depth, or multi-page
TIFF volumes), `train_masks_labels/<stem>_GT<ext>` (a single-channel integer class label per
pixel; a colour mask is refused) and `codes.txt` (one class name per line, line index = label
value, line 0 = the background). Slices in natural name order are the z order, and each slice
name is used once. TIFFs may be compressed (LZW and others need `imagecodecs`); a truncated
file is refused. NaN and Inf voxels of float scans are left out of the intensity window, shown
as 0 and counted. Text files may be UTF-8 (with or without BOM), UTF-16 with a BOM, or
Windows-1252/Latin-1. The dataset folder is only ever read.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import re
import struct
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .io import replacing

IMAGE_EXTS = (".png", ".tif", ".tiff")
VOXEL_SIZE_FILE = "voxel_size.txt"
CACHE_FORMAT = 2  # raised when decoding changes (2: NaN/Inf voxels, colour kept at its bit depth); older caches rebuild


def evenly_spaced(length, n):
    """About `n` indices of `range(length)`, evenly spaced from the first to the last (all of them when `length` is
    `n` or less), ascending, each once: the slices a preview, a histogram or a calibration looks at."""
    return np.unique(np.linspace(0, length - 1, min(n, length)).round().astype(int))


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
    nonfinite_voxels: int = 0  # NaN or Inf voxels of a float scan, shown as 0

    @property
    def shape(self): return self.images.shape


def volume_fingerprint(vol, n_slices=16):
    """What identifies the scan `vol` in a record: its folder, its shape and the SHA-256 of the bytes of about
    `n_slices` evenly spaced slices (every 4th pixel of every 4th row), after windowing. The same scan gives the same
    fingerprint wherever its folder is moved; another scan (or another crop of it) another."""
    import hashlib
    h = hashlib.sha256(repr(tuple(int(d) for d in vol.shape)).encode())
    for z in evenly_spaced(len(vol.images), n_slices):
        h.update(np.ascontiguousarray(np.asarray(vol.images[z])[::4, ::4]).tobytes())
    return {"dataset": str(vol.source), "shape": [int(d) for d in vol.shape], "sampled_sha256": h.hexdigest()}


def same_scan(vol, trained_on):
    """True when `vol` is the scan a model's record `trained_on` (`volume_fingerprint`) describes, False when it is
    another, None when the record cannot tell (made before fingerprints were recorded) and the shapes agree."""
    if not trained_on:
        return None
    if list(trained_on.get("shape") or []) != [int(d) for d in vol.shape]:
        return False
    if trained_on.get("sampled_sha256") is None:
        return None
    return volume_fingerprint(vol)["sampled_sha256"] == trained_on["sampled_sha256"]


def _read_text(path):
    """The text of file `path`: UTF-8 (with or without BOM), UTF-16 with a BOM, else Windows-1252 (Latin-1)."""
    data = Path(path).read_bytes()
    utf16 = data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)  # Windows Notepad's "Unicode"
    for encoding in ("utf-16",) if utf16 else ("utf-8-sig", "cp1252"):  # cp1252: old editors, a superset of Latin-1
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        # control characters (NULs: UTF-16 with no BOM, a binary file) mean a wrong guess
        if not any(unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in text):
            return text
    raise DatasetError(f"{path} is not text in UTF-8, UTF-16 with a byte-order mark, or Latin-1. "
                       "Save it again as UTF-8 text (in Notepad: Save as, Encoding: UTF-8).")


def read_codes(path):
    """Read class names from `codes.txt` at `path` (one per line, line index = label value; see `_read_text`)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path} is missing. Add codes.txt with one class name per line "
                           "(line 0 = background), e.g. 'background', 'foraminifera', 'ostracod'.")
    codes = [ln.strip() for ln in _read_text(path).splitlines()]
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
    (e.g. `5 2.5 2.5`), in µm; text after `#` is a comment. Numbers are separated by spaces,
    semicolons or commas, except that a word of digits, one comma, digits (`2,5`) is one
    number with a decimal comma: `2,5` is 2.5 and `5,0 2,5 2,5` or `5;2,5;2,5` are three
    numbers, while `5,2.5,2.5`, `5, 2.5, 2.5` and `5,2,2` are three numbers separated by commas.
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
        text = " ".join(line.split("#")[0] for line in _read_text(path).splitlines())
        try:
            values = [float(t) for t in _number_words(text)]
        except ValueError:
            values = text.strip()
        return check(values, str(path)), str(path)
    return (1.0, 1.0, 1.0), "the default: no voxel_size_um and no voxel_size.txt, so sizes are in voxels"


def _number_words(text):
    """The numbers of `text` as strings, by the decimal-comma rule of `read_voxel_size`."""
    words = []
    for word in re.split(r"[\s;]+", text):
        word = word.strip(",")
        words += [word.replace(",", ".")] if re.fullmatch(r"[+-]?\d+,\d+", word) else [w for w in word.split(",") if w]
    return words


def _natural_key(p):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(p).name)]


def _is_colour(arr):
    """Whether `arr` is an RGB(A) page whose red, green and blue channels differ."""
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        return False
    return not ((arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all())


def _plane(arr, path):
    """`arr` as one 2D page: the first channel of an RGB(A) page whose channels are equal (gray saved as colour)."""
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.size == 0:
        raise DatasetError(f"{path} has pages of shape {arr.shape}; expected 2D grayscale slices.")
    return arr


def _gray(arr, path):
    """One CT page as a 2D array of its file's bit depth: colour becomes luminance, 1-bit becomes 0/255 uint8."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if _is_colour(arr):
        lum = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        arr = lum.astype(arr.dtype) if arr.dtype.kind == "f" else np.rint(lum).astype(arr.dtype)
    return _plane(arr, path)


def _label_plane(arr, path):
    """One mask page as a 2D array of labels, as stored (1-bit as 0/1); a colour mask is refused, never converted."""
    if _is_colour(arr):
        raise DatasetError(f"{path} is a colour image (its red, green and blue channels differ), as some annotation "
                           "tools save masks. A mask must be a single-channel integer label image: each pixel's value "
                           "is the line of codes.txt of its class (0 = background). Export the labels as a grayscale "
                           "or indexed label image, or map each colour to its label value.")
    return _plane(arr.astype(np.uint8) if arr.dtype == bool else arr, path)


def _is_tiff(path): return Path(path).suffix.lower() in (".tif", ".tiff")


def _unreadable(path, e):
    if "imagecodecs" in str(e):  # tifffile's word for a compression (LZW, JPEG...) it cannot decode alone
        return DatasetError(f"Cannot read {path}: {e}. Its compression needs the imagecodecs package, which is not "
                            "installed: run `pip install imagecodecs` (it is in requirements.txt) and restart the "
                            "kernel, or save the file uncompressed.")
    return DatasetError(f"Cannot read {path}: {e}. The file is corrupt, truncated or not an image; "
                        "re-export it as PNG or TIFF, or remove it.")


def _tiff_len(t, path):
    """Number of pages of the open TiffFile `t`; DatasetError if file `path` was cut short before its last page ends.

    tifffile stops at a page list that points past the end of the file, with only a log
    line, so the last page it found is checked: its link to a next page must be 0 (none)
    and its pixel data must lie inside the file.
    """
    n, fh, fmt = len(t.pages), t.filehandle, t.tiff
    fh.seek(t.pages.next_page_offset)
    link = fh.read(fmt.offsetsize)
    last = t.pages[n - 1]
    data_end = max((o + c for o, c in zip(last.dataoffsets, last.databytecounts)), default=0)
    if data_end > fh.size:
        cut = f"the pixel data of its page {n} runs past the end of the file ({fh.size} bytes)"
    elif len(link) < fmt.offsetsize or struct.unpack(fmt.offsetformat, link)[0]:
        cut = f"its list of pages breaks off after page {n}, at the end of the file ({fh.size} bytes)"
    else:
        return n
    raise DatasetError(f"{path} is truncated: {cut}, so slices are missing. It was cut short (an interrupted copy, "
                       "download or export): copy or export it again from the original.")


def _n_pages(path):
    """Number of slices in image file `path` (TIFF pages; 1 for PNG), reading headers only."""
    if not _is_tiff(path):
        return 1
    import tifffile
    try:
        with tifffile.TiffFile(path) as t:
            return _tiff_len(t, path)
    except DatasetError:
        raise
    except Exception as e:
        raise _unreadable(path, e) from e


def _iter_pages(path, step=1, labels=False):
    """Yield every `step`-th slice of image `path` (of mask `path` if `labels`), one at a time, as 2D arrays.

    Raises DatasetError if the file is unreadable or truncated, or a mask is a colour image.
    """
    path = Path(path)
    as_plane = _label_plane if labels else _gray
    try:
        if _is_tiff(path):
            import tifffile
            with tifffile.TiffFile(path) as t:
                for k in range(0, _tiff_len(t, path), step):
                    yield as_plane(t.pages[k].asarray(), path)
        else:
            from PIL import Image
            with Image.open(path) as im:
                im.load()
                arr = np.asarray(im)
            yield as_plane(arr, path)
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


def _window_of(pages, files):
    """Intensity window (lo, hi) from raw `pages` sampled from `files`: identity for 8-bit, else the 0.1-99.9
    percentiles of their finite voxels (NaN and Inf left out)."""
    if pages[0].dtype == np.uint8:
        return 0.0, 255.0
    for step in (4, 1):  # every voxel only if all on the sparse grid are NaN or Inf
        values = np.concatenate([p[::step, ::step].ravel() for p in pages])
        values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        if values.size:
            break
    else:
        names = ", ".join(f.name for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise DatasetError(f"Every voxel sampled from {names} in {files[0].parent} is NaN or Inf: there is no "
                           "intensity to show. Export the scan again with real values (a float or 16-bit TIFF), "
                           "or check its reconstruction.")
    lo, hi = (float(v) for v in np.percentile(values, [0.1, 99.9]))
    return lo, hi if hi > lo else lo + 1.0


def _n_nonfinite(raw):
    return int(raw.size - np.count_nonzero(np.isfinite(raw))) if raw.dtype.kind == "f" else 0


def _to_uint8(raw, window):
    """`raw` mapped through `window` to uint8; NaN and Inf voxels become 0, the window's low end."""
    if raw.dtype == np.uint8:
        return raw
    lo, hi = window
    scaled = (raw.astype(np.float32) - lo) * (255.0 / (hi - lo)) + 0.5
    if raw.dtype.kind == "f":
        scaled[~np.isfinite(raw)] = 0.0
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _bit_depth(dtype):
    """`dtype` in words, byte order aside: '8-bit integer', '16-bit signed integer', '32-bit float'..."""
    return f"{dtype.itemsize * 8}-bit " + {"f": "float", "i": "signed integer"}.get(dtype.kind, "integer")


def _warn_nonfinite(nonfinite, folder):
    """Print how many voxels of each file of `folder` are NaN or Inf (`nonfinite`: file name -> count)."""
    if not nonfinite:
        return
    shown = ", ".join(f"{name} ({n})" for name, n in list(nonfinite.items())[:5])
    more = f" and {len(nonfinite) - 5} more file(s)" if len(nonfinite) > 5 else ""
    print(f"Warning: {sum(nonfinite.values())} voxel(s) of {folder} are NaN or Inf, in {shown}{more}. They are left "
          "out of the intensity window and shown as 0 (black); if they are not padding, check the scan's export.")


def _cache_key(data_dir, files):
    h = hashlib.sha1(str(Path(data_dir).resolve()).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def _slice_names(files, counts):
    """The name of each slice: its file's stem, `<stem>_0000`... for a multi-page file; each name used once."""
    owner = {}
    for f, n in zip(files, counts):
        for stem in [f.stem] if n == 1 else [f"{f.stem}_{k:04d}" for k in range(n)]:
            if stem in owner:
                raise DatasetError(f"{owner[stem]} and {f} both give slice {stem!r}, so one slice's outputs would "
                                   "overwrite the other's. Keep one of them in train/ and remove or rename the other.")
            owner[stem] = f
    return list(owner)


def _check_mask_page(lab, m, codes, codes_path):
    if np.issubdtype(lab.dtype, np.floating) and not np.array_equal(lab, np.round(lab)):
        raise DatasetError(f"{m} holds non-integer values; masks must hold integer class labels.")
    if lab.min() < 0 or lab.max() >= len(codes):
        bad = int(lab.max()) if lab.max() >= len(codes) else int(lab.min())
        raise DatasetError(f"{m} holds label {bad}, but {codes_path} lists only {len(codes)} classes "
                           f"(labels 0..{len(codes) - 1}). Add a line for it to codes.txt or fix the mask.")


def _check_page(page, f, first, first_file):
    """`page` of file `f` must have the size and bit depth of `first`, the first slice (of file `first_file`)."""
    if page.shape != first.shape:
        raise DatasetError(f"{f} is {page.shape[1]}x{page.shape[0]} (WxH) but {first_file.name} is "
                           f"{first.shape[1]}x{first.shape[0]}: all slices of a volume must have the same size. "
                           "Crop or pad them to one size.")
    if _bit_depth(page.dtype) != _bit_depth(first.dtype):
        raise DatasetError(f"{f} holds {_bit_depth(page.dtype)} pixels but {first_file} holds "
                           f"{_bit_depth(first.dtype)} ones: all slices of a volume must have one bit depth (one "
                           "intensity window maps them to 8 bit). Convert all slices to one bit depth, e.g. 16 bit, "
                           "and export them again.")


def _read_into(images, labels, files, masks, first, window, codes, codes_path):
    """Decode every slice (and mask) into the preallocated `images` (and `labels`), checking each against `first`,
    the first slice, as it comes. Returns the number of NaN or Inf voxels of each file that has any."""
    z, nonfinite, shape = 0, {}, first.shape
    for i, f in enumerate(files):
        z0 = z
        for page in _iter_pages(f):
            _check_page(page, f, first, files[0])
            images[z] = _to_uint8(page, window)
            nonfinite[f.name] = nonfinite.get(f.name, 0) + _n_nonfinite(page)
            z += 1
        if labels is None:
            continue
        m, k = masks[i], z0
        for lab in _iter_pages(m, labels=True):
            if lab.shape != shape or k >= z:
                raise DatasetError(f"{m} does not match its image {f} ({z - z0} slice(s) of {shape[0]}x{shape[1]}, "
                                   f"HxW): a mask must match its slice pixel for pixel.")
            _check_mask_page(lab, m, codes, codes_path)
            labels[k] = lab
            k += 1
        if k != z:
            raise DatasetError(f"{m} has {k - z0} slice(s) but its image {f} has {z - z0}: "
                               "a mask must match its slice pixel for pixel.")
    return {name: n for name, n in nonfinite.items() if n}


def load_volume(data_dir, require_labels=True, cache_dir=None):
    """Load and validate the dataset in `data_dir` into a `Volume`; never writes to `data_dir`.

    Raises `DatasetError` naming the file and the fix for: no images, a missing mask,
    image/mask size mismatch, a label with no line in codes.txt, an unreadable or truncated
    file, a compression that needs imagecodecs, slices of different sizes or bit depths, two
    files giving one slice name, a colour mask, a float scan with no finite voxel. NaN and Inf
    voxels are counted in `Volume.nonfinite_voxels` and printed as a warning (on every load,
    cached or not). With `require_labels=False` a missing
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
    stems = _slice_names(files, counts)
    info = dict(codes=codes, stems=stems, source=data_dir, files=files)

    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / _cache_key(data_dir, files + masks + ([codes_path] if codes_path.exists() else []))
        meta = json.loads((cache / "volume.json").read_text()) if (cache / "volume.json").exists() else {}
        if meta.get("format") == CACHE_FORMAT:
            nonfinite = meta["nonfinite"]
            _warn_nonfinite(nonfinite, img_dir)
            return Volume(images=np.load(cache / "images.npy", mmap_mode="r"),
                          labels=np.load(cache / "labels.npy", mmap_mode="r") if meta["has_labels"] else None,
                          window=tuple(meta["window"]), raw_dtype=meta["raw_dtype"],
                          nonfinite_voxels=sum(nonfinite.values()), **info)

    # the intensity window comes from a sample of about 32 slices spread over z
    first = next(_iter_pages(files[0]))
    raw_dtype = str(first.dtype)
    sampled = list(zip(files, counts))[::max(1, len(files) // 32)]
    sample = [first] if first.dtype == np.uint8 else [p for f, n in sampled for p in _iter_pages(f, max(1, n // 32))]
    window = _window_of(sample, [f for f, _ in sampled])
    del sample
    full = (len(stems), *first.shape)
    if cache is None:
        images = np.empty(full, np.uint8)
        labels = np.empty(full, np.uint8) if has_masks else None
        nonfinite = _read_into(images, labels, files, masks, first, window, codes, codes_path)
        _warn_nonfinite(nonfinite, img_dir)
        return Volume(images=images, labels=labels, window=window, raw_dtype=raw_dtype,
                      nonfinite_voxels=sum(nonfinite.values()), **info)
    with replacing(cache) as tmp:
        tmp.mkdir(parents=True)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, full)
        labels = np.lib.format.open_memmap(tmp / "labels.npy", "w+", np.uint8, full) if has_masks else None
        nonfinite = _read_into(images, labels, files, masks, first, window, codes, codes_path)
        for a in (images, labels):
            if a is not None:
                a.flush()
        del images, labels
        (tmp / "volume.json").write_text(json.dumps({"format": CACHE_FORMAT, "window": window, "raw_dtype": raw_dtype,
                                                     "has_labels": has_masks, "nonfinite": nonfinite}))
    return load_volume(data_dir, require_labels, cache_dir)  # reads the cache just written, and warns


def describe_volume(vol):
    """Summary of `vol`: slice count and size, intensity window, NaN/Inf voxel count and per-class pixel fractions."""
    z, h, w = vol.shape
    info = {"source": str(vol.source), "slices": z, "height": h, "width": w, "raw_dtype": vol.raw_dtype,
            "intensity_window": [round(v, 3) for v in vol.window], "nonfinite_voxels": vol.nonfinite_voxels}
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
