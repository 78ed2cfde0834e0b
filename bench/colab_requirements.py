"""What `pip install -r requirements.txt` would change in Colab: a dry run over Colab's published package list.

    curl -O https://raw.githubusercontent.com/googlecolab/backend-info/main/pip-freeze.gpu.txt
    python bench/colab_requirements.py pip-freeze.gpu.txt --python python3.12

A fresh virtual environment is given every package of the list as installed, as pip sees it: a dist-info record
with the package's real metadata (its `Requires-Dist` lines: Colab's own pins), no code. Then
`pip install --dry-run -r requirements.txt` runs in it (it needs PyPI). Printed: pip's own "Would install" line,
each package it would add or replace with Colab's version beside, and the packages of Colab's list whose own
requirements the change would break (`pip check` before and after, in the same environment: what pip's resolver
does not look at, since it only follows the requirements it is given). Exits 1 when one of the packages Colab's
notebooks rely on (`KEEP`) would change, or when a package of Colab's list would be left with an unmet requirement.

The metadata comes from PyPI (the simple index, then each wheel's `.metadata` file, PEP 658; the wheel itself when
there is none) and is cached (`--cache`, default ~/.cache/microfossil-ct/colab-metadata): the first run fetches
about 700 small files, a re-run none. Offline (`--offline`, or PyPI unreachable) a package that is not cached gets
a stand-in record, its name and version only, and a warning says how many: pip then takes its dependencies as met.
Packages the list holds as a URL (google-colab, the RAPIDS wheels) are left out; a local build such as
torch 2.11.0+cu128 gets a stand-in (PyPI's wheel of 2.11.0 is not that build: its CUDA packages differ).

`--write-constraints FILE` writes Colab's version of every package the requirements pull in, for
`pip install -r requirements-dev.txt -c constraints-colab.txt` (bench/colab_versions.sh): torch, torchvision and
what only they pull in are left out (this machine's torch is not Colab's CUDA build), as are pip's own tools.

pip's choice among versions, and the requirements that apply (markers), depend on the Python version: `--python`
picks the interpreter of the environment (Colab: 3.12); by default the one running this script.
"""
import argparse
import concurrent.futures
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename
    from packaging.version import InvalidVersion, Version
except ImportError:  # pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import parse_wheel_filename
    from pip._vendor.packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
KEEP = ("torch", "torchvision", "fastai", "fastcore", "fastprogress", "ipywidgets", "ipykernel", "numpy")
INDEX = "https://pypi.org/simple"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "microfossil-ct" / "colab-metadata"
TOOLS = ("pip", "setuptools", "wheel")  # never pinned: the installer's own (torch 2.14 needs setuptools>=77)
NOT_PINNED = ("torch", "torchvision")  # Colab's CUDA builds; what only they require is not pinned either
WHEEL_TAG = ("cp312", "manylinux", "x86_64")  # Colab's: the wheel whose metadata is read, when they differ


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def read_freeze(path):
    """{normalized name: (name, version)} of the `name==version` lines of a `pip freeze` (URL lines are left out)."""
    colab = {}
    for line in Path(path).read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if m:
            colab[_norm(m[1])] = (m[1], m[2])
    return colab


