"""Finding a scan: which files make up a scan and its labels, and the voxel size its own metadata records.

`scan_parts(path)` takes what a scanner writes: the published layout (`train/`, `train_masks_labels/<stem>_GT<ext>`,
`codes.txt`), any folder of slices (TIFF, PNG, BMP, JPEG: the largest run of names that differ only in their numbers,
so that a SkyScan folder's preview image is left out), a DICOM series folder (ordered along the slice normal), a folder
holding one volume file, or the volume file itself (`readers.VOLUME_EXTS`). Labels: `<name>_GT<ext>` beside each slice
or volume file (the published convention), or `labels_path`, a label file or folder.

`metadata_voxel_size(path)`: ImageJ's spacing and unit, OME-TIFF's physical sizes, a TIFF resolution in centimetres (a
resolution in inches is a printer's dpi and is ignored), a SkyScan/NRecon `.log`'s pixel size, the spacing of
MetaImage (whose unit is not recorded: millimetres, the ITK convention, and said so), NRRD (its space units, else
millimetres, Slicer's convention, said so), NIfTI (its header's unit), DICOM (millimetres by the standard) and HDF5
attributes (`element_size_um` as ilastik and Fiji write it, a size with a `unit`, Data Exchange's objective resolution).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .readers import (DICOM_EXTS, SLICE_EXTS, VOLUME_EXTS, DatasetError, Part, _metaimage_header, _nrrd_header, _stem, _suffix,
                      h5_scan, natural_key, unreadable)

UM_PER = {"um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
          "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "nm": 1e-3, "nanometer": 1e-3, "cm": 1e4, "m": 1e6,
          "meter": 1e6, "metre": 1e6}  # a length unit's size in µm


def _is_dicom(p):
    if p.suffix.lower() in DICOM_EXTS:
        return True
    if _suffix(p) in SLICE_EXTS or _suffix(p) in VOLUME_EXTS or p.suffix.lower() in (".log", ".txt", ".csv", ".json",
                                                                                     ".xml", ".zip", ".raw", ".py"):
        return False  # (a DICOM file is often named by its UID, "1.2.826.0.1.3680043.5": any other suffix)
    try:
        with open(p, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _numbered_run(files):
    """The largest group of `files` whose names differ only in their numbers (a SkyScan folder's slices, not its
    preview image), in natural order, and the files left out."""
    groups = {}
    for p in files:
        groups.setdefault((re.sub(r"\d+", "#", _stem(p)), _suffix(p)), []).append(p)
    run = max(groups.values(), key=len)
    return sorted(run, key=natural_key), sorted(set(files) - set(run), key=natural_key)


def _visible(folder):
    return [p for p in Path(folder).iterdir() if not p.name.startswith(".") and p.is_file()]


def _is_gt(p): return _stem(p).endswith("_GT")


def _slices_in(folder):
    """The slice files of `folder` (no `_GT` mask) and those left out; [] when it holds none."""
    files = [p for p in _visible(folder) if _suffix(p) in SLICE_EXTS and not _is_gt(p)]
    return _numbered_run(files) if files else ([], [])


def _dicom_series(folder):
    """The DICOM files of `folder` as `Part`s ordered along the slice normal ([] when it holds none); one series."""
    files = [p for p in _visible(folder) if _is_dicom(p) and p.name.upper() != "DICOMDIR"]  # DICOMDIR: an index
    if not files:
        return []
    try:
        import pydicom
    except ImportError as e:
        raise unreadable(folder, e) from e
    heads = []
    for p in files:
        try:
            h = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as e:
            raise unreadable(p, e) from e
        if "Rows" not in h or "SeriesInstanceUID" not in h:
            raise DatasetError(f"Cannot read {p}: not a DICOM image (no image size or series in its header). Remove "
                               "it from the folder, or export the series again.")
        heads.append((p, h))
    series = {}
    for p, h in heads:
        series.setdefault(str(getattr(h, "SeriesInstanceUID", "")), []).append((p, h))
    if len(series) > 1:
        said = "; ".join(f"{len(v)} file(s) like {v[0][0].name} ({getattr(v[0][1], 'SeriesDescription', '') or uid})"
                         for uid, v in series.items())
        raise DatasetError(f"{folder} holds {len(series)} DICOM series: {said}. Move each series to a folder of its "
                           "own and point data_dir at the scan's.")
    return [Part(p) for p, _ in sorted(heads, key=lambda ph: _dicom_order(ph[1], ph[0]))]


def _dicom_order(h, p):
    pos, ori = getattr(h, "ImagePositionPatient", None), getattr(h, "ImageOrientationPatient", None)
    if pos is not None and ori is not None:
        normal = np.cross(np.asarray(ori[:3], float), np.asarray(ori[3:], float))
        return (0, float(np.dot(normal, np.asarray(pos, float))), natural_key(p))
    return (1, int(getattr(h, "InstanceNumber", 0) or 0), natural_key(p))


def _volume_in(folder):
    """The one volume file of `folder` (no `_GT` one), or None."""
    found = [p for p in _visible(folder) if _suffix(p) in VOLUME_EXTS and not _is_gt(p)]
    if len(found) > 1:
        raise DatasetError(f"{folder} holds {len(found)} volume files ({', '.join(p.name for p in found[:4])}): "
                           "point data_dir at the scan's own file.")
    return found[0] if found else None


def scan_parts(path, require_labels=True, labels_path=None, h5_dataset=None, sparse=False):
    """The files of the scan at `path` and of its labels: `(images, masks, codes_path, left_out)`, each a list of
    `Part`s in z order (`masks` None when the scan has no labels), codes.txt's path (None when it has none and the
    scan no labels), and the image files of the folder left out of the scan (a preview, a spare). Only reads names
    and headers. `labels_path`: a label file or folder, else the `_GT` convention beside the slices. `sparse` (sparse
    labels): a slice with no mask file has None in `masks` instead of stopping the load, and a label folder of fewer
    slices than the scan is matched to the scan's slices by name (`_matched_labels`)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path} does not exist. Set data_dir to the scan: the dataset folder (train/, "
                           "train_masks_labels/, codes.txt), a folder of slices, or one volume file.")
    left_out, images, masks = [], None, None
    if path.is_dir() and (path / "train").is_dir():  # the published layout
        img_dir, mask_dir = path / "train", path / "train_masks_labels"
        files = sorted((p for p in _visible(img_dir) if _suffix(p) in SLICE_EXTS), key=natural_key)
        if not files:
            raise DatasetError(f"No images in {img_dir}. Expected PNG, TIFF or BMP slices (found: "
                               f"{', '.join(sorted(p.name for p in img_dir.iterdir())[:5]) or 'nothing'}).")
        images = [Part(p) for p in files]
        if mask_dir.is_dir() and labels_path is None:
            masks = [_gt_of(p, mask_dir, "train/", sparse) for p in images]
        elif require_labels and labels_path is None:
            raise DatasetError(f"{mask_dir} does not exist. Add a label image <stem>_GT<ext> per slice there.")
        codes_dirs = [path]
    elif path.is_dir():
        files, left_out = _slices_in(path)
        vol = _volume_in(path) if files else None
        if vol is not None and labels_path is not None and vol.resolve() == Path(labels_path).resolve():
            vol = None  # the labels, beside their slices
        if vol is not None and len(files) <= 2:  # a preview or thumbnail beside the volume file
            return scan_parts(vol, require_labels, labels_path, h5_dataset)[:3] + (files + left_out,)
        if vol is not None:
            raise DatasetError(f"{path} holds both {len(files)} slice images ({files[0].name}...) and a volume file "
                               f"({vol.name}): set data_dir to the one that is the scan (the volume file itself, or "
                               "a folder holding only the slices).")
        if files:
            images = [Part(p) for p in files]
            gts = [_find_gt(p.path, path) for p in images]
            if labels_path is None and any(gts):
                masks = [_gt_of(p, path, f"{path.name}/", sparse) for p in images]
        else:
            images = _dicom_series(path)
            if not images:
                vol = _volume_in(path)
                if vol is None:
                    raise DatasetError(f"{path} holds no scan: no slices (TIFF, PNG, BMP, JPEG), no DICOM series, "
                                       "no volume file (.mhd, .nrrd, .nii, .h5...) and no train/ folder. Found: "
                                       f"{', '.join(sorted(p.name for p in _visible(path))[:6]) or 'nothing'}.")
                return scan_parts(vol, require_labels, labels_path, h5_dataset)
        codes_dirs = [path]
    else:
        if _suffix(path) not in VOLUME_EXTS and _suffix(path) not in SLICE_EXTS and not _is_dicom(path):
            raise DatasetError(f"{path}: not a format read here (TIFF, PNG, BMP, JPEG, .mhd/.mha, .nrrd/.nhdr, "
                               ".nii/.nii.gz, .h5/.hdf5, DICOM). Export the scan as one of them.")
        images = [Part(path, h5_dataset)]
        gt = _find_gt(path, path.parent)
        if labels_path is None and gt is not None:
            masks = [Part(gt)]
        codes_dirs = [path.parent]
    if labels_path is not None:
        masks = _label_parts(Path(labels_path))
        if sparse and len(masks) > 1 and len(masks) < len(images):
            masks = _matched_labels(images, masks, Path(labels_path))
        codes_dirs.append(Path(labels_path) if Path(labels_path).is_dir() else Path(labels_path).parent)
    if require_labels and masks is None:
        raise DatasetError(f"{path} has no labels: add a label file <name>_GT<ext> beside each slice or volume "
                           "file, or set labels_path to the label file or folder.")
    codes_path = next((d / "codes.txt" for d in codes_dirs if (d / "codes.txt").is_file()), codes_dirs[0] / "codes.txt")
    return images, masks, codes_path, left_out


