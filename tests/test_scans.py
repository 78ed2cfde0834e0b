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


def test_a_resized_skyscan_reconstruction_has_its_own_pixel_size(scan, tmp_path):
    """NRecon's [Reconstruction] Pixel Size, not the acquisition's Image Pixel Size, which comes first in the log."""
    folder = fmt.skyscan(tmp_path / "rec", (scan[0] // 256).astype(np.uint8), 10.0, acquisition_um=5.0)
    size, source = read_voxel_size(folder)
    assert size == (10.0, 10.0, 10.0) and "[Reconstruction]" in source


def test_a_thumbnail_beside_a_volume_file_is_not_the_scan(scan, tmp_path):
    images, _ = scan
    fmt.nrrd_file(tmp_path / "core.nrrd", images, (6.0, 3.0, 3.0), units="microns")
    from PIL import Image
    Image.fromarray((images[0] // 256).astype(np.uint8)).save(tmp_path / "thumbnail.png")
    vol = load_volume(tmp_path, require_labels=False)
    assert vol.shape == images.shape
    for z in range(3):  # slices and a volume file both: which one is the scan is the user's to say
        Image.fromarray((images[z] // 256).astype(np.uint8)).save(tmp_path / f"slice_{z:03d}.png")
    with pytest.raises(DatasetError, match=r"holds both 3 slice images .* and a volume file \(core.nrrd\)"):
        load_volume(tmp_path, require_labels=False)


def test_a_default_header_is_no_voxel_size(scan, tmp_path):
    """A NIfTI written with nibabel's defaults (zooms 1, unit unknown) records no voxel size, not 1 mm."""
    import nibabel
    images, _ = scan
    path = tmp_path / "plain.nii"
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(images.T), np.eye(4)), str(path))
    size, source = read_voxel_size(path)
    assert size == (1.0, 1.0, 1.0) and "no voxel size in the scan's metadata" in source


def test_hdf5_voxel_size_attributes_of_other_shapes(scan, tmp_path):
    """Two numbers (y, x) take z as x; a text that is no number is no voxel size, and no traceback."""
    images, _ = scan
    two = fmt.hdf5(tmp_path / "two.h5", {"data": images}, {"pixel_size": [2.5, 2.0], "unit": "um"})
    assert read_voxel_size(two)[0] == (2.0, 2.5, 2.0)
    text = fmt.hdf5(tmp_path / "text.h5", {"data": images}, {"resolution": "5 um", "unit": "um"})
    assert "no voxel size in the scan's metadata" in read_voxel_size(text)[1]


def test_a_dicom_series_named_by_uid(scan, tmp_path):
    images, _ = scan
    names = [f"1.2.826.0.1.3680043.{k + 1}" for k in range(len(images))]
    folder = fmt.dicom_series(tmp_path / "uids", images, (0.005, 0.0025, 0.0025), names=names)
    _same(load_volume(folder, require_labels=False), images)


def test_a_metaimage_header_size_of_minus_one_and_labels_in_no_known_format(scan, tmp_path):
    """HeaderSize = -1 (the data are the raw file's last bytes) is read; a labels_path in no format read here is
    named as such, not as a corrupt DICOM file."""
    images, _ = scan
    path = fmt.metaimage(tmp_path / "core.mhd", images, (0.006, 0.003, 0.003))
    raw = tmp_path / "core.raw"
    raw.write_bytes(b"\0" * 100 + raw.read_bytes())
    path.write_text(path.read_text().replace("ElementDataFile", "HeaderSize = -1\nElementDataFile"))
    _same(load_volume(path, require_labels=False), images)
    (tmp_path / "labels.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(DatasetError, match=r"labels.npy: not a format read here"):
        load_volume(path, labels_path=tmp_path / "labels.npy")