class Fetcher:
    """Real METADATA of `name==version` from PyPI, through a cache folder. `None` where there is none to be had:
    offline, or no wheel of that version on PyPI."""

    def __init__(self, cache, index=INDEX, offline=False):
        self.cache, self.index, self.offline = Path(cache), index.rstrip("/"), offline
        self.cache.mkdir(parents=True, exist_ok=True)
        self.down = None  # why PyPI is out of reach, once a request failed so: no more requests then
        self.fetched, self.lock = 0, threading.Lock()

    def _get(self, url, headers=None):
        for attempt in range(4):  # a name lookup fails now and then under many requests at once
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as r:
                    return r.read()
            except urllib.error.URLError as e:
                if attempt == 3 or (isinstance(e, urllib.error.HTTPError) and e.code < 500):
                    raise
                time.sleep(2 ** attempt)

    def get(self, name, version):
        stem = self.cache / f"{_norm(name)}-{version}"
        meta, none = Path(f"{stem}.METADATA"), Path(f"{stem}.none")
        if meta.exists():
            return meta.read_text(encoding="utf-8")
        if none.exists() or self.offline or self.down or "+" in version:
            return None
        try:
            text, why = self._fetch(name, version)
        except urllib.error.HTTPError as e:
            if e.code != 404:
                self.down = f"HTTP {e.code} from {e.url}"
                return None
            text, why = None, f"{name} is not on the index"
        except (urllib.error.URLError, OSError) as e:
            self.down = f"{type(e).__name__}: {e}"
            return None
        except (ValueError, KeyError, IndexError, zipfile.BadZipFile):
            return None  # this package's files are not as expected: a stand-in, asked again next time
        if text is None:
            none.write_text(why + "\n")  # a fact about the index, not a failure: not asked again
            return None
        text = text.replace("\r\n", "\n")  # some wheels write CRLF
        tmp = Path(f"{meta}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(meta)
        with self.lock:
            self.fetched += 1
        return text

    def _fetch(self, name, version):
        index = json.loads(self._get(f"{self.index}/{_norm(name)}/",
                                     {"Accept": "application/vnd.pypi.simple.v1+json"}))
        wheels = []
        for f in index.get("files", []):
            try:
                _, v, _, tags = parse_wheel_filename(f["filename"])
                if v == Version(version):
                    wheels.append((_score(tags), f))
            except (ValueError, InvalidVersion):
                continue  # an sdist, or a name pip could not read either
        if not wheels:
            return None, f"no wheel of {name} {version} on the index"
        f = max(wheels, key=lambda w: w[0])[1]
        url = f["url"].split("#")[0]
        try:
            return self._get(url + ".metadata").decode("utf-8"), None
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
        # no .metadata file beside it: the wheel's own, read by range requests (a wheel can weigh a gigabyte)
        wheel = _RangeFile(lambda a, b: self._get(url, {"Range": f"bytes={a}-{b}"}), f.get("size"))
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
            return z.read(names[0]).decode("utf-8"), None


class _RangeFile(io.RawIOBase):
    """A remote file, read in blocks by HTTP range requests, for `zipfile` (which seeks to the end, then to the
    member): a wheel's METADATA in a few requests. `get(first, last)` returns those bytes (inclusive)."""
    BLOCK = 1 << 18

    def __init__(self, get, size):
        if not size:
            raise ValueError("the index gives no file size")
        self.get, self.size, self.pos, self.blocks = get, int(size), 0, {}

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def readinto(self, buf):
        n = max(0, min(len(buf), self.size - self.pos))
        out = bytearray()
        while len(out) < n:
            k, off = divmod(self.pos + len(out), self.BLOCK)
            if k not in self.blocks:
                self.blocks[k] = self.get(k * self.BLOCK, min(self.size, (k + 1) * self.BLOCK) - 1)
            out += self.blocks[k][off:off + n - len(out)]
        buf[:n] = out
        self.pos += n
        return n


def _score(tags):
    """How close a wheel's tags are to Colab's (its metadata is the one read)."""
    best = 0
    for t in tags:
        s = (2 if t.interpreter == WHEEL_TAG[0] else 1 if t.interpreter.startswith("py3") else 0)
        s += (2 if WHEEL_TAG[1] in t.platform and WHEEL_TAG[2] in t.platform else 1 if t.platform == "any" else 0)
        best = max(best, s)
    return best


def _field(text, key):
    """The first `key: value` of a METADATA text's header ("" where there is none)."""
    m = re.search(rf"^{key}: *(.+?) *$", text.split("\n\n", 1)[0], re.M)
    return m[1] if m else ""


def load_metadata(colab, fetcher, workers=8):
    """{normalized name: METADATA text or None} for every package of the list, fetched in parallel."""
    def one(item):
        key, (name, version) = item
        text = fetcher.get(name, version)
        if text is not None:
            try:  # the metadata of another version would be no better than none
                same = _norm(_field(text, "Name")) == key and Version(_field(text, "Version")) == Version(version)
            except InvalidVersion:
                same = False
            text = text if same else None
        return key, text
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, colab.items()))


def _record(site, name, version, metadata=None):
    """A dist-info folder that makes pip see `name` `version` as installed (with `metadata`'s requirements)."""
    info = site / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(metadata or f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                                   encoding="utf-8")
    (info / "INSTALLER").write_text("colab-list\n")
    (info / "RECORD").write_text("")
    return info


def _from_report(meta):
    """A METADATA text from the JSON form of the metadata in pip's installation report."""
    lines = ["Metadata-Version: 2.1", f"Name: {meta['name']}", f"Version: {meta['version']}"]
    if meta.get("requires_python"):
        lines.append(f"Requires-Python: {meta['requires_python']}")
    lines += [f"Provides-Extra: {e}" for e in meta.get("provides_extra", [])]
    lines += [f"Requires-Dist: {r}" for r in meta.get("requires_dist", [])]
    return "\n".join(lines) + "\n"


