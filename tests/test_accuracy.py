"""Issue 5's accuracy tools: context slices, tri-planar slicing and prediction, flip TTA, the specimen classifier."""
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from fastai.vision.all import Pipeline

import utils

CODES = ["background", "shell", "chain"]


def _vol(images, labels, tmp_path, codes=CODES):
    src = tmp_path / "ds"
    src.mkdir(exist_ok=True)
    return utils.Volume(images=images, labels=labels, codes=codes, stems=[f"s{z:03d}" for z in range(len(images))],
                        source=src)


def test_slices_with_context_clamps_at_the_ends():
    arr = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3)
    x = utils._slices_with_context(arr, [0, 4], 3, axis=0)
    assert x.shape == (2, 3, 2, 3)
    np.testing.assert_array_equal(x[0], arr[[0, 0, 1]])
    np.testing.assert_array_equal(x[1], arr[[3, 4, 4]])
    y = utils._slices_with_context(arr, [1], 3, axis=2)  # YZ slice at x=1: rows z, columns y
    np.testing.assert_array_equal(y[0, 1], arr[:, :, 1])
    np.testing.assert_array_equal(y[0, 0], arr[:, :, 0])
    with pytest.raises(ValueError, match="odd"):
        utils._n_in(2)


@pytest.mark.parametrize("context", [1, 3])
def test_triplanar_training_never_sees_the_validation_block(tmp_path, context):
    """Validation-block voxels are 255 / label 2, training voxels < 255 / label <= 1: no training batch (any plane,
    any context channel) may contain either."""
    rng = np.random.default_rng(0)
    Z, H, W = 20, 40, 48
    images = rng.integers(0, 200, (Z, H, W), dtype=np.uint8)
    labels = (images > 150).astype(np.uint8)
    n_train = len(utils.split_slices(Z, 0.2)[0])
    images[n_train:], labels[n_train:] = 255, 2
    vol = _vol(images, labels, tmp_path)
    dls = utils.make_dls(vol, 1.0, 4, 0.2, augment=False, device=torch.device("cpu"), context_slices=context,
                         triplanar=True)
    train = dls.train.new(after_batch=Pipeline([]))  # raw uint8 batches, before resizing and normalising
    shapes = set()
    n_batches = 0
    for x, y in train:
        n_batches += 1
        shapes.add(tuple(x.shape[1:]))
        assert x.shape[1] == context
        assert int(x.max()) < 255 and int(y.max()) <= 1
    assert n_batches == len(train)
    assert {(context, H, W), (context, n_train, W), (context, n_train, H)} <= shapes  # axial, XZ and YZ slices
    xv, yv = next(iter(dls.valid.new(after_batch=Pipeline([]))))
    assert int(xv.min()) == 255 and int(yv.min()) == 2  # validation stays on its own block


def _pointwise_model(K=3):
    """A 1x1-convolution 'U-Net': its prediction of a voxel depends on that voxel alone, in every plane."""
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, K, 1).eval()


def test_triplanar_prediction_averages_the_three_planes(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 20, 28), dtype=np.uint8)
    vol = _vol(images, None, tmp_path)
    m = _pointwise_model()
    dev = torch.device("cpu")
    axial = utils.predict_volume(m, vol, tmp_path / "ax", 4, dev, True)
    tri = utils.predict_volume(m, vol, tmp_path / "tri", 4, dev, True, triplanar=True)
    p_ax, p_tri = np.load(tmp_path / "ax" / "probs.npy"), np.load(tmp_path / "tri" / "probs.npy")
    assert p_tri.shape == p_ax.shape == (12, 3, 20, 28)
    assert np.abs(p_tri.astype(int) - p_ax).max() <= 1  # same per-voxel prediction in every plane: same mean
    np.testing.assert_array_equal(tri, p_tri.argmax(1))  # labels are the arg-max of the averaged probabilities
    assert (tri == axial).mean() > 0.95  # (a few near-ties can flip with the rounding to uint8)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "tri" / "labels.tif"), tri)


