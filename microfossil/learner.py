"""The fastai learner: a U-Net on a ResNet encoder, ImageNet weights when they can be had, mixed precision on
CUDA, and the metrics shown every epoch (on the validation block: per-class IoU and Dice, the fossil classes'
mean IoU, and the published metric). Every loss and score leaves out voxels labelled `metrics.IGNORE`.

Two kinds of small callbacks keep the GPU busy: the training losses and the validation
confusion matrix stay on the device until an epoch ends (fastai's own copy them to the CPU
every batch, which makes the CPU wait for the GPU at every step).
"""
from __future__ import annotations

import re
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fastai.callback.progress import ProgressCallback
from fastai.callback.schedule import ParamScheduler, valley as _fastai_valley
from fastai.learner import AvgLoss, AvgSmoothLoss, Callback, Learner, Metric
from fastai.losses import BaseLoss
from fastai.optimizer import OptimWrapper
from fastai.torch_core import find_bs
from fastai.vision.all import CrossEntropyLossFlat, unet_learner
from fastai.vision.learner import model_meta

from .loaders import draw_weights, n_input_channels
from .metrics import IGNORE, scores_from_confusion
from .params import CLASS_WEIGHTS, ParameterError
from .runtime import halve_on_oom, local_dir, on_drive


def encoder(arch):
    import torchvision.models as tvm
    fn = getattr(tvm, arch, None) if isinstance(arch, str) else arch
    if fn is None or not callable(fn):
        raise ValueError(f"Unknown encoder {arch!r}; use a torchvision ResNet name such as 'resnet34'.")
    return fn


def _imagenet_weights_ok(arch):
    """True when ImageNet weights for `arch` are cached or can be downloaded now (30 s limit)."""
    import torchvision.models as tvm
    w = model_meta.get(encoder(arch), {}).get("weights", "DEFAULT")
    try:
        enum = tvm.get_model_weights(encoder(arch))
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