def _pip_check(py):
    out = subprocess.run([str(py), "-m", "pip", "check"], capture_output=True, text=True).stdout
    return {line.strip() for line in out.splitlines() if "has requirement" in line or "which is not installed" in line}


def _requirement_names(path, seen=None):
    """The requirements of a requirements file (following `-r`), as `Requirement`s."""
    seen = seen if seen is not None else set()
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith(("-r ", "--requirement ")):
            sub = (Path(path).parent / line.split(None, 1)[1]).resolve()
            if sub not in seen:
                seen.add(sub)
                out += _requirement_names(sub, seen)
        elif line and not line.startswith(("#", "-")):
            out.append(Requirement(line))
    return out


def closure(requirements, metadata, report, env):
    """Normalized names of every package the requirements pull in: through the metadata of Colab's versions, and of
    what pip would add (its report); not into NOT_PINNED's own requirements."""
    requires = {}
    for key, text in metadata.items():
        if text:
            body = text.split("\n\n", 1)[0]
            requires[key] = [Requirement(r) for r in re.findall(r"^Requires-Dist: *(.+?) *$", body, re.M)]
    for item in report:
        requires[_norm(item["metadata"]["name"])] = [Requirement(r) for r in item["metadata"].get("requires_dist", [])]
    seen = {}  # name: the extras whose requirements were followed ("": the plain ones)
    todo = list(requirements)
    while todo:
        req = todo.pop()
        key = _norm(req.name)
        have = seen.get(key, set())
        new = ({""} | set(req.extras)) - have
        if not new:
            continue
        seen[key] = have | new
        if key in NOT_PINNED or key in TOOLS:
            continue
        todo += [dep for dep in requires.get(key, [])
                 if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in new)]
    return set(seen)


