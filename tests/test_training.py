"""DataLoaders, the learner, checkpoints across stage sizes, resume after an interruption."""
import json
import sys
import time
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.learner import AvgSmoothLoss
from fastai.torch_core import TensorImage, find_bs

import utils


@pytest.fixture(scope="module")
def odd_vol(tmp_path_factory):
    """A volume with odd slice sizes (141 x 133)."""
    ds = utils.make_sample(tmp_path_factory.mktemp("odd") / "ds", n_slices=6, height=141, width=133, seed=4)
    return utils.load_volume(ds)


def test_stage_sizes():
    assert utils.stage_size((983, 1004, 956), 0.25) == (251, 239)
    assert utils.stage_size((983, 1004, 956), 0.5) == (502, 478)
    assert utils.stage_size((983, 1004, 956), 1.0) == (1004, 956)
    assert max(utils.stage_size((983, 1004, 956), 0.25, quick=True)) == 64
    assert max(utils.stage_size((983, 1004, 956), 1.0, quick=True)) == 128
    assert min(utils.stage_size((10, 96, 96), 0.25)) == 32  # floor: the encoder downsamples 32x


def test_batches_resized_and_aligned(odd_vol):
    dls = utils.make_dls(odd_vol, 0.5, bs=2, device=torch.device("cpu"))
    x, y = dls.valid.one_batch()
    assert x.shape == (1, 3, 70, 66) and x.dtype == torch.float32  # 6 slices: a 1-slice validation block
    assert y.shape == (1, 70, 66) and y.dtype == torch.int64
    assert abs(float(x.mean())) < 3  # ImageNet-normalised
    assert set(torch.unique(y).tolist()) <= {0, 1, 2}
    xt, yt = dls.train.one_batch()  # augmented training batch keeps image and mask shapes aligned
    assert xt.shape[-2:] == yt.shape[-2:] == (70, 66)


def test_volume_resized_once_gives_the_batches_of_a_per_batch_resize(odd_vol):
    """The stage-size volume held by the DataLoaders gives the same batches, bit for bit, as gathering
    full-size slices (with their context neighbours) and resizing each batch, as the data path used to."""
    cpu = torch.device("cpu")
    dls = utils.make_dls(odd_vol, 0.5, bs=2, valid_pct=0.5, augment=False, device=cpu, context_slices=3)
    size = dls.size
    held = dls.train.planes[0][0]
    assert held.shape == (len(odd_vol.images), *size) and held.dtype == torch.uint8  # no full-size copy kept
    full_x, full_y = torch.from_numpy(odd_vol.images), torch.from_numpy(odd_vol.labels)
    norm = utils._normalize(3, False)
    for dl, (lo, hi) in ((dls.train, (0, 3)), (dls.valid, (3, 6))):
        seen = []
        # which slices: the masks tell them apart (each slice's resized mask is unique in this volume)
        masks = {z: utils._resize_masks(full_y[z:z + 1], size)[0] for z in range(lo, hi)}
        for x, y in dl:
            for xi, yi in zip(x, y):
                z = next(z for z, m in masks.items() if torch.equal(m, yi.to(torch.uint8)))
                zz = torch.tensor([z - 1, z, z + 1]).clamp(lo, hi - 1)
                want = utils._resize_images(full_x[zz][None], size).float().div(255)
                assert torch.equal(xi, norm(TensorImage(want))[0]), f"slice {z}"
                seen.append(z)
        assert sorted(seen) == list(range(lo, hi))


def test_checkpoint_from_quarter_loads_strictly_at_half(odd_vol, tmp_path):
    """DynamicUnet is built from img_size: a 1/4-size checkpoint must load strictly into the 1/2-size model."""
    q = utils.build_learner(utils.make_dls(odd_vol, 0.25, bs=2), pretrained=False, work_dir=tmp_path)
    h = utils.build_learner(utils.make_dls(odd_vol, 0.5, bs=2), pretrained=False, work_dir=tmp_path)
    assert q.dls.size == (35, 33) and h.dls.size == (70, 66)
    q.save("quarter", with_opt=False)
    h.load("quarter", with_opt=False, strict=True)
    for a, b in zip(q.model.state_dict().values(), h.model.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())
    x = h.dls.valid.one_batch()[0]
    with torch.no_grad():
        assert h.model.eval()(x).shape == (1, 3, 70, 66)


