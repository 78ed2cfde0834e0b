"""fastai DataLoaders straight from the volume: slices gathered on the device, resized once per stage,
augmented and normalised batch-wise.

No image is decoded, resized or copied to the GPU per batch: the uint8 volume is resized to
the stage's size once and held as one tensor (on the GPU when it fits); a batch is one
indexing op into it, then fastai's batch transforms run on the device.
"""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F

from fastai.data.core import TfmdDL, explode_types  # (explode_types: fastcore or fasttransform, by version)
from fastai.vision.all import DataLoaders, Normalize, TensorImage, TensorMask, Transform, imagenet_stats

from .augment import Augment, Infill, Scanner
from .metrics import IGNORE
from .runtime import batch_size_for, check_gpu
from .split import split_volume, valid_left_out_mask
from .volume import DatasetError, volume_fingerprint

FOSSIL_CROP_SHARE = 0.5  # training crops centred near a fossil (the others anywhere): fossils are rare voxels


def get_device(verbose=True, cpu_ok=True):
    """Return the torch device to use: CUDA, then Apple MPS, else CPU (with a visible message). In Colab, a runtime
    without a GPU stops here unless `cpu_ok` (quick and smoke mode): the full schedule is for a GPU."""
    check_gpu(torch.cuda.is_available(), cpu_ok)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        if verbose: print(f"Using GPU: {torch.cuda.get_device_name(0)}")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        dev = torch.device("mps")
        if verbose: print("Using Apple GPU (MPS)")
    else:
        dev = torch.device("cpu")
        if verbose: print("No GPU found: running on the CPU (fine for the sample and quick mode, slow for full volumes).")
    return dev


def stage_size(shape, size_frac, smoke=False):
    """(height, width) for training at `size_frac` of slice `shape`.

    The smoke setting caps the longest side (64 px at 1/4 and 1/2, 128 px at full); the
    shorter side never goes below 32 px (the encoder downsamples 32x) unless the slice is smaller.
    """
    h, w = shape[-2:]
    s = size_frac
    if smoke:
        s = min(s, max(64, int(128 * size_frac)) / max(h, w))
    s = min(1.0, max(s, 32 / min(h, w)))
    return int(round(h * s)), int(round(w * s))


