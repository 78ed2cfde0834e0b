"""Extraction: every specimen of a predicted label volume found, classed, measured and exported.

Reads `predictions/labels.tif` (and `probs.npy` when there is one) and writes the
catalogue `exports/fossils.csv`, one folder per specimen, the gallery, the specimens'
descriptors for the specimen classifier, and `predictions/labels_clean.tif` /
`specimens.tif`. `exports/review.csv` is never touched.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .decisions import check_review_file
from .exports import GALLERY_RECORD, draw_gallery, export_specimen, mesh
from .io import PREDICTION_RECORD, file_stamp, finish_commit, read_json, staged, write_csv, write_json, write_label_tiff
from .runtime import Progress
from .sparse import fossil_voxels
from .specimens import SPECIMEN_FEATURES, centroid, class_counts, descriptors, find_specimens, paint_classes
from .volume import NO_VOXEL_SIZE, Volume, read_voxel_size

# What an extraction replaces (relative to work_dir): the previous one's files that this one may not write again.
# The review (exports/review.csv) is not in it: decisions follow their specimen to the new catalogue.
PREVIOUS_EXTRACTION = ("exports/fossil_[0-9]*", "exports/gallery*.png", f"exports/{GALLERY_RECORD}", "exports/classifier.json",
                       "exports/truth_features.csv")
MIN_VOXELS = 150  # default smallest specimen, in voxels, chosen on training blocks: see README "Extraction"
CATALOGUE_COLUMNS = ["id", "class", "voxels", "volume_um3", "surface_um2", "esd_um", "sphericity",
                     "z0", "y0", "x0", "z1", "y1", "x1", "centroid_z", "centroid_y", "centroid_x",
                     "mean_intensity", "confidence", "touches_border"]


def read_prediction(pred_dir, shape):
    """The record of the prediction in `pred_dir` (`prediction.json`: its checkpoint and options), checked against the
    volume's `shape`; None for a prediction made before predictions were recorded."""
    rec = read_json(Path(pred_dir) / PREDICTION_RECORD)
    if rec is not None and tuple(rec["shape"]) != tuple(shape):
        raise ValueError(f"{Path(pred_dir) / PREDICTION_RECORD} describes a prediction of shape {rec['shape']}, the "
                         f"volume is {tuple(shape)}: it comes from another dataset. Re-run the prediction cell of 05.")
    return rec


def open_probs(pred_dir, shape, record):
    """`predictions/probs.npy` memory-mapped (shape `shape`: Z, classes, H, W) when `record` (from `read_prediction`)
    says it was written with `labels.tif`; None when there is none. A `probs.npy` that another prediction left, or
    that no record vouches for, is never used: it stops with a message (or, unrecorded, is left aside and said so)."""
    path = Path(pred_dir) / "probs.npy"
    if (record or {}).get("probs_path"):  # kept on the runtime's local disk (Colab), not beside the labels on Drive
        path = Path(record["probs_path"])
        if not path.exists():
            print(f"{path} (the probabilities, kept on the runtime's local disk) is gone with the runtime that wrote "
                  "it: each specimen's class is its majority predicted class. Re-run the prediction cell of 05 on this "
                  "runtime to use the probabilities.")
            return None
    if not path.exists():
        print(f"No {path}: each specimen's class is its majority predicted class and confidence is empty "
              "(run 05 with save_probs=True for the mean class probability).")
        return None
    if record is None:
        print(f"{path} is not used: no {PREDICTION_RECORD} says which model wrote it (a prediction from before they "
              "were recorded). Each specimen's class is its majority predicted class; re-run the prediction cell of "
              "05 to use the probabilities.")
        return None
    if record.get("probs_file") is None or list(record["probs_file"]) != file_stamp(path):
        raise ValueError(f"{path} was not written by the prediction that wrote {Path(pred_dir) / 'labels.tif'} "
                         f"(model {(record.get('checkpoint') or {}).get('name')}): it is left from another run. "
                         "Delete it, or re-run the prediction cell of 05 with save_probs=True.")
    probs = np.load(path, mmap_mode="r")
    if probs.shape != tuple(shape):
        raise ValueError(f"{path} has shape {probs.shape}, expected {tuple(shape)}: re-run the prediction cell of 05.")
    return probs


