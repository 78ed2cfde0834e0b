"""Loading a dataset: every layout and bit depth, every bad input stopped with its file named, the split, the cache,
the voxel size."""
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import snapshot
from microfossil import volume
from microfossil.sample import make_sample
from microfossil.volume import DatasetError, load_volume, read_voxel_size


def _copy(src, tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(src, dst)
    return dst


def test_load_png_sample(tiny):
    before = snapshot(tiny)
    vol = load_volume(tiny)
    assert vol.images.shape == vol.labels.shape == (12, 96, 96)
    assert vol.images.dtype == np.uint8 and vol.window == (0.0, 255.0)
    assert vol.codes == ["background", "foraminifera", "ostracod"]
    assert vol.stems == [f"slice_{z:04d}" for z in range(12)]
    assert set(np.unique(vol.labels)) == {0, 1, 2}
    assert snapshot(tiny) == before, "loading must never write into the dataset folder"


def test_natural_slice_order(tmp_path):
    ds = tmp_path / "ds"
    (ds / "train").mkdir(parents=True)
    (ds / "train_masks_labels").mkdir()
    (ds / "codes.txt").write_text("rock\nfossil\n")
    for z in (10, 2, 1):  # lexicographic order would put 10 before 2
        Image.fromarray(np.full((8, 8), z, np.uint8)).save(ds / "train" / f"s{z}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(ds / "train_masks_labels" / f"s{z}_GT.png")
    vol = load_volume(ds)
    assert vol.stems == ["s1", "s2", "s10"]
    assert vol.images[:, 0, 0].tolist() == [1, 2, 10]


def test_multipage_tiff_equals_png_slices(tiny, tmp_path):
    stack = make_sample(tmp_path / "stack", n_slices=12, height=96, width=96, seed=3, fmt="tif-stack")
    a, b = load_volume(tiny), load_volume(stack)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert b.stems[0] == "volume_0000" and len(b.stems) == 12


def test_16bit_is_windowed_to_uint8(tmp_path):
    ds = make_sample(tmp_path / "s16", n_slices=6, height=64, width=72, seed=1, bit_depth=16)
    assert np.asarray(Image.open(ds / "train" / "slice_0000.png")).dtype == np.uint16
    vol = load_volume(ds)
    assert vol.images.dtype == np.uint8 and vol.raw_dtype == "uint16"
    lo, hi = vol.window
    assert 0 <= lo < hi <= 65535 and hi - lo > 255  # a real 16-bit window, not 8-bit identity
    assert vol.images.min() <= 5 and vol.images.max() >= 250  # the window spans the uint8 range


def test_16bit_tiff_slices(tmp_path):
    ds = tmp_path / "ds"
    (ds / "train").mkdir(parents=True)
    (ds / "train_masks_labels").mkdir()
    (ds / "codes.txt").write_text("a\nb\nc\nd\n")
    rng = np.random.default_rng(0)
    for z in range(3):
        tifffile.imwrite(ds / "train" / f"x{z}.tif", rng.integers(1000, 50000, (17, 23), dtype=np.uint16))
        tifffile.imwrite(ds / "train_masks_labels" / f"x{z}_GT.tif", rng.integers(0, 4, (17, 23), dtype=np.uint8))
    vol = load_volume(ds)
    assert vol.shape == (3, 17, 23) and vol.codes == ["a", "b", "c", "d"] and vol.labels.max() == 3


def _expect(ds, *fragments):
    with pytest.raises(DatasetError) as e:
        load_volume(ds)
    for f in fragments:
        assert str(f) in str(e.value), f"{f!r} not in error message: {e.value}"
    return str(e.value)


def test_no_images(tmp_path):
    (tmp_path / "ds" / "train").mkdir(parents=True)
    (tmp_path / "ds" / "train" / "notes.txt").write_text("x")
    _expect(tmp_path / "ds", "No images", "train")


def test_no_train_folder(tmp_path):
    (tmp_path / "ds").mkdir()
    _expect(tmp_path / "ds", "train", "does not exist")


def test_missing_mask(tiny, tmp_path):
    ds = _copy(tiny, tmp_path)
    (ds / "train_masks_labels" / "slice_0005_GT.png").unlink()
    _expect(ds, "No mask for", "slice_0005.png", "slice_0005_GT.png")


def test_mask_size_mismatch(tiny, tmp_path):
    ds = _copy(tiny, tmp_path)
    Image.fromarray(np.zeros((90, 96), np.uint8)).save(ds / "train_masks_labels" / "slice_0003_GT.png")
    _expect(ds, "slice_0003_GT.png", "must match its slice")


def test_label_not_in_codes(tiny, tmp_path):
    ds = _copy(tiny, tmp_path)
    m = np.zeros((96, 96), np.uint8)
    m[5, 5] = 7
    Image.fromarray(m).save(ds / "train_masks_labels" / "slice_0002_GT.png")
    _expect(ds, "slice_0002_GT.png", "label 7", "codes.txt", "3 classes")


def test_corrupt_file(tiny, tmp_path):
    ds = _copy(tiny, tmp_path)
    (ds / "train" / "slice_0004.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _expect(ds, "Cannot read", "slice_0004.png", "corrupt")


def test_slices_of_different_sizes(tiny, tmp_path):
    ds = _copy(tiny, tmp_path)
    Image.fromarray(np.zeros((80, 96), np.uint8)).save(ds / "train" / "slice_0007.png")
    _expect(ds, "slice_0007.png", "same size")


def test_missing_codes(tiny, tmp_path):
    ds = _copy(tiny, tmp_path)
    (ds / "codes.txt").unlink()
    _expect(ds, "codes.txt", "one class name per line")


def test_unlabelled_volume_for_prediction(tiny, tmp_path):
    ds = _copy(tiny, tmp_path)
    shutil.rmtree(ds / "train_masks_labels")
    vol = load_volume(ds, require_labels=False)
    assert vol.labels is None and vol.codes == ["background", "foraminifera", "ostracod"]
    _expect(ds, "train_masks_labels", "does not exist")


def test_cache_is_memory_mapped_and_reused(tiny, tmp_path, monkeypatch):
    before = snapshot(tiny)
    plain = load_volume(tiny)
    first = load_volume(tiny, cache_dir=tmp_path / "cache")
    assert isinstance(first.images, np.memmap) and isinstance(first.labels, np.memmap)
    np.testing.assert_array_equal(first.images, plain.images)
    np.testing.assert_array_equal(first.labels, plain.labels)
    assert first.stems == plain.stems and first.codes == plain.codes

    def no_decoding(*a, **k):
        raise AssertionError("images decoded again although the cache is valid")
    monkeypatch.setattr(volume, "_iter_pages", no_decoding)
    again = load_volume(tiny, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.images, plain.images)
    assert snapshot(tiny) == before


def test_cache_is_rebuilt_when_a_file_changes(tiny, tmp_path):
    ds = _copy(tiny, tmp_path)
    a = load_volume(ds, cache_dir=tmp_path / "cache")
    img = np.asarray(Image.open(ds / "train" / "slice_0000.png")).copy()
    img[:10, :10] = 255
    Image.fromarray(img).save(ds / "train" / "slice_0000.png")
    b = load_volume(ds, cache_dir=tmp_path / "cache")
    assert (b.images[0, :10, :10] == 255).all() and not (a.images[0, :10, :10] == 255).all()


def test_read_voxel_size(tmp_path):
    assert read_voxel_size(tmp_path)[0] == (1.0, 1.0, 1.0)
    assert read_voxel_size(tmp_path, 2.5)[0] == (2.5, 2.5, 2.5)
    (tmp_path / "voxel_size.txt").write_text("# z y x\n5, 2.5 2.5\n")
    assert read_voxel_size(tmp_path) == ((5.0, 2.5, 2.5), str(tmp_path / "voxel_size.txt"))
    assert read_voxel_size(tmp_path, [1, 2, 3])[0] == (1.0, 2.0, 3.0)  # the parameter wins over the file
    (tmp_path / "voxel_size.txt").write_text("2.5 um\n")
    with pytest.raises(DatasetError, match="voxel_size.txt"):
        read_voxel_size(tmp_path)
    with pytest.raises(DatasetError, match="voxel_size_um"):
        read_voxel_size(tmp_path, -1)
