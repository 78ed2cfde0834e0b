"""Prediction: every slice of a volume at full resolution, as one label TIFF, class probabilities and previews.

The model sees each slice with its context slices, padded to a multiple of 32; with flip TTA it also sees the slice's
three flips; tri-planar models predict the XZ and YZ slices too (weighted down near the volume's ends:
`loaders.plane_weights`). Files are written by background threads while the GPU works on the next batch.
"""
from __future__ import annotations

import collections
import queue
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.learner import load_model as _load_weights
from fastai.vision.all import Pipeline, TensorImage, create_unet_model

from .bundle import read_bundle, resolve_model
from .io import PREDICTION_RECORD, file_stamp, link_or_copy, replacing, write_json, write_label_tiff
from .learner import amp_dtype, encoder
from .metrics import FOSSIL_THRESHOLDS, choose_fossil_threshold  # noqa: F401  (imported from here too)
from .loaders import END_TAPER, batch_tfms, get_device, n_input_channels, plane_weights
from .plots import get_class_colours
from .runtime import Progress, halve_on_oom, local_dir, on_drive, require_mounted
from .sparse import UNLABELLED, fossil_voxels
from .split import CONNECTIVITY, valid_left_out_mask
from .training import checkpoint_files, phase_done, read_record, weights_sha256
from .volume import evenly_spaced, known_voxel_size


def voxel_labels(probs, scale=1.0, fossil_threshold=0.5):
    """Each voxel's label from its class probabilities (`probs`: N x classes x ..., summing to `scale`; a torch
    tensor or a NumPy array): background unless the fossil classes together have more than `fossil_threshold` of the
    probability (0.5: unless they are likelier than background), else the likeliest fossil class.

    Not the plain arg-max: where the model is unsure which fossil a voxel belongs to (the classes' probabilities
    split, say 0.4 background, 0.3 and 0.3), the arg-max calls it background and the specimen shrinks or vanishes;
    here it stays fossil, and the specimen's class is settled per specimen later (extraction, specimen classifier).
    With a single fossil class and the threshold 0.5 this is the arg-max. See docs/evaluation.md, "Fossil or
    background"; 05 chooses the threshold on labelled slices outside the test block (`calibration_slices`)."""
    if probs.shape[1] < 3 and fossil_threshold == 0.5:
        return probs.argmax(1)
    labels = probs[:, 1:].argmax(1) + 1
    labels[probs[:, 0] >= scale * (1 - fossil_threshold)] = 0
    return labels


CALIBRATION_SLICES = 32  # slices of each labelled block (evenly spaced) the threshold is chosen on


def threshold_counts(background, truth, scale=1.0, counted=None):
    """Per threshold of `FOSSIL_THRESHOLDS`: the voxels fossil in both `truth` (bool) and the prediction whose
    background probability is `background` (same shape, summing with the fossil classes to `scale`), and in
    either, among the voxels `counted` (bool; None: all); (2, thresholds) int64, to be summed over blocks and given
    to `choose_fossil_threshold`."""
    out = np.zeros((2, len(FOSSIL_THRESHOLDS)), np.int64)
    background = torch.as_tensor(background)
    truth = torch.as_tensor(truth).bool().to(background.device)
    keep = None if counted is None else torch.as_tensor(counted).bool().to(background.device)
    for i, t in enumerate(FOSSIL_THRESHOLDS):
        fossil = background < scale * (1 - t)
        fossil = fossil if keep is None else fossil & keep
        out[0, i], out[1, i] = int((fossil & truth).sum()), int((fossil | truth).sum())
    return out


def threshold_plan(fossil_threshold, vol, split, bundle=None, model_path=None):
    """05's `fossil_threshold` parameter made `(threshold, slices to choose it on or None)`: a number is used as it
    is; "auto" is chosen on this run's labelled slices outside the test block when its model is this run's own
    (`calibration_slices`), taken from the bundle when the model is one (its training run chose it), else 0.5."""
    if fossil_threshold != "auto":
        return float(fossil_threshold), None
    if bundle is not None:
        return float(bundle.get("fossil_threshold", 0.5)), None
    if model_path is None and vol.labels is not None and split is not None and len(split.train):
        return 0.5, calibration_slices(vol, split)
    return 0.5, None


