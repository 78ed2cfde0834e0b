"""The façade and the package's shape: utils.py small and lazy, modules readable, imports one way, and the modules
that need no torch do not load it."""
import ast
import json
import re
import subprocess
import sys

import pytest

import microfossil
import utils
from conftest import ROOT

PACKAGE = ROOT / "microfossil"
# The module map, in microfossil/__init__.py (the only one): the order imports run in (a module may import only modules
# above it; io and plots at the side: anyone may use them, io uses no other module, plots only io), [torch] marking
# those that import torch or fastai.
MAP = re.findall(r"^- `(\w+)`:(.*)$", microfossil.__doc__, re.M)
ORDER = [m for m, _ in MAP if m != "plots"]
WITHOUT_TORCH = [m for m, what in MAP if "[torch]" not in what]


def _package_imports(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}


def test_utils_is_a_small_facade_over_the_package():
    assert len((ROOT / "utils.py").read_text().splitlines()) <= 150
    for name in utils.__all__:  # every name resolves, from the module the façade says
        assert getattr(utils, name) is getattr(__import__(f"microfossil.{utils._MODULE_OF[name]}", fromlist=[name]), name)
    with pytest.raises(AttributeError, match="microfossil package"):
        utils.no_such_name  # noqa: B018


def test_modules_are_a_comfortable_read_and_import_one_way():
    modules = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert sorted(ORDER + ["plots"]) == modules, "a new module: add it to the map in microfossil/__init__.py"
    assert MAP[-1][0] == "plots" and len(set(ORDER)) == len(ORDER)
    for m in modules:
        assert len((PACKAGE / f"{m}.py").read_text().splitlines()) <= 500, m
    assert _package_imports("plots") <= {"io"} and _package_imports("io") == set()
    for i, m in enumerate(ORDER):
        later = _package_imports(m) - {"io", "plots"} - set(ORDER[:i])
        assert not later, f"{m} imports {later}, which come after it"


def test_utils_holds_the_names_the_notebooks_use():
    used = set()
    for nb in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"):
        for c in json.loads(nb.read_text())["cells"]:
            if c["cell_type"] != "code":
                continue
            used |= {n.attr for n in ast.walk(ast.parse("\n".join(ln for ln in "".join(c["source"]).splitlines()
                                                                  if not ln.lstrip().startswith(("!", "%")))))
                     if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "utils"}
    assert used == set(utils.__all__), f"not in utils: {used - set(utils.__all__)}, unused: {set(utils.__all__) - used}"


def test_modules_without_torch_and_the_review_notebook_load_no_torch():
    """06 (the review) runs where torch is absent or slow to import; so do the data, specimen and evaluation modules."""
    names_06 = ["use_run", "ReviewSession", "ReviewPanel", "has_widget_frontend", "classify_specimens", "read_review",
                "view_specimen", "view_specimens"]
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import utils\n"
            + "".join(f"import microfossil.{m}\n" for m in WITHOUT_TORCH)
            + "".join(f"utils.{n}\n" for n in names_06)
            + "print(sorted(m for m in ('torch', 'fastai', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
