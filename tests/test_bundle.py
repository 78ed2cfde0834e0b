"""The model bundle: a model trained on one core predicts the next one, its specimen classifier travelling with it."""
import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import papermill as pm
import pytest
import torch

from conftest import ROOT
from microfossil.bundle import (BUNDLE_FILE, EXAMPLES, bundle_examples, check_intensity, histogram_shift,
                                intensity_histogram, intensity_lut, matched_volume, read_bundle, resolve_model,
                                update_bundle)
from microfossil.classifier import classify_specimens
from microfossil.extraction import extract_fossils
from microfossil.learner import build_learner
from microfossil.loaders import make_dls
from microfossil.prediction import FOSSIL_THRESHOLDS, load_model, predict_volume
from microfossil.sample import make_sample
from microfossil.split import split_volume
from microfossil.training import PhaseCheckpoint, save_bundle
from microfossil.volume import DatasetError, load_volume, volume_fingerprint


def _hashes(folder):
    """Every file under `folder` with its SHA-1 and mtime: to prove a folder was only read."""
    return {str(p.relative_to(folder)): (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A training run on one synthetic core: a 1-epoch model, its bundle, and the classifier examples of its training
    block (from an extraction of the ground truth, so that there are true specimens to learn from)."""
    root = tmp_path_factory.mktemp("bundle")
    ds = make_sample(root / "core_a", n_slices=24, height=96, width=96, seed=3)
    vol = load_volume(ds)
    work = root / "run_a"
    split = split_volume(vol, 0.2, 0.0, gap_slices=0)  # the published recipe's blocks: more training slices here
    learn = build_learner(make_dls(vol, 1.0, 4, split, device=torch.device("cpu"), context_slices=3), pretrained=False,
                          work_dir=work)
    # One epoch learns nothing; the last layer leans to a fossil class so that the new core has specimens for the
    # bundle's classifier to class (this checks where things land and who classed them, not accuracy).
    last = [m for m in learn.model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.bias[1] += 4.0
    learn.fit_one_cycle(1, 1e-6, cbs=PhaseCheckpoint("full_unfrozen"))
    save_bundle(work, "full_unfrozen", vol)
    extract_fossils(vol, work, np.asarray(vol.labels), min_voxels=20)
    split = learn.dls.split
    model, _ = load_model(work, "full_unfrozen", torch.device("cpu"))  # 05's prediction: its fossil threshold is
    predict_volume(model, vol, work / "predictions", 4, torch.device("cpu"), context_slices=3,  # chosen on the
                   checkpoint=read_bundle(work / "bundle")["checkpoint"], calibrate_on=split.train)  # training block
    classify_specimens(work, split)
    update_bundle(work)
    return root, work, vol


def test_the_bundle_holds_the_model_what_it_expects_and_the_classifier_examples(trained):
    _, work, vol = trained
    info = read_bundle(work / "bundle")
    assert info["classes"] == vol.codes and info["context_slices"] == 3 and info["size"] == [96, 96]
    assert info["intensity"]["raw_dtype"] == vol.raw_dtype and len(info["intensity"]["histogram"]) == 64
    assert info["project_version"] and info["checkpoint"]["sha256"] and info["version"] == 2  # 04's, then 05's examples
    ex = bundle_examples(info)
    assert len(ex) >= 4 and {"label", "source", "origin"} <= set(ex.columns) and ex["origin"].eq("run_a").all()
    assert set(ex["label"]) >= {"foraminifera", "ostracod"}
    assert update_bundle(work)["version"] == 2  # the same examples again: no new version
    chosen = json.loads((work / "predictions" / "prediction.json").read_text())
    assert chosen["fossil_threshold_chosen_on"] and info["fossil_threshold"] == chosen["fossil_threshold"]
    assert info["fossil_threshold"] in FOSSIL_THRESHOLDS  # the threshold 05 chose travels with the model
    assert resolve_model(work) == ("bundle", work / "bundle") == resolve_model(work / "bundle")
    split = split_volume(vol, 0.2, 0.0, gap_slices=0)  # the scan it learnt from, known again by its fingerprint, its blocks
    assert info["trained_on"] == {**volume_fingerprint(vol), **split.plan()}


def test_saving_the_bundle_again_copies_the_weights_only_when_they_changed(trained, monkeypatch):
    """Re-running 04 on Drive saves the bundle again: the same weights (same SHA-256 as the bundle's copy) are not
    copied again (165 MB on Drive, and the replaced copy in its bin); the bundle keeps its version and examples."""
    import microfossil.bundle as bundle
    _, work, vol = trained
    copies = []
    monkeypatch.setattr(bundle, "link_or_copy", lambda src, dst: copies.append(src) or shutil.copy2(src, dst))
    before = read_bundle(work / "bundle")
    save_bundle(work, "full_unfrozen", vol)
    after = read_bundle(work / "bundle")
    assert copies == [] and after["version"] == before["version"] and after["classifier"] == before["classifier"]
    weights = work / "bundle" / bundle.WEIGHTS
    cut = weights.read_bytes()[:-1]
    weights.unlink()  # (a hard link to the run's checkpoint on a local disk: not written through)
    weights.write_bytes(cut)  # a copy cut short: copied again
    save_bundle(work, "full_unfrozen", vol)
    assert len(copies) == 1 and hashlib.sha256(weights.read_bytes()).hexdigest() == after["checkpoint"]["sha256"]


def test_05_on_the_models_own_training_scan_scores_its_test_block_only(trained):
    """model_path = the bundle, data_dir = the very scan it was trained on, ground truth and all, with other split
    parameters: 05 knows the scan again and scores only the test block the bundle recorded, never the slices the model
    trained or was validated on."""
    root, work, vol = trained
    out = root / "run_self"
    pm.execute_notebook(str(ROOT / "notebooks" / "05_predict_export.ipynb"), str(root / "05_self.ipynb"),
                        cwd=str(ROOT / "notebooks"), kernel_name="python3", progress_bar=False,
                        parameters={"data_dir": str(vol.source), "work_dir": str(out), "model_path": str(work / "bundle"),
                                    "smoke": True, "min_voxels": 1, "test_pct": 0.5, "valid_pct": 0.1})
    recorded = read_bundle(work / "bundle")["trained_on"]
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_slices"] == recorded["test_slices"] and m["n_test_slices"] == 5
    split = m["provenance"]["split"]
    assert split["train_slices"] == recorded["train_slices"] and "own training scan" in split["gap_rule"]
    assert m["specimens"]["test_slices"] == recorded["test_slices"]
    rows = json.loads((out / "evaluation.json").read_text())["rows"]
    assert all(r["provenance"]["split"]["test_slices"] == recorded["test_slices"] for r in rows)
    assert "Grey levels mapped" not in json.dumps(json.loads((root / "05_self.ipynb").read_text())["cells"])


def test_05_predicts_a_new_unlabelled_core_with_the_bundle_and_leaves_the_training_run_untouched(trained):
    """Through papermill, as a lab would run it: model_path = the training run folder, data_dir = a new scan without
    masks or codes.txt, work_dir = a new folder. Everything lands there; the training run is byte-for-byte the same;
    the specimens are classified by the bundle's classifier, and the new run's bundle is a new version."""
    root, work, _ = trained
    new = make_sample(root / "core_b", n_slices=20, height=96, width=96, seed=8)
    shutil.rmtree(new / "train_masks_labels")
    (new / "codes.txt").unlink()
    before = _hashes(work)
    out = root / "run_b"
    pm.execute_notebook(str(ROOT / "notebooks" / "05_predict_export.ipynb"), str(root / "05_b.ipynb"),
                        cwd=str(ROOT / "notebooks"), kernel_name="python3", progress_bar=False,
                        parameters={"data_dir": str(new), "work_dir": str(out), "model_path": str(work),
                                    "smoke": True, "min_voxels": 1})  # 1: the 1-epoch model's specks are specimens
    assert _hashes(work) == before
    for f in ("predictions/labels.tif", "predictions/labels_clean.tif", "exports/fossils.csv", "exports/gallery.png"):
        assert (out / f).exists(), f
    cat = pd.read_csv(out / "exports" / "fossils.csv")
    assert len(cat) and cat["classified_by"].str.startswith("bundle run_a v2").all()
    clf = json.loads((out / "exports" / "classifier.json").read_text())
    assert clf["from_bundle"] == len(bundle_examples(read_bundle(work / "bundle"))) and clf["from_truth"] == 0
    record = json.loads((out / "predictions" / "prediction.json").read_text())
    assert record["checkpoint"]["bundle"] == "run_a v2" and record["checkpoint"]["source"] == str(work / "bundle")
    bundle = read_bundle(work / "bundle")  # the new core has no masks: the threshold is the training run's
    assert record["fossil_threshold"] == bundle["fossil_threshold"] and record["fossil_threshold_chosen_on"] is None
    outputs = json.dumps(json.loads((root / "05_b.ipynb").read_text())["cells"])
    assert "Grey levels mapped onto the training volume's" in outputs  # another scan: matched for the model
    assert list((out / "cache").glob("matched_*.npy"))


def test_reviews_of_the_new_core_make_a_new_bundle_version_with_its_examples(trained, tmp_path):
    root, work, _ = trained
    src = read_bundle(work / "bundle")
    run = tmp_path / "run_c"
    (run / "exports").mkdir(parents=True)
    mine = bundle_examples(src).head(3).assign(origin="run_c", source="review")
    mine.to_csv(run / "exports" / EXAMPLES, index=False)
    info = update_bundle(run, src)
    assert info["version"] == src["version"] + 1 and info["based_on"]["name"] == "run_a"
    assert info["fossil_threshold"] == src["fossil_threshold"]  # the training run's threshold goes on with the model
    ex = bundle_examples(read_bundle(run / "bundle"))
    assert len(ex) == len(bundle_examples(src)) + 3 and (ex["origin"] == "run_c").sum() == 3
    assert (run / "bundle" / "model.pth").read_bytes() == (work / "bundle" / "model.pth").read_bytes()
    mine.head(1).to_csv(run / "exports" / EXAMPLES, index=False)  # the run's examples changed: they replace its own
    assert update_bundle(run, src)["version"] == src["version"] + 2
    assert (bundle_examples(read_bundle(run / "bundle"))["origin"] == "run_c").sum() == 1


def test_a_scan_far_from_the_training_intensities_is_warned_about(trained, capsys):
    _, work, vol = trained
    info = read_bundle(work / "bundle")
    assert check_intensity(vol, info) < 2 and "close" in capsys.readouterr().out
    dark = type(vol)(images=(np.asarray(vol.images) * 0.5).astype(np.uint8), labels=None, codes=vol.codes,
                     stems=vol.stems, source=vol.source, window=vol.window, raw_dtype="uint16")
    assert check_intensity(dark, info) > 20
    out = capsys.readouterr().out
    assert "Warning: this scan's intensities differ" in out and "this scan is uint16" in out
    assert histogram_shift(intensity_histogram(vol), intensity_histogram(vol)) == 0


def test_intensity_lut_matches_a_histogram_and_leaves_a_matching_one_alone():
    rng = np.random.default_rng(0)
    ref = np.clip(rng.normal(80, 20, 200_000), 0, 255).astype(np.uint8)
    other = np.clip((ref / 255.0) ** 0.8 * 0.85 * 255 + 12 + rng.normal(0, 8, ref.size), 0, 255).astype(np.uint8)
    ref_hist = np.bincount(ref // 4, minlength=64) / ref.size  # as a bundle records it: 64 bins
    same = intensity_lut(np.bincount(ref, minlength=256) / ref.size, ref_hist)
    moved = np.abs(same[ref].astype(int) - ref)  # its own histogram: the grey levels kept, to within a bin of 4
    assert moved.max() < 4 and np.mean(moved <= 1) > 0.99
    lut = intensity_lut(np.bincount(other, minlength=256) / other.size, ref_hist)
    assert lut.dtype == np.uint8 and np.all(np.diff(lut.astype(int)) >= 0)  # a map of grey levels, in order
    assert abs(other.mean() - ref.mean()) > 15 and abs(lut[other].mean() - ref.mean()) < 1
    assert abs(np.percentile(lut[other], 90) - np.percentile(ref, 90)) <= 2


def test_matched_volume_maps_another_scan_for_the_model_and_never_the_files(trained, tmp_path, capsys):
    root, work, vol = trained
    info = read_bundle(work / "bundle")
    assert matched_volume(vol, info, tmp_path) is vol  # its own training scan: as it is
    assert matched_volume(vol, None) is vol  # this run's own model
    assert matched_volume(vol, {**info, "intensity": {}}) is vol and "no intensity histogram" in capsys.readouterr().out
    before = _hashes(root / "core_a")
    bright = type(vol)(images=np.clip(np.asarray(vol.images) * 0.7 + 60, 0, 255).astype(np.uint8), labels=vol.labels,
                       codes=vol.codes, stems=vol.stems, source=vol.source, window=vol.window)
    far = check_intensity(bright, info)
    out = matched_volume(bright, info, tmp_path / "cache")
    assert out is not bright and out.labels is bright.labels and out.shape == bright.shape
    assert check_intensity(out, info) < min(3, far / 5)  # the model sees the training volume's grey levels again
    assert np.asarray(bright.images).max() > 60 and isinstance(out.images, np.memmap)
    cached = list((tmp_path / "cache").glob("matched_*.npy"))
    assert len(cached) == 1 and np.array_equal(matched_volume(bright, info, tmp_path / "cache").images, out.images)
    assert np.array_equal(matched_volume(bright, info).images, out.images)  # in memory: the same map
    assert "histogram matching" in capsys.readouterr().out and _hashes(root / "core_a") == before


def test_model_path_errors_name_the_fix(tmp_path, trained):
    with pytest.raises(DatasetError, match="neither a model bundle"):
        resolve_model(tmp_path)
    broken = tmp_path / "b"
    broken.mkdir()
    (broken / BUNDLE_FILE).write_text("{}")
    with pytest.raises(DatasetError, match="model.pth is missing"):
        read_bundle(broken)


def test_05_refuses_a_scan_whose_classes_are_not_the_models(trained):
    root, work, _ = trained
    other = make_sample(root / "core_d", n_slices=12, height=64, width=64, seed=9)
    (other / "codes.txt").write_text("background\nplanktonic\nbenthic\n")
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "notebooks" / "05_predict_export.ipynb"), str(root / "05_d.ipynb"),
                            cwd=str(ROOT / "notebooks"), kernel_name="python3", progress_bar=False,
                            parameters={"data_dir": str(other), "work_dir": str(root / "run_d"),
                                        "model_path": str(work / "bundle"), "smoke": True})
    assert "codes.txt lists" in e.value.evalue and "planktonic" in e.value.evalue
