"""Reading the slices of a scan's files, one at a time, whatever format a scanner wrote them in.

Each file of a scan (or of its labels) is a `Part`, whose `pages()` yields its slices as 2D arrays of the file's own
bit depth; `scans.scan_parts` finds which files make up a scan. The readers, each imported only when its format is met
(so Colab's first cell stays fast):
- TIFF (one page or many, BigTIFF, ImageJ stacks and hyperstacks): tifffile, a page at a time; an ImageJ stack over
  4 GB (one header for every page) is memory-mapped.
- PNG, BMP, JPEG: Pillow.
- MetaImage (`.mhd` + raw, `.mha`): the header is a few `key = value` lines, read here, and the raw data is
  memory-mapped with numpy. SimpleITK reads it too, but it is a 50 MB wheel that loads a whole volume into memory.
- NRRD (`.nrrd`, `.nhdr` + data file), 3D Slicer's format: pynrrd (pure Python) reads the header; raw data is
  memory-mapped, compressed data decompressed by pynrrd into memory.
- NIfTI (`.nii`, `.nii.gz`): nibabel, which memory-maps an uncompressed file (a `.nii.gz` is decompressed into memory).
- HDF5 (`.h5`, `.hdf5`): h5py, a slice at a time (chunked and compressed datasets alike); `h5_dataset` names the
  scan's dataset when the file has several.
- DICOM: pydicom, a file (or a frame of a multi-frame file) per slice, rescaled to its stored units when it says so.
A scan larger than memory works in every format but compressed NRRD, MetaImage and NIfTI.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

SLICE_EXTS = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")
DICOM_EXTS = (".dcm", ".dicom", ".ima")  # (a DICOM file may also have another suffix, or none: `scans._is_dicom`)
VOLUME_EXTS = {".mhd": "metaimage", ".mha": "metaimage", ".nrrd": "nrrd", ".nhdr": "nrrd", ".nii": "nifti",
               ".nii.gz": "nifti", ".h5": "hdf5", ".hdf5": "hdf5"}


class DatasetError(ValueError):
    """A problem with the user's dataset; the message names the file and the fix."""


def natural_key(p):
    """Sort key of file `p`'s name with its numbers as numbers (`s2` before `s10`)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", Path(p).name)]


def _suffix(path):
    """`path`'s format suffix, lower case; `.nii.gz` whole."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _stem(path):
    return Path(path).name[:-len(_suffix(path))] if _suffix(path) else Path(path).name


class Part:
    """One file of a scan or of its labels: a slice image, a stack, a volume file or a DICOM file; `len(part)` slices,
    `pages()` them one at a time. `dataset` names an HDF5 file's dataset."""

    def __init__(self, path, dataset=None):
        self.path, self.dataset = Path(path), dataset
        ext = _suffix(path)
        self.kind = VOLUME_EXTS.get(ext) or ("tiff" if ext in (".tif", ".tiff") else "image" if ext in SLICE_EXTS
                                             else "dicom")

    name = property(lambda self: self.path.name)
    stem = property(lambda self: self.path.name if self.kind == "dicom" and _suffix(self.path) not in DICOM_EXTS
                    else _stem(self.path))  # (a DICOM file named by its UID, "1.2.826...5", keeps its whole name)
    parent = property(lambda self: self.path.parent)
    def __fspath__(self): return str(self.path)
    def __str__(self): return str(self.path) + (f" (dataset {self.dataset})" if self.dataset else "")
    def __repr__(self): return f"Part({str(self)!r})"

    def stat(self): return self.path.stat()

    def __len__(self):
        try:
            if self.kind == "image":
                return 1
            if self.kind == "tiff":
                import tifffile
                with tifffile.TiffFile(self.path) as t:
                    return _tiff_planes(t, self.path)[0]
            if self.kind == "hdf5":
                with _opened(self) as arr:
                    return len(arr)
            return _n_slices(self)
        except DatasetError:
            raise
        except Exception as e:
            raise unreadable(self, e) from e

    def pages(self, step=1, labels=False):
        """Yield every `step`-th slice as a 2D array (a mask's as labels: a colour mask is refused)."""
        as_plane = _label_plane if labels else _gray
        try:
            if self.kind == "image":
                from PIL import Image
                with Image.open(self.path) as im:
                    im.load()
                    arr = np.asarray(im)
                yield as_plane(arr, self)
                return
            if self.kind == "tiff":
                import tifffile
                with tifffile.TiffFile(self.path) as t:
                    n, mapped = _tiff_planes(t, self.path)
                    for k in range(0, n, step):
                        yield as_plane(mapped[k] if mapped is not None else t.pages[k].asarray(), self)
                return
            with _opened(self) as arr:
                for k in range(0, len(arr), step):
                    yield as_plane(np.asarray(arr[k]), self)
        except DatasetError:
            raise
        except Exception as e:
            raise unreadable(self, e) from e


