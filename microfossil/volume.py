"""Reading and validating a scan: its slices, their labels, `codes.txt` and the voxel size, into one uint8 volume.

A scan is what `scans.scan_parts` finds (README, "Your data"): the published layout (`train/` + `train_masks_labels/
<stem>_GT<ext>` + `codes.txt`), any folder of slices, a DICOM series or one volume file (TIFF stack, MetaImage, NRRD,
NIfTI, HDF5), with labels by the `_GT` convention or `labels_path`. Slices may be 1, 8 or 16 bit or float, all of
one bit depth; labels single-channel integers (a colour mask is refused), one per voxel, with a line of `codes.txt`
(line index = label value, line 0 = the background) for each. A truncated file is refused. NaN and Inf voxels of float
scans are left out of the intensity window, shown as 0 and counted. Text files may be UTF-8 (with or without BOM),
UTF-16 with a BOM, or Windows-1252/Latin-1. The scan is only ever read.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import re
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .io import replacing
from .readers import DatasetError, Part  # noqa: F401  (DatasetError: the package's name for a user's data problem)
from .runtime import file_digest
from .scans import metadata_voxel_size, scan_parts
from .sparse import UNLABELLED, check_labelled, check_sparse, describe_labelled, label_pages, mark_unlabelled

VOXEL_SIZE_FILE = "voxel_size.txt"
NO_VOXEL_SIZE = ("the default: no voxel_size_um, no voxel_size.txt and no voxel size in the scan's metadata, so sizes "
                 "are in voxels")
CACHE_FORMAT = 5  # raised when decoding changes (2: NaN/Inf voxels, colour at its bit depth; 3: keyed on the content,
#                   any format; 4: the label files' digest, so an edit is seen; 5: sparse labels); older caches rebuild


def evenly_spaced(length, n):
    """About `n` indices of `range(length)`, evenly spaced from the first to the last (all of them when `length` is
    `n` or less), ascending, each once: the slices a preview, a histogram or a calibration looks at."""
    return np.unique(np.linspace(0, length - 1, min(n, length)).round().astype(int))


@dataclass
class Volume:
    """A CT volume: `images` (Z,H,W) uint8 after intensity windowing, `labels` (Z,H,W) or None, class names `codes`;
    `labelled` (Z,) bool, the slices that hold labels (all of them unless labels are sparse: `sparse`), or None."""
    images: np.ndarray
    labels: np.ndarray | None
    codes: list
    stems: list
    source: Path
    window: tuple = (0.0, 255.0)
    raw_dtype: str = "uint8"
    files: list = field(default_factory=list, repr=False)
    nonfinite_voxels: int = 0  # NaN or Inf voxels of a float scan, shown as 0
    dataset: str | None = None  # the HDF5 dataset of the scan (`h5_dataset`), when its file has several
    labelled: np.ndarray | None = None

    def __post_init__(self):
        if self.labels is not None and self.labelled is None:
            self.labelled = np.ones(len(self.labels), bool)

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


def read_voxel_size(data_dir=None, voxel_size_um=None, h5_dataset=None):
    """Voxel size `(z, y, x)` in µm and where it came from: `voxel_size_um`, else `voxel_size.txt` in the scan's folder
    (beside the file when `data_dir` is a volume file), else the scan's own metadata (`scans.metadata_voxel_size`:
    ImageJ/OME TIFF, a SkyScan `.log`, MetaImage, NRRD, NIfTI, DICOM, HDF5), else 1.0 (sizes in voxels).

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
    folder = None if data_dir is None else Path(data_dir) if Path(data_dir).is_dir() else Path(data_dir).parent
    path = folder / VOXEL_SIZE_FILE if folder is not None else None
    if path is not None and path.is_file():
        text = " ".join(line.split("#")[0] for line in _read_text(path).splitlines())
        try:
            values = [float(t) for t in _number_words(text)]
        except ValueError:
            values = text.strip()
        return check(values, str(path)), str(path)
    found = metadata_voxel_size(data_dir, h5_dataset) if data_dir is not None and Path(data_dir).exists() else None
    if found:
        return found
    return (1.0, 1.0, 1.0), NO_VOXEL_SIZE


def known_voxel_size(data_dir, voxel_size_um=None, h5_dataset=None):
    """`read_voxel_size`'s voxel size `(z, y, x)` in µm, or None when none is known (sizes in voxels): what the label
    volumes written carry."""
    size, source = read_voxel_size(data_dir, voxel_size_um, h5_dataset)
    return None if source == NO_VOXEL_SIZE else size


def _number_words(text):
    """The numbers of `text` as strings, by the decimal-comma rule of `read_voxel_size`."""
    words = []
    for word in re.split(r"[\s;]+", text):
        word = word.strip(",")
        words += [word.replace(",", ".")] if re.fullmatch(r"[+-]?\d+,\d+", word) else [w for w in word.split(",") if w]
    return words


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


