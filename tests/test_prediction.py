"""Prediction: every slice written at full size, padding, context slices, tri-planar averaging and flip TTA."""
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from fastai.vision.all import Pipeline, TensorImage, create_unet_model
from PIL import Image

from conftest import volume_of
from microfossil.evaluation import save_metrics
from microfossil.learner import build_learner, encoder
from microfossil.loaders import batch_tfms, make_dls, n_input_channels
from microfossil.prediction import (TTA_FLIPS, _forward_probs, _padded_forward, _slices_with_context,
                                    CALIBRATION_SLICES, calibration_slices, choose_fossil_threshold, load_model,
                                    predict_volume, threshold_counts, threshold_plan, voxel_labels)
from microfossil.io import file_stamp
from microfossil.split import split_volume
from microfossil.training import PhaseCheckpoint, weights_sha256



def test_predict_volume_writes_every_slice(odd_vol, tmp_path):
    learn = build_learner(make_dls(odd_vol, 1.0, bs=2), pretrained=False, work_dir=tmp_path)
    learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("full_unfrozen"))
    model, info = load_model(tmp_path, "full_unfrozen", torch.device("cpu"))
    pred = predict_volume(model, odd_vol, tmp_path / "pred", bs=4, slice_pngs=True)
    assert pred.shape == odd_vol.shape and pred.dtype == np.uint8
    previews = sorted((tmp_path / "pred" / "previews").glob("*.png"))
    assert [p.stem for p in previews] == odd_vol.stems  # 6 slices: each has its preview (16 at most)
    assert np.asarray(Image.open(previews[0])).shape == (141, 133, 3)
    for z, stem in enumerate(odd_vol.stems):
        png = np.asarray(Image.open(tmp_path / "pred" / f"{stem}.png"))
        assert png.shape == (141, 133)
        np.testing.assert_array_equal(png, pred[z])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "pred" / "labels.tif"), pred)
    probs = np.load(tmp_path / "pred" / "probs.npy", mmap_mode="r")
    assert probs.shape == (6, 3, 141, 133) and probs.dtype == np.uint8
    assert np.abs(probs.astype(int).sum(1) - 255).max() <= 3  # uint8 probabilities sum to ~1
    assert (voxel_labels(probs, 255) != pred).mean() <= 0.01  # quantised probabilities agree with the labels
    m = save_metrics(tmp_path, odd_vol, pred, split_volume(odd_vol, 0.2), info)
    assert m["n_test_slices"] == 1 and json.loads((tmp_path / "metrics.json").read_text())["codes"] == info["codes"]
    assert m["provenance"]["checkpoint"] == info["checkpoint"] is not None


def test_a_voxel_the_fossil_classes_share_stays_fossil():
    # background 0.4 against two fossil classes at 0.35 and 0.25: the arg-max says background, the fossil classes
    # together say fossil (the likeliest of them); background at half or more stays background
    p = np.array([[0.40, 0.35, 0.25], [0.40, 0.25, 0.35], [0.50, 0.30, 0.20], [0.80, 0.15, 0.05], [0.1, 0.6, 0.3]])
    p = p.reshape(5, 3, 1, 1)
    assert voxel_labels(p).ravel().tolist() == [1, 2, 0, 0, 1]
    assert p.argmax(1).ravel().tolist() == [0, 0, 0, 0, 1]
    torch_labels = voxel_labels(torch.from_numpy(p))
    assert torch_labels.ravel().tolist() == [1, 2, 0, 0, 1]
    u8 = (p * 255).round().astype(np.uint8)  # probs.npy's scale: no overflow, same labels
    assert voxel_labels(u8, 255).ravel().tolist() == [1, 2, 0, 0, 1]
    two = np.array([[0.4, 0.6], [0.7, 0.3]]).reshape(2, 2, 1)  # one fossil class: the arg-max
    assert voxel_labels(two).ravel().tolist() == [1, 0]
    # another threshold: fossil where the fossil classes together pass it
    assert voxel_labels(p, 1.0, 0.7).ravel().tolist() == [0, 0, 0, 0, 1]
    assert voxel_labels(p, 1.0, 0.3).ravel().tolist() == [1, 2, 1, 0, 1]
    assert voxel_labels(u8, 255, 0.3).ravel().tolist() == [1, 2, 1, 0, 1]
    assert voxel_labels(torch.from_numpy(p), 1.0, 0.3).ravel().tolist() == [1, 2, 1, 0, 1]
    assert voxel_labels(two, 1.0, 0.65).ravel().tolist() == [0, 0]