def _masked_class_sums(probs, box, mask):
    """Sum over the voxels of `mask` (the crop `box` of the volume) of each class's probability (0-255 scale)."""
    z0, y0, x0 = (s.start for s in box)
    dz, dy, dx = mask.shape
    out = np.zeros(probs.shape[1], np.float64)
    step = max(1, 2 ** 26 // (probs.shape[1] * dy * dx))  # at most ~64 MB of probabilities at once
    for a in range(0, dz, step):
        m = mask[a:a + step]
        if m.any():
            p = np.asarray(probs[z0 + a:z0 + a + len(m), :, y0:y0 + dy, x0:x0 + dx])
            out += p.transpose(1, 0, 2, 3)[:, m].sum(1, dtype=np.float64)
    return out


def _features(vol, pred, box, mask, codes):
    """One specimen's descriptors, the fraction of its voxels predicted as each fossil class (`frac_*`) and, when the
    volume has ground truth, the true voxel count of each class under it (`truth_*`)."""
    K = len(codes)
    frac = class_counts(pred, box, mask, K) / max(1, int(mask.sum()))
    out = {**descriptors(np.asarray(vol.images[box]), mask), **{f"frac_{c}": float(frac[k]) for k, c in enumerate(codes) if k}}
    if vol.labels is not None:
        out.update({f"truth_{c}": int(v) for c, v in zip(codes, class_counts(vol.labels, box, mask, K))})
    return out


def _truth_features(vol, pred, connectivity, min_vox, path):
    """Every true specimen (component of the ground-truth fossil mask, `min_vox` voxels or more) in `path`: its z
    range, its descriptors, the predicted class fractions under it and its true class counts."""
    import pandas as pd
    codes = list(vol.codes)
    cc, _, _, parts = find_specimens(fossil_voxels(vol.labels), connectivity, min_vox)
    rows = [{"id": k, "z0": bb[0].start, "z1": bb[0].stop, **_features(vol, pred, bb, cc[bb] == i, codes)}
            for k, (i, bb, _) in enumerate(parts, 1)]
    cols = ["id", "z0", "z1", *SPECIMEN_FEATURES, *[f"frac_{c}" for c in codes[1:]], *[f"truth_{c}" for c in codes]]
    write_csv(path, pd.DataFrame(rows, columns=cols))


def extract_fossils(vol, work_dir, pred=None, voxel_size_um=None, min_voxels=MIN_VOXELS, min_volume_um3=0.0,
                    connectivity=26, split_touching=False, split_min_distance_um=None, margin=8, max_exports=500,
                    slices=None, predictions=None):
    """Find every specimen in the predicted labels, measure it and export it; return the catalogue (a DataFrame).

    A specimen is a 3D connected component of the fossil mask (every class but 0
    together; `connectivity` 26, 18 or 6). Components below `min_voxels` voxels or
    `min_volume_um3` µm³ are dropped; `split_touching` splits touching specimens by a
    watershed on the distance transform, seeds at least `split_min_distance_um` apart.
    Each specimen gets the fossil class with the highest mean predicted probability over
    its voxels (`predictions/probs.npy`; without it, its majority class).

    Writes, in `work_dir`:
    - `predictions/labels_clean.tif` (kept specimens painted with their class) and
      `predictions/specimens.tif` (specimen ids), beside the raw `labels.tif`;
    - `exports/fossils.csv`, one row per specimen (see README), and `exports/extraction.json`;
    - `exports/features.csv`: each specimen's 3D descriptors (`SPECIMEN_FEATURES`) for the
      specimen classifier and, when the volume has masks, the ground-truth voxel count of
      each class under it (`truth_<class>`); with masks also `exports/truth_features.csv`,
      the same for every true specimen (more examples for the classifier);
    - for the `max_exports` largest specimens, `exports/fossil_<id>/` with the CT crop
      (`margin` voxels around) and its mask as multi-page TIFFs (voxel size in the ImageJ
      metadata), an STL mesh in µm and a preview PNG; and `exports/gallery*.png` (`exports.draw_gallery`, which
      the specimen classifier and the review call again when a class or a decision changes).
    `pred` is the label volume from `predict_volume` (default: read `predictions/labels.tif`).
    `predictions` is the folder the prediction is read from (default: `work_dir/predictions`),
    and `slices` (a `slice` of z) extracts from those slices alone, as if the volume were
    only them: the held-out evaluation extracts its block so (`evaluation.evaluate_heldout`).
    `extraction.json` records the checkpoint the prediction came from.
    """
    import pandas as pd
    import tifffile
    from skimage.measure import mesh_surface_area
    t0 = time.time()
    work_dir = Path(work_dir)
    finish_commit(work_dir)  # a prediction or an extraction a kill cut in the middle of its swap
    pred_dir, exp_dir = work_dir / "predictions", work_dir / "exports"
    check_review_file(exp_dir)  # an unreadable review stops now, not after the exports (the gallery reads it)
    src = Path(predictions) if predictions is not None else pred_dir
    if pred is None:
        if not (src / "labels.tif").exists():
            raise FileNotFoundError(f"{src / 'labels.tif'} not found: run the prediction cell of 05 first "
                                    "(same work_dir).")
        pred = tifffile.imread(src / "labels.tif")
    if pred.shape != vol.shape:
        raise ValueError(f"predicted labels in {src} are {pred.shape} but the volume in {vol.source} is "
                         f"{vol.shape}: they come from another dataset; re-run the prediction cell of 05.")
    codes, K = list(vol.codes), len(vol.codes)
    record = read_prediction(src, vol.shape)
    probs = open_probs(src, (vol.shape[0], K, *vol.shape[1:]), record)
    z_offset = 0
    if slices is not None:
        z_offset = slices.start or 0
        vol = Volume(images=vol.images[slices], labels=None if vol.labels is None else vol.labels[slices],
                     codes=codes, stems=vol.stems[slices], source=vol.source, window=vol.window,
                     labelled=None if vol.labelled is None else vol.labelled[slices])
        pred = pred[slices]
        probs = None if probs is None else probs[slices]
    spacing, vs_source = read_voxel_size(vol.source, voxel_size_um, vol.dataset)
    voxel_um3 = float(np.prod(spacing))
    min_vox = max(1, int(min_voxels), math.ceil(float(min_volume_um3 or 0) / voxel_um3))
    exp_dir.mkdir(parents=True, exist_ok=True)
    pred_dir.mkdir(parents=True, exist_ok=True)

    cc, n, n_kept, parts = find_specimens(pred, connectivity, min_vox, split_touching, spacing, split_min_distance_um)
    parts.sort(key=lambda p: (p[1][0].start, p[1][1].start, p[1][2].start, p[0]))
    N = len(parts)
    width = max(4, len(str(N)))
    exported_ids = {k + 1 for k in sorted(range(N), key=lambda k: -parts[k][2])[:max(0, int(max_exports))]}
    # Written to a stage and committed whole (`io.staged`): a kill leaves the previous extraction or this one, never
    # a mix; the previous one's folders, gallery and classifier record go, review.csv stays.
    with staged(work_dir, remove=PREVIOUS_EXTRACTION) as stage:
        s_exp, s_pred = stage / "exports", stage / "predictions"
        s_exp.mkdir()
        s_pred.mkdir()
        Z, H, W = vol.shape
        id_of_label = np.zeros(int(cc.max()) + 1 if cc.size else 1, np.uint32)
        class_of_id = np.zeros(N + 1, np.uint8)
        rows, feats, bar = [], [], Progress(N, "specimens")
        for sid, (lbl, bb, nv) in enumerate(parts, 1):
            local = cc[bb] == lbl
            f = _features(vol, pred, bb, local, codes)
            feats.append({"id": sid, **f})
            if probs is not None:
                mean_p = _masked_class_sums(probs, bb, local) / nv / 255
                cls = 1 + int(np.argmax(mean_p[1:]))
                conf = float(mean_p[cls])
            else:
                cls, conf = 1 + int(np.argmax([f[f"frac_{c}"] for c in codes[1:]])), float("nan")
            off = np.array([s.start for s in bb])
            verts, faces = mesh(local, spacing)
            verts += off * np.asarray(spacing, np.float32)  # volume coordinates: all the STLs load in place together
            area = float(mesh_surface_area(verts.astype(np.float64), faces))
            volume = nv * voxel_um3
            cz, cy, cx = centroid(local) + off
            id_of_label[lbl], class_of_id[sid] = sid, cls
            rows.append({
                "id": sid, "class": codes[cls], "voxels": nv, "volume_um3": volume, "surface_um2": area,
                "esd_um": (6 * volume / math.pi) ** (1 / 3),
                "sphericity": math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area if area > 0 else float("nan"),
                "z0": bb[0].start, "y0": bb[1].start, "x0": bb[2].start, "z1": bb[0].stop, "y1": bb[1].stop, "x1": bb[2].stop,
                "centroid_z": cz, "centroid_y": cy, "centroid_x": cx,
                "mean_intensity": float(vol.images[bb][local].mean()), "confidence": conf,
                "touches_border": bool(bb[0].start == 0 or bb[1].start == 0 or bb[2].start == 0
                                       or bb[0].stop == Z or bb[1].stop == H or bb[2].stop == W),
                **{k: v for k, v in f.items() if k.startswith("frac_")}, "exported": sid in exported_ids,
            })
            if sid in exported_ids:
                export_specimen(s_exp / f"fossil_{sid:0{width}d}", vol.images, cc, lbl, bb, margin, spacing, verts, faces)
            bar.step()
        cat = pd.DataFrame(rows, columns=CATALOGUE_COLUMNS + [f"frac_{c}" for c in codes[1:]] + ["exported"])
        write_csv(s_exp / "fossils.csv", cat)
        truth_cols = [f"truth_{c}" for c in codes] if vol.labels is not None else []
        write_csv(s_exp / "features.csv", pd.DataFrame(feats, columns=["id", *SPECIMEN_FEATURES, *truth_cols]))
        id_dtype = np.uint16 if N < 65535 else np.uint32
        known = spacing if vs_source != NO_VOXEL_SIZE else None  # the label volumes carry a voxel size that is known
        write_label_tiff(s_pred / "specimens.tif", (id_of_label[page].astype(id_dtype) for page in cc), known, len(cc))
        del cc
        paint_classes(s_pred, class_of_id, codes=codes)
        if vol.labels is not None and (vol.labelled is None or np.all(vol.labelled)):  # (sparse: no whole specimen)
            _truth_features(vol, pred, connectivity, min_vox, s_exp / "truth_features.csv")
        pages = list(dict.fromkeys(draw_gallery(work_dir, exp_dir=s_exp)["page"]))  # after the catalogue: they show its classes
        info = {"n_components": int(n), "n_dropped_small": int(n - n_kept), "n_split_parts": N - n_kept if split_touching else 0,
                "n_specimens": N, "n_exported": len(exported_ids), "min_voxels": min_vox,
                "min_voxels_param": int(min_voxels), "min_volume_um3": float(min_volume_um3 or 0),
                "voxel_size_um": spacing, "voxel_size_source": vs_source, "connectivity": connectivity,
                "split_touching": bool(split_touching), "split_min_distance_um": split_min_distance_um, "margin": margin, "max_exports": int(max_exports),
                "class_from": "mean probability" if probs is not None else "majority predicted class",
                "gallery_pages": pages, "seconds": round(time.time() - t0, 1),
                "codes": codes, "shape": list(vol.shape), "z_offset": z_offset,
                "checkpoint": (record or {}).get("checkpoint"), "prediction": str(src),
                "per_class": {c: int((cat["class"] == c).sum()) for c in codes[1:]}}
        write_json(s_exp / "extraction.json", info)
    if N == 0:
        why = "nothing was predicted as a fossil" if n == 0 else f"all {n} components are below {min_vox} voxels"
        print(f"No specimen found: {why}. An empty catalogue was written to {exp_dir / 'fossils.csv'}.")
    else:
        print(f"{N} specimens ({', '.join(f'{v} {k}' for k, v in info['per_class'].items())}) from {n} components "
              f"({n - n_kept} below {min_vox} voxels dropped) in {info['seconds']:.0f}s; voxel size {spacing} µm, "
              f"from {vs_source}.")
        if 0 < len(exported_ids) < N:  # (max_exports=0, as in the held-out evaluation, exports nothing on purpose)
            print(f"Exports and previews capped: the {len(exported_ids)} largest of {N} specimens have a folder in "
                  f"{exp_dir}; the catalogue lists all {N}. Raise max_exports to export more.")
    return cat
