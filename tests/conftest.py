"""Shared fixtures: tiny synthetic datasets written to temporary folders (no network, CPU only)."""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The last run the notebooks note (paths.last_run_file): never the project's runs/ (see `_own_last_run`).
os.environ["MICROFOSSIL_LAST_RUN"] = str(Path(tempfile.mkdtemp(prefix="last_run")) / "last_run.json")

from microfossil.io import file_stamp, write_json  # noqa: E402
from microfossil.sample import make_sample  # noqa: E402
from microfossil.volume import Volume, load_volume  # noqa: E402


@pytest.fixture(autouse=True)
def _own_last_run(tmp_path_factory, monkeypatch):
    """Each test its own last-run note (the notebooks' kernels it starts inherit it): a notebook run with no work_dir
    must not go on with another test's run."""
    monkeypatch.setenv("MICROFOSSIL_LAST_RUN", str(tmp_path_factory.mktemp("last_run") / "last_run.json"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A 12-slice 96x96 sample in the published PNG layout."""
    return make_sample(tmp_path_factory.mktemp("tiny") / "ds", n_slices=12, height=96, width=96, seed=3)


def volume_of(images, labels, folder, codes=("background", "shell", "chain")):
    """A `Volume` held in memory (no image files); its source is an empty folder `ds` in `folder`."""
    (Path(folder) / "ds").mkdir(exist_ok=True)
    return Volume(images=images, labels=labels, codes=list(codes), stems=[f"s{z:03d}" for z in range(len(images))],
                  source=Path(folder) / "ds")


def snapshot(folder):
    """(relative path, size, mtime) of every file under `folder`: to prove a dataset was not touched."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in Path(folder).rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def odd_vol(tmp_path_factory):
    """A 6-slice volume with odd slice sizes (141 x 133)."""
    return load_volume(make_sample(tmp_path_factory.mktemp("odd") / "ds", n_slices=6, height=141, width=133, seed=4))


# --- volumes with known objects, for extraction, evaluation and the review ---

CODES = ["background", "foraminifera", "ostracod"]


def ball(shape, center, r):
    g = np.indices(shape, dtype=np.float32)
    return sum((g[i] - c) ** 2 for i, c in enumerate(center)) <= r * r


def make_case(tmp_path, voxel_size=None):
    """A 40x64x72 volume: three balls (one cut by the border), a two-class specimen, specks; probabilities that
    make the two-class specimen an ostracod. Returns (vol, pred, work_dir, truth of each ball)."""
    shape = (40, 64, 72)
    pred = np.zeros(shape, np.uint8)
    objs = {"a": ((12, 16, 16), 7, 1), "b": ((24, 44, 50), 9, 2), "edge": ((36, 50, 16), 6, 1)}
    for c, r, k in objs.values():
        pred[ball(shape, c, r)] = k
    mixed = ball(shape, (12, 46, 20), 5)  # one specimen predicted as class 1 in its upper half, 2 in its lower half
    pred[mixed & (np.indices(shape)[0] < 12)] = 1
    pred[mixed & (np.indices(shape)[0] >= 12)] = 2
    for z, y, x in [(2, 2, 40), (30, 5, 60), (5, 60, 70), (20, 30, 35)]:  # specks of 1-8 voxels
        pred[z:z + 2, y:y + 2, x:x + 2] = 1
    images = np.where(pred > 0, 200, 60).astype(np.uint8)
    src = tmp_path / "ds"
    src.mkdir()
    if voxel_size is not None:
        (src / "voxel_size.txt").write_text(f"{voxel_size}  # micrometres\n")
    vol = Volume(images=images, labels=None, codes=CODES, stems=[f"s{z}" for z in range(shape[0])], source=src)
    work = tmp_path / "run"
    (work / "predictions").mkdir(parents=True)
    save_probs(work, pred, mixed)
    return vol, pred, work, objs, mixed


def save_probs(work, pred, mixed=None):
    """`predictions/probs.npy` as 05 writes it: 200/255 for the predicted class; `mixed` voxels lean to ostracod."""
    probs = np.zeros((pred.shape[0], 3, *pred.shape[1:]), np.uint8)
    for k in range(3):
        probs[:, k] = np.where(pred == k, 200, 27)
    if mixed is not None:
        probs[:, 2][mixed], probs[:, 1][mixed] = 180, 60  # the mixed specimen: ostracod by mean probability
    np.save(work / "predictions" / "probs.npy", probs)
    record_prediction(work, pred.shape)


def record_prediction(work, shape, checkpoint=None):
    """`predictions/prediction.json` as `predict_volume` writes it, vouching for the `probs.npy` there (if any)."""
    probs = work / "predictions" / "probs.npy"
    write_json(work / "predictions" / "prediction.json",
               {"checkpoint": checkpoint or {"name": "test.attempt1", "sha256": "0" * 64}, "shape": list(shape),
                "probs_file": file_stamp(probs) if probs.exists() else None})


@pytest.fixture
def colab_modules(monkeypatch):
    """The stub `google.colab` (tests/colab_stub) importable in this process for one test, and gone after it, so that
    no later test (nor plotly, fastprogress and the others that look for it) believes it runs in Colab."""
    import fastprogress.fastprogress  # noqa: F401  (first: imported under google.colab it picks its notebook bar)
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "colab_stub"))
    for name in ("google", "google.colab", "google.colab.drive", "google.colab.output"):
        monkeypatch.setitem(sys.modules, name, None)  # (put back as it was after the test: absent, or the real one)
        del sys.modules[name]
