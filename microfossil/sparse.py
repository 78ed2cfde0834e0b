"""Sparse labels: a core of which a person labelled some slices, or left pixels of a labelled slice unlabelled.

Two run settings, typed in 01 (README, "Label your own core"):

- `sparse_labels`: False (the default): every slice has labels, and a missing mask is an error naming it. True: a
  slice with no mask file is unlabelled, and where one label file holds several slices (a label volume saved from
  napari, Fiji or 3D Slicer, or `labels_path`), its slices holding no label at all (all 0) are unlabelled. A list of
  slice numbers (z, from 0): those slices are labelled, every other one is unlabelled whatever its mask holds.
- `unlabelled_value`: None, or a value from 1 to 255 that no line of codes.txt names (e.g. 255): the pixels of that
  value in a mask are unlabelled (a labelled slice with parts left out).

Unlabelled voxels hold `UNLABELLED` in the volume's labels: no loss and no score counts them (`metrics.IGNORE` is the
same value), no specimen is made of them, and unlabelled slices still serve as image: context slices, the XZ and YZ
cuts of tri-planar training (whose rows from unlabelled slices count in no loss). `Volume.labelled` says which slices
hold labels; the split lays its blocks over those (`split.split_volume`).
"""
from __future__ import annotations

import numpy as np

from .readers import DatasetError

UNLABELLED = 255  # a label value no loss and no score counts


def fossil_voxels(labels):
    """Boolean array: the voxels of `labels` labelled as a fossil class (neither background nor unlabelled)."""
    labels = np.asarray(labels)
    return (labels > 0) & (labels != UNLABELLED)


def check_sparse(sparse_labels, unlabelled_value, codes, codes_path, n_slices):
    """`sparse_labels` as a bool or a sorted array of slice numbers, after checking both settings against `codes` and
    the scan's `n_slices`."""
    if unlabelled_value is not None:
        if isinstance(unlabelled_value, bool) or not isinstance(unlabelled_value, (int, np.integer)) \
                or not 1 <= unlabelled_value <= 255:
            raise ValueError(f"unlabelled_value={unlabelled_value!r}: use None, or the mask value (1 to 255) of pixels "
                             "left unlabelled, e.g. 255.")
        if codes is not None and unlabelled_value < len(codes):
            raise DatasetError(f"unlabelled_value={unlabelled_value} is the label of class {codes[unlabelled_value]!r} "
                               f"in {codes_path}: use a value no class has (e.g. 255), or remove that line.")
    if isinstance(sparse_labels, (bool, np.bool_)) or sparse_labels is None:
        return bool(sparse_labels)
    try:
        zs = np.asarray(sorted({int(z) for z in sparse_labels}), np.int64)
    except (TypeError, ValueError):
        raise ValueError(f"sparse_labels={sparse_labels!r}: use False (every slice labelled), True (the slices with "
                         "a mask, or with any label in a label volume) or a list of the labelled slice numbers."
                         ) from None
    if not len(zs) or zs[0] < 0 or zs[-1] >= n_slices:
        raise ValueError(f"sparse_labels={sparse_labels!r}: a list of labelled slice numbers must name at least one, "
                         f"each from 0 to {n_slices - 1} (the scan has {n_slices} slices; slice numbers count from 0, "
                         "where Fiji counts from 1: subtract 1 from Fiji's).")
    return zs


def check_labelled(labelled, has_masks, data_dir):
    """Stop when a scan with labels has no labelled slice at all."""
    if has_masks and not np.any(labelled):
        raise DatasetError(f"No slice of {data_dir} holds a label: with sparse labels, label at least a few slices "
                           "(README, \"Label your own core\"), or point labels_path at the labels.")


def label_pages(files, masks):
    """Yield `(mask part or None, label page or None)` for each slice of the scan `files`: `masks` either one label
    page per slice in z order (its pages as they come), or one entry per file of `files`, None for a file with no
    mask (sparse labels: each of that file's slices yields `(None, None)`)."""
    if any(m is None for m in masks):
        for f, m in zip(files, masks):
            if m is not None and len(m) != len(f):
                raise DatasetError(f"{m} holds {len(m)} label slice(s) but its image {f} has {len(f)}: a mask must "
                                   "match its image slice for slice.")
            yield from (((None, None) for _ in range(len(f))) if m is None else
                        ((m, page) for page in m.pages(labels=True)))
        return
    for m in masks:
        yield from ((m, page) for page in m.pages(labels=True))


def mark_unlabelled(lab, z, mask, sparse, unlabelled_value, one_file_per_slice):
    """Label page `lab` of slice `z` (from `mask`, None: no mask file) with its unlabelled voxels set to `UNLABELLED`,
    and whether the slice is labelled at all (see the module's docstring)."""
    if mask is None:
        return UNLABELLED, False
    if unlabelled_value is not None and unlabelled_value != UNLABELLED:
        lab = np.where(lab == unlabelled_value, UNLABELLED, lab)
    if isinstance(sparse, np.ndarray):
        labelled = bool(np.isin(z, sparse))
    else:
        labelled = not sparse or one_file_per_slice or bool(np.any((lab != 0) & (lab != UNLABELLED)))
    if labelled and unlabelled_value is not None and np.all(lab == UNLABELLED):
        labelled = False
    return (lab if labelled else UNLABELLED), labelled


def describe_labelled(labelled):
    """A line on which slices hold labels (`Volume.labelled`), e.g. '12 of 300 slices labelled: 0, 25, 50 ... 275'."""
    zs = np.flatnonzero(labelled)
    if len(zs) == len(labelled):
        return f"every slice labelled ({len(zs)})"
    shown = ", ".join(str(int(z)) for z in zs[:8]) + (f" ... {int(zs[-1])}" if len(zs) > 8 else "")
    return f"{len(zs)} of {len(labelled)} slices labelled: {shown}"
