"""The split: a validation block, a training block and a test block, which share no specimen.

Slices are split in z order, never at random: neighbouring slices are nearly identical, so a
random split would score the model on slices it has as good as seen. From the top of the scan down:

    validation block | gap | training block | gap | test block

- the **test block** is the last `test_pct` of the slices. Only 05 scores it, and nothing that
  chooses (a per-epoch score, `lr_find`, the attempts table, a threshold) ever reads it;
- the **validation block** is the first `valid_pct` of the slices. fastai validates on it every
  epoch: the per-epoch scores, the training curves and the attempts table that a user compares
  learning rates with are all on it. It sits at the other end of the scan from the test block, so
  that both are ends of the scan alike, and the specimens the scan's top cuts off count as they are.
  `valid_pct=0` is the published recipe: fastai validates on the test block itself, and every
  per-epoch score then says so;
- a **gap** of slices that are neither trained on, validated nor scored lies between the training
  block and each of the others. A specimen is 3D: one that reaches across a boundary would be
  seen in one block and scored in the other. By default (`gap_slices=None`) each gap is just wide
  enough that no annotated specimen (a 3D component of the labelled fossil voxels) lies in two
  blocks, at most as wide as the block it guards. A specimen taller than that still reaches both;
  its voxels in the validation or test block are then left out of that block's scores (per-epoch
  and test alike), and the split says how many.

With sparse labels (`sparse`: some slices unlabelled) the blocks are laid out as above over the labelled span (the
first labelled slice to the last), and each holds labelled slices: training takes only those, and scores count only
labelled voxels. A specimen cannot be followed through unlabelled slices, so the automatic gaps also keep the labelled
slices of two blocks at least as far apart as the widest fossil outline in the labels (fossils are about as tall as
they are wide). A validation block with no labelled slice gives way to validating on the test block; with too few
labelled slices for a test block, every labelled slice trains and validates, and no held-out score is reported
(`Split.held_out` False).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .sparse import fossil_voxels
from .specimens import label_components
from .volume import DatasetError, evenly_spaced, same_scan

MIN_TRAINING_SLICES = 2  # sparse labels: fewer labelled training slices than this, and nothing is held out
CONNECTIVITY = 26  # the extraction's default: a specimen is the same object here and there
PUBLISHED_VALIDATION = "the test block (valid_pct=0, the published recipe): not an unseen score"


@dataclass(frozen=True)
class Split:
    """Slices `[valid_start, valid_stop)` validate, `[train_start, train_stop)` train, `[test_start, n_slices)` are the
    test block; the slices between are the gaps. With `valid_pct=0` (the published recipe) the validation block is the
    test block (`published`)."""
    n_slices: int
    train_start: int
    train_stop: int
    valid_start: int
    valid_stop: int
    test_start: int
    test_pct: float
    valid_pct: float
    gap_rule: str  # the gap before the test block
    valid_gap_rule: str = ""  # the gap after the validation block
    left_out: dict = field(default_factory=dict)  # test: specimens also on the training side, their voxels, by class
    valid_left_out: dict = field(default_factory=dict)  # validation: specimens also in the training block
    class_voxels: dict = field(default_factory=dict)  # {"validation": {class: voxels}, "test": {...}}, with labels
    gap_slices: int | None = None  # as asked for (None: automatic): a fit cell checks the parameters cell against it
    labelled: dict = field(default_factory=dict)  # sparse labels: {block: labelled slices in it}

    @property
    def published(self): return self.valid_stop > self.valid_start and self.valid_start == self.test_start

    @property
    def held_out(self): return self.test_start < self.n_slices

    @property
    def train(self): return np.arange(self.train_start, self.train_stop)

    @property
    def valid(self): return np.arange(self.valid_start, self.valid_stop)

    @property
    def test(self): return np.arange(self.test_start, self.n_slices)

    def plan(self):
        """The blocks as a training plan and `metrics.json` record them (inclusive slice ranges; [] for none)."""
        return {"train_slices": _rng(self.train_start, self.train_stop),
                "valid_slices": _rng(self.valid_start, self.valid_stop), "test_slices": _rng(self.test_start, self.n_slices)}

    def record(self):
        """Everything about the split, for a record: the blocks, both gaps and their rules, where fastai validates and
        what each block's scores leave out."""
        return {**self.plan(), "gap_after_validation": [] if self.published else _rng(self.valid_stop, self.train_start),
                "gap_before_test": _rng(self.train_stop, self.test_start), "test_pct": self.test_pct,
                "valid_pct": self.valid_pct, "validation": PUBLISHED_VALIDATION if self.published else "its own block",
                "gap_rule": self.gap_rule, "valid_gap_rule": self.valid_gap_rule, "left_out": self.left_out,
                "valid_left_out": self.valid_left_out, "class_voxels": self.class_voxels}


