"""Loading a dataset: every layout and bit depth, every bad input stopped with its file named, the split, the cache,
the voxel size."""
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import snapshot
from microfossil import readers, volume  # noqa: F401
from microfossil.sample import make_sample
from microfossil.volume import DatasetError, describe_volume, evenly_spaced, load_volume, read_codes, read_voxel_size


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


def _expect(ds, *fragments, **kw):
    """`load_volume(ds)` fails naming every fragment, read directly and through the cache (left unwritten)."""
    cache = Path(ds).parent / "cache"
    for where in ({}, {"cache_dir": cache}):
        with pytest.raises(DatasetError) as e:
            load_volume(ds, **kw, **where)
        msg = str(e.value).replace(str(Path(ds).parent), "<tmp>")  # the tmp folder is named after the test
        for f in fragments:
            assert str(f) in msg, f"{f!r} not in error message: {msg}"
    assert not list(cache.rglob("volume.json")), "a failed load must not leave a cached volume"
    return msg


def _dataset(tmp_path, images, masks=None, codes="rock\nfossil\n", ext=".tif"):
    """A dataset in `tmp_path/ds`: slice `s<z><ext>` (and mask `s<z>_GT<ext>`) from each array of `images` (`masks`)."""
    ds = tmp_path / "ds"
    (ds / "train").mkdir(parents=True)
    (ds / "codes.txt").write_text(codes)
    if masks is not None:
        (ds / "train_masks_labels").mkdir()
    for z, img in enumerate(images):
        _write(ds / "train" / f"s{z}{ext}", img)
        if masks is not None:
            _write(ds / "train_masks_labels" / f"s{z}_GT{ext}", masks[z])
    return ds


def _write(path, arr):
    if path.suffix == ".tif":
        tifffile.imwrite(path, arr)
    else:
        Image.fromarray(arr).save(path)


def test_no_images(tmp_path):
    (tmp_path / "ds" / "train").mkdir(parents=True)
    (tmp_path / "ds" / "train" / "notes.txt").write_text("x")
    _expect(tmp_path / "ds", "No images", "train")


