"""Training augmentation: masks follow their image (`Augment`); `Infill` changes what fills the labelled fossils and
nothing else, only on training batches."""
import numpy as np
import pytest
import torch
from fastai.vision.all import Pipeline, TensorImage, TensorMask

from microfossil.augment import Augment, Infill, Scanner
from microfossil.loaders import _ToFloat, batch_tfms, make_dls


def test_augmentation_keeps_masks_aligned():
    """Flips, rotation, zoom: a mask drawn from its image's bright pixels still matches after augmentation."""
    torch.manual_seed(0)
    img = torch.zeros(8, 1, 64, 80, dtype=torch.uint8)
    for i in range(8):  # an off-centre bright rectangle per slice, so flips and rotations are visible
        img[i, 0, 5 + i:25 + i, 10:30 + 2 * i] = 255
    mask = (img[:, 0] > 128).to(torch.uint8)
    tfms = Pipeline([_ToFloat(), Augment(p_lighting=0.0)], split_idx=0)
    x, y = tfms((TensorImage(img), TensorMask(mask)))
    assert x.shape == (8, 3, 64, 80) and y.shape == (8, 64, 80)
    moved = (y.to(torch.uint8) != mask).float().mean()
    assert moved > 0.01  # the batch really was transformed
    agree = ((x[:, 0] > 0.5) == (y == 1)).float().mean()
    assert agree > 0.98, f"image and mask disagree on {1 - agree:.1%} of pixels"
    valid = Pipeline([_ToFloat(), Augment()], split_idx=1)  # no augmentation at validation
    xv, yv = valid((TensorImage(img), TensorMask(mask)))
    assert torch.equal(yv, mask.long())


def _shells(n=6, filled=(False, True), seed=0):
    """`n` 96 x 96 slices of matrix (0.45 plus noise) with two round shells each: a bright wall ring (0.8) around an
    inside that is hollow (0.12) or sediment-filled (0.5); a dark pore (0.1) and the air (0.05) around the core are
    unlabelled. Returns (images (n, 3, 96, 96) in [0, 1], labels, wall, inside) as tensors."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    img = 0.45 + 0.03 * torch.randn(n, 3, 96, 96, generator=g)
    lab = torch.zeros(n, 96, 96, dtype=torch.long)
    wall, inside = torch.zeros(96, 96, dtype=torch.bool), torch.zeros(96, 96, dtype=torch.bool)
    for (cy, cx), full, cls in zip([(30, 30), (62, 62)], filled, (1, 2)):
        r = torch.hypot(yy - cy, xx - cx)
        ring = (r < 12) & (r >= 9.5)
        wall |= ring
        inside |= r < 8.5  # (the pixel between them is the blurred edge of a CT wall: neither)
        img[..., ring] = 0.8 + 0.03 * torch.randn(n, 3, int(ring.sum()), generator=g)
        img[..., r < 9.5] = (0.5 if full else 0.12) + 0.03 * torch.randn(n, 3, int((r < 9.5).sum()), generator=g)
        lab[:, r < 12] = cls
    img[..., torch.hypot(yy - 20, xx - 75) < 6] = 0.1
    img[..., torch.hypot(yy - 48, xx - 48) > 46] = 0.05
    return img.clamp(0, 1), lab, wall, inside


def test_infill_changes_the_fossils_insides_and_nothing_else():
    """Every slice (p=1): unlabelled pixels and masks untouched, walls kept bright, each inside shifted as a whole to
    one gray between the slice's darkest and its matrix, its noise kept (the texture is not painted over)."""
    img, lab, wall, inside = _shells()
    torch.manual_seed(0)
    x, y = Infill(1.0)((TensorImage(img.clone()), TensorMask(lab.clone())), split_idx=0)
    assert torch.equal(y, lab) and isinstance(x, TensorImage)
    assert torch.equal(x[..., lab[0] == 0], img[..., lab[0] == 0])
    assert (x[..., wall] - img[..., wall]).abs().mean() < 0.05 and x[..., wall].mean() > 0.7
    grays = x[..., inside].mean(-1)  # (slice, channel): the new gray of both insides
    assert ((grays > 0.03) & (grays < 0.5)).all()
    assert (grays.std(1) < 0.03).all() and grays[:, 0].std() > 0.03  # one gray per slice (all its channels), another for the next
    hollow, filled = inside.clone(), inside.clone()
    hollow[48:], filled[:48] = False, False
    for one in (hollow, filled):  # each inside moved, its noise kept (not painted over)
        assert ((x[..., one] - img[..., one]).abs().mean(-1) > 0).all()
        assert (x[..., one].std(-1) - img[..., one].std(-1)).abs().max() < 0.01
    assert (x[..., hollow].mean(-1) - x[..., filled].mean(-1)).abs().max() < 0.05  # they now look alike inside


