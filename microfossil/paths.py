"""Where the data and the run live: the dataset folder (the embedded sample, a download, or the user's own) and
the run folder every notebook reads and writes (`work_dir`)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

from .io import read_json, replacing, write_text
from .params import RUN_SETTINGS, check_params, use_schedule
from .runtime import colab_root, on_drive, runs_home, write_in_place
from .sample import SAMPLE_SIZES, ensure_sample
from .readers import _stem
from .scans import scan_parts
from .volume import DatasetError

_CHECKOUT = Path(__file__).resolve().parents[1]
# The project folder: data/ and runs/ go there. A package installed with pip (site-packages) uses the folder it is
# run from instead.
ROOT = _CHECKOUT if (_CHECKOUT / "pyproject.toml").exists() else Path.cwd()


def data_home():
    """Where the embedded sample is made and downloads are unzipped: the project's `data/`, or the runtime's local
    disk when the project is a copy on Google Drive (a dataset is read slice by slice; Drive is slow and small)."""
    return colab_root() / "microfossil_data" if on_drive(ROOT) else ROOT / "data"


def sample_dir(sample_size="default", seed=0):
    """The folder of the embedded sample of `sample_size` drawn from `seed` (each seed its own sample and run folder)."""
    return data_home() / (f"sample_{sample_size}" + (f"_seed{seed}" if seed else ""))


def resolve_paths(data_dir=None, work_dir=None, quick=False, data_url=None, sample_size="default", seed=0, smoke=False):
    """Return `(data_dir, work_dir)` as Paths, making the embedded sample or downloading `data_url` when needed.

    `data_dir=None` means the embedded sample of size `sample_size` (a key of
    `SAMPLE_SIZES`) drawn from `seed`, generated once under `data/` (`sample_default`, then
    `sample_default_seed1`, ...; `data_home`). `work_dir=None` means
    `runs/<dataset>[_quick|_smoke]` locally, and the same under MyDrive/microfossil_runs in Colab (`runtime.runs_home`).
    """
    if data_url:
        data_dir = fetch_dataset(data_url)
    elif data_dir is None:
        if sample_size not in SAMPLE_SIZES:
            raise ValueError(f"sample_size must be one of {list(SAMPLE_SIZES)}, got {sample_size!r}")
        data_dir = ensure_sample(sample_dir(sample_size, seed), *SAMPLE_SIZES[sample_size], seed=seed)
        if not (quick or smoke):  # a data_dir forgotten in this notebook would otherwise go unnoticed
            print(f"data_dir is None: this notebook uses the embedded synthetic sample ({data_dir}), not a scan of "
                  "yours. To use your scan, set data_dir in 01's parameters cell (the next notebooks read it from the run "
                  "folder) and run again.")
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.exists():
        raise DatasetError(f"data_dir {data_dir} does not exist. Set `data_dir` to the scan (a dataset folder with "
                           "train/, train_masks_labels/ and codes.txt, a folder of slices or a DICOM series, or one "
                           "volume file), or leave it None for the embedded sample.")
    if work_dir is None:
        base = runs_home() or ROOT / "runs"
        name = _stem(data_dir) if data_dir.is_file() else data_dir.name  # core_2.5um.nrrd: core_2.5um
        work_dir = base / (name + ("_smoke" if smoke else "_quick" if quick else ""))
    work_dir = Path(work_dir).expanduser().resolve()
    if work_dir == data_dir or (data_dir.is_dir() and data_dir in work_dir.parents):
        raise DatasetError(f"work_dir {work_dir} is inside the dataset folder {data_dir}; "
                           "the dataset is never written to, so choose a work_dir outside it.")
    work_dir.mkdir(parents=True, exist_ok=True)
    return data_dir, work_dir


RUN_FILE = "run.json"  # in the run folder: the run's settings (params.RUN_SETTINGS), as the notebooks last used them


def last_run_file():
    """Where the last run folder a notebook used is noted: `last_run.json` beside the default run folders (the
    project's `runs/`, or `MyDrive/microfossil_runs` in Colab, where a fresh runtime finds it); the environment's
    `MICROFOSSIL_LAST_RUN` when set (the tests)."""
    return Path(os.environ.get("MICROFOSSIL_LAST_RUN") or (runs_home() or ROOT / "runs") / "last_run.json")


def _write_small(path, text):
    """A small record, written only when it changes; on Drive in place (nothing in the trash)."""
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    (write_in_place if on_drive(path) and path.exists() else write_text)(path, text)


def record_run(work_dir, settings, by):
    """Merge `settings` (names of `params.RUN_SETTINGS`) into `work_dir/run.json`, and note `work_dir` as the last run.
    A dataset the run's settings make again (the embedded sample of its `sample_size` and `seed`, the download of its
    `data_url`) is recorded by how it is made, not by its path (which a fresh Colab runtime does not have); any other
    is recorded by its path, wherever it lies (in data/ too)."""
    work_dir = Path(work_dir)
    settings = dict(settings)
    earlier = read_json(work_dir / RUN_FILE) or {}
    made = {**RUN_SETTINGS, **earlier, **settings}
    if settings.get("data_dir") is not None and (made.get("data_url") or Path(settings["data_dir"]).resolve()
                                                 == sample_dir(made["sample_size"], made["seed"]).resolve()):
        settings["data_dir"] = None
    record = {**earlier, **{k: v for k, v in settings.items() if k in RUN_SETTINGS}}
    record["data_dir"] = None if record.get("data_dir") is None else str(record["data_dir"])
    _write_small(work_dir / RUN_FILE, json.dumps({**record, "set_by": by}, indent=1, sort_keys=True) + "\n")
    _write_small(last_run_file(), json.dumps({"work_dir": str(work_dir)}) + "\n")
    return record


def use_run(values, notebook, quick=None, smoke=None):
    """Settle the run of notebook `notebook` ("02"), updating `values` (its `globals()`); return `(data_dir, work_dir)`.

    The run's settings (`params.RUN_SETTINGS`) are typed once: a notebook takes from `work_dir/run.json` every one it
    does not set itself (in its parameters cell, or with `-p`), and records those it uses there. With neither
    `work_dir` nor `data_dir` set, the run is the last one a notebook used (`last_run_file`), else the embedded
    sample's. Then quick mode's or smoke's schedule (`quick`, `smoke`: `use_schedule`'s), every parameter checked
    (`check_params`), and the settings taken from the record printed."""
    check_params(values)
    explicit = {k for k in RUN_SETTINGS if k in values}
    work_dir, where = values.get("work_dir"), ""
    if work_dir is None and not {"data_dir", "data_url"} & explicit:
        last = read_json(last_run_file()) or {}
        if last.get("work_dir") and (Path(last["work_dir"]) / RUN_FILE).is_file():
            work_dir, where = last["work_dir"], f", the last run ({last_run_file()})"
    record = (read_json(Path(work_dir) / RUN_FILE) or {}) if work_dir is not None else {}
    for k in ("data_dir", "data_url", "sample_size", "seed", "quick", "smoke"):
        if k not in explicit:
            values[k] = record.get(k, RUN_SETTINGS[k])
    data_dir, work_dir = resolve_paths(values["data_dir"], work_dir, values["quick"], values["data_url"],
                                       values["sample_size"], values["seed"], values["smoke"])
    record = record or read_json(work_dir / RUN_FILE) or {}
    values.update({k: record.get(k, RUN_SETTINGS[k]) for k in RUN_SETTINGS if k not in explicit and k not in values})
    if values["quick"] and quick:
        use_schedule(values, notebook, **quick)
    if values["smoke"] and smoke:
        use_schedule(values, notebook, "smoke", **smoke)
    check_params(values)
    record_run(work_dir, {k: values[k] for k in RUN_SETTINGS}, f"{notebook} {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"data_dir: {data_dir}\nwork_dir: {work_dir}{where}")
    shown = [k for k in RUN_SETTINGS if k not in explicit and k in record and k != "data_dir"]
    if shown:
        print(f"from the run's settings ({RUN_FILE}, set by {record.get('set_by', 'an earlier notebook')}): "
              + ", ".join(f"{k} {values[k]!r}" for k in shown))
    values["data_dir"], values["work_dir"] = data_dir, work_dir
    return data_dir, work_dir


def _download(data_url, archive):
    """Copy or download the zip at `data_url` (a local path, a Google Drive id/link or a URL) to `archive`."""
    if Path(data_url).expanduser().is_file():  # a zip already on disk
        shutil.copyfile(Path(data_url).expanduser(), archive)
    elif "drive.google.com" in data_url or not re.match(r"^[a-z]+://", data_url):
        import gdown  # Google Drive id or share link
        kw = {"url": data_url, "fuzzy": True} if "://" in data_url else {"id": data_url}
        if gdown.download(output=str(archive), quiet=False, **kw) is None:
            raise OSError("gdown returned nothing (is the file shared as 'anyone with the link'?)")
    else:
        import urllib.request
        with urllib.request.urlopen(data_url, timeout=60) as r, open(archive, "wb") as f:
            shutil.copyfileobj(r, f)


def fetch_dataset(data_url, dest=None, holds="train", what="dataset"):
    """Download and unzip the dataset at `data_url` (Google Drive id/URL, HTTP URL or local zip) once; return its folder.

    The archive is unzipped under `data/downloads/<hash>/` and reused on later calls. The
    returned folder is the one inside the archive that holds `train/` (`holds`: a model
    bundle's archive is fetched the same way, the folder holding `bundle.json`); archive junk (macOS's
    `__MACOSX/` copies, `._*` and `.DS_Store` files) is ignored, and two candidate dataset
    folders are an error listing both. The download is marked complete (`.complete`) only once
    a dataset folder was found in it, so after a failed or wrong download a re-run tries again.
    """
    dest = Path(dest or data_home() / "downloads" / hashlib.sha1(data_url.encode()).hexdigest()[:10])
    done, unzipped = dest / ".complete", dest / "unzipped"
    if not done.exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = dest / "dataset.zip"
        print(f"Downloading {data_url} -> {archive}")
        try:
            _download(data_url, archive)
        except Exception as e:
            raise DatasetError(f"Could not download {data_url}: {e}. Check the link and the network, or "
                               "download the zip by hand, unzip it and set `data_dir` to its folder.") from e
        try:
            with replacing(unzipped) as tmp, zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        except zipfile.BadZipFile as e:
            raise DatasetError(f"{archive} downloaded from {data_url} is not a zip file. "
                               "Point `data_url` at a zipped dataset folder.") from e
        _dataset_root(unzipped, data_url, holds, what)  # before .complete: a wrong archive is fetched again next time
        archive.unlink()
        done.write_text(data_url)
    return _dataset_root(unzipped, data_url, holds, what)


def _is_junk(part): return part == "__MACOSX" or part.startswith("._") or part == ".DS_Store"


def _dataset_root(unzipped, data_url, holds="train", what="dataset"):
    """The one folder of the unzipped archive that holds `holds` (`train/`), archive junk ignored; for a dataset with no
    `train/` (a scanner's folder, a volume file), the archive's one top folder, or the archive itself."""
    roots = sorted(p.parent for p in unzipped.rglob(holds)
                   if not any(_is_junk(part) for part in p.relative_to(unzipped).parts))
    top = [p for p in unzipped.iterdir() if not _is_junk(p.name)]
    if not roots and holds == "train" and top:
        root = top[0] if len(top) == 1 and top[0].is_dir() else unzipped
        try:
            scan_parts(root, require_labels=False)
        except DatasetError as e:
            raise DatasetError(f"The archive from {data_url} holds no train/ folder and no scan: {e}") from None
        return root
    if not roots:
        name = f"{holds}/ folder" if holds == "train" else holds
        raise DatasetError(f"The archive from {data_url} holds no {name}; see README.md for what a {what} holds.")
    if len(roots) > 1:
        raise DatasetError(f"The archive from {data_url} holds {len(roots)} {what} folders (each with a {holds}): "
                           + ", ".join(str(r.relative_to(unzipped)) or "." for r in roots)
                           + f". Zip one {what} only, or point at one of them under {unzipped}.")
    return roots[0]
