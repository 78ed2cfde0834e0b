"""The learner: checkpoints across stage sizes, the offline fallback, no GPU-to-CPU copy inside a batch, the
per-epoch metrics and a learning-rate suggestion that survives a diverging loss."""
import math
import sys
import time
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import valley as _fastai_valley
from fastai.learner import AvgSmoothLoss
from fastai.torch_core import find_bs

from microfossil.learner import (CrossEntropyDiceLoss, _confusion_on_device, _Progress, build_learner, class_weights_of,
                                 describe_classes, epoch_metrics, valley)
from microfossil.loaders import make_dls
from microfossil.metrics import IGNORE, confusion_matrix, scores_from_confusion


def test_checkpoint_from_quarter_loads_strictly_at_half(odd_vol, tmp_path):
    """DynamicUnet is built from img_size: a 1/4-size checkpoint must load strictly into the 1/2-size model."""
    q = build_learner(make_dls(odd_vol, 0.25, bs=2), pretrained=False, work_dir=tmp_path)
    h = build_learner(make_dls(odd_vol, 0.5, bs=2), pretrained=False, work_dir=tmp_path)
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
    dls = make_dls(odd_vol, 0.25, bs=2)
    with pytest.warns(UserWarning, match="RANDOM initialisation"):
        learn = build_learner(dls, pretrained=True, work_dir=tmp_path)
    assert learn.used_pretrained is False


class _RecordLosses(Callback):
    """Every batch's loss and size, training and validation apart."""
    def before_fit(self): self.seen = {True: [], False: []}
    def after_batch(self): self.seen[self.training].append((float(self.loss.detach().mean()), find_bs(self.yb)))


def test_recorder_losses_match_fastai_and_come_back_to_the_cpu(odd_vol, tmp_path):
    """The losses are kept on the device during an epoch (no per-step GPU sync); the figures are fastai's."""
    dls = make_dls(odd_vol, 0.25, bs=2)
    learn = build_learner(dls, pretrained=False, work_dir=tmp_path)
    assert isinstance(learn.progress, _Progress)
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
    dls = make_dls(odd_vol, 0.25, bs=2)
    learn = build_learner(dls, pretrained=False, work_dir=tmp_path)
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
    names = list(learn.recorder.metric_names)[1:]  # ("epoch" first, as fastai names them)
    assert 0 <= learn.recorder.values[-1][names.index("iou_background")] <= 1  # the epoch's scores were still computed


class _DivergeAfter(Callback):
    """Make the loss NaN from step `at` on, as a learning rate that blows the model up does."""
    def __init__(self, at): self.at = at

    def after_loss(self):
        if self.training and self.iter >= self.at:
            self.learn.loss_grad = self.learn.loss_grad * float("nan")
            self.learn.loss = self.learn.loss_grad.clone()


def test_lr_find_survives_a_loss_that_diverges_at_once(odd_vol, tmp_path, capsys):
    """fastai's own suggestion drops the first tenth and last five steps and raised IndexError on what was left: with
    `suggest_funcs=valley` the suggestion is then NaN and a line says why; with enough steps it is fastai's valley."""
    dls = make_dls(odd_vol, 0.25, bs=2)
    learn = build_learner(dls, pretrained=False, work_dir=tmp_path)
    sug = learn.lr_find(num_it=12, suggest_funcs=valley, show_plot=False)
    assert 1e-7 <= sug.valley <= 10
    learn.add_cb(_DivergeAfter(at=0))
    sug = learn.lr_find(num_it=12, suggest_funcs=valley, show_plot=True)  # fastai's valley: IndexError
    assert np.isnan(sug.valley) and "too early to suggest" in capsys.readouterr().out
    lrs = torch.logspace(-6, 0, 20)
    losses = torch.cat([torch.linspace(2, 1, 15), torch.linspace(1.5, 9, 5)])  # falls, then blows up at the end
    assert valley(lrs, losses, 20) == _fastai_valley(lrs, losses, 20)  # fastai's own suggestion when there is one
    assert np.isnan(valley(torch.zeros(0), torch.zeros(0), 100)[0])


def test_sync_free_confusion_counts_like_bincount(monkeypatch):
    """The scatter-add count used on the GPU (no read-back of the input's min and max, which `torch.bincount` does
    there) gives bincount's counts, for any number of classes and voxels."""
    g = torch.Generator().manual_seed(0)
    for n, numel in ((3, 1000), (5, 257), (2, 1), (4, 0)):
        pred, target = torch.randint(0, n, (numel,), generator=g), torch.randint(0, n, (numel,), generator=g)
        want = torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)
        with monkeypatch.context() as m:
            m.setattr(torch, "bincount", None)  # the scatter path must not use it
            got = _confusion_on_device(pred, target, n, scatter=True)
        assert got.dtype == torch.long and torch.equal(got, want), (n, numel)
        assert np.array_equal(confusion_matrix(pred.numpy(), target.numpy(), n), want.numpy())
        ignored = target.clone()
        ignored[::3] = IGNORE  # voxels left out of every score: counted in neither path
        keep = ignored != IGNORE
        want = torch.bincount(target[keep] * n + pred[keep], minlength=n * n).reshape(n, n)
        for scatter in (True, False):
            assert torch.equal(_confusion_on_device(pred, ignored, n, scatter=scatter), want), (n, numel, scatter)
        assert np.array_equal(confusion_matrix(pred.numpy(), ignored.numpy().astype(np.uint8), n), want.numpy())


