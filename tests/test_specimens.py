"""Specimens: one component finder, touching specimens split, majority classes, descriptors, repainting by id."""
import math
import warnings

import numpy as np
import pytest
import tifffile

from conftest import ball
from microfossil.io import write_label_tiff
from microfossil.specimens import (SPECIMEN_FEATURES, centroid, descriptors, find_specimens, label_components,
                                   majority_class, paint_classes)


def test_components_sizes_boxes_and_the_minimum_size():
    mask = np.zeros((20, 30, 30), bool)
    mask[ball(mask.shape, (10, 10, 10), 4)] = True
    mask[2:4, 25:27, 25:27] = True  # an 8-voxel speck
    cc, n, counts, boxes = label_components(mask, 26)
    assert n == 2 and sorted(counts[1:]) == [8, int(ball(mask.shape, (10, 10, 10), 4).sum())]
    cc, n, n_kept, parts = find_specimens(mask, 26, min_voxels=9)
    assert (n, n_kept, len(parts)) == (2, 1, 1)
    lbl, box, nv = parts[0]
    assert box == (slice(6, 15), slice(6, 15), slice(6, 15)) and (cc[box] == lbl).sum() == nv
    with pytest.raises(ValueError, match="connectivity"):
        label_components(mask, 8)


def test_touching_balls_are_split_in_two():
    mask = ball((40, 64, 72), (20, 32, 26), 8) | ball((40, 64, 72), (20, 32, 40), 8)
    assert len(find_specimens(mask, 26, 20)[3]) == 1
    cc, _, _, parts = find_specimens(mask, 26, 20, split_touching=True, split_min_distance_um=6)
    assert len(parts) == 2 and sum(p[2] for p in parts) == mask.sum()
    assert sorted(round(centroid(cc[b] == lbl)[2] + b[2].start) for lbl, b, _ in parts) == [26, 40]


def test_majority_fossil_class_of_each_component():
    labels = np.zeros((1, 1, 10), np.uint8)
    labels[0, 0, 1:4] = [1, 2, 2]  # component 1: class 2 by majority
    labels[0, 0, 6:9] = [0, 1, 0]  # component 2 (where the mask is): mostly background, its fossil class is 1
    cc = np.zeros_like(labels, np.uint16)
    cc[0, 0, 1:4], cc[0, 0, 6:9] = 1, 2
    assert majority_class(cc, labels, 2, 3).tolist()[1:] == [2, 1]


def test_descriptors_tell_a_ball_from_a_rod():
    b = ball((21, 21, 21), (10, 10, 10), 8)
    rod = np.zeros((40, 9, 9), bool)
    rod[2:38, 2:7, 2:7] = True
    ct = np.full(b.shape, 200, np.uint8)
    fb, fr = descriptors(ct, b), descriptors(np.full(rod.shape, 200, np.uint8), rod)
    assert list(fb) == SPECIMEN_FEATURES
    assert fb["elongation"] > 0.95 and fr["elongation"] < 0.2  # principal moments: equal for a ball
    assert fb["solidity"] > 0.8 and math.isclose(fb["log_voxels"], math.log10(b.sum()))
    assert fb["enclosed"] == 0 and fb["intensity_p50"] == 200


def test_principal_box_fill_does_not_depend_on_how_the_specimen_lies():
    """One ellipsoid of a small specimen's size turned 12 ways: the fill of its box along its principal axes barely
    moves, where the fill of the scan's own axes' box (the earlier `box_fill`) swings with the turn."""
    from scipy import ndimage
    rng = np.random.default_rng(0)
    grid = np.stack(np.mgrid[:31, :31, :31], -1) - 15.0
    principal, axis = [], []
    for _ in range(12):
        turn = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        m = (((grid @ turn) / np.array([3.5, 4.5, 7.0])) ** 2).sum(-1) <= 1
        principal.append(descriptors(np.full(m.shape, 200, np.uint8), m)["principal_box_fill"])
        box = ndimage.find_objects(m.astype(np.uint8))[0]
        axis.append(m.sum() / np.prod([s.stop - s.start for s in box]))
    assert np.std(principal) < 0.5 * np.std(axis) and np.ptp(principal) < 0.1, (principal, axis)
    assert 0.35 < min(principal) and max(principal) <= math.pi / 6  # a smooth ellipsoid fills pi/6 of its box


def test_inner_walls_tell_a_chambered_test_from_a_shell():
    """inner_walls: walls deep inside the envelope (a foraminifer's septa) against a wall only at the surface (an
    ostracod's carapace, hollow or filled); a specimen of one brightness has none."""
    b = ball((25, 25, 25), (12, 12, 12), 10)
    inner = ball(b.shape, (12, 12, 12), 8.5)
    shell = np.where(b, np.where(inner, 30, 220), 0).astype(np.uint8)  # bright wall, dark inside
    filled = np.where(b, np.where(inner, 120, 220), 0).astype(np.uint8)  # bright wall, sediment inside
    chambered = shell.copy()
    chambered[12, 2:23, 2:23] = np.where(b[12, 2:23, 2:23], 220, 0)  # a septum through the middle
    chambered[:, 12, :] = np.where(b[:, 12, :], 220, chambered[:, 12, :])  # and another across it
    f = {name: descriptors(ct, b)["inner_walls"] for name, ct in
         (("shell", shell), ("filled", filled), ("chambered", chambered), ("uniform", np.where(b, 200, 0)))}
    assert f["shell"] == f["filled"] == f["uniform"] == 0.0
    assert 0.05 < f["chambered"] < 0.5, f
    thin = np.zeros((30, 5, 5), bool)
    thin[2:28, 1:4, 1:4] = True  # no voxel 2.5 deep: no interior, nothing to measure (0, not a warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert descriptors(np.where(thin, 200, 0).astype(np.uint8), thin)["inner_walls"] == 0.0


def test_paint_classes_repaints_each_specimen_by_id(tmp_path):
    ids = np.random.default_rng(0).integers(0, 4, (3, 5, 6)).astype(np.uint16)
    write_label_tiff(tmp_path / "specimens.tif", iter(ids))
    paint_classes(tmp_path, np.array([0, 2, 0, 1]))  # specimen 2 flagged: background
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "labels_clean.tif"), np.array([0, 2, 0, 1])[ids])
