"""Small file helpers every other module uses: atomic replace, JSON, label TIFFs.

A run folder lives on Google Drive in Colab, and a session can disconnect at any
moment: every file here is written to a temporary name beside its destination and
renamed over it only when complete, so a reader never sees half a file.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

PREDICTION_RECORD = "prediction.json"  # beside predictions/labels.tif: the checkpoint and options that made it

# One page of a label TIFF: fast zlib, no metadata, so that uniform pages read back as one (Z, H, W) stack.
LABEL_PAGE = {"compression": "zlib", "compressionargs": {"level": 1}, "metadata": None}


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def replacing(path):
    """Yield a temporary path beside `path` (for a file or a folder); when the block succeeds it replaces `path`.

    If the block fails, the temporary is removed and `path` is left as it was. A file is
    replaced in one rename. A folder, which no rename can replace, is swapped in steps: the
    complete new one is renamed `<name>.new`, the old one `<name>.old`, then the new one takes
    its place and the old one is deleted. A kill between the steps leaves `<name>.new`, which
    `settle(path)` (run by the next `replacing` of that path, and by `finish_commit` for the
    folders of a run folder) puts in place. So a reader finds the old complete result or the new one.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    settle(path)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and path.is_dir():  # os.replace cannot replace a folder that holds files
        os.replace(tmp, path.with_name(path.name + ".new"))
        settle(path)
    else:
        os.replace(tmp, path)


def settle(path):
    """Finish the swap of folder `path` by `replacing` that a kill cut (nothing when there is none)."""
    path = Path(path)
    new, old = path.with_name(path.name + ".new"), path.with_name(path.name + ".old")
    if new.is_dir():  # complete: it was renamed so only once written in full
        if path.exists():  # the old one, or an empty folder a reader made meanwhile
            _remove(old)
            os.replace(path, old)
        os.replace(new, path)
    elif old.is_dir() and not path.exists():
        os.replace(old, path)
    _remove(old)