def calibration_slices(vol, split, connectivity=CONNECTIVITY):
    """The slices of `vol` (which has masks) the fossil threshold is chosen on: up to `CALIBRATION_SLICES` of the
    training block and as many of the validation block (slices the model did not learn from), each evenly spaced,
    ascending. Not with `valid_pct=0` (the validation block is then the test block), and not a validation slice
    holding part of a specimen that reaches the training block (docs/evaluation.md, "The fossil threshold")."""
    labelled = getattr(vol, "labelled", None)  # (sparse labels: only the labelled slices)
    labelled = np.ones(len(vol.labels), bool) if labelled is None else np.asarray(labelled)
    train = np.asarray(split.train)
    train = train[labelled[train]]
    out = [train[evenly_spaced(len(train), CALIBRATION_SLICES)]]
    if not split.published and split.valid_stop > split.valid_start and len(split.test):
        valid = np.asarray(split.valid)
        if split.valid_left_out.get("voxels", 1):  # (the split counted them: 0, none)
            valid = valid[~valid_left_out_mask(vol, split, connectivity).reshape(len(valid), -1).any(1)]
        valid = valid[labelled[valid]]
        out.append(valid[evenly_spaced(len(valid), CALIBRATION_SLICES)])
    return np.sort(np.concatenate(out))


def _calibrate(vol, zs, bs, background_of, calib):
    """Choose `calib["threshold"]` on the slices `zs` of `vol` (which has masks): `background_of(zs)` gives the
    predicted background probability of slices `zs` and its scale."""
    zs, counts = np.asarray(zs), 0
    for i0 in range(0, len(zs), bs):
        z = zs[i0:i0 + bs]
        background, scale = background_of(z)
        truth = np.take(vol.labels, z, axis=0)
        counts = counts + threshold_counts(background, fossil_voxels(truth), scale, truth != UNLABELLED)
    t, iou = choose_fossil_threshold(counts)
    calib.update(threshold=t, chosen_on={"slices": [int(z) for z in zs], "foreground_iou": iou})
    if iou:
        print(f"fossil threshold {t}: chosen on {len(zs)} slices with masks (their foreground IoU {iou[t]:.3f}; "
              f"{iou[0.5]:.3f} at 0.5)")
    else:
        print(f"fossil threshold 0.5: the {len(zs)} slices with masks it would be chosen on hold no fossil")


def load_model(work_dir, name="full_unfrozen", device=None, model_path=None):
    """Rebuild the U-Net of finished phase `name` in `work_dir/models` and load its weights; return `(model, info)`.

    `name` is a phase ("full_unfrozen": its latest attempt) or an attempt ("full_unfrozen.attempt1").
    `info` (the phase's plan and record) holds what prediction must repeat: `context_slices` and `triplanar`;
    and `checkpoint`, the attempt and the SHA-256 of its weights, which every output made with it records.
    `model_path` takes the model from elsewhere (`bundle.resolve_model`): a model bundle (`info` is then its
    `bundle.json`, with `bundle` set) or another training run folder; nothing there is written to.
    """
    if model_path is not None:
        kind, where = resolve_model(model_path, name)
        if kind == "bundle":
            return _load_bundle(read_bundle(where), device)
        work_dir = where
    weights, record = checkpoint_files(work_dir, name)
    if not phase_done(work_dir, name):
        raise FileNotFoundError(f"{weights} not found: run the training notebooks (02-04) first "
                                "with the same work_dir, or set model_name to a checkpoint in models/.")
    info = read_record(work_dir, name)
    sha = weights_sha256(weights)
    if info.get("sha256") not in (None, sha):
        lag = (" On Google Drive, a file written on another runtime moments ago may still be uploading: wait a minute "
               "and run the cell again; if it stays so,") if on_drive(weights) else ""
        raise ValueError(f"{weights} is not the file {record} describes (its SHA-256 differs): it was replaced after "
                         f"training.{lag} Put the trained file back, or train the phase again.")
    base = name.split(".attempt")[0]
    info["checkpoint"] = {"name": f"{base}.attempt{info['attempt']}" if "attempt" in info else name, "sha256": sha}
    info.setdefault("context_slices", 1)  # checkpoints from before these options
    info.setdefault("triplanar", False)
    info["bundle"] = None
    return _build(weights, info, device), info