def test_offline_imagenet_falls_back_to_random_init(odd_vol, tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    dls = utils.make_dls(odd_vol, 0.25, bs=2)
    with pytest.warns(UserWarning, match="RANDOM initialisation"):
        learn = utils.build_learner(dls, pretrained=True, work_dir=tmp_path)
    assert learn.used_pretrained is False


class _Disconnect(Callback):
    """Simulates a Colab disconnect right after epoch `at` was checkpointed."""
    order = 90

    def __init__(self, at): self.at = at

    def after_epoch(self):
        if self.epoch == self.at:
            raise KeyboardInterrupt("simulated disconnect")


class _CountEpochs(Callback):
    def __init__(self): self.trained = []

    def before_train(self): self.trained.append(self.epoch)


def test_train_phase_resumes_and_skips(odd_vol, tmp_path, capsys):
    dls = utils.make_dls(odd_vol, 0.25, bs=2)
    learn = utils.build_learner(dls, pretrained=False, work_dir=tmp_path)
    learn.add_cb(_Disconnect(at=1))
    with pytest.raises(KeyboardInterrupt):
        utils.train_phase(learn, "t_frozen", 3, 1e-3, 0.5)
    models = tmp_path / "models"
    assert json.loads((models / "t_frozen.progress.json").read_text())["epoch"] == 1
    assert not utils.phase_done(tmp_path, "t_frozen")

    # a fresh session: new learner, same call -> continues with the last epoch only
    learn2 = utils.build_learner(dls, pretrained=False, work_dir=tmp_path)
    counter = _CountEpochs()
    learn2.add_cb(counter)
    info = utils.train_phase(learn2, "t_frozen", 3, 1e-3, 0.5)
    assert counter.trained == [2]
    assert "resuming after epoch 2 of 3" in capsys.readouterr().out
    assert utils.phase_done(tmp_path, "t_frozen") and not (models / "t_frozen.progress.pth").exists()
    assert info["epochs"] == 3 and 0 <= info["final"]["mean_iou"] <= 1
    history = (tmp_path / "history" / "t_frozen.csv").read_text()
    assert "mean_iou" in history and "acc_nonbg" in history

    # finished: a third call trains nothing and loads the saved weights
    counter.trained.clear()
    utils.train_phase(learn2, "t_frozen", 3, 1e-3, 0.5)
    assert counter.trained == []
    assert "already trained" in capsys.readouterr().out


class _RecordLosses(Callback):
    """Every batch's loss and size, training and validation apart."""
    def before_fit(self): self.seen = {True: [], False: []}
    def after_batch(self): self.seen[self.training].append((float(self.loss.detach().mean()), find_bs(self.yb)))


def test_recorder_losses_match_fastai_and_come_back_to_the_cpu(odd_vol, tmp_path):
    """The losses are kept on the device during an epoch (no per-step GPU sync); the figures are fastai's."""
    dls = utils.make_dls(odd_vol, 0.25, bs=2)
    learn = utils.build_learner(dls, pretrained=False, work_dir=tmp_path)
    assert isinstance(learn.progress, utils._Progress)
    with learn.no_bar():
        assert not hasattr(learn, "progress")
        seen = _RecordLosses()
        learn.fit(2, 1e-3, cbs=seen)
    assert hasattr(learn, "progress")
    ref = AvgSmoothLoss()
    expected = []
    for loss, _ in seen.seen[True]:
        ref.accumulate(SimpleNamespace(loss=torch.tensor(loss)))
        expected.append(float(ref.value))
    losses = learn.recorder.losses
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in losses)
    assert [float(v) for v in losses] == pytest.approx(expected, rel=1e-5)
    n_valid = len(seen.seen[False]) // 2  # the last epoch's validation batches
    valid = seen.seen[False][-n_valid:]
    valid_loss = sum(v * n for v, n in valid) / sum(n for _, n in valid)
    assert learn.recorder.values[-1][1] == pytest.approx(valid_loss, rel=1e-5)
    assert learn.recorder.values[-1][0] == pytest.approx(expected[-1], rel=1e-5)


