"""Specimens: the 3D connected components of a label volume, and what is measured on each one.

A specimen is a component of the fossil voxels (every class but 0 together), so a specimen
predicted partly as one class and partly as another stays one. Everything here works
inside a specimen's bounding box; the only full-volume array is the component labels.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from .io import label_stack, read_label_pages, replacing, write_label_tiff

NOT_A_FOSSIL = "not a fossil"  # the class of a specimen that the specimen classifier calls no fossil (it is `flagged`)
SPECIMEN_FEATURES = ["log_voxels", "surface_share", "elongation", "flatness", "principal_box_fill", "solidity",
                     "enclosed", "n_peaks", "peaks_per_1000_voxels", "max_thickness", "mean_thickness", "inner_walls",
                     "intensity_p10", "intensity_p50", "intensity_p90", "intensity_std"]

# The descriptors that change when the same shape is drawn larger, in voxels: its size. Specimen sizes differ from
# core to core and between a scan's blocks by chance (a test block's largest ostracod larger than any of the training
# block's), and with the voxel size; the classifier's class among the fossils reads the other descriptors, and only
# whether a specimen is a fossil at all reads these too (`classifier.SpecimenForests`; docs/evaluation.md, "The
# specimen classifier without size").
SIZE_DESCRIPTORS = ("log_voxels", "surface_share", "n_peaks", "peaks_per_1000_voxels")
# The grey levels of a specimen's voxels: its infill's (hollow, sediment, spar: what the core's burial put inside, not
# the animal) and the scanner's. Neither follows the class, so the class among the fossils does not read them either;
# whether a specimen is a fossil at all does (docs/evaluation.md, "The specimen classifier without grey levels").
GREY_DESCRIPTORS = ("intensity_p10", "intensity_p50", "intensity_p90", "intensity_std")

INNER_DEPTH = 2.5  # voxels from a specimen's surface where its interior starts (`descriptors`' inner_walls)
# Descriptors added after model bundles were first written: a bundle's examples measured before one existed are still
# used, on the descriptors they have (`classifier.classify_specimens`); any other missing descriptor is an error.
# principal_box_fill replaced box_fill (the same fill, of a box along the scan's axes: it changed with the specimen's
# pose); an older example's box_fill is not read.
LATER_DESCRIPTORS = ("inner_walls", "principal_box_fill")


def label_components(mask, connectivity=26):
    """3D components of boolean `mask`: `(labels, n, voxel counts, bounding boxes)`, index = component label."""
    import cc3d
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, not {connectivity!r}")
    cc, n = cc3d.connected_components(mask, connectivity=connectivity, binary_image=True, return_N=True)
    if not n:
        return cc, 0, np.zeros(1, np.int64), [None]
    stats = cc3d.statistics(cc)
    return cc, n, np.asarray(stats["voxel_counts"], np.int64), stats["bounding_boxes"]


def find_specimens(mask, connectivity=26, min_voxels=1, split_touching=False, spacing=(1.0, 1.0, 1.0),
                   split_min_distance_um=None):
    """Components of `mask` with at least `min_voxels` voxels, optionally split by a watershed.

    Returns `(cc, n, n_kept, parts)`: the component labels (split parts relabelled in place),
    the number of components, how many were big enough, and one `(label in cc, bounding box,
    voxel count)` per specimen. `split_touching` splits each component on the distance
    transform, seeds at least `split_min_distance_um` apart (default: 10 voxels).
    """
    cc, n, counts, boxes = label_components(mask, connectivity)
    kept = [i for i in range(1, n + 1) if counts[i] >= min_voxels]
    if not (split_touching and kept):
        return cc, n, len(kept), [(i, boxes[i], int(counts[i])) for i in kept]
    if cc.dtype == np.uint16:
        cc = cc.astype(np.uint32)  # room for the labels of new parts
    md = split_min_distance_um if split_min_distance_um is not None else 10 * min(spacing)
    parts, nxt = [], n + 1
    for i in kept:
        bb = boxes[i]
        sub = _split_touching(cc[bb] == i, spacing, md) if counts[i] >= 2 * min_voxels else None
        if sub is None or sub.max() < 2:
            parts.append((i, bb, int(counts[i])))
            continue
        view = cc[bb]
        for j in range(1, int(sub.max()) + 1):
            m = sub == j
            if not m.any():
                continue
            lbl = i if j == 1 else nxt
            if j > 1:
                view[m] = lbl
                nxt += 1
            nz = [np.flatnonzero(m.any(tuple(a for a in range(3) if a != ax))) for ax in range(3)]
            parts.append((lbl, tuple(slice(s.start + a[0], s.start + a[-1] + 1) for s, a in zip(bb, nz)), int(m.sum())))
    return cc, n, len(kept), [p for p in parts if p[2] >= min_voxels]


def _split_touching(mask, spacing, min_distance_um):
    """Watershed on the distance transform of `mask`: int labels 1..n of the parts (n = 1 when nothing to split)."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed
    dist = ndimage.distance_transform_edt(mask, sampling=spacing)
    md = max(1, int(round(min_distance_um / min(spacing))))
    peaks = peak_local_max(dist, min_distance=md, labels=mask.astype(np.uint8), exclude_border=False)
    if len(peaks) < 2:
        return mask.astype(np.int32)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=mask)


