"""Throughput and memory of the project's own data path against the raw model, in one run; prints one JSON.

    python bench/benchmark.py                # on a GPU: a full-size volume (983 x 1004 x 956), the real batch sizes
    python bench/benchmark.py --tiny         # CPU smoke test: tiny sizes, only checks that every figure is produced

For each stage size (1/4, 1/2, full) it reports:
- `data_path_slices_per_s`: training slices/s through `make_dls` + fastai's Learner (unfrozen,
  mixed precision on CUDA, `--context-slices` slices per input: 3, the notebooks' default), the way
  notebooks 02-04 train;
- `raw_model_slices_per_s`: training steps of the same U-Net on synthetic tensors already on the
  device (same batch size, precision and memory format), measured in the same run;
- `ratio` = data path / raw model;
- `batches_alone_slices_per_s`: the same training batches without a model (what the data path can feed);
- `setup_s`: seconds to build that stage's DataLoaders, once per stage (the volume is copied to the
  device and resized to the stage size there, not in every batch);
- `peak_rss_gb` (host) and `peak_gpu_gb` (torch allocator) during that stage.
For whole-volume inference: `predict_and_write_s` (`predict_volume`: every slice at full
resolution, label PNGs, label TIFF and probabilities written) against `raw_forward_s` (forward
passes alone on device tensors of the same padded size), and their ratio; without flip TTA, which
runs the forward pass four times by design.
`--triplanar` measures the notebooks' default: training epochs that also hold XZ and YZ slices of the
training block (the volume held at full size, each batch resized to the stage's factor) and a prediction
of the three planes, averaged (three passes over the volume by design; the raw forward figure stays one
axial pass). Without it, axial slices only: the published recipe.
The volume is synthetic random data held in memory: speed does not depend on the content.
"""
import argparse
import gc
import itertools
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from fastai.callback.core import Callback, CancelFitException, CancelValidException  # noqa: E402

from fastai.vision.all import create_unet_model  # noqa: E402

from microfossil.learner import amp_dtype, build_learner, encoder  # noqa: E402
from microfossil.loaders import get_device, make_dls, n_input_channels  # noqa: E402
from microfossil.prediction import predict_volume  # noqa: E402
from microfossil.volume import Volume  # noqa: E402


