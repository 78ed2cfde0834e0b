"""What scanners write goes straight in: each format, from a file or a folder, its labels and its voxel size
(scans.scan_parts and metadata_voxel_size, through load_volume and read_voxel_size)."""
import numpy as np
import pytest
import tifffile

import scan_formats as fmt
from conftest import snapshot
from microfossil.volume import DatasetError, load_volume, read_voxel_size

CODES = "background\nforaminifera\nostracod\n"


@pytest.fixture(scope="module")
def scan():
    """A 9 x 20 x 24 16-bit scan with a bright ramp along z and x (so order and orientation show), and its labels."""
    z, y, x = np.indices((9, 20, 24))
    images = (1000 + 3000 * z + 40 * x + 7 * y).astype(np.uint16)
    labels = ((x > 12).astype(np.uint8) + ((y > 10) & (x > 12))).astype(np.uint8)
    return images, labels


def _same(vol, images, labels=None):
    """`vol` holds `images` (windowed: the same order of grey levels) and `labels` voxel for voxel."""
    assert vol.shape == images.shape
    ranks = vol.images.astype(int)
    assert (np.diff(ranks, axis=0) > 0).all() and (np.diff(ranks[:, 0, :], axis=1) >= 0).all()
    assert np.corrcoef(ranks.ravel(), images.ravel())[0, 1] > 0.99
    if labels is not None:
        np.testing.assert_array_equal(vol.labels, labels)