def majority_class(cc, labels, n_components, n_classes):
    """Majority fossil class (never 0) in `labels` of each component of `cc` (index = component label)."""
    m = cc > 0
    table = np.bincount(cc[m].astype(np.int64) * n_classes + labels[m],
                        minlength=(n_components + 1) * n_classes).reshape(-1, n_classes)
    table[:, 0] = 0
    return table.argmax(1)


def class_counts(labels, box, mask, n_classes):
    """Voxel count of each class of `labels` under `mask`, the specimen in its bounding `box`."""
    return np.bincount(np.asarray(labels[box])[mask], minlength=n_classes)[:n_classes]


def centroid(mask):
    """Centroid (z, y, x) of boolean `mask`, from its projections (no coordinate list of every voxel)."""
    n = max(1, int(mask.sum()))
    return np.array([(mask.sum(tuple(j for j in range(3) if j != i)) * np.arange(mask.shape[i])).sum() / n
                     for i in range(3)])


def descriptors(ct, mask):
    """3D shape and intensity descriptors of one specimen, in voxel units (names: `SPECIMEN_FEATURES`).

    `mask` is the specimen in its bounding box, `ct` the CT crop of the same box.
    surface_share: share of its voxels on its surface; elongation / flatness: square roots of
    the ratios of the principal second moments (2nd/1st, 3rd/2nd); principal_box_fill: share
    of its box along its principal axes that it fills (the same whichever way the specimen lies in
    the core, where a box along the scan's axes is not; where two principal moments are equal the
    axes in their plane are arbitrary, so a shape not round in that plane can still give other
    fills); solidity: volume over convex-hull volume; enclosed: share of the filled-in shape that
    is an inner cavity; n_peaks: local maxima of the distance to the surface, a proxy for chambers;
    thickness: the largest and mean distance to the surface (relative to the size); inner_walls:
    share of the interior (`INNER_DEPTH` voxels or more from the surface) as bright as the
    specimen's brightest quarter (and above its median): walls inside the envelope, such as a
    foraminifer's septa between chambers, where an ostracod's carapace is a shell around a hollow
    or sediment-filled inside; intensity percentiles.
    """
    from scipy import ndimage
    from scipy.spatial import ConvexHull
    from skimage.feature import peak_local_max
    nv = int(mask.sum())
    pts = np.argwhere(mask).astype(np.float64)
    c = pts - pts.mean(0)
    ev, axes = np.linalg.eigh(c.T @ c / nv)
    ev = ev[::-1] + 1 / 12  # largest first; + a voxel's own moment: no zero for flat shapes
    along = c @ axes  # each voxel's coordinates along the principal axes
    principal_box = np.prod(along.max(0) - along.min(0) + 1)  # + 1: a voxel's own width
    surface = np.argwhere(mask & ~ndimage.binary_erosion(mask))
    corners = (surface[:, None, :] + np.array(list(itertools.product((-0.5, 0.5), repeat=3)))[None]).reshape(-1, 3)
    try:
        hull = ConvexHull(np.unique(corners, axis=0)).volume
    except Exception:  # a flat or tiny specimen has no 3D hull
        hull = nv
    filled = int(ndimage.binary_fill_holes(mask).sum())
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    peaks = peak_local_max(dist, min_distance=2, threshold_abs=1.5, labels=mask.astype(np.uint8), exclude_border=False)
    vals = ct[mask].astype(np.float64)
    p10, p50, p75, p90 = np.percentile(vals, [10, 50, 75, 90])
    inner = ct[dist >= INNER_DEPTH]  # the distance is 0 outside the mask
    size = nv ** (1 / 3)
    return {"log_voxels": math.log10(nv), "surface_share": len(surface) / nv,
            "elongation": math.sqrt(ev[1] / ev[0]), "flatness": math.sqrt(ev[2] / ev[1]),
            "principal_box_fill": min(1.0, nv / principal_box), "solidity": min(1.0, nv / max(hull, 1e-9)),
            "enclosed": 1 - nv / filled,
            "n_peaks": len(peaks), "peaks_per_1000_voxels": 1000 * len(peaks) / nv,
            "max_thickness": float(dist.max()) / size, "mean_thickness": float(dist[mask].mean()) / size,
            "inner_walls": float(((inner >= p75) & (inner > p50)).mean()) if inner.size else 0.0,
            "intensity_p10": p10, "intensity_p50": p50, "intensity_p90": p90, "intensity_std": float(vals.std())}