class _InBatch(Callback):
    """Flags (and numbers) the span from the start of each batch to the end of every callback's after_batch."""
    order, inside, n = -100, False, 0

    def before_batch(self):
        type(self).inside = True
        type(self).n += 1


class _BatchEnd(Callback):
    order = 1000
    def after_batch(self): _InBatch.inside = False


def test_no_copy_to_the_host_inside_a_batch(odd_vol, tmp_path, monkeypatch):
    """Nothing reads a tensor back to the CPU between a batch's start and the end of its callbacks (training and
    validation), but the progress bar's running loss at most once a second: on a GPU each such read makes the
    CPU wait for the GPU. fastai's own recorder and progress bar do it every batch."""
    dls = utils.make_dls(odd_vol, 0.25, bs=2)
    learn = utils.build_learner(dls, pretrained=False, work_dir=tmp_path)
    reads = []  # (batch number, from the progress bar)
    for meth in ("cpu", "item", "numpy", "tolist", "__float__"):
        orig = getattr(torch.Tensor, meth)

        def spy(self, *a, _orig=orig, **k):
            caller = sys._getframe(1)
            # torch's Adam reads its step counter, which it keeps on the CPU on purpose: no GPU sync, not counted
            if _InBatch.inside and not caller.f_globals.get("__name__", "").startswith("torch.optim"):
                frames = [caller]
                while len(frames) < 6 and frames[-1].f_back is not None:
                    frames.append(frames[-1].f_back)
                reads.append((_InBatch.n, any(f.f_code.co_qualname == "_Progress.after_batch" for f in frames)))
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, meth, spy)
    t0 = time.monotonic()
    learn.fit(2, 1e-3, cbs=[_InBatch(), _BatchEnd()])  # with the progress bar
    assert reads and all(bar for _, bar in reads)
    assert len({n for n, _ in reads}) <= 1 + time.monotonic() - t0
    reads.clear()
    with learn.no_bar():  # (fastai's no_bar puts fastai's own bar back on exit)
        learn.fit(1, 1e-3, cbs=[_InBatch(), _BatchEnd()])
    assert len(learn.recorder.losses) == len(dls.train) and reads == []
    assert 0 <= learn.recorder.values[-1][2] <= 1  # the epoch's mean IoU was still computed


class _DivergeAfter(Callback):
    """Make the loss NaN from step `at` on, as a learning rate that blows the model up does."""
    def __init__(self, at): self.at = at

    def after_loss(self):
        if self.training and self.iter >= self.at:
            self.learn.loss_grad = self.learn.loss_grad * float("nan")
            self.learn.loss = self.learn.loss_grad.clone()


def test_find_lr_survives_a_loss_that_diverges_at_once(odd_vol, tmp_path, capsys):
    """fastai's own suggestion drops the first tenth and last five steps and raised IndexError on what was left."""
    dls = utils.make_dls(odd_vol, 0.25, bs=2)
    learn = utils.build_learner(dls, pretrained=False, work_dir=tmp_path)
    learn.add_cb(_DivergeAfter(at=2))
    sug = utils.find_lr(learn, "t_frozen", quick=True)
    assert sug is not None and 1e-8 < sug < 10
    assert (tmp_path / "figures" / "lr_find_t_frozen.png").exists()
    learn.remove_cb(learn.cbs.filter(lambda c: isinstance(c, _DivergeAfter))[0])
    learn.add_cb(_DivergeAfter(at=0))
    assert utils.find_lr(learn, "t_frozen", quick=True) is None
    assert "no suggestion" in capsys.readouterr().out
    lrs = np.logspace(-6, 0, 20)
    losses = np.r_[np.linspace(2, 1, 15), np.linspace(1.5, 9, 5)]  # falls, then blows up in the last 5 steps
    assert np.isclose(lrs[2:15], utils._lr_valley(lrs, losses, 20), rtol=1e-6).any()  # a step where the loss falls
    assert utils._lr_valley([], [], 100) is None