def test_epoch_metrics_accumulate_over_batches():
    """The fastai metrics share one confusion matrix and give the same numbers as the whole-array scores."""
    codes = ["bg", "a", "b"]
    ms = epoch_metrics(codes)
    names = [m.name for m in ms]
    assert names == ["mean_iou_fossils", "iou_bg", "iou_a", "iou_b", "dice_bg", "dice_a", "dice_b", "acc_nonbg"]
    rng = np.random.default_rng(0)
    ys = [torch.from_numpy(rng.integers(0, 3, (2, 5, 6))) for _ in range(3)]
    logits = [torch.randn(2, 3, 5, 6) for _ in range(3)]
    for m in ms:
        m.reset()
    for y, p in zip(ys, logits):
        learn = SimpleNamespace(pred=p, y=y)
        for m in ms:  # fastai calls every metric once per batch
            m.accumulate(learn)
    allp = torch.cat([p.argmax(1) for p in logits])
    s = scores_from_confusion(confusion_matrix(allp.numpy(), torch.cat(ys).numpy(), 3), codes)
    vals = dict(zip(names, (m.value for m in ms)))
    assert math.isclose(vals["iou_a"], s["iou"]["a"]) and math.isclose(vals["dice_b"], s["dice"]["b"])
    assert math.isclose(vals["acc_nonbg"], s["pixel_acc_nonbg"])
    assert math.isclose(vals["mean_iou_fossils"], (s["iou"]["a"] + s["iou"]["b"]) / 2)  # no background in the mean


def test_ce_dice_loss_adds_the_batch_dice_of_the_fossil_classes(odd_vol, tmp_path):
    """ce_dice = cross-entropy + 1 - mean soft Dice of the non-background classes over the whole batch: checked by
    hand on a small batch; a perfect prediction scores the cross-entropy alone (near 0); the gradient reaches the
    logits; and the learner records the loss by name."""
    g = torch.Generator().manual_seed(0)
    logits, targ = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True), torch.randint(0, 3, (2, 4, 5), generator=g)
    loss = CrossEntropyDiceLoss()(logits, targ)
    p, onehot = torch.softmax(logits, 1), torch.nn.functional.one_hot(targ, 3).permute(0, 3, 1, 2).float()
    dice = [(2 * (p[:, c] * onehot[:, c]).sum() + 1) / (p[:, c].sum() + onehot[:, c].sum() + 1) for c in (1, 2)]
    want = torch.nn.functional.cross_entropy(logits, targ) + 1 - (dice[0] + dice[1]) / 2
    assert torch.allclose(loss, want, atol=1e-6)
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    perfect = torch.nn.functional.one_hot(targ, 3).permute(0, 3, 1, 2).float() * 50
    assert float(CrossEntropyDiceLoss()(perfect, targ)) < 1e-3
    learn = build_learner(make_dls(odd_vol, 0.25, bs=2), pretrained=False, work_dir=tmp_path, loss="ce_dice")
    assert learn.loss_name == "ce_dice" and isinstance(learn.loss_func, CrossEntropyDiceLoss)
    x, y = learn.dls.valid.one_batch()
    assert torch.equal(learn.loss_func.decodes(learn.model(x)), learn.model(x).argmax(1))
    with pytest.raises(ValueError, match="'cross_entropy', 'ce_dice', 'focal'"):
        build_learner(learn.dls, pretrained=False, work_dir=tmp_path, loss="dice")