def paint_classes(pred_dir, class_of_id, out_dir=None, codes=None):
    """Write `labels_clean.tif` in `out_dir` (default `pred_dir`): each specimen of `pred_dir/specimens.tif` painted
    with `class_of_id[its id]`, at the voxel size `specimens.tif` carries; given the class names `codes`, also
    `segmentation.seg.nrrd` (`write_segmentation`).

    `class_of_id` is a lookup table (uint8 array, index = specimen id, 0 = background);
    the volume is read and written one page at a time.
    """
    lut = np.asarray(class_of_id, np.uint8)
    out_dir = Path(out_dir) if out_dir is not None else Path(pred_dir)
    ids = Path(pred_dir) / "specimens.tif"
    shape, spacing = label_stack(ids)
    write_label_tiff(out_dir / "labels_clean.tif", (lut[page] for page in read_label_pages(ids)), spacing, shape[0])
    if codes is not None:
        write_segmentation(out_dir / SEGMENTATION, read_label_pages(ids), shape, lut, codes, spacing)


SEGMENTATION = "segmentation.seg.nrrd"


def write_segmentation(path, id_pages, shape, class_of_id, codes, spacing=None):
    """Write the specimens of `id_pages` (specimen ids, `shape` (Z, Y, X)) as one 3D Slicer segmentation, `path`
    (`.seg.nrrd`): a segment per specimen whose class (`codes[class_of_id[id]]`) is not 0, named `fossil_<id>
    <class>` in its class's colour, at `spacing` (µm; written in mm, Slicer's unit). Fiji opens it (File > Import >
    NRRD) and napari through pynrrd. NRRD rather than OME-Zarr: one file, which Slicer opens as a segmentation with
    its names and colours and which travels as one file to Drive and by mail; a header in text followed by the gzip
    stream of the pages, written here a page at a time (a volume is never held whole)."""
    import gzip

    from .plots import get_class_colours
    lut = np.asarray(class_of_id)
    kept = np.flatnonzero(lut[1:]) + 1
    dtype = np.uint16 if len(lut) <= 65536 else np.uint32
    colours = get_class_colours(len(codes))
    width = max(4, len(str(len(lut) - 1)))
    mm = [s / 1000 for s in (spacing or (1000.0, 1000.0, 1000.0))][::-1]  # x y z
    head = ["NRRD0004", f"type: {np.dtype(dtype).name}", "dimension: 3", "space: left-posterior-superior",
            f"sizes: {shape[2]} {shape[1]} {shape[0]}",
            f"space directions: ({mm[0]},0,0) (0,{mm[1]},0) (0,0,{mm[2]})", "kinds: domain domain domain",
            "endian: little", "encoding: gzip", "space origin: (0,0,0)",
            "Segmentation_MasterRepresentation:=Binary labelmap",
            "Segmentation_ContainedRepresentationNames:=Binary labelmap|", "Segmentation_ReferenceImageExtentOffset:=0 0 0"]
    if spacing is not None:
        head.insert(6, 'space units: "mm" "mm" "mm"')
    for k, sid in enumerate(kept):
        r, g, b = colours[lut[sid]][:3]
        head += [f"Segment{k}_ID:=fossil_{sid:0{width}d}", f"Segment{k}_Name:=fossil_{sid:0{width}d} {codes[lut[sid]]}",
                 f"Segment{k}_Color:={r:.4f} {g:.4f} {b:.4f}", f"Segment{k}_LabelValue:={sid}", f"Segment{k}_Layer:=0",
                 f"Segment{k}_Tags:=Class:{codes[lut[sid]]}|"]
    keep = np.zeros(len(lut), dtype)
    keep[kept] = kept
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(("\n".join(head) + "\n\n").encode())
        with gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=1) as gz:
            for page in id_pages:
                gz.write(np.ascontiguousarray(keep[page], dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