def test_load_stage_names_the_missing_checkpoint(odd_vol, tmp_path):
    learn = utils.build_learner(utils.make_dls(odd_vol, 0.25, bs=2), pretrained=False, work_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="256_unfrozen.pth"):
        utils.load_stage(learn, "256_unfrozen")


def test_predict_volume_writes_every_slice(odd_vol, tmp_path):
    import tifffile
    from PIL import Image
    learn = utils.build_learner(utils.make_dls(odd_vol, 1.0, bs=2), pretrained=False, work_dir=tmp_path)
    utils.train_phase(learn, "full_unfrozen", 1, 1e-3)
    model, info = utils.load_model(tmp_path, "full_unfrozen", torch.device("cpu"))
    pred = utils.predict_volume(model, odd_vol, tmp_path / "pred", bs=4)
    assert pred.shape == odd_vol.shape and pred.dtype == np.uint8
    for z, stem in enumerate(odd_vol.stems):
        png = np.asarray(Image.open(tmp_path / "pred" / f"{stem}.png"))
        assert png.shape == (141, 133)
        np.testing.assert_array_equal(png, pred[z])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "pred" / "labels.tif"), pred)
    probs = np.load(tmp_path / "pred" / "probs.npy", mmap_mode="r")
    assert probs.shape == (6, 3, 141, 133) and probs.dtype == np.uint8
    assert np.abs(probs.astype(int).sum(1) - 255).max() <= 3  # uint8 probabilities sum to ~1
    assert (probs.argmax(1) != pred).mean() <= 0.01  # quantised probabilities agree with the labels
    m = utils.save_metrics(tmp_path, odd_vol, pred, 0.2)
    assert m["n_validation_slices"] == 1 and json.loads((tmp_path / "metrics.json").read_text())["codes"] == info["codes"]


def test_padded_forward_matches_shapes_and_crops(odd_vol, tmp_path):
    """Odd slices are reflect-padded to a multiple of 32 and the logits cropped back to the slice size."""
    learn = utils.build_learner(utils.make_dls(odd_vol, 1.0, bs=2), pretrained=False, work_dir=tmp_path)
    model = learn.model.eval()
    tfms = utils.Pipeline(utils._batch_tfms(None, False), split_idx=1)
    x = torch.from_numpy(np.ascontiguousarray(odd_vol.images[:2]))[:, None]
    with torch.no_grad():
        out = utils._padded_forward(model, x, tfms, None)
        assert out.shape == (2, 3, 141, 133)
        sq = torch.from_numpy(np.ascontiguousarray(odd_vol.images[:2, :128, :96]))[:, None]
        ref = model(tfms(utils.TensorImage(sq)))  # already a multiple of 32: no padding, same result
        torch.testing.assert_close(utils._padded_forward(model, sq, tfms, None), ref)


def test_augmentation_keeps_masks_aligned():
    """Flips, rotation, zoom: a mask drawn from its image's bright pixels still matches after augmentation."""
    torch.manual_seed(0)
    img = torch.zeros(8, 1, 64, 80, dtype=torch.uint8)
    for i in range(8):  # an off-centre bright rectangle per slice, so flips and rotations are visible
        img[i, 0, 5 + i:25 + i, 10:30 + 2 * i] = 255
    mask = (img[:, 0] > 128).to(torch.uint8)
    tfms = utils.Pipeline([utils._ToFloat3(), utils._Augment(p_lighting=0.0)], split_idx=0)
    x, y = tfms((utils.TensorImage(img), utils.TensorMask(mask)))
    assert x.shape == (8, 3, 64, 80) and y.shape == (8, 64, 80)
    moved = (y.to(torch.uint8) != mask).float().mean()
    assert moved > 0.01  # the batch really was transformed
    agree = ((x[:, 0] > 0.5) == (y == 1)).float().mean()
    assert agree > 0.98, f"image and mask disagree on {1 - agree:.1%} of pixels"
    valid = utils.Pipeline([utils._ToFloat3(), utils._Augment()], split_idx=1)  # no augmentation at validation
    xv, yv = valid((utils.TensorImage(img), utils.TensorMask(mask)))
    assert torch.equal(yv, mask.long())
