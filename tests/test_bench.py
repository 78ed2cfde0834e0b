"""The benchmark runs in its tiny CPU mode and produces every figure (no timing thresholds: machines are noisy)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from microfossil.evaluation import PROVENANCE_KEYS, evaluation_row, write_evaluation
from microfossil.split import split_volume
from microfossil.volume import load_volume

PROVENANCE = {k: None for k in PROVENANCE_KEYS}  # a run's provenance, as 05 records it in metrics.json


def test_benchmark_tiny_produces_all_figures(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "benchmark.py"), "--tiny", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert set(res["stages"]) == {"0.25", "0.5", "1.0"}
    for s in res["stages"].values():
        for k in ("setup_s", "batches_alone_slices_per_s", "data_path_slices_per_s", "raw_model_slices_per_s", "ratio", "peak_rss_gb"):
            assert s[k] > 0, k
        # both rates are rounded to 3 significant digits, the ratio is computed before rounding
        assert s["ratio"] == pytest.approx(s["data_path_slices_per_s"] / s["raw_model_slices_per_s"], rel=0.02)
    inf = res["inference"]
    for k in ("predict_and_write_s", "raw_forward_s", "ratio", "peak_rss_gb"):
        assert inf[k] > 0, k
    assert inf["slices"] == res["volume"][0]
    assert res["context_slices"] == 3 and res["triplanar"] is False  # axial slices unless --triplanar


def test_benchmark_tiny_triplanar(tmp_path):
    """--triplanar (the notebooks' default): XZ and YZ training slices and a three-plane prediction, every figure."""
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "benchmark.py"), "--tiny", "--triplanar", "--stages", "1.0",
                    "--out", str(out)], check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert res["triplanar"] is True and set(res["stages"]) == {"1.0"}
    for k in ("setup_s", "batches_alone_slices_per_s", "data_path_slices_per_s", "raw_model_slices_per_s"):
        assert res["stages"]["1.0"][k] > 0, k
    assert res["inference"]["predict_and_write_s"] > 0 and res["inference"]["slices"] == res["volume"][0]


def test_extraction_benchmark_tiny_produces_all_figures(tmp_path):
    out = tmp_path / "extract.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "extract_memory.py"), "--tiny", "--out", str(out)],
                   check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    for k in ("extract_s", "peak_rss_gb", "peak_anon_gb", "n_components", "n_specimens"):
        assert res[k] > 0, k
    assert res["n_components"] == res["n_specimens"] + res["n_dropped_small"]
    assert 0 <= res["object_f1_heldout"] <= 1


