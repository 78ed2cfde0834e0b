"""DataLoaders gathered from the volume: sizes, alignment, the volume resized once, tri-planar slices, and fastai's
`show_batch` on them (the augmentations themselves: test_augment.py)."""
import numpy as np
import pytest
import torch
from fastai.vision.all import Pipeline, TensorImage

from conftest import volume_of
from microfossil import loaders
from microfossil.loaders import (FOSSIL_CROP_SHARE, _normalize, _resize_images, _resize_masks, make_dls,
                                 draw_weights, stage_size)
from microfossil.split import split_volume


def _last_fifth(vol):
    """The split these tests were written for: the last fifth of the slices validates (the published recipe's
    layout), the rest trains, no gap."""
    return split_volume(vol, 0.2, 0.0, gap_slices=0)


def test_stage_sizes():
    assert stage_size((983, 1004, 956), 0.25) == (251, 239)
    assert stage_size((983, 1004, 956), 0.5) == (502, 478)
    assert stage_size((983, 1004, 956), 1.0) == (1004, 956)
    assert max(stage_size((983, 1004, 956), 0.25, smoke=True)) == 64
    assert max(stage_size((983, 1004, 956), 1.0, smoke=True)) == 128
    assert min(stage_size((10, 96, 96), 0.25)) == 32  # floor: the encoder downsamples 32x


def test_batches_resized_and_aligned(odd_vol):
    dls = make_dls(odd_vol, 0.5, bs=2, device=torch.device("cpu"))
    x, y = dls.valid.one_batch()
    assert x.shape == (1, 3, 70, 66) and x.dtype == torch.float32  # 6 slices: a 1-slice validation block
    assert y.shape == (1, 70, 66) and y.dtype == torch.int64
    assert abs(float(x.mean())) < 3  # ImageNet-normalised
    assert set(torch.unique(y).tolist()) <= {0, 1, 2, 255}  # 255: a specimen also in training, left out of scores
    xt, yt = dls.train.one_batch()  # augmented training batch keeps image and mask shapes aligned
    assert xt.shape[-2:] == yt.shape[-2:] == (70, 66)


def test_volume_resized_once_gives_the_batches_of_a_per_batch_resize(odd_vol):
    """The stage-size volume held by the DataLoaders gives the same batches, bit for bit, as gathering
    full-size slices (with their context neighbours) and resizing each batch, as the data path used to."""
    cpu = torch.device("cpu")
    dls = make_dls(odd_vol, 0.5, bs=3, split=split_volume(odd_vol, 0.5, 0.0, gap_slices=0), augment=False, device=cpu,
                   context_slices=3)  # bs 3: no batch of one slice, which training drops (BatchNorm needs two)
    size = dls.size
    held = dls.train.planes[0][0]
    assert held.shape == (len(odd_vol.images), *size) and held.dtype == torch.uint8  # no full-size copy kept
    full_x, full_y = torch.from_numpy(odd_vol.images), torch.from_numpy(odd_vol.labels)
    norm = _normalize(3, False)
    for dl, (lo, hi) in ((dls.train, (0, 3)), (dls.valid, (3, 6))):
        seen = []
        # which slices: the masks tell them apart (each slice's resized mask is unique in this volume)
        masks = {z: _resize_masks(full_y[z:z + 1], size)[0] for z in range(lo, hi)}
        for x, y in dl:
            for xi, yi in zip(x, y):
                yi = yi.to(torch.uint8)  # (255: a specimen also in training, left out of the validation scores)
                z = next(z for z, m in masks.items() if bool(((yi == 255) | (yi == m)).all()))
                zz = torch.tensor([z - 1, z, z + 1]).clamp(lo, hi - 1)
                want = _resize_images(full_x[zz][None], size).float().div(255)
                assert torch.equal(xi, norm(TensorImage(want))[0]), f"slice {z}"
                seen.append(z)
        assert sorted(seen) == list(range(lo, hi))


