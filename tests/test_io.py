"""Atomic writes: a file or folder appears whole or not at all, and label TIFFs round-trip page by page."""
import numpy as np
import pytest
import tifffile

from microfossil import io
from microfossil.io import (JOURNAL, STAGE, attempt_files, finish_commit, read_json, read_label_pages, replacing, staged,
                          write_json, write_label_tiff)


def test_replacing_a_file_and_a_folder(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    write_json(target, {"v": 2})
    assert read_json(target) == {"v": 2} and read_json(tmp_path / "missing.json", "none") == "none"
    folder = tmp_path / "cache"
    for v in ("old", "new"):  # a folder that holds files is replaced too
        with replacing(folder) as tmp:
            tmp.mkdir()
            (tmp / "data.txt").write_text(v)
    assert (folder / "data.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "cache"]  # no .partial or .old left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "labels.tif"
    target.write_text("the old content")
    with pytest.raises(RuntimeError):
        with replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disconnect")
    assert target.read_text() == "the old content" and not (tmp_path / "labels.tif.partial").exists()


def test_label_tiff_pages_round_trip(tmp_path):
    vol = np.random.default_rng(0).integers(0, 4, (5, 7, 9), dtype=np.uint8)
    write_label_tiff(tmp_path / "l.tif", iter(vol))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "l.tif"), vol)  # uniform pages read back as one stack
    np.testing.assert_array_equal(np.stack(list(read_label_pages(tmp_path / "l.tif"))), vol)


def test_attempt_files_in_attempt_order(tmp_path):
    for n in (10, 2, 1):
        (tmp_path / f"256_frozen.attempt{n}.json").write_text("{}")
    (tmp_path / "256_frozen_x.attempt3.json").write_text("{}")  # another phase whose name starts the same
    (tmp_path / "256_frozen.attempt4.csv").write_text("")
    assert [n for n, _ in attempt_files(tmp_path, "256_frozen", ".json")] == [1, 2, 10]


def test_a_folder_swap_cut_by_a_kill_is_settled_to_the_new_folder(tmp_path, monkeypatch):
    """The predictions folder is swapped in steps; a kill after the complete new folder was renamed `.new` (here after
    each later step in turn) leaves the old folder or nothing in place: the next reader's `finish_commit` (or the next
    `replacing`) puts the new one there, even when a reader made an empty folder in the meantime."""
    real = io.os.replace
    for cut_after in (1, 2):  # 1: the new one is `.new`; 2: also the old one is `.old`, nothing in place
        work = tmp_path / f"run{cut_after}"
        folder = work / "predictions"
        folder.mkdir(parents=True)
        (folder / "labels.tif").write_text("old")
        calls = []

        def cut(src, dst):
            if len(calls) == cut_after:
                raise SystemExit("runtime lost")
            calls.append(dst)
            real(src, dst)
        monkeypatch.setattr(io.os, "replace", cut)
        with pytest.raises(SystemExit):
            with replacing(folder) as tmp:
                tmp.mkdir()
                (tmp / "labels.tif").write_text("new")
        monkeypatch.setattr(io.os, "replace", real)
        assert (folder / "labels.tif").read_text() == "old" if cut_after == 1 else not folder.exists()
        folder.mkdir(exist_ok=True)  # a reader that made the folder it expected
        finish_commit(work)
        assert (folder / "labels.tif").read_text() == "new" and sorted(p.name for p in work.iterdir()) == ["predictions"]


def _result(folder, n, tag):
    """A staged result: n specimen folders, a catalogue, a label file."""
    with staged(folder, remove=["exports/fossil_*", "exports/gallery.png"]) as stage:
        for k in range(1, n + 1):
            (stage / "exports" / f"fossil_{k}").mkdir(parents=True)
            (stage / "exports" / f"fossil_{k}" / "mask.tif").write_text(tag)
        (stage / "exports" / "fossils.csv").write_text(tag)
        (stage / "predictions").mkdir()
        (stage / "predictions" / "specimens.tif").write_text(tag)


def _files(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_staged_result_replaces_the_previous_one_whole_and_leaves_other_files(tmp_path):
    _result(tmp_path, 3, "old")
    (tmp_path / "exports" / "review.csv").write_text("decisions")
    (tmp_path / "exports" / "gallery.png").write_text("old")
    _result(tmp_path, 2, "new")
    assert _files(tmp_path) == {"exports/fossil_1/mask.tif": "new", "exports/fossil_2/mask.tif": "new",
                                "exports/fossils.csv": "new", "predictions/specimens.tif": "new",
                                "exports/review.csv": "decisions"}  # fossil_3 and the old gallery went, the review stayed
    with pytest.raises(RuntimeError):  # a failure (or a kill) before the commit: the previous result, untouched
        with staged(tmp_path, remove=["exports/fossil_*"]) as stage:
            (stage / "exports").mkdir()
            (stage / "exports" / "fossils.csv").write_text("half")
            raise RuntimeError("disconnect")
    assert _files(tmp_path)["exports/fossils.csv"] == "new" and not (tmp_path / STAGE).exists()


def test_a_commit_cut_in_the_middle_is_finished_by_the_next_reader(tmp_path, monkeypatch):
    _result(tmp_path, 3, "old")
    real, calls = io.os.replace, []

    def cut(src, dst):  # the runtime is lost after the list of moves and the first move are written
        calls.append(dst)
        if len(calls) == 3:
            raise SystemExit("runtime lost")
        real(src, dst)
    monkeypatch.setattr(io.os, "replace", cut)
    with pytest.raises(SystemExit):
        _result(tmp_path, 2, "new")
    monkeypatch.setattr(io.os, "replace", real)
    assert (tmp_path / JOURNAL).exists()  # a mix on disk, with the list of moves that finishes it
    assert finish_commit(tmp_path) and not finish_commit(tmp_path)
    assert _files(tmp_path) == {"exports/fossil_1/mask.tif": "new", "exports/fossil_2/mask.tif": "new",
                                "exports/fossils.csv": "new", "predictions/specimens.tif": "new"}
