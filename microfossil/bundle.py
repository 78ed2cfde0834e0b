"""The model bundle: a trained model that travels to the next core, with its specimen classifier's examples.

A bundle is one small folder (`<run>/bundle/` after 04; copy it, zip it, share it on Drive,
cite it) holding:
- `model.pth`: the segmentation weights (no optimizer state);
- `bundle.json`: what they expect and where they come from: the classes, `context_slices`, the fossil
  threshold 05 chose on the training and validation blocks (`prediction.voxel_labels`),
  the training size, the encoder, tri-planar or not, the intensity policy and the training
  volume's intensity histogram (after windowing), the project version, the checkpoint and its
  SHA-256, the volume it learnt from (`trained_on`: its folder, shape and a hash of sampled bytes, so
  that 05 knows it again, and its training, validation and test slices), and the bundle's
  `version` (raised each time its classifier examples change);
- `classifier_examples.csv`: the specimen classifier's examples, one row per specimen: its 3D
  descriptors, its `label`, its `source` (training-block ground truth, a
  true specimen, a review; never a review of a test-block specimen) and its `origin` (the run it came from). The forest is retrained
  from them where the bundle is used (no pickled model: it loads under any scikit-learn).

05 with `model_path` (a bundle folder, a training run folder, or a link to a zipped bundle)
predicts a new scan with it (showing the model the scan's grey levels mapped onto the training
volume's histogram, `matched_volume`) and classifies its specimens with the bundle's examples plus the
new run's reviews; `update_bundle` then writes the new run's own bundle version (never the
source's). Needs no torch.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np

from .io import PREDICTION_RECORD, link_or_copy, read_json, replacing, write_json
from .paths import data_home, fetch_dataset
from .runtime import matches
from .volume import DatasetError, evenly_spaced, volume_fingerprint

BUNDLE_DIR, BUNDLE_FILE = "bundle", "bundle.json"
WEIGHTS, EXAMPLES = "model.pth", "classifier_examples.csv"
INTENSITY_POLICY = ("8-bit slices as they are; 16-bit and float slices mapped to 8 bit with the 0.1-99.9 percentile "
                    "window of their own volume (finite voxels), so each scan is windowed the same way")
SHIFT_WARNING = 12.0  # grey levels of earth mover's distance between two scans' histograms that make a warning


def intensity_histogram(vol, bins=64, n_slices=32):
    """The share of voxels in each of `bins` grey-level bins of `vol.images` (after windowing), from about
    `n_slices` slices spread over z, every 4th pixel."""
    counts = sum(np.bincount(np.asarray(vol.images[z])[::4, ::4].ravel() // (256 // bins), minlength=bins)
                 for z in evenly_spaced(len(vol.images), n_slices))
    return (counts / counts.sum()).round(6).tolist()


def histogram_shift(a, b):
    """Earth mover's distance between two histograms of `intensity_histogram`, in grey levels (0-255)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.abs(np.cumsum(a) - np.cumsum(b)).sum() * 256 / len(a))