def _n_slices(part):
    """The slice count of a volume or DICOM file `part` from its header alone (a compressed volume is not
    decompressed to count it); its data is checked when its pages are read."""
    if part.kind == "dicom":
        import pydicom
        return int(getattr(pydicom.dcmread(part.path, stop_before_pixels=True), "NumberOfFrames", 1) or 1)
    if part.kind == "metaimage":
        dims = _metaimage_header(part.path)[0].get("DimSize", "").split()
        return int(dims[2]) if len(dims) == 3 else 0
    if part.kind == "nrrd":
        sizes = _nrrd_header(part.path)[0].get("sizes", [])
        return int(sizes[2]) if len(sizes) == 3 else 0
    import nibabel
    shape = nibabel.load(str(part.path)).shape
    return int(shape[2]) if len(shape) >= 3 else 0


def unreadable(path, e):
    """The DatasetError for file `path` that its reader could not read (exception `e`)."""
    if "imagecodecs" in str(e):  # tifffile's word for a compression (LZW, JPEG...) it cannot decode alone
        return DatasetError(f"Cannot read {path}: {e}. Its compression needs the imagecodecs package, which is not "
                            "installed: run `pip install imagecodecs` (it is in requirements.txt) and restart the "
                            "kernel, or save the file uncompressed.")
    if isinstance(e, ImportError):
        return DatasetError(f"Cannot read {path}: {e}. Run `pip install -r requirements.txt` (it lists the reader of "
                            "each format) and restart the kernel.")
    return DatasetError(f"Cannot read {path}: {type(e).__name__}: {e}. The file is corrupt, truncated or not a scan "
                        "in its format; export it again, or remove it.")


# ---- one page as a 2D array ------------------------------------------------------------------------------------

def _is_colour(arr):
    """Whether `arr` is an RGB(A) page whose red, green and blue channels differ."""
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        return False
    return not ((arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all())


def _plane(arr, path):
    """`arr` as one 2D page: the first channel of an RGB(A) page whose channels are equal (gray saved as colour)."""
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., 0]
    if arr.ndim != 2 or arr.size == 0:
        raise DatasetError(f"{path} has pages of shape {arr.shape}; expected 2D grayscale slices.")
    return arr


