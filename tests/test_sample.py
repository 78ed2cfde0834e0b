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


def _objects_and_labels(seed, style, shape=(48, 128, 128)):
    from microfossil.sample import _make_objects, _sample_slabs
    objs = _make_objects(shape, seed, style=style)
    slabs = list(_sample_slabs(shape, seed, 8, 0, shape[0], objs, style))
    return objs, np.stack([s[1] for s in slabs]), np.stack([s[2] for s in slabs])


def test_style_knobs_draw_a_family_of_volumes():
    """make_sample's style: a scanner knob changes the image only (the same specimens, labelled the same); the class
    densities and sizes move the class ratio; an infill mix of spar fills the insides bright; broken shells lose
    labelled voxels; touching fossils meet; an unknown knob or a mix not summing to 1 is an error that names it."""
    from microfossil.sample import STYLE_DEFAULTS, sample_style
    objs0, img0, lab0 = _objects_and_labels(7, None)
    assert sample_style({"noise": 0.1})["noise"] == 0.1 and sample_style(None) == {
        k: tuple(v) if isinstance(v, tuple) else v for k, v in STYLE_DEFAULTS.items()}
    _, img, lab = _objects_and_labels(7, {"contrast": 0.8, "gamma": 0.8, "offset": 0.05, "noise": 0.06, "rings": 0.1})
    np.testing.assert_array_equal(lab, lab0)
    assert abs(img.astype(float) - img0).mean() > 5
    ratio = lambda lab: (lab == 1).sum() / (lab == 2).sum()  # noqa: E731
    _, _, rare = _objects_and_labels(7, {"ostracod_density": 0.3, "ostracod_size": 0.7})
    assert ratio(rare) > 4 * ratio(lab0)
    spar = {"foram_infill": (0, 0, 1), "ostracod_infill": (0, 0, 1)}
    objs, img, lab = _objects_and_labels(7, spar)
    assert {o["infill"] for o in objs if o["kind"] in ("foram", "ostracod")} == {"spar"}
    matrix = np.median(img[(lab == 0) & (img > 60)])
    assert np.median(img[lab > 0]) > matrix + 30  # bright inside as well as the shell
    assert {o["infill"] for o in objs0 if o["kind"] in ("foram", "ostracod")} <= {"hollow", "sediment"}
    objs, _, lab = _objects_and_labels(7, {"broken": 1.0})
    assert all("cut" in o for o in objs if o["kind"] in ("foram", "ostracod"))
    assert (lab > 0).sum() < (lab0 > 0).sum()
    objs, _, _ = _objects_and_labels(7, {"touching": 1.0})
    fossils = [o for o in objs if o["kind"] in ("foram", "ostracod")]
    close = [np.linalg.norm(a["center"] - b["center"]) < a["extent"] + b["extent"]
             for i, a in enumerate(fossils) for b in fossils[i + 1:]]
    assert sum(close) >= len(fossils) // 3
    with pytest.raises(ValueError, match="brightness"):
        sample_style({"brightness": 2})
    with pytest.raises(ValueError, match="foram_infill"):
        sample_style({"foram_infill": (0.5, 0.4, 0.3)})


def test_ensure_sample_records_only_the_knobs_a_style_changes(tmp_path):
    import json
    p = ensure_sample(tmp_path / "s", 4, 48, 48, seed=1, style={"noise": 0.035, "broken": 0.5})
    assert json.loads((p / "sample.json").read_text())["style"] == {"broken": 0.5}
    q = ensure_sample(tmp_path / "t", 4, 48, 48, seed=1, style={})
    assert "style" not in json.loads((q / "sample.json").read_text())
    np.testing.assert_array_equal(load_volume(q).images, load_volume(make_sample(tmp_path / "u", 4, 48, 48, seed=1)).images)