def test_the_fossil_threshold_with_the_best_foreground_iou_is_chosen():
    bg = np.array([0.9, 0.6, 0.45, 0.3, 0.1])  # background probabilities; fossil truly where it is 0.6 or less
    truth = np.array([False, True, True, True, True])
    t, iou = choose_fossil_threshold(threshold_counts(torch.from_numpy(bg), truth))
    # 0.2-0.35 call the 0.6 fossil and not the 0.9 (IoU 1); 0.4 and above miss the 0.6 (3 of 4)
    assert [iou[x] for x in (0.2, 0.35, 0.4, 0.5)] == [1.0, 1.0, 0.75, 0.75]
    assert t == 0.35  # of the equals, the nearest 0.5
    u8 = (bg * 255).round().astype(np.uint8)
    assert choose_fossil_threshold(threshold_counts(u8, truth, 255))[0] == 0.35
    assert choose_fossil_threshold(threshold_counts(bg, np.zeros(5, bool)) * 0) == (0.5, {})  # nothing to match


def test_the_fossil_threshold_is_chosen_on_the_training_slices_and_used_for_the_labels(tmp_path):
    """A model whose every voxel's fossil probability is its own (a 1x1 convolution): masks drawn at 0.7 make 0.7
    the threshold chosen on the slices given, axial and tri-planar; the labels are the probabilities' at 0.7."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (10, 24, 20), dtype=np.uint8)
    m, dev = _pointwise_model(), torch.device("cpu")
    free = predict_volume(m, volume_of(images, None, tmp_path), tmp_path / "free", 4, dev, True)
    probs = np.load(tmp_path / "free" / "probs.npy")
    assert json.loads((tmp_path / "free" / "prediction.json").read_text())["fossil_threshold"] == 0.5
    assert (free == voxel_labels(probs, 255)).mean() > 0.99  # (near-ties of two classes flip with the uint8 rounding)
    labels = voxel_labels(probs, 255, 0.7).astype(np.uint8)  # the "truth": what the model says at 0.7
    assert 0.05 < (labels > 0).mean() < (free > 0).mean()
    vol = volume_of(images, labels, tmp_path)
    for tri in (False, True):
        out = tmp_path / f"cal{tri}"
        pred = predict_volume(m, vol, out, 4, dev, True, triplanar=tri, calibrate_on=np.arange(6))
        record = json.loads((out / "prediction.json").read_text())
        assert record["fossil_threshold"] == 0.7 and record["fossil_threshold_chosen_on"]["slices"] == list(range(6))
        assert record["fossil_threshold_chosen_on"]["foreground_iou"]["0.7"] > 0.99
        assert ((pred > 0) == (labels > 0)).mean() > 0.99 and (pred == voxel_labels(np.load(out / "probs.npy"), 255, 0.7)).mean() > 0.99
    vol.labels[:] = 0  # no fossil in the slices: 0.5
    predict_volume(m, vol, tmp_path / "none", 4, dev, True, calibrate_on=np.arange(6))
    assert json.loads((tmp_path / "none" / "prediction.json").read_text())["fossil_threshold"] == 0.5


def test_the_threshold_plan_of_05():
    labels = np.zeros((20, 8, 8), np.uint8)
    vol = type("V", (), {"labels": labels, "images": labels, "codes": ["matrix", "a", "b"]})()
    split = split_volume(vol, test_pct=0.2, valid_pct=0.2, gap_slices=1)  # validation 0-3, training 5-14, test 16-19
    assert threshold_plan(0.4, vol, split) == (0.4, None)  # a number is used as it is
    t, on = threshold_plan("auto", vol, split)
    assert t == 0.5 and on.tolist() == [0, 1, 2, 3, *range(5, 15)]  # this run's model and masks: its labelled blocks
    assert threshold_plan("auto", vol, split, bundle={"fossil_threshold": 0.35}) == (0.35, None)
    assert threshold_plan("auto", vol, split, bundle={}) == (0.5, None)  # a bundle from before the threshold
    assert threshold_plan("auto", vol, None) == (0.5, None)  # no masks, no split: nothing to choose on
    assert threshold_plan("auto", vol, split, model_path="elsewhere") == (0.5, None)


def test_the_threshold_is_chosen_on_training_and_validation_slices_never_the_test_block():
    """Up to CALIBRATION_SLICES of each labelled block, evenly spaced; none of the test block, also when it is the
    validation block (valid_pct=0, the published recipe); no validation slice of a specimen that reaches the training
    block (a gap of 0 lets one cross)."""
    Z = 200
    labels = np.zeros((Z, 8, 8), np.uint8)
    vol = type("V", (), {"labels": labels, "images": labels, "codes": ["matrix", "a", "b"]})()
    split = split_volume(vol, test_pct=0.2, valid_pct=0.25, gap_slices=2)  # validation 0-49, training 52-157
    on = calibration_slices(vol, split)
    train, valid = on[on >= split.train_start], on[on < split.valid_stop]
    assert len(train) == len(valid) == CALIBRATION_SLICES and len(on) == 2 * CALIBRATION_SLICES
    assert train.min() == split.train_start and train.max() == split.train_stop - 1 and valid.min() == 0
    assert on.max() < split.test_start and list(on) == sorted(set(on))
    published = split_volume(vol, test_pct=0.2, valid_pct=0.0, gap_slices=2)
    assert published.published and calibration_slices(vol, published).max() < published.test_start
    assert len(calibration_slices(vol, published)) == CALIBRATION_SLICES
    labels[45:56, 2:5, 2:5] = 1  # a specimen across the validation block's end, the gap and the training block's start
    labels[10:13, 2:5, 2:5] = 2  # one in the validation block only
    crossing = split_volume(vol, test_pct=0.2, valid_pct=0.25, gap_slices=0)
    assert crossing.valid_left_out["voxels"] > 0
    valid = [z for z in calibration_slices(vol, crossing) if z < crossing.valid_stop]
    assert not set(valid) & set(range(45, 50)) and len(valid) == CALIBRATION_SLICES  # 45 slices left, 32 of them


def test_outputs_record_the_checkpoint_and_a_stale_probs_file_goes(odd_vol, tmp_path):
    """prediction.json names the checkpoint (attempt and weights hash) and the probs.npy written with the labels; a
    prediction without save_probs removes an older probs.npy; weights changed after training are refused."""
    learn = build_learner(make_dls(odd_vol, 1.0, bs=2), pretrained=False, work_dir=tmp_path)
    learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("full_unfrozen"))
    model, info = load_model(tmp_path, "full_unfrozen", torch.device("cpu"))
    assert info["checkpoint"] == {"name": "full_unfrozen.attempt1",
                                  "sha256": weights_sha256(tmp_path / "models" / "full_unfrozen.pth")}
    out = tmp_path / "pred"
    predict_volume(model, odd_vol, out, bs=4, checkpoint=info["checkpoint"])
    rec = json.loads((out / "prediction.json").read_text())
    assert rec["checkpoint"] == info["checkpoint"] and rec["probs_file"] == file_stamp(out / "probs.npy")
    predict_volume(model, odd_vol, out, bs=4, save_probs=False, checkpoint=info["checkpoint"])
    assert not (out / "probs.npy").exists()
    assert json.loads((out / "prediction.json").read_text())["probs_file"] is None
    torch.save({"model": {}}, tmp_path / "models" / "full_unfrozen.pth")  # replaced after training
    with pytest.raises(ValueError, match="SHA-256 differs"):
        load_model(tmp_path, "full_unfrozen", torch.device("cpu"))


def test_padded_forward_matches_shapes_and_crops(odd_vol, tmp_path):
    """Odd slices are reflect-padded to a multiple of 32 and the logits cropped back to the slice size."""
    learn = build_learner(make_dls(odd_vol, 1.0, bs=2), pretrained=False, work_dir=tmp_path)
    model = learn.model.eval()
    tfms = Pipeline(batch_tfms(None, False), split_idx=1)
    x = torch.from_numpy(np.ascontiguousarray(odd_vol.images[:2]))[:, None]
    with torch.no_grad():
        out = _padded_forward(model, x, tfms, None)
        assert out.shape == (2, 3, 141, 133)
        sq = torch.from_numpy(np.ascontiguousarray(odd_vol.images[:2, :128, :96]))[:, None]
        ref = model(tfms(TensorImage(sq)))  # already a multiple of 32: no padding, same result
        torch.testing.assert_close(_padded_forward(model, sq, tfms, None), ref)


def test_slices_with_context_clamps_at_the_ends():
    arr = np.arange(5 * 2 * 3, dtype=np.uint8).reshape(5, 2, 3)
    x = _slices_with_context(arr, [0, 4], 3, axis=0)
    assert x.shape == (2, 3, 2, 3)
    np.testing.assert_array_equal(x[0], arr[[0, 0, 1]])
    np.testing.assert_array_equal(x[1], arr[[3, 4, 4]])
    y = _slices_with_context(arr, [1], 3, axis=2)  # YZ slice at x=1: rows z, columns y
    np.testing.assert_array_equal(y[0, 1], arr[:, :, 1])
    np.testing.assert_array_equal(y[0, 0], arr[:, :, 0])
    with pytest.raises(ValueError, match="odd"):
        n_input_channels(2)


def _pointwise_model(K=3):
    """A 1x1-convolution 'U-Net': its prediction of a voxel depends on that voxel alone, in every plane."""
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, K, 1).eval()


def test_triplanar_prediction_averages_the_three_planes(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 20, 28), dtype=np.uint8)
    vol = volume_of(images, None, tmp_path)
    m = _pointwise_model()
    dev = torch.device("cpu")
    axial = predict_volume(m, vol, tmp_path / "ax", 4, dev, True)
    tri = predict_volume(m, vol, tmp_path / "tri", 4, dev, True, triplanar=True)
    p_ax, p_tri = np.load(tmp_path / "ax" / "probs.npy"), np.load(tmp_path / "tri" / "probs.npy")
    assert p_tri.shape == p_ax.shape == (12, 3, 20, 28)
    assert np.abs(p_tri.astype(int) - p_ax).max() <= 1  # same per-voxel prediction in every plane: same mean
    np.testing.assert_array_equal(tri, voxel_labels(p_tri, 255))  # labels are read from the averaged probabilities
    assert (tri == axial).mean() > 0.95  # (a few near-ties can flip with the rounding to uint8)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "tri" / "labels.tif"), tri)


def test_triplanar_uses_each_plane(tmp_path):
    """A model that sees its neighbours: the tri-planar mean differs from the axial prediction, and equals the mean of
    the three planes computed by hand."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (8, 16, 12), dtype=np.uint8)
    vol = volume_of(images, None, tmp_path)
    torch.manual_seed(0)
    m = torch.nn.Conv2d(3, 2, 3, padding=1, padding_mode="replicate").eval()
    dev = torch.device("cpu")
    predict_volume(m, vol, tmp_path / "tri", 64, dev, True, triplanar=True)
    tfms = Pipeline(batch_tfms(None, False, dev), split_idx=1)
    planes = []
    with torch.no_grad():
        for axis in (0, 1, 2):
            x = torch.from_numpy(_slices_with_context(images, np.arange(images.shape[axis]), 1, axis))
            p = _forward_probs(m, x, tfms, None).numpy()
            planes.append(p if axis == 0 else p.transpose(2, 1, 0, 3) if axis == 1 else p.transpose(2, 1, 3, 0))
    # near the volume's ends the XZ and YZ views weigh less: 1/16 of the axial view on the first and last slice, 2/16
    # on the next, ... (8 slices: 1 2 3 4 4 3 2 1)
    w = np.array([1, 2, 3, 4, 4, 3, 2, 1], float)[:, None, None, None] / 16
    expected = (planes[0] + w * planes[1] + w * planes[2]) / (1 + 2 * w) * 255
    got = np.load(tmp_path / "tri" / "probs.npy").astype(float)
    assert np.abs(got - expected).max() <= 1.5
    assert np.abs(planes[0] * 255 - expected).max() > 5  # the planes really differ here
    assert np.abs(np.mean(planes, 0) * 255 - expected).max() > 2  # and the weights are not a plain mean


