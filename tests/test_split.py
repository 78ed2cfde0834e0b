"""The split: a validation block at the top, a test block at the bottom, the training block between, gaps that keep
every labelled specimen in one block, what is left out when a specimen is too tall for any gap, and which blocks a
model from elsewhere may be scored on."""
import numpy as np
import pytest

from conftest import ball, volume_of
from microfossil.split import (check_split, describe_split, left_out_mask, recorded_split, scoring_split,
                               split_slices, split_volume, valid_left_out_mask, whole_volume_test)
from microfossil.volume import DatasetError, volume_fingerprint


def test_split_slices_is_three_contiguous_blocks_with_gaps():
    tr, va, te = split_slices(50, 0.2)  # the published recipe: validation on the test block
    assert tr.tolist() == list(range(40)) and va.tolist() == te.tolist() == list(range(40, 50))
    tr, va, te = split_slices(50, 0.2, gap_slices=5, valid_pct=0.1)
    assert va.tolist() == list(range(5)) and tr.tolist() == list(range(10, 35)) and te.tolist() == list(range(40, 50))
    tr, va, te = split_slices(3, 0.2)
    assert len(te) == 1 and te[0] == 2
    with pytest.raises(DatasetError):
        split_slices(1, 0.2)
    with pytest.raises(DatasetError, match="gap"):
        split_slices(10, 0.2, gap_slices=8)


def _volume(tmp_path, specimens, shape=(40, 32, 32)):
    labels = np.zeros(shape, np.uint8)
    for center, r, k in specimens:
        labels[ball(shape, center, r)] = k
    return volume_of(np.zeros(shape, np.uint8), labels, tmp_path)


def test_three_blocks_and_auto_gaps_keep_straddling_specimens_in_one_block(tmp_path):
    # test block: slices 32-39, a specimen on 27-35 reaches across its boundary; validation block: slices 0-3, a
    # specimen on 1-7 reaches across its boundary
    vol = _volume(tmp_path, [((31, 16, 16), 4, 2), ((4, 16, 16), 3, 1), ((18, 16, 16), 4, 1), ((36, 8, 8), 3, 1)])
    s = split_volume(vol, 0.2, 0.1)
    assert s.plan() == {"train_slices": [8, 26], "valid_slices": [0, 3], "test_slices": [32, 39]}
    assert s.record()["gap_after_validation"] == [4, 7] and s.record()["gap_before_test"] == [27, 31]
    assert not s.published and s.left_out["specimens"] == 0 and s.valid_left_out["specimens"] == 0
    assert not left_out_mask(vol, s).any() and not valid_left_out_mask(vol, s).any()
    text = describe_split(s)
    assert "validation slices 0-3 (4), gap slices 4-7 (4), training slices 8-26 (19), gap slices 27-31 (5), test slices " \
           "32-39 (8)" in text and "no labelled specimen lies in two blocks" in text and "only 05 scores the test" in text
    # no specimen near the boundaries: no gaps
    s = split_volume(_volume(tmp_path, [((18, 16, 16), 4, 1), ((36, 8, 8), 3, 1)]), 0.2, 0.1)
    assert (s.valid_stop, s.train_start, s.train_stop, s.test_start) == (4, 4, 32, 32)


def test_valid_pct_zero_is_the_published_recipe_and_says_so(tmp_path):
    vol = _volume(tmp_path, [((31, 16, 16), 4, 2), ((8, 16, 16), 4, 1)])
    s = split_volume(vol, 0.2, 0.0)
    assert s.published and s.plan() == {"train_slices": [0, 26], "valid_slices": [32, 39], "test_slices": [32, 39]}
    assert s.valid.tolist() == s.test.tolist() and "the published recipe" in describe_split(s)
    assert s.record()["validation"].startswith("the test block")


def test_a_specimen_taller_than_the_gap_is_left_out_and_counted(tmp_path):
    """Each gap is at most the height of the block it guards; a taller specimen reaches both blocks: its voxels in the
    test (or validation) block are left out of that block's scores, and the split says so."""
    vol = _volume(tmp_path, [((24, 16, 16), 14, 2), ((36, 5, 5), 2, 1), ((2, 16, 16), 9, 1)])  # 10-38 and 0-11
    s = split_volume(vol, 0.2, 0.1)
    assert (s.train_start, s.train_stop) == (8, 24) and "capped" in s.gap_rule and "capped" in s.valid_gap_rule
    mask = left_out_mask(vol, s)
    assert mask.shape == (8, 32, 32)
    held = vol.labels[32:]
    assert mask.sum() == (held == 2).sum() > 0 and not mask[held == 1].any()
    assert s.left_out == {"specimens": 1, "voxels": int(mask.sum()), "by_class": {"chain": int(mask.sum())}}
    vmask = valid_left_out_mask(vol, s)
    assert vmask.shape == (4, 32, 32) and vmask.sum() == (vol.labels[:4] == 1).sum() > 0
    assert s.valid_left_out["specimens"] == 1
    text = describe_split(s)
    assert "left out of the test scores: 1 specimen" in text and "left out of the validation scores: 1 specimen" in text


