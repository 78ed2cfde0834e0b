"""The review: decisions saved at once, surviving a restart and a new extraction, and shown at once in the previews
and the gallery; the panel's buttons."""
import csv

import numpy as np
import pytest
from PIL import Image

from conftest import CODES, make_case
from microfossil.exports import GREY, draw_gallery
from microfossil.extraction import extract_fossils
from microfossil.plots import get_class_colours
from microfossil.review import ReviewPanel, ReviewSession, has_widget_frontend, read_review
from microfossil.specimens import NOT_A_FOSSIL


def test_review_survives_restart_and_reextraction(tmp_path):
    vol, pred, work, _, _ = make_case(tmp_path)
    cat = extract_fossils(vol, work, pred, min_voxels=20)
    s = ReviewSession(work)
    order = s.order(sort="confidence")
    assert set(order) == set(cat.id) and s.first_unreviewed(order) == 0
    first, second = order[0], order[1]
    s.set(first, "accepted", "Globigerina")
    s.set(second, "rejected")
    assert not list((work / "exports").glob("*.partial"))
    s2 = ReviewSession(work)  # a disconnect: a new session reads everything back
    assert s2.get(first)["decision"] == "accepted" and s2.get(first)["taxon"] == "Globigerina"
    assert s2.get(second)["decision"] == "rejected"
    assert "Globigerina" in s2.taxa() and s2.taxa()[:2] == ["foraminifera", "ostracod"]
    assert s2.order(sort="confidence")[s2.first_unreviewed(order)] not in (first, second)
    assert s2.order("ostracod") == list(cat[cat["class"] == "ostracod"].id)
    assert s2.order(sort="size")[0] == int(cat.loc[cat.voxels.idxmax(), "id"])
    # a new extraction renumbers the specimens (specks kept now): decisions follow their specimen by centroid
    cen = s.cat.loc[first, ["centroid_z", "centroid_y", "centroid_x"]].to_numpy(float)
    cat2 = extract_fossils(vol, work, pred, min_voxels=1)
    new_first = int(cat2.loc[((cat2[["centroid_z", "centroid_y", "centroid_x"]] - cen) ** 2).sum(axis=1).idxmin(), "id"])
    assert new_first != first
    s3 = ReviewSession(work)
    assert s3.get(new_first)["taxon"] == "Globigerina"
    assert s3.summary()["accepted"] == 1 and s3.summary()["rejected"] == 1
    # rows that match no specimen any more are kept in the file, untouched
    cat3 = extract_fossils(vol, work, np.zeros_like(pred))
    assert len(cat3) == 0
    s4 = ReviewSession(work)
    assert s4.summary()["stale_rows"] == 2
    s4.save()
    rows = list(csv.DictReader(open(work / "exports" / "review.csv")))
    assert {r["taxon"] for r in rows} == {"Globigerina", ""}


def test_review_panel_clicks(tmp_path):
    pytest.importorskip("ipywidgets")
    vol, pred, work, _, _ = make_case(tmp_path)
    extract_fossils(vol, work, pred, min_voxels=20)
    assert not has_widget_frontend()  # pytest: no kernel, the notebook would skip the panel
    p = ReviewPanel(work)
    first = p.current
    assert p.image.value[:4] == b"\x89PNG" and f"specimen #{first}" in p.info.value
    p.taxon.value = "Ammonia"  # typing a taxon is saved at once
    assert ReviewSession(work).get(first)["taxon"] == "Ammonia"
    p.accept_b.click()
    assert p.current != first
    p.reject_b.click()
    p.prev_b.click()
    p.next_b.click()
    rows = {int(r["id"]): r for r in csv.DictReader(open(work / "exports" / "review.csv"))}
    assert rows[first]["decision"] == "accepted" and rows[first]["taxon"] == "Ammonia"
    assert sorted(r["decision"] for r in rows.values()) == ["accepted", "rejected"]
    p2 = ReviewPanel(work)  # reopening resumes at the first specimen not reviewed yet
    assert not (p2.session.get(p2.current) or {}).get("decision")
    p2.filter.value = "ostracod"
    assert all(p2.session.cat.loc[i, "class"] == "ostracod" for i in p2.ids)
    p2.sort.value = "size"
    assert p2.ids == p2.session.order("ostracod", "size")


def test_read_review_gives_the_decisions_as_a_table(tmp_path):
    vol, pred, work, _, _ = make_case(tmp_path)
    extract_fossils(vol, work, pred, min_voxels=20)
    assert read_review(work).empty and list(read_review(work).columns) == ["id", "decision", "taxon", "predicted_class"]
    s = ReviewSession(work)
    first, second = s.order(sort="id")[:2]
    s.set(first, "accepted", "Ammonia")
    s.set(second, "rejected")
    t = read_review(work).set_index("id")
    assert t.loc[first, "decision"] == "accepted" and t.loc[first, "taxon"] == "Ammonia"
    assert t.loc[second, "decision"] == "rejected" and t.loc[second, "predicted_class"] in ("foraminifera", "ostracod")


def _stamps(work):
    """(inode, mtime) of every PNG of a run's exports: a file written again (atomically) gets a new inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (work / "exports").rglob("*.png")}


def test_a_decision_redraws_its_preview_and_its_tile(tmp_path):
    vol, pred, work, _, _ = make_case(tmp_path)
    cat = extract_fossils(vol, work, pred, min_voxels=20).set_index("id")
    rgb = {c: tuple(int(round(255 * v)) for v in col[:3]) for c, col in zip(CODES, get_class_colours(len(CODES)))}
    s = ReviewSession(work)
    first, second = s.order(sort="id")[:2]
    before = _stamps(work)
    s.set(first, "rejected")
    after = _stamps(work)
    assert sorted(p for p in after if after[p] != before[p]) == ["fossil_0001_preview.png", "gallery.png"]
    tiles = draw_gallery(work).set_index("id")
    assert not tiles["redrawn"].any()  # the decision was drawn when it was saved
    t = tiles.loc[first]
    assert (t["name"], t["marker"], t["colour"]) == (NOT_A_FOSSIL, "x", "#%02x%02x%02x" % tuple(GREY))
    page = np.asarray(Image.open(work / "exports" / "gallery.png").convert("RGB"))
    px = page[t["top"]:t["top"] + t["size"], t["left"]:t["left"] + t["size"]].reshape(-1, 3)
    assert not (px == rgb[cat.loc[first, "class"]]).all(1).any()  # its class colour is gone from its tile
    preview = np.asarray(Image.open(work / "exports" / "fossil_0001" / "fossil_0001_preview.png").convert("RGB"))
    assert tuple(preview[10, 10]) == tuple(GREY)  # the title's swatch
    s.set(second, "accepted", "Ammonia")
    t = draw_gallery(work).set_index("id").loc[second]
    assert (t["name"], t["marker"], t["colour"]) == ("Ammonia", "check", "#%02x%02x%02x" % rgb[cat.loc[second, "class"]])
    s.set(first, "")  # undone: its class again
    assert draw_gallery(work).set_index("id").loc[first, "name"] == cat.loc[first, "class"]
