"""The notebooks' parameters, checked where they enter: a wrong type or range stops at once with the name and the fix.

Every name of every notebook's parameters cell has a rule here (a test checks it), and
`check_params` runs at the top of each notebook (in `paths.use_run(globals(), ...)`) and in
`run_pipeline.py` before the first notebook starts, so that `bs=0` fails in a second, not
after an hour of training, and with a message, not a traceback from deep inside fastai.
Deeper checks that need the data or torch (an encoder name that exists, a gap that leaves
training slices) stay where they are done today, with messages of the same kind.
"""
from __future__ import annotations

import numbers
import os
from pathlib import Path


class ParameterError(ValueError):
    """A notebook parameter with a wrong type or value; the message names it and says what it takes."""


def _whole(lo=None):
    def check(v):
        ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and (lo is None or v >= lo)
        return ok, f"a whole number{'' if lo is None else f' >= {lo}'}"
    return check


def _number(lo=None, hi=None, lo_open=False, hi_open=False):
    def check(v):
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v  # v == v: not NaN
        ok = ok and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
        rng = [f"{'above' if lo_open else 'at least'} {lo}" if lo is not None else "",
               f"{'below' if hi_open else 'at most'} {hi}" if hi is not None else ""]
        return ok, "a number" + (" " + " and ".join(r for r in rng if r) if any(rng) else "")
    return check


def _flag(v): return isinstance(v, bool), "True or False"


def _text(v): return isinstance(v, str) and v.strip() != "", "a text in quotes, e.g. \"name\""


def _path(v): return isinstance(v, (str, Path)) and str(v).strip() != "", "a path in quotes"


def _one_of(*choices):
    def check(v): return v in choices, "one of " + ", ".join(map(repr, choices))
    return check


def _or_none(rule):
    def check(v):
        ok, what = rule(v)
        return ok or v is None, f"None or {what}"
    return check


def _odd(v):
    ok, _ = _whole(1)(v)
    return ok and v % 2 == 1, "an odd whole number >= 1 (the slice and as many neighbours above as below)"


CLASS_WEIGHTS = {"inverse_sqrt": 0.5, "inverse": 1.0,  # class_weights by name: the power of 1 / frequency (learner),
                 "balance_fossils": None,            # or no power: the learner's own rule (fossil classes evened out,
                 "balance_fossils_sqrt": None}       # or halfway: the square root of that weight)


def _class_weights(v):
    what = ("None, \"balance_fossils\", \"balance_fossils_sqrt\", \"inverse_sqrt\", \"inverse\" or a list of positive numbers, one per class "
            "of codes.txt")
    if v is None or (isinstance(v, str) and v in CLASS_WEIGHTS):
        return True, what
    return (isinstance(v, (list, tuple)) and len(v) > 0
            and all(_number(0, lo_open=True)(x)[0] for x in v)), what


def _sparse_labels(v):
    what = "True, False, or a list of the labelled slice numbers (z, from 0), e.g. [0, 40, 80]"
    if isinstance(v, bool):
        return True, what
    return (isinstance(v, (list, tuple)) and len(v) > 0 and all(_whole(0)(z)[0] for z in v)), what


def _label_value(v): return _whole(1)(v)[0] and v <= 255, "a whole number from 1 to 255"


def _voxel_size(v):
    what = "None (read voxel_size.txt), one positive number in µm, or three, [z, y, x]"
    vals = list(v) if isinstance(v, (list, tuple)) else [v]
    return v is None or (len(vals) in (1, 3) and all(_number(0, lo_open=True)(x)[0] for x in vals)), what


def _fossil_threshold(v):
    ok, _ = _number(0, 1, lo_open=True, hi_open=True)(v)
    return ok or v == "auto", "\"auto\" (chosen on the training block) or a number above 0 and below 1"


