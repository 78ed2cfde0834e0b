"""The held-out split: a training block, a gap, and a held-out block that shares no specimen with training.

Slices are split in z order, never at random: neighbouring slices are nearly identical, so a
random split would score the model on slices it has as good as seen. The last `valid_pct`
of the slices is the held-out block. A specimen is 3D: one that reaches across the boundary
would be trained on in one block and scored in the other, so a gap of slices that are neither
trained on nor scored is left between the blocks. By default (`gap_slices=None`) the gap is
just wide enough that no annotated specimen (a 3D component of the labelled fossil voxels)
lies in both blocks, at most as wide as the held-out block. A specimen taller than that still
reaches both; its voxels in the held-out block are then left out of every held-out score, and
the split says how many.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .specimens import label_components
from .volume import DatasetError

CONNECTIVITY = 26  # the extraction's default: a specimen is the same object here and there


@dataclass(frozen=True)
class Split:
    """Slices `[0, n_train)` train, `[n_train, valid_start)` are the gap, `[valid_start, n_slices)` are held out."""
    n_slices: int
    n_train: int
    valid_start: int
    valid_pct: float
    gap_rule: str
    left_out: dict = field(default_factory=dict)  # specimens reaching both blocks: count, held-out voxels, by class

    @property
    def train(self): return np.arange(self.n_train)

    @property
    def gap(self): return np.arange(self.n_train, self.valid_start)

    @property
    def valid(self): return np.arange(self.valid_start, self.n_slices)

    def plan(self):
        """The split as a training plan records it (inclusive slice ranges)."""
        rng = lambda a, b: [int(a), int(b) - 1] if b > a else []  # noqa: E731
        return {"train_slices": rng(0, self.n_train), "gap_slices": int(self.valid_start - self.n_train),
                "valid_slices": rng(self.valid_start, self.n_slices)}


def _n_valid(n_slices, valid_pct):
    if not 0 <= valid_pct < 1:
        raise ValueError(f"valid_pct must be in [0, 1), got {valid_pct}")
    return max(1, int(round(n_slices * valid_pct))) if valid_pct > 0 else 0


def split_slices(n_slices, valid_pct=0.2, gap_slices=0):
    """`(train, valid)` slice indices: the last `valid_pct` of z held out, `gap_slices` before it in neither."""
    n_valid = _n_valid(n_slices, valid_pct)
    n_train = n_slices - n_valid - (int(gap_slices) if n_valid else 0)
    if n_train < 1:
        raise DatasetError(f"Only {n_slices} slice(s): need at least one training slice besides the {n_valid} "
                           f"held-out slice(s) and a gap of {gap_slices}. Lower valid_pct or gap_slices, or add slices.")
    return np.arange(n_train), np.arange(n_slices - n_valid, n_slices)


def _straddling(labels, n_train, valid_start, connectivity=CONNECTIVITY):
    """Boolean mask over the held-out block of the labelled specimens that also reach the training block.

    A specimen reaching both blocks crosses the last training slice, so the components of
    `labels[n_train - 1:]` are enough: those in its first slice and in the held-out block.
    """
    n = len(labels)
    if n_train < 1 or valid_start >= n:
        return np.zeros((n - valid_start, *labels.shape[1:]), bool)
    cc, k, _, _ = label_components(np.asarray(labels[n_train - 1:]) > 0, connectivity)
    held = cc[valid_start - n_train + 1:]
    ids = np.intersect1d(np.unique(cc[0]), np.unique(held))
    ids = ids[ids > 0]
    return np.isin(held, ids) if len(ids) else np.zeros(held.shape, bool)


def _auto_gap(labels, valid_start, cap, connectivity=CONNECTIVITY):
    """The narrowest gap (at most `cap`) after which no labelled specimen reaching the held-out block starts in the
    training block; `(gap, needed)` where `needed` is None when a specimen is taller than `cap` allows."""
    top = max(0, valid_start - cap - 1)
    cc, k, _, boxes = label_components(np.asarray(labels[top:]) > 0, connectivity)
    needed = 0
    for i in range(1, k + 1):
        z = boxes[i][0]
        if z.stop + top > valid_start and z.start + top < valid_start:  # reaches the held-out block from above
            if z.start == 0 and top > 0:
                return cap, None
            needed = max(needed, valid_start - (z.start + top))
    return min(needed, cap), needed


def split_volume(vol, valid_pct=0.2, gap_slices=None, connectivity=CONNECTIVITY):
    """The `Split` of `vol`: the last `valid_pct` of its slices held out, `gap_slices` between (None: the auto rule
    of the module's docstring, from `vol.labels`; 0 without labels), and what is left out of the held-out scores."""
    Z = len(vol.images)
    n_valid = _n_valid(Z, valid_pct)
    v0 = Z - n_valid
    labels = vol.labels
    if n_valid == 0:
        gap, rule = 0, "no held-out block (valid_pct=0)"
    elif gap_slices is not None:
        if not isinstance(gap_slices, (int, np.integer)) or gap_slices < 0:
            raise ValueError(f"gap_slices must be None (automatic) or a whole number >= 0, not {gap_slices!r}")
        gap, rule = int(gap_slices), "the parameter gap_slices"
    elif labels is None:
        gap, rule = 0, "no labels, no specimen to keep apart"
    else:
        gap, needed = _auto_gap(labels, v0, max(0, min(n_valid, v0 - 1)), connectivity)
        rule = ("automatic: the narrowest that keeps every labelled specimen in one block" if needed is not None
                and needed <= gap else f"automatic, capped at {gap} slices (the held-out block's height or the "
                "training block's): a taller specimen still reaches both blocks")
    split_slices(Z, valid_pct, gap)  # checks that a training slice is left
    n_train = v0 - gap
    left = {"specimens": 0, "voxels": 0, "by_class": {}}
    if labels is not None and n_valid:
        mask = _straddling(labels, n_train, v0, connectivity)
        if mask.any():
            lab = np.asarray(labels[v0:])[mask]
            counts = np.bincount(lab, minlength=len(vol.codes or []))
            n_spec = label_components(mask, connectivity)[1]
            left = {"specimens": int(n_spec), "voxels": int(mask.sum()),
                    "by_class": {str(c): int(v) for c, v in zip(vol.codes, counts) if v}}
    return Split(Z, n_train, v0, float(valid_pct), rule, left)


def whole_volume_held_out(vol):
    """The `Split` of a scan the model never trained on (a model from another volume): every slice held out."""
    return Split(len(vol.images), 0, 0, 1.0, "the model was trained on another volume: every slice is held out")


def left_out_mask(vol, split, connectivity=CONNECTIVITY):
    """Boolean mask over the held-out block: the voxels of labelled specimens that also reach the training block."""
    return _straddling(vol.labels, split.n_train, split.valid_start, connectivity)


def describe_split(split):
    """A few lines on `split`: the three blocks and what the held-out scores leave out."""
    def block(name, a, b):
        return f"{name} slices {a}-{b - 1} ({b - a})" if b > a else f"no {name} slices"
    gap = split.valid_start - split.n_train
    lines = [block("training", 0, split.n_train) + ", " + (block("gap", split.n_train, split.valid_start) if gap else
                                                          "no gap") + ", " + block("held-out", split.valid_start,
                                                                                   split.n_slices),
             f"gap: {gap} slices, {split.gap_rule}"]
    lo = split.left_out
    if lo.get("specimens"):
        lines.append(f"left out of the held-out scores: {lo['specimens']} specimen(s) reaching both blocks, "
                     f"{lo['voxels']} held-out voxels ({', '.join(f'{c} {v}' for c, v in lo['by_class'].items())})")
    else:
        lines.append("no labelled specimen lies in both blocks")
    return "\n".join(lines)


def check_split(split, info, model_name="the model"):
    """Stop when `split` (this notebook's) is not the split `info` (a training record) was trained with: the held-out
    scores would then include slices the model trained on, or leave out some it never saw."""
    rec_valid = info.get("valid_slices")
    if rec_valid is None:
        return  # a checkpoint from before the split was recorded
    rec_train = info.get("train_slices") or ([0, rec_valid[0] - 1] if rec_valid else None)
    mine = split.plan()
    if [list(rec_train or []), list(rec_valid)] != [mine["train_slices"], mine["valid_slices"]]:
        raise ValueError(
            f"{model_name} was trained on slices {rec_train} and validated on {rec_valid}, but this notebook's split "
            f"(valid_pct={split.valid_pct}, gap {mine['gap_slices']}) trains on {mine['train_slices']} and holds out "
            f"{mine['valid_slices']}: its held-out scores would not be honest. Use the valid_pct and gap_slices of the "
            "training notebooks (02-04), or train again with these.")