@pytest.mark.parametrize("context", [1, 3])
def test_training_and_validation_never_see_the_gaps_or_the_test_block(tmp_path, context):
    """Validation voxels are 250 / label 2, gap and test voxels 255 / label 0 and 2, training voxels < 250 / label <= 1: no
    training batch (any plane, any context channel) may contain any of them, and no validation batch a gap or test
    voxel: only 05 reads the test block."""
    rng = np.random.default_rng(0)
    Z, H, W = 20, 40, 48
    images = rng.integers(0, 200, (Z, H, W), dtype=np.uint8)
    labels = (images > 150).astype(np.uint8)
    vol = volume_of(images, labels, tmp_path)
    split = split_volume(vol, 0.2, 0.1, gap_slices=2)
    assert (split.valid_stop, split.train_start, split.train_stop, split.test_start) == (2, 4, 14, 16)
    outside = np.ones(Z, bool)
    outside[split.train] = False
    images[outside], labels[outside] = 255, 2
    images[split.valid] = 250
    labels[split.valid_stop:split.train_start] = labels[split.train_stop:split.test_start] = 0  # gaps: nothing joins
    dls = make_dls(vol, 1.0, 4, split, augment=False, device=torch.device("cpu"), context_slices=context,
                   triplanar=True)
    n_train = len(split.train)
    train = dls.train.new(after_batch=Pipeline([]))  # raw uint8 batches, before resizing and normalising
    shapes = set()
    n_batches = 0
    for x, y in train:
        n_batches += 1
        shapes.add(tuple(x.shape[1:]))
        assert x.shape[1] == context
        assert int(x.max()) < 250 and int(y.max()) <= 1
    assert n_batches == len(train)
    assert {(context, H, W), (context, n_train, W), (context, n_train, H)} <= shapes  # axial, XZ and YZ slices
    for xv, yv in dls.valid.new(after_batch=Pipeline([])):  # validation stays on its own block, context too
        assert int(xv.min()) == int(xv.max()) == 250 and int(yv.min()) == 2


def test_validation_scores_leave_out_a_specimen_that_also_reaches_training(tmp_path):
    """A specimen taller than the validation gap allows: its voxels in the validation block are labelled IGNORE in the
    validation batches (no per-epoch score or validation loss counts them, as 05's test scores do not), the others keep
    their class; the training block keeps its labels."""
    from conftest import ball
    from microfossil.metrics import IGNORE
    Z, H, W = 40, 32, 32
    labels = np.zeros((Z, H, W), np.uint8)
    labels[ball((Z, H, W), (2, 16, 16), 9)] = 1  # slices 0-11: the validation block (0-3) and beyond any gap (4-7)
    labels[ball((Z, H, W), (2, 5, 27), 2)] = 2   # slices 0-4... within the validation block and its gap only
    images = np.where(labels > 0, 200, 60).astype(np.uint8)
    vol = volume_of(images, labels, tmp_path)
    split = split_volume(vol, 0.2, 0.1)
    assert split.valid_left_out["specimens"] == 1
    dls = make_dls(vol, 1.0, 4, split, augment=False, device=torch.device("cpu"))
    y = torch.cat([yb for _, yb in dls.valid.new(after_batch=Pipeline([]))])
    assert y.shape[0] == len(split.valid) and set(torch.unique(y).tolist()) == {0, 2, IGNORE}
    assert int((y == IGNORE).sum()) == int((labels[:4] == 1).sum()) and int((y == 2).sum()) == int((labels[:4] == 2).sum())
    assert int(dls.train.planes[0][1][split.train].max()) == 1  # the training block keeps its labels
    assert len(dls.train.dataset) == len(split.train)  # (an epoch's length is the training block's)
    tri = make_dls(vol, 1.0, 4, split, augment=False, device=torch.device("cpu"), triplanar=True)
    assert tri.train.extra == len(split.train)


