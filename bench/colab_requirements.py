"""What `pip install -r requirements.txt` would change in Colab: a dry run over Colab's published package list.

    curl -O https://raw.githubusercontent.com/googlecolab/backend-info/main/pip-freeze.gpu.txt
    python bench/colab_requirements.py pip-freeze.gpu.txt

A fresh virtual environment is given every package of the list as installed (its name and version only, as pip
sees them: no code is installed), then `pip install --dry-run -r requirements.txt` runs in it (it needs PyPI).
Printed: pip's own "Would install" line, and each package it would add or replace, with Colab's version beside.
Exits 1 when one of the packages Colab's notebooks rely on (`KEEP`) would change. This runs with the Python it is
started with, not necessarily Colab's (3.12/3.13): pip's choice among versions can differ by Python version.
"""
import argparse
import json
import re
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEP = ("torch", "torchvision", "fastai", "fastcore", "fastprogress", "ipywidgets", "ipykernel", "numpy")


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("freeze", help="Colab's `pip freeze` (pip-freeze.gpu.txt of googlecolab/backend-info)")
    ap.add_argument("--requirements", default=str(ROOT / "requirements.txt"))
    args = ap.parse_args(argv)
    colab = {}
    for line in Path(args.freeze).read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if m:
            colab[_norm(m[1])] = (m[1], m[2])
    with tempfile.TemporaryDirectory() as tmp:
        env_dir = Path(tmp) / "colab"
        venv.create(env_dir, with_pip=True)
        py = env_dir / "bin" / "python"
        site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
        for key, (name, version) in colab.items():
            if key in ("pip", "setuptools", "wheel"):
                continue
            info = site / f"{name.replace('-', '_')}-{version}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            (info / "INSTALLER").write_text("colab-list\n")
            (info / "RECORD").write_text("")
        report = Path(tmp) / "report.json"
        run = subprocess.run([str(py), "-m", "pip", "install", "--dry-run", "--report", str(report), "-r",
                              args.requirements], capture_output=True, text=True)
        print("\n".join(line for line in run.stdout.splitlines() if line.startswith(("Would install", "ERROR"))))
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        changes = []
        for item in json.loads(report.read_text())["install"]:
            name, version = item["metadata"]["name"], item["metadata"]["version"]
            had = colab.get(_norm(name), (None, None))[1]
            changes.append((_norm(name), version, had))
    print(f"{len(colab)} packages in Colab's list; pip would install {len(changes)}:")
    for name, version, had in sorted(changes):
        print(f"  {name} {version}" + (f"  (Colab has {had}: REPLACED)" if had else "  (new)"))
    touched = [n for n, _, had in changes if had and n in KEEP]
    print("Colab's " + ", ".join(KEEP) + (f": {', '.join(touched)} would change" if touched else ": all kept"))
    return 1 if touched else 0


if __name__ == "__main__":
    sys.exit(main())
