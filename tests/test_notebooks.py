"""The notebooks: committed clean, one shared parameter vocabulary, and all of them executed headless in order."""
import json
import re
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
import tifffile
import torch
from PIL import Image

import run_pipeline
from conftest import ROOT, snapshot
from microfossil.classifier import NOT_A_FOSSIL
from microfossil.params import NOTEBOOK_DEFAULTS, RUN_SETTINGS, RUN_TYPED_IN
from microfossil.review import ReviewSession
from microfossil.sample import make_sample
from microfossil.split import split_volume
from microfossil.training import phase_done, read_record
from microfossil.volume import load_volume

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_numbered_notebooks():
    assert [n.stem for n in NOTEBOOKS] == ["01_explore_data", "02_train_256", "03_train_512",
                                           "04_train_full", "05_predict_export", "06_review"]


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_and_parametrised(nb):
    cells = json.loads(nb.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), \
        f"{nb.name} has outputs: strip them before committing"
    assert cells[0]["cell_type"] == "markdown" and "colab-badge" in "".join(cells[0]["source"])
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{nb.name} needs exactly one cell tagged 'parameters'"
    assigned = {ln.split("=")[0].strip() for ln in "".join(tagged[0]["source"]).splitlines()
                if "=" in ln and not ln.startswith("#")}
    seen = set(pm.inspect_notebook(str(nb)))
    assert assigned == seen, f"papermill cannot parse {assigned - seen} in {nb.name}"
    key = nb.name[:2]  # a run's settings are typed in one notebook only, the rest read them from run.json
    assert "work_dir" in seen and seen & set(RUN_SETTINGS) == set(RUN_TYPED_IN.get(key, ())), nb.name
    rest = "\n".join("".join(c["source"]) for c in code if c is not tagged[0])
    assert f'utils.use_run(globals(), "{key}"' in re.sub(r"\(\s+", "(", rest), f"{nb.name} does not settle its run"
    unused = {p for p in seen - set(RUN_SETTINGS) - {"work_dir"} if not re.search(rf"\b{p}\b", rest)}
    if "PhaseCheckpoint(" in rest and "params=globals()" in rest:
        unused -= {"force", "drive_minutes"}  # read by the callback from the notebook's globals
    assert not unused, f"{nb.name}: parameters {unused} are never used"
    uses_gpu = nb.stem[:2] in ("02", "03", "04", "05")  # 01 reads and plots, 06 reviews: no free GPU time spent
    assert (json.loads(nb.read_text())["metadata"].get("accelerator") == "GPU") == uses_gpu, nb.name


def _printed(executed):
    """Everything an executed notebook printed."""
    return "".join("".join(o.get("text", "")) for c in json.loads(Path(executed).read_text())["cells"]
                   for o in c.get("outputs", []))


