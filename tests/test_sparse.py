"""Sparse labels: a few labelled slices anywhere in the core, pixels left unlabelled, and what trains and scores."""
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from microfossil.classifier import NOT_A_FOSSIL, Blocks, _training_labels
from microfossil.evaluation import _score_labels, describe_specimen_scores, save_metrics
from microfossil.learner import LOSSES, build_learner
from microfossil.loaders import make_dls
from microfossil.metrics import IGNORE
from microfossil.prediction import calibration_slices, predict_volume, threshold_counts
from microfossil.sample import make_sample
from microfossil.sparse import UNLABELLED
from microfossil.split import _outline_width, describe_split, split_volume
from microfossil.volume import DatasetError, load_volume


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A 48-slice 64x64 sample, every slice labelled."""
    return make_sample(tmp_path_factory.mktemp("dense") / "ds", n_slices=48, height=64, width=64, seed=5)


def thinned(dense, folder, keep):
    """A copy of `dense` with the masks of slices `keep` only."""
    out = folder / "sparse"
    shutil.copytree(dense, out)
    for z, m in enumerate(sorted((out / "train_masks_labels").iterdir())):
        if z not in keep:
            m.unlink()
    return out


def one_in_eight(n):
    return [z for z in range(n) if z % 8 == 4]


def test_a_missing_mask_stops_unless_sparse_labels_are_asked_for(dense, tmp_path):
    ds = thinned(dense, tmp_path, one_in_eight(48))
    with pytest.raises(DatasetError, match="sparse_labels=True"):
        load_volume(ds)
    vol = load_volume(ds, sparse_labels=True)
    full = load_volume(dense)
    assert np.flatnonzero(vol.labelled).tolist() == one_in_eight(48)
    for z in range(48):  # a labelled slice as its mask says, an unlabelled one UNLABELLED throughout; images all there
        assert np.array_equal(vol.labels[z], full.labels[z] if z % 8 == 4 else np.full((64, 64), UNLABELLED))
    assert np.array_equal(vol.images, full.images)
    cached = load_volume(ds, sparse_labels=True, cache_dir=tmp_path / "cache")  # decoded once, then memory-mapped
    again = load_volume(ds, sparse_labels=True, cache_dir=tmp_path / "cache")
    assert np.array_equal(cached.labelled, vol.labelled) and np.array_equal(again.labelled, vol.labelled)
    assert np.array_equal(again.labels, vol.labels)


def test_a_label_volume_marks_its_empty_slices_unlabelled_and_a_list_names_the_labelled_ones(dense, tmp_path):
    full = load_volume(dense)
    assert (full.labels[16] > 0).any() and (full.labels[41] > 0).any() and not (full.labels[36] > 0).any()
    labels = np.zeros(full.shape, np.uint8)
    labels[[16, 41]] = full.labels[[16, 41]]  # (36: labelled, and empty: only a list can say so)
    scan = tmp_path / "scan"
    scan.mkdir()
    tifffile.imwrite(scan / "core.tif", np.asarray(full.images))
    tifffile.imwrite(scan / "core_GT.tif", labels)
    (scan / "codes.txt").write_text("\n".join(full.codes))
    assert np.flatnonzero(load_volume(scan, sparse_labels=True).labelled).tolist() == [16, 41]
    listed = load_volume(scan, sparse_labels=[16, 36, 41])
    assert np.flatnonzero(listed.labelled).tolist() == [16, 36, 41]
    assert (listed.labels[36] == 0).all() and (listed.labels[37] == UNLABELLED).all()
    assert load_volume(scan).labelled.all()  # not asked for: every slice labelled, the empty ones background


def test_an_unlabelled_value_leaves_pixels_out_and_names_itself_in_the_error(dense, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(dense, ds)
    mask = sorted((ds / "train_masks_labels").iterdir())[5]
    lab = np.array(Image.open(mask))
    lab[:, :20] = 255  # a strip left unlabelled
    Image.fromarray(lab).save(mask)
    with pytest.raises(DatasetError, match="unlabelled_value=255"):
        load_volume(ds)
    vol = load_volume(ds, unlabelled_value=255)
    assert (vol.labels[5][:, :20] == UNLABELLED).all() and vol.labelled.all()
    assert np.array_equal(vol.labels[5][:, 20:], lab[:, 20:])
    with pytest.raises(DatasetError, match="class"):
        load_volume(ds, unlabelled_value=1)  # the label of a class in codes.txt


def test_a_label_folder_of_a_few_slices_is_matched_by_slice_number(dense, tmp_path):
    full = load_volume(dense)
    labels = tmp_path / "labels"
    labels.mkdir()
    for z in (8, 24, 40):  # named as Fiji's image sequence export names them
        Image.fromarray(np.asarray(full.labels[z])).save(labels / f"labels_{z:04d}.png")
    shutil.copy(dense / "codes.txt", labels / "codes.txt")
    scan = tmp_path / "slices"
    shutil.copytree(dense / "train", scan)  # slice_0000.png ...
    vol = load_volume(scan, labels_path=labels, sparse_labels=True)
    assert np.flatnonzero(vol.labelled).tolist() == [8, 24, 40]
    assert np.array_equal(vol.labels[24], full.labels[24])


def test_the_blocks_hold_labelled_slices_and_too_few_hold_none_out(dense, tmp_path):
    vol = load_volume(thinned(dense, tmp_path, one_in_eight(48)), sparse_labels=True)
    split = split_volume(vol)
    for block in (split.train, split.valid, split.test):
        assert vol.labelled[block].any()
    assert split.held_out
    few = split_volume(load_volume(thinned(dense, tmp_path / "few", [12, 20]), sparse_labels=True))  # (one to train)
    assert not few.held_out and len(few.test) == 0 and few.train_start == 12 and few.train_stop == 21
    assert np.array_equal(few.valid, few.train)
    assert "too few labelled slices (2)" in describe_split(few)
    assert few.test_pct == 0.2 and few.valid_pct == 0.1  # as asked: what the DataLoaders are checked against


def test_sparse_gaps_keep_labelled_slices_a_fossil_apart(dense, tmp_path):
    """A specimen cannot be followed through unlabelled slices: the labelled slices on either side of a gap are at
    least the widest fossil outline apart."""
    vol = load_volume(thinned(dense, tmp_path, list(range(0, 48, 2))), sparse_labels=True)
    split = split_volume(vol)
    lab = np.flatnonzero(vol.labelled)
    train_lab = lab[(lab >= split.train_start) & (lab < split.train_stop)]
    test_first, valid_last = lab[lab >= split.test_start][0], lab[lab < split.valid_stop][-1]
    width = _outline_width(vol, vol.labelled)
    assert width >= 5 and "at least %d slices apart" % width in split.gap_rule + split.valid_gap_rule
    assert test_first - train_lab[-1] >= width and train_lab[0] - valid_last >= width


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("weighted", [False, True])
def test_an_unlabelled_voxel_changes_no_loss_term(name, weighted):
    torch.manual_seed(0)
    loss = LOSSES[name](torch.tensor([0.2, 1.0, 3.0]) if weighted else None)
    pred = torch.randn(2, 3, 16, 16, requires_grad=True)
    targ = torch.randint(0, 3, (2, 16, 16))
    targ[:, :, :6] = IGNORE
    other = pred.detach().clone()
    other[:, :, :, :6] = torch.randn(2, 3, 16, 6) * 5  # anything at all where nothing is labelled
    value = loss(pred, targ)
    assert torch.allclose(value, loss(other, targ), atol=1e-6)
    value.backward()
    assert pred.grad[:, :, :, :6].abs().max() == 0 and pred.grad[:, :, :, 6:].abs().max() > 0
    assert float(loss(pred, torch.full_like(targ, IGNORE))) == 0.0  # a batch with nothing labelled: no NaN


def _fit(vol, tmp_path, **kw):
    dls = make_dls(vol, 1.0, bs=4, device=torch.device("cpu"), **kw)
    learn = build_learner(dls, pretrained=False, work_dir=tmp_path)
    learn.fit_one_cycle(1, 1e-3)
    return dls, learn


@pytest.mark.parametrize("triplanar", [False, True])
def test_one_slice_in_eight_trains_predicts_every_slice_and_scores_only_labelled_test_slices(dense, tmp_path,
                                                                                             triplanar):
    vol = load_volume(thinned(dense, tmp_path, one_in_eight(48)), sparse_labels=True)
    split = split_volume(vol)
    dls, learn = _fit(vol, tmp_path, split=split, triplanar=triplanar, context_slices=3)
    labelled_train = split.train[vol.labelled[split.train]]
    assert set(np.asarray(dls.train.dataset).tolist()) == set(labelled_train.tolist())
    assert len(dls.train.dataset) == len(split.train)  # an epoch as long as the block: as many steps as full labels
    assert set(np.asarray(dls.valid.dataset).tolist()) == set(split.valid[vol.labelled[split.valid]].tolist())
    assert np.isfinite(learn.recorder.losses[-1].item())
    pred = predict_volume(learn.model, vol, tmp_path / "predictions", bs=4, device=torch.device("cpu"),
                          save_probs=False, context_slices=3, triplanar=triplanar)
    assert pred.shape == vol.shape  # every slice predicted, labelled or not
    metrics = save_metrics(tmp_path, vol, pred, split)
    test = np.asarray(vol.labels[split.test_start:])
    assert np.asarray(metrics["confusion_matrix"]).sum() == (test != UNLABELLED).sum() > 0


def test_the_fossil_threshold_is_chosen_on_labelled_slices_and_voxels_only(dense, tmp_path):
    vol = load_volume(thinned(dense, tmp_path, one_in_eight(48)), sparse_labels=True)
    zs = calibration_slices(vol, split_volume(vol))
    assert len(zs) and vol.labelled[zs].all()
    background = torch.ones(1, 4, 4)
    background[0, :, :2] = 0.0  # predicted fossil on the left half
    truth = torch.zeros(1, 4, 4, dtype=torch.bool)
    truth[0, :, :2] = True
    unlabelled = torch.zeros(1, 4, 4, dtype=torch.bool)
    unlabelled[0, 0] = True  # a row nobody labelled: the prediction there counts neither way
    counts = threshold_counts(background, truth & ~unlabelled, counted=~unlabelled)
    assert (counts[0] == 6).all() and (counts[1] == 6).all()


def test_a_specimen_with_no_labelled_voxel_teaches_the_classifier_nothing():
    cat = pd.DataFrame({"id": [1, 2, 3], "z0": [10, 10, 10], "z1": [20, 20, 20]})
    feats = pd.DataFrame({"id": [1, 2, 3], "truth_background": [0, 90, 0], "truth_foraminifera": [80, 10, 0],
                          "truth_ostracod": [5, 0, 0]})  # 3: in unlabelled slices only
    labels, _ = _training_labels(cat, feats, ["background", "foraminifera", "ostracod"], Blocks(0, 30), None)
    assert labels.to_dict() == {1: "foraminifera", 2: NOT_A_FOSSIL}


def test_a_test_block_not_labelled_throughout_gets_voxel_scores_and_no_specimen_counts(tmp_path):
    truth = np.zeros((4, 8, 8), np.uint8)
    truth[:, 2:5, 2:5] = 1
    truth[1] = UNLABELLED
    (tmp_path / "predictions").mkdir()
    tifffile.imwrite(tmp_path / "predictions" / "labels_clean.tif", truth.clip(0, 1))
    codes = ["background", "foraminifera"]
    scores = _score_labels(tmp_path, truth, codes, 26, 1, None, 0.5)
    assert scores["not_measured"] and "n_true" not in scores and scores["labels_clean"]["iou"]["foraminifera"] == 1.0
    assert "not measured" in describe_specimen_scores(scores)
    full = truth.copy()
    full[1] = truth[0]
    assert _score_labels(tmp_path, full, codes, 26, 1, None, 0.5)["n_true"] == 1


def test_with_nothing_held_out_the_split_is_recorded_for_the_classifier_and_no_score(dense, tmp_path):
    vol = load_volume(thinned(dense, tmp_path, [12, 20]), sparse_labels=True)
    split = split_volume(vol)
    metrics = save_metrics(tmp_path, vol, np.zeros(vol.shape, np.uint8), split)
    assert metrics["test_slices"] == [] and metrics["scores"].startswith("none: no test block (too few labelled")
    assert all(v is None for v in metrics["iou"].values())
    blocks = Blocks.recorded(tmp_path)  # what 06's classifier reads
    assert (blocks.train_start, blocks.train_stop, blocks.test_start) == (12, 21, None)
    dls = make_dls(vol, 1.0, bs=2, split=split, device=torch.device("cpu"))  # validation is training: nothing IGNOREd
    assert np.array_equal(dls.train.planes[0][1][[12, 20]].numpy(), np.asarray(vol.labels)[[12, 20]])


def _labelled_at(tmp_path, zs, width, n=40):
    """A volume of `n` 32x32 slices labelled at `zs` only, each holding one fossil `width` px wide."""
    from conftest import volume_of
    labels = np.full((n, 32, 32), UNLABELLED, np.uint8)
    labels[zs] = 0
    for z in zs:
        labels[z, 8:8 + width, 8:8 + width] = 1
    vol = volume_of(np.where(labels == 1, 200, 60).astype(np.uint8), labels, tmp_path)
    vol.labelled = np.isin(np.arange(n), zs)
    return vol


def test_the_fallbacks_of_a_sparse_split_keep_their_blocks_in_order(tmp_path):
    vol = _labelled_at(tmp_path, [0, 14, 20, 39], 15)
    published = split_volume(vol)  # a validation block would leave 1 labelled slice to train on
    assert published.published and published.valid_stop == published.n_slices == 40
    assert published.train_start < published.train_stop <= published.test_start and published.held_out
    lab = np.flatnonzero(vol.labelled)
    trained = lab[(lab >= published.train_start) & (lab < published.train_stop)]
    assert trained.tolist() == [0, 14, 20] and lab[lab >= published.test_start][0] - trained[-1] >= 15
    none = split_volume(_labelled_at(tmp_path, [10, 12, 14, 16], 20))  # a fossil wider than the labelled span
    assert not none.held_out and none.train_start <= none.train_stop and "too few" in none.gap_rule
