"""The embedded synthetic sample: deterministic, seamless across slabs and processes, and with what a real core has."""
import numpy as np
import pytest

from conftest import snapshot
from microfossil.extraction import MIN_VOXELS
from microfossil.sample import SAMPLE_SIZES, ensure_sample, make_sample
from microfossil.specimens import label_components, majority_class
from microfossil.split import split_slices, split_volume
from microfossil.volume import load_volume


def test_sample_is_deterministic(tmp_path):
    a = make_sample(tmp_path / "a", n_slices=6, height=64, width=64, seed=5)
    b = make_sample(tmp_path / "b", n_slices=6, height=64, width=64, seed=5)
    c = make_sample(tmp_path / "c", n_slices=6, height=64, width=64, seed=6)
    va, vb, vc = (load_volume(p) for p in (a, b, c))
    np.testing.assert_array_equal(va.images, vb.images)
    np.testing.assert_array_equal(va.labels, vb.labels)
    assert not np.array_equal(va.images, vc.images)


def test_sample_content(tiny):
    vol = load_volume(tiny)
    tr, _, te = split_slices(len(vol.images), 0.2)
    for block in (tr, te):  # every fossil class appears in both the training and the test block
        assert set(np.unique(vol.labels[block])) == {0, 1, 2}
    assert vol.images[:, :3, :3].mean() < 40  # air around the cylindrical core is dark
    img, lab = vol.images.astype(float), vol.labels
    matrix = img[(lab == 0) & (img > 60)].mean()
    assert img[lab > 0].max() > matrix + 40  # bright calcite walls in the fossils


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_sample_holds_specimens_of_every_class_in_every_block(tmp_path, seed):
    """The default split of the default sample: no gap needed, nothing left out, whole specimens of each class in the
    training and the test blocks (so its test scores are scores on specimens the model never saw) and specimens of each
    class in the validation block (the scan's top may cut them)."""
    vol = load_volume(make_sample(tmp_path / "s", *SAMPLE_SIZES["default"], seed=seed))
    s = split_volume(vol)
    assert (s.valid_stop, s.train_start, s.train_stop, s.test_start) == (6, 6, 51, 51)
    assert s.left_out["specimens"] == s.valid_left_out["specimens"] == 0
    cc, n, counts, boxes = label_components(vol.labels > 0)
    cls = majority_class(cc, vol.labels, n, 3)
    test = {int(cls[i]) for i in range(1, n + 1) if boxes[i][0].start >= s.test_start}
    train = {int(cls[i]) for i in range(1, n + 1) if s.train_start <= boxes[i][0].start < boxes[i][0].stop <= s.train_stop}
    valid = {int(cls[i]) for i in range(1, n + 1) if boxes[i][0].stop <= s.valid_stop}
    assert test == train == valid == {1, 2}
    sizes = [counts[i] for i in range(1, n + 1) if boxes[i][0].start >= s.test_start]
    assert min(sizes) >= MIN_VOXELS, f"a test specimen smaller than the extraction keeps: {sizes}"


def test_sample_slabs_are_seamless(tmp_path):
    """Slab by slab in 2 processes gives the same volume as one big slab in one (no seams at slab borders)."""
    a = make_sample(tmp_path / "a", n_slices=10, height=64, width=64, seed=2, slab=3, workers=2)
    b = make_sample(tmp_path / "b", n_slices=10, height=64, width=64, seed=2, slab=10, workers=1)
    va, vb = load_volume(a), load_volume(b)
    np.testing.assert_array_equal(va.images, vb.images)
    np.testing.assert_array_equal(va.labels, vb.labels)


def test_ensure_sample_reuses(tmp_path):
    p = ensure_sample(tmp_path / "s", 4, 48, 48, seed=1)
    before = snapshot(p)
    ensure_sample(tmp_path / "s", 4, 48, 48, seed=1)
    assert snapshot(p) == before