def test_class_weights_from_the_training_block_frequencies():
    """inverse_sqrt / inverse: 1 / frequency to the power 1/2 or 1, scaled so that the mean weight over the training
    pixels is 1; given numbers are scaled the same; a class absent from the training block weighs as the heaviest."""
    counts = np.array([9900, 80, 20])
    for how, power in (("inverse_sqrt", 0.5), ("inverse", 1.0)):
        w = np.array(class_weights_of(counts, how))
        assert math.isclose((w * counts).sum() / counts.sum(), 1.0)
        assert math.isclose(w[2] / w[1], (80 / 20) ** power) and math.isclose(w[1] / w[0], (9900 / 80) ** power)
    assert class_weights_of(counts, None) is None
    w = class_weights_of(counts, [1, 2, 2])
    assert math.isclose(w[1] / w[0], 2) and math.isclose((np.array(w) * counts).sum(), counts.sum())
    w = class_weights_of([9900, 100, 0], "inverse")
    assert w[2] == w[1] > w[0]
    with pytest.raises(ValueError, match="one positive number per class"):
        class_weights_of(counts, [1, 2])
    with pytest.raises(ValueError, match="inverse_sqrt"):
        class_weights_of(counts, "balanced")
    # balance_fossils: the background and the commonest fossil class alike, a 4 times rarer one 4 times that;
    # an absent fossil class as the heaviest; no fossil at all: no class favoured
    w = np.array(class_weights_of([9900, 80, 0, 20], "balance_fossils"))
    assert math.isclose(w[0], w[1]) and math.isclose(w[3] / w[1], 4) and w[2] == w[3]
    assert math.isclose((w * [9900, 80, 0, 20]).sum(), 10000)
    assert class_weights_of([9900, 0, 0], "balance_fossils") == [1.0, 1.0, 1.0]
    w = np.array(class_weights_of([9900, 80, 0, 20], "balance_fossils_sqrt"))  # halfway: the 4 times rarer weighs 2
    assert math.isclose(w[0], w[1]) and math.isclose(w[3] / w[1], 2) and w[2] == w[3]
    text = describe_classes(["background", "shell", "chain"], counts, class_weights_of(counts, "inverse"), 4.0)
    assert "shell                  0.800%" in text and "chain                  0.200%" in text
    assert "slices x1" in text.splitlines()[2] and "slices x4" in text.splitlines()[3]  # the rarer one: 4 times


@pytest.mark.parametrize("loss", ["cross_entropy", "ce_dice", "focal"])
def test_losses_take_the_class_weights_and_print_them(odd_vol, tmp_path, capsys, loss):
    """Each loss trains with the class weights on its cross-entropy (or focal) term: the weighted loss is the one
    torch computes with those weights; build_learner prints each class's share of the training block and weight."""
    dls = make_dls(odd_vol, 0.25, bs=2)
    learn = build_learner(dls, pretrained=False, work_dir=tmp_path, loss=loss, class_weights="inverse_sqrt")
    out = capsys.readouterr().out
    assert "pixels per class, loss weights" in out and all(c in out for c in dls.codes)
    w = torch.tensor(learn.class_weights)
    assert math.isclose(float((w * torch.as_tensor(dls.class_counts)).sum() / dls.class_counts.sum()), 1.0, rel_tol=1e-3)
    g = torch.Generator().manual_seed(1)
    logits, targ = torch.randn(2, len(dls.codes), 4, 5, generator=g), torch.randint(0, len(dls.codes), (2, 4, 5), generator=g)
    F = torch.nn.functional
    ce = F.cross_entropy(logits, targ, weight=w.float())
    if loss == "cross_entropy":
        assert torch.allclose(learn.loss_func(logits, targ), ce, atol=1e-5)
    elif loss == "ce_dice":
        assert torch.allclose(learn.loss_func.ce(logits, targ), ce, atol=1e-5)
    else:  # fastai's focal loss: (1 - p_t) ** 2 times the (weighted) per-pixel cross-entropy, averaged
        ce_px = F.cross_entropy(logits, targ, weight=w.float(), reduction="none")
        assert torch.allclose(learn.loss_func(logits, targ), ((1 - torch.exp(-ce_px)) ** 2 * ce_px).mean(), atol=1e-5)
    left_out = targ.clone()
    left_out[:, :2] = IGNORE  # voxels no score counts: the loss is that of the other voxels alone
    sub = (logits[:, :, 2:].contiguous(), targ[:, 2:].contiguous())
    assert torch.allclose(learn.loss_func(logits, left_out), learn.loss_func(*sub), atol=1e-5)
    learn.fit(1, 1e-3)  # trains
    plain = build_learner(dls, pretrained=False, work_dir=tmp_path, loss=loss)
    assert plain.class_weights is None and "loss weights" not in capsys.readouterr().out


def test_a_fit_stops_when_the_parameters_cell_says_other_than_what_the_learner_holds(odd_vol, tmp_path):
    """`check_held`: the weight decay and loss the learner was built with, the DataLoaders it holds, each against the
    notebook's values; the message names the cell to run again."""
    from microfossil.learner import check_held
    from microfossil.params import ParameterError
    dls = make_dls(odd_vol, 0.25, bs=2, context_slices=3)
    learn = build_learner(dls, pretrained=False, work_dir=tmp_path, wd=1e-2)
    same = {"dls": dls, "wd": 1e-2, "loss": "cross_entropy", "bs": 2, "size_frac": 0.25, "context_slices": 3,
            "class_weights": None, "test_pct": 0.2, "valid_pct": 0.1, "gap_slices": None, "arch": "resnet34"}
    check_held(learn, same)  # nothing changed: no stop
    with pytest.raises(ParameterError, match=r"wd = 0.1 \(made with 0.01\).*run the learner cell"):
        check_held(learn, {**same, "wd": 0.1})
    with pytest.raises(ParameterError, match=r"context_slices = 5 \(made with 3\).*run the DataLoaders cell"):
        check_held(learn, {**same, "context_slices": 5})
    with pytest.raises(ParameterError, match="built on DataLoaders made before"):
        check_held(learn, {**same, "dls": make_dls(odd_vol, 0.25, bs=2, context_slices=3)})
