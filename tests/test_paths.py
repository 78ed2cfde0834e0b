"""Finding the data and the run folder: the dataset is never the run folder, a zipped dataset is fetched once."""
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from microfossil import paths
from microfossil.paths import fetch_dataset, resolve_paths
from microfossil.volume import DatasetError, load_volume


def test_work_dir_inside_dataset_is_refused(tiny):
    with pytest.raises(DatasetError, match="never written"):
        resolve_paths(tiny, tiny / "runs")


def test_fetch_dataset_unzips_once_and_finds_the_root(tiny, tmp_path):
    """data_url: the zip is fetched once (file:// stands in for HTTP: no network in tests) and reused."""
    archive = shutil.make_archive(str(tmp_path / "lapix"), "zip", root_dir=tiny.parent, base_dir=tiny.name)
    dest = tmp_path / "downloads"
    root = fetch_dataset(f"file://{archive}", dest)
    assert root == dest / "unzipped" / tiny.name
    assert load_volume(root).shape == (12, 96, 96)
    Path(archive).unlink()  # a second call must not fetch again
    assert fetch_dataset(f"file://{archive}", dest) == root


def test_fetch_dataset_errors_name_the_fix(tmp_path):
    bad = tmp_path / "notzip.zip"
    bad.write_text("not a zip")
    with pytest.raises(DatasetError, match="not a zip file"):
        fetch_dataset(str(bad), tmp_path / "d1")
    with pytest.raises(DatasetError, match="Could not download"):
        fetch_dataset(f"file://{tmp_path}/missing.zip", tmp_path / "d2")


def test_each_seed_has_its_own_sample_and_run_folder(tmp_path, monkeypatch):
    """Another seed draws another sample: it must not replace the seed-0 sample under a run trained on it."""
    monkeypatch.setattr(paths, "ROOT", tmp_path)
    d0, w0 = paths.resolve_paths(None, None, seed=0)
    d1, w1 = paths.resolve_paths(None, None, seed=1)
    assert (d0.name, d1.name) == ("sample_default", "sample_default_seed1") and w0 != w1
    assert (d0 / "sample.json").read_text() != (d1 / "sample.json").read_text()


def test_quick_and_smoke_runs_have_their_own_folders(tmp_path, monkeypatch):
    """The CPU demo and CI's smoke test never write into the run of the published schedule, nor into each other's."""
    monkeypatch.setattr(paths, "ROOT", tmp_path)
    names = {paths.resolve_paths(None, None, quick=q, smoke=s)[1].name for q, s in ((0, 0), (1, 0), (0, 1))}
    assert names == {"sample_default", "sample_default_quick", "sample_default_smoke"}


def test_fetch_dataset_skips_the_macos_resource_folder(tiny, tmp_path):
    """A zip made by macOS's Finder also holds __MACOSX/<dataset>/train/ with '._' files: not the dataset."""
    archive = shutil.make_archive(str(tmp_path / "lapix"), "zip", root_dir=tiny.parent, base_dir=tiny.name)
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr(f"__MACOSX/{tiny.name}/train/._slice_0000.png", b"\x00\x05\x16\x07 AppleDouble")
    root = fetch_dataset(archive, tmp_path / "downloads")
    assert root == tmp_path / "downloads" / "unzipped" / tiny.name


def test_fetch_dataset_refuses_two_datasets_and_retries_a_wrong_archive(tiny, tmp_path):
    """Two folders with a train/ in one zip are an error naming both; an archive that held no dataset is not marked
    complete, so the next run (the link fixed, or the file replaced) downloads it again."""
    two = tmp_path / "two"
    shutil.copytree(tiny, two / "core_a")
    shutil.copytree(tiny, two / "core_b")
    (two / "core_a" / ".DS_Store").write_text("junk")
    archive = shutil.make_archive(str(tmp_path / "two"), "zip", root_dir=two)
    with pytest.raises(DatasetError, match="2 dataset folders.*core_a, core_b"):
        fetch_dataset(archive, tmp_path / "d1")
    assert not (tmp_path / "d1" / ".complete").exists()

    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "images" / "a.txt").write_text("x")
    url = str(tmp_path / "data.zip")
    shutil.move(shutil.make_archive(str(tmp_path / "e"), "zip", root_dir=empty), url)
    with pytest.raises(DatasetError, match="no train/ folder"):
        fetch_dataset(url, tmp_path / "d2")
    shutil.move(shutil.make_archive(str(tmp_path / "good"), "zip", root_dir=tiny.parent, base_dir=tiny.name), url)
    assert load_volume(fetch_dataset(url, tmp_path / "d2")).shape == (12, 96, 96)  # fetched again, now right
    assert (tmp_path / "d2" / ".complete").exists() and not (tmp_path / "d2" / "unzipped" / "images").exists()