def test_a_skyscan_folder_reads_as_it_is_with_its_pixel_size(scan, tmp_path):
    images, _ = scan
    eight = (images // 256).astype(np.uint8)
    folder = fmt.skyscan(tmp_path / "core_rec", eight, 4.5)
    before = snapshot(folder)
    vol = load_volume(folder, require_labels=False)
    assert vol.shape == eight.shape and vol.labels is None
    np.testing.assert_array_equal(vol.images, eight)  # 8-bit: the window is the identity
    assert vol.stems[0] == "core_rec00000120"  # the preview core_rec_spr.bmp is left out
    size, source = read_voxel_size(folder)
    assert size == (4.5, 4.5, 4.5) and "core_rec.log" in source
    assert snapshot(folder) == before


def test_an_imagej_stack_with_its_spacing(scan, tmp_path):
    images, labels = scan
    path = fmt.imagej(tmp_path / "core.tif", images, z_um=5.0, xy_um=2.5)
    fmt.imagej(tmp_path / "core_GT.tif", labels, z_um=5.0, xy_um=2.5)
    (tmp_path / "codes.txt").write_text(CODES)
    vol = load_volume(path)
    _same(vol, images, labels)
    assert vol.stems[:2] == ["core_0000", "core_0001"]
    size, source = read_voxel_size(path)
    assert size == pytest.approx((5.0, 2.5, 2.5)) and "ImageJ" in source


def test_a_bigtiff_with_a_resolution_in_centimetres(scan, tmp_path):
    images, _ = scan
    path = tmp_path / "core.tif"
    tifffile.imwrite(path, images, bigtiff=True, resolution=(4000, 4000), resolutionunit="CENTIMETER")
    _same(load_volume(path, require_labels=False), images)
    size, source = read_voxel_size(path)
    assert size == pytest.approx((2.5, 2.5, 2.5)) and "cm" in source and "z taken as x" in source


def test_a_folder_holding_one_volume_file_and_its_labels(scan, tmp_path):
    images, labels = scan
    fmt.nrrd_file(tmp_path / "core.nrrd", images, (0.005, 0.0025, 0.0025))
    fmt.nrrd_file(tmp_path / "core_GT.nrrd", labels, (0.005, 0.0025, 0.0025), compression_level=1)
    (tmp_path / "codes.txt").write_text(CODES)
    _same(load_volume(tmp_path), images, labels)
    size, source = read_voxel_size(tmp_path)
    assert size == pytest.approx((5.0, 2.5, 2.5)) and "core.nrrd" in source and "mm" in source


@pytest.mark.parametrize("name", ["core.mhd", "core.mha"])
def test_metaimage_spacing_is_taken_as_mm_and_said_so(scan, tmp_path, name):
    images, labels = scan
    path = fmt.metaimage(tmp_path / name, images, (0.004, 0.002, 0.002), compressed=name.endswith("a"))
    (tmp_path / "lab").mkdir()
    labels_path = fmt.metaimage(tmp_path / "lab" / "labels.mhd", labels, (1, 1, 1))
    (tmp_path / "codes.txt").write_text(CODES)
    vol = load_volume(path, labels_path=labels_path)
    _same(vol, images, labels)
    size, source = read_voxel_size(path)
    assert size == pytest.approx((4.0, 2.0, 2.0)) and "taken as mm" in source and "voxel_size_um" in source


def test_nifti_with_its_unit(scan, tmp_path):
    images, labels = scan
    path = fmt.nifti(tmp_path / "core.nii.gz", images, (6.0, 3.0, 3.0))
    fmt.nifti(tmp_path / "core_GT.nii.gz", labels, (6.0, 3.0, 3.0))
    (tmp_path / "codes.txt").write_text(CODES)
    vol = load_volume(path)
    _same(vol, images, labels)
    assert vol.stems[0] == "core_0000"
    assert read_voxel_size(path)[0] == pytest.approx((6.0, 3.0, 3.0))


def test_hdf5_names_its_dataset_when_there_are_several(scan, tmp_path):
    images, labels = scan
    one = fmt.hdf5(tmp_path / "one.h5", {"/exchange/data": images}, {"element_size_um": [5.0, 2.5, 2.5]})
    _same(load_volume(one, require_labels=False), images)
    assert read_voxel_size(one)[0] == (5.0, 2.5, 2.5)
    two = fmt.hdf5(tmp_path / "two.h5", {"/exchange/data": images, "/exchange/dark": images[:2] * 0})
    with pytest.raises(DatasetError, match=r"2 3D datasets.*h5_dataset"):
        load_volume(two, require_labels=False)
    _same(load_volume(two, require_labels=False, h5_dataset="/exchange/data"), images)
    lab = fmt.hdf5(tmp_path / "labels.h5", {"labels": labels})
    (tmp_path / "codes.txt").write_text(CODES)
    _same(load_volume(two, h5_dataset="/exchange/data", labels_path=lab), images, labels)


def test_a_dicom_series_comes_in_z_order_whatever_its_file_names(scan, tmp_path):
    images, _ = scan
    folder = fmt.dicom_series(tmp_path / "dicom", images, (0.005, 0.0025, 0.0025))
    (folder / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")  # a CD's index of the series, not a slice
    vol = load_volume(folder, require_labels=False)
    _same(vol, images)
    size, source = read_voxel_size(folder)
    assert size == pytest.approx((5.0, 2.5, 2.5)) and "DICOM" in source


def test_a_folder_of_slices_with_a_labels_folder(scan, tmp_path):
    images, labels = scan
    (tmp_path / "slices").mkdir()
    (tmp_path / "masks").mkdir()
    for z in range(len(images)):
        tifffile.imwrite(tmp_path / "slices" / f"img{z}.tif", images[z])
        tifffile.imwrite(tmp_path / "masks" / f"mask{z}.png", labels[z])
    (tmp_path / "masks" / "codes.txt").write_text(CODES)
    _same(load_volume(tmp_path / "slices", labels_path=tmp_path / "masks"), images, labels)
    with pytest.raises(DatasetError, match="no labels.*labels_path"):
        load_volume(tmp_path / "slices")


def test_labels_that_do_not_match_the_scan_are_named(scan, tmp_path):
    images, labels = scan
    path = fmt.imagej(tmp_path / "core.tif", images, 5.0, 2.5)
    fmt.imagej(tmp_path / "short.tif", labels[:-1], 5.0, 2.5)
    (tmp_path / "codes.txt").write_text(CODES)
    with pytest.raises(DatasetError, match=r"short.tif.*8 label slice\(s\).*core.tif has 9"):
        load_volume(path, labels_path=tmp_path / "short.tif")


def test_voxel_size_txt_and_the_parameter_come_before_the_metadata(scan, tmp_path):
    path = fmt.nifti(tmp_path / "core.nii", scan[0], (6.0, 3.0, 3.0))
    assert read_voxel_size(path, 2.0)[0] == (2.0, 2.0, 2.0)
    (tmp_path / "voxel_size.txt").write_text("4\n")
    assert read_voxel_size(path) == ((4.0, 4.0, 4.0), str(tmp_path / "voxel_size.txt"))


def test_a_tiff_in_printer_dpi_has_no_voxel_size(scan, tmp_path):
    path = tmp_path / "core.tif"
    tifffile.imwrite(path, scan[0], resolution=(72, 72), resolutionunit="INCH")
    size, source = read_voxel_size(path)
    assert size == (1.0, 1.0, 1.0) and "in voxels" in source