def _load_bundle(info, device):
    sha = weights_sha256(info["weights"])
    if info["checkpoint"]["sha256"] != sha:
        raise ValueError(f"{info['weights']} is not the file {info['folder']}/bundle.json describes (its SHA-256 "
                         "differs): copy the bundle again from its source.")
    info = {**info, "codes": info["classes"], "bundle": info}
    info["checkpoint"] = {**info["checkpoint"], "bundle": f"{info['name']} v{info['version']}", "source": info["folder"]}
    return _build(info["weights"], info, device), info


def _build(weights, info, device):
    device = device or get_device(verbose=False)
    model = create_unet_model(encoder(info["arch"]), len(info["codes"]), tuple(info["size"]), pretrained=False,
                              n_in=n_input_channels(info["context_slices"]))
    _load_weights(weights, model, None, with_opt=False, device=device, strict=True)
    return model.to(device).eval()


def _padded_forward(model, x, tfms, dtype):
    """Class logits of uint8 slices `x` (B,k,H,W): reflect-pad H and W to multiples of 32, predict, crop back."""
    h, w = x.shape[-2:]
    ph, pw = -h % 32, -w % 32
    xp = tfms(TensorImage(x))
    if ph or pw:
        xp = TensorImage(F.pad(torch.Tensor(xp), (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate"))
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        return model(xp)[..., :h, :w]


TTA_FLIPS = ((), (-1,), (-2,), (-2, -1))  # identity, left-right, up-down, both: the flips of the slice plane


def _forward_probs(model, x, tfms, dtype, tta=False):
    """Class probabilities (float, B x classes x H x W) of uint8 slices `x` (B,k,H,W).

    With `tta`, the mean over the four flips of the slice plane, each prediction flipped
    back before averaging (so the result does not depend on the slice's orientation).
    """
    out = None
    for f in TTA_FLIPS if tta else ((),):
        p = _padded_forward(model, x.flip(f) if f else x, tfms, dtype).float().softmax(1)
        p = p.flip(f) if f else p
        out = p if out is None else out.add_(p)
    return out.div_(4) if tta else out


def _prediction_setup(model, out_dir, device, context_slices):
    """What every prediction path needs: `(model, device, out_dir, batch transforms, autocast dtype)`; the output
    folder is created and, on CUDA, the model is made channels_last."""
    device = device or next(model.parameters()).device
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, device, out_dir, Pipeline(batch_tfms(None, False, device, context_slices), split_idx=1), amp_dtype(device)


def _slices_with_context(arr, idx, context=1, axis=0):
    """uint8 array (B, k, a, b): the slices `idx` of volume `arr` cut across `axis`, each with its k-1 neighbours
    along `axis` as channels (clamped at the volume's ends). Axis 1 gives XZ slices (rows z), axis 2 YZ slices."""
    idx = np.asarray(idx)
    ctx = np.clip(idx[:, None] + np.arange(context) - context // 2, 0, arr.shape[axis] - 1)
    x = np.take(arr, ctx.ravel(), axis=axis)
    x = np.moveaxis(x, axis, 0)
    return np.ascontiguousarray(x.reshape(len(idx), context, *x.shape[1:]))


_COMMIT = "commit"  # after the last page: the writer may now replace the file


class _BackgroundTiff:
    """`write_label_tiff` of `n_pages` pages on a thread: pages are `put` in z order while the GPU works on; the
    file replaces the previous one at `close` (after every other output is written), never at `abort`."""
    def __init__(self, path, n_pages, spacing=None):
        self.path, self.pages, self.error, self.spacing = path, queue.Queue(maxsize=8), None, spacing
        self.thread = threading.Thread(target=self._run, args=(n_pages,), daemon=True)
        self.thread.start()

    def _run(self, n_pages):
        def pages():
            for _ in range(n_pages + 1):
                page = self.pages.get()
                if page is None:  # `abort`: the prediction failed; write_label_tiff removes its partial file
                    raise RuntimeError("prediction aborted")
                if page is not _COMMIT:
                    yield page
        try:
            write_label_tiff(self.path, pages(), self.spacing, n_pages)
        except Exception as e:
            self.error = e

    def put(self, page):
        while True:
            try:
                return self.pages.put(page, timeout=1)
            except queue.Full:
                if not self.thread.is_alive():
                    raise OSError(f"writing {self.path} failed: {self.error}") from None

    def abort(self):
        """Stop the writer after a failed prediction: its partial file is removed, the previous `labels.tif` kept."""
        try:
            self.put(None)
        except OSError:  # the writer had already stopped
            pass
        self.thread.join()

    def close(self):
        self.put(_COMMIT)
        self.thread.join()
        if self.error is not None:
            raise OSError(f"writing {self.path} failed: {self.error}")


PREVIEWS = 16  # about this many preview PNGs per prediction, evenly spaced in z


def predict_volume(model, vol, out_dir, bs=4, device=None, save_probs=True, context_slices=1, tta=False,
                   triplanar=False, checkpoint=None, slice_pngs=False, probs_dir=None, fossil_threshold=0.5,
                   calibrate_on=None, voxel_size_um=None):
    """Predict every slice of `vol` at full resolution; write `labels.tif`, `probs.npy` and a few previews.

    `labels.tif` is the label volume (class indices, `voxel_labels`) as one multi-page TIFF; `previews/`
    holds about `PREVIEWS` PNGs (a slice with its predicted classes in colour, every few
    slices); with `slice_pngs`, also one label PNG per slice, `<stem>.png`, the size of the
    input slice (thousands of files on a full scan: slow on Drive). `probs.npy` (when
    `save_probs`) holds the class probabilities as uint8 (0-255), shape (Z, classes, H, W),
    memory-mapped and written block by block, never whole in RAM, in `probs_dir` (default
    `out_dir`, or when that is on Google Drive, where a memory-mapped file is unreliable, the
    runtime's local disk: `runtime.local_dir`). A progress bar shows slices per second and the time left. Mixed
    precision on CUDA. Returns the label volume (uint8, Z x H x W).

    `context_slices` must be the value the model was trained with (its `info`). `tta`
    averages the four flips of each slice (4x the model time). `triplanar` also predicts
    every XZ and YZ slice and averages the three probabilities per voxel (3x; near the volume's ends the axial
    prediction counts more: `loaders.plane_weights`; see `_predict_triplanar`).

    `fossil_threshold`: a voxel is fossil where the fossil classes together have more than this share of the
    probability (`voxel_labels`). With `calibrate_on` (slices of `vol` with masks: `calibration_slices`, from the
    training and the validation block) it is chosen there instead, among `FOSSIL_THRESHOLDS`, for the best foreground
    IoU on those slices (a short-trained model draws its fossils too thin or too fat; the threshold that best
    matches labelled slices corrects that without looking at the held-out block).

    `labels.tif` carries the voxel size (`voxel_size_um`, else the scan's: `volume.known_voxel_size`) when it is known.
    `prediction.json` beside them records `checkpoint` (`info["checkpoint"]` from `load_model`: the attempt and the
    hash of its weights), the options, and which `probs.npy` goes with these labels (its path and stamp). Everything is
    written to `<out_dir>.partial/` and swapped in whole when complete (`io.replacing`): an interrupted prediction
    leaves the previous complete one, never PNGs of two models. Every other file of `out_dir` is carried over (hard
    links where the disk allows): the previous extraction's `specimens.tif` and `labels_clean.tif`, which go with
    `exports/` until the next extraction, and any file of yours; an older `probs.npy` is not. The swap needs room
    for both predictions for a moment.
    """
    out_dir, spacing = Path(out_dir), known_voxel_size(vol.source, voxel_size_um, vol.dataset)
    require_mounted(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if probs_dir is None and on_drive(out_dir):
        probs_dir = local_dir(out_dir.parent, out_dir.name)
    if probs_dir is not None and Path(probs_dir).resolve() == out_dir.resolve():
        probs_dir = None  # beside the labels: written into the new folder, as by default
    with replacing(out_dir) as new:  # all written beside, then swapped in whole: a kill leaves the old or the new
        new.mkdir()
        ours = {f"{stem}.png" for stem in vol.stems} | {"labels.tif", "probs.npy", "previews", PREDICTION_RECORD}
        for old in (out_dir.iterdir() if out_dir.is_dir() else []):  # the rest stays: the last extraction's files
            if old.name not in ours:                                  # (exports/ describes them) and anyone's own
                (shutil.copytree(old, new / old.name, copy_function=link_or_copy) if old.is_dir()
                 else link_or_copy(old, new / old.name))
        probs_path = new / "probs.npy"
        if probs_dir is not None:  # a name of its own: the previous prediction's file stays until this one is in place
            probs_path = Path(probs_dir) / f"probs.{time.time_ns()}.npy"
            probs_path.parent.mkdir(parents=True, exist_ok=True)
        run = _predict_triplanar if triplanar else _predict_axial
        calib = {"threshold": float(fossil_threshold), "chosen_on": None, "slices": calibrate_on, "spacing": spacing}
        pred, bs = halve_on_oom(lambda b: run(model, vol, new, b, device, probs_path, save_probs, context_slices, tta,
                                              slice_pngs, calib), bs, "prediction")  # (from the start, with half)
        _write_previews(vol, pred, new / "previews")
        write_json(new / PREDICTION_RECORD, {
            "checkpoint": checkpoint, "shape": list(vol.shape), "codes": vol.codes, "context_slices": int(context_slices),
            "tta": bool(tta), "triplanar": bool(triplanar), "slice_pngs": bool(slice_pngs), "bs": int(bs),
            "fossil_threshold": calib["threshold"], "fossil_threshold_chosen_on": calib["chosen_on"],
            "probs_file": file_stamp(probs_path) if save_probs else None,
            "probs_path": None if not save_probs or probs_dir is None else str(probs_path.resolve()),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    if probs_dir is not None:  # this prediction is in place: the earlier ones' probabilities go
        for old in Path(probs_dir).glob("probs.*.npy"):
            if old != probs_path:
                old.unlink(missing_ok=True)
    return pred


def _write_previews(vol, pred, folder):
    """`folder/<stem>.png` for about `PREVIEWS` slices evenly spaced in z: the CT slice, its predicted classes in
    their colours (as in every figure) at half opacity."""
    from PIL import Image
    folder.mkdir(exist_ok=True)
    colours = (get_class_colours(max(len(vol.codes or []), int(pred.max()) + 1))[:, :3] * 255).astype(np.float32)
    for z in evenly_spaced(len(pred), PREVIEWS):
        grey = np.repeat(np.asarray(vol.images[z], np.float32)[..., None], 3, axis=2)
        lab = pred[z]
        rgb = np.where(lab[..., None] > 0, 0.5 * grey + 0.5 * colours[lab], grey)
        Image.fromarray(rgb.round().astype(np.uint8)).save(folder / f"{vol.stems[z]}.png", compress_level=1)



def _predict_axial(model, vol, out_dir, bs, device, probs_path, save_probs, context_slices, tta, slice_pngs, calib):
    """`predict_volume` slice by slice along z (the published method); `calib`: the threshold, its slices, the voxel size."""
    from PIL import Image
    model, device, out_dir, tfms, dtype = _prediction_setup(model, out_dir, device, context_slices)
    if calib["slices"] is not None:  # the threshold first, on a few labelled slices: the labels are made on the fly
        def background_of(zs):
            x = torch.from_numpy(_slices_with_context(vol.images, zs, context_slices)).to(device)
            return _forward_probs(model, x, tfms, dtype, tta)[:, 0], 1.0
        with torch.inference_mode():
            _calibrate(vol, calib["slices"], bs, background_of, calib)
    threshold = calib["threshold"]
    Z, H, W = vol.shape
    pred = np.empty((Z, H, W), np.uint8)
    cuda, bar = device.type == "cuda", Progress(Z, "slices")
    bufs, pending = {}, collections.deque()

    def launch(z0):  # start a batch on the device; its results come back through pinned buffers and an event
        x = torch.from_numpy(_slices_with_context(vol.images, np.arange(z0, min(Z, z0 + bs)), context_slices))
        p = _forward_probs(model, x.to(device, non_blocking=True), tfms, dtype, tta)
        out = [voxel_labels(p, 1.0, threshold).to(torch.uint8)] + ([(p * 255).round_().to(torch.uint8)] if save_probs else [])
        slot, host = (z0 // bs) % 2, []
        for j, t in enumerate(out):
            if (slot, j) not in bufs or bufs[slot, j].shape[1:] != t.shape[1:]:
                bufs[slot, j] = torch.empty((bs, *t.shape[1:]), dtype=torch.uint8, pin_memory=cuda)
            host.append(bufs[slot, j][:len(t)].copy_(t, non_blocking=cuda))
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        return z0, host, event

    def store(z0, p, pr):  # host-side work for one batch, on a worker thread while the GPU runs the next
        if pr is not None:
            probs[z0:z0 + len(p)] = pr
        for k, sl in enumerate(p if slice_pngs else ()):
            Image.fromarray(sl).save(out_dir / f"{vol.stems[z0 + k]}.png", compress_level=1)

    def collect(item):
        nonlocal probs
        z0, host, event = item
        if event is not None:
            event.synchronize()
        p = host[0].numpy().copy()
        pr = host[1].numpy().copy() if save_probs else None
        if pr is not None and probs is None:
            probs = np.lib.format.open_memmap(probs_tmp, "w+", np.uint8, (Z, pr.shape[1], H, W))
        pred[z0:z0 + len(p)] = p
        for sl in p:
            tiff.put(sl)
        pending.append(pool.submit(store, z0, p, pr))
        while len(pending) > 6:  # bounded backlog: at most a few batches held in RAM
            pending.popleft().result()
        bar.step(len(p))

    probs = None  # the memory-mapped probabilities, opened at the first batch (when the class count is known)
    with ExitStack() as files:
        probs_tmp = files.enter_context(replacing(probs_path)) if save_probs else None
        tiff = _BackgroundTiff(out_dir / "labels.tif", Z, calib["spacing"])
        try:
            with ThreadPoolExecutor(3) as pool, torch.inference_mode():
                # double buffering: batch i+1 is launched before batch i is collected, so the GPU never waits
                prev = None
                for z0 in range(0, Z, bs):
                    cur = launch(z0)
                    if prev is not None:
                        collect(prev)
                    prev = cur
                collect(prev)
                while pending:
                    pending.popleft().result()  # re-raises a failed write
        except BaseException:
            tiff.abort()
            raise
        tiff.close()
        if probs is not None:
            probs.flush()
            probs = None  # closed before `replacing` renames the file
    return pred


def _predict_triplanar(model, vol, out_dir, bs, device, probs_path, save_probs, context_slices, tta, slice_pngs,
                       calib):
    """`predict_volume` with tri-planar averaging: every axial, XZ and YZ slice is predicted and the three class
    probabilities of each voxel are averaged in a memory-mapped uint8 file (a running mean, the XZ and YZ views
    weighted by `loaders.plane_weights` along z), one block of slices at a time (256 MB of probabilities, about 1 GB of RAM at
    the peak; big blocks, because a block of YZ slices touches every page of the file); then the labels are read from
    it (`voxel_labels`), written as in `predict_volume`."""
    from PIL import Image
    model, device, out_dir, tfms, dtype = _prediction_setup(model, out_dir, device, context_slices)
    Z, H, W = vol.shape
    pred = np.empty((Z, H, W), np.uint8)
    bar = Progress(Z + H + W, "slices")  # the axial, XZ and YZ slices
    wz = plane_weights(Z)[:, None, None, None]  # (Z, 1, 1, 1): the XZ and YZ views' weight at each slice
    with ExitStack() as files:
        if save_probs:
            part = files.enter_context(replacing(probs_path))
        else:  # the running mean still needs a file; it is removed at the end
            part = probs_path.with_name(f"{probs_path.stem}.scratch.npy")
            files.callback(part.unlink, missing_ok=True)
        probs = None
        with torch.inference_mode():
            for j, axis in enumerate((0, 1, 2)):  # pass j averages its prediction into the mean of the j before it
                n, plane = vol.shape[axis], [d for a, d in enumerate(vol.shape) if a != axis]
                blk = max(bs, 2 ** 28 // max(1, (4 if probs is None else probs.shape[1]) * int(np.prod(plane))))
                for b0 in range(0, n, blk):
                    chunk = []
                    for i0 in range(b0, min(n, b0 + blk), bs):
                        idx = np.arange(i0, min(n, i0 + bs, b0 + blk))
                        x = torch.from_numpy(_slices_with_context(vol.images, idx, context_slices, axis)).to(device)
                        p = _forward_probs(model, x, tfms, dtype, tta)
                        chunk.append((p * 255).round_().to(torch.uint8).cpu().numpy())
                        bar.step(len(idx))
                    p = np.concatenate(chunk)  # (slices of the block, K, a, b), uint8
                    if probs is None:
                        probs = np.lib.format.open_memmap(part, "w+", np.uint8, (Z, p.shape[1], H, W))
                    # to (Z, K, H, W) order: axis 1 blocks are (y, K, z, x), axis 2 blocks (x, K, z, y)
                    p = p if axis == 0 else p.transpose(2, 1, 0, 3) if axis == 1 else p.transpose(2, 1, 3, 0)
                    where = (np.s_[b0:b0 + blk], np.s_[:, :, b0:b0 + blk], np.s_[:, :, :, b0:b0 + blk])[axis]
                    if j:  # weighted running mean in integers, rounded (axial view END_TAPER, others wz; uint16 holds it)
                        acc = probs[where].astype(np.uint16) * (END_TAPER + (j - 1) * wz) + p * wz
                        p = ((acc + (END_TAPER + j * wz) // 2) // (END_TAPER + j * wz)).astype(np.uint8)
                    probs[where] = p

        if calib["slices"] is not None:  # the threshold, on labelled slices of the averaged probabilities
            mean = probs
            _calibrate(vol, calib["slices"], bs, lambda zs: (torch.from_numpy(mean[zs, 0]), 255), calib)
        threshold = calib["threshold"]

        def label_pages(probs):  # the labels (`voxel_labels`), block by block, with the PNGs written beside
            with ThreadPoolExecutor(2) as pool:
                for z0 in range(0, Z, bs):
                    pred[z0:z0 + bs] = voxel_labels(np.asarray(probs[z0:z0 + bs]), 255, threshold)
                    zs = range(z0, min(Z, z0 + bs))
                    if slice_pngs:
                        list(pool.map(lambda z: Image.fromarray(pred[z]).save(out_dir / f"{vol.stems[z]}.png",
                                                                              compress_level=1), zs))
                    yield from (pred[z] for z in zs)
        write_label_tiff(out_dir / "labels.tif", label_pages(probs), calib["spacing"], Z)
        probs.flush()
        del probs
    return pred