def _gray(arr, path):
    """One CT page as a 2D array of its file's bit depth: colour becomes luminance, 1-bit becomes 0/255 uint8."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if _is_colour(arr):
        lum = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        arr = lum.astype(arr.dtype) if arr.dtype.kind == "f" else np.rint(lum).astype(arr.dtype)
    return _plane(arr, path)


def _label_plane(arr, path):
    """One mask page as a 2D array of labels, as stored (1-bit as 0/1); a colour mask is refused, never converted."""
    if _is_colour(arr):
        raise DatasetError(f"{path} is a colour image (its red, green and blue channels differ), as some annotation "
                           "tools save masks. A mask must be a single-channel integer label image: each pixel's value "
                           "is the line of codes.txt of its class (0 = background). Export the labels as a grayscale "
                           "or indexed label image, or map each colour to its label value.")
    return _plane(arr.astype(np.uint8) if arr.dtype == bool else arr, path)


# ---- TIFF ------------------------------------------------------------------------------------------------------

def _tiff_len(t, path):
    """Number of pages of the open TiffFile `t`; DatasetError if file `path` was cut short before its last page ends.

    tifffile stops at a page list that points past the end of the file, with only a log
    line, so the last page it found is checked: its link to a next page must be 0 (none)
    and its pixel data must lie inside the file.
    """
    import struct
    n, fh, fmt = len(t.pages), t.filehandle, t.tiff
    fh.seek(t.pages.next_page_offset)
    link = fh.read(fmt.offsetsize)
    last = t.pages[n - 1]
    data_end = max((o + c for o, c in zip(last.dataoffsets, last.databytecounts)), default=0)
    if data_end > fh.size:
        cut = f"the pixel data of its page {n} runs past the end of the file ({fh.size} bytes)"
    elif len(link) < fmt.offsetsize or struct.unpack(fmt.offsetformat, link)[0]:
        cut = f"its list of pages breaks off after page {n}, at the end of the file ({fh.size} bytes)"
    else:
        return n
    raise _truncated(path, cut)


def _truncated(path, cut):
    return DatasetError(f"{path} is truncated: {cut}, so slices are missing. It was cut short (an interrupted copy, "
                        "download or export): copy or export it again from the original.")


def _tiff_planes(t, path):
    """(slices, memory-mapped (Z, Y, X) array or None) of the open TiffFile `t`: its pages, or the planes of an ImageJ
    stack over 4 GB, whose one header stands for every page. A hyperstack of several channels, or of time points and
    slices, is refused: it is not one grey-level volume."""
    n = _tiff_len(t, path)
    if not t.is_imagej:
        return n, None
    said = int((t.imagej_metadata or {}).get("images", n))
    series = t.series[0]
    sizes = dict(zip(series.axes, series.shape))
    extra = {a: k for a, k in sizes.items() if a not in "ZYXSIQ" and k > 1}
    if extra.get("C") or (extra.get("T") and sizes.get("Z", 1) > 1):
        raise DatasetError(f"{path} is an ImageJ hyperstack of {series.shape} ({series.axes}): more than one channel "
                           "or time point besides its slices. In Fiji, keep one (Image > Duplicate..., one channel and "
                           "one frame) and save it as its own stack.")
    planes = int(np.prod([k for a, k in sizes.items() if a not in "YXS"]))
    if said > n and planes < said:  # tifffile found too few bytes for the stack ImageJ's description announces
        raise _truncated(path, f"its description announces {said} slices and it holds the bytes of {planes}")
    if planes == n:
        return n, None
    need = series.dataoffset + series.nbytes if series.dataoffset is not None else None
    if need is None:
        return n, None
    if need > t.filehandle.size:
        raise _truncated(path, f"its {planes} slices need {need} bytes and the file has {t.filehandle.size}")
    import tifffile
    return planes, tifffile.memmap(path, mode="r").reshape(planes, *series.shape[-2:])


# ---- volume files ----------------------------------------------------------------------------------------------

class _opened:
    """`with _opened(part) as arr`: the (Z, Y, X) array-like of a volume or DICOM file (`arr[k]` one slice)."""

    def __init__(self, part):
        self.part, self.close = part, None

    def __enter__(self):
        p = self.part
        if p.kind == "hdf5":
            import h5py
            # a chunk cache of 256 MiB: a slice read one at a time decompresses each chunk once, not once per slice
            f = h5py.File(p.path, "r", rdcc_nbytes=256 << 20, rdcc_nslots=100003)
            try:
                ds = h5_scan(f, p.path, p.dataset)
            except BaseException:
                f.close()  # (a data error would otherwise keep the file open, held by the traceback)
                raise
            self.close = f.close
            return ds
        return {"metaimage": _metaimage_array, "nrrd": _nrrd_array, "nifti": _nifti_array,
                "dicom": _dicom_array}[p.kind](p.path)

    def __exit__(self, *exc):
        if self.close:
            self.close()


def _mapped(data, dtype, offset, shape, header):
    """`data`'s raw bytes from `offset` as a read-only memory-mapped C-order array; DatasetError naming `header`
    when the data file is missing or too short."""
    data = Path(data)
    if not data.is_file():
        raise DatasetError(f"{header} points at the data file {data}, which does not exist. Copy it beside the "
                           "header (the two travel together), or fix the header's data file line.")
    need = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if data.stat().st_size < need:
        raise _truncated(data, f"{np.prod(shape)} voxels of {np.dtype(dtype)} need {need} bytes and it has "
                               f"{data.stat().st_size}")
    return np.memmap(data, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))


def _z_first(arr, path):
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise DatasetError(f"{path} holds a {arr.ndim}D array of shape {arr.shape}; expected one 3D volume.")
    return arr


MET_TYPES = {"MET_UCHAR": "u1", "MET_CHAR": "i1", "MET_USHORT": "u2", "MET_SHORT": "i2", "MET_UINT": "u4",
             "MET_INT": "i4", "MET_ULONG_LONG": "u8", "MET_LONG_LONG": "i8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def _metaimage_header(path):
    """The `key = value` lines of MetaImage header `path` (up to ElementDataFile, where a `.mha`'s data begins) and
    the byte offset after them."""
    head, offset = {}, 0
    with open(path, "rb") as fh:
        for raw in fh:
            offset += len(raw)
            key, sep, value = raw.decode("latin-1").partition("=")
            if not sep:
                raise DatasetError(f"{path} is not a MetaImage header: the line {raw[:60]!r} is not `key = value`.")
            head[key.strip()] = value.strip()
            if key.strip() == "ElementDataFile":
                return head, offset
    raise DatasetError(f"{path} has no ElementDataFile line: not a complete MetaImage header. Export it again.")


def _metaimage_array(path):
    head, offset = _metaimage_header(path)
    dims = [int(v) for v in head.get("DimSize", "").split()]
    etype = MET_TYPES.get(head.get("ElementType", ""))
    if len(dims) != 3 or etype is None or int(head.get("ElementNumberOfChannels", 1)) != 1:
        raise DatasetError(f"{path}: expected a 3D one-channel MetaImage of a numeric ElementType, got DimSize "
                           f"{head.get('DimSize')!r}, ElementType {head.get('ElementType')!r}. Export one 3D volume.")
    msb = head.get("ElementByteOrderMSB", head.get("BinaryDataByteOrderMSB", "False")).lower() == "true"
    dtype = np.dtype(etype).newbyteorder(">" if msb else "<")
    shape = dims[::-1]  # x fastest on disk: (z, y, x) in C order
    data = head["ElementDataFile"]
    if data.upper().startswith("LIST") or "%" in data:
        raise DatasetError(f"{path} spreads its data over several files ({data}); read the slices as a folder "
                           "instead (point data_dir at it), or save the volume as one .mha or .mhd + .raw.")
    local = data.upper() == "LOCAL"
    source = Path(path) if local else Path(path).parent / data
    skip = offset if local else int(head.get("HeaderSize", 0))
    if skip == -1 and source.is_file():  # -1: the data are the file's last bytes
        skip = max(0, source.stat().st_size - int(np.prod(dims)) * dtype.itemsize)
    if head.get("CompressedData", "False").lower() == "true":
        import zlib
        if not source.is_file():
            raise DatasetError(f"{path} points at the data file {source}, which does not exist. Copy it beside the "
                               "header, or fix the header's ElementDataFile line.")
        with open(source, "rb") as fh:
            fh.seek(skip)
            raw = zlib.decompress(fh.read())
        if len(raw) < np.prod(shape) * dtype.itemsize:
            raise _truncated(source, "its compressed data holds fewer voxels than its header's DimSize")
        return np.frombuffer(raw, dtype, int(np.prod(shape))).reshape(shape)
    return _mapped(source, dtype, skip, shape, path)


NRRD_TYPES = {"int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2", "int32": "i4", "uint32": "u4",
              "int64": "i8", "uint64": "u8", "float": "f4", "double": "f8"}
NRRD_ALIASES = {"signed char": "int8", "int8_t": "int8", "uchar": "uint8", "unsigned char": "uint8",
                "uint8_t": "uint8", "short": "int16", "short int": "int16", "signed short": "int16",
                "signed short int": "int16", "int16_t": "int16", "ushort": "uint16", "unsigned short": "uint16",
                "unsigned short int": "uint16", "uint16_t": "uint16", "int": "int32", "signed int": "int32",
                "int32_t": "int32", "uint": "uint32", "unsigned int": "uint32", "uint32_t": "uint32",
                "longlong": "int64", "long long": "int64", "int64_t": "int64", "ulonglong": "uint64",
                "unsigned long long": "uint64", "uint64_t": "uint64"}


def _nrrd_header(path):
    import nrrd
    with open(path, "rb") as fh:
        header = nrrd.read_header(fh)
        return header, fh.tell()


def _nrrd_array(path):
    import nrrd
    header, offset = _nrrd_header(path)
    if header.get("dimension") != 3:
        raise DatasetError(f"{path} is a {header.get('dimension')}D NRRD; expected one 3D volume.")
    data = header.get("data file", header.get("datafile"))
    source = Path(path).parent / data if data else Path(path)
    if not source.is_file():
        raise DatasetError(f"{path} points at the data file {source}, which does not exist. Copy it beside the "
                           "header (the two travel together), or fix the header's data file line.")
    if header.get("encoding", "raw") != "raw" or "line skip" in header:
        return _z_first(nrrd.read(str(path), index_order="C")[0], path)
    kind = header["type"]
    dtype = np.dtype(NRRD_TYPES[NRRD_ALIASES.get(kind, kind)])
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder(">" if header.get("endian", "little") == "big" else "<")
    skip = int(header.get("byte skip", 0))
    if skip == -1:  # the data are the file's last bytes (raw encoding only)
        skip = max(0, source.stat().st_size - int(np.prod([int(v) for v in header["sizes"]])) * dtype.itemsize)
    else:
        skip += 0 if data else offset
    return _mapped(source, dtype, skip, [int(s) for s in header["sizes"]][::-1], path)


def _nifti_array(path):
    import nibabel
    img = nibabel.load(str(path))
    arr = img.dataobj if _suffix(path) == ".nii" else np.asanyarray(img.dataobj)
    shape = tuple(img.shape)
    if len(shape) == 4 and shape[3] == 1:
        arr = arr[..., 0] if isinstance(arr, np.ndarray) else np.asanyarray(arr)[..., 0]
        shape = shape[:3]
    if len(shape) != 3:
        raise DatasetError(f"{path} is a NIfTI image of shape {shape}; expected one 3D volume.")
    return _XYZ(arr, shape)


class _XYZ:
    """A NIfTI (x, y, z) array seen as (z, y, x) slices, read one at a time."""
    def __init__(self, arr, shape): self.arr, self.shape = arr, shape
    def __len__(self): return self.shape[2]
    def __getitem__(self, k): return np.asarray(self.arr[:, :, k]).T


def h5_scan(f, path, dataset=None):
    """The 3D dataset of open HDF5 file `f` (at `path`): the one named `dataset`, else its only 3D dataset."""
    import h5py
    if dataset:
        if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
            raise DatasetError(f"{path} has no dataset {dataset!r}; its 3D datasets: {', '.join(_h5_3d(f)) or 'none'}."
                               " Set h5_dataset to one of them.")
        return _z_first(f[dataset], f"{path} (dataset {dataset})")
    found = _h5_3d(f)
    if len(found) == 1:
        return f[found[0]]
    if not found:
        raise DatasetError(f"{path} holds no 3D dataset (a volume of slices). Save the scan in it as one 3D "
                           "dataset, z first.")
    raise DatasetError(f"{path} holds {len(found)} 3D datasets ({', '.join(found[:6])}): set the parameter "
                       "h5_dataset to the scan's, e.g. h5_dataset = \"" + found[0] + "\".")


def _h5_3d(f):
    import h5py
    found = []
    f.visititems(lambda name, obj: found.append("/" + name) if isinstance(obj, h5py.Dataset) and obj.ndim == 3
                 and obj.dtype.kind in "uif" else None)
    return found


def _dicom_array(path):
    import pydicom
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    frames = frames[None] if frames.ndim == 2 else frames
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    if (slope, intercept) != (1.0, 0.0) or "RescaleSlope" in ds:
        frames = frames.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    return frames