def test_a_folder_with_no_scan(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("scan me")
    _expect(tmp_path / "ds", "<tmp>/ds holds no scan", "train/", "notes.txt")
    _expect(tmp_path / "nowhere", "<tmp>/nowhere does not exist", "data_dir")


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
    monkeypatch.setattr(readers.Part, "pages", no_decoding)
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


def test_two_copies_of_one_scan_share_one_cache_and_a_changed_scan_replaces_it(tiny, tmp_path, monkeypatch):
    """A re-extracted copy (another path, new file times) is the same scan: its cache is found, not decoded again; when
    the scan changes, its new cache replaces the old one rather than sitting beside it."""
    cache = tmp_path / "cache"
    a = _copy(tiny, tmp_path / "unzip1")
    load_volume(a, cache_dir=cache)
    b = _copy(tiny, tmp_path / "unzip2")
    for f in b.rglob("*.png"):
        os.utime(f, (1e9, 1e9))
    with monkeypatch.context() as m:
        m.setattr(readers.Part, "pages", lambda *a, **k: pytest.fail("decoded again"))
        load_volume(b, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1
    img = np.asarray(Image.open(b / "train" / "slice_0003.png")).copy()
    img[:4, :4] = 255 - img[:4, :4]  # same size, other bytes
    Image.fromarray(img).save(b / "train" / "slice_0003.png")
    changed = load_volume(b, cache_dir=cache)
    assert (changed.images[3, :4, :4] == img[:4, :4]).all()
    assert len(list(cache.iterdir())) == 1, "the stale cache stays beside the new one"


def test_a_kept_copy_of_the_cache_serves_a_fresh_runtime(tiny, tmp_path, monkeypatch):
    """With `(cache, kept)` (a run folder on Drive: `runtime.cache_dirs`), the cache is copied to `kept`, labels
    compressed; a fresh runtime (no local cache) copies it back instead of decoding the slices again."""
    plain = load_volume(tiny)
    local, kept = tmp_path / "local", tmp_path / "drive" / "cache"
    load_volume(tiny, cache_dir=(local, kept))
    (copy,) = kept.iterdir()
    assert sorted(p.name for p in copy.iterdir()) == ["images.npy", "labels.npy.gz", "volume.json"]
    assert (copy / "labels.npy.gz").stat().st_size * 5 < plain.labels.nbytes
    shutil.rmtree(local)
    with monkeypatch.context() as m:
        m.setattr(readers.Part, "pages", lambda *a, **k: pytest.fail("decoded again"))
        again = load_volume(tiny, cache_dir=(local, kept))
    np.testing.assert_array_equal(again.images, plain.images)
    np.testing.assert_array_equal(again.labels, plain.labels)
    assert isinstance(again.images, np.memmap) and str(local) in str(again.images.filename)


def test_labels_edited_in_place_at_the_same_size_are_read_again(tmp_path):
    """A label stack corrected in Fiji or napari and saved over itself, same size, the edit outside the bytes the
    cache key samples: the next load reads the new labels, from the local cache and from the kept copy alike."""
    import os
    import scan_formats as fmt
    z, y, x = np.indices((40, 64, 64))
    images, labels = (1000 + 50 * z + x).astype(np.uint16), np.zeros((40, 64, 64), np.uint8)
    path = fmt.imagej(tmp_path / "core.tif", images, z_um=5.0, xy_um=2.5)
    gt = fmt.imagej(tmp_path / "core_GT.tif", labels, z_um=5.0, xy_um=2.5)
    (tmp_path / "codes.txt").write_text("background\nfossil\n")
    local, kept = tmp_path / "local", tmp_path / "drive" / "cache"
    assert load_volume(path, cache_dir=(local, kept)).labels.sum() == 0
    stat = gt.stat()
    labels[10, 20:30, 20:30] = 1
    fmt.imagej(gt, labels, z_um=5.0, xy_um=2.5)
    assert gt.stat().st_size == stat.st_size
    os.utime(gt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert load_volume(path, cache_dir=(local, kept)).labels.sum() == 100
    shutil.rmtree(local)  # a fresh runtime: the kept copy holds the edited labels too
    assert load_volume(path, cache_dir=(local, kept)).labels.sum() == 100
    assert len(list(local.iterdir())) == 1 and len(list(kept.iterdir())) == 1


def test_a_cache_written_by_an_older_version_is_rebuilt(tiny, tmp_path):
    """A cache from before the NaN/Inf handling may hold a flattened volume: it must not be reused."""
    plain = load_volume(tiny)
    load_volume(tiny, cache_dir=tmp_path / "cache")
    (meta,) = (tmp_path / "cache").rglob("volume.json")
    np.save(meta.parent / "images.npy", np.zeros(plain.shape, np.uint8))  # what the old code cached for a NaN scan
    meta.write_text('{"window": [NaN, NaN], "raw_dtype": "uint8", "has_labels": true}')
    np.testing.assert_array_equal(load_volume(tiny, cache_dir=tmp_path / "cache").images, plain.images)


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


# --- what real users' files do ---------------------------------------------------------------------------------

def test_nan_and_inf_voxels_are_left_out_of_the_window_counted_and_reported(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = rng.normal(1000, 100, (4, 32, 32)).astype(np.float32)
    images[1, :4, :4] = np.nan  # a reconstruction's masked corner, on the sampled grid
    images[2, 0, :8] = np.inf
    images[2, 1, :2] = -np.inf
    ds = _dataset(tmp_path, images)
    before = snapshot(ds)
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # direct, cache built, cache reused
        vol = load_volume(ds, require_labels=False, cache_dir=cache)
        out = capsys.readouterr().out
        assert np.all(np.isfinite(vol.window)) and 500 < vol.window[0] < vol.window[1] < 1500
        assert vol.images.min() <= 5 and vol.images.max() >= 250, "the volume must not be flattened"
        assert vol.nonfinite_voxels == 16 + 10 and describe_volume(vol)["nonfinite_voxels"] == 26
        assert (vol.images[1, :4, :4] == 0).all() and (vol.images[2, 0, :8] == 0).all()
        assert "26" in out and "s1.tif" in out and "s2.tif" in out and "NaN" in out, out
    assert snapshot(ds) == before


def test_a_volume_with_no_finite_voxel_is_refused(tmp_path):
    ds = _dataset(tmp_path, np.full((2, 8, 8), np.nan, np.float32))
    _expect(ds, "s0.tif", "NaN", require_labels=False)


def _truncated_stack(tmp_path, compression=None):
    """A 20-slice stack `s0.tif` with its mask stack, the image cut off in the middle."""
    rng = np.random.default_rng(1)
    ds = _dataset(tmp_path, [np.zeros((20, 32, 32), np.uint8)], masks=[np.zeros((20, 32, 32), np.uint8)])
    img = ds / "train" / "s0.tif"
    tifffile.imwrite(img, rng.integers(0, 255, (20, 32, 32), np.uint8), compression=compression)
    data = img.read_bytes()
    img.write_bytes(data[:len(data) // 2])  # an interrupted copy
    return ds


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_a_truncated_stack_is_named_not_read_as_fewer_slices(tmp_path, compression):
    ds = _truncated_stack(tmp_path, compression)
    msg = _expect(ds, "s0.tif", "truncated")
    assert "_GT" not in msg, "the truncated image, not its mask, is to blame"
    shutil.rmtree(ds / "train_masks_labels")
    _expect(ds, "s0.tif", "truncated", require_labels=False)


def test_a_truncated_single_slice_is_named(tmp_path):
    ds = _dataset(tmp_path, np.zeros((3, 32, 32), np.uint16))
    one = ds / "train" / "s1.tif"
    one.write_bytes(one.read_bytes()[:1000])
    _expect(ds, "s1.tif", "truncated", require_labels=False)


def test_a_truncated_mask_stack_is_named(tmp_path):
    ds = _dataset(tmp_path, [np.zeros((20, 32, 32), np.uint8)], masks=[np.zeros((20, 32, 32), np.uint8)])
    m = ds / "train_masks_labels" / "s0_GT.tif"
    m.write_bytes(m.read_bytes()[:m.stat().st_size // 2])
    _expect(ds, "s0_GT.tif", "truncated")


@pytest.mark.parametrize("compression", ["tiff_lzw", "tiff_adobe_deflate"])
def test_compressed_tiff_slices_load(tmp_path, compression):
    """LZW (Fiji's compression) and deflate TIFFs, as PIL writes them; LZW needs imagecodecs (requirements.txt)."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 255, (2, 16, 24), np.uint8)
    ds = tmp_path / "ds"
    (ds / "train").mkdir(parents=True)
    for z, img in enumerate(images):
        Image.fromarray(img).save(ds / "train" / f"s{z}.tif", compression=compression)
    np.testing.assert_array_equal(load_volume(ds, require_labels=False).images, images)


def test_a_missing_codec_says_to_install_imagecodecs(tmp_path, monkeypatch):
    ds = _dataset(tmp_path, [np.zeros((8, 8), np.uint8)])

    def no_codec(self, *a, **k):  # what tifffile raises for LZW when imagecodecs is not installed
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")
    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_codec)
    msg = _expect(ds, "s0.tif", "pip install imagecodecs", require_labels=False)
    assert "corrupt" not in msg


NAMES = ["background", "foraminífera", "ostracod"]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be", "latin-1", "cp1252"])
def test_codes_txt_in_any_common_encoding(tmp_path, encoding):
    """Windows Notepad's "Unicode" is UTF-16 with a BOM ("utf-16-be" here gets one too); old editors write Latin-1."""
    path = tmp_path / "codes.txt"
    bom = "\ufeff" if encoding == "utf-16-be" else ""
    path.write_bytes((bom + "\r\n".join(NAMES) + "\r\n").encode(encoding))
    assert read_codes(path) == NAMES


@pytest.mark.parametrize("data", [b"\xff\xfeb\x00a\x00c", "rock\nfossil\n".encode("utf-16-le"),
                                  b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x81\x8d"])
def test_codes_txt_that_is_not_text_is_named(tmp_path, data):
    (tmp_path / "codes.txt").write_bytes(data)
    with pytest.raises(DatasetError, match="codes.txt.*UTF-8"):
        read_codes(tmp_path / "codes.txt")


def test_the_same_stem_twice_is_refused(tiny, tmp_path):
    ds = _copy(tiny, tmp_path)
    Image.open(ds / "train" / "slice_0003.png").save(ds / "train" / "slice_0003.tif")
    _expect(ds, "slice_0003.png", "slice_0003.tif", "Keep one")


@pytest.mark.parametrize("first", [np.uint8, np.uint16])
def test_mixed_bit_depths_are_refused(tmp_path, first):
    other = np.uint16 if first == np.uint8 else np.uint8
    ds = _dataset(tmp_path, [np.full((8, 8), 200, first), np.full((8, 8), 250, other), np.full((8, 8), 9, other)],
                  masks=[np.zeros((8, 8), np.uint8)] * 3, ext=".png")
    _expect(ds, "s0.png", "s1.png", "bit depth")


def test_gray_and_colour_8bit_slices_are_one_bit_depth(tmp_path):
    """A colour slice is read as its luminance at its own bit depth, so it mixes with gray 8-bit slices."""
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 200
    ds = _dataset(tmp_path, [np.full((8, 8), 7, np.uint8), colour], ext=".png")
    vol = load_volume(ds, require_labels=False)
    assert vol.raw_dtype == "uint8" and vol.images[:, 0, 0].tolist() == [7, round(0.299 * 200)]


@pytest.mark.parametrize("text, expected", [
    ("2,5", (2.5, 2.5, 2.5)), ("5,0 2,5 2,5\n", (5.0, 2.5, 2.5)), ("5;2,5;2,5", (5.0, 2.5, 2.5)),
    ("\ufeff2.5\n", (2.5, 2.5, 2.5)), ("\ufeff2,5  # µm\n", (2.5, 2.5, 2.5)),
    ("5, 2.5, 2.5", (5.0, 2.5, 2.5)), ("5,2.5,2.5", (5.0, 2.5, 2.5)), ("5, 2.5 2.5", (5.0, 2.5, 2.5)),
    ("5,2,2", (5.0, 2.0, 2.0)), ("5 2 2", (5.0, 2.0, 2.0))])
def test_voxel_size_with_decimal_commas_and_a_bom(tmp_path, text, expected):
    (tmp_path / "voxel_size.txt").write_bytes(text.encode("utf-8"))
    assert read_voxel_size(tmp_path)[0] == expected


def test_a_colour_mask_is_refused_as_colour(tiny, tmp_path):
    ds = _copy(tiny, tmp_path)
    labels = np.asarray(Image.open(ds / "train_masks_labels" / "slice_0002_GT.png"))
    rgb = np.zeros((*labels.shape, 3), np.uint8)
    rgb[labels == 1], rgb[labels == 2] = (255, 0, 0), (0, 255, 0)  # red = class 1, green = class 2
    Image.fromarray(rgb).save(ds / "train_masks_labels" / "slice_0002_GT.png")
    _expect(ds, "slice_0002_GT.png", "colour", "single-channel", "codes.txt")


def test_a_gray_mask_saved_as_rgb_still_loads(tiny, tmp_path):
    ds = _copy(tiny, tmp_path)
    labels = np.asarray(Image.open(ds / "train_masks_labels" / "slice_0002_GT.png"))
    Image.fromarray(np.stack([labels] * 3, -1)).save(ds / "train_masks_labels" / "slice_0002_GT.png")
    np.testing.assert_array_equal(load_volume(ds).labels[2], labels)


def test_bilevel_slices_and_masks_load(tmp_path):
    bits = np.zeros((2, 8, 8), bool)
    bits[:, 2:5, 3:6] = True
    for ext in (".png", ".tif"):
        ds = _dataset(tmp_path / ext[1:], bits, masks=bits, ext=ext)
        vol = load_volume(ds, cache_dir=tmp_path / "cache")
        np.testing.assert_array_equal(vol.images, bits.astype(np.uint8) * 255)
        np.testing.assert_array_equal(vol.labels, bits.astype(np.uint8))


def test_a_float_scan_with_a_range_below_one_keeps_its_contrast(tmp_path):
    """Attenuation coefficients span a few hundredths: the window must not be widened to at least 1."""
    images = np.random.default_rng(3).uniform(0.01, 0.03, (3, 16, 16)).astype(np.float32)
    vol = load_volume(_dataset(tmp_path, images), require_labels=False)
    assert vol.window[1] - vol.window[0] < 0.03 and vol.images.min() <= 5 and vol.images.max() >= 250


def test_evenly_spaced_slices_span_the_range_once_each():
    assert evenly_spaced(100, 5).tolist() == [0, 25, 50, 74, 99]  # first and last included
    assert evenly_spaced(4, 16).tolist() == [0, 1, 2, 3]  # fewer than asked: every one, once
    assert evenly_spaced(0, 16).tolist() == []
    z = evenly_spaced(983, 32)
    assert len(z) == 32 and (np.diff(z) > 0).all() and z[0] == 0 and z[-1] == 982
