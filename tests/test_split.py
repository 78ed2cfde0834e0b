"""The held-out split: the last block of slices, a gap that keeps every labelled specimen in one block, and what is
left out when a specimen is too tall for any gap."""
import numpy as np
import pytest

from conftest import ball, volume_of
from microfossil.split import check_split, describe_split, left_out_mask, split_slices, split_volume
from microfossil.volume import DatasetError


def test_split_slices_is_last_contiguous_block_with_a_gap():
    tr, va = split_slices(50, 0.2)
    assert tr.tolist() == list(range(40)) and va.tolist() == list(range(40, 50))
    tr, va = split_slices(50, 0.2, gap_slices=5)
    assert tr.tolist() == list(range(35)) and va.tolist() == list(range(40, 50))
    tr, va = split_slices(3, 0.2)
    assert len(va) == 1 and va[0] == 2
    with pytest.raises(DatasetError):
        split_slices(1, 0.2)
    with pytest.raises(DatasetError, match="gap"):
        split_slices(10, 0.2, gap_slices=8)


def _volume(tmp_path, specimens, shape=(40, 32, 32)):
    labels = np.zeros(shape, np.uint8)
    for center, r, k in specimens:
        labels[ball(shape, center, r)] = k
    return volume_of(np.zeros(shape, np.uint8), labels, tmp_path)


def test_auto_gap_keeps_a_straddling_specimen_out_of_training(tmp_path):
    # held-out block: slices 32-39; a specimen on slices 27-35 reaches across its boundary
    vol = _volume(tmp_path, [((31, 16, 16), 4, 2), ((8, 16, 16), 4, 1), ((36, 8, 8), 3, 1)])
    s = split_volume(vol, 0.2)
    assert (s.valid_start, s.n_train) == (32, 27) and s.plan() == {
        "train_slices": [0, 26], "gap_slices": 5, "valid_slices": [32, 39]}
    assert s.left_out["specimens"] == 0 and not left_out_mask(vol, s).any()
    assert "gap slices 27-31 (5)" in describe_split(s) and "no labelled specimen lies in both" in describe_split(s)
    # no specimen near the boundary: no gap
    assert split_volume(_volume(tmp_path, [((8, 16, 16), 4, 1), ((36, 8, 8), 3, 1)]), 0.2).n_train == 32


def test_a_specimen_taller_than_the_gap_is_left_out_and_counted(tmp_path):
    """The gap is at most the held-out block's height; a taller specimen reaches both blocks: its held-out voxels are
    left out of the scores, and the split says so."""
    vol = _volume(tmp_path, [((24, 16, 16), 14, 2), ((36, 5, 5), 2, 1)])  # slices 10-38: taller than any gap allows
    s = split_volume(vol, 0.2)
    assert s.n_train == 24 and "capped" in s.gap_rule  # the gap is the held-out block's 8 slices
    mask = left_out_mask(vol, s)
    assert mask.shape == (8, 32, 32)
    held = vol.labels[32:]
    assert mask.sum() == (held == 2).sum() > 0 and not mask[held == 1].any()
    assert s.left_out == {"specimens": 1, "voxels": int(mask.sum()), "by_class": {"chain": int(mask.sum())}}
    assert "left out of the held-out scores: 1 specimen" in describe_split(s)


def test_gap_parameter_and_unlabelled_volumes(tmp_path):
    vol = _volume(tmp_path, [((31, 16, 16), 4, 2)])
    s = split_volume(vol, 0.2, gap_slices=2)  # too narrow for the specimen: it is left out instead
    assert s.n_train == 30 and s.left_out["specimens"] == 1 and s.gap_rule == "the parameter gap_slices"
    with pytest.raises(ValueError, match="gap_slices"):
        split_volume(vol, 0.2, gap_slices=-1)
    vol.labels = None
    s = split_volume(vol, 0.2)
    assert s.n_train == 32 and s.left_out["specimens"] == 0
    s = split_volume(vol, 0.0)
    assert len(s.valid) == 0 and s.n_train == 40 and s.plan()["valid_slices"] == []


def test_check_split_stops_on_another_split(tmp_path):
    vol = _volume(tmp_path, [((31, 16, 16), 4, 2)])
    s = split_volume(vol, 0.2)
    check_split(s, s.plan())  # the split it was trained with
    check_split(s, {})  # a checkpoint from before splits were recorded: nothing to compare
    with pytest.raises(ValueError, match="valid_pct and gap_slices of the training notebooks"):
        check_split(s, split_volume(vol, 0.3).plan(), "full_unfrozen")
    with pytest.raises(ValueError, match="would not be honest"):
        check_split(s, {"valid_slices": [32, 39]})  # trained before gaps: on slices 0-31, some of them the gap now