def test_a_zip_of_a_scanners_folder_is_a_dataset_too(tmp_path):
    """A zipped SkyScan reconstruction folder (no train/) is fetched as it is, and opens with its pixel size."""
    import scan_formats as fmt
    from microfossil.volume import read_voxel_size
    scan = (np.arange(4 * 9 * 11) % 251).reshape(4, 9, 11).astype(np.uint8)
    fmt.skyscan(tmp_path / "src" / "core_rec", scan, 3.2)
    archive = shutil.make_archive(str(tmp_path / "core"), "zip", root_dir=tmp_path / "src")
    root = fetch_dataset(archive, tmp_path / "downloads")
    assert root == tmp_path / "downloads" / "unzipped" / "core_rec"
    assert load_volume(root, require_labels=False).shape == scan.shape
    assert read_voxel_size(root)[0] == (3.2, 3.2, 3.2)


def _globals_01(**kw):
    """01's parameters cell, as a notebook's globals: every data setting declared."""
    from microfossil.params import RUN_SETTINGS, RUN_TYPED_IN
    return {"work_dir": None, **{k: RUN_SETTINGS[k] for k in RUN_TYPED_IN["01"]}, **kw}


def test_a_runs_settings_are_typed_once(tiny, tmp_path, monkeypatch, capsys):
    """01 records the data and the split in work_dir/run.json and notes the run as the last one; 03, with neither data_dir
    nor work_dir, takes both from there (and says so); a setting a notebook sets itself wins and is recorded for the
    next; the embedded sample is recorded by how it is made, not by its path."""
    monkeypatch.setenv("MICROFOSSIL_LAST_RUN", str(tmp_path / "last_run.json"))
    work = tmp_path / "run"
    g01 = _globals_01(data_dir=str(tiny), work_dir=str(work), test_pct=0.3, voxel_size_um=2.5)
    assert paths.use_run(g01, "01") == (tiny.resolve(), work.resolve())
    g03 = {"work_dir": None, "bs": 16}
    data_dir, work_dir = paths.use_run(g03, "03")
    assert (data_dir, work_dir) == (tiny.resolve(), work.resolve()) and g03["data_dir"] == tiny.resolve()
    assert g03["test_pct"] == 0.3 and g03["voxel_size_um"] == 2.5 and g03["context_slices"] == 3
    out = capsys.readouterr().out
    assert "the last run" in out and "test_pct 0.3" in out and "set by 01" in out
    g02 = {"work_dir": None, "context_slices": 5, "quick": True}  # 02 types the training's settings; -p quick True
    paths.use_run(g02, "02", quick={"bs": 8}, smoke={"bs": 2})
    assert g02["bs"] == 8 and g02["test_pct"] == 0.3  # quick mode's schedule, the data from 01
    g04 = {"work_dir": str(work)}
    paths.use_run(g04, "04")
    assert g04["context_slices"] == 5 and g04["quick"] is True
    sample = {**_globals_01(), "work_dir": str(tmp_path / "sample_run")}
    monkeypatch.setattr(paths, "ROOT", tmp_path)
    paths.use_run(sample, "01")
    assert paths.read_json(tmp_path / "sample_run" / "run.json")["data_dir"] is None  # remade, not found by path
    mine = paths.data_home() / "my_core"  # a scan of the user's in data/: recorded by its path, not as the sample
    shutil.copytree(tiny, mine)
    paths.use_run({**_globals_01(), "data_dir": str(mine), "work_dir": str(tmp_path / "my_run")}, "01")
    assert paths.use_run({"work_dir": str(tmp_path / "my_run")}, "02")[0] == mine.resolve()
    from microfossil.params import ParameterError
    with pytest.raises(ParameterError, match="bs=0"):
        paths.use_run({"work_dir": str(work), "bs": 0}, "03")