RULES = {  # name: (rule, what it is, for the message)
    "data_dir": (_or_none(_path), "the scan: a dataset folder, a folder of slices or a volume file"),
    "labels_path": (_or_none(_path), "the label file or folder (None: <name>_GT<ext> beside the scan)"),
    "h5_dataset": (_or_none(_text), "the HDF5 dataset of the scan, e.g. \"/exchange/data\""),
    "sparse_labels": (_sparse_labels, "which slices hold labels: False (all), True (those with a mask) or a list"),
    "unlabelled_value": (_or_none(_label_value), "the mask value of unlabelled pixels, e.g. 255 (None: none)"),
    "work_dir": (_or_none(_path), "the run folder"),
    "data_url": (_or_none(_text), "a Google Drive id/URL or HTTP URL of a zipped dataset"),
    "quick": (_flag, "the CPU demo"), "smoke": (_flag, "the smoke test"), "force": (_flag, "train each finished phase once more"),
    "test_pct": (_number(0, 1, lo_open=True, hi_open=True),
                 "the test block's share of the slices (the last ones), e.g. 0.2 (0 would leave nothing to score)"),
    "valid_pct": (_number(0, 1, hi_open=True), "the validation block's share of the slices (the first ones), e.g. 0.1 "
                  "(0: validate on the test block, the published recipe)"),
    "gap_slices": (_or_none(_whole(0)), "slices between the training block and each of the others (None: automatic)"),
    "sample_size": (_one_of("default", "full"), "the embedded sample's size"),
    "seed": (_whole(0), "the random seed"),
    "arch": (_text, "the encoder, a torchvision ResNet name such as \"resnet34\""),
    "pretrained": (_flag, "ImageNet weights"),
    "init_from": (_or_none(_text), "the phase to start from, e.g. \"256_unfrozen\""),
    "run_lr_find": (_flag, "plot lr_find"),
    "size_frac": (_number(0, 1, lo_open=True), "the training resolution as a fraction of the slice size"),
    "context_slices": (_odd, "slices per input"),
    "triplanar": (_flag, "also train on XZ and YZ slices"),
    "crop_size": (_or_none(_whole(32)), "the crop size in px (32 or more, the encoder's downsampling)"),
    "loss": (_one_of("cross_entropy", "ce_dice", "focal"), "the loss"),
    "class_weights": (_class_weights, "the loss's class weights"),
    "oversample_rare": (_number(1), "at most how much more often slices holding a rarer fossil class are drawn"),
    "infill_augment": (_number(0, 1), "the share of training slices whose fossils' insides get a random gray"),
    "scanner_augment": (_number(0, 1), "the share of training slices shown as another scanner would give them"),
    "bs": (_or_none(_whole(1)), "the batch size (None: what fits the GPU's free memory)"),
    "wd": (_number(0), "the weight decay"),
    "epochs_frozen": (_whole(1), "epochs with the encoder frozen"),
    "epochs_unfrozen": (_whole(1), "epochs of the whole network"),
    "lr_frozen": (_number(0, lo_open=True), "the learning rate"),
    "lr_unfrozen_lo": (_number(0, lo_open=True), "the encoder's first layers' learning rate"),
    "lr_unfrozen_hi": (_number(0, lo_open=True), "the last layers' learning rate"),
    "pct_frozen": (_number(0, 1, lo_open=True, hi_open=True), "the share of the cycle spent warming up"),
    "pct_unfrozen": (_number(0, 1, lo_open=True, hi_open=True), "the share of the cycle spent warming up"),
    "model_path": (_or_none(_text), "a model from elsewhere: a bundle folder, a training run folder or a link"),
    "match_intensity": (_flag, "map a new scan's grey levels onto the model's training volume's"),
    "model_name": (_text, "the phase in work_dir/models to predict with, e.g. \"full_unfrozen\""),
    "save_probs": (_flag, "write probs.npy"), "tta": (_flag, "flip test-time augmentation"),
    "fossil_threshold": (_fossil_threshold, "the share of probability the fossil classes need for a voxel to be fossil"),
    "voxel_size_um": (_voxel_size, "the voxel size"),
    "depth_interval_mm": (_number(0, lo_open=True), "the depth interval of exports/assemblage.csv, in mm of core"),
    "min_voxels": (_whole(0), "the smallest specimen kept, in voxels (0 or 1: keep every one)"),
    "min_volume_um3": (_number(0), "the smallest specimen kept, in µm³"),
    "connectivity": (_one_of(6, 18, 26), "the 3D connectivity of a specimen"),
    "split_touching": (_flag, "split touching specimens"),
    "max_exports": (_whole(0), "how many specimens get a folder and a preview"),
    "classify": (_flag, "the specimen classifier"),
    "drive_minutes": (_number(0), "minutes between resumable copies of a phase on Google Drive (0: every epoch)"),
    "slice_pngs": (_flag, "one label PNG per slice besides labels.tif"),
}


def check_params(values):
    """Check every parameter of `values` (a notebook's `globals()`, or a dict) that has a rule; raise `ParameterError`
    naming each bad one, its value and what it takes. Names without a rule are ignored."""
    bad = []
    for name, (rule, what) in RULES.items():
        if name in values:
            v = values[name]
            ok, takes = rule(v)
            if not ok:
                bad.append(f"{name}={v!r}: {name} is {what}; it takes {takes}")
    lo, hi = values.get("lr_unfrozen_lo"), values.get("lr_unfrozen_hi")
    if not bad and lo is not None and hi is not None and lo > hi:
        bad.append(f"lr_unfrozen_lo={lo!r} is above lr_unfrozen_hi={hi!r}: slice(lo, hi) gives the first layers lo "
                   "and the last hi, so lo must not exceed hi")
    tp, vp = values.get("test_pct"), values.get("valid_pct")
    if not bad and tp is not None and vp is not None and tp + vp >= 0.9:
        bad.append(f"test_pct={tp!r} and valid_pct={vp!r} leave {1 - tp - vp:.0%} of the slices (less the gaps) to train "
                   "on: lower one of them")
    if not bad and values.get("crop_size") is not None and values.get("triplanar"):
        bad.append(f"crop_size={values['crop_size']!r} with triplanar=True: crops are cut from axial slices only; set "
                   "triplanar=False to train on crops, or crop_size=None (the default) for tri-planar training")
    if bad:
        raise ParameterError("Bad parameter value" + ("s" if len(bad) > 1 else "") + ", fix it in the parameters cell "
                             "(or the -p option):\n  " + "\n  ".join(bad))