def test_triplanar_uses_each_plane(tmp_path):
    """A model that sees its neighbours: the tri-planar mean differs from the axial prediction, and equals the mean of
    the three planes computed by hand."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (8, 16, 12), dtype=np.uint8)
    vol = _vol(images, None, tmp_path)
    torch.manual_seed(0)
    m = torch.nn.Conv2d(3, 2, 3, padding=1, padding_mode="replicate").eval()
    dev = torch.device("cpu")
    utils.predict_volume(m, vol, tmp_path / "tri", 64, dev, True, triplanar=True)
    tfms = Pipeline(utils._batch_tfms(None, False, dev), split_idx=1)
    planes = []
    with torch.no_grad():
        for axis in (0, 1, 2):
            x = torch.from_numpy(utils._slices_with_context(images, np.arange(images.shape[axis]), 1, axis))
            p = utils._forward_probs(m, x, tfms, None).numpy()
            planes.append(p if axis == 0 else p.transpose(2, 1, 0, 3) if axis == 1 else p.transpose(2, 1, 3, 0))
    expected = np.mean(planes, 0) * 255
    got = np.load(tmp_path / "tri" / "probs.npy").astype(float)
    assert np.abs(got - expected).max() <= 1.5
    assert np.abs(planes[0] * 255 - expected).max() > 5  # the planes really differ here


def test_flip_tta_is_flip_equivariant(tmp_path):
    """With TTA, predicting a flipped volume and flipping the result back gives the same probabilities."""
    torch.manual_seed(0)
    model = utils.create_unet_model(utils._arch("resnet18"), 3, (32, 32), pretrained=False).eval()
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 32, 32), dtype=np.uint8)
    dev = torch.device("cpu")
    tfms = Pipeline(utils._batch_tfms(None, False, dev), split_idx=1)
    x = torch.from_numpy(images)[:, None]
    with torch.no_grad():
        for f in utils.TTA_FLIPS[1:]:
            p = utils._forward_probs(model, x, tfms, None, tta=True)
            q = utils._forward_probs(model, x.flip(f), tfms, None, tta=True).flip(f)
            assert (p - q).abs().max() < 1e-4
        plain = (utils._forward_probs(model, x, tfms, None) - utils._forward_probs(model, x.flip(-1), tfms, None).flip(-1))
        assert plain.abs().max() > 1e-3  # without TTA the model is not flip-equivariant: the check above means something
    # end to end: predict_volume with tta on the volume and on its left-right mirror
    utils.predict_volume(model, _vol(images, None, tmp_path), tmp_path / "a", 2, dev, True, tta=True)
    utils.predict_volume(model, _vol(np.ascontiguousarray(images[:, :, ::-1]), None, tmp_path), tmp_path / "b", 2, dev,
                         True, tta=True)
    a, b = np.load(tmp_path / "a" / "probs.npy"), np.load(tmp_path / "b" / "probs.npy")
    assert np.abs(a.astype(int) - b[..., ::-1]).max() <= 1


# --- the specimen classifier ---------------------------------------------------------------------------------

def _rotation(rng):
    q = rng.normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array([[a*a+b*b-c*c-d*d, 2*(b*c-a*d), 2*(b*d+a*c)], [2*(b*c+a*d), a*a-b*b+c*c-d*d, 2*(c*d-a*b)],
                     [2*(b*d-a*c), 2*(c*d+a*b), a*a-b*b-c*c+d*d]])


def shells_and_chains(tmp_path, seed=0):
    """A volume of elongated single shells (class 1, solid ellipsoids) and chains of three spheres (class 2) of the
    same length, brightness and random orientation, one per 18-voxel cell; the 'segmentation' calls all of them
    class 1. Returns (vol, pred)."""
    rng = np.random.default_rng(seed)
    cell = 18
    Z, H, W = 5 * cell, 4 * cell, 4 * cell
    labels = np.zeros((Z, H, W), np.uint8)
    g = np.indices((cell, cell, cell), dtype=np.float32).reshape(3, -1).T - (cell - 1) / 2
    for cz in range(5):
        for cy in range(4):
            for cx in range(4):
                R, length = _rotation(rng), rng.uniform(12, 15)
                p = g @ R.astype(np.float32)
                if rng.uniform() < 0.5:
                    a = np.array([length / 2, length / 2 * 0.42, length / 2 * 0.38]) * rng.uniform(0.9, 1.1, 3)
                    inside, k = ((p / a) ** 2).sum(1) <= 1, 1
                else:
                    r = length / 6 * rng.uniform(0.95, 1.1)
                    cs = np.array([[-2 * r, 0, 0], [0, 0, 0], [2 * r, 0, 0]])
                    inside, k = (((p[:, None, :] - cs[None]) ** 2).sum(2) <= (r * 1.08) ** 2).any(1), 2
                sl = tuple(slice(c * cell, (c + 1) * cell) for c in (cz, cy, cx))
                labels[sl][inside.reshape(cell, cell, cell)] = k
    images = np.where(labels > 0, 200, 60).astype(np.uint8)
    return _vol(images, labels, tmp_path), (labels > 0).astype(np.uint8)


def test_classifier_tells_shells_from_chains(tmp_path, capsys):
    vol, pred = shells_and_chains(tmp_path)
    work = tmp_path / "run"
    cat0 = utils.extract_fossils(vol, work, pred, min_voxels=50, max_exports=0)
    assert len(cat0) == 80 and (cat0["class"] == "shell").all()  # the segmentation confused every chain
    assert (work / "exports" / "truth_features.csv").exists()
    before = utils.evaluate_specimens(vol, work, valid_pct=0.2)
    cat = utils.classify_specimens(work, valid_pct=0.2)
    out = capsys.readouterr().out
    assert "Specimen classifier trained on" in out
    feats = pd.read_csv(work / "exports" / "features.csv")
    truth = np.where(feats["truth_chain"] > feats["truth_shell"], "chain", "shell")
    n_train = len(utils.split_slices(len(vol.images), 0.2)[0])
    held_out = (cat["z0"] >= n_train).to_numpy()  # never seen by the classifier
    assert held_out.sum() >= 10
    acc = (cat["class"].to_numpy()[held_out] == truth[held_out]).mean()
    assert acc >= 0.9, acc
    assert (cat["seg_class"] == "shell").all() and cat["class_probability"].between(0, 1).all()
    after = utils.evaluate_specimens(vol, work, valid_pct=0.2)
    assert after["class_f1"] > before["class_f1"] + 0.3
    assert after["labels_clean"]["iou"]["chain"] > 0.8  # the clean label volume was repainted
    js = utils.json.loads((work / "exports" / "classifier.json").read_text())
    assert js["from_truth"] > 0 and js["true_specimens"] > 0 and js["from_review"] == 0


def test_review_labels_change_the_classifier(tmp_path, capsys):
    """Reviewing (no ground truth used): chains rejected, shells accepted -> the other chains get flagged and leave the
    clean label volume; then the review renames the shells' taxon and the classifier follows."""
    vol, pred = shells_and_chains(tmp_path, seed=1)
    work = tmp_path / "run"
    utils.extract_fossils(vol, work, pred, min_voxels=50, max_exports=0)
    assert utils.classify_specimens(work, use_truth=False) is None  # no review yet: nothing to learn from
    assert "not trained" in capsys.readouterr().out
    feats = pd.read_csv(work / "exports" / "features.csv")
    is_chain = (feats["truth_chain"] > feats["truth_shell"]).to_numpy()
    s = utils.ReviewSession(work)
    reviewed = feats["id"].to_numpy()[:40]
    for sid, chain in zip(reviewed, is_chain[:40]):
        s.set(sid, "rejected" if chain else "accepted")
    cat = utils.classify_specimens(work, use_truth=False)
    rest = ~np.isin(cat["id"], reviewed)
    assert (cat["flagged"].to_numpy()[rest] == is_chain[rest]).mean() >= 0.9
    assert set(cat.loc[cat["flagged"], "class"]) == {utils.NOT_A_FOSSIL}
    clean = tifffile.imread(work / "predictions" / "labels_clean.tif")
    ids = tifffile.imread(work / "predictions" / "specimens.tif")
    flagged_ids = cat.loc[cat["flagged"], "id"].to_numpy()
    assert not clean[np.isin(ids, flagged_ids)].any() and clean[np.isin(ids, cat.loc[~cat["flagged"], "id"])].all()
    # second round: the reviewer names the accepted shells; the classifier learns the taxon
    for sid, chain in zip(reviewed, is_chain[:40]):
        if not chain:
            s.set(sid, taxon="Cythereis")
    cat2 = utils.classify_specimens(work, use_truth=False)
    assert set(cat2.loc[~cat2["flagged"], "class"]) == {"Cythereis"}
    clean2 = tifffile.imread(work / "predictions" / "labels_clean.tif")
    np.testing.assert_array_equal(clean2, clean)  # a taxon that is not a class keeps its segmentation class
    order = utils.ReviewSession(work).order("all", "confidence")  # least certain first: by the classifier's probability
    probs = cat2.set_index("id").loc[order, "class_probability"].to_numpy()
    assert (np.diff(probs) >= 0).all()


def test_classifier_with_no_specimen(tmp_path, capsys):
    """An empty prediction (a quick model) on a labelled volume: true specimens to learn from, none to classify."""
    vol, pred = shells_and_chains(tmp_path)
    work = tmp_path / "run"
    utils.extract_fossils(vol, work, pred * 0, min_voxels=50, max_exports=0)
    assert len(pd.read_csv(work / "exports" / "truth_features.csv")) == 80
    assert utils.classify_specimens(work) is None
    assert "no specimen in the catalogue" in capsys.readouterr().out
