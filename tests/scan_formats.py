"""Writers of what scanners and tools write, tiny, for the tests: each puts a (Z, Y, X) scan (and labels) in a folder
with a voxel size in its own metadata, the way that format records it. Independent of the readers under test: they
use each format's own library (or its published spec where the format is a header and raw bytes)."""
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image


def skyscan(folder, scan, pixel_um, acquisition_um=None):
    """A Bruker SkyScan / NRecon reconstruction folder: 8-bit BMP slices `x_rec00000123.bmp`, its `x_rec.log` (the
    acquisition's pixel size `acquisition_um`, the reconstruction's `pixel_um`: they differ when NRecon resized), and
    a preview image that is not a slice."""
    folder = Path(folder)
    folder.mkdir(parents=True)
    for z, page in enumerate(scan):
        Image.fromarray(page).save(folder / f"core_rec{z + 120:08d}.bmp")
    Image.fromarray(scan[len(scan) // 2][::2, ::2]).save(folder / "core_rec_spr.bmp")
    (folder / "core_rec.log").write_text("[System]\r\nScanner=Skyscan1272\r\n[Acquisition]\r\n"
                                         f"Image Pixel Size (um)={acquisition_um or pixel_um:.6f}\r\n[Reconstruction]\r\n"
                                         f"Pixel Size (um)={pixel_um:.5f}\r\n", encoding="latin-1")
    return folder


def imagej(path, scan, z_um, xy_um, **kw):
    """A Fiji/ImageJ stack with its spacing and unit."""
    tifffile.imwrite(path, scan, imagej=True, resolution=(1 / xy_um, 1 / xy_um),
                     metadata={"spacing": z_um, "unit": "micron", "axes": "ZYX"}, **kw)
    return Path(path)


def metaimage(path, scan, spacing_mm, compressed=False):
    """A MetaImage header `path` (.mhd: its raw data beside it; .mha: data after the header), spacing in mm."""
    path = Path(path)
    types = {"u1": "MET_UCHAR", "u2": "MET_USHORT", "i2": "MET_SHORT", "f4": "MET_FLOAT"}
    data = np.ascontiguousarray(scan).astype(scan.dtype.newbyteorder("<")).tobytes()
    if compressed:
        import zlib
        data = zlib.compress(data)
    local = path.suffix == ".mha"
    head = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
            f"CompressedData = {compressed}\n" + (f"CompressedDataSize = {len(data)}\n" if compressed else "") +
            "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\n"
            f"ElementSpacing = {spacing_mm[2]} {spacing_mm[1]} {spacing_mm[0]}\n"
            f"DimSize = {scan.shape[2]} {scan.shape[1]} {scan.shape[0]}\nElementType = {types[scan.dtype.str[1:]]}\n"
            f"ElementDataFile = {'LOCAL' if local else path.stem + '.raw'}\n")
    if local:
        path.write_bytes(head.encode() + data)
    else:
        path.write_text(head)
        (path.parent / (path.stem + ".raw")).write_bytes(data)
    return path


def nrrd_file(path, scan, spacing, units="mm", **kw):
    """An NRRD (pynrrd; `.nhdr`: detached data) with space directions and units, as 3D Slicer writes."""
    import nrrd
    header = {"space": "left-posterior-superior", "space directions": np.diag(spacing[::-1]).astype(float),
              "space units": [units] * 3, "space origin": np.zeros(3)}
    nrrd.write(str(path), np.ascontiguousarray(scan), header, index_order="C", **kw)
    return Path(path)


def nifti(path, scan, zooms_um):
    """A NIfTI (nibabel), x y z on disk, its zooms in microns."""
    import nibabel
    img = nibabel.Nifti1Image(np.ascontiguousarray(np.transpose(scan, (2, 1, 0))), np.eye(4))
    img.header.set_zooms(tuple(zooms_um[::-1]))
    img.header.set_xyzt_units("micron")
    nibabel.save(img, str(path))
    return Path(path)


def hdf5(path, datasets, attrs=None):
    """An HDF5 file of `datasets` (name -> array), chunked and compressed as beamlines write them."""
    import h5py
    with h5py.File(path, "w") as f:
        for name, arr in datasets.items():
            ds = f.create_dataset(name, data=arr, chunks=(1, *arr.shape[1:]) if arr.ndim == 3 else None,
                                  compression="gzip" if arr.ndim == 3 else None)
            for k, v in (attrs or {}).items():
                ds.attrs[k] = v
    return Path(path)


def dicom_series(folder, scan, spacing_mm, series_uid=None, names=None, shuffle_seed=0):
    """A CT DICOM series (pydicom), a file per slice, written in shuffled order with names that do not sort by z."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    order = np.random.default_rng(shuffle_seed).permutation(len(scan))
    for k, z in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesDescription = "CT", series_uid, "core"
        ds.StudyInstanceUID = "1.2.3"
        ds.Rows, ds.Columns = scan.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelSpacing = [spacing_mm[1], spacing_mm[2]]
        ds.SliceThickness = spacing_mm[0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, float(z) * spacing_mm[0]]
        ds.InstanceNumber = int(z) + 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = np.ascontiguousarray(scan[z]).astype("<u2").tobytes()
        name = names[k] if names else f"IM{k:04d}"
        ds.save_as(folder / name, enforce_file_format=True)
    return folder