def test_infill_only_trains_and_only_where_there_are_fossils():
    """Validation batches, slices without a labelled fossil, p=0 and slices not drawn stay as they were."""
    img, lab, _, _ = _shells(n=40)
    args = (TensorImage(img.clone()), TensorMask(lab.clone()))
    assert torch.equal(Infill(1.0)(args, split_idx=1)[0], img)
    lab[:3] = 0
    torch.manual_seed(1)
    x, _ = Infill(1.0)((TensorImage(img.clone()), TensorMask(lab)), split_idx=0)
    assert torch.equal(x[:3], img[:3]) and not torch.equal(x[3:], img[3:])
    assert torch.equal(Infill(0.0)((TensorImage(img.clone()), TensorMask(lab)), split_idx=0)[0], img)
    x, _ = Infill(0.5)((TensorImage(img.clone()), TensorMask(lab)), split_idx=0)
    changed = (x != img).flatten(1).any(1)[3:].float().mean()
    assert 0.2 < changed < 0.8  # about half of the slices drawn
    lab[3] = 1  # a crop all fossil: no unlabelled pixel to take the levels from, it uses its own
    x, _ = Infill(1.0)((TensorImage(img.clone()), TensorMask(lab)), split_idx=0)
    assert torch.isfinite(x).all() and torch.equal(x[:3], img[:3])


def test_infill_in_the_training_batches(odd_vol):
    """`make_dls(infill_augment=...)`: the training batches only, recorded on the DataLoaders; out of range: a clear
    error."""
    plain = [type(t).__name__ for t in batch_tfms(None, True, None, 3)]
    assert "Infill" not in plain and "Augment" in plain
    assert "Infill" not in [type(t).__name__ for t in batch_tfms(None, False, None, 3, infill=0.5)]
    _in_the_training_batches_only(odd_vol, "infill_augment", Infill, out_of_range=1.5)


def _in_the_training_batches_only(vol, param, tfm, out_of_range):
    """`make_dls(<param>=0.5)` puts `tfm` in the training batches, not the validation ones, and records the share;
    `out_of_range` stops it with an error naming the parameter."""
    dls = make_dls(vol, 1.0, bs=2, device=torch.device("cpu"), **{param: 0.5})
    assert getattr(dls, param) == 0.5 and tfm.__name__ in [type(t).__name__ for t in dls.train.after_batch.fs]
    assert tfm.__name__ not in [type(t).__name__ for t in dls.valid.after_batch.fs]
    x, y = dls.train.one_batch()
    assert np.isfinite(x.numpy()).all() and y.shape[0] == 2
    with pytest.raises(ValueError, match=param):
        make_dls(vol, 1.0, bs=2, device=torch.device("cpu"), **{param: out_of_range})


def test_scanner_changes_the_look_not_the_labels(odd_vol):
    """`Scanner`: the slices drawn get noise (and another gamma and blur when asked), stay in [0, 1], the others are
    left as they were, validation batches never; `make_dls(scanner_augment=...)` puts it in the training batches only,
    records it, and refuses a share out of range."""
    g = torch.Generator().manual_seed(0)
    img = TensorImage(0.2 + 0.6 * (torch.rand(64, 3, 24, 24, generator=g) > 0.5).float())
    torch.manual_seed(0)
    out = Scanner(0.5)(img, split_idx=0)
    changed = (out - img).abs().flatten(1).amax(1) > 0
    assert 0.2 < changed.float().mean() < 0.8  # about half of the slices drawn
    assert torch.equal(out[~changed], img[~changed]) and 0 <= float(out.min()) and float(out.max()) <= 1
    diff = out[changed] - img[changed]
    assert diff.abs().mean() > 0.005 and abs(float(diff.mean())) < 0.002  # noise by default: no gamma shifts the mean
    assert torch.equal(Scanner(1.0, max_noise=0.0)(img, split_idx=0), img)  # gamma and blur off by default
    torch.manual_seed(0)
    looks = Scanner(1.0, max_gamma=1.5, max_blur=1.2, max_noise=0.0)(img, split_idx=0) - img
    assert (looks.abs().flatten(1).amax(1) > 0.01).float().mean() > 0.9  # ...and on when asked: every slice changed
    assert torch.equal(Scanner(1.0)(img, split_idx=1), img)
    assert "Scanner" not in [type(t).__name__ for t in batch_tfms(None, True, None, 3)]
    _in_the_training_batches_only(odd_vol, "scanner_augment", Scanner, out_of_range=-0.1)
