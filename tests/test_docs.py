"""The documentation a newcomer reads: README's first screen holds the two commands and the Colab steps and no dated
figure; no text names an issue of the project's tracker (no reader can see it); every link between the docs lands."""
import re

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readmes_first_screen_is_for_a_newcomer():
    first = "\n".join((ROOT / "README.md").read_text().splitlines()[:60])
    assert "python run_pipeline.py --quick" in first and "python -m pytest -q" in first  # the two commands
    assert "## Open in Colab, in three steps" in first and all(f"\n{k}. **" in first for k in (1, 2, 3))
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", first), "a dated figure on README's first screen"
    assert not re.search(r"\b\d\.\d\d\b", first), "a measured figure on README's first screen: put it in docs/"


@pytest.mark.parametrize("path", DOCS + sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_no_text_names_an_issue(path):
    text = re.sub(r"https?://\S+", "", path.read_text())  # (a link to another project's issue is a reference)
    hits = [m.group(0) for m in re.finditer(r".{0,30}\bissue'?s?\b.{0,30}", text, re.I)]
    assert not hits, f"{path.name} names an issue: {hits[:3]}"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_links_between_the_docs_land(path):
    """Every relative link (a file, and its #anchor: GitHub's rule, lower case, punctuation dropped, spaces to hyphens)
    points at something that exists."""
    def anchors(md):
        return {re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", h.strip().lower())) for h in re.findall(r"^#+ (.*)$", md, re.M)}
    text = path.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link to {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest.read_text()), f"{path.name}: link to {target}: no such heading"
