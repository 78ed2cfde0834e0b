"""Bad files of every format stop with one message naming the file and the fix, and the scan is never written to;
ImageJ stacks over 4 GB and hyperstacks (readers, through load_volume)."""
import shutil
import struct

import numpy as np
import pytest
import tifffile

import scan_formats as fmt
from conftest import snapshot
from microfossil.readers import Part
from microfossil.volume import DatasetError, load_volume


@pytest.fixture(scope="module")
def images():
    z, y, x = np.indices((6, 16, 18))
    return (500 + 900 * z + 30 * x + y).astype(np.uint16)


def _refused(path, *fragments, **kw):
    """`load_volume(path)` stops naming every fragment, and leaves the scan's folder as it was."""
    folder = path if path.is_dir() else path.parent
    before = snapshot(folder)
    with pytest.raises(DatasetError) as e:
        load_volume(path, require_labels=False, **kw)
    for f in fragments:
        assert f in str(e.value), f"{f!r} not in: {e.value}"
    assert snapshot(folder) == before
    return str(e.value)


def _cut(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_a_header_whose_raw_file_is_missing(images, tmp_path):
    path = fmt.metaimage(tmp_path / "core.mhd", images, (0.002,) * 3)
    (tmp_path / "core.raw").unlink()
    _refused(path, str(path), str(tmp_path / "core.raw"), "does not exist", "Copy it beside the header")
    (tmp_path / "n").mkdir()
    nhdr = fmt.nrrd_file(tmp_path / "n" / "core.nhdr", images, (0.002,) * 3, detached_header=True)
    for f in (tmp_path / "n").iterdir():
        if f != nhdr:
            f.unlink()
    _refused(nhdr, str(nhdr), "does not exist")


@pytest.mark.parametrize("name", ["core.mhd", "core.nrrd", "core.nii", "core.nii.gz", "core.h5", "core.tif"])
def test_a_truncated_volume_file(images, tmp_path, name):
    write = {"core.mhd": lambda p: fmt.metaimage(p, images, (0.002,) * 3),
             "core.nrrd": lambda p: fmt.nrrd_file(p, images, (0.002,) * 3, compression_level=0),
             "core.nii": lambda p: fmt.nifti(p, images, (2, 2, 2)), "core.nii.gz": lambda p: fmt.nifti(p, images, (2,) * 3),
             "core.h5": lambda p: fmt.hdf5(p, {"data": images}), "core.tif": lambda p: fmt.imagej(p, images, 2, 2)}
    path = write[name](tmp_path / name)
    _cut(tmp_path / ("core.raw" if name == "core.mhd" else name), 0.6)
    msg = _refused(path, "core.")
    assert "truncated" in msg or "corrupt" in msg


def test_an_hdf5_file_with_no_3d_dataset(tmp_path):
    path = fmt.hdf5(tmp_path / "core.h5", {"flat": np.zeros((4, 5), np.uint16)})
    _refused(path, str(path), "holds no 3D dataset")
    path = fmt.hdf5(tmp_path / "two.h5", {"a": np.zeros((3, 4, 5), np.uint16)})
    _refused(path, "no dataset '/b'", "/a", "h5_dataset", h5_dataset="/b")


def test_a_dicom_folder_of_two_series(images, tmp_path):
    folder = fmt.dicom_series(tmp_path / "dicom", images[:3], (0.002,) * 3, series_uid="1.2.3.4")
    fmt.dicom_series(folder, images[3:], (0.002,) * 3, series_uid="1.2.3.5", names=["B1", "B2", "B3"])
    _refused(folder, str(folder), "2 DICOM series", "folder of its own")


def test_a_corrupt_dicom_file(images, tmp_path):
    folder = fmt.dicom_series(tmp_path / "dicom", images, (0.002,) * 3, names=[f"s{k}.dcm" for k in range(6)])
    (folder / "s2.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    _refused(folder, "s2.dcm", "Cannot read")


def test_a_hyperstack_of_two_channels_is_refused(images, tmp_path):
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, np.stack([images, images], axis=1), imagej=True, metadata={"axes": "ZCYX"})
    _refused(path, str(path), "hyperstack", "one channel")


def test_an_imagej_stack_with_one_header_for_every_page(images, tmp_path):
    """ImageJ writes one header for a stack over 4 GB (the TIFF limit), its slice count in the description: every
    slice is read, not only the first."""
    path = fmt.imagej(tmp_path / "big.tif", images, 2.0, 1.0)
    with tifffile.TiffFile(path) as t:
        first = t.pages[0].offset
    with open(path, "r+b") as fh:  # cut the list of pages after the first, as ImageJ writes it
        fh.seek(first)
        n_tags = struct.unpack("<H", fh.read(2))[0]
        fh.seek(first + 2 + 12 * n_tags)
        fh.write(b"\0\0\0\0")
    with tifffile.TiffFile(path) as t:
        assert len(t.pages) == 1
    assert len(Part(path)) == len(images)
    np.testing.assert_array_equal([p for p in Part(path).pages()], images)
    shutil.copy(path, tmp_path / "short.tif")
    _cut(tmp_path / "short.tif", 0.7)
    _refused(tmp_path / "short.tif", "short.tif is truncated")


def test_a_file_of_no_known_format(tmp_path):
    (tmp_path / "core.xyz").write_text("x")
    _refused(tmp_path / "core.xyz", "not a format read here")