def _find_gt(p, folder):
    for ext in dict.fromkeys((_suffix(p), Path(p).suffix, *SLICE_EXTS)):
        for cand in (folder / f"{_stem(p)}_GT{ext}", folder / f"{_stem(p)}_GT{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def _gt_of(part, folder, where, sparse=False):
    m = _find_gt(part.path, folder)
    if m is None and not sparse:
        raise DatasetError(f"No mask for {part}: expected {folder / (part.stem + '_GT' + _suffix(part.path))}. "
                           f"Add it, or remove the slice from {where}; or, when only some slices are labelled, set "
                           "sparse_labels=True in 01's parameters cell.")
    return None if m is None else Part(m)


def _last_number(name):
    found = re.findall(r"\d+", name)
    return int(found[-1]) if found else None


def _matched_labels(images, masks, folder):
    """`masks`, label slices of a folder holding fewer than the scan's `images`, one per image or None: a label file is
    its slice's when its name is the slice's (with or without `_GT`), else when the last number in both names is the
    same (`core_rec00000040.bmp` and `labels_0040.tif`)."""
    by_stem = {_stem(m.path)[:-3] if _stem(m.path).endswith("_GT") else _stem(m.path): m for m in masks}
    out = [by_stem.get(_stem(p.path)) for p in images]
    if not any(out):
        numbers = {}
        for m in masks:
            numbers.setdefault(_last_number(_stem(m.path)), []).append(m)
        out = [(numbers.get(_last_number(_stem(p.path))) or [None])[0] for p in images]
    unmatched = sorted({m.name for m in masks} - {m.name for m in out if m is not None})
    if unmatched:
        raise DatasetError(f"labels_path {folder}: {', '.join(unmatched[:4])} match(es) no slice of the scan by name "
                           "or by slice number. Name each label file after its slice (e.g. <slice name>_GT.tif), or "
                           "save the labels as one volume the size of the scan.")
    return out


def _label_parts(labels):
    """The `Part`s of label file or folder `labels` (the folder's slices in natural order, `_GT` names or not)."""
    if not labels.exists():
        raise DatasetError(f"labels_path {labels} does not exist. Set it to the label file or folder of this scan, "
                           "or to None.")
    if labels.is_file():
        if _suffix(labels) not in VOLUME_EXTS and _suffix(labels) not in SLICE_EXTS and not _is_dicom(labels):
            raise DatasetError(f"labels_path {labels}: not a format read here (TIFF, PNG, BMP, .mhd/.mha, .nrrd/.nhdr, "
                               ".nii/.nii.gz, .h5/.hdf5, DICOM). Save the labels as one of them.")
        return [Part(labels)]
    files = [p for p in _visible(labels) if _suffix(p) in SLICE_EXTS]
    if files:
        return [Part(p) for p in sorted(files, key=natural_key)]
    vol = _volume_in(labels)
    if vol is None:
        raise DatasetError(f"labels_path {labels} holds no label slices or volume file. Point it at the labels.")
    return [Part(vol)]


# ---- voxel size from the scan's metadata ------------------------------------------------------------------------

def metadata_voxel_size(path, h5_dataset=None):
    """`((z, y, x) in µm, where it came from)` as the scan at `path` records it (a SkyScan `.log` beside the slices,
    the first file's own metadata), or None when it records none or a size in no known unit."""
    path = Path(path)
    try:
        if path.is_dir():
            found = _skyscan_log(path) or _skyscan_log(path / "train")
            if found:
                return found
            images = scan_parts(path, require_labels=False, h5_dataset=h5_dataset)[0]
            path = images[0].path if images else None
            if path is None:
                return None
            if images[0].kind == "dicom" and len(images) > 1:
                return _dicom_spacing(images)
        return _file_spacing(Part(path, h5_dataset))
    except DatasetError:
        return None


def _um(values, unit, where, assumed=""):
    scale = UM_PER.get(str(unit).strip().lower().replace("\\u00b5", "µ"))
    try:
        vs = np.asarray(values, float).ravel()
    except (TypeError, ValueError):  # an attribute that is no number
        return None
    if scale is None or vs.size != 3 or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        return None
    if assumed and np.all(vs == 1):  # a unit-less spacing of exactly 1: a writer's default header, not a voxel size
        return None
    return tuple(round(float(v) * scale, 6) for v in vs), where + assumed


def _skyscan_log(folder):
    if not folder.is_dir():
        return None
    for log in sorted(folder.glob("*.log"), key=natural_key):
        text = log.read_bytes().decode("latin-1")
        rec = re.search(r"^\[Reconstruction\]([^[]*)", text, re.M | re.I)  # NRecon's section: the slices' own size
        m = rec and re.search(r"^\s*Pixel Size \(um\)\s*=\s*([0-9.eE+-]+)", rec.group(1), re.M)
        if m:
            return _um([float(m.group(1))] * 3, "um", f"{log} ([Reconstruction] Pixel Size (um), SkyScan / NRecon)")
        m = re.search(r"^\s*(?:Image )?Pixel Size \(um\)\s*=\s*([0-9.eE+-]+)", text, re.M)  # the acquisition's
        if m:
            return _um([float(m.group(1))] * 3, "um", f"{log} (Image Pixel Size (um), SkyScan acquisition: the "
                                                      "reconstruction's if it was not resized)")
    return None


def _file_spacing(part):
    p = part.path
    if part.kind == "tiff":
        return _tiff_spacing(p)
    if part.kind == "metaimage":
        head = _metaimage_header(p)[0]
        xyz = (head.get("ElementSpacing") or head.get("ElementSize") or "").split()
        return _um(xyz[::-1], "mm", f"{p} (ElementSpacing)", ", taken as mm: MetaImage records no unit (ITK's "
                                                                 "convention); set voxel_size_um if it is another")
    if part.kind == "nrrd":
        head = _nrrd_header(p)[0]
        if head.get("space directions") is not None:
            dirs = np.asarray([d for d in head["space directions"] if d is not None and not np.all(np.isnan(d))],
                              float)
            xyz = np.linalg.norm(dirs, axis=1)
        else:
            xyz = head.get("spacings", [])
        units = [u for u in (head.get("space units") or head.get("units") or []) if u]
        if units:
            return _um(list(xyz)[::-1], units[0], f"{p} (space directions, {units[0]})")
        return _um(list(xyz)[::-1], "mm", f"{p} (space directions)", ", taken as mm: no space units (Slicer's "
                                                                        "convention); set voxel_size_um if not")
    if part.kind == "nifti":
        import nibabel
        h = nibabel.load(str(p)).header
        unit = h.get_xyzt_units()[0]
        unit = {"micron": "um", "meter": "m"}.get(unit, unit)
        if unit == "unknown":
            return _um(list(h.get_zooms()[:3])[::-1], "mm", f"{p} (pixdim)", ", taken as mm: the header's unit is "
                                                                               "unknown; set voxel_size_um if not")
        return _um(list(h.get_zooms()[:3])[::-1], unit, f"{p} (pixdim, {unit})")
    if part.kind == "hdf5":
        return _h5_spacing(part)
    if part.kind == "dicom":
        return _dicom_spacing([part])
    return None


def _tiff_spacing(p):
    import tifffile
    with tifffile.TiffFile(p) as t:
        ij = t.imagej_metadata or {}
        page = t.pages[0]
        xres, yres = (page.tags.get(k) for k in ("XResolution", "YResolution"))
        if t.is_ome and t.ome_metadata:
            sizes = {a: re.search(rf'PhysicalSize{a}="([0-9.eE+-]+)"', t.ome_metadata) for a in "ZYX"}
            units = {a: re.search(rf'PhysicalSize{a}Unit="([^"]+)"', t.ome_metadata) for a in "ZYX"}
            if sizes["X"] and sizes["Y"]:
                unit = units["X"].group(1) if units["X"] else "µm"
                x, y = float(sizes["X"].group(1)), float(sizes["Y"].group(1))
                z = float(sizes["Z"].group(1)) if sizes["Z"] else x
                return _um([z, y, x], unit, f"{p} (OME PhysicalSize)" + ("" if sizes["Z"] else ", z taken as x"))
        if xres is None or yres is None:
            return None
        x, y = (v.value[1] / v.value[0] if v.value[0] else np.nan for v in (xres, yres))  # a resolution is px/unit
        if ij.get("unit"):
            unit = ij["unit"]
            z = float(ij["spacing"]) if ij.get("spacing") else x
            return _um([z, y, x], unit, f"{p} (ImageJ spacing and resolution, {unit})" +
                       ("" if ij.get("spacing") else ", z taken as x"))
        unit_tag = page.tags.get("ResolutionUnit")
        if unit_tag is not None and int(unit_tag.value) == 3:  # centimetre; an inch is a printer's dpi
            return _um([x, y, x], "cm", f"{p} (TIFF resolution, cm), z taken as x")
    return None


def _h5_spacing(part):
    import h5py
    with h5py.File(part.path, "r") as f:
        ds = h5_scan(f, part.path, part.dataset)
        for obj in (ds, f):
            for key in ("element_size_um", "voxel_size_um", "pixel_size_um"):
                if key in obj.attrs and _zyx(obj.attrs[key]) is not None:
                    return _um(_zyx(obj.attrs[key]), "um", f"{part.path} (attribute {key})")
            for key in ("voxel_size", "pixel_size", "spacing", "resolution"):
                if key in obj.attrs and _zyx(obj.attrs[key]) is not None:
                    unit = obj.attrs.get("unit", obj.attrs.get("units", None))
                    unit = unit.decode() if isinstance(unit, bytes) else unit
                    if unit:
                        return _um(_zyx(obj.attrs[key]), unit, f"{part.path} (attribute {key}, {unit})")
        dx = "/measurement/instrument/detection_system/objective/resolution"  # Data Exchange (beamlines), in µm
        if dx in f:
            return _um([float(np.asarray(f[dx]).ravel()[0])] * 3, "um", f"{part.path} ({dx})")
    return None


def _zyx(value):
    """An attribute's voxel size as (z, y, x): three numbers, two (y, x; z taken as x) or one; else None."""
    try:
        v = np.asarray(value, float).ravel()
    except (TypeError, ValueError):
        return None
    if v.size == 3:
        return v
    if v.size == 2:
        return np.r_[v[1], v]
    return np.repeat(v, 3) if v.size == 1 else None


def _dicom_spacing(parts):
    import pydicom
    heads = [pydicom.dcmread(p.path, stop_before_pixels=True) for p in parts[:2]]
    h = heads[0]
    if getattr(h, "PixelSpacing", None) is None:
        return None
    row, col = (float(v) for v in h.PixelSpacing)
    z, how = None, ""
    if len(heads) == 2 and all(getattr(x, "ImagePositionPatient", None) is not None for x in heads):
        z = float(np.linalg.norm(np.subtract(heads[1].ImagePositionPatient, h.ImagePositionPatient)))
        how = "slice positions"
    for tag in ("SpacingBetweenSlices", "SliceThickness"):
        if not z and getattr(h, tag, None):
            z, how = float(getattr(h, tag)), tag
    return _um([z or col, row, col], "mm", f"{parts[0].path} (DICOM PixelSpacing, {how or 'z taken as x'})")