def test_min_size_report(tiny, tmp_path, capsys):
    """bench/min_size.py on a run whose prediction is the ground truth plus specks: the specks are the false components."""
    import numpy as np
    import tifffile
    sys.path.insert(0, str(ROOT / "bench"))
    import min_size
    vol = load_volume(tiny)
    pred = np.asarray(vol.labels).copy()
    z = split_volume(vol).train_start
    pred[z, 0, 0] = pred[z + 3, 90, 3] = 1  # two one-voxel specks on background, in the training block
    (tmp_path / "predictions").mkdir()
    tifffile.imwrite(tmp_path / "predictions" / "labels.tif", pred)
    assert min_size.main(["--data-dir", str(tiny), "--work-dir", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out)
    first = res["predicted_components"]["by_size"][0]
    assert first["voxels"] == "1-9" and first["false"] >= 2
    assert sum(b["true"] for b in res["predicted_components"]["by_size"]) == res["true_specimens"]["n"]
    assert [r["min_voxels"] for r in res["by_min_voxels"]] == min_size.THRESHOLDS
    assert res["block"] == "training" and res["slices"][0] == z
    assert min_size.main(["--data-dir", str(tiny), "--work-dir", str(tmp_path), "--block", "validation"]) == 0
    assert json.loads(capsys.readouterr().out)["slices"][0] == 0  # the validation block: the first slices


def test_variants_table_collects_finished_runs(tmp_path, capsys):
    """bench/variants.py --collect: one table from the evaluation.json of each variant's run and seed: each score the
    mean over the seeds with the min-max, and the seconds."""
    sys.path.insert(0, str(ROOT / "bench"))
    import variants
    codes = ["background", "foram"]
    sp = {"precision": 0.5, "recall": 1.0, "f1": 0.667, "class_f1": 0.333, "n_true": 2, "n_predicted": 4}
    for name, seed in (("k1", 0), ("k1", 1), ("k1", 2), ("k1_tta", 0), ("k1_tta", 1), ("k1_tta", 2)):
        iou = 0.4 + 0.1 * seed  # 0.4, 0.5, 0.6 over the seeds: mean 0.5
        scores = {"iou": {"background": 0.99, "foram": iou}, "dice": {"background": 0.99, "foram": 0.66},
                  "mean_iou_fossils": iou, "pixel_acc_nonbg": 0.7}
        work = tmp_path / name / f"seed{seed}"
        (work / "models").mkdir(parents=True)
        (work / "models" / "full_unfrozen.json").write_text(json.dumps({"seconds": 100.0}))
        (work / "metrics.json").write_text(json.dumps({"predict_seconds": 7.0 if name == "k1" else 28.0,
                                                       "provenance": {**PROVENANCE, "seed": seed}}))
        rows = [evaluation_row(name, "segmentation", scores, sp),
                evaluation_row(name, "+ specimen classifier", scores, {**sp, "class_f1": 0.9})]
        write_evaluation(work, rows, codes)
    variants.main(["--work-root", str(tmp_path), "--collect", "--variants", "k1", "k1_tta"])
    md = capsys.readouterr().out
    assert md.startswith("Data: development volumes") and "not an unseen figure" in md
    lines = [ln for ln in md.splitlines() if ln.startswith("| k1")]
    assert len(lines) == 4 and "IoU foram" in md and "train s" in md and "| seeds |" in md
    assert lines[0].startswith("| k1 | segmentation | 3 | 0.99 | 0.50 (0.40–0.60) | 0.66 |")
    assert "| 0.33 |" in lines[0] and "| 0.90 |" in lines[1] and "| 100 | 7 |" in lines[0]
    assert "| n/a | 28 |" in lines[2]  # the TTA run trained nothing: it reuses k1's model
    out = json.loads((tmp_path / "evaluation.json").read_text())
    assert len(out["rows"]) == 12 and out["summary"][0]["iou"]["foram"][:3] == pytest.approx([0.5, 0.4, 0.6])
    assert out["data_role"] == "development" and all(r["data_role"] == "development" for r in out["rows"])
    assert all(set(PROVENANCE_KEYS) <= set(r["provenance"]) for r in out["rows"])  # every row says where it came from
    assert [r["provenance"]["seed"] for r in out["rows"]][:2] == [0, 0]
    variants.main(["--work-root", str(tmp_path), "--collect", "--variants", "k1", "--data-role", "test"])
    assert capsys.readouterr().out.startswith("Data: test volumes")
    (tmp_path / "k1" / "seed0" / "evaluation.json").write_text(json.dumps(
        {"codes": codes, "rows": [{**r, "provenance": None} for r in out["rows"][:2]]}))  # an earlier version's rows
    rows, _ = variants.collect(tmp_path, ["k1"], [0, 1, 2])
    assert len(rows) == 4 and "written by an earlier version" in capsys.readouterr().out



def test_variants_over_samples_and_training_seeds(tmp_path, capsys, monkeypatch):
    """--sample-seeds: every training seed on every embedded sample, one run folder each (sample<s>_seed<k>, the
    sample given as --data-dir, the seed as -p seed), the variant's loss settings as -p, the mode passed on; a run
    that finished earlier is not run again; the table groups all of a variant's runs under its name; with --quick
    a variant's settings kept over quick mode's."""
    sys.path.insert(0, str(ROOT / "bench"))
    import variants
    import microfossil.paths as paths
    monkeypatch.setattr(paths, "resolve_paths", lambda d, w, seed=0, smoke=False, **k: (tmp_path / f"sample{seed}", w))
    codes, calls = ["background", "foram"], []

    def fake_run(cmd, check):
        calls.append(cmd)
        work, seed = Path(cmd[cmd.index("--work-dir") + 1]), int(cmd[cmd.index("seed") + 1])
        scores = {"iou": {"background": 0.99, "foram": 0.5 + 0.1 * seed}, "dice": {"background": 0.99, "foram": 0.6},
                  "mean_iou_fossils": 0.5, "pixel_acc_nonbg": 0.7}
        (work / "models").mkdir(parents=True)
        (work / "metrics.json").write_text(json.dumps({"predict_seconds": 5.0, "provenance": PROVENANCE}))
        found = {"precision": 1.0, "recall": 1.0, "f1": 1.0, "class_f1": 0.5, "n_true": 4, "n_predicted": 4,
                 "n_matched_same_class": 2}
        write_evaluation(work, [evaluation_row("k=5", "segmentation", scores, None),
                                evaluation_row("k=5", "extraction", scores, found),
                                evaluation_row("k=5", "+ specimen classifier", {**scores, "iou": {"foram": 0.9}},
                                               {**found, "recall": 0.75, "class_f1": 0.8})], codes)
    monkeypatch.setattr(variants.subprocess, "run", fake_run)
    args = ["--work-root", str(tmp_path / "r"), "--smoke", "--variants", "ce_dice_rare", "--sample-seeds", "1", "2",
            "--seeds", "0", "1"]
    variants.main(args)
    assert len(calls) == 4 and all("--smoke" in c for c in calls)
    first = calls[0]
    assert first[first.index("--work-dir") + 1] == str(tmp_path / "r" / "ce_dice_rare" / "sample1_seed0")
    assert first[first.index("--data-dir") + 1] == str(tmp_path / "sample1")
    given = {first[i + 1]: first[i + 2] for i, a in enumerate(first) if a == "-p"}
    assert given["loss"] == "'ce_dice'" and given["oversample_rare"] == "4.0" and given["seed"] == "0"
    md = capsys.readouterr().out
    assert "| ce_dice_rare | segmentation | 4 | 0.99 | 0.55 (0.50–0.60) |" in md
    short = "| ce_dice_rare | 4 | 0.55 (0.50–0.60) | 0.90 | 1.00 | 0.75 | 0.80 |"  # raw, final IoU; recall before, after
    assert short in md and short in (tmp_path / "r" / "evaluation_short.md").read_text()
    each = (tmp_path / "r" / "evaluation_runs.md").read_text()  # one line per run: 4 found, 3 after the clean-up
    assert "| ce_dice_rare, sample1_seed0 | 0.50 | 0.90 | 4 | 4 | 3 | 2 | None |" in each and each in md
    out = json.loads((tmp_path / "r" / "evaluation.json").read_text())
    assert out["sample_seeds"] == [1, 2] and {(r["sample_seed"], r["seed"]) for r in out["rows"]} == {(1, 0), (1, 1), (2, 0), (2, 1)}
    assert {r["model"] for r in out["rows"]} == {"k=5"}
    calls.clear()
    variants.main(args)  # all finished: nothing runs again
    assert calls == []
    variants.main(["--work-root", str(tmp_path / "q"), "--quick", "--variants", "quick", "ce_dice", "k1",
                   "--sample-seeds", "0", "--seeds", "3"])  # a variant's -p values are kept over quick mode's
    assert len(calls) == 3 and all("--quick" in c for c in calls) and "loss" not in calls[0]
    assert calls[1][calls[1].index("loss") + 1] == "'ce_dice'" and calls[2][calls[2].index("context_slices") + 1] == "1"


def test_colab_requirements_sees_colabs_packages_as_installed(tmp_path, monkeypatch):
    """The dry run over Colab's list, offline: each package of the list counts as installed with its real dependency
    list (a metadata cache stands in for PyPI); a requirement Colab's version meets changes nothing, one that pip would
    replace fails the check, and so does one that breaks a pin of a Colab package that is not in the requirements
    (pip's resolver never looks at it; `pip check` does). A package without cached metadata gets a stand-in and a
    warning. The constraints written are Colab's versions of what the requirements pull in, through those pins. And
    the fetcher itself, on a fake index: a wheel's METADATA read by range requests, then from its cache."""
    import io
    import zipfile
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import colab_requirements

    def metadata(name, version, *requires):
        return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n"
                                                                                     for r in requires)

    def wheel(name, version):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(f"{name}/__init__.py", "")
            z.writestr(f"{name}-{version}.dist-info/METADATA", metadata(name, version))
            z.writestr(f"{name}-{version}.dist-info/WHEEL",
                       "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
            z.writestr(f"{name}-{version}.dist-info/RECORD", "")
        return buf.getvalue()

    freeze = tmp_path / "freeze.txt"
    freeze.write_text("# pip freeze\nfastprogress==1.1.6\nipywidgets==7.7.1\ntraitlets==5.7.1\nsome-tool @ file:///x\n"
                      "untouched==1.0\n")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "fastprogress-1.1.6.METADATA").write_text(metadata("fastprogress", "1.1.6"))
    (cache / "ipywidgets-7.7.1.METADATA").write_text(metadata("ipywidgets", "7.7.1", "traitlets>=4.3.1",
                                                              'pytest; extra == "test"'))
    (cache / "traitlets-5.7.1.METADATA").write_text(metadata("traitlets", "5.7.1"))
    (tmp_path / "wheels").mkdir()  # the only index: an older traitlets
    (tmp_path / "wheels" / "traitlets-4.0.0-py3-none-any.whl").write_bytes(wheel("traitlets", "4.0.0"))
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path / "wheels")}

    def run(requirements, *more):
        req = tmp_path / f"req{len(list(tmp_path.glob('req*')))}.txt"
        req.write_text(requirements)
        return subprocess.run([sys.executable, str(ROOT / "bench" / "colab_requirements.py"), str(freeze),
                               "--requirements", str(req), "--cache", str(cache), "--offline", *more],
                              capture_output=True, text=True, env=env, timeout=300)

    kept = run("fastprogress>=1.0.3,<2   # a comment\nipywidgets>=7.7,<9\n",
               "--write-constraints", str(tmp_path / "c.txt"))
    out = kept.stdout + kept.stderr
    assert kept.returncode == 0 and "4 packages in Colab's list; pip would install 0" in kept.stdout, out
    assert "all kept" in kept.stdout and "3 of 4 packages with their real dependency lists" in kept.stdout, out
    assert "WARNING: 1 stand-in records" in kept.stderr and "untouched" in kept.stderr, out
    pins = [line for line in (tmp_path / "c.txt").read_text().splitlines() if not line.startswith("#")]
    assert pins == ["fastprogress==1.1.6", "ipywidgets==7.7.1", "traitlets==5.7.1"]  # traitlets: ipywidgets' own
    assert run("fastprogress<1.1\n").returncode != 0  # not met by Colab's 1.1.6 (online, pip reports it REPLACED)
    older = run("traitlets<5\n")  # allowed by the requirements, not by Colab's ipywidgets
    assert older.returncode == 1 and "traitlets 4.0.0  (Colab has 5.7.1: REPLACED)" in older.stdout, older.stdout
    assert "ipywidgets 7.7.1 has requirement traitlets>=4.3.1, but you have traitlets 4.0.0" in older.stdout

    index = "https://index.invalid/simple"
    files = {f"{index}/traitlets/": json.dumps({"files": [
        {"filename": "traitlets-4.0.0.tar.gz", "url": "https://files.invalid/t.tar.gz"},
        {"filename": "traitlets-4.0.0-py3-none-any.whl", "url": "https://files.invalid/t.whl#sha256=0",
         "size": len(wheel("traitlets", "4.0.0"))}]}).encode(),
        "https://files.invalid/t.whl": wheel("traitlets", "4.0.0")}  # no .metadata beside it: the wheel is read
    asked = []

    def get(self, url, headers=None):
        asked.append(url)
        if url not in files:
            raise colab_requirements.urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        first, last = map(int, headers["Range"][6:].split("-")) if headers and "Range" in headers else (0, None)
        return files[url][first:None if last is None else last + 1]
    monkeypatch.setattr(colab_requirements.Fetcher, "_get", get)
    fetcher = colab_requirements.Fetcher(tmp_path / "fetched", index)
    assert fetcher.get("traitlets", "4.0.0") == metadata("traitlets", "4.0.0") and fetcher.fetched == 1
    assert fetcher.get("nothing-here", "1.0") is None and (tmp_path / "fetched" / "nothing-here-1.0.none").exists()
    n = len(asked)
    assert fetcher.get("traitlets", "4.0.0") == metadata("traitlets", "4.0.0") and len(asked) == n  # the cache
    assert fetcher.get("nothing-here", "1.0") is None and len(asked) == n  # a known absence is not asked again


