"""Colab or not: where scratch files go, in-place copies on Drive, the GPU check, the widget manager, progress bars.

A fake `google.colab` (tests/colab_stub) stands in for Colab; `MICROFOSSIL_COLAB_ROOT` moves `/content`."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from microfossil import runtime
from microfossil.paths import resolve_paths

STUB = ROOT / "tests" / "colab_stub"
WIDGETS7 = ROOT / "tests" / ".ipywidgets7"  # ipywidgets 7.7.1, Colab's, installed there by .ci/run (see README)


@pytest.fixture
def colab(tmp_path, monkeypatch):
    """A Colab runtime: `/content` in tmp_path, the stub `google.colab` imported, Drive (a folder) mounted."""
    content, drive = tmp_path / "content", tmp_path / "gdrive"
    content.mkdir()
    monkeypatch.setenv("MICROFOSSIL_COLAB_ROOT", str(content))
    monkeypatch.setenv("COLAB_STUB_DRIVE", str(drive))
    monkeypatch.delenv("MICROFOSSIL_HEADLESS", raising=False)
    monkeypatch.syspath_prepend(str(STUB))
    for name in [m for m in sys.modules if m == "google" or m.startswith("google.")]:
        monkeypatch.delitem(sys.modules, name)
    import google.colab.drive
    google.colab.drive.mount(str(content / "drive"))
    yield content
    for name in [m for m in sys.modules if m == "google" or m.startswith("google.")]:
        sys.modules.pop(name)


def test_outside_colab_scratch_files_stay_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MICROFOSSIL_COLAB_ROOT", str(tmp_path / "content"))
    assert not runtime.in_colab() and runtime.runs_home() is None
    assert not runtime.on_drive(tmp_path / "run")
    assert runtime.local_dir(tmp_path / "run", "cache") == tmp_path / "run" / "cache"
    runtime.check_gpu(cuda=False, cpu_ok=False)  # a laptop CPU runs whatever it is asked to
    assert runtime.flush_drive() is False


def test_in_colab_runs_go_to_drive_and_scratch_files_to_the_local_disk(colab, tmp_path, capsys):
    home = runtime.runs_home()
    assert home == colab / "drive" / "MyDrive" / "microfossil_runs"
    work = home / "sample_default_quick"
    assert runtime.on_drive(work) and runtime.on_drive(work.resolve())  # through the mount's link or not
    scratch = runtime.local_dir(work, "cache")
    assert scratch.is_dir() and scratch.parent.parent == colab / "microfossil_local" and not runtime.on_drive(scratch)
    assert runtime.local_dir(home / "other_run", "cache") != scratch
    ds = tmp_path / "ds"
    (ds / "train").mkdir(parents=True)
    assert resolve_paths(ds, None)[1] == (home / "ds").resolve()  # the default run folder is on Drive


def test_colab_without_drive_mounted_warns_that_the_run_would_be_lost(colab, capsys):
    import google.colab.drive
    google.colab.drive.flush_and_unmount()
    assert runtime.runs_home() is None
    assert "not mounted" in capsys.readouterr().err


def test_a_cpu_runtime_in_colab_stops_a_full_run_but_not_the_demo(colab):
    with pytest.raises(RuntimeError, match="Change runtime type"):
        runtime.check_gpu(cuda=False, cpu_ok=False)
    runtime.check_gpu(cuda=False, cpu_ok=True)
    runtime.check_gpu(cuda=True, cpu_ok=False)


def test_flush_drive_waits_for_drive_then_says_it_unmounted(colab, tmp_path, capsys, monkeypatch):
    assert runtime.flush_drive() is True
    assert "Drive flushed" in capsys.readouterr().out
    assert (tmp_path / "flushes.log").read_text().count("\n") == 1 and not runtime.drive_mounted()
    assert runtime.flush_drive() is False  # nothing mounted: nothing to flush
    monkeypatch.setenv("MICROFOSSIL_HEADLESS", "1")
    assert runtime.flush_drive() is False and "flush_and_unmount" in capsys.readouterr().out


def test_the_custom_widget_manager_only_with_ipywidgets_8(colab, tmp_path, monkeypatch):
    log = tmp_path / "widget_manager.log"
    monkeypatch.setattr(runtime, "widgets_major", lambda: 7)
    assert runtime.enable_colab_widgets() is False and not log.exists()  # Colab renders ipywidgets 7 itself
    monkeypatch.setattr(runtime, "widgets_major", lambda: 8)
    assert runtime.enable_colab_widgets() is True and log.read_text() == "enabled\n"


def test_copy_in_place_rewrites_the_same_file(tmp_path):
    src, dst = tmp_path / "new.pth", tmp_path / "slot.pth"
    dst.write_bytes(b"x" * 5000)  # an older, longer copy
    inode = dst.stat().st_ino
    src.write_bytes(os.urandom(3000))
    written = runtime.copy_in_place(src, dst)
    assert dst.read_bytes() == src.read_bytes() and dst.stat().st_ino == inode  # same file: nothing to Drive's trash
    assert written["size"] == 3000 and runtime.matches(dst, **written)
    with open(dst, "r+b") as fh:  # an upload cut short
        fh.truncate(1000)
    assert not runtime.matches(dst, **written)
    runtime.write_in_place(dst, "{}")
    assert dst.read_text() == "{}" and dst.stat().st_ino == inode


def test_progress_shows_the_rate_and_completes(capsys):
    bar = runtime.Progress(10, "slices")
    for _ in range(5):
        bar.step(2)
    out = capsys.readouterr().out
    assert "10/10" in out and "slices/s" in out
    runtime.Progress(0)  # an empty volume: no bar, no error


def test_the_widgets_work_with_colabs_ipywidgets_7():
    """The review panel, the slice browser and the 3D views, run by their own tests with ipywidgets 7.7.1 (Colab's)
    instead of the installed 8."""
    if not (WIDGETS7 / "ipywidgets").is_dir():
        pytest.fail(f"ipywidgets 7.7.1 is not in {WIDGETS7}: install it there with `python3 -m pip install --no-deps "
                    f"--target {WIDGETS7.relative_to(ROOT)} -r requirements-widgets7.txt` (.ci/run does)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WIDGETS7), os.environ.get("PYTHONPATH", "")])}
    version = subprocess.run([sys.executable, "-c", "import ipywidgets; print(ipywidgets.__version__)"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "7.7.1"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
                        "tests/test_review.py", "tests/test_viewers.py"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_run_pipeline_started_from_a_colab_cell_writes_to_drive(colab, tmp_path):
    """`!python run_pipeline.py` is a new process, without the notebook's `google.colab` import: it still knows it is
    in Colab, and with Drive mounted its runs go there; its kernels' scratch files stay on the local disk."""
    code = ("from microfossil.runtime import in_colab, runs_home, local_dir\n"
            "home = runs_home(); print(in_colab(), home, local_dir(home / 'run', 'cache'))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(STUB), str(ROOT)])}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    in_colab, home, scratch = r.stdout.split()
    assert in_colab == "True" and home == str(colab / "drive" / "MyDrive" / "microfossil_runs")
    assert scratch.startswith(str(colab / "microfossil_local" / "run-"))


def test_after_flush_drive_nothing_is_written_to_the_unmounted_drive_path(colab):
    """flush_drive unmounts Drive: a cell re-run afterwards would write under /content/drive on the local disk
    (unseen, and blocking the next mount); it stops instead, saying to run the setup cell."""
    run = runtime.runs_home() / "r"
    runtime.local_dir(run, "cache")
    runtime.flush_drive()
    with pytest.raises(RuntimeError, match="run the setup cell again"):
        runtime.local_dir(run, "cache")
    assert not (colab / "drive" / "MyDrive").exists()