def write_constraints(path, names, colab, excluded, freeze, source, command, requirements):
    """`name==Colab's version` for the names in Colab's list, with a header saying where they come from."""
    digest = hashlib.sha256(Path(freeze).read_bytes()).hexdigest()[:12]
    keep = [k for k in names if k in colab and k not in NOT_PINNED and k not in TOOLS and k not in excluded]
    absent = sorted(k for k in names if k not in colab and k not in TOOLS)
    wrap = lambda text: textwrap.fill(text, 118, initial_indent="# ", subsequent_indent="# ",  # noqa: E731
                                      break_on_hyphens=False, break_long_words=False)
    head = [
        f"# Colab's versions of every package {requirements} pulls in, for",
        f"#     pip install -r {requirements} -c {Path(path).name}      (bench/colab_versions.sh runs it)",
        wrap(f"From Colab's published package list: {source} (sha256 {digest}...)."),
        wrap(f"Written by: {command} (run it again when Colab's list changes)."),
        wrap("Not pinned: torch and torchvision (Colab's are CUDA builds, e.g. torch 2.11.0+cu128, a multi-GB download "
             "that is not installed for the tests: the machine's own build is installed first and kept) and what only "
             "they require (triton, the CUDA packages, sympy, ...); pip, setuptools and wheel; and the packages Colab "
             "does not ship, which pip picks as it would in Colab: " + (", ".join(absent) or "none") + "."),
    ]
    if excluded:
        head.append(wrap("Left to pip, because the requirements themselves exclude Colab's version: "
                         + ", ".join(sorted(excluded)) + "."))
    pins = sorted((colab[k] for k in keep), key=lambda nv: _norm(nv[0]))
    Path(path).write_text("\n".join(head) + "\n" + "".join(f"{n}=={v}\n" for n, v in pins))
    return pins


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("freeze", help="Colab's `pip freeze` (pip-freeze.gpu.txt of googlecolab/backend-info)")
    ap.add_argument("--requirements", default=str(ROOT / "requirements.txt"))
    ap.add_argument("--python", default=sys.executable, help="the interpreter of the environment (Colab: 3.12)")
    ap.add_argument("--cache", default=str(CACHE), help="where fetched metadata is kept (default: %(default)s)")
    ap.add_argument("--index", default=INDEX, help="the simple index the metadata comes from (JSON, PEP 691)")
    ap.add_argument("--offline", action="store_true", help="fetch nothing: cached metadata, else stand-ins")
    ap.add_argument("--write-constraints", metavar="FILE", help="write Colab's pins of what the requirements pull in")
    ap.add_argument("--source", default="https://github.com/googlecolab/backend-info/blob/main/pip-freeze.gpu.txt",
                    help="where the list came from, for the constraints file's header")
    args = ap.parse_args(argv)
    colab = read_freeze(args.freeze)
    fetcher = Fetcher(args.cache, args.index, args.offline)
    metadata = load_metadata(colab, fetcher)
    real = sum(1 for k, t in metadata.items() if t)
    listed = len(colab)
    print(f"{real} of {listed} packages with their real dependency lists ({fetcher.fetched} fetched now, "
          f"the rest from {args.cache})")
    if real < listed:
        missing = sorted(colab[k][0] for k, t in metadata.items() if not t)
        why = ("offline" if args.offline else f"PyPI out of reach ({fetcher.down})" if fetcher.down
               else "no wheel of that version on PyPI, or a local build")
        print(f"WARNING: {len(missing)} stand-in records, name and version only ({why}): pip takes their "
              f"requirements as met: {', '.join(missing[:12])}{' ...' if len(missing) > 12 else ''}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        env_dir = Path(tmp) / "colab"
        subprocess.run([args.python, "-m", "venv", str(env_dir)], check=True)
        py = env_dir / "bin" / "python"
        if "pip" in colab:  # Colab's pip decides in Colab; without an index the environment's own is used
            subprocess.run([str(py), "-m", "pip", "install", "-q", f"pip=={colab['pip'][1]}"], capture_output=True)
        probe = ("import json, sysconfig; from pip._vendor.packaging.markers import default_environment as d; "
                 "print(json.dumps([sysconfig.get_paths()['purelib'], d()]))")
        site, env = json.loads(subprocess.run([str(py), "-c", probe], capture_output=True, text=True,
                                              check=True).stdout)
        site = Path(site)
        own = {_norm(d.name.split("-")[0]) for d in site.glob("*.dist-info")}  # pip (setuptools before 3.12)
        records = {}
        for key, (name, version) in colab.items():
            if key not in own:
                records[key] = _record(site, name, version, metadata.get(key))
        before = _pip_check(py)
        report = Path(tmp) / "report.json"
        run = subprocess.run([str(py), "-m", "pip", "install", "--dry-run", "--report", str(report), "-r",
                              args.requirements], capture_output=True, text=True)
        print("\n".join(line for line in run.stdout.splitlines() if line.startswith(("Would install", "ERROR"))))
        if run.returncode:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        items = json.loads(report.read_text())["install"]
        changes = []
        for item in items:
            name, version = item["metadata"]["name"], item["metadata"]["version"]
            key = _norm(name)
            had = colab.get(key, (None, None))[1]
            changes.append((key, version, had))
            if key in records:
                shutil.rmtree(records.pop(key))
            records[key] = _record(site, name, version, _from_report(item["metadata"]))
        broken = sorted(_pip_check(py) - before)
    print(f"{len(colab)} packages in Colab's list; pip would install {len(changes)}:")
    for name, version, had in sorted(changes):
        print(f"  {name} {version}" + (f"  (Colab has {had}: REPLACED)" if had else "  (new)"))
    if broken:
        print("Packages of Colab's list whose own requirements would no longer be met:")
        print("\n".join(f"  {line}" for line in broken))
    touched = [n for n, _, had in changes if had and n in KEEP]
    print("Colab's " + ", ".join(KEEP) + (f": {', '.join(touched)} would change" if touched else ": all kept"))
    if args.write_constraints:
        reqs = _requirement_names(args.requirements)
        excluded = {_norm(r.name) for r in reqs if _norm(r.name) in colab
                    and not r.specifier.contains(colab[_norm(r.name)][1], prereleases=True)}
        names = closure(reqs, metadata, items, env)
        command = " ".join(["python bench/colab_requirements.py", Path(args.freeze).name]
                           + (["--python", Path(args.python).name] if args.python != sys.executable else [])
                           + ["--requirements", Path(args.requirements).name, "--write-constraints",
                              Path(args.write_constraints).name])
        pins = write_constraints(args.write_constraints, names, colab, excluded, args.freeze, args.source, command,
                                 Path(args.requirements).name)
        print(f"{args.write_constraints}: {len(pins)} pins")
    return 1 if touched or broken else 0


if __name__ == "__main__":
    sys.exit(main())
