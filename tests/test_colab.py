"""Colab, simulated: a stub `google.colab` (tests/colab_stub, its `drive.mount` links a folder that stands for Google
Drive) and `/content` moved to a temporary folder. The notebooks' setup cell finds the project (on the runtime, a
copy on Drive, a clone) or says how to fix it; a quick 02 -> 05 runs through papermill with its run folder on the
stub Drive, which afterwards holds no superseded checkpoint and no per-slice files, and one kept copy of the decoded
scan."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

STUB = ROOT / "tests" / "colab_stub"


def _stub_env():  # tests/colab_stub/stub_env.py, loaded from its file: the stub stays off this process's path, where
    import importlib.util  # `google.colab` would make plotly and others believe they run in Colab
    spec = importlib.util.spec_from_file_location("stub_env", STUB / "stub_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _setup_cell(nb):
    cells = json.loads(Path(nb).read_text())["cells"]
    return next("".join(c["source"]) for c in cells if c["cell_type"] == "code"
                and "# Setup, safe to re-run." in "".join(c["source"]))


def _colab(tmp_path, monkeypatch=None):
    """`/content` and the stub Drive under tmp_path; the environment of a Colab kernel (as a dict, and set in this
    process with `monkeypatch` for papermill's kernels, which inherit it)."""
    content, drive, env = _stub_env().colab_env(tmp_path)
    if monkeypatch is not None:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("MICROFOSSIL_HEADLESS", raising=False)
    return content, drive / "MyDrive", {**os.environ, **env}


def _copy_project(dest):
    """The project as a user would upload it (the files git knows)."""
    return _stub_env().copy_project(ROOT, dest)


def _run_setup(content, env, repo_url=None):
    code = _setup_cell(NOTEBOOKS[0])
    if repo_url is not None:
        code = code.replace('REPO_URL = "https://github.com/lapix-ufsc/microfossil-ct"', f"REPO_URL = {repo_url!r}")
    script = content.parent / "setup_cell.py"
    script.write_text("import google.colab\n" + code + "\nprint('ROOT', ROOT, 'utils', utils.__file__)\n")
    return subprocess.run([sys.executable, str(script)], cwd=content, env=env, capture_output=True, text=True,
                          timeout=300)


def test_every_notebook_has_the_same_setup_cell():
    assert len({_setup_cell(nb) for nb in NOTEBOOKS}) == 1


def test_the_setup_cell_uses_a_copy_of_the_project_on_drive_and_installs_once(tmp_path):
    content, my_drive, env = _colab(tmp_path)
    copy = _copy_project(my_drive / "microfossil-ct")
    r = _run_setup(content, env, repo_url="file:///nowhere/no-such-repo")  # a clone would fail: it is not tried
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"ROOT {content / 'drive' / 'MyDrive' / 'microfossil-ct'} utils {content / 'drive'}" in r.stdout
    assert "Mounted at" in r.stdout and not (content / "microfossil-ct").exists()
    assert (content / ".microfossil_requirements").read_text() == (copy / "requirements.txt").read_text()
    import numpy
    assert f"numpy=={numpy.__version__}\n" in (content / ".microfossil_keep.txt").read_text()  # Colab's numpy is kept
    again = _run_setup(content, {**env, "PIP_REQUIRE_VIRTUALENV": "1"})  # pip would now refuse: it is not run again
    assert again.returncode == 0 and "already mounted" in again.stdout, again.stderr[-3000:]


def test_a_failed_clone_prints_gits_message_and_the_three_fixes(tmp_path):
    content, _, env = _colab(tmp_path)
    r = _run_setup(content, env, repo_url="file:///nowhere/no-such-repo")
    assert r.returncode != 0
    assert "git clone file:///nowhere/no-such-repo failed" in r.stderr
    assert "does not appear to be a git repository" in r.stderr or "not found" in r.stderr.lower()  # git's own words
    assert "Three ways to fix it: (1) put a copy of the project folder in My Drive as 'microfossil-ct'" in r.stderr
    assert "(2) set REPO_URL" in r.stderr and "(3) upload the project's zip" in r.stderr


def test_the_setup_cell_finds_a_copy_unzipped_one_folder_down_and_names_an_incomplete_one(tmp_path):
    """GitHub's zip unpacks into `microfossil-ct-main/`: uploaded as is, the copy is found one folder down. A copy
    without requirements.txt stops with the fixes, not a bare traceback."""
    content, my_drive, env = _colab(tmp_path)
    copy = _copy_project(my_drive / "microfossil-ct" / "microfossil-ct-main")
    r = _run_setup(content, env, repo_url="file:///nowhere/no-such-repo")
    assert r.returncode == 0 and f"ROOT {content / 'drive' / 'MyDrive' / 'microfossil-ct' / 'microfossil-ct-main'}" in r.stdout, r.stderr[-3000:]
    (copy / "requirements.txt").unlink()
    (content / ".microfossil_requirements").unlink()
    r = _run_setup(content, env)
    assert r.returncode != 0 and "holds utils.py but no requirements.txt" in r.stderr and "Three ways to fix it" in r.stderr


def test_in_run_pipelines_kernels_the_setup_cell_mounts_nothing(tmp_path):
    """`!python run_pipeline.py` in Colab: its kernels are headless; they cannot mount Drive (no browser to sign in)
    and need not: the project is their working folder's parent."""
    content, _, env = _colab(tmp_path)
    script = content.parent / "setup_cell.py"
    script.write_text("import google.colab\n" + _setup_cell(NOTEBOOKS[0]) + "\nprint('ROOT', ROOT)\n")
    r = subprocess.run([sys.executable, str(script)], cwd=ROOT / "notebooks", env={**env, "MICROFOSSIL_HEADLESS": "1"},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and f"ROOT {ROOT}" in r.stdout and "Mounted" not in r.stdout, r.stderr[-3000:]
    assert not (content / "drive").exists() and not (content / ".microfossil_requirements").exists()


def test_without_a_copy_the_setup_cell_clones_the_repository(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.fail("the tests run from a git clone of the project (the clone is made from it)")
    content, _, env = _colab(tmp_path)
    r = _run_setup(content, env, repo_url=f"file://{ROOT}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"ROOT {content / 'microfossil-ct'} utils {content / 'microfossil-ct' / 'utils.py'}" in r.stdout


def test_a_quick_run_02_to_05_in_colab_keeps_drive_clean(tmp_path, monkeypatch):
    """A quick run in Colab, end to end: no clone possible, a project copy on the stub Drive; quick 02 -> 05 through
    papermill runs to the end; Drive then holds the results and each phase's checkpoint (matching its record), and no
    superseded or per-epoch checkpoint, no probabilities, no per-slice PNG, and of the decoded scan one kept copy,
    its labels compressed, for the next notebook's fresh runtime (`runtime.cache_dirs`)."""
    import papermill as pm

    from microfossil.training import check_weights
    content, my_drive, _ = _colab(tmp_path, monkeypatch)
    monkeypatch.setenv("GIT_ALLOW_PROTOCOL", "none")  # any clone would fail: the project must come from the Drive copy
    copy = _copy_project(my_drive / "microfossil-ct")
    out = tmp_path / "executed"
    out.mkdir()
    for nb in NOTEBOOKS[1:5]:
        pm.execute_notebook(str(copy / "notebooks" / nb.name), str(out / nb.name), cwd=str(content),
                            kernel_name="python3", parameters={"quick": True}, progress_bar=False,
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])
    assert not (content / "microfossil-ct").exists()  # the Drive copy was used, nothing was cloned
    assert (tmp_path / "flushes.log").read_text().count("\n") == 4  # each notebook ended by flushing Drive
    run = my_drive / "microfossil_runs" / "sample_default_quick"
    assert (content / "microfossil_data" / "sample_default" / "codes.txt").exists()  # the sample on the local disk
    names = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert not [n for n in names if "progress" in n or ".partial" in n or n.startswith(("tmp/", ".staging"))]
    assert [re.sub(r"-[0-9a-f]{16}/", "-<key>/", n) for n in names if n.startswith("cache/")] == [
        "cache/sample_default-<key>/images.npy", "cache/sample_default-<key>/labels.npy.gz",
        "cache/sample_default-<key>/volume.json"]
    models = [n for n in names if n.startswith("models/")]
    phases = [f"{s}_{p}" for s in ("256", "512", "full") for p in ("frozen", "unfrozen")]
    assert set(models) - {"models/256_frozen.start.pth", "models/256_frozen.start.json"} == {
        f"models/{p}.{e}" for p in phases for e in ("pth", "json")}, models  # no resumable copy left behind
    for p in phases:
        check_weights(run, p)
    preds = [n for n in names if n.startswith("predictions/")]
    assert "predictions/labels.tif" in preds and "predictions/probs.npy" not in preds
    assert len(preds) < 30, preds  # a handful of files and ~16 previews, not one PNG per slice
    local = content / "microfossil_local"  # (Drive is unmounted now: the run's local folder is found by its name)
    assert [p.parent.parent.name.rsplit("-", 1)[0] for p in local.glob("*/predictions/probs.*.npy")] == [run.name]
    assert list(local.glob("*/cache/*"))
    assert "fossils.csv" in os.listdir(run / "exports") and (run / "metrics.json").exists()
    executed = json.loads((out / "05_predict_export.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/html", ""))
                   for c in executed["cells"] for o in c.get("outputs", []))
    assert "Drive flushed" in text and "[64/64" in text and "slices/s" in text and "specimens/s" in text


def test_a_clone_that_would_ask_for_a_sign_in_fails_fast_and_says_not_found_or_private(tmp_path):
    """GitHub answers a missing or private repository with 401, and git then asks for a user name: a notebook cell has
    no terminal, so the prompt would wait for ever. Here a local server answers 401 and the environment holds a
    credential program that never answers (a prompt nobody sees); the cell must not start it, and fails in seconds."""
    import http.server
    import threading
    import time

    class Private(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="GitHub"')
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Private)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    content, _, env = _colab(tmp_path)
    prompt = tmp_path / "prompt.sh"
    prompt.write_text(f"#!/bin/sh\ntouch {tmp_path / 'prompted'}\nsleep 600\n")
    prompt.chmod(0o755)
    url = f"http://127.0.0.1:{server.server_address[1]}/lapix-ufsc/microfossil-ct"
    t = time.time()
    try:
        r = _run_setup(content, {**env, "GIT_ASKPASS": str(prompt), "SSH_ASKPASS": str(prompt)}, repo_url=url)
    finally:
        server.shutdown()
    assert r.returncode != 0 and time.time() - t < 60
    assert not (tmp_path / "prompted").exists()
    assert f"git clone {url} failed: the repository was not found, or it is private" in r.stderr, r.stderr[-2000:]
    assert "Three ways to fix it" in r.stderr and not (content / "microfossil-ct").exists()


def test_the_setup_cell_finds_githubs_zip_on_drive_skips_a_stray_utils_and_prints_what_it_uses(tmp_path):
    """GitHub's "Download ZIP" unpacks to `microfossil-ct-main`, uploaded to My Drive as it is; a stray
    `/content/utils.py` (the working folder) is not the project. The cell prints the folder and the version, and warns
    when that copy is older than the notebook."""
    from microfossil import __version__
    content, my_drive, env = _colab(tmp_path)
    (content / "utils.py").write_text("raise SystemExit('the stray utils.py was imported')\n")
    copy = _copy_project(my_drive / "microfossil-ct-main")
    r = _run_setup(content, env, repo_url="file:///nowhere/no-such-repo")
    assert r.returncode == 0, r.stderr[-3000:]
    used = content / "drive" / "MyDrive" / "microfossil-ct-main"
    assert f"Project: {used} (microfossil-ct {__version__})" in r.stdout and f"ROOT {used} utils" in r.stdout
    assert "WARNING" not in r.stdout
    init = copy / "microfossil" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{__version__}"', '__version__ = "0.1.0"'))
    r = _run_setup(content, env)
    assert r.returncode == 0 and "(microfossil-ct 0.1.0)" in r.stdout, r.stderr[-3000:]
    assert f"WARNING: the project in {used} is version 0.1.0, older than this notebook ({__version__})" in r.stdout


def test_the_notebooks_belong_to_this_version_of_the_project():
    from microfossil import __version__
    assert f'NOTEBOOK_VERSION = "{__version__}"' in _setup_cell(NOTEBOOKS[0])


def test_a_failed_mount_says_to_delete_the_runtime_and_flush_drive_says_it_too(tmp_path, monkeypatch, capsys,
                                                                               colab_modules):
    """Mounting Drive again after `flush_and_unmount` is known to fail in Colab ("mount failed"): the cell says what to
    do, and so does `flush_drive`, which unmounts."""
    content, my_drive, env = _colab(tmp_path)
    _copy_project(my_drive / "microfossil-ct")
    r = _run_setup(content, {**env, "COLAB_STUB_MOUNT_FAILS": "1"})
    assert r.returncode != 0 and "Google Drive could not be mounted" in r.stderr and "(mount failed)" in r.stderr
    assert "Runtime > Disconnect and delete runtime, then run this notebook again from the top" in r.stderr
    from microfossil import runtime
    for k in ("MICROFOSSIL_COLAB_ROOT", "COLAB_STUB_DRIVE"):
        monkeypatch.setenv(k, env[k])
    monkeypatch.delenv("MICROFOSSIL_HEADLESS", raising=False)
    monkeypatch.setattr(runtime, "in_colab", lambda: True)
    (content / "drive").symlink_to(my_drive.parent, target_is_directory=True)
    assert runtime.flush_drive()
    assert "Runtime > Disconnect and delete runtime" in capsys.readouterr().out


def test_the_drive_writes_bench_counts_uploads_and_the_bin_as_drive_would(tmp_path):
    """bench/drive_writes.py's watcher: a file counts as written once it stops changing; a file replaced by a rename
    over it, or deleted, goes to the bin; a temporary file renamed to its name, or rewritten in place, does not."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("drive_writes", ROOT / "bench" / "drive_writes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (tmp_path / "kept.bin").write_bytes(b"k" * 100)
    watch = bench.DriveWatch(tmp_path, poll=0.01)
    tmp = tmp_path / "new.bin.partial"
    tmp.write_bytes(b"n" * 50)
    watch._step()
    tmp.rename(tmp_path / "new.bin")  # written atomically: not in the bin
    assert watch.take() == {"written_bytes": 50, "written_files": 1, "binned_bytes": 0, "binned_files": 0,
                            "drive_bytes": 150}
    with open(tmp_path / "kept.bin", "r+b") as fh:  # rewritten in place: an upload, nothing in the bin
        fh.write(b"K" * 100)
    os.utime(tmp_path / "kept.bin", ns=(1, 1))
    assert watch.take()["written_files"] == 1
    (tmp_path / "other").write_bytes(b"o" * 70)
    watch.take()
    (tmp_path / "other").replace(tmp_path / "new.bin")  # replaced: the old new.bin goes to the bin
    (tmp_path / "kept.bin").unlink()  # deleted: the bin
    got = watch.take()
    assert (got["binned_files"], got["binned_bytes"], got["written_files"], got["drive_bytes"]) == (2, 150, 0, 70)