@pytest.mark.parametrize("context", [3, 5])
def test_show_batch_shows_the_centre_slice_and_its_labels(odd_vol, context):
    """fastai's `show_batch` works on these DataLoaders: the decoded input is the centre slice (gray, 3 channels, in
    [0, 1]) whatever the number of context slices, and the masks carry the class names."""
    import matplotlib
    matplotlib.use("Agg")
    dls = make_dls(odd_vol, 0.5, bs=2, split=split_volume(odd_vol, 0.5, 0.0, gap_slices=0), augment=False,
                   device=torch.device("cpu"), context_slices=context)
    x, y, samples = dls.valid.show_batch(max_n=2, show=False)
    assert x.shape == (2, 3, 70, 66) and torch.equal(x[:, 0], x[:, 1]) and 0 <= float(x.min()) <= float(x.max()) <= 1
    z = dls.valid_idx[0]
    centre = _resize_images(torch.from_numpy(np.asarray(odd_vol.images[z:z + 1]))[None], (70, 66))[0, 0]
    assert (x[0, 0] * 255 - centre.float()).abs().max() < 1.5  # the slice itself, not a neighbour
    assert samples[0][1].codes == odd_vol.codes
    dls.valid.show_batch(max_n=2)  # draws without error


def test_batch_types_are_known_without_drawing_a_batch(odd_vol, monkeypatch):
    """fastai asks a DataLoader for its input count before training; that must not draw (and augment) a batch, which
    on a GPU would also meet a volume held on the CPU."""
    dls = make_dls(odd_vol, 0.25, bs=2, device=torch.device("cpu"))

    def no_batches(*a, **k):
        raise AssertionError("a batch was drawn")
    monkeypatch.setattr(type(dls.train), "create_batches", no_batches)
    assert dls.train.n_inp == 1 and dls.valid.new(shuffle=False).n_inp == 1