def _slices(n):
    return f"{n} slice" + ("" if n == 1 else "s")


def _rng(a, b):
    return [int(a), int(b) - 1] if b > a else []


def _n_block(n_slices, pct, name):
    if not 0 <= pct < 1:
        raise ValueError(f"{name} must be in [0, 1), got {pct}")
    return max(1, int(round(n_slices * pct))) if pct > 0 else 0


def split_slices(n_slices, test_pct=0.2, gap_slices=0, valid_pct=0.0):
    """`(train, valid, test)` slice indices of a volume of `n_slices` with gaps of `gap_slices` (no labels needed):
    the last `test_pct` test, the first `valid_pct` validate (0: the test block validates, the published recipe)."""
    n_test, n_valid = _n_block(n_slices, test_pct, "test_pct"), _n_block(n_slices, valid_pct, "valid_pct")
    gap = int(gap_slices)
    start, stop = (n_valid + gap if n_valid else 0), n_slices - n_test - (gap if n_test else 0)
    if stop - start < 1:
        raise DatasetError(f"Only {n_slices} slice(s): need at least one training slice besides the {n_test} test "
                           f"slice(s), the {n_valid} validation slice(s) and gaps of {gap_slices}. Lower test_pct, "
                           "valid_pct or gap_slices, or add slices.")
    test = np.arange(n_slices - n_test, n_slices)
    return np.arange(start, stop), (np.arange(n_valid) if n_valid else test), test


def _shared(labels, a, b, z, connectivity=CONNECTIVITY):
    """Boolean mask over slices `[a, b)` of the labelled specimens that also reach slice `z` (outside `[a, b)`).

    A specimen reaching both a block and a slice beyond a gap crosses every slice between (a 3D
    component is contiguous in z), so the components of the slices from `z` to the block are enough.
    """
    n = len(labels)
    if not 0 <= z < n or b <= a:
        return np.zeros((max(0, b - a), *labels.shape[1:]), bool)
    lo, hi = min(a, z), max(b, z + 1)
    cc, k, _, _ = label_components(fossil_voxels(labels[lo:hi]), connectivity)
    block = cc[a - lo:b - lo]
    ids = np.intersect1d(np.unique(cc[z - lo]), np.unique(block))
    ids = ids[ids > 0]
    return np.isin(block, ids) if len(ids) else np.zeros(block.shape, bool)


def _auto_gap(labels, edge, cap, down, connectivity=CONNECTIVITY):
    """The narrowest gap (at most `cap` slices) beside slice `edge` of a block that leaves no labelled specimen of the
    block reaching past it: below `edge` when `down` (the block ends at `edge`), above it otherwise (the block starts
    at `edge`). Returns `(gap, needed)`; `needed` is None when a specimen is taller than `cap` allows."""
    n = len(labels)
    lo, hi = (edge, min(n, edge + cap + 2)) if down else (max(0, edge - cap - 1), edge + 1)
    cc, k, _, boxes = label_components(fossil_voxels(labels[lo:hi]), connectivity)
    needed, inner = 0, edge - lo  # the block's edge slice, in the window
    for i in range(1, k + 1):
        z = boxes[i][0]
        if not z.start <= inner < z.stop:
            continue
        reach = (z.stop - 1 - inner) if down else (inner - z.start)  # slices it covers beyond the edge
        if reach and (z.stop == hi - lo and hi < n if down else z.start == 0 and lo > 0):
            return cap, None  # it reaches the end of the window: taller than the cap
        needed = max(needed, reach)
    return min(needed, cap), needed


