"""The stub Colab's folders and environment, for the tests (tests/test_colab.py) and bench/drive_writes.py."""
import os
import shutil
import subprocess
from pathlib import Path

STUB = Path(__file__).resolve().parent


def colab_env(tmp):
    """`/content` (`tmp/content`) and the stub Drive (`tmp/gdrive`, holding `MyDrive/`) made under `tmp`, and the
    environment of a Colab kernel: `(content, gdrive, env)`, `env` holding only what it sets. Colab's kernel has
    google.colab imported before the first cell: an IPython start-up file does it here."""
    tmp = Path(tmp)
    content, gdrive = tmp / "content", tmp / "gdrive"
    (gdrive / "MyDrive").mkdir(parents=True)
    content.mkdir()
    startup = tmp / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text("import google.colab\n")
    env = {"PYTHONPATH": os.pathsep.join([str(STUB), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "IPYTHONDIR": str(tmp / "ipython"), "MICROFOSSIL_COLAB_ROOT": str(content), "COLAB_STUB_DRIVE": str(gdrive),
           "PIP_NO_INDEX": "1", "MPLBACKEND": "Agg"}
    return content, gdrive, env


def copy_project(src, dest):
    """The project at `src` as a user would upload it to `dest`: the files git knows (tracked, or new and not
    ignored). Returns `dest`."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=src, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for f in files:
        if (Path(src) / f).is_file():
            (Path(dest) / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(src) / f, Path(dest) / f)
    return Path(dest)
