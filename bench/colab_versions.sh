#!/usr/bin/env bash
# The tests at Colab's versions: a fresh virtual environment with Colab's preinstalled versions of everything the
# requirements pull in (constraints-colab.txt, from Colab's published package list), then the notebook smoke tests
# and the widget tests in it. CI installs the newest releases (pandas 3, plotly 7, numpy 2.5...); Colab ships older
# ones (pandas 2.2, plotly 5.24, numpy 2.0, ipywidgets 7.7): this run is where those are tested.
#
#     bash bench/colab_versions.sh [VENV_DIR]      (default: a new temporary folder, removed at the end)
#
# It needs PyPI (or a mirror) and about 6 GB of disk for the environment (torch and its CUDA libraries).
#
# Python: $PYTHON if set, else python3.12 (Colab's) where there is one (on PATH, or under pyenv), else python3.
# torch/torchvision: this machine's 2.14.1/0.29.1, installed first and kept (constraints-colab.txt leaves them
# unpinned): Colab's 2.11.0+cu128 is a multi-GB CUDA download. Then
#     pip install -r requirements-dev.txt -c constraints-colab.txt
# which pins every package of Colab's list that the requirements pull in to Colab's version; the dev-only ones
# Colab does not ship (papermill, trimesh...) are pip's choice, as is everything outside Colab's list.
# The venv's own ipywidgets is Colab's 7.7.1, so the widget tests (tests/test_review.py, tests/test_viewers.py) run
# with it directly; tests/test_runtime.py's re-run of them with tests/.ipywidgets7 is left out (it would run the
# same 7.7.1 again). Exits non-zero when the install or any test fails. The install takes about 5 minutes, the
# tests 5 to 30 (the two smoke pipelines are most of it; measured on 2 cores shared with other runs).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 MPLBACKEND=Agg PYDEVD_DISABLE_FILE_VALIDATION=1  # (debugpy's note, noise)
start=$(date +%s)

if [ -n "${1:-}" ]; then
    VENV=$1
    [ ! -e "$VENV" ] || { echo "$VENV exists: give a new folder (the environment must be fresh)" >&2; exit 2; }
else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    VENV=$tmp/venv
fi

if [ -z "${PYTHON:-}" ]; then
    for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
        if "$candidate" -c "" 2>/dev/null; then PYTHON=$candidate; break; fi
    done
fi
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    echo "NOTE: no python3.12 found (Colab's): using $("$PYTHON" -V 2>&1)" >&2
fi

echo "== a fresh environment in $VENV, $("$PYTHON" -V 2>&1)"
"$PYTHON" -m venv "$VENV"
PY=$VENV/bin/python
quiet() {  # pip's notes on this machine's missing local index folders are noise; its exit status is kept
    "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
quiet "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
quiet "$PY" -m pip install -q -r requirements-dev.txt -c constraints-colab.txt

echo "== the versions installed (Colab's, except torch/torchvision: this machine's build)"
key='numpy|pandas|plotly|fastai|fastcore|fastprogress|ipywidgets|ipykernel|matplotlib|scipy|scikit-image|pillow|torch'
"$PY" -m pip freeze | grep -iE "^($key|torchvision)==" || true
widgets=$("$PY" -c "import ipywidgets; print(ipywidgets.__version__)")
if [ "$widgets" != "7.7.1" ]; then
    echo "ipywidgets $widgets installed, not Colab's 7.7.1: see constraints-colab.txt" >&2
    exit 1
fi
# papermill starts the notebooks' kernel `python3`: it must be this environment's interpreter
kernel=$("$PY" -c "from jupyter_client.kernelspec import KernelSpecManager as K
print(K().get_kernel_spec('python3').argv[0])")
case "$kernel" in
    python|python3|"$VENV"/*) ;;
    *) echo "the Jupyter kernel python3 runs $kernel, not $PY: remove that kernel spec" >&2; exit 1 ;;
esac

echo "== the notebook smoke tests and the widget tests, with Colab's versions"
rc=0
"$PY" -m pytest -q -p no:cacheprovider tests/test_notebooks.py tests/test_runtime.py tests/test_review.py \
    tests/test_viewers.py --deselect tests/test_runtime.py::test_the_widgets_work_with_colabs_ipywidgets_7 || rc=$?
echo "== $([ $rc = 0 ] && echo passed || echo FAILED) with Colab's versions, in $(( $(date +%s) - start )) s in all"
exit $rc
