"""Colab, simulated: a stub `google.colab` (tests/colab_stub, its `drive.mount` links a folder that stands for Google
Drive) and `/content` moved to a temporary folder. The notebooks' setup cell finds the project (on the runtime, a
copy on Drive, a clone) or says how to fix it; a quick 02 -> 05 runs through papermill with its run folder on the
stub Drive, which afterwards holds no superseded checkpoint and no per-slice files, and one kept copy of the decoded
scan."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

STUB = ROOT / "tests" / "colab_stub"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _setup_cell(nb):
    cells = json.loads(Path(nb).read_text())["cells"]
    return next("".join(c["source"]) for c in cells if c["cell_type"] == "code"
                and "# Setup, safe to re-run." in "".join(c["source"]))


def _colab(tmp_path, monkeypatch=None):
    """`/content` and the stub Drive under tmp_path; the environment of a Colab kernel (as a dict, and set in this
    process with `monkeypatch` for papermill's kernels, which inherit it)."""
    content, drive = tmp_path / "content", tmp_path / "gdrive"
    (drive / "MyDrive").mkdir(parents=True)
    content.mkdir()
    ipython = tmp_path / "ipython"  # Colab's kernel has google.colab imported before the first cell
    (ipython / "profile_default" / "startup").mkdir(parents=True)
    (ipython / "profile_default" / "startup" / "00-colab.py").write_text("import google.colab\n")
    env = {"PYTHONPATH": str(STUB), "IPYTHONDIR": str(ipython), "MICROFOSSIL_COLAB_ROOT": str(content),
           "COLAB_STUB_DRIVE": str(drive), "PIP_NO_INDEX": "1", "MPLBACKEND": "Agg"}
    if monkeypatch is not None:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv("MICROFOSSIL_HEADLESS", raising=False)
    return content, drive / "MyDrive", {**os.environ, **env}


def _copy_project(dest):
    """The project as a user would upload it: the files git knows (tracked, or new and not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    return dest


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
    assert set(models) - {"models/256_frozen.start.pth", "models/256_frozen.start.json"} - {
        f"models/resume.{s}.{e}" for s in "ab" for e in ("pth", "json")} == {
        f"models/{p}.{e}" for p in phases for e in ("pth", "json")}, models
    for s in "ab":  # a resumable copy left behind would be a superseded checkpoint
        assert not (run / "models" / f"resume.{s}.pth").exists() or (run / "models" / f"resume.{s}.pth").stat().st_size == 0
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