def _crop_volume(tmp_path):
    """50 slices of 128 x 128 whose pixels tell where they are (y in even columns, 128 + x // 2 in odd ones), with one
    6 x 6 fossil (label 1, value 255) a slice at a known place."""
    Z, H, W = 50, 128, 128
    yy, xx = np.indices((H, W))
    images = np.repeat(np.where(xx % 2 == 0, yy, 128 + xx // 2).astype(np.uint8)[None], Z, 0)
    labels = np.zeros((Z, H, W), np.uint8)
    for z in range(Z):
        y, x = (10 + 3 * (z % 5), 100 - 2 * (z % 7))
        labels[z, y:y + 6, x:x + 6], images[z, y:y + 6, x:x + 6] = 1, 255
    return volume_of(images, labels, tmp_path)


def _fossil_share(vol, monkeypatch, share):
    """The share of training windows holding a fossil pixel, with `share` of them centred near one."""
    monkeypatch.setattr(loaders, "FOSSIL_CROP_SHARE", share)
    dls = make_dls(vol, 1.0, bs=8, augment=False, device=torch.device("cpu"), split=_last_fifth(vol), crop_size=48, seed=2)
    ys = torch.cat([y.as_subclass(torch.Tensor) for _, y in dls.train.new(after_batch=Pipeline([]))])
    return float((ys == 1).flatten(1).any(1).float().mean())


def test_crops_are_windows_of_the_training_slices_half_of_them_on_a_fossil(tmp_path, monkeypatch):
    """crop_size: training batches are crop x crop windows cut from the training slices (image and mask from the same
    place), an epoch covers the slices' area once, FOSSIL_CROP_SHARE of the windows are centred near a fossil (and
    hold it) while the others hold one by chance, and validation stays on whole held-out slices."""
    vol = _crop_volume(tmp_path)
    dls = make_dls(vol, 1.0, bs=8, augment=False, device=torch.device("cpu"), split=_last_fifth(vol),
                   crop_size=48, seed=1)
    assert dls.crop_size == 48 and dls.size == (128, 128)
    n_train = len(dls.split.train)
    assert len(dls.train.dataset) == n_train * round(128 * 128 / 48 ** 2)  # 7 windows a slice
    raw = dls.train.new(after_batch=Pipeline([]))
    full, labels = torch.from_numpy(vol.images), torch.from_numpy(vol.labels).long()
    on_fossil = total = 0
    for x, y in raw:
        x, y = x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)
        assert x.shape[1:] == (1, 48, 48) and y.shape[1:] == (48, 48)
        assert torch.equal(x[:, 0] == 255, y == 1)  # image and mask cut from the same window
        for xi, yi in zip(x[:, 0], y):  # each window, image and mask, is one of a training slice
            v0, v1 = int(xi[0, 0]), int(xi[0, 1])  # its first two pixels say where it lies
            if max(v0, v1) == 255:
                continue  # a window starting on a fossil: rare, skipped
            y0, x0 = (v0, 2 * (v1 - 128)) if v0 < 128 else (v1, 2 * (v0 - 128) + 1)
            win = (slice(y0, y0 + 48), slice(x0, x0 + 48))
            assert any(torch.equal(full[z][win], xi) and torch.equal(labels[z][win], yi) for z in range(n_train))
        on_fossil += int((y == 1).flatten(1).any(1).sum())
        total += len(y)
    random_share = _fossil_share(vol, monkeypatch, 0.0)  # windows anywhere: here about 0.4 hold a fossil
    assert _fossil_share(vol, monkeypatch, 1.0) == 1.0 and random_share < 0.6
    want = FOSSIL_CROP_SHARE + (1 - FOSSIL_CROP_SHARE) * random_share
    assert abs(on_fossil / total - want) < 0.1, (on_fossil / total, want)
    xv, yv = dls.valid.one_batch()
    assert xv.shape[-2:] == yv.shape[-2:] == (128, 128)
    xt, yt = dls.train.one_batch()  # the batch transforms keep the crop size
    assert xt.shape[-2:] == yt.shape[-2:] == (48, 48)


def test_crop_as_large_as_the_slice_trains_on_whole_slices_and_bad_crops_are_refused(tmp_path):
    vol = _crop_volume(tmp_path)
    cpu = torch.device("cpu")
    dls = make_dls(vol, 0.5, bs=4, device=cpu, split=_last_fifth(vol), crop_size=64)  # 64 px: the whole stage-size slice
    assert dls.crop_size is None and dls.train.one_batch()[0].shape[-2:] == (64, 64)
    with pytest.raises(ValueError, match="below 32"):
        make_dls(vol, 1.0, bs=4, device=cpu, split=_last_fifth(vol), crop_size=16)
    with pytest.raises(ValueError, match="triplanar"):
        make_dls(vol, 1.0, bs=4, device=cpu, split=_last_fifth(vol), crop_size=48, triplanar=True)


def _rare_volume(tmp_path):
    """30 slices of 128 x 128: a 12-px square of class 1 ("shell") in every slice, a 4-px square of class 2 ("chain"),
    far from it, in every sixth slice (4 of the 24 training slices)."""
    Z = 30
    images, labels = np.zeros((Z, 128, 128), np.uint8), np.zeros((Z, 128, 128), np.uint8)
    labels[:, 10:22, 10:22], images[:, 10:22, 10:22] = 1, 120
    labels[::6, 100:104, 100:104], images[::6, 100:104, 100:104] = 2, 250
    return volume_of(images, labels, tmp_path)


def test_draw_weights_even_the_fossil_classes_out_at_most():
    """A fossil class n times rarer than the commonest one weighs min(n, oversample_rare): over-drawing never turns
    the rare class into the common one."""
    assert draw_weights([1000, 100, 10], 4).tolist() == [1.0, 1.0, 4.0]
    assert draw_weights([1000, 100, 60], 4).tolist() == [1.0, 1.0, 100 / 60]  # only 1.7 times rarer: 1.7
    assert draw_weights([1000, 100, 10, 50], 20).tolist() == [1.0, 1.0, 10.0, 2.0]
    assert draw_weights([1000, 5], 3).tolist() == [1.0, 1.0]  # a single fossil class: nothing to even out
    assert draw_weights([1000, 0, 7], 3).tolist() == [1.0, 1.0, 1.0]  # absent from the training block


def test_oversample_rare_draws_slices_of_the_rare_class_more_often(tmp_path):
    """oversample_rare=4: each epoch draws its training slices with replacement, those holding the rare class (54 times
    rarer than the other in pixels) 4 times as likely as the others (here 4 of 24 slices: 4*4 / (20 + 4*4) = 0.44 of the draws instead of 1/6);
    an epoch keeps its length; 1 (the default) draws every slice once; the class counts are those of the training
    block."""
    vol = _rare_volume(tmp_path)
    cpu = torch.device("cpu")
    plain = make_dls(vol, 1.0, bs=4, augment=False, device=cpu, split=_last_fifth(vol), seed=3)
    assert plain.oversample_rare == 1.0 and plain.train.weights is None
    assert sorted(plain.train.dataset[plain.train.get_idxs()].tolist()) == list(range(24))
    n_train = len(plain.split.train)
    want = [int((vol.labels[:n_train] == k).sum()) for k in range(3)]
    assert plain.class_counts.tolist() == want
    dls = make_dls(vol, 1.0, bs=4, augment=False, device=cpu, split=_last_fifth(vol), seed=3, oversample_rare=4.0)
    zs = np.concatenate([dls.train.dataset[dls.train.get_idxs()] for _ in range(200)])
    assert len(zs) == 200 * 24
    share = float(np.isin(zs, [0, 6, 12, 18]).mean())
    assert abs(share - 16 / 36) < 0.03, share
    x, y = dls.train.one_batch()  # batches still one gather of the drawn slices
    assert x.shape[0] == 4 and y.shape[-2:] == (128, 128)
    with pytest.raises(ValueError, match="oversample_rare"):
        make_dls(vol, 1.0, bs=4, device=cpu, split=_last_fifth(vol), oversample_rare=0.5)


def test_oversample_rare_centres_crops_on_the_rare_class_more_often(tmp_path, monkeypatch):
    """With crops all centred near a fossil pixel, a window holds the rare class (16 of the 160 fossil pixels of the
    slices that have it) in proportion to its pixels without oversampling, and far more often with oversample_rare=4
    (both the slice draws and the pixel picks favour it)."""
    monkeypatch.setattr(loaders, "FOSSIL_CROP_SHARE", 1.0)
    vol = _rare_volume(tmp_path)

    def rare_share(k):
        dls = make_dls(vol, 1.0, bs=8, augment=False, device=torch.device("cpu"), split=_last_fifth(vol),
                       crop_size=48, seed=5, oversample_rare=k)
        ys = torch.cat([y.as_subclass(torch.Tensor) for _ in range(5) for _, y in dls.train.new(after_batch=Pipeline([]))])
        return float((ys == 2).flatten(1).any(1).float().mean())
    plain, rare = rare_share(1.0), rare_share(4.0)
    # uniform: 4/24 slices x 16/160 pixels = 0.017; oversampled: 16/36 slices x (4 * 16) / (4 * 16 + 144) = 0.137
    assert abs(plain - 0.017) < 0.015 and abs(rare - 0.137) < 0.04, (plain, rare)


def test_the_xz_and_yz_views_count_fully_from_sixteen_slices_in():
    w = loaders.plane_weights(40)
    np.testing.assert_array_equal(w[:17], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 16])
    np.testing.assert_array_equal(w, w[::-1])  # both ends alike
    assert (w[15:25] == 16).all()  # the axial view's weight: a plain mean of the three views
    np.testing.assert_array_equal(loaders.plane_weights(1), [1])
