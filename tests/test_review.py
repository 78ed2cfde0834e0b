"""The review: decisions saved at once, surviving a restart and a new extraction; the panel's buttons."""
import csv

import numpy as np
import pytest

from conftest import make_case
from microfossil.extraction import extract_fossils
from microfossil.review import ReviewPanel, ReviewSession, has_widget_frontend, read_review


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