@pytest.mark.parametrize("nb", NOTEBOOKS[1:4], ids=lambda p: p.stem)
def test_training_notebooks_show_fastais_own_calls(nb):
    """The recipe stands in the cells; checkpointing and resuming are a callback passed in `cbs`."""
    code = "\n".join("".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code")
    for call in ("dls.show_batch(", "learn.freeze()", "learn.lr_find(", "learn.fit_one_cycle(", "learn.unfreeze()",
                 "slice(lr_unfrozen_lo, lr_unfrozen_hi)", "pct_start=", "cbs=utils.PhaseCheckpoint(",
                 "learn.show_results(", "utils.plot_history(", "utils.attempts("):
        assert call in code, f"{nb.name} lacks {call}"
    assert code.count("learn.fit_one_cycle(") == 2 and code.count("learn.lr_find(") == 2


def test_rerun_with_another_learning_rate_retrains_then_skips(tiny, tmp_path):
    """02 in the smoke setting; again with lr_frozen 0.001: phase 1 is trained again (its first attempt kept) and so is
    phase 2, which starts from it; then again unchanged: both are skipped. And 02 in another folder with the first
    run's parameters and seed (and lr_find this time) gives the first run's weights."""
    work = tmp_path / "run"
    nb = NOTEBOOKS[1]

    def run(k, work=work, **params):
        out = tmp_path / f"02_run{k}.ipynb"
        pm.execute_notebook(str(nb), str(out), cwd=str(nb.parent), kernel_name="python3", progress_bar=False,
                            parameters={"data_dir": str(tiny), "work_dir": str(work), "smoke": True, "pretrained": False,
                                        "run_lr_find": False, **params})
        return _printed(out)
    run(1)
    assert read_record(work, "256_frozen")["lr"] == 0.0002 and read_record(work, "256_frozen")["attempt"] == 1
    text = run(2, lr_frozen=0.001)
    assert "256_frozen: plan changed: lr 0.0002 -> 0.001" in text
    assert "256_unfrozen: plan changed: start 256_frozen.attempt1 -> 256_frozen.attempt2" in text
    rec = json.loads((work / "models" / "256_frozen.json").read_text())
    assert rec["plan"]["lr"] == 0.001 and rec["attempt"] == 2
    for phase in ("256_frozen", "256_unfrozen"):
        assert (work / "models" / "attempts" / f"{phase}.attempt1.pth").exists()
        assert phase_done(work, f"{phase}.attempt1") and read_record(work, phase)["attempt"] == 2
    assert read_record(work, "256_frozen.attempt1")["lr"] == 0.0002
    text = run(3, lr_frozen=0.001)
    assert "256_frozen: already trained with this plan (attempt 2)" in text
    assert "256_unfrozen: already trained with this plan (attempt 2)" in text
    assert sorted(p.name for p in (work / "models" / "attempts").iterdir()) == [
        "256_frozen.attempt1.json", "256_frozen.attempt1.pth", "256_unfrozen.attempt1.json", "256_unfrozen.attempt1.pth"]
    run(4, work=tmp_path / "again", run_lr_find=True)
    for phase in ("256_frozen", "256_unfrozen"):
        a = torch.load(work / "models" / "attempts" / f"{phase}.attempt1.pth", weights_only=False)
        b = torch.load(tmp_path / "again" / "models" / f"{phase}.pth", weights_only=False)
        a, b = a.get("model", a), b.get("model", b)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{phase}: not the same weights"


def _check_run(ds, work, n_classes, variant="k=1"):
    vol = load_volume(ds)
    pred_dir = work / "predictions"
    previews = sorted((pred_dir / "previews").glob("*.png"))  # the predictions as a few files: no PNG per slice
    assert ([p.stem for p in previews] == vol.stems) if len(vol.stems) <= 16 else (0 < len(previews) <= 16)
    assert np.asarray(Image.open(previews[0])).shape == (*vol.shape[1:], 3) and not list(pred_dir.glob("*.png"))
    labels = tifffile.imread(pred_dir / "labels.tif")  # the label volume: values = class index
    assert labels.shape == vol.shape and labels.max() < n_classes
    m = json.loads((work / "metrics.json").read_text())
    assert set(m["iou"]) == set(vol.codes) and "mean_iou" not in m
    assert m["pixel_acc_nonbg"] is None or 0 <= m["pixel_acc_nonbg"] <= 1
    split = split_volume(vol)  # the notebooks' defaults: a validation block, and only 05 scores the test block
    prov = m["provenance"]
    assert m["n_test_slices"] == len(split.test) and {k: prov["split"][k] for k in split.plan()} == split.plan()
    assert prov["seed"] == 0 and prov["checkpoint"]["name"] == "full_unfrozen.attempt1" and "left_out" in prov["split"]
    assert prov["tta"] is True and prov["fossil_threshold"] and prov["classifier_seed"] in (0, None)
    for phase in ("256_frozen", "full_unfrozen"):  # every per-epoch score was on the validation block, and says so
        rec = read_record(work, phase)
        assert rec["valid_slices"] == split.plan()["valid_slices"] and rec["test_slices"] == split.plan()["test_slices"]
        assert "mean_iou_fossils" in rec["final"] and "mean_iou" not in rec["final"]
    assert "validation block" in _printed(work / "notebooks" / "02_train_256.ipynb")
    assert json.loads((pred_dir / "prediction.json").read_text())["checkpoint"] == prov["checkpoint"]
    assert set(json.loads((work / "run_times.json").read_text())) == {n.stem for n in NOTEBOOKS}
    for nb in NOTEBOOKS:
        assert (work / "notebooks" / nb.name).exists()
    for fig in ("slice", "orthoviews", "histogram", "split", "lr_find_256_frozen", "lr_find_full_unfrozen",
                "results_256", "history_full", "predictions_test", "slices_truth", "slices_pred"):
        assert (work / "figures" / f"{fig}.png").exists(), fig
    assert (work / "figures" / "specimens_3d.html").exists()  # headless, the 3D views are HTML pages
    for name in ("256", "512", "full"):
        for phase in ("frozen", "unfrozen"):
            assert phase_done(work, f"{name}_{phase}")
    # extraction ran inside the pipeline: a catalogue (possibly empty with a quick model), the cleaned labels,
    # object-level scores; the review notebook ran headless and skipped its panel
    cat = ReviewSession(work).cat
    assert list(cat.columns[:2]) == ["id", "class"] and set(cat["class"]) <= {*vol.codes[1:], NOT_A_FOSSIL}
    assert tifffile.imread(pred_dir / "labels_clean.tif").shape == vol.shape
    assert {"n_true", "n_predicted", "precision", "recall", "f1"} <= set(m["specimens"])
    info = json.loads((work / "exports" / "extraction.json").read_text())
    assert info["n_specimens"] == len(cat) and info["n_exported"] == len(list((work / "exports").glob("fossil_*")))
    # the evaluation table of the run: segmentation (and + specimen classifier when it could be trained)
    ev = json.loads((work / "evaluation.json").read_text())
    assert ev["rows"][0]["variant"] == variant and ev["rows"][0]["step"] == "segmentation"
    assert all(r["provenance"]["split"]["test_slices"] == split.plan()["test_slices"] for r in ev["rows"])
    assert ev["rows"][0]["iou"] == m["iou"] and "| variant | step |" in (work / "evaluation.md").read_text()
    text = _printed(work / "notebooks" / "06_review.ipynb")
    assert "review panel skipped" in text and "No decision in review.csv yet" in text


def test_pipeline_smoke_on_png_sample(tiny, tmp_path, capfd):
    before = snapshot(tiny)
    work = tmp_path / "run"
    # Axial slices (the published recipe; quick mode's too): the default, tri-planar, runs end to end in the next test.
    # On this 12-slice 96 x 96 sample a three-plane prediction would be 17 times the axial one (12 + 96 + 96 slices).
    assert run_pipeline.main(["--data-dir", str(tiny), "--work-dir", str(work), "--smoke",
                              "-p", "pretrained", "False", "-p", "triplanar", "False", "-p", "voxel_size_um", "2.5"]) == 0
    _check_run(tiny, work, 3, variant="k=3, flip TTA")
    for name in ("labels.tif", "labels_clean.tif"):  # the voxel size given, where the scan records none
        with tifffile.TiffFile(work / "predictions" / name) as t:
            assert t.imagej_metadata["spacing"] == 2.5 and t.imagej_metadata["unit"] == "um", name
    out, err = capfd.readouterr()  # the summary a person reads at the end, and no kernel chatter (the kernels' too)
    assert "All done in" in out and "Specimens found:" in out and "Test block" in out
    assert f"Gallery:    {work / 'exports' / 'gallery.png'}" in out or not (work / "exports" / "gallery.png").exists()
    assert f"Catalogue:  {work / 'exports' / 'fossils.csv'}" in out and "06_review.ipynb" in out
    assert "TCP" not in out + err and "WARNING" not in out + err
    assert snapshot(tiny) == before, "the pipeline wrote into the dataset folder"

    # re-running a finished stage skips it (the "survives a disconnect" path)
    assert run_pipeline.main(["--data-dir", str(tiny), "--work-dir", str(work), "--smoke", "--only", "03",
                              "-p", "pretrained", "False", "-p", "triplanar", "False"]) == 0
    text = _printed(work / "notebooks" / "03_train_512.ipynb")
    assert "512_frozen: already trained" in text and "512_unfrozen: already trained" in text


def test_pipeline_smoke_on_unseen_layout(tmp_path):
    """A scan as 3D Slicer writes it: one 16-bit NRRD volume with its voxel size and a label NRRD beside it, odd slice
    size, other class names and an extra (unused) class; and the 3D-context variants all at once: 5 context slices
    (the first convolution adapted), tri-planar training and prediction, flip TTA. Every output is to scale: the
    label volumes, the Slicer segmentation, the crops, the STL meshes and the assemblage along the core."""
    import nrrd
    import trimesh

    import scan_formats as fmt
    sample = make_sample(tmp_path / "odd", n_slices=10, height=75, width=83, seed=9, bit_depth=16, fmt="tif-stack")
    images, labels = (tifffile.imread(sample / d / f) for d, f in (("train", "volume.tif"),
                                                                     ("train_masks_labels", "volume_GT.tif")))
    (tmp_path / "scan").mkdir()
    ds = fmt.nrrd_file(tmp_path / "scan" / "core.nrrd", images, (0.006, 0.003, 0.003))  # mm, as Slicer writes
    fmt.nrrd_file(tmp_path / "scan" / "core_GT.nrrd", labels, (0.006, 0.003, 0.003))
    (tmp_path / "scan" / "codes.txt").write_text("matrix\nbenthic foram\nostracod valve\npyrite\n")
    before = snapshot(tmp_path / "scan")
    work = tmp_path / "run"
    assert run_pipeline.main(["--data-dir", str(ds), "--work-dir", str(work), "--smoke",
                              "-p", "pretrained", "False", "-p", "bs", "3", "-p", "context_slices", "5",
                              "-p", "triplanar", "True", "-p", "tta", "True", "-p", "min_voxels", "1",
                              "-p", "fossil_threshold", "0.02"]) == 0  # a smoke model's fossils are faint: some
    #                                                                    specimens to export and check the scale of
    _check_run(ds, work, 4, variant="k=5, tri-planar, flip TTA")
    info = read_record(work, "full_unfrozen")
    assert info["context_slices"] == 5 and info["triplanar"] is True and info["codes"][3] == "pyrite"
    assert snapshot(tmp_path / "scan") == before
    assert "voxel size (z, y, x): (6.0, 3.0, 3.0) µm, from" in _printed(work / "notebooks" / "01_explore_data.ipynb")
    m = json.loads((work / "metrics.json").read_text())
    assert m["voxel_size_um"] == [6.0, 3.0, 3.0] and "core.nrrd" in m["voxel_size_source"]
    for name in ("labels.tif", "labels_clean.tif", "specimens.tif"):
        with tifffile.TiffFile(work / "predictions" / name) as t:
            assert t.imagej_metadata["spacing"] == pytest.approx(6.0) and t.imagej_metadata["unit"] == "um", name
    seg, head = nrrd.read(str(work / "predictions" / "segmentation.seg.nrrd"), index_order="C")
    assert seg.shape == images.shape
    np.testing.assert_allclose(np.abs(head["space directions"]).sum(0), [0.003, 0.003, 0.006])
    cat = ReviewSession(work).cat
    crops = sorted((work / "exports").glob("fossil_*"))[:3]
    assert crops, "no specimen exported: nothing here to check the scale of"
    for d in crops:  # crops and meshes in µm
        with tifffile.TiffFile(next(d.glob("*_ct.tif"))) as t:
            assert t.imagej_metadata["spacing"] == pytest.approx(6.0)
        row = cat.set_index("id").loc[int(d.name.split("_")[1])]
        z0, z1 = trimesh.load(next(d.glob("*.stl"))).bounds[:, 2]
        assert z0 >= 6.0 * row.z0 - 6.0 and z1 <= 6.0 * row.z1 + 6.0
    table = json.loads((work / "exports" / "extraction.json").read_text())
    assert table["voxel_size_um"] == [6.0, 3.0, 3.0]
    csv = (work / "exports" / "assemblage.csv").read_text().splitlines()
    assert csv[0].startswith("depth_from_mm,depth_to_mm,benthic foram_count") and (work / "figures" / "assemblage.png").exists()


def test_mode_schedules_replace_only_the_parameters_cells_defaults():
    """`params.NOTEBOOK_DEFAULTS` (what quick mode's and smoke's schedules may replace) are the values of each notebook's
    parameters cell, and every schedule a notebook passes to `use_run` names only those: the notebooks stay in step."""
    import ast
    for nb in NOTEBOOKS:
        key = nb.name[:2]
        defaults = {k: _parsed(v["default"]) for k, v in pm.inspect_notebook(str(nb)).items()}
        schedules = []
        for c in json.loads(nb.read_text())["cells"]:
            if c["cell_type"] == "code":
                src = "\n".join(ln for ln in "".join(c["source"]).splitlines() if not ln.lstrip().startswith(("!", "%")))
                for call in ast.walk(ast.parse(src)):
                    if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "use_run":
                        assert call.args[1].value == key, f"{nb.name} settles the run of notebook {call.args[1].value}"
                        schedules += [{k.arg for k in kw.value.keywords} for kw in call.keywords]
        assert bool(schedules) == (key in NOTEBOOK_DEFAULTS), nb.name
        for names in schedules:
            assert names <= set(NOTEBOOK_DEFAULTS[key]), nb.name
        for name, value in NOTEBOOK_DEFAULTS.get(key, {}).items():
            assert defaults[name] == value and type(defaults[name]) is type(value), f"{nb.name}: {name}"


def test_the_training_notebooks_are_in_step():
    """02, 03 and 04 declare the same stage parameters (02 also the training's run settings), with the same comments;
    their set-up cells are the same in every notebook."""
    cells = {nb.name[:2]: json.loads(nb.read_text())["cells"] for nb in NOTEBOOKS}
    lines = {k: {ln.split("=")[0].strip(): ln.split("#", 1)[-1] for ln in "".join(
        next(c for c in cs if "parameters" in c.get("metadata", {}).get("tags", []))["source"]).splitlines()
        if "=" in ln and "#" in ln} for k, cs in cells.items()}
    stage = set(lines["03"])
    assert stage == set(lines["04"]) and stage <= set(lines["02"])
    assert set(lines["02"]) - stage == set(RUN_TYPED_IN["02"])
    for name in stage - {"init_from", "size_frac"}:
        assert lines["02"][name] == lines["03"][name] == lines["04"][name], name
    setups = {"".join(cs[2]["source"]) for cs in cells.values()}
    assert len(setups) == 1, "the set-up cells differ"


def _parsed(text):
    return run_pipeline._value(text)


def _cells(nb_path):
    """The notebook's cells, found by what they hold (the indices move as the text is edited)."""
    cells = json.loads(Path(nb_path).read_text())["cells"]
    code = {i: "".join(c["source"]) for i, c in enumerate(cells) if c["cell_type"] == "code"}
    find = lambda *marks: next(i for i, s in code.items() if all(m in s for m in marks))  # noqa: E731
    return cells, {"setup": find("import utils"), "params": find("epochs_frozen ="), "mode": find("use_run("),
                   "dls": find("make_dls("), "learner": find("build_learner("), "fit1": find("_frozen\", start=init_from"),
                   "fit2": find("learn.fit_one_cycle(epochs_unfrozen")}


class _Kernel:
    """A notebook's kernel driven cell by cell, in any order, as a learner does in Jupyter."""
    def __init__(self, nb_path, params):
        import nbformat
        from nbclient import NotebookClient
        self.nb = nbformat.read(str(nb_path), as_version=4)
        _, self.at = _cells(nb_path)
        self.params = params
        self.client = NotebookClient(self.nb, kernel_name="python3", timeout=600, allow_errors=True,
                                     resources={"metadata": {"path": str(Path(nb_path).parent)}})

    def run(self, which, source=None, error=False):
        """Run cell `which` (a name of `_cells`, or an index), its source replaced by `source` when given (the
        parameters cell: with the test's parameters after it, as papermill injects them); returns what it printed.
        An error fails the test unless `error` (then it is part of what is returned)."""
        i = self.at.get(which, which)
        cell = self.nb.cells[i]
        cell.source = (source or cell.source) + ("\n" + self.params if which == "params" else "")
        cell.outputs = []
        self.client.execute_cell(cell, i)
        text = "".join(o.get("text", "") + o.get("evalue", "") for o in cell.outputs)
        failed = any(o.get("output_type") == "error" for o in cell.outputs)
        assert failed == error, f"cell {which}: " + (text if failed else "no error")
        return text


def test_phase_cells_train_what_they_name_whatever_ran_before(tiny, tmp_path):
    """02 run cell by cell out of order: the phase-1 fit after phase 2 loads phase 1 (frozen, not retrained unfrozen);
    the learner cell (which freezes) then the phase-2 fit loads phase 2; a batch size changed in the parameters cell
    with only the fit re-run stops, naming the cells, and trains nothing; after those cells, it retrains."""
    work = tmp_path / "run"
    k = _Kernel(NOTEBOOKS[1], f"data_dir = {str(tiny)!r}\nwork_dir = {str(work)!r}\nsmoke = True\npretrained = False\n"
                              "run_lr_find = False")
    with k.client.setup_kernel():
        for name in ("setup", "params", "mode", "dls", "learner", "fit1", "fit2"):
            text = k.run(name)
        assert "256_unfrozen: training attempt 1" in text
        text = k.run("fit1")
        assert "256_frozen: already trained with this plan (attempt 1)" in text, text
        k.run("learner")
        text = k.run("fit2")
        assert "256_unfrozen: already trained with this plan (attempt 1)" in text, text
        params = k.nb.cells[k.at["params"]].source.split("\n" + k.params)[0]
        k.run("params", params.replace("bs = None ", "bs = 4    "))
        text = k.run("fit1", error=True)
        assert "bs = 4 (made with None)" in text and "run the DataLoaders cell" in text and "Nothing was trained" in text
        assert not (work / "models" / "attempts").exists()
        for name in ("mode", "dls", "learner"):
            k.run(name)
        text = k.run("fit1")
        assert "256_frozen: plan changed: bs auto -> 4;" in text, text  # (bs None: what fits, "auto" in the plan)
    assert read_record(work, "256_frozen")["bs"] == 4 and read_record(work, "256_frozen.attempt1")["bs"] == "auto"
    assert read_record(work, "256_frozen.attempt1")["bs_used"] > 4
    assert read_record(work, "256_frozen")["frozen"] and not read_record(work, "256_unfrozen")["frozen"]


def test_quick_mode_takes_the_rate_you_type_in_either_place(tiny, tmp_path):
    """Quick mode: a learning rate typed in the parameters cell is kept (not replaced by quick mode's) and the fit
    retrains with it; one changed in quick mode's own cell retrains with that one."""
    work = tmp_path / "run"
    k = _Kernel(NOTEBOOKS[1], f"data_dir = {str(tiny)!r}\nwork_dir = {str(work)!r}\nquick = True\npretrained = False")
    with k.client.setup_kernel():
        for name in ("setup", "params", "mode", "dls", "learner", "fit1"):
            text = k.run(name)
        assert read_record(work, "256_frozen")["lr"] == 0.001
        params = k.nb.cells[k.at["params"]].source.split("\n" + k.params)[0]
        k.run("params", params.replace("lr_frozen = 0.0002", "lr_frozen = 0.003"))
        text = k.run("mode")
        assert "kept as you set them: lr_frozen 0.003" in text, text
        text = k.run("fit1")
        assert "256_frozen: plan changed: lr 0.001 -> 0.003" in text, text
        k.run("params", params)  # back to the default: quick mode's cell sets its own rate again
        mode = k.nb.cells[k.at["mode"]].source
        text = k.run("mode", mode.replace("lr_frozen=1e-3", "lr_frozen=2e-3"))
        assert "lr_frozen 0.002" in text and "kept" not in text, text
        text = k.run("fit1")
        assert "256_frozen: plan changed: lr 0.003 -> 0.002" in text, text
    assert read_record(work, "256_frozen")["attempt"] == 3


def test_quick_keeps_a_value_passed_with_p(tiny, tmp_path, monkeypatch, capsys):
    """A -p value given with --quick is kept over quick mode's, even one equal to the parameters cell's default."""
    import os
    from microfossil.params import PASSED, use_schedule
    with monkeypatch.context() as m:
        m.setenv(PASSED, "bs")
        values = {"bs": 16, "lr_frozen": 0.0002}
        assert use_schedule(values, "02", bs=8, lr_frozen=1e-3) == {"lr_frozen": 1e-3}
        assert values == {"bs": 16, "lr_frozen": 1e-3} and "kept as you set them: bs 16" in capsys.readouterr().out
    monkeypatch.setattr(pm, "execute_notebook", lambda nb, out, parameters, **kw: seen.append(os.environ[PASSED]))
    seen = []
    assert run_pipeline.main(["--data-dir", str(tiny), "--work-dir", str(tmp_path / "w"), "--quick", "-p", "bs", "4",
                              "--only", "02"]) == 0
    assert seen == ["bs"] and PASSED not in os.environ  # for that run's kernels only, not a later run's
    with pytest.raises(SystemExit):  # one mode at a time
        run_pipeline.main(["--data-dir", str(tiny), "--work-dir", str(tmp_path / "w2"), "--quick", "--smoke"])
    assert not (tmp_path / "w2").exists()


def test_runner_rejects_unknown_parameter(tiny, tmp_path):
    with pytest.raises(SystemExit):
        run_pipeline.main(["--data-dir", str(tiny), "--work-dir", str(tmp_path / "w"), "-p", "no_such_param", "1"])


def test_only_takes_numbers_and_names_and_refuses_what_matches_nothing(tiny, tmp_path, capsys):
    """--only 4, 04, 04_train_full and 04_train_full.ipynb all name notebook 04; a name that matches no notebook stops
    the run before anything is written (it used to run nothing and print "All done.")."""
    import argparse
    ap = argparse.ArgumentParser()
    nbs = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for only in (["4"], ["04"], ["04_train_full"], ["04_train_full.ipynb"]):
        assert [nb.name[:2] for nb in run_pipeline._select(nbs, only, ap)] == ["04"]
    assert [nb.name[:2] for nb in run_pipeline._select(nbs, ["5", "2"], ap)] == ["02", "05"]  # in numbered order
    with pytest.raises(SystemExit):
        run_pipeline.main(["--data-dir", str(tiny), "--work-dir", str(tmp_path / "w"), "--smoke", "--only", "4", "9"])
    assert "--only 9: no such notebook" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_runner_passes_a_relative_model_path_as_the_folder_it_names_from_here(tiny, tmp_path, monkeypatch):
    """The notebooks run in notebooks/: `-p model_path runs/x` typed in the repository (or any folder) must reach 05
    as that folder, not as notebooks/runs/x; a link is passed as it is."""
    seen = []
    monkeypatch.setattr(pm, "execute_notebook", lambda nb, out, parameters, **kw: seen.append(parameters))
    (tmp_path / "runs" / "trained").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for given, reaches in (("runs/trained", str(tmp_path / "runs" / "trained")),
                           ("https://example.org/bundle.zip", "https://example.org/bundle.zip")):
        assert run_pipeline.main(["--data-dir", str(tiny), "--work-dir", str(tmp_path / "w"), "--only", "05",
                                  "-p", "model_path", given]) == 0
        assert seen[-1]["model_path"] == reaches