def test_flip_tta_is_flip_equivariant(tmp_path):
    """With TTA, predicting a flipped volume and flipping the result back gives the same probabilities."""
    torch.manual_seed(0)
    model = create_unet_model(encoder("resnet18"), 3, (32, 32), pretrained=False).eval()
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 32, 32), dtype=np.uint8)
    dev = torch.device("cpu")
    tfms = Pipeline(batch_tfms(None, False, dev), split_idx=1)
    x = torch.from_numpy(images)[:, None]
    with torch.no_grad():
        for f in TTA_FLIPS[1:]:
            p = _forward_probs(model, x, tfms, None, tta=True)
            q = _forward_probs(model, x.flip(f), tfms, None, tta=True).flip(f)
            assert (p - q).abs().max() < 1e-4
        plain = (_forward_probs(model, x, tfms, None) - _forward_probs(model, x.flip(-1), tfms, None).flip(-1))
        assert plain.abs().max() > 1e-3  # without TTA the model is not flip-equivariant: the check above means something
    # end to end: predict_volume with tta on the volume and on its left-right mirror
    predict_volume(model, volume_of(images, None, tmp_path), tmp_path / "a", 2, dev, True, tta=True)
    predict_volume(model, volume_of(np.ascontiguousarray(images[:, :, ::-1]), None, tmp_path), tmp_path / "b", 2, dev,
                         True, tta=True)
    a, b = np.load(tmp_path / "a" / "probs.npy"), np.load(tmp_path / "b" / "probs.npy")
    assert np.abs(a.astype(int) - b[..., ::-1]).max() <= 1