def test_gap_parameter_and_unlabelled_volumes(tmp_path):
    vol = _volume(tmp_path, [((31, 16, 16), 4, 2)])
    s = split_volume(vol, 0.2, 0.1, gap_slices=2)  # too narrow for the specimen: it is left out instead
    assert (s.train_start, s.train_stop) == (6, 30) and s.left_out["specimens"] == 1
    assert s.gap_rule == s.valid_gap_rule == "the parameter gap_slices"
    with pytest.raises(ValueError, match="gap_slices"):
        split_volume(vol, 0.2, gap_slices=-1)
    vol.labels = None
    s = split_volume(vol, 0.2, 0.1)
    assert (s.train_start, s.train_stop) == (4, 32) and s.left_out["specimens"] == 0
    with pytest.raises(DatasetError, match="valid_pct"):
        split_volume(vol, 0.5, 0.49)


def test_check_split_stops_on_another_split(tmp_path):
    vol = _volume(tmp_path, [((31, 16, 16), 4, 2)])
    s = split_volume(vol, 0.2, 0.1)
    check_split(s, s.plan())  # the split it was trained with
    check_split(s, {})  # a checkpoint from before splits were recorded: nothing to compare
    with pytest.raises(ValueError, match="test_pct, valid_pct and gap_slices of the training notebooks"):
        check_split(s, split_volume(vol, 0.3, 0.1).plan(), "full_unfrozen")
    with pytest.raises(ValueError, match="validated on"):
        check_split(s, split_volume(vol, 0.2, 0.0).plan())  # the published recipe's model: validated on the test block
    # a model trained before the validation block existed validated on its test block, which valid_pct=0 repeats
    old = {"train_slices": [0, 26], "gap_slices": 5, "valid_slices": [32, 39]}
    check_split(split_volume(vol, 0.2, 0.0), old)
    with pytest.raises(ValueError, match="valid_pct=0 repeats"):
        check_split(s, old)


def test_a_model_from_elsewhere_is_scored_on_its_own_scan_s_test_block_only(tmp_path):
    """05 with model_path: another scan is all test block; the scan the model trained on is scored on the test block it
    recorded, whatever test_pct or valid_pct say; a record that cannot tell the two apart stops, saying why."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    vol = _volume(tmp_path / "a", [((31, 16, 16), 4, 2), ((8, 16, 16), 4, 1)])
    trained = split_volume(vol, 0.2, 0.1)
    info = {"trained_on": {**volume_fingerprint(vol), **trained.plan()}}
    s = scoring_split(vol, info, True, test_pct=0.5, valid_pct=0.0)  # the parameters do not move the recorded blocks
    assert s.plan() == trained.plan() and "own training scan" in s.gap_rule
    other = volume_of(vol.images.copy(), vol.labels.copy(), tmp_path)
    other.images[0, 0, 0] = 7  # another scan of the same shape (a sampled pixel differs)
    assert scoring_split(other, info, True).plan() == whole_volume_test(other).plan() == {
        "train_slices": [], "valid_slices": [], "test_slices": [0, 39]}
    moved = volume_of(vol.images, vol.labels, tmp_path / "a" / "b")
    assert scoring_split(moved, info, True).plan() == trained.plan()  # the same scan in another folder
    old = {"trained_on": {"dataset": "/somewhere/else", "shape": list(vol.shape), **trained.plan()}}
    with pytest.raises(DatasetError, match="no fingerprint"):
        scoring_split(vol, old, True)
    assert scoring_split(vol, {**old, "trained_on": {**old["trained_on"], "dataset": str(vol.source)}}, True).plan() \
        == trained.plan()  # an old record of this very folder
    vol.labels = None
    assert scoring_split(vol, info, True) is None  # no ground truth, nothing to score


def test_recorded_split_of_an_old_record_is_the_published_layout(tmp_path):
    vol = _volume(tmp_path, [((31, 16, 16), 4, 2)])
    s = recorded_split(vol, {"train_slices": [0, 26], "valid_slices": [32, 39]})
    assert s.published and s.plan()["test_slices"] == [32, 39] and s.left_out["specimens"] == 0


def test_a_block_without_a_class_says_so(tmp_path):
    """A class absent from the validation or test block has no IoU there: the split counts each block's labelled
    voxels and says which class is missing, and which parameter may take some in."""
    vol = _volume(tmp_path, [((18, 16, 16), 4, 1), ((36, 8, 8), 3, 1)])  # no chain anywhere, the validation block empty
    s = split_volume(vol, 0.2, 0.1)
    assert s.class_voxels["validation"] == {"background": 4 * 32 * 32, "shell": 0, "chain": 0}
    assert s.class_voxels["test"]["shell"] > 0 and s.record()["class_voxels"] == s.class_voxels
    text = describe_split(s)
    assert "the validation block holds no voxel of shell, chain" in text and "larger valid_pct" in text
    assert "the test block holds no voxel of chain" in text and "larger test_pct" in text