def write_bundle(work_dir, weights, record, vol, split=None, dest=None):
    """Write the bundle of the finished phase with `weights` and `record` (its training record, flat) into
    `dest` (default `work_dir/bundle`), from the training volume `vol`; keep the classifier examples of a bundle
    already there when its weights are the same. Returns the bundle folder."""
    from microfossil import __version__
    dest = Path(dest) if dest is not None else Path(work_dir) / BUNDLE_DIR
    old = read_json(dest / BUNDLE_FILE) or {}
    same = old.get("checkpoint", {}).get("sha256") == record["checkpoint"]["sha256"]
    dest.mkdir(parents=True, exist_ok=True)
    sha = record["checkpoint"]["sha256"]
    if not (same and matches(dest / WEIGHTS, Path(weights).stat().st_size, sha)):  # re-run 04 on Drive: no new copy
        with replacing(dest / WEIGHTS) as tmp:  # of 165 MB, and none in Drive's bin, unless the weights changed
            link_or_copy(weights, tmp)  # weights files are replaced, never changed in place: a hard link is safe
    if not same:
        (dest / EXAMPLES).unlink(missing_ok=True)
    info = {"format": 1, "name": old.get("name") if same else f"{Path(work_dir).resolve().name}",
            "version": old.get("version", 1) if same else 1, "project_version": __version__,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "checkpoint": record["checkpoint"],
            "classes": list(record["codes"]), "context_slices": int(record.get("context_slices", 1)),
            "size": list(record["size"]), "arch": record["arch"], "triplanar": bool(record.get("triplanar", False)),
            "intensity": {"policy": INTENSITY_POLICY, "raw_dtype": vol.raw_dtype, "window": list(vol.window),
                          "histogram": intensity_histogram(vol)},
            "trained_on": {**volume_fingerprint(vol), "train_slices": record.get("train_slices"),
                           "valid_slices": record.get("valid_slices"), "test_slices": record.get("test_slices")},
            "final": record.get("final", {}),
            "classifier": old.get("classifier") if same else None}
    if same and "fossil_threshold" in old:
        info["fossil_threshold"] = old["fossil_threshold"]
    write_json(dest / BUNDLE_FILE, info)
    return dest


def read_bundle(folder):
    """The `bundle.json` of bundle `folder`, with `folder` and `weights` (paths) added; a clear error when it is not
    a bundle or its weights are missing."""
    folder = Path(folder)
    info = read_json(folder / BUNDLE_FILE)
    if info is None:
        raise DatasetError(f"{folder} is not a model bundle (no {BUNDLE_FILE}): point model_path at a bundle folder, "
                           "a training run folder, or a link to a zipped bundle.")
    if not (folder / WEIGHTS).exists():
        raise DatasetError(f"{folder / WEIGHTS} is missing: copy the whole bundle folder ({BUNDLE_FILE}, {WEIGHTS}, "
                           f"{EXAMPLES}).")
    return {**info, "folder": str(folder), "weights": str(folder / WEIGHTS)}


def resolve_model(model_path, model_name="full_unfrozen"):
    """What `model_path` names: `("bundle", folder)` for a bundle (a folder holding `bundle.json`, a training run's
    `bundle/`, or a Google Drive/HTTP link to a zipped bundle, downloaded once into `data/downloads/`), or
    `("run", folder)` for a training run folder without a bundle (its `models/<model_name>`)."""
    text = str(model_path)
    if re.match(r"^[a-z]+://", text) or (not Path(text).expanduser().exists() and re.fullmatch(r"[\w-]{20,}", text)):
        dest = data_home() / "downloads" / f"model_{hashlib.sha1(text.encode()).hexdigest()[:10]}"
        return "bundle", fetch_dataset(text, dest, holds=BUNDLE_FILE, what="model bundle")
    path = Path(text).expanduser()
    for folder in (path, path / BUNDLE_DIR):
        if (folder / BUNDLE_FILE).exists():
            return "bundle", folder
    if (path / "models" / f"{model_name.split('.attempt')[0]}.json").exists():
        return "run", path
    raise DatasetError(f"model_path={model_path!r} is neither a model bundle (a folder with {BUNDLE_FILE}) nor a "
                       f"training run folder with models/{model_name}.pth: point it at one (or at a link to a zipped "
                       "bundle).")


def check_intensity(vol, info):
    """Warn when the histogram of `vol` (after windowing) is far from the training volume's in bundle `info`: another
    scanner, energy or reconstruction, a domain shift the model may not carry over. Returns the distance."""
    ref = (info.get("intensity") or {}).get("histogram")
    if not ref:
        return None
    shift = histogram_shift(ref, intensity_histogram(vol, bins=len(ref)))
    raw = (info.get("intensity") or {}).get("raw_dtype")
    if raw and raw != vol.raw_dtype:
        print(f"Warning: this scan is {vol.raw_dtype}, the model's training volume was {raw}.")
    if shift > SHIFT_WARNING:
        print(f"Warning: this scan's intensities differ from the training volume's by {shift:.0f} grey levels (earth "
              f"mover's distance after windowing; above {SHIFT_WARNING:.0f} is unusual for the same scanner and "
              "settings). Another scanner, energy or reconstruction can make the model miss or mislabel fossils: "
              "check the predictions figure, and review more specimens.")
    else:
        print(f"Intensities: {shift:.0f} grey levels from the training volume's (earth mover's distance after "
              "windowing): close.")
    return shift