def _gap(labels, edge, cap, down, gap_slices, connectivity, what):
    """The gap beside a block and its rule (see the module's docstring)."""
    if gap_slices is not None:
        if not isinstance(gap_slices, (int, np.integer)) or gap_slices < 0:
            raise ValueError(f"gap_slices must be None (automatic) or a whole number >= 0, not {gap_slices!r}")
        return int(gap_slices), "the parameter gap_slices"
    if labels is None:
        return 0, "no labels, no specimen to keep apart"
    gap, needed = _auto_gap(labels, edge, max(0, cap), down, connectivity)
    if needed is not None and needed <= gap:
        return gap, "automatic: the narrowest that keeps every labelled specimen in one block"
    return gap, (f"automatic, capped at {_slices(gap)} (the {what} block's height, or what the training block leaves): "
                 "a taller specimen still reaches both blocks")


def _left_out(vol, a, b, z, connectivity):
    """What a block's scores leave out: specimens of `[a, b)` also reaching slice `z`."""
    left = {"specimens": 0, "voxels": 0, "by_class": {}}
    if vol.labels is None or b <= a:
        return left
    mask = _shared(vol.labels, a, b, z, connectivity)
    if mask.any():
        counts = np.bincount(np.asarray(vol.labels[a:b])[mask], minlength=len(vol.codes or []))
        left = {"specimens": int(label_components(mask, connectivity)[1]), "voxels": int(mask.sum()),
                "by_class": {str(c): int(v) for c, v in zip(vol.codes, counts) if v}}
    return left


def _class_voxels(vol, a, b):
    """{class: labelled voxels} of slices `[a, b)`, or {} without labels or codes."""
    if vol.labels is None or not vol.codes or b <= a:
        return {}
    counts = sum(np.bincount(np.asarray(vol.labels[z:min(b, z + 16)]).ravel(), minlength=len(vol.codes))
                 for z in range(a, b, 16))
    return {str(c): int(v) for c, v in zip(vol.codes, counts)}


def _measured(vol, split, connectivity=CONNECTIVITY):
    """`split` with what each block's scores leave out, and each scored block's voxels per class, measured on
    `vol.labels`."""
    left_t = _left_out(vol, split.test_start, split.n_slices, split.train_stop - 1, connectivity)
    left_v = left_t if split.published else _left_out(vol, split.valid_start, split.valid_stop, split.train_start,
                                                      connectivity)
    counts = {"validation": _class_voxels(vol, split.valid_start, split.valid_stop),
              "test": _class_voxels(vol, split.test_start, split.n_slices)}
    return Split(**{**split.__dict__, "left_out": left_t, "valid_left_out": left_v, "class_voxels": counts})


def split_volume(vol, test_pct=0.2, valid_pct=0.1, gap_slices=None, connectivity=CONNECTIVITY):
    """The `Split` of `vol`: the last `test_pct` of its slices are the test block, the first `valid_pct` the validation
    block (0: validate on the test block, the published recipe), a gap of `gap_slices` between the training block and
    each (None: the automatic rule of the module's docstring, from `vol.labels`; 0 without labels). With sparse labels
    (`vol.labelled`), over the labelled slices (the module's docstring)."""
    labelled = getattr(vol, "labelled", None)
    if vol.labels is not None and labelled is not None and not np.all(labelled):
        return _sparse_split(vol, np.asarray(labelled, bool), test_pct, valid_pct, gap_slices, connectivity)
    Z = len(vol.images)
    n_test, n_valid = _n_block(Z, test_pct, "test_pct"), _n_block(Z, valid_pct, "valid_pct")
    if not n_test:
        n_valid = 0  # no test block to guard: fastai validates on... nothing; there is nothing to score either
    t0 = Z - n_test
    if n_valid + n_test + 1 > Z:
        raise DatasetError(f"Only {Z} slice(s): a test block of {n_test} and a validation block of {n_valid} leave no "
                           "training slice. Lower test_pct or valid_pct (valid_pct=0 validates on the test block, the "
                           "published recipe), or add slices.")
    labels = vol.labels
    gap_t, rule_t = (0, "no test block (test_pct=0)") if not n_test else \
        _gap(labels, t0, min(n_test, t0 - n_valid - 1), False, gap_slices, connectivity, "test")
    if n_valid:
        gap_v, rule_v = _gap(labels, n_valid - 1, min(n_valid, t0 - gap_t - n_valid - 1), True, gap_slices,
                             connectivity, "validation")
        v0, v1, train_start = 0, n_valid, n_valid + gap_v
    else:  # the published recipe: fastai validates on the test block
        v0, v1, train_start, rule_v = t0, Z, 0, ""
    train_stop = t0 - gap_t
    if train_stop - train_start < 1:
        raise DatasetError(f"Only {Z} slice(s): need at least one training slice besides the {n_test} test slice(s), "
                           f"the {n_valid} validation slice(s) and the gaps. Lower test_pct, valid_pct or gap_slices, "
                           "or add slices.")
    split = Split(Z, train_start, train_stop, v0, v1, t0, float(test_pct), float(valid_pct if n_valid else 0.0),
                  rule_t, rule_v, gap_slices=gap_slices)
    return _measured(vol, split, connectivity)


