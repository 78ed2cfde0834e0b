"""Atomic writes: a file or folder appears whole or not at all, and label TIFFs round-trip page by page."""
import numpy as np
import pytest
import tifffile

from microfossil.io import attempt_files, read_json, read_label_pages, replacing, write_json, write_label_tiff


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