def amp_dtype(device):
    """bf16 on Ampere and newer GPUs, fp16 on older ones (the Colab T4), None (full precision) off CUDA."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def _mixed_precision(learn):
    """Mixed precision and a channels_last model on CUDA; full precision elsewhere."""
    dt = amp_dtype(learn.dls.device)
    if dt is None:
        return learn
    learn.model.to(memory_format=torch.channels_last)
    return learn.to_bf16() if dt == torch.bfloat16 else learn.to_fp16()


class SegLearner(Learner):
    """fastai's `Learner`, whose `fit` (so `fit_one_cycle` and `lr_find`) survives a CUDA out-of-memory error: it
    starts the fit again with half the batch, down to 1, saying so (`runtime.halve_on_oom`); the DataLoaders keep the
    smaller batch for the phases after it. `PhaseCheckpoint` then resumes or restarts its phase from its own
    checkpoints and records the batch size used. (An `lr_find` cut by the error keeps the steps it took.)"""

    def fit(self, *args, **kwargs):
        def attempt(bs):
            for dl in self.dls.loaders:
                dl.bs = min(dl.bs, bs)
            return super(SegLearner, self).fit(*args, **kwargs)
        return halve_on_oom(attempt, self.dls.train.bs, "training")[0]


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
        rec.smooth_loss.reset()  # (the Recorder reset the one it had; fastai 2.8.7, Colab's, resets no other)

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


class _CrossEntropyFlat(CrossEntropyLossFlat):
    """fastai's `CrossEntropyLossFlat`, 0 instead of NaN on a batch with no voxel counted (all `IGNORE`: a crop of an
    unlabelled part of a slice, with sparse labels)."""
    def __call__(self, inp, targ, **kwargs): return torch.nan_to_num(super().__call__(inp, targ, **kwargs), nan=0.0)


class CrossEntropyDiceLoss:
    """Per-pixel cross-entropy plus the batch soft Dice loss of the fossil classes (nnU-Net's "batch Dice").

    The Dice of each class other than `background` is taken over the whole batch (not per
    image, where a class absent from an image has no Dice), and the loss adds 1 - their mean
    to the cross-entropy. A fossil class that covers a fraction of a percent of the pixels
    then weighs as much as the background does in the cross-entropy.
    """
    def __init__(self, axis=1, background=0, smooth=1.0, weight=None):
        self.axis, self.background, self.smooth = axis, background, smooth
        # `weight`: class weights of the cross-entropy term
        self.ce = _CrossEntropyFlat(axis=axis, weight=weight, ignore_index=IGNORE)

    def __call__(self, pred, targ):
        ce = self.ce(pred, targ)
        counted = (targ != IGNORE).unsqueeze(self.axis)
        p = torch.softmax(pred.float(), self.axis) * counted
        onehot = torch.nn.functional.one_hot(torch.where(targ == IGNORE, 0, targ).long(), p.shape[self.axis])
        onehot = onehot.movedim(-1, self.axis).to(p.dtype) * counted
        dims = [d for d in range(p.ndim) if d != self.axis]
        inter, total = (p * onehot).sum(dims), p.sum(dims) + onehot.sum(dims)
        dice = (2 * inter + self.smooth) / (total + self.smooth)
        keep = torch.arange(len(dice), device=dice.device) != self.background
        return ce + (1 - dice[keep]).mean()

    def activation(self, x): return torch.softmax(x, self.axis)

    def decodes(self, x): return x.argmax(self.axis)


class _Focal(torch.nn.Module):
    """fastai's `FocalLoss` (gamma, class `weight`), with the voxels labelled `IGNORE` left out of it and of its mean."""
    def __init__(self, gamma=2.0, weight=None, reduction="mean"):
        super().__init__()
        self.gamma, self.weight, self.reduction = gamma, weight, reduction

    def forward(self, inp, targ):
        ce = torch.nn.functional.cross_entropy(inp, targ, weight=self.weight, reduction="none", ignore_index=IGNORE)
        loss = (1 - torch.exp(-ce)) ** self.gamma * ce
        if self.reduction == "mean":
            return loss.sum() / (targ != IGNORE).sum().clamp(min=1)
        return loss.sum() if self.reduction == "sum" else loss


class FocalLossFlat(BaseLoss):
    """fastai's `FocalLossFlat`, leaving out the voxels labelled `IGNORE` (as `CrossEntropyLossFlat(ignore_index=)`)."""
    y_int = True

    def __init__(self, *args, gamma=2.0, axis=-1, **kwargs):
        super().__init__(_Focal, *args, gamma=gamma, axis=axis, **kwargs)

    def decodes(self, x): return x.argmax(dim=self.axis)

    def activation(self, x): return torch.softmax(x, dim=self.axis)


LOSSES = {  # name: the loss, given the class weights (a tensor, or None); voxels labelled IGNORE count in none
    "cross_entropy": lambda w: _CrossEntropyFlat(axis=1, weight=w, ignore_index=IGNORE),
    "ce_dice": lambda w: CrossEntropyDiceLoss(weight=w),
    "focal": lambda w: FocalLossFlat(axis=1, gamma=2.0, weight=w),  # easy pixels (most background) weigh little
}


FOSSIL_BALANCE = {"balance_fossils": 1.0, "balance_fossils_sqrt": 0.5}  # the power of the commonest fossil class's
                                                                       # pixels over each fossil class's


def class_weights_of(counts, how):
    """Per-class loss weights from the training block's pixel `counts`: None (no weights), "inverse_sqrt" or "inverse"
    (1 / frequency to that power), "balance_fossils" (the background 1, each fossil class the commonest fossil
    class's pixels over its own: the fossil classes weigh alike among themselves, and no more against the
    background than the commonest does), "balance_fossils_sqrt" (the square root of those: a class 9 times rarer
    weighs 3), or one number per class. Scaled so that the mean weight over the training
    pixels is 1 (the loss keeps its scale, and the learning rates theirs); a class absent from the training block
    gets the largest weight of the others. Returns a float list, or None."""
    if how is None:
        return None
    counts = np.asarray(counts, np.float64)
    if isinstance(how, str):
        if how not in CLASS_WEIGHTS:
            raise ValueError(f"class_weights={how!r}: use None, {', '.join(map(repr, CLASS_WEIGHTS))} or one number "
                             f"per class ({len(counts)})")
        seen = counts > 0
        w = np.zeros(len(counts))
        if how in FOSSIL_BALANCE:  # not a power of 1 / frequency: class 0 is the background, weight 1
            fossil = counts[1:][seen[1:]]
            w[0], seen[0] = 1.0, True
            w[1:][seen[1:]] = (fossil.max() / fossil) ** FOSSIL_BALANCE[how] if fossil.size else 1.0
        else:
            w[seen] = (counts.sum() / counts[seen]) ** CLASS_WEIGHTS[how]
        w[~seen] = w[seen].max() if seen.any() else 1.0
    else:
        w = np.asarray(list(how), np.float64)
        if len(w) != len(counts) or not (w > 0).all():
            raise ValueError(f"class_weights={list(how)!r}: give one positive number per class ({len(counts)}), "
                             "in the order of codes.txt")
    total = (w * counts).sum()
    return (w * counts.sum() / total if total > 0 else w).tolist()


def describe_classes(codes, counts, weights=None, oversample_rare=1.0):
    """One line per class: its share of the training block's pixels, its loss weight when there are weights, and the
    draw weight of the slices holding it when `oversample_rare` is not 1 (`loaders.draw_weights`)."""
    counts = np.asarray(counts, np.float64)
    share = counts / max(counts.sum(), 1)
    draw = draw_weights(counts, oversample_rare) if oversample_rare != 1 else None
    head = ", ".join(["pixels per class"] + (["loss weights"] if weights else [])
                     + ([f"draw weight of the slices holding it (oversample_rare={oversample_rare:g})"] if draw is not None else []))
    return f"Training block, {head}:\n" + "\n".join(
        f"  {c:<20} {s:8.3%}" + (f"   weight {weights[k]:.3g}" if weights else "")
        + (f"   slices x{draw[k]:.3g}" if draw is not None and k else "")
        for k, (c, s) in enumerate(zip(codes, share)))


def build_learner(dls, arch="resnet34", pretrained=True, wd=1e-2, work_dir=".", metrics=True, loss="cross_entropy",
                  class_weights=None):
    """fastai U-Net learner on `dls` with encoder `arch`; ImageNet weights when they can be had, else random init.

    With `dls.context_slices` = k other than 1 or 3 the first convolution takes k channels
    (fastai adapts the pretrained filters to them); k = 3 uses the ImageNet RGB filters as they are.
    `loss`: "cross_entropy" (the published recipe), "ce_dice" (`CrossEntropyDiceLoss`) or "focal" (fastai's
    `FocalLossFlat`, gamma 2). `class_weights`: None, "balance_fossils", "balance_fossils_sqrt", "inverse_sqrt", "inverse" or one number per class
    (see `class_weights_of`; they weigh the cross-entropy or focal term). Prints each class's share of the training
    block and its weight.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}, not {loss!r}")
    counts = getattr(dls, "class_counts", None)
    weights = class_weights_of(counts if counts is not None else np.ones(len(dls.codes)), class_weights)
    if counts is not None:
        print(describe_classes(dls.codes, counts, weights, getattr(dls, "oversample_rare", 1.0)))
    requested = pretrained
    if pretrained:
        pretrained = _imagenet_weights_ok(arch)
    context = getattr(dls, "context_slices", 1)
    learn = unet_learner(dls, encoder(arch), normalize=False, n_out=len(dls.codes), pretrained=pretrained,
                         n_in=n_input_channels(context), wd=wd,
                         loss_func=LOSSES[loss](None if weights is None else torch.tensor(weights, device=dls.device)),
                         path=Path(work_dir), opt_func=_adamw, metrics=epoch_metrics(dls.codes) if metrics else None)
    learn.__class__ = SegLearner  # (fastai's unet_learner builds a plain Learner)
    if on_drive(work_dir):  # lr_find saves and deletes weights in model_dir: on the local disk, not in Drive's trash
        learn.model_dir = local_dir(work_dir, "tmp")
    learn.remove_cb(ProgressCallback)
    learn.add_cbs([_Progress(), _NoStepSync()])
    learn.freeze()  # the published schedule starts frozen even without ImageNet weights
    learn.arch_name, learn.loss_name = (arch if isinstance(arch, str) else arch.__name__), loss
    learn.class_weights = None if weights is None else [round(w, 4) for w in weights]
    learn.pretrained, learn.used_pretrained = bool(requested), pretrained  # asked for; had (False when offline)
    learn.at_init = True  # the weights as built: a phase starting here keeps them (PhaseCheckpoint)
    learn.made_with = dict(arch=learn.arch_name, pretrained=bool(requested), wd=wd, loss=loss, class_weights=class_weights)
    return _mixed_precision(learn)


def sig(v, digits=6):
    """`v` to `digits` significant digits: a plan's numbers compare equal however they were typed."""
    return float(f"{float(v):.{digits}g}")


def lr_plan(learn, n_groups):
    """lr, pct_start, div, div_final and moms of the schedule this fit will apply (fastai's ParamScheduler), as
    `PhaseCheckpoint` records them in a phase's plan."""
    sched = next((cb for cb in learn.cbs if isinstance(cb, ParamScheduler)), None)
    if sched is None or "lr" not in sched.scheds:  # a plain `fit`: constant learning rates
        lrs = [h["lr"] for h in learn.opt.hypers]
        return {"lr": _group_lr(lrs), "pct_start": None, "div": None, "div_final": None, "moms": None}
    pos = np.linspace(0, 1, 1001)
    lrs = np.array([np.broadcast_to(np.asarray(sched.scheds["lr"](float(p)), float), (n_groups,)) for p in pos])
    top = int(lrs[:, -1].argmax())  # the peak of the one cycle: at pct_start
    mom = sched.scheds.get("mom")
    return {"lr": _group_lr(lrs[top]), "pct_start": round(float(pos[top]), 3),
            "div": sig(lrs[top, -1] / lrs[0, -1], 4), "div_final": sig(lrs[top, -1] / max(lrs[-1, -1], 1e-30), 4),
            "moms": None if mom is None else [sig(mom(float(p)), 4) for p in (0.0, pos[top], 1.0)]}


def _group_lr(lrs):
    """One learning rate when every parameter group has it, else `[lo, hi]` (discriminative rates, `slice(lo, hi)`)."""
    lrs = [sig(v) for v in np.ravel(lrs)]
    return lrs[0] if len(set(lrs)) == 1 else [lrs[0], lrs[-1]]


def _differs(now, held):
    norm = (lambda v: list(v) if isinstance(v, tuple) else v)
    return norm(now) != norm(held)


def check_held(learn, values):
    """Stop before a fit when the notebook's parameters (`values`, its `globals()`) are not what the learner and its
    DataLoaders in memory were made with (`learn.made_with`, `dls.made_with`): weight decay, loss and class weights are
    fixed when the learner is built, batch size, size, crops, tri-planar, context slices and the split when the
    DataLoaders are made, so a fit re-run alone would train the old ones (or report the phase trained). Names the cells
    to run again; nothing is trained."""
    dls = learn.dls
    cells = ("the DataLoaders cell (`dls = utils.make_dls(...)`), then the learner cell (`learn = "
             "utils.build_learner(...)`)")
    if values.get("dls") is not None and values["dls"] is not dls:
        raise ParameterError("The learner in memory was built on DataLoaders made before the last run of the "
                             "DataLoaders cell: run the learner cell (`learn = utils.build_learner(...)`) again, then "
                             "this one. Nothing was trained.")
    for what, held, run in (("DataLoaders", getattr(dls, "made_with", {}), cells),
                            ("learner", getattr(learn, "made_with", {}), "the learner cell (`learn = utils.build_learner(...)`)")):
        changed = [f"{k} = {values[k]!r} (made with {v!r})" for k, v in held.items() if k in values and _differs(values[k], v)]
        if changed:
            mode = " (quick or smoke mode: first the cell below the parameters cell, which sets the mode's schedule)" \
                if values.get("quick") or values.get("smoke") else ""
            raise ParameterError(f"The parameters cell says {', '.join(changed)}, but the {what} in memory "
                                 f"{'were' if what == 'DataLoaders' else 'was'} made before: run {run} again{mode}, then this one. Nothing was trained.")


def _confusion_on_device(pred, target, n_classes, scatter=None):
    """The confusion matrix of `pred` and `target` (rows = truth) as an int64 tensor on `pred`'s device; voxels whose
    target is `IGNORE` are not counted.

    On CUDA (or with `scatter=True`) it is counted with a scatter-add, not `torch.bincount`,
    which reads its input's min and max back to the host: a wait for the GPU at every
    validation batch. The adds go to 256 interleaved copies of the n x n counters, summed at
    the end, so that fewer of the GPU's atomic adds hit the same counter.
    """
    p = torch.as_tensor(pred).reshape(-1).long()
    t = torch.as_tensor(target).reshape(-1).to(p.device).long()
    bins = n_classes ** 2 + 1  # the last bin takes the ignored voxels (no boolean indexing: no wait for the GPU)
    idx = torch.where(t == IGNORE, n_classes ** 2, t * n_classes + p)
    if not (p.device.type == "cuda" if scatter is None else scatter):
        return torch.bincount(idx, minlength=bins)[:-1].reshape(n_classes, n_classes)
    lanes = 256
    idx += (torch.arange(idx.numel(), device=idx.device) % lanes) * bins
    counts = torch.zeros(lanes * bins, dtype=torch.long, device=idx.device)
    counts.index_add_(0, idx, torch.ones_like(idx))
    return counts.view(lanes, bins)[:, :-1].sum(0).view(n_classes, n_classes)



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
        cm = _confusion_on_device(pred.argmax(1), y, self.n)
        self._sum = cm if self._sum is None else self._sum + cm

    @property
    def cm(self):
        if self._host is None:
            self._host = (np.zeros((self.n, self.n), np.int64) if self._sum is None else self._sum.cpu().numpy())
        return self._host


def epoch_metrics(codes, background=0):
    """fastai metrics reporting, each epoch, the fossil classes' mean IoU, per-class IoU and Dice and `acc_nonbg` (the
    published metric): on the validation block, since fastai validates there (`loaders.make_dls`)."""
    shared = _SharedConfusion(len(codes))

    class _M(Metric):
        def __init__(self, name, get): self._name, self.get = name, get
        def reset(self): shared.reset()
        def accumulate(self, learn): shared.update(learn.pred, learn.y)
        @property
        def value(self):
            v = self.get(scores_from_confusion(shared.cm, codes, background))
            return float("nan") if v is None else v
        @property
        def name(self): return self._name

    safe = lambda c: re.sub(r"\W+", "_", c).strip("_")  # noqa: E731
    ms = [_M("mean_iou_fossils", lambda s: s["mean_iou_fossils"])]  # not a mean with the background: see metrics
    ms += [_M(f"iou_{safe(c)}", lambda s, c=c: s["iou"][c]) for c in codes]
    ms += [_M(f"dice_{safe(c)}", lambda s, c=c: s["dice"][c]) for c in codes]
    return ms + [_M("acc_nonbg", lambda s: s["pixel_acc_nonbg"])]


def valley(lrs, losses, num_it):
    """fastai's "valley" learning-rate suggestion, for `learn.lr_find(suggest_funcs=valley)`, that survives a loss
    which diverged at once.

    fastai suggests from the recorded steps minus the first tenth and the last five; when the
    loss diverged within those (likely with a short `num_it`), nothing is left and its
    `valley` fails with an IndexError. Here the suggestion is then NaN (no point on the plot)
    and a line says so.
    """
    if len(losses) < 3:
        print(f"lr_find: the loss diverged within {num_it // 10 + len(losses) + 5} steps, too early to suggest a "
              "learning rate; keep the one of the parameters cell, or lower it if training diverges too.")
        return float("nan"), (float("nan"), float("nan"))
    return _fastai_valley(lrs, losses, num_it)