class _Span:
    """Slices `[lo, hi)` of `vol`, as `split_volume` reads a volume."""
    def __init__(self, vol, lo, hi):
        self.images, self.labels, self.codes = vol.images[lo:hi], vol.labels[lo:hi], vol.codes


def _outline_width(vol, labelled, n=64):
    """The widest fossil outline (its bounding box's longer side, px) in about `n` labelled slices of `vol`."""
    from scipy import ndimage
    zs = np.flatnonzero(labelled)
    widest = 0
    for z in zs[evenly_spaced(len(zs), n)]:
        for box in ndimage.find_objects(ndimage.label(fossil_voxels(vol.labels[z]))[0]):
            widest = max(widest, box[0].stop - box[0].start, box[1].stop - box[1].start)
    return widest


def _sparse_split(vol, labelled, test_pct, valid_pct, gap_slices, connectivity):
    """`split_volume` with sparse labels (the module's docstring). The split keeps the `test_pct` and `valid_pct` asked
    for (what the DataLoaders are checked against) whichever layout it falls back to."""
    zs, n = np.flatnonzero(labelled), len(vol.images)
    lo, hi = int(zs[0]), int(zs[-1]) + 1
    width = _outline_width(vol, labelled) if gap_slices is None else 0
    count = lambda a, b: int(labelled[a:b].sum()) if b > a else 0  # noqa: E731
    def rule(other):
        return (f"automatic, sparse labels: the labelled slices of the {other} and training blocks at least {width} "
                "slices apart (the widest fossil outline; a specimen is not followed through unlabelled slices)")
    asked = {"n_slices": n, "test_pct": float(test_pct), "valid_pct": float(valid_pct)}
    for v_pct in dict.fromkeys((valid_pct, 0.0)):
        try:
            s = split_volume(_Span(vol, lo, hi), test_pct, v_pct, gap_slices, connectivity)
        except DatasetError:
            continue
        at = {k: getattr(s, k) + lo for k in ("train_start", "train_stop", "valid_start", "valid_stop", "test_start")}
        s = Split(**{**s.__dict__, **at, **asked, **({"valid_stop": n} if s.published else {})})
        first_test = s.test_start + int(np.argmax(labelled[s.test_start:]))
        if first_test - width + 1 < s.train_stop:
            s = Split(**{**s.__dict__, "train_stop": max(s.train_start, first_test - width + 1),
                         "gap_rule": rule("test")})
        if not s.published and s.valid_stop > s.valid_start:
            last_valid = s.valid_stop - 1 - int(np.argmax(labelled[s.valid_start:s.valid_stop][::-1]))
            if last_valid + width > s.train_start:
                s = Split(**{**s.__dict__, "train_start": last_valid + width, "valid_gap_rule": rule("validation")})
        if count(s.train_start, s.train_stop) >= MIN_TRAINING_SLICES and count(s.test_start, n) and \
                (s.published or count(s.valid_start, s.valid_stop)):
            blocks = {"training": (s.train_start, s.train_stop), "test": (s.test_start, n)}
            blocks.update({} if s.published else {"validation": (s.valid_start, s.valid_stop)})
            return _measured(vol, Split(**{**s.__dict__, "labelled": {k: count(*ab) for k, ab in blocks.items()}}),
                             connectivity)
    why = (f"too few labelled slices ({len(zs)}) to hold a test block out: every labelled slice trains and validates, "
           "and no held-out score is reported (label more slices, spread along the core)")
    return Split(n, lo, hi, lo, hi, n, float(test_pct), float(valid_pct), why, why, gap_slices=gap_slices)