# A run's own settings and their defaults: typed once, in the notebook that first needs them (the data and the split
# in 01, the training's in 02, the assemblage's interval in 05), recorded in `work_dir/run.json`, and read from there by
# the next notebooks unless one sets them itself (`paths.use_run`).
RUN_SETTINGS = {"data_dir": None, "labels_path": None, "h5_dataset": None, "sparse_labels": False,
                "unlabelled_value": None, "data_url": None, "sample_size": "default",
                "seed": 0, "quick": False, "smoke": False, "test_pct": 0.2, "valid_pct": 0.1, "gap_slices": None,
                "voxel_size_um": None,
                "arch": "resnet34", "pretrained": True, "context_slices": 3, "triplanar": True, "crop_size": None,
                "loss": "cross_entropy", "class_weights": None, "oversample_rare": 1.0, "infill_augment": 0.0,
                "scanner_augment": 0.5, "wd": 1e-2, "drive_minutes": 15,
                "depth_interval_mm": 1.0}
RUN_TYPED_IN = {"01": ("data_dir", "labels_path", "h5_dataset", "sparse_labels", "unlabelled_value", "data_url",
                       "sample_size", "seed", "quick", "smoke",
                       "test_pct", "valid_pct", "gap_slices", "voxel_size_um"),
                "02": ("arch", "pretrained", "context_slices", "triplanar", "crop_size", "loss", "class_weights",
                       "oversample_rare", "infill_augment", "scanner_augment", "wd", "drive_minutes"),
                "05": ("depth_interval_mm",)}

# The values of the training notebooks' parameters cells that quick mode's or smoke's schedule replaces (and 05's tta):
# `use_schedule` replaces a parameter only while it holds this value (a test keeps these in step with the notebooks).
NOTEBOOK_DEFAULTS = {
    "02": {"size_frac": 0.25, "bs": None, "epochs_frozen": 5, "lr_frozen": 2e-4, "pct_frozen": 0.9, "epochs_unfrozen": 10,
           "lr_unfrozen_lo": 5e-7, "lr_unfrozen_hi": 5e-5, "pct_unfrozen": 0.25},
    "03": {"size_frac": 0.5, "bs": None, "epochs_frozen": 5, "lr_frozen": 1e-3, "pct_frozen": 0.8, "epochs_unfrozen": 10,
           "lr_unfrozen_lo": 1e-6, "lr_unfrozen_hi": 1e-4, "pct_unfrozen": 0.25},
    "04": {"size_frac": 1.0, "bs": None, "epochs_frozen": 3, "lr_frozen": 2e-5, "pct_frozen": 0.8, "epochs_unfrozen": 10,
           "lr_unfrozen_lo": 1e-6, "lr_unfrozen_hi": 2e-6, "pct_unfrozen": 0.25},
    "05": {"tta": True},
}
for _nb in ("02", "03", "04"):
    NOTEBOOK_DEFAULTS[_nb]["run_lr_find"] = True
NOTEBOOK_DEFAULTS["02"].update(crop_size=None, triplanar=True, context_slices=3)  # (02 types them for the run)
_APPLIED = {}  # (notebook, name): the value the last `use_schedule` set, so that running its cell again is no change
PASSED = "MICROFOSSIL_PASSED"  # run_pipeline's -p names, for its notebooks' kernels: passed values are never replaced
FORCE_SINCE = "MICROFOSSIL_FORCE_SINCE"  # when run_pipeline.py --force began, for its kernels (`training._force_used`)


def use_schedule(values, notebook, mode="quick mode", **schedule):
    """Set a mode's `schedule` (quick mode's, the smoke test's) into `values`, a notebook's `globals()`, except where the
    user changed a parameter: one that no longer holds its parameters cell's default (`NOTEBOOK_DEFAULTS[notebook]`),
    or was passed with `run_pipeline.py -p`, is kept, so a learning rate typed in the parameters cell is the one that
    trains. Prints what it sets and what it keeps; returns what it set."""
    defaults, passed = NOTEBOOK_DEFAULTS[notebook], set(filter(None, os.environ.get(PASSED, "").split(",")))
    unknown = sorted(set(schedule) - set(defaults))
    if unknown:
        raise ParameterError(f"{mode} cannot set {', '.join(unknown)} in notebook {notebook}: only "
                             f"{', '.join(defaults)} (params.NOTEBOOK_DEFAULTS)")
    use, kept = {}, {}
    for name, value in schedule.items():
        now = values.get(name, defaults[name])
        same_as = (defaults[name], _APPLIED.get((notebook, name), defaults[name]))
        if name in passed or not any(now == v and type(now) is type(v) for v in same_as):
            kept[name] = now
        else:
            use[name] = value
    values.update(use)
    _APPLIED.update({(notebook, k): v for k, v in use.items()})
    print(f"{mode}: " + ", ".join(f"{k} {v!r}" for k, v in use.items())
          + (f"; kept as you set them: {', '.join(f'{k} {v!r}' for k, v in kept.items())}" if kept else ""))
    return use
