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

    If the block fails, the temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if tmp.is_dir() and path.is_dir():  # os.replace cannot replace a folder that holds files
        old = path.with_name(path.name + ".old")
        _remove(old)
        os.replace(path, old)
        os.replace(tmp, path)
        _remove(old)
    else:
        os.replace(tmp, path)


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


def write_label_tiff(path, pages):
    """Write 2D label `pages` (an iterable, consumed one page at a time) as one multi-page TIFF at `path`, atomically."""
    import tifffile
    with replacing(path) as tmp, tifffile.TiffWriter(tmp) as tif:
        for page in pages:
            tif.write(page, **LABEL_PAGE)


def read_label_pages(path):
    """Yield the pages of label TIFF `path` one at a time (a full volume is never held)."""
    import tifffile
    with tifffile.TiffFile(path) as tif:
        for page in tif.pages:
            yield page.asarray()