def whole_volume_test(vol):
    """The `Split` of a scan the model never trained on (a model from another volume): every slice is the test block,
    none trains or validates."""
    n = len(vol.images)
    return Split(n, 0, 0, 0, 0, 0, 1.0, 0.0, "the model was trained on another volume: every slice is the test block")


def _recorded_blocks(info):
    """(train, valid, test) inclusive slice ranges of a training record or a bundle's `trained_on`; a record from before
    the validation block existed validated on its test block, which it called `valid_slices`."""
    valid = list(info.get("valid_slices") or [])
    test = list(info.get("test_slices") or []) if "test_slices" in info else valid
    train = list(info.get("train_slices") or ([0, test[0] - 1] if test else []))
    return train, valid, test


def recorded_split(vol, info):
    """The `Split` of `vol` that training record (or bundle `trained_on`) `info` holds: its training, validation and test
    slices, with what each block's scores leave out measured on `vol.labels`."""
    n = len(vol.images)
    (tr, va, te), why = _recorded_blocks(info), "as recorded when the model was trained"
    t0 = te[0] if te else n
    v0, v1 = (va[0], va[1] + 1) if va else (t0, t0)
    split = Split(n, tr[0] if tr else 0, tr[1] + 1 if tr else 0, v0, v1, t0, round((n - t0) / n, 4),
                  0.0 if v0 == t0 else round((v1 - v0) / n, 4), why, why)
    return _measured(vol, split)


def scoring_split(vol, info, from_elsewhere=False, test_pct=0.2, valid_pct=0.1, gap_slices=None,
                  model_name="the model"):
    """The `Split` 05 scores `vol` with, using the model whose record (or bundle) is `info`; None without labels.

    This run's own model: the split of the parameters, checked against the one it trained with
    (`check_split`). A model from elsewhere (`from_elsewhere`, 05's `model_path`) is compared with the
    scan it trained on (`info["trained_on"]`, `volume.volume_fingerprint`): on another scan every
    slice is the test block (`whole_volume_test`); on its own training scan only the test block it
    recorded is (`recorded_split`), never the slices it trained or was chosen on; when the record
    cannot tell (made before fingerprints were recorded, and the shapes agree) it stops, saying why.
    """
    if vol.labels is None:
        return None
    if not from_elsewhere:
        split = split_volume(vol, test_pct, valid_pct, gap_slices)
        check_split(split, info, model_name)
        return split
    trained_on = info.get("trained_on") or {}
    same = same_scan(vol, trained_on)
    if same is None and trained_on.get("dataset") and Path(trained_on["dataset"]).resolve() == Path(vol.source).resolve():
        same = True
    if same is None:
        raise DatasetError(
            f"{vol.source} has the shape of the scan {model_name} was trained on ({trained_on.get('dataset')}), and its "
            "record, made by an earlier version, holds no fingerprint to tell the two apart: scoring every slice could "
            "score the model on its own training slices. Write the model bundle again with this version (run 04's last "
            "cells in the training run) and point model_path at it; or, for the training scan itself, run 05 in the "
            "training run's own folder without model_path.")
    if not same:
        return whole_volume_test(vol)
    rec = {**info, **{k: v for k, v in trained_on.items() if k.endswith("_slices")}}
    split = recorded_split(vol, rec)
    if not len(split.test):
        raise DatasetError(f"{vol.source} is the scan {model_name} was trained on, and its record holds no test block: "
                           "nothing on it is unseen by the model, so there is nothing honest to score. Score it on "
                           "another labelled scan, or run 05 without ground truth (an unlabelled copy).")
    return Split(**{**split.__dict__, "gap_rule": "the model's own training scan: only the test block it recorded is "
                                                  "scored"})


def left_out_mask(vol, split, connectivity=CONNECTIVITY):
    """Boolean mask over the test block: the voxels of labelled specimens that also reach the training block."""
    return _shared(vol.labels, split.test_start, split.n_slices, split.train_stop - 1, connectivity)


