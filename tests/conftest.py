"""Shared fixtures: tiny synthetic datasets written to temporary folders (no network, CPU only)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A 12-slice 96x96 sample in the published PNG layout."""
    return utils.make_sample(tmp_path_factory.mktemp("tiny") / "ds", n_slices=12, height=96, width=96, seed=3)


def snapshot(folder):
    """(relative path, size, mtime) of every file under `folder`: to prove a dataset was not touched."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in Path(folder).rglob("*") if p.is_file())