def _cache_key(parts, extra=""):
    """What identifies the scan of file `parts` wherever it lies (a copy, a re-unzip, a new runtime): each file's name
    and size, and the SHA-1 of three 4 KiB blocks (start, middle, end) of about 32 of them, evenly spaced; not the
    folder's path nor the files' times."""
    h = hashlib.sha1(extra.encode())
    for p in parts:
        h.update(f"{p.name}:{p.stat().st_size};".encode())
    for k in evenly_spaced(len(parts), 32):
        size = parts[k].stat().st_size
        with open(parts[k].path, "rb") as fh:
            for at in sorted({0, max(0, size // 2 - 2048), max(0, size - 4096)}):
                fh.seek(at)
                h.update(fh.read(4096))
    return h.hexdigest()[:16]


def _label_stats(masks):
    """Each label file's name, size and modification time, for the cache's record (`_labels_edited`)."""
    return [[m.name, st.st_size, st.st_mtime_ns] for m in masks or [] for st in [m.stat()]]


def _label_record(masks):
    """The cache's record of the label files: their stats and the SHA-256 of each one's bytes. Labels are what a
    person edits, in place and at the same size, where the sampled cache key does not see it."""
    return {"label_files": _label_stats(masks), "label_digests": [file_digest(m.path) for m in masks or []]}


def _labels_edited(cache, masks, kept):
    """True (and the cache and its kept copy removed) when a label file was edited since cache `cache` was made: its
    time or size changed and its bytes did too (a copy with new times but the same bytes is the same labels)."""
    meta = json.loads((cache / "volume.json").read_text())
    stats = _label_stats(masks)
    if not masks or "label_digests" not in meta or stats == meta["label_files"]:
        return False
    if [file_digest(m.path) for m in masks] == meta["label_digests"]:  # the same labels, copied: noted for next time
        (cache / "volume.json").write_text(json.dumps({**meta, "label_files": stats}))
        return False
    print(f"The labels changed since the cache {cache.name} was made: reading the scan again.")
    for d in (cache, None if kept is None else Path(kept) / cache.name):
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
    return True


def _cache_name(source):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source).name)[:40] or "scan"


def _valid(cache):
    meta = cache / "volume.json"
    return meta.is_file() and json.loads(meta.read_text()).get("format") == CACHE_FORMAT


def _copy_cache(src, dst, to_kept):
    """Copy cache folder `src` to `dst`, whole or not at all: to the kept copy (`to_kept`) with the labels
    gzip-compressed (mostly background, they shrink a hundredfold), back from it decompressed (`io.replacing`)."""
    import gzip
    dst.parent.mkdir(parents=True, exist_ok=True)
    with replacing(dst) as tmp:
        tmp.mkdir()
        for f in sorted(src.iterdir()):
            if to_kept and f.name == "labels.npy":
                with open(f, "rb") as fin, gzip.open(tmp / "labels.npy.gz", "wb", compresslevel=1) as fout:
                    shutil.copyfileobj(fin, fout, 1 << 22)
            elif not to_kept and f.name == "labels.npy.gz":
                with gzip.open(f, "rb") as fin, open(tmp / "labels.npy", "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 22)
            else:
                shutil.copyfile(f, tmp / f.name)


def _drop_stale(cache_dir, name, keep):
    """Remove the caches in `cache_dir` of scan `name` but `keep` (an earlier content of the scan), and those of
    an older cache format: one cache per scan."""
    for d in Path(cache_dir).iterdir():
        if d.is_dir() and d.name != keep and (d / "volume.json").is_file():
            meta = json.loads((d / "volume.json").read_text())
            if meta.get("format") != CACHE_FORMAT or meta.get("scan") == name:
                shutil.rmtree(d, ignore_errors=True)


def _slice_names(files, counts):
    """The name of each slice: its file's stem, `<stem>_0000`... for a multi-page file; each name used once."""
    owner = {}
    for f, n in zip(files, counts):
        for stem in [f.stem] if n == 1 else [f"{f.stem}_{k:04d}" for k in range(n)]:
            if stem in owner:
                raise DatasetError(f"{owner[stem]} and {f} both give slice {stem!r}, so one slice's outputs would "
                                   "overwrite the other's. Keep one of them and remove or rename the other.")
            owner[stem] = f
    return list(owner)


def _check_mask_page(lab, m, codes, codes_path, unlabelled_value=None):
    if np.issubdtype(lab.dtype, np.floating) and not np.array_equal(lab, np.round(lab)):
        raise DatasetError(f"{m} holds non-integer values; masks must hold integer class labels.")
    top = lab.max() if unlabelled_value is None else np.where(lab == unlabelled_value, 0, lab).max()
    if lab.min() < 0 or top >= len(codes):
        bad = int(top) if top >= len(codes) else int(lab.min())
        hint = f" If {bad} marks pixels left unlabelled, set unlabelled_value={bad} in 01's parameters cell." \
            if bad > 0 and unlabelled_value is None else ""
        raise DatasetError(f"{m} holds label {bad}, but {codes_path} lists only {len(codes)} classes "
                           f"(labels 0..{len(codes) - 1}). Add a line for it to codes.txt or fix the mask.{hint}")


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


def _pages_of(parts, labels=False):
    """Yield `(part, page)` for every slice of `parts` in z order."""
    for part in parts:
        for page in part.pages(labels=labels):
            yield part, page


def _read_into(images, labels, files, masks, first, window, codes, codes_path, sparse=False, unlabelled_value=None,
               labelled=None):
    """Decode every slice (and label slice) into the preallocated `images` (and `labels`, with `labelled` the slices
    that hold labels: `sparse.mark_unlabelled`), checking each against `first`, the first slice, as it comes. Returns
    the number of NaN or Inf voxels of each file that has any."""
    nonfinite, shape, n = {}, first.shape, len(images)
    pages = label_pages(files, masks) if labels is not None else None
    for z, (f, page) in enumerate(_pages_of(files)):
        _check_page(page, f, first, files[0])
        images[z] = _to_uint8(page, window)
        nonfinite[f.name] = nonfinite.get(f.name, 0) + _n_nonfinite(page)
        if pages is None:
            continue
        m, lab = next(pages, (masks[-1], False))
        if m is None:  # (sparse labels) a slice with no mask file
            labels[z], labelled[z] = UNLABELLED, False
            continue
        if lab is False:
            raise DatasetError(f"{_names(masks)} hold(s) {z} label slice(s) but the scan {_names(files)} has {n}: "
                               "the labels must match the scan slice for slice.")
        if lab.shape != shape:
            raise DatasetError(f"{m} does not match its image {f} ({lab.shape[0]}x{lab.shape[1]} against "
                               f"{shape[0]}x{shape[1]}, HxW): a mask must match its slice pixel for pixel.")
        if not isinstance(sparse, np.ndarray) or z in sparse:  # (a slice the list leaves out: whatever it holds)
            _check_mask_page(lab, m, codes, codes_path, unlabelled_value)
        labels[z], labelled[z] = mark_unlabelled(lab, z, m, sparse, unlabelled_value, len(m) == 1)
    if pages is not None and next(pages, None) is not None:
        raise DatasetError(f"{_names(masks)} hold(s) more label slices than the scan {_names(files)} has ({n}): "
                           "the labels must match the scan slice for slice.")
    return {name: k for name, k in nonfinite.items() if k}


def _names(parts):
    parts = [p for p in parts if p is not None]
    return str(parts[0]) if len(parts) == 1 else f"{parts[0].parent}/ ({len(parts)} files)"


def load_volume(data_dir, require_labels=True, cache_dir=None, labels_path=None, h5_dataset=None, sparse_labels=False,
                unlabelled_value=None):
    """Load and validate the scan at `data_dir` (a folder or a volume file, `scans.scan_parts`) into a `Volume`; never
    writes to it.

    Raises `DatasetError` naming the file and the fix for: no images, a missing mask,
    image/mask size mismatch, a label with no line in codes.txt, an unreadable or truncated
    file, a compression that needs imagecodecs, slices of different sizes or bit depths, two
    files giving one slice name, a colour mask, a float scan with no finite voxel, a header whose
    data file is missing, an HDF5 file with no 3D dataset or several and no `h5_dataset`, two DICOM
    series in one folder. NaN and Inf voxels are counted in `Volume.nonfinite_voxels` and printed
    as a warning (on every load, cached or not). With `require_labels=False` a scan without labels
    gives `labels=None` (prediction on new scans). Slices are read one at a time into one
    preallocated uint8 array. With `cache_dir`, that array is a `.npy` file there, keyed on the
    scan's content (`_cache_key`), and later calls on the same scan, wherever it lies, memory-map
    it instead of decoding the images again (volumes larger than RAM work); one cache per scan.

    `sparse_labels` and `unlabelled_value`: which slices and pixels hold no label (`sparse`); `Volume.labelled`.
    """
    data_dir = Path(data_dir)
    files, masks, codes_path, left_out = scan_parts(data_dir, require_labels, labels_path, h5_dataset,
                                                    sparse=sparse_labels is not False)
    if left_out:
        print(f"Left out of the scan in {data_dir}: {', '.join(p.name for p in left_out[:5])}"
              f"{' ...' if len(left_out) > 5 else ''} (not named like its {len(files)} slices).")
    has_masks = masks is not None
    present = [m for m in masks or [] if m is not None]  # (sparse labels: None for a slice with no mask file)
    codes = read_codes(codes_path) if (has_masks or codes_path.exists()) else None
    counts = [len(f) for f in files]
    stems = _slice_names(files, counts)
    sparse = check_sparse(sparse_labels, unlabelled_value, codes, codes_path, len(stems))
    info = dict(codes=codes, stems=stems, source=data_dir, files=files, dataset=h5_dataset)

    cache, kept = None, None
    if isinstance(cache_dir, (tuple, list)):  # (the cache, a kept copy of it for the next runtime: `cache_dirs`)
        cache_dir, kept = cache_dir
    if cache_dir is not None:
        key = _cache_key(files + present + ([Part(codes_path)] if codes_path.exists() else []),
                         f"{h5_dataset}:{has_masks}:{sparse_labels}:{unlabelled_value}")
        cache = Path(cache_dir) / f"{_cache_name(data_dir)}-{key}"
        if kept is not None and not _valid(cache) and _valid(Path(kept) / cache.name):
            _copy_cache(Path(kept) / cache.name, cache, to_kept=False)
            _drop_stale(cache_dir, _cache_name(data_dir), cache.name)
        if _valid(cache) and not _labels_edited(cache, present, kept):
            return _open_cache(cache, kept, data_dir, info)

    # the intensity window comes from a sample of about 32 slices spread over z
    first = next(files[0].pages())
    raw_dtype = str(first.dtype)
    sampled = list(zip(files, counts))[::max(1, len(files) // 32)]
    sample = [first] if first.dtype == np.uint8 else [p for f, n in sampled for p in f.pages(max(1, n // 32))]
    window = _window_of(sample, [f for f, _ in sampled])
    del sample
    full, labelled = (len(stems), *first.shape), np.ones(len(stems), bool)
    if cache is None:
        images = np.empty(full, np.uint8)
        labels = np.empty(full, np.uint8) if has_masks else None
        nonfinite = _read_into(images, labels, files, masks, first, window, codes, codes_path, sparse,
                               unlabelled_value, labelled)
        _warn_nonfinite(nonfinite, data_dir)
        check_labelled(labelled, has_masks, data_dir)
        return Volume(images=images, labels=labels, window=window, raw_dtype=raw_dtype,
                      nonfinite_voxels=sum(nonfinite.values()), labelled=labelled if has_masks else None, **info)
    with replacing(cache) as tmp:
        tmp.mkdir(parents=True)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, full)
        labels = np.lib.format.open_memmap(tmp / "labels.npy", "w+", np.uint8, full) if has_masks else None
        nonfinite = _read_into(images, labels, files, masks, first, window, codes, codes_path, sparse,
                               unlabelled_value, labelled)
        check_labelled(labelled, has_masks, data_dir)
        for a in (images, labels):
            if a is not None:
                a.flush()
        del images, labels
        (tmp / "volume.json").write_text(json.dumps({"format": CACHE_FORMAT, "scan": _cache_name(data_dir),
                                                     "window": window, "raw_dtype": raw_dtype,
                                                     "has_labels": has_masks, "nonfinite": nonfinite,
                                                     "unlabelled_slices": np.flatnonzero(~labelled).tolist(),
                                                     **_label_record(present)}))
    _drop_stale(cache_dir, _cache_name(data_dir), cache.name)
    return _open_cache(cache, kept, data_dir, info)


def _open_cache(cache, kept, data_dir, info):
    """The `Volume` of valid cache folder `cache`, memory-mapped (its copy written to `kept` first when that has
    none); warns of its NaN and Inf voxels, as a decoding does."""
    if kept is not None and not _valid(Path(kept) / cache.name):
        _copy_cache(cache, Path(kept) / cache.name, to_kept=True)
        _drop_stale(kept, _cache_name(data_dir), cache.name)
    meta = json.loads((cache / "volume.json").read_text())
    _warn_nonfinite(meta["nonfinite"], data_dir)
    labelled = None if not meta["has_labels"] else ~np.isin(np.arange(len(info["stems"])), meta["unlabelled_slices"])
    return Volume(images=np.load(cache / "images.npy", mmap_mode="r"), labelled=labelled,
                  labels=np.load(cache / "labels.npy", mmap_mode="r") if meta["has_labels"] else None,
                  window=tuple(meta["window"]), raw_dtype=meta["raw_dtype"],
                  nonfinite_voxels=sum(meta["nonfinite"].values()), **info)


def describe_volume(vol):
    """Summary of `vol`: slice count and size, intensity window, NaN/Inf voxel count, per-class pixel fractions (of the
    labelled pixels) and which slices hold labels."""
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
        info["labelled_slices"] = describe_labelled(vol.labelled)
    return info