def valid_left_out_mask(vol, split, connectivity=CONNECTIVITY):
    """Boolean mask over the validation block: the voxels of labelled specimens that also reach the training block."""
    if split.published:
        return left_out_mask(vol, split, connectivity)
    return _shared(vol.labels, split.valid_start, split.valid_stop, split.train_start, connectivity)


def describe_split(split):
    """A few lines on `split`: the blocks and gaps, where fastai validates, and what each block's scores leave out."""
    def block(name, a, b):
        return f"{name} slices {a}-{b - 1} ({b - a})" if b > a else f"no {name} slices"

    def gap(a, b):
        return block("gap", a, b) if b > a else "no gap"
    if not split.held_out and (split.valid_start, split.valid_stop) == (split.train_start, split.train_stop):
        return (f"{block('training', split.train_start, split.train_stop)}, no test block: {split.gap_rule}; the "
                "per-epoch scores are on the training slices")
    parts = [] if split.published else [block("validation", split.valid_start, split.valid_stop),
                                        gap(split.valid_stop, split.train_start)]
    parts += [block("training", split.train_start, split.train_stop), gap(split.train_stop, split.test_start),
              block("test", split.test_start, split.n_slices)]
    lines = [", ".join(parts)]
    if split.published:
        lines.append("validation: " + PUBLISHED_VALIDATION + "; every per-epoch score is on the block 05 reports")
    elif split.valid_stop > split.valid_start:
        lines.append("validation: every per-epoch score, lr_find comparison and attempt is on the validation block; "
                     "only 05 scores the test block")
        lines.append(f"gap after validation: {_slices(split.train_start - split.valid_stop)}, {split.valid_gap_rule}")
    lines.append(f"gap before test: {_slices(split.test_start - split.train_stop)}, {split.gap_rule}")
    shown = [("test", split.left_out)] + ([] if split.published else [("validation", split.valid_left_out)])
    for name, lo in shown:
        if lo.get("specimens"):
            lines.append(f"left out of the {name} scores: {lo['specimens']} specimen(s) also in the training block, "
                         f"{lo['voxels']} voxels ({', '.join(f'{c} {v}' for c, v in lo['by_class'].items())})")
    if split.labelled:
        lines.append("sparse labels: " + ", ".join(f"{k} block {v} labelled slice(s)" for k, v in
                                                   split.labelled.items()) + "; only those train and score")
    if not any(lo.get("specimens") for _, lo in shown):
        lines.append("no labelled specimen lies in two blocks")
    for name, counts in (split.class_voxels or {}).items():
        if name == "validation" and split.published or not counts:
            continue
        lines.append(f"{name} block, labelled voxels: " + ", ".join(f"{c} {v}" for c, v in list(counts.items())[1:]))
        absent = [c for c, v in list(counts.items())[1:] if not v]
        if absent:
            fix = "valid_pct" if name == "validation" else "test_pct"
            lines.append(f"the {name} block holds no voxel of {', '.join(absent)}: its IoU there is undefined (n/a); "
                         f"a larger {fix} may take some in")
    return "\n".join(lines)


def check_split(split, info, model_name="the model"):
    """Stop when `split` (this notebook's) is not the split `info` (a training record) was trained with: the test
    scores would then include slices the model trained on or was chosen on, or leave out some it never saw."""
    if info.get("valid_slices") is None and info.get("test_slices") is None:
        return  # a checkpoint from before the split was recorded
    rec = list(_recorded_blocks(info))
    mine = split.plan()
    if rec != [mine["train_slices"], mine["valid_slices"], mine["test_slices"]]:
        old = "" if "test_slices" in info else (" (a model trained before the validation block existed: it validated "
                                                "on its test block, which valid_pct=0 repeats)")
        raise ValueError(
            f"{model_name} was trained on slices {rec[0]}, validated on {rec[1]} and tested on {rec[2]}{old}, but this "
            f"notebook's split (test_pct={split.test_pct}, valid_pct={split.valid_pct}) trains on "
            f"{mine['train_slices']}, validates on {mine['valid_slices']} and tests on {mine['test_slices']}: its test "
            "scores would not be honest. Use the test_pct, valid_pct and gap_slices of the training notebooks (02-04), "
            "or train again with these.")