def test_an_interrupted_prediction_keeps_the_previous_files(tmp_path, monkeypatch):
    """A failure (or a disconnect) in the middle of a prediction leaves the last complete outputs, and no partial file."""
    rng = np.random.default_rng(5)
    vol = volume_of(rng.integers(0, 256, (6, 32, 32), dtype=np.uint8), None, tmp_path)
    out, cpu = tmp_path / "pred", torch.device("cpu")
    predict_volume(_pointwise_model(), vol, out, 2, cpu, True)
    before = {p.name: p.read_bytes() for p in (out / "labels.tif", out / "probs.npy")}

    class FailsAtBatch2(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.calls = _pointwise_model(), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("disconnect")
            return self.conv(x) * 2
    with pytest.raises(RuntimeError, match="disconnect"):
        predict_volume(FailsAtBatch2(), vol, out, 2, cpu, True)
    assert {p.name: p.read_bytes() for p in (out / "labels.tif", out / "probs.npy")} == before
    assert not list(out.glob("*.partial"))

    def fails_on_the_last_slice(self, path, *a, **k):  # every label page is written, then a PNG write fails
        if str(path).endswith(f"{vol.stems[-1]}.png"):
            raise OSError("Drive is full")
        return save(self, path, *a, **k)
    save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", fails_on_the_last_slice)
    with pytest.raises(OSError, match="Drive is full"):
        predict_volume(_pointwise_model(), vol, out, 2, cpu, True, slice_pngs=True)
    assert {p.name: p.read_bytes() for p in (out / "labels.tif", out / "probs.npy")} == before
    assert not list(out.glob("*.partial"))


def test_drive_gets_a_few_files_and_the_probabilities_stay_on_the_local_disk(tmp_path, capsys):
    """Without slice_pngs a prediction is a handful of files (labels.tif, previews of about 16 slices, the record);
    probs.npy goes to `probs_dir` (the runtime's local disk in Colab), which the record names and extraction reads;
    gone with the runtime, extraction says so and classes specimens by their majority class."""
    from microfossil.extraction import open_probs, read_prediction
    rng = np.random.default_rng(2)
    vol = volume_of(rng.integers(0, 256, (40, 32, 32), dtype=np.uint8), None, tmp_path)
    out, local, cpu = tmp_path / "drive" / "pred", tmp_path / "local", torch.device("cpu")
    pred = predict_volume(_pointwise_model(), vol, out, 8, cpu, True, probs_dir=local)
    assert "40/40" in capsys.readouterr().out  # the progress bar counted every slice
    assert sorted(p.name for p in out.iterdir()) == ["labels.tif", "prediction.json", "previews"]
    assert len(list((out / "previews").glob("*.png"))) == 16
    rec = read_prediction(out, vol.shape)
    assert [rec["probs_path"]] == [str(p.resolve()) for p in local.glob("probs.*.npy")] and not rec["slice_pngs"]
    probs = open_probs(out, (40, 3, 32, 32), rec)
    assert probs is not None and (voxel_labels(np.asarray(probs), 255) == pred).mean() > 0.99
    del probs
    Path(rec["probs_path"]).unlink()  # the runtime is gone
    assert open_probs(out, (40, 3, 32, 32), rec) is None and "gone with the runtime" in capsys.readouterr().out


def test_a_prediction_cut_short_keeps_the_previous_ones_probabilities(tmp_path, monkeypatch):
    """With probs.npy on the local disk (Colab), a prediction that fails after its probabilities are written (Drive
    full while writing the previews, say) leaves the previous prediction whole, its probabilities included; the next
    complete one removes the older files."""
    from microfossil import prediction
    from microfossil.extraction import open_probs, read_prediction
    rng = np.random.default_rng(3)
    vol = volume_of(rng.integers(0, 256, (8, 32, 32), dtype=np.uint8), None, tmp_path)
    out, local, cpu = tmp_path / "drive" / "pred", tmp_path / "local", torch.device("cpu")
    predict_volume(_pointwise_model(), vol, out, 4, cpu, True, probs_dir=local)
    rec = read_prediction(out, vol.shape)
    monkeypatch.setattr(prediction, "_write_previews", lambda *a: (_ for _ in ()).throw(OSError("Drive is full")))
    with pytest.raises(OSError, match="Drive is full"):
        predict_volume(_pointwise_model(K=3), vol, out, 4, cpu, True, probs_dir=local)
    assert read_prediction(out, vol.shape) == rec and open_probs(out, (8, 3, 32, 32), rec) is not None
    monkeypatch.undo()
    predict_volume(_pointwise_model(), vol, out, 4, cpu, True, probs_dir=local)
    new = read_prediction(out, vol.shape)
    assert [p.name for p in local.glob("probs.*.npy")] == [Path(new["probs_path"]).name] != [Path(rec["probs_path"]).name]


def test_a_new_prediction_keeps_every_file_it_does_not_write(tmp_path):
    """The prediction is swapped in as a whole folder: the last extraction's files and a person's own (a corrected
    label stack, a notes folder) are carried into it; its own outputs are new."""
    rng = np.random.default_rng(6)
    vol = volume_of(rng.integers(0, 256, (4, 32, 32), dtype=np.uint8), None, tmp_path)
    out, cpu = tmp_path / "pred", torch.device("cpu")
    predict_volume(_pointwise_model(), vol, out, 2, cpu, True)
    (out / "specimens.tif").write_text("extraction")
    (out / "labels_corrected.tif").write_text("mine")
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("mine too")
    before = (out / "labels.tif").read_bytes()
    predict_volume(_pointwise_model(K=4), volume_of(vol.images, None, tmp_path), out, 2, cpu, True)
    assert (out / "labels.tif").read_bytes() != before
    assert [(out / f).read_text() for f in ("specimens.tif", "labels_corrected.tif", "notes/a.txt")] == \
        ["extraction", "mine", "mine too"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pred")) == ["pred"]


def test_an_out_of_memory_error_in_prediction_halves_the_batch(odd_vol, tmp_path, capsys):
    """CUDA running out of memory while predicting (faked on CPU): the prediction starts again with half the batch
    and ends as it would have with that batch; prediction.json records the batch size used."""
    model = create_unet_model(encoder("resnet18"), 3, (32, 32), pretrained=False).eval()

    class Tight(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            if len(x) > 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (fake)")
            return self.inner(x)

    pred = predict_volume(Tight(), odd_vol, tmp_path / "tight", bs=4)
    assert "prediction: CUDA out of memory at batch size 4; going on with batch size 2" in capsys.readouterr().out
    assert json.loads((tmp_path / "tight" / "prediction.json").read_text())["bs"] == 2
    np.testing.assert_array_equal(pred, predict_volume(model, odd_vol, tmp_path / "plain", bs=2))