class _PeakRSS:
    """Samples this process's resident memory every 20 ms (Linux /proc), so each stage gets its own peak."""
    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _rss():
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS"))
    except (OSError, StopIteration):  # not Linux: the process-wide peak is the best there is
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_gpu(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _gpu_peak(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


class _TimeBatches(Callback):
    """Times `iters` training batches after `warmup` ones, then stops the fit."""
    order = 0

    def __init__(self, warmup, iters): self.warmup, self.iters, self.n, self.t0 = warmup, iters, 0, None

    def before_batch(self):
        if self.n == self.warmup:
            _sync(self.dls.device)
            self.t0 = time.perf_counter()

    def before_validate(self): raise CancelValidException()  # training batches only

    def after_batch(self):
        self.n += 1
        if self.n == self.warmup + self.iters:
            _sync(self.dls.device)
            self.seconds = time.perf_counter() - self.t0
            raise CancelFitException()


def _synthetic_volume(z, h, w, n_classes, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (z, h, w), dtype=np.uint8)
    labels = (images // (256 // n_classes + 1)).astype(np.uint8)
    return Volume(images=images, labels=labels, codes=[f"class{i}" for i in range(n_classes)],
                        stems=[f"s{i:04d}" for i in range(z)], source=Path("synthetic"))


def _raw_train(size, bs, n_classes, device, warmup, iters, context=1, arch="resnet34"):
    """Slices/s of plain training steps of the same U-Net on tensors already on the device."""
    n_in = n_input_channels(context)
    model = create_unet_model(encoder(arch), n_classes, size, pretrained=False, n_in=n_in).to(device)
    dtype = amp_dtype(device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    x = torch.randn(bs, n_in, *size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, n_classes, (bs, *size), device=device)
    for i in range(warmup + iters):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    _sync(device)
    return bs * iters / (time.perf_counter() - t0)


def _batches_alone(dl, warmup, iters, device):
    """Slices/s of the training DataLoader by itself (gather, augment, normalise; no model): what it can feed."""
    batches = itertools.chain.from_iterable(itertools.repeat(dl))  # epoch after epoch
    for _ in itertools.islice(batches, warmup):
        pass
    _sync(device)
    t0 = time.perf_counter()
    for _ in itertools.islice(batches, iters):
        pass
    _sync(device)
    return dl.bs * iters / (time.perf_counter() - t0)


def bench_stage(vol, frac, bs, device, warmup, iters, work, context=1, triplanar=False):
    """Data-path and raw-model training throughput at `frac` of full resolution."""
    _reset_gpu(device)
    with _PeakRSS() as rss:
        t0 = time.perf_counter()
        dls = make_dls(vol, frac, bs, device=device, context_slices=context, triplanar=triplanar)
        _sync(device)
        setup = time.perf_counter() - t0
        batches = _batches_alone(dls.train, warmup, iters, device)
        learn = build_learner(dls, pretrained=False, work_dir=work, metrics=False)
        learn.unfreeze()
        timer = _TimeBatches(warmup, iters)
        n_batches = len(dls.train)
        with learn.no_bar(), learn.no_logging():
            learn.fit(max(1, -(-(warmup + iters) // n_batches)) + 1, 1e-4, cbs=timer)
        data = dls.bs * iters / timer.seconds
        size = dls.size
        del learn, dls
        _reset_gpu(device)
        raw = _raw_train(size, bs, len(vol.codes), device, warmup, iters, context)
    return {"size": list(size), "bs": bs, "setup_s": _sig(setup), "batches_alone_slices_per_s": _sig(batches),
            "data_path_slices_per_s": _sig(data),
            "raw_model_slices_per_s": _sig(raw), "ratio": round(data / raw, 3),
            "peak_rss_gb": round(rss.peak / 2**30, 2), "peak_gpu_gb": _round(_gpu_peak(device))}


def bench_inference(vol, bs, device, work, context=1, triplanar=False):
    """`predict_volume` (predict and write) against raw forward passes over the same slices."""
    n_in = n_input_channels(context)
    model = create_unet_model(encoder("resnet34"), len(vol.codes), vol.shape[1:], pretrained=False, n_in=n_in)
    model = model.to(device).eval()
    _reset_gpu(device)
    with _PeakRSS() as rss:
        head = Volume(images=vol.images[:bs], labels=None, codes=vol.codes, stems=vol.stems[:bs], source=vol.source)
        predict_volume(model, head, work / "pred_warmup", bs, device, context_slices=context,  # warm-up (kernels)
                       triplanar=triplanar)
        _sync(device)
        t0 = time.perf_counter()
        predict_volume(model, vol, work / "pred", bs, device, context_slices=context, triplanar=triplanar)
        _sync(device)
        predict = time.perf_counter() - t0
    peak_gpu = _gpu_peak(device)
    z, h, w = vol.shape
    dtype = amp_dtype(device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.randn(bs, n_in, h + (-h % 32), w + (-w % 32), device=device).contiguous(memory_format=fmt)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        model(x)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for z0 in range(0, z, bs):
            model(x[: min(bs, z - z0)]).argmax(1)
        _sync(device)
        raw = time.perf_counter() - t0
    return {"slices": z, "bs": bs, "predict_and_write_s": round(predict, 2), "raw_forward_s": round(raw, 2),
            "ratio": round(predict / raw, 3), "peak_rss_gb": round(rss.peak / 2**30, 2),
            "peak_gpu_gb": _round(peak_gpu)}


def _round(v): return None if v is None else round(v, 2)


def _sig(v): return float(f"{v:.3g}")  # 3 significant digits: slow CPU rates (0.2 slices/s) keep their precision


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 6 slices of 64x72, 2 timed iterations")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("Z", "H", "W"), help="volume size (default 983 1004 956)")
    ap.add_argument("--bs", type=int, nargs=3, default=[16, 16, 4], metavar=("Q", "H", "F"),
                    help="training batch size at 1/4, 1/2 and full resolution (the notebooks' defaults)")
    ap.add_argument("--infer-bs", type=int, default=4)
    ap.add_argument("--iters", type=int, default=30, help="timed training iterations per stage")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--stages", type=float, nargs="*", default=[0.25, 0.5, 1.0], help="training stages (none: inference only)")
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--context-slices", type=int, default=3, help="slices per input (the notebooks' default: 3)")
    ap.add_argument("--triplanar", action="store_true",
                    help="also XZ and YZ training slices and a three-plane prediction (the notebooks' default)")
    ap.add_argument("--out", help="also write the JSON to this file")
    args = ap.parse_args(argv)
    if args.tiny:
        args.shape, args.bs, args.iters, args.warmup, args.infer_bs = args.shape or [6, 64, 72], [2, 2, 2], 2, 1, 2
    shape = args.shape or [983, 1004, 956]
    device = get_device(verbose=False)
    torch.manual_seed(0)
    vol = _synthetic_volume(*shape, args.classes)
    res = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "precision": str(amp_dtype(device) or "float32"),
           "volume": shape, "context_slices": args.context_slices, "triplanar": args.triplanar, "cpu_count": os.cpu_count(), "stages": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for frac, bs in zip(args.stages, args.bs):
            res["stages"][str(frac)] = bench_stage(vol, frac, bs, device, args.warmup, args.iters, Path(tmp),
                                                   args.context_slices, args.triplanar)
            print(f"stage {frac}: {res['stages'][str(frac)]}", file=sys.stderr, flush=True)
        res["inference"] = bench_inference(vol, args.infer_bs, device, Path(tmp), args.context_slices, args.triplanar)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return res


if __name__ == "__main__":
    main()