def link_or_copy(src, dst):
    """Hard-link `src` to `dst` (no second copy on a local disk), else copy it (Drive and other file systems without
    hard links). Safe for files that are replaced, never changed in place, as every file written here is."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


STAGE, JOURNAL = ".staging", ".commit.json"  # in a run folder: a result being written, and the moves that commit it


@contextmanager
def staged(folder, remove=()):
    """Yield a staging folder in which one step writes its whole result, at the paths it takes in `folder`
    (`stage / "exports" / "fossils.csv"` for `folder / "exports" / "fossils.csv"`); when the block succeeds, it is
    committed: each entry of `stage/<sub>/` replaces its namesake in `folder/<sub>/`, and the entries of `folder`
    matching the globs in `remove` (the previous result's, such as `"exports/fossil_*"`) that the new result does not
    replace are deleted. Files of `folder` the step does not write (the review) are never touched.

    A kill before the commit leaves the previous result as it was (and the stage is cleared
    by the next call); the commit first writes its list of moves (`folder/.commit.json`,
    atomically), so a kill during it is finished by the next `finish_commit(folder)`, which
    this and every reader of a run folder call first. A reader finds all old or all new.
    """
    folder = Path(folder)
    finish_commit(folder)
    stage = folder / STAGE
    _remove(stage)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        _remove(stage)
        raise
    moves = sorted(p.relative_to(stage).as_posix() for sub in stage.iterdir() for p in sub.iterdir())
    gone = sorted({p.relative_to(folder).as_posix() for pattern in remove for p in folder.glob(pattern)} - set(moves))
    write_json(folder / JOURNAL, {"move": moves, "remove": gone})
    finish_commit(folder)


def finish_commit(folder):
    """Finish the commit of a `staged` result that a kill interrupted in `folder` (nothing when there is none);
    True when there was one. Each move and removal can be done again, so this can itself be interrupted. Also
    settles the folder swaps of `replacing` a kill cut in `folder` (`settle`)."""
    folder = Path(folder)
    for new in folder.glob("*.new"):  # a folder swap of `replacing` (the predictions) cut by a kill
        settle(new.with_suffix(""))
    journal = read_json(folder / JOURNAL)
    if journal is None:
        return False
    stage = folder / STAGE
    try:
        for rel in journal["remove"]:
            _remove(folder / rel)
        for rel in journal["move"]:
            src, dst = stage / rel, folder / rel
            if src.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                _remove(dst)
                os.replace(src, dst)
    except OSError as e:  # a file held open (a spreadsheet on Windows locks what it shows)
        raise OSError(f"{e.filename or folder} could not be replaced ({e.strerror or e}): close it where it is open and "
                      "run the cell again; the new result, complete in "
                      f"{stage}, is then put in place.") from e
    (folder / JOURNAL).unlink()
    _remove(stage)
    return True


def attempt_files(folder, name, suffix):
    """`(n, path)` of each kept attempt `<name>.attempt<n><suffix>` in `folder` (earlier training attempts of a
    phase, see `training.PhaseCheckpoint`), in attempt order."""
    pattern = re.compile(rf"{re.escape(name)}\.attempt(\d+){re.escape(suffix)}")
    found = [(int(m[1]), p) for p in Path(folder).glob(f"{name}.attempt*{suffix}") if (m := pattern.fullmatch(p.name))]
    return sorted(found)


def file_stamp(path):
    """`[size, mtime_ns]` of `path`: which version of a large derived file (`probs.npy`) a record describes, where
    hashing gigabytes would be slow."""
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def write_json(path, obj):
    """Write `obj` as indented JSON to `path`, atomically."""
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def read_json(path, default=None):
    """The JSON in `path`, or `default` when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def write_text(path, text):
    """Write `text` to `path`, atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_csv(path, frame, **kwargs):
    """Write DataFrame `frame` to `path` (no index, 6 significant digits), atomically."""
    with replacing(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g", **kwargs)


def write_label_tiff(path, pages, spacing=None, n_pages=None):
    """Write 2D label `pages` (an iterable, consumed one page at a time) as one multi-page TIFF at `path`, atomically.

    With `spacing` ((z, y, x) µm) and `n_pages`, the file is an ImageJ stack carrying the voxel size (its resolution and
    spacing, unit µm), so that Fiji, napari and 3D Slicer open it to scale; 8 and 16-bit labels (ImageJ's)."""
    import itertools

    import tifffile
    pages = iter(pages)
    first = next(pages, None)
    imagej = first is not None and spacing is not None and bool(n_pages) and first.dtype in (np.uint8, np.uint16)
    with replacing(path) as tmp, tifffile.TiffWriter(tmp, imagej=imagej) as tif:
        if imagej:
            tif.write(itertools.chain([first], pages), shape=(n_pages, *first.shape), dtype=first.dtype,
                      resolution=(1 / spacing[2], 1 / spacing[1]), compression="zlib", compressionargs={"level": 1},
                      metadata={"spacing": spacing[0], "unit": "um", "axes": "ZYX"})
        elif first is not None:
            for page in itertools.chain([first], pages):
                tif.write(page, **LABEL_PAGE)


def label_stack(path):
    """`((slices, height, width), voxel size)` of label TIFF `path`, from its headers: the voxel size (z, y, x) in µm
    it carries (`write_label_tiff`), or None."""
    import tifffile
    with tifffile.TiffFile(path) as t:
        shape = (len(t.pages), *t.pages[0].shape)
        ij, xres = t.imagej_metadata or {}, t.pages[0].tags.get("XResolution")
        if ij.get("unit") != "um" or xres is None:
            return shape, None
        y = t.pages[0].tags["YResolution"].value
        return shape, (float(ij.get("spacing", 1.0)), y[1] / y[0], xres.value[1] / xres.value[0])


def read_label_pages(path):
    """Yield the pages of label TIFF `path` one at a time (a full volume is never held)."""
    import tifffile
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            yield page.asarray()