def test_per_specimen_and_threshold_rules_read_a_finished_run(tiny, tmp_path, capsys):
    """bench/per_specimen.py and bench/threshold_rules.py (the analyses behind docs/evaluation.md's per-specimen and
    labelling-rule figures) on a run whose prediction is the ground truth: every specimen wholly in the block has all
    its voxels in its class; the arg-max and the 0.5 rule reproduce the truth, a threshold so low that the background's
    probability (200 of 255 here) no longer outweighs it paints the background as fossil."""
    import numpy as np
    import tifffile
    from conftest import save_probs
    from microfossil.evaluation import save_metrics
    from microfossil.extraction import extract_fossils
    sys.path.insert(0, str(ROOT / "bench"))
    import per_specimen
    import threshold_rules
    vol = load_volume(tiny)
    pred = np.asarray(vol.labels).copy()
    (tmp_path / "predictions").mkdir()
    save_probs(tmp_path, pred)  # predictions/probs.npy: 200 of 255 for the predicted class, and prediction.json
    tifffile.imwrite(tmp_path / "predictions" / "labels.tif", pred)
    extract_fossils(vol, tmp_path, pred, min_voxels=1, max_exports=0)
    save_metrics(tmp_path, vol, pred, split_volume(vol, 0.2, 0.0, gap_slices=0))  # a training block of 10 slices
    capsys.readouterr()
    assert per_specimen.main(["--data-dir", str(tiny), "--work-dir", str(tmp_path), "--block", "training"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["block"] == "training" and res["slices"] == [0, 9] and res["specimens"]
    assert all(r["right_class_share"] == 1.0 and isinstance(r["infilled"], bool) for r in res["specimens"])
    assert sum(v["specimens"] for v in res["summary"].values()) == len(res["specimens"])
    assert set(res["descriptors"]) <= {"foraminifera", "ostracod", "not a fossil"} and res["descriptors"]
    assert threshold_rules.main(["--data-dir", str(tiny), "--work-dir", str(tmp_path), "--block", "validation"]) == 0
    rules = json.loads(capsys.readouterr().out)["rules"]
    assert rules["argmax"]["foreground_iou"] == rules["0.5"]["foreground_iou"] == 1.0
    assert rules["0.2"]["foreground_iou"] < 1.0


def test_split_blocks_prints_what_each_block_holds(tiny, capsys):
    """bench/split_blocks.py: the blocks of the split and their labelled voxels, on a dataset, before any training."""
    sys.path.insert(0, str(ROOT / "bench"))
    import split_blocks
    assert split_blocks.main(["--data-dir", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert f"== {tiny}" in out and "validation slices 0-" in out and "test block, labelled voxels:" in out
    assert split_blocks.main(["--data-dir", str(tiny), "--valid-pct", "0"]) == 0
    assert "the published recipe" in capsys.readouterr().out


def test_robustness_redo_runs_the_named_notebooks_again_on_finished_runs_only(tmp_path, monkeypatch):
    """--redo 05: a finished run (and its --shift runs) gets 05 again with the run's own settings; an unfinished one
    is trained from 02 as without it; without --redo a finished run is left as it is."""
    sys.path.insert(0, str(ROOT / "bench"))
    import robustness
    calls = []
    monkeypatch.setattr(robustness, "_pipeline", lambda work, data, params, stages, smoke=False:
                        calls.append((Path(work).relative_to(tmp_path).as_posix(), data, params.get("seed"), stages))
                        or passed.append(set(params)))
    passed = []
    monkeypatch.setattr(robustness, "cell_volume", lambda cell, vs, shape, second=False, shifted=False:
                        f"{cell}{'_second' if second else ''}{'_shifted' if shifted else ''}")
    for name in ("v/base_seed0", "v/base_seed0/second", "v/base_seed0/shifted"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "evaluation.json").write_text("{}")
    args = lambda *more: robustness.argparse.Namespace(  # noqa: E731
        work_root=str(tmp_path), variant="v", volume_seed=100, shape=robustness.SHAPE, smoke=False,
        p=[["scanner_augment", "0.5"]], shift="--shift" in more, redo=[m for m in more if m != "--shift"])
    robustness.run_cell(args(), "base", 0)
    robustness.run_cell(args("--shift"), "base", 0)
    assert calls == []  # finished: nothing runs
    robustness.run_cell(args("05", "--shift"), "base", 0)
    assert calls == [("v/base_seed0", "base", 0, ["05"]), ("v/base_seed0/second", "base_second", 0, ["05"]),
                     ("v/base_seed0/shifted", "base_second_shifted", 0, ["05"])]
    assert all(p - {"model_path"} <= robustness.PREDICT_PARAMS for p in passed)  # 05 alone: no training parameter
    calls.clear()
    robustness.run_cell(args("05"), "base", 1)  # not finished: trained and scored from 02, once
    assert calls == [("v/base_seed1", "base", 1, ["02", "03", "04", "05"])] and "scanner_augment" in passed[-1]


def test_robustness_table_reads_finished_runs_and_names_the_worst(tmp_path, capsys, monkeypatch):
    """bench/robustness.py --collect on two finished runs of a cell (their raw segmentation the ground truth less one
    test specimen): the raw foreground IoU from the confusion matrix, the test specimens the raw segmentation found
    (matched however small), those the clean-up lost, the training block's fossil ratio; the worst line takes each
    column's worst run, and the worst cell is the run with the lowest final IoU of a class; the final IoU had every
    specimen its right class puts back the class of a specimen named wrong and of one rejected, not a wall the
    segmentation missed nor a false specimen."""
    import numpy as np
    import tifffile
    from microfossil.evaluation import match_specimens, save_metrics
    from microfossil.specimens import label_components
    sys.path.insert(0, str(ROOT / "bench"))
    import robustness
    from microfossil.sample import make_sample
    data = make_sample(tmp_path / "ds", 24, 96, 96, seed=0)  # whole specimens of both classes in its test block
    vol = load_volume(data)
    split = split_volume(vol, 0.25, 0.0)
    truth = np.asarray(vol.labels)
    cc, n, _, boxes = label_components(truth[split.test_start:] > 0)
    assert n >= 2
    pred = truth.copy()
    pred[split.test_start:][cc == 1] = 0  # the raw segmentation misses one test specimen
    n_true = match_specimens(truth[split.test_start:], truth[split.test_start:], list(vol.codes), 26, 1)["n_true"]
    for seed, final_iou, found in ((0, 0.9, n_true - 1), (1, 0.6, n_true - 2)):
        work = tmp_path / "r" / "defaults" / f"base_seed{seed}"
        (work / "predictions").mkdir(parents=True)
        tifffile.imwrite(work / "predictions" / "labels.tif", pred)
        metrics = save_metrics(work, vol, pred, split)
        final = {"iou": {"background": 1.0, "foraminifera": final_iou, "ostracod": 0.95}, "dice": {},
                 "mean_iou_fossils": 0.0, "pixel_acc_nonbg": 0.0}
        sp = {"recall": found / n_true, "n_true": n_true, "n_matched_same_class": found - seed}
        write_evaluation(work, [evaluation_row("k3", "segmentation", metrics, None),
                                evaluation_row("k3", "extraction", final, sp),
                                evaluation_row("k3", "+ specimen classifier", final, sp)], vol.codes)
    # Run 0's held-out extraction: one test foraminifer named ostracod, one ostracod rejected as not a fossil, another
    # specimen drawn without its wall, and a false specimen (foraminifera) on the matrix; run 1 has no held-out
    # extraction (no such column)
    from scipy import ndimage
    from microfossil.split import left_out_mask
    assert not left_out_mask(vol, split).any()  # every test voxel scored: the IoU below is the plain one
    held = tmp_path / "r" / "defaults" / "base_seed0" / "heldout" / "predictions"
    held.mkdir(parents=True)
    t_truth = truth[split.test_start:]
    cls = np.zeros(n + 2, np.uint8)
    for i in range(1, n + 1):
        cls[i] = np.bincount(t_truth[cc == i], minlength=3)[1:].argmax() + 1
    foram, ostracod = int(np.flatnonzero(cls == 1)[0]), int(np.flatnonzero(cls == 2)[0])
    thin = next(i for i in range(1, n + 1) if i not in (foram, ostracod))
    ids = np.where((cc == thin) & ~ndimage.binary_erosion(cc == thin), 0, cc).astype(np.uint16)
    free = np.argwhere(ndimage.binary_erosion(t_truth == 0, np.ones((5, 5, 5))))[0]
    ids[tuple(free)] = n + 1  # a one-voxel false specimen, 2 voxels from any fossil
    cls[n + 1] = 1
    named = cls.copy()
    named[foram], named[ostracod] = 2, 0
    tifffile.imwrite(held / "labels_clean.tif", named[ids])
    tifffile.imwrite(held / "specimens.tif", ids)
    right = cls[ids]  # what every class named right gives: the truth less a wall, plus the false specimen
    expected = {c: ((right == k) & (t_truth == k)).sum() / ((right == k) | (t_truth == k)).sum()
                for k, c in ((1, "foraminifera"), (2, "ostracod"))}
    assert min(expected.values()) < 1
    monkeypatch.setattr(robustness, "volume_dir", lambda *a, **k: data)
    robustness.main(["--work-root", str(tmp_path / "r"), "--collect", "--cells", "base"])
    out = json.loads((tmp_path / "r" / "defaults" / "robustness.json").read_text())
    r0, r1 = out["rows"]
    assert r0["found_raw"] == n_true - 1 and r0["lost_by_cleanup"] == 0 and r1["lost_by_cleanup"] == 1
    assert 0 < r0["raw_foreground_iou"] < 1 and r0["raw_iou"]["foraminifera"] == metrics["iou"]["foraminifera"]
    lab = truth[split.train_start: split.train_stop]
    counts = np.bincount(lab.ravel(), minlength=3)[1:]
    assert r0["ratio"] == pytest.approx(counts.max() / counts.min())
    # every specimen given its right class, the rejected one back, the thin wall and the false specimen left as drawn
    assert {c: r0["right_class_iou"][c] for c in expected} == pytest.approx(expected)
    assert r1["right_class_iou"] is None
    w = out["worst"]
    assert w["right_class_iou"] == pytest.approx(expected)
    assert w["final_iou"]["foraminifera"] == 0.6 and w["lost_by_cleanup"] == 1 and w["cell_seed"] == 1
    assert w["right_class_share"] == pytest.approx((n_true - 3) / n_true)
    md = capsys.readouterr().out
    assert md.startswith("Data: development volumes") and "| **worst** |" in md and "Worst cell" in md
    (tmp_path / "r" / "defaults" / "base_seed2").mkdir()  # a run still training: not in the table
    robustness.main(["--work-root", str(tmp_path / "r"), "--collect", "--cells", "base", "--seeds", "0"])
    again = json.loads((tmp_path / "r" / "defaults" / "robustness.json").read_text())
    assert [r["seed"] for r in again["rows"]] == [0, 1]  # the variant's every finished run, not only the one named


def test_outline_rules_redraw_the_outlines_keeping_the_classes(tmp_path, capsys):
    """bench/outline_rules.py on a run whose fossil probability is the truth's but on the wall of one test
    foraminifer (0.35, under the run's threshold 0.5): "as run" gives back the run's final labels, threshold 0.3 the
    whole wall (IoU 1), 0.6 the same as 0.5; the threshold per class chosen on the training block (no thin wall
    there) takes the wall back too. Classes stay the run's: an ostracod given the foraminifer's class stays wrong."""
    import numpy as np
    import tifffile
    from conftest import save_probs
    from microfossil.evaluation import save_metrics
    from microfossil.io import read_json, write_json
    from microfossil.sample import make_sample
    from microfossil.specimens import label_components, majority_class
    from microfossil.split import left_out_mask
    from scipy import ndimage
    sys.path.insert(0, str(ROOT / "bench"))
    import outline_rules
    vol = load_volume(make_sample(tmp_path / "ds", 24, 96, 96, seed=0))
    split = split_volume(vol, 0.25, 0.0)
    t0, truth = split.test_start, np.asarray(vol.labels)
    cc, n, _, _ = label_components(truth[t0:] > 0)
    cls = majority_class(cc, truth[t0:], n, 3)
    foram = next(i for i in range(1, n + 1) if cls[i] == 1)
    ostracod = next(i for i in range(1, n + 1) if cls[i] == 2)
    wall = np.zeros(truth.shape, bool)
    wall[t0:] = (cc == foram) & ~ndimage.binary_erosion(cc == foram)
    work = tmp_path / "run"
    (work / "predictions").mkdir(parents=True)
    save_probs(work, truth)
    probs = np.load(work / "predictions" / "probs.npy")
    probs[:, 0][wall], probs[:, 1][wall] = 166, 89  # fossil 0.35 on the wall
    np.save(work / "predictions" / "probs.npy", probs)
    write_json(work / "predictions" / "prediction.json",
               {**read_json(work / "predictions" / "prediction.json"), "fossil_threshold": 0.5})
    final = np.where(wall, 0, truth).astype(np.uint8)
    final[t0:][cc == ostracod] = 1  # the classifier named one ostracod foraminifera
    save_metrics(work, vol, final, split)
    tifffile.imwrite(work / "predictions" / "labels_clean.tif", final)
    (work / "heldout" / "predictions").mkdir(parents=True)
    (work / "heldout" / "exports").mkdir()
    tifffile.imwrite(work / "heldout" / "predictions" / "labels_clean.tif", final[t0:])
    write_json(work / "heldout" / "exports" / "extraction.json", {"connectivity": 26})
    res, codes, walls = outline_rules.run_rules(work)
    assert walls["test"][0] == pytest.approx(1 - 166 / 255) and walls["training"] == [pytest.approx(1 - 27 / 255)] * 2
    assert codes == ["background", "foraminifera", "ostracod"]
    ignore = left_out_mask(vol, split)
    as_run = outline_rules.class_iou(final[t0:], truth[t0:], 3, ignore)
    assert res["as run (threshold 0.5)"] == res["threshold 0.5"] == res["threshold 0.6"] == as_run
    assert res["chosen on the training block alone (threshold 0.5)"] == as_run  # 05's rules from the saved
    assert res["chosen on the training and validation blocks (threshold 0.5)"] == as_run  # probabilities: no thin wall
    whole = outline_rules.class_iou(np.where(truth[t0:] > 0, final[t0:] + (final[t0:] == 0), 0), truth[t0:], 3, ignore)
    assert res["threshold 0.3"] == whole and whole[0] > as_run[0] and whole[1] < 1  # the ostracod still named wrong
    per_class = next(k for k in res if k.startswith("per class"))
    assert res[per_class] == whole
    (tmp_path / "training" / "models").mkdir(parents=True)
    assert outline_rules.main([str(work), str(tmp_path / "training")]) == 0
    out, err = capsys.readouterr()
    assert "training: not finished, left out" in err and "| as run | " in out and "(threshold 0.5)" in out
    assert f"| {work.parent.name}/run | 0.35 / 0.89 | 0.89 / 0.89 |" in out  # the foraminifer's thin wall, on the test block only


def test_class_rules_reshaped_copies_of_the_training_specimens(tmp_path):
    """bench/class_rules.py's reshaped examples: for each true specimen wholly in the training block, a copy a voxel
    thicker, one a voxel thinner (when it keeps half its voxels) and up to two with a cap cut off, each with the
    descriptors of its own shape and its specimen's true class; none from a specimen reaching the other blocks."""
    import numpy as np
    from microfossil.sample import make_sample
    from microfossil.specimens import descriptors, find_specimens
    sys.path.insert(0, str(ROOT / "bench"))
    import class_rules
    vol = load_volume(make_sample(tmp_path / "ds", 24, 96, 96, seed=0))
    split = split_volume(vol, 0.25, 0.0)
    tr = (split.train_start, split.train_stop - 1)
    labels = np.asarray(vol.labels)
    cc, _, _, parts = find_specimens(labels > 0, 26, 150)
    inside = [(i, box) for i, box, _ in parts if box[0].start >= tr[0] and box[0].stop - 1 <= tr[1]]
    assert inside and len(inside) < len(parts)  # some specimens reach the other blocks
    ex = class_rules.reshaped_examples(vol, tr, seed=0)
    true = [vol.codes[1 + int(np.bincount(labels[box][cc[box] == i], minlength=3)[1:].argmax())] for i, box in inside]
    for c in set(vol.codes[1:]):  # two to four copies of each specimen, each with its specimen's class
        assert 2 * true.count(c) <= (ex["label"] == c).sum() <= 4 * true.count(c)
    # a specimen ending on the block's last slice is in it; one slice less and it is not (its copies only go)
    stops = [b[0].stop for _, b, _ in parts]
    last = next(z for z in sorted({box[0].stop for _, box in inside}, reverse=True) if stops.count(z) == 1)
    with_it = class_rules.reshaped_examples(vol, (tr[0], last - 1), seed=0)
    without = class_rules.reshaped_examples(vol, (tr[0], last - 2), seed=0)
    assert 2 <= len(with_it) - len(without) <= 4
    sizes = sorted(10 ** ex["log_voxels"])
    originals = [descriptors(np.asarray(vol.images[box]), cc[box] == i)["log_voxels"] for i, box in inside]
    assert sizes[0] < 10 ** min(originals) and sizes[-1] > 10 ** max(originals)  # thinner and broken; thicker


def test_class_rules_counts_right_classes_per_rule(tmp_path, capsys):
    """bench/class_rules.py on a run whose segmentation is the truth but for one true foraminifer its voxels lean to
    ostracod (0.71 against 0.24): every rule gives every other specimen its class; that one is an ostracod by the mean
    probability, and a foraminifer once the model's loss weights (ostracod x4) are undone."""
    import numpy as np
    import tifffile
    from conftest import save_probs
    from microfossil.evaluation import save_metrics
    from microfossil.extraction import extract_fossils
    from microfossil.sample import make_sample
    from microfossil.specimens import label_components, majority_class
    sys.path.insert(0, str(ROOT / "bench"))
    import class_rules
    data = make_sample(tmp_path / "ds", 24, 96, 96, seed=0)
    vol = load_volume(data)
    split = split_volume(vol, 0.25, 0.0)
    t0, truth = split.test_start, np.asarray(vol.labels)
    cc, n, _, _ = label_components(truth[t0:] > 0)
    cls = majority_class(cc, truth[t0:], n, 3)
    foram = next(i for i in range(1, n + 1) if cls[i] == 1)
    mixed = np.zeros(truth.shape, bool)
    mixed[t0:] = cc == foram
    work = tmp_path / "run"
    (work / "predictions").mkdir(parents=True)
    (work / "models").mkdir()
    (work / "models" / "full_unfrozen.json").write_text(json.dumps({"plan": {"class_weights": [1.0, 1.0, 4.0]}}))
    save_probs(work, truth, mixed)
    tifffile.imwrite(work / "predictions" / "labels.tif", truth)
    save_metrics(work, vol, truth, split)
    extract_fossils(vol, work / "heldout", truth, min_voxels=1, max_exports=0, slices=slice(t0, None),
                    predictions=work / "predictions")
    training = tmp_path / "still_training"  # a glob of run folders catches one whose 05 has not run: left out, said
    (training / "models").mkdir(parents=True)
    assert class_rules.main([str(work), str(training), "--json"]) == 0
    out, err = capsys.readouterr()
    assert f"{training}: not finished, left out" in err and str(training) not in out
    runs = json.loads(out.splitlines()[-1])["runs"][str(work)]
    n_test = len({int(i) for i in np.unique(cc) if i})
    assert runs["segmentation: mean probability"]["right"] == runs["segmentation: mean log probability"]["right"] == n_test - 1
    assert runs["segmentation: loss weights undone"]["right"] == n_test
    assert "| segmentation: balanced |" in out and "classifier" not in out  # no classifier ran: no rule of it
    # The same run as 05 with model_path gives it (no training block of its own; bench/robustness.py --shift): the
    # training block and the loss weights are read from the model bundle's run, so the weights are still undone.
    import shutil
    bundle = work / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({"trained_on": {
        "dataset": str(data), "train_slices": [split.train_start, split.train_stop - 1]}}))
    shifted = tmp_path / "shifted"
    shutil.copytree(work, shifted, ignore=shutil.ignore_patterns("models", "bundle"))
    metrics = json.loads((shifted / "metrics.json").read_text())
    metrics["provenance"]["split"]["train_slices"] = []
    metrics["provenance"]["checkpoint"] = {"source": str(bundle)}
    (shifted / "metrics.json").write_text(json.dumps(metrics))
    assert class_rules.main([str(shifted), "--json"]) == 0
    other = json.loads(capsys.readouterr().out.splitlines()[-1])["runs"][str(shifted)]
    assert other["segmentation: mean probability"]["right"] == n_test - 1
    assert other["segmentation: loss weights undone"]["right"] == n_test


def test_class_rules_refit_reads_no_size_unless_asked(tmp_path):
    """bench/class_rules.py's refit: today's class forest (no size descriptor) and the forest before it (`class_leave_out=None`)
    fitted on a run's classifier examples. Examples whose sizes are swapped between the classes (each ostracod example
    as large as the foraminifera, and the other way round) leave today's forest's classes as the shapes give them."""
    import numpy as np
    import pandas as pd
    sys.path.insert(0, str(ROOT / "bench"))
    import class_rules
    from microfossil.specimens import SIZE_DESCRIPTORS, SPECIMEN_FEATURES
    rng = np.random.default_rng(0)
    n, codes = 30, ["background", "foraminifera", "ostracod"]
    label = np.where(np.arange(n) % 2, "ostracod", "foraminifera")
    feats = pd.DataFrame(rng.normal(0.5, 0.05, (n, len(SPECIMEN_FEATURES))), columns=SPECIMEN_FEATURES)
    feats["solidity"] = np.where(label == "ostracod", 0.81, 0.70) + rng.normal(0, 0.01, n)
    for c in SIZE_DESCRIPTORS:
        feats[c] = np.where(label == "ostracod", 2.6, 3.2) + rng.normal(0, 0.02, n)
    held = tmp_path / "run" / "heldout" / "exports"
    held.mkdir(parents=True)
    feats.assign(id=np.arange(1, n + 1)).to_csv(held / "features.csv", index=False)
    swapped = feats.copy()
    for c in SIZE_DESCRIPTORS:
        swapped[c] = np.where(label == "ostracod", 3.2, 2.6) + rng.normal(0, 0.02, n)
    swapped.assign(label=label).to_csv(held / "classifier_examples.csv", index=False)
    today = class_rules.refit(tmp_path / "run", codes)
    before = class_rules.refit(tmp_path / "run", codes, class_leave_out=None)
    assert sorted(today) == sorted(before) == list(range(1, n + 1))
    assert all(abs(p.sum() - 1) < 1e-9 for p in today.values())
    assert [codes[1 + int(today[i].argmax())] for i in range(1, n + 1)] == list(label)
    size_says = sum(codes[1 + int(before[i].argmax())] == label[i - 1] for i in range(1, n + 1))
    assert size_says < n / 2  # the forest before reads the swapped sizes: most of them named by their size


def test_cache_copy_times_the_three_ways_a_scan_opens(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    from cache_copy import main as cache_copy
    cache_copy(["--slices", "6", "--size", "40", "--work", str(tmp_path)])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row.startswith("| 6 x 40 x 40, 16-bit TIFF") and row.count(" s |") == 3
    (kept,) = (tmp_path / "kept").iterdir()
    assert sorted(p.name for p in kept.iterdir()) == ["images.npy", "labels.npy.gz", "volume.json"]


def test_sparse_labels_thins_the_training_block_only(tmp_path):
    """bench/sparse_labels.py: each setting's dataset keeps the validation and test blocks' masks and those of its
    training slices, and loads with sparse labels as exactly those slices."""
    sys.path.insert(0, str(ROOT / "bench"))
    import numpy as np
    import sparse_labels
    from microfossil.sample import make_sample
    dense = make_sample(tmp_path / "dense", n_slices=40, height=64, width=64, seed=2)
    split, _ = sparse_labels.blocks(dense)
    for setting, n in (("every8", None), ("random5", 5)):
        data, k = sparse_labels.sparse_copy(dense, split, setting, tmp_path / "root")
        vol = load_volume(data, sparse_labels=True)
        chosen = sparse_labels.labelled_training_slices(split, setting)
        assert k == len(chosen) == (n or len(range(split.train_start + 4, split.train_stop, 8)))
        trained = np.flatnonzero(vol.labelled[split.train_start:split.train_stop]) + split.train_start
        assert trained.tolist() == chosen.tolist()
        assert vol.labelled[split.valid_start:split.valid_stop].all() and vol.labelled[split.test_start:].all()