class _VolumeDL(TfmdDL):
    """fastai DataLoader whose batches are gathered straight from the volume tensors (on the GPU when they fit).

    `planes` is a list of `(images, labels, lo, hi)`: uint8 tensors of slices stacked on
    dim 0 (the axial volume, or a permuted view of it for XZ / YZ slices), and the index
    range `[lo, hi)` that context slices are clamped to (so a training slice never takes
    context from the held-out block). Items of plane 0 are the z indices `idx`; every
    epoch also draws `extra` random slices from each other plane (tri-planar training).
    A batch holds slices of one plane (`context` adjacent ones as channels) and is one
    indexing op: no per-slice Python, decoding or host-to-device copy on the training path.
    `split` is 0 for training (augmented) and 1 for validation. A `TfmdDL`, so that
    fastai's `show_batch`, `show_results` and `get_preds` work on it.

    `crop` (training, axial plane): each item is a `crop` x `crop` window of its slice
    instead of the whole slice, centred near a labelled fossil pixel (`fg_points[z]`, (n, 2)
    arrays of y, x) for a `FOSSIL_CROP_SHARE` of the items and anywhere for the others; still
    one gather into the volume per batch.

    `weights` (training): a draw weight per item; each epoch then draws its items with
    replacement in those proportions (`oversample_rare`) instead of each once, and
    `fg_weights[z]`, the cumulative weights of `fg_points[z]`, biases the crop centres the
    same way. The epoch's indices are drawn on the host and go to the device in one copy.
    """
    def __init__(self, planes=None, idx=None, context=1, extra=0, split=0, dataset=None, crop=None, fg_points=None,
                 weights=None, fg_weights=None, **kwargs):
        self.planes, self.context, self.extra, self.split = planes, context, extra, split
        self.crop, self.fg_points, self.weights, self.fg_weights = crop, fg_points, weights, fg_weights
        self._cum = None if weights is None else np.cumsum(np.asarray(weights, np.float64)).tolist()
        kwargs.setdefault("do_setup", False)  # the batch transforms need no statistics from the data
        super().__init__(dataset=np.asarray(idx if idx is not None else dataset), **kwargs)

    def new(self, dataset=None, cls=None, **kwargs):  # fastai's `new` (get_preds, show_batch) with the planes kept
        return super().new(dataset, cls, **{"planes": self.planes, "context": self.context, "extra": self.extra,
                                            "split": self.split, "crop": self.crop, "fg_points": self.fg_points,
                                            "weights": self.weights, "fg_weights": self.fg_weights, **kwargs})

    def get_idxs(self):  # fastai's: each item once, shuffled; with `weights`: as many items drawn in proportion
        if self._cum is None or not self.shuffle:
            return super().get_idxs()
        return self.rng.choices(range(len(self.dataset)), cum_weights=self._cum, k=len(self.dataset))

    def before_iter(self):
        super().before_iter()  # TfmdDL's takes the batch transforms' split from a fastai Datasets, which is not here
        self.after_batch.split_idx = self.split

    def _one_pass(self):  # TfmdDL's builds an item from the dataset to learn the batch types; here they are known
        self._n_inp, self._types = 1, explode_types((TensorImage(torch.zeros(1)), TensorMask(torch.zeros(1))))

    def _plane_sizes(self):
        return [len(self.dataset)] + [self.extra] * (len(self.planes) - 1)

    def __len__(self):
        nb = lambda n: n // self.bs if self.drop_last else -(-n // self.bs)  # noqa: E731
        return sum(nb(n) for n in self._plane_sizes())

    def create_batches(self, samps):
        groups = [np.asarray(self.dataset[list(samps)])]
        groups += [np.array([self.rng.randrange(len(p[0])) for _ in range(self.extra)], np.int64) for p in self.planes[1:]]
        batches = []  # (plane, start, stop) into the concatenated indices
        off = 0
        for p, g in enumerate(groups):
            stop = len(g) - len(g) % self.bs if self.drop_last else len(g)
            batches += [(p, off + i, off + min(i + self.bs, stop)) for i in range(0, stop, self.bs)]
            off += len(g)
        if len(groups) > 1 and self.shuffle:
            self.rng.shuffle(batches)
        # All the epoch's indices go to the volume's device in ONE copy: a per-batch host-to-device copy would
        # make the CPU wait for the GPU every step and stop it preparing the next batch.
        images = self.planes[0][0]
        host_idx = np.concatenate(groups).astype(np.int64)
        idx = torch.as_tensor(host_idx, device=images.device)
        offs = torch.arange(self.context, device=images.device) - self.context // 2
        for p, a, b in batches:
            imgs, labels, lo, hi = self.planes[p]
            z = idx[a:b]
            zz = (z[:, None] + offs).clamp_(lo, hi - 1)
            if self.crop and p == 0:
                rows, cols = self._crop_windows(host_idx[a:b], imgs.shape[-2:], imgs.device)
                yield (TensorImage(imgs[zz[:, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]),
                       TensorMask(labels[z[:, None, None], rows[:, :, None], cols[:, None, :]]))
            else:
                yield TensorImage(imgs[zz]), TensorMask(labels[z])

    def _crop_windows(self, zs, shape, device):
        """Row and column indices (B, crop) of one crop window per slice `zs`, drawn on the host with `self.rng`."""
        (H, W), c, r = shape, self.crop, self.rng
        y0, x0 = np.empty(len(zs), np.int64), np.empty(len(zs), np.int64)
        for i, z in enumerate(zs):
            pts = self.fg_points.get(int(z)) if self.fg_points else None
            if pts is not None and len(pts) and r.random() < FOSSIL_CROP_SHARE:
                cum = self.fg_weights.get(int(z)) if self.fg_weights else None
                k = r.randrange(len(pts)) if cum is None else r.choices(range(len(pts)), cum_weights=cum)[0]
                cy, cx = pts[k]  # a fossil pixel (of a rare class more often), somewhere in the window's middle half
                cy, cx = cy + r.randint(-c // 4, c // 4), cx + r.randint(-c // 4, c // 4)
            else:
                cy, cx = r.randrange(H), r.randrange(W)
            y0[i], x0[i] = min(max(cy - c // 2, 0), H - c), min(max(cx - c // 2, 0), W - c)
        ar = np.arange(c)
        return (torch.as_tensor(y0[:, None] + ar, device=device), torch.as_tensor(x0[:, None] + ar, device=device))


def _fossil_points(labels, idx, per_slice=512, seed=0, class_weight=None):
    """({z: (n, 2) int array of (y, x)} of up to `per_slice` labelled fossil pixels of each slice `idx` of `labels`,
    {z: their cumulative draw weights}), the weights from `class_weight` (one per class; None: no weights, each pixel
    as likely)."""
    rng, out, cum = np.random.default_rng(seed), {}, {}
    for z in idx:
        lab = labels[int(z)]
        pts = torch.nonzero((lab > 0) & (lab != IGNORE)).cpu().numpy()
        if len(pts) > per_slice:
            pts = pts[rng.choice(len(pts), per_slice, replace=False)]
        if len(pts):
            out[int(z)] = pts
            if class_weight is not None:
                cls = labels[int(z)][tuple(torch.as_tensor(pts.T, device=labels.device))].cpu().numpy()
                cum[int(z)] = np.cumsum(np.asarray(class_weight, np.float64)[cls]).tolist()
    return out, cum


def slice_class_counts(labels, idx, n_classes):
    """(len(idx), n_classes) int64 array: how many pixels of each class each slice `idx` of `labels` (a tensor) holds."""
    if not len(idx):
        return np.zeros((0, n_classes), np.int64)
    counts = [torch.bincount(labels[int(z)].flatten(), minlength=n_classes)[:n_classes] for z in idx]
    return torch.stack(counts).cpu().numpy().astype(np.int64)


def draw_weights(counts, oversample_rare):
    """Each class's draw weight from its pixel `counts` over the training block: a fossil class `n` times rarer than
    the commonest fossil class weighs `min(n, oversample_rare)`, so that over-drawing evens the fossil classes out at
    most and never makes the rare one the common one; the commonest, background and classes absent from the
    training block weigh 1."""
    counts = np.asarray(counts, np.float64)
    w = np.ones(len(counts))
    fossil = [k for k in range(1, len(counts)) if counts[k] > 0]
    if fossil:
        hi = max(counts[k] for k in fossil)
        for k in fossil:
            w[k] = min(hi / counts[k], float(oversample_rare))
    return w


def _to_tensor(arr, where, size=None, mask=False, compute=None, chunk=64):
    """Copy a (possibly memory-mapped) uint8 (Z, H, W) array to a tensor on `where`, chunk by chunk (no full host copy).

    With `size` (height, width), every slice is resized on the way, on `compute` (the
    training device), exactly as `_ResizeBatch` would resize it in a batch (`mask`: nearest).
    A training stage below full resolution thus resizes each slice once, not once per batch
    it appears in, and keeps only the small volume.
    """
    full = tuple(arr.shape[1:])
    size = full if size is None else tuple(size)
    out = torch.empty((len(arr), *size), dtype=torch.uint8, device=where)
    for z in range(0, len(arr), chunk):
        x = torch.from_numpy(np.array(arr[z:z + chunk]))  # a copy: the cache is a read-only memory map
        if size != full:
            x = x.to(compute or where)
            x = _resize_masks(x, size) if mask else _resize_images(x[:, None], size)[:, 0]
        out[z:z + chunk].copy_(x)
    return out


def _volume_device(nbytes, device):
    """The GPU when `nbytes` (the uint8 training volume) take at most a third of its free memory, else the CPU
    (batches are then copied)."""
    if device.type != "cuda":
        return torch.device("cpu")
    return device if nbytes < torch.cuda.mem_get_info(device)[0] / 3 else torch.device("cpu")


def _resize_images(x, size):
    """uint8 (B, C, H, W) -> (B, C, *size): bilinear with antialiasing, rounded back to uint8."""
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False,
                         antialias=True).round_().clamp_(0, 255).to(torch.uint8)


def _resize_masks(x, size):
    """uint8 label slices (B, H, W) -> (B, *size), nearest (labels are never blended)."""
    return F.interpolate(x[:, None].float(), size=size, mode="nearest-exact")[:, 0].to(torch.uint8)


class _ResizeBatch(Transform):
    """Resize a batch on its device: bilinear (antialiased) for images, nearest for masks.

    `size` is the output (height, width), or a dict from input to output size (tri-planar
    batches come in several shapes). A side under 32 px is then padded (edge pixels
    repeated, masks alike) to 32, the encoder's downsampling factor.
    """
    order = 1

    def __init__(self, size=None):
        super().__init__()
        self.size = size if size is None or isinstance(size, dict) else tuple(size)

    def _out(self, shape):
        return self.size.get(tuple(shape), tuple(shape)) if isinstance(self.size, dict) else self.size

    @staticmethod
    def _pad(x):
        ph, pw = max(0, 32 - x.shape[-2]), max(0, 32 - x.shape[-1])
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x

    def encodes(self, x: TensorImage):
        size = self._out(x.shape[-2:])
        if size is not None and tuple(x.shape[-2:]) != size:
            x = _resize_images(x, size)
        return TensorImage(self._pad(x))

    def encodes(self, x: TensorMask):  # noqa: F811  (fastai type dispatch)
        size = self._out(x.shape[-2:])
        if size is not None and tuple(x.shape[-2:]) != size:
            x = _resize_masks(x, size)
        return TensorMask(self._pad(x[:, None])[:, 0])


class _ToFloat(Transform):
    """uint8 slices (B,k,H,W) -> float in [0,1]; a lone slice (k=1) is repeated to the 3 channels of the ImageNet
    encoder. Masks -> long. Decoding (`show_batch`, `show_results`) keeps the centre slice, as gray RGB, and gives
    masks their class names `codes` (so every class keeps its colour)."""
    order = 10

    def __init__(self, codes=None):
        super().__init__()
        self.codes = codes

    def encodes(self, x: TensorImage):
        x = x.float().div_(255)
        return TensorImage(x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x)

    def encodes(self, x: TensorMask): return TensorMask(x.long())  # noqa: F811

    def decodes(self, x: TensorImage):
        mid = x.shape[1] // 2
        return TensorImage(x[:, mid:mid + 1].expand(-1, 3, -1, -1).clamp(0, 1))

    def decodes(self, x: TensorMask):  # noqa: F811  (voxels no score counts, `IGNORE`, shown as background)
        return TensorMask(torch.where(x == IGNORE, torch.zeros_like(x), x), codes=self.codes)


def n_input_channels(context):
    """Input channels of the model for `context` slices: one gray slice is fed as 3 identical channels."""
    if not isinstance(context, (int, np.integer)) or context < 1 or context % 2 == 0:
        raise ValueError(f"context_slices must be an odd number >= 1 (the slice and as many neighbours on each side), "
                         f"not {context!r}")
    return 3 if context == 1 else int(context)


def _normalize(context, cuda):
    """ImageNet normalisation; with k != 3 context slices every channel gets the mean of the 3 channels' statistics."""
    n = n_input_channels(context)
    if n == 3:
        return Normalize.from_stats(*imagenet_stats, cuda=cuda)
    m, sd = (float(np.mean(v)) for v in imagenet_stats)
    return Normalize.from_stats([m] * n, [sd] * n, cuda=cuda)


class _ChannelsLast(Transform):
    """Last batch transform on CUDA: channels_last images, the memory layout the mixed-precision convolutions prefer."""
    order = 100

    def encodes(self, x: TensorImage): return x.contiguous(memory_format=torch.channels_last)


def batch_tfms(size=None, augment=False, device=None, context=1, codes=None, infill=0.0, scanner=0.0):
    """Batch transforms run on the device: resize to `size`, to float, augment (refilling the fossils of a share
    `infill` of the slices first, `augment.Infill`; then showing a share `scanner` as another scanner would,
    `augment.Scanner`), ImageNet-normalise."""
    cuda = device is not None and device.type == "cuda"
    tfms = [_ResizeBatch(size), _ToFloat(codes)]
    if augment and infill:
        tfms.append(Infill(infill))
    if augment:
        tfms.append(Augment())
    if augment and scanner:
        tfms.append(Scanner(scanner))
    tfms.append(_normalize(context, cuda))
    return tfms + [_ChannelsLast()] if cuda else tfms


def _orthogonal_planes(images, labels, train_start, train_stop):
    """XZ and YZ slices cut from the training block only (`train_start <= z < train_stop`): `(images, labels, lo, hi)`
    per plane."""
    out = []
    for perm in ((1, 0, 2), (2, 0, 1)):  # XZ: (y, z, x); YZ: (x, z, y)
        block = slice(train_start, train_stop)
        im, lb = images[block].permute(*perm), labels[block].permute(*perm)
        out.append((im, lb, 0, len(im)))
    return out


END_TAPER = 16  # slices from each end of the volume over which the XZ and YZ views' weight grows to the axial one's


def plane_weights(n_slices, taper=END_TAPER):
    """The weight of the XZ and YZ predictions at each of `n_slices` slices in the tri-planar mean, in 1/`taper` of
    the axial prediction's: 1 on the volume's first and last slice, one more each slice inward, `taper` (equal
    weights, a plain mean) from `taper - 1` slices in.

    Why: the XZ and YZ training images are cut from the training block, whose first and last slices never hold part
    of a specimen (the split's gaps keep every labelled specimen inside one block), so those views learnt that an
    image's top and bottom rows hold no fossil; on the volume's own first and last slices, where a specimen is cut by
    the end of the scan, they call it background (development, ostracods_commoner: 0.2 of its fossil voxels found on
    the first six slices by the XZ and YZ views, 0.93 by the axial one; docs/evaluation.md, "The volume's ends")."""
    d = np.minimum(np.arange(n_slices), n_slices - 1 - np.arange(n_slices))
    return np.minimum(taper, d + 1).astype(np.uint16)


def make_dls(vol, size_frac=1.0, bs=8, split=None, smoke=False, augment=True, device=None, seed=0,
             context_slices=1, triplanar=False, crop_size=None, oversample_rare=1.0, infill_augment=0.0,
             scanner_augment=0.0):
    """fastai DataLoaders over `vol` at `size_frac` of full resolution: the training block of `split` (a `Split` from
    `split.split_volume`; None: its defaults) trains and its validation block validates; the test block and the gaps
    are never read (with `valid_pct=0`, the published recipe, the test block validates). `bs` None: the batch that
    fits the GPU's free memory (`runtime.batch_size_for`); `dls.made_with` keeps None, the loaders the batch size used.

    The validation block's voxels of a specimen that also reaches the training block (a gap capped below its height)
    are labelled `metrics.IGNORE`: no per-epoch score and no validation loss counts them, as 05's test scores do not.

    The uint8 volume is resized to the stage size once and held as one tensor (on the GPU
    when it fits); batches are gathered from it, then augmented and normalised batch-wise
    on `device`: no image is decoded or resized per batch. `context_slices` (odd k) feeds
    each slice with its k-1 neighbours as input channels (clamped at the ends of its block).
    `triplanar` also trains on XZ and YZ slices cut from the training block (never from a
    gap or another block): every epoch sees each axial training slice and as many
    random XZ and as many random YZ slices, resized by the same factor; validation stays on
    the axial validation block. `seed` seeds the order of the training slices (`PhaseCheckpoint`
    seeds everything again when a phase starts training). `dls.split` is the `Split`.

    `crop_size` (px, at the stage size): train on `crop_size` x `crop_size` windows of the
    training slices instead of whole slices, half of them centred near a labelled fossil
    (fossils are a fraction of a percent of the voxels); an epoch draws as many windows as
    cover the training slices' area once. Validation stays on whole slices. None, or a crop
    as large as the slice: whole slices (the published recipe).

    `oversample_rare` (1: off): a training slice holding a fossil class `n` times rarer (in
    the training block's pixels) than the commonest fossil class is drawn `min(n,
    oversample_rare)` times as often as one without (`draw_weights`; a slice takes the weight
    of its rarest class), and fossil-centred crops pick that class's pixels as much more
    often. `dls.class_counts` holds the training block's pixels per class at the stage size.

    `infill_augment` (0: off): the share of training slices whose labelled fossils get their inside refilled at a
    random gray (`augment.Infill`), so that hollow and sediment-filled specimens of a class look alike.

    `scanner_augment` (0: off): the share of training slices shown as another scanner would give them (random
    noise, `augment.Scanner`), so that the model holds on a noisier scan; another scan's contrast and gamma are
    undone when it is predicted (`bundle.matched_volume`).

    Sparse labels (`vol.labelled`, `sparse`): only labelled slices train and validate, and an epoch still draws as many
    slices as the training block holds (each labelled one about block / labelled times), so that a schedule trains
    as many steps however many slices were labelled; unlabelled slices serve as context and in the XZ and YZ cuts,
    whose unlabelled rows no loss counts.
    """
    if vol.labels is None:
        raise DatasetError(f"{vol.source} has no labels: training needs them (train_masks_labels/, <name>_GT<ext> "
                           "beside the scan, or labels_path).")
    n_input_channels(context_slices)
    device = device or get_device(verbose=False)
    split = split_volume(vol) if split is None else split
    if len(split.valid) == 0:
        raise DatasetError(f"The split of {vol.source} has no validation block and no test block to validate on: "
                           "set test_pct above 0.")
    labelled = np.asarray(vol.labelled if vol.labelled is not None else np.ones(len(vol.images), bool))
    block, train_idx, valid_idx = split.train, split.train[labelled[split.train]], split.valid[labelled[split.valid]]
    size = stage_size(vol.shape, size_frac, smoke)
    crop = int(crop_size) if crop_size and int(crop_size) < min(size) else None
    if crop is not None and crop < 32:
        raise ValueError(f"crop_size={crop_size} is below 32 px, the encoder's downsampling factor: use 32 or more.")
    if crop is not None and triplanar:
        raise ValueError("crop_size and triplanar=True together are not supported: set crop_size=None for tri-planar "
                         "training (its XZ and YZ slices are already small).")
    made_with = dict(size_frac=size_frac, bs=bs, seed=seed, context_slices=context_slices, triplanar=triplanar,
                     crop_size=crop_size, oversample_rare=oversample_rare, infill_augment=infill_augment,
                     scanner_augment=scanner_augment, test_pct=split.test_pct, valid_pct=split.valid_pct,
                     gap_slices=getattr(split, "gap_slices", None))
    # The volume is held once at the stage size (tri-planar: at full size, since its XZ/YZ slices are resized
    # along z too); batches are then gathered from it with no per-batch resize.
    held = vol.shape[1:] if triplanar else size
    where = _volume_device(2 * len(vol.images) * held[0] * held[1], device)
    images = _to_tensor(vol.images, where, held, compute=device)
    labels = _to_tensor(vol.labels, where, held, mask=True, compute=device)
    if bs is None:  # from what is free now, the volume there (`runtime.batch_size_for`)
        bs, why = batch_size_for(size, device)
        print(f"batch size {bs} (bs=None: {why})")
    bs = max(1, min(bs, len(block)))
    # no score counts these voxels (the test scores of 05 neither); with nothing held out, validation is training
    ignore = valid_left_out_mask(vol, split) if split.held_out else np.zeros(0, bool)
    if ignore.any():
        valid_labels = labels[split.valid_start:split.valid_stop]
        valid_labels[_to_tensor(ignore.view(np.uint8), where, held, mask=True, compute=device).bool()] = IGNORE
    n_train = len(block)
    planes = [(images, labels, split.train_start, split.train_stop)]
    train_size = size
    if triplanar:
        planes += _orthogonal_planes(images, labels, split.train_start, split.train_stop)
        (H, W), s = vol.shape[1:], size[0] / vol.shape[1]
        train_size = {(H, W): size, (n_train, W): (max(1, round(n_train * s)), size[1]),
                      (n_train, H): (max(1, round(n_train * s)), size[0])}
    common = dict(bs=bs, num_workers=0, device=device, context=context_slices)
    if not oversample_rare or oversample_rare < 1:
        raise ValueError(f"oversample_rare={oversample_rare!r}: use 1 (every slice as likely) or more.")
    for name, share in (("infill_augment", infill_augment), ("scanner_augment", scanner_augment)):
        if not 0 <= share <= 1:
            raise ValueError(f"{name}={share!r}: use a share from 0 (off) to 1 (every training slice).")
    per_slice = slice_class_counts(labels, train_idx, len(vol.codes))
    counts = per_slice.sum(0)
    class_weight = draw_weights(counts, oversample_rare) if oversample_rare != 1 else None
    weights = None if class_weight is None else (class_weight * (per_slice > 0)).max(1).clip(1.0)
    items, fg_points, fg_weights = train_idx, None, None
    if len(train_idx) < n_train:  # sparse labels: an epoch draws as many slices as the block holds
        items, weights = np.resize(train_idx, n_train), None if weights is None else np.resize(weights, n_train)
    if crop is not None:
        train_size = (crop, crop)
        reps = max(1, round(size[0] * size[1] / crop ** 2))  # an epoch covers the area once
        items, weights = np.repeat(items, reps), None if weights is None else np.repeat(weights, reps)
        fg_points, fg_weights = _fossil_points(labels, train_idx, seed=seed, class_weight=class_weight)
    # the last short batch is dropped when there are two or more batches, or when it would hold one slice alone
    # (BatchNorm cannot train on a batch of one)
    drop_last = len(items) >= 2 * bs or (len(items) > bs and len(items) % bs == 1)
    train = _VolumeDL(planes=planes, idx=items, shuffle=True, drop_last=drop_last,
                      extra=n_train if triplanar else 0, split=0, crop=crop, fg_points=fg_points,
                      weights=None if weights is None else weights.tolist(), fg_weights=fg_weights,
                      after_batch=batch_tfms(train_size, augment, device, context_slices, vol.codes, infill_augment,
                                             scanner_augment),
                      **common)
    train.rng = random.Random(seed)
    valid = _VolumeDL(planes=[(images, labels, split.valid_start, split.valid_stop)],
                      idx=valid_idx, shuffle=False, split=1,
                      after_batch=batch_tfms(size, False, device, context_slices, vol.codes), **common)
    dls = DataLoaders(train, valid, device=device)
    dls.c, dls.codes, dls.size, dls.valid_idx, dls.split = len(vol.codes), vol.codes, size, valid_idx, split
    dls.context_slices, dls.triplanar, dls.seed, dls.crop_size = int(context_slices), bool(triplanar), int(seed), crop
    dls.class_counts, dls.oversample_rare, dls.infill_augment = counts, float(oversample_rare), float(infill_augment)
    dls.scanner_augment, dls.made_with = float(scanner_augment), made_with  # (the parameters, for `check_held`)
    dls.trained_on = volume_fingerprint(vol)  # recorded with the weights: 05 then knows its own training scan
    return dls