def intensity_lut(hist, ref):
    """The grey-level table (256 uint8 values) that gives a scan whose histogram is `hist` the histogram `ref` (both
    as `intensity_histogram` gives them, any number of bins): each grey level goes to the level at the same quantile
    of `ref` (histogram matching; the middle of its own bin's quantiles, and linear within a bin of `ref`)."""
    hist, ref = np.asarray(hist, float), np.asarray(ref, float)
    hist = np.repeat(hist / hist.sum() / (256 // len(hist)), 256 // len(hist))  # per grey level, spread over its bin
    cdf = np.cumsum(hist)
    middle = cdf - hist / 2
    ref_cdf = np.concatenate([[0.0], np.cumsum(ref / ref.sum())])
    ref_levels = np.linspace(0, 256, len(ref) + 1)
    keep = np.concatenate([[True], np.diff(ref_cdf) > 0])  # empty bins of `ref`: no level maps into them
    levels = np.interp(middle, ref_cdf[keep], ref_levels[keep]) - 0.5
    return np.clip(np.round(levels), 0, 255).astype(np.uint8)


def matched_volume(vol, info, cache_dir=None, chunk=16):
    """`vol` with its grey levels mapped onto those of the training volume of bundle `info` (`intensity_lut` on the
    two `intensity_histogram`s), for the model's input: a scan from another scanner, energy or reconstruction then
    shows the model the contrast it learnt from. The same `vol` when `info` is None (this run's own model), has no
    histogram (an older bundle), or when `vol` is the model's own training scan. The scan's files are never changed:
    the mapped slices are a new array, or with `cache_dir` a `.npy` file there (reused when the cell runs again; a
    volume larger than RAM is mapped `chunk` slices at a time)."""
    import dataclasses
    from .volume import same_scan
    ref = ((info or {}).get("intensity") or {}).get("histogram")
    if not ref:
        if info is not None:
            print("The model bundle records no intensity histogram (an older bundle): the model is shown the scan "
                  "as windowed.")
        return vol
    if same_scan(vol, info.get("trained_on")):
        return vol
    hist = intensity_histogram(vol, bins=256)
    lut = intensity_lut(hist, ref)
    mapped = np.bincount(lut, weights=hist, minlength=256)  # the histogram the model will see, from the same sample
    before, after = (histogram_shift(ref, h.reshape(len(ref), -1).sum(1)) for h in (np.asarray(hist), mapped))
    if cache_dir is None:
        images = lut[np.asarray(vol.images)]
    else:
        scan = {k: v for k, v in volume_fingerprint(vol).items() if k != "dataset"}  # the scan, wherever it lies
        key = hashlib.sha256(lut.tobytes() + json.dumps(scan).encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"matched_{key}.npy"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with replacing(path) as tmp:
                out = np.lib.format.open_memmap(tmp, "w+", np.uint8, tuple(vol.shape))
                for z in range(0, len(vol.images), chunk):
                    out[z:z + chunk] = lut[np.asarray(vol.images[z:z + chunk])]
                out.flush()
                del out
        images = np.load(path, mmap_mode="r")
    print(f"Grey levels mapped onto the training volume's for the model (histogram matching): {before:.0f} -> "
          f"{after:.0f} grey levels from its histogram. The exports and measurements keep the scan's own grey levels.")
    return dataclasses.replace(vol, images=images)


def bundle_examples(info):
    """The classifier examples of bundle `info` (`read_bundle`) as a DataFrame, named in `attrs["source"]` (empty
    when it has none); None when `info` is None (a model of this run)."""
    import pandas as pd
    if info is None:
        return None
    path = Path(info["folder"]) / EXAMPLES
    examples = pd.read_csv(path) if path.exists() else pd.DataFrame()
    examples.attrs["source"] = f"bundle {info.get('name')} v{info.get('version')}"
    return examples


def run_bundle(work_dir):
    """The bundle the prediction in `work_dir` was made with (05's `model_path`), from its record; None when it was
    made with this run's own model."""
    source = ((read_json(Path(work_dir) / "predictions" / PREDICTION_RECORD) or {}).get("checkpoint") or {}).get("source")
    return read_bundle(source) if source else None


def update_bundle(work_dir, source=None):
    """After the specimen classifier ran in `work_dir` (its examples in `exports/classifier_examples.csv`): write them
    into the run's own bundle `work_dir/bundle`, in place of the examples this run gave before, and raise its version
    when they changed. A run that predicted with another run's bundle (`source`, from `read_bundle`) gets its own
    bundle: the source's weights and examples plus this run's, one version up; the source is never written to.
    Returns the bundle's `bundle.json`, or None when there is nothing to write."""
    import pandas as pd
    work_dir = Path(work_dir)
    mine_path = work_dir / "exports" / EXAMPLES
    dest = work_dir / BUNDLE_DIR
    if not mine_path.exists() or (source is None and not (dest / BUNDLE_FILE).exists()):
        return None
    mine = pd.read_csv(mine_path)
    if not len(mine):  # this run adds no example (no ground truth in its training block, no review yet)
        return None
    base = read_bundle(source["folder"]) if source is not None and not (dest / BUNDLE_FILE).exists() else read_bundle(dest)
    if base["folder"] != str(dest):  # a new bundle for this run, from the source's
        dest.mkdir(parents=True, exist_ok=True)
        with replacing(dest / WEIGHTS) as tmp:
            link_or_copy(base["weights"], tmp)
    old = bundle_examples(base)
    kept = old[old["origin"] != mine["origin"].iloc[0]] if len(old) else old
    examples = pd.concat([kept, mine], ignore_index=True)
    changed = base["folder"] != str(dest) or not _same_rows(examples, bundle_examples(read_bundle(dest)))
    info = {k: v for k, v in base.items() if k not in ("folder", "weights")}
    record = read_json(work_dir / "predictions" / PREDICTION_RECORD) or {}
    if (source is None and record.get("fossil_threshold_chosen_on")
            and (record.get("checkpoint") or {}).get("sha256") == (info.get("checkpoint") or {}).get("sha256")
            and info.get("fossil_threshold") != record["fossil_threshold"]):  # chosen on this model's training run's slices
        info["fossil_threshold"] = record["fossil_threshold"]
        write_json(dest / BUNDLE_FILE, info)
    if changed:
        with replacing(dest / EXAMPLES) as tmp:
            examples.to_csv(tmp, index=False, float_format="%.6g")
        info.update(version=int(base.get("version", 1)) + 1, updated=time.strftime("%Y-%m-%d %H:%M:%S"),
                    name=info.get("name") if base["folder"] == str(dest) else f"{info.get('name')}+{work_dir.name}",
                    based_on=info.get("based_on") if base["folder"] == str(dest) else
                    {"name": base.get("name"), "version": base.get("version"), "folder": base["folder"]},
                    classifier={"examples": len(examples),
                                "labels": {str(k): int(v) for k, v in examples["label"].value_counts().items()},
                                "origins": sorted(map(str, examples["origin"].unique()))})
        write_json(dest / BUNDLE_FILE, info)
        print(f"Model bundle {dest}: version {info['version']}, {len(examples)} classifier examples "
              f"({', '.join(f'{v} {k}' for k, v in info['classifier']['labels'].items())}).")
    return info


def _same_rows(a, b):
    return len(a) == len(b) and (len(a) == 0 or json.dumps(a.astype(str).values.tolist()) ==
                                  json.dumps(b.reindex(columns=a.columns).astype(str).values.tolist()))
