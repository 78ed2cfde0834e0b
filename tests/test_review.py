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
    rows = list(csv.DictReader(open(work / "exports" / "review.csv", encoding="utf-8-sig")))
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
    rows = {int(r["id"]): r for r in csv.DictReader(open(work / "exports" / "review.csv", encoding="utf-8-sig"))}
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


# --- review.csv as people leave it: re-saved by a spreadsheet, edited, cut, emptied ---

def _catalogue_only(tmp_path, n=4):
    """A run folder with only a catalogue (no specimen folders): `n` specimens with fractional centroids."""
    import pandas as pd
    exp = tmp_path / "run" / "exports"
    exp.mkdir(parents=True)
    pd.DataFrame({"id": range(1, n + 1), "class": ["foraminifera", "ostracod"] * (n // 2) + ["foraminifera"] * (n % 2),
                  "confidence": [0.9 - 0.1 * k for k in range(n)], "voxels": [100 + 10 * k for k in range(n)],
                  "centroid_z": [10.5 * k for k in range(1, n + 1)], "centroid_y": 5.25, "centroid_x": 7.75,
                  "frac_foraminifera": 1.0, "frac_ostracod": 0.0}).to_csv(exp / "fossils.csv", index=False)
    return tmp_path / "run"


def _reviewed(tmp_path):
    """A run whose review.csv (our format) accepts specimen 1 as 'Ammonia beccarii (Linné)' and rejects 2."""
    work = _catalogue_only(tmp_path)
    s = ReviewSession(work)
    s.set(1, "accepted", "Ammonia beccarii (Linné)")
    s.set(2, "rejected")
    return work, work / "exports" / "review.csv"


def _resave(path, delimiter=";", encoding="utf-8-sig", decimal=",", rename=None, drop=(), edit=None):
    """Re-save review.csv as a spreadsheet would: `delimiter`, `decimal` mark, `encoding` (BOM), CRLF; columns
    renamed (`rename`), dropped (`drop`), cells changed by `edit(rows)`."""
    import io

    def number(v):
        try:
            float(v)
            return v.replace(".", decimal)
        except ValueError:
            return v
    rows = list(csv.reader(open(path, newline="", encoding="utf-8-sig")))
    keep = [k for k, c in enumerate(rows[0]) if c not in drop]
    rows = [[(rename or {}).get(r[k], r[k]) if i == 0 else number(r[k]) for k in keep] for i, r in enumerate(rows)]
    if edit:
        edit(rows)
    out = io.StringIO()
    csv.writer(out, delimiter=delimiter, lineterminator="\r\n").writerows(rows)
    path.write_bytes(out.getvalue().encode(encoding))
    return path.read_bytes()


def _decided(path):
    """{id: (decision, taxon)} of the rows of review.csv (our format) with a decision."""
    return {r["id"]: (r["decision"], r["taxon"]) for r in csv.DictReader(open(path, encoding="utf-8-sig")) if r["decision"]}


@pytest.mark.parametrize("delimiter, encoding", [(";", "utf-8-sig"), (";", "cp1252"), ("\t", "utf-8"),
                                                 (",", "utf-8-sig")])
def test_a_review_resaved_by_a_spreadsheet_keeps_its_decisions(tmp_path, delimiter, encoding):
    work, path = _reviewed(tmp_path)
    before = _decided(path)
    _resave(path, delimiter, encoding, decimal="," if delimiter != "," else ".")
    s = ReviewSession(work)
    assert s.summary()["stale_rows"] == 0 and s.get(1)["taxon"] == "Ammonia beccarii (Linné)"
    assert s.get(2)["decision"] == "rejected"
    s.set(3, "accepted")  # the next click writes our format again, with every decision
    text = path.read_text(encoding="utf-8-sig")
    assert text.startswith("id,decision,taxon,") and "10,5" not in text and "21.0" in text
    assert _decided(path) == {**before, "3": ("accepted", "")}


def test_an_unreadable_review_stops_naming_the_file_and_leaves_it(tmp_path):
    work, path = _reviewed(tmp_path)
    for junk in [b"PK\x03\x04\x14\x00\x06\x00 an xlsx saved as review.csv", "Nº|decisão|táxon\n1|aceito|x\n".encode()]:
        path.write_bytes(junk)
        with pytest.raises(ValueError, match="CSV UTF-8") as e:
            ReviewSession(work)
        assert str(path) in str(e.value)
        with pytest.raises(ValueError, match="review.csv"):
            read_review(work)
        assert path.read_bytes() == junk


def test_renamed_or_missing_centroid_columns(tmp_path, capsys):
    work, path = _reviewed(tmp_path)
    before = _decided(path)
    _resave(path, ",", "utf-8", ".", rename={"centroid_z": "Centroid Z", "centroid_y": "y", "centroid_x": "CENTROID_X",
                                              "decision": "Decision"})
    s = ReviewSession(work)
    assert s.summary() == {"specimens": 4, "accepted": 1, "rejected": 1, "to_review": 2, "stale_rows": 0}
    assert "id only" not in capsys.readouterr().out
    _resave(path, ",", "utf-8", ".", drop=("Centroid Z", "y", "CENTROID_X"))  # no centroid at all: by id
    s = ReviewSession(work)
    assert s.summary()["accepted"] == 1 and s.get(2)["decision"] == "rejected"
    out = capsys.readouterr().out
    assert "review.csv" in out and "2 rows" in out and "id only" in out
    s.set(3, "rejected")
    assert _decided(path) == {**before, "3": ("rejected", "")}
    assert {r["id"]: r["centroid_z"] for r in csv.DictReader(open(path, encoding="utf-8-sig"))}["1"] == "10.5"  # found again by centroid


def test_columns_added_in_a_spreadsheet_survive_a_save(tmp_path):
    work, path = _reviewed(tmp_path)

    def notes(rows):
        rows[0].append("notes")
        rows[1].append("broken, last chamber")
        rows[2].append("")
        rows.append(["99", "accepted", "Elphidium", "", "", "", "500", "1", "1", "", "a specimen from an older run"])
    _resave(path, ",", "utf-8", ".", edit=notes)
    s = ReviewSession(work)
    assert s.summary()["stale_rows"] == 1
    s.set(3, "accepted", "Bolivina")
    rows = list(csv.DictReader(open(path, encoding="utf-8-sig")))
    assert list(rows[0]) == ["id", "decision", "taxon", "predicted_class", "confidence", "voxels", "centroid_z",
                             "centroid_y", "centroid_x", "updated", "notes"]
    assert [(r["id"], r["notes"]) for r in rows] == [("1", "broken, last chamber"), ("2", ""), ("3", ""),
                                                    ("99", "a specimen from an older run")]


def test_a_truncated_last_row_is_applied_and_kept(tmp_path):
    work, path = _reviewed(tmp_path)
    s = ReviewSession(work)
    s.set(3, "accepted", "Bolivina")
    full = path.read_bytes()
    path.write_bytes(full[:full.rindex(b"Bolivina") + 3])  # the last line cut: "3,accepted,Bol"
    s = ReviewSession(work)
    assert s.get(3)["decision"] == "accepted" and s.get(3)["taxon"] == "Bol"
    assert s.summary()["accepted"] == 2
    s.set(4, "rejected")
    assert _decided(path) == {"1": ("accepted", "Ammonia beccarii (Linné)"), "2": ("rejected", ""),
                              "3": ("accepted", "Bol"), "4": ("rejected", "")}


def test_an_empty_review_file_is_no_decision(tmp_path, capsys):
    work, path = _reviewed(tmp_path)
    path.write_bytes(b"")
    s = ReviewSession(work)
    assert s.summary()["accepted"] == 0 and s.summary()["stale_rows"] == 0
    assert "review.csv" in capsys.readouterr().out
    t = read_review(work)
    assert t.empty and list(t.columns) == ["id", "decision", "taxon", "predicted_class"]
    s.set(1, "rejected")
    assert _decided(path) == {"1": ("rejected", "")}


def test_a_comma_in_a_taxon(tmp_path, capsys):
    work, path = _reviewed(tmp_path)
    s = ReviewSession(work)
    s.set(3, "accepted", "Ammonia, sp.")  # typed in the panel: quoted in the file
    assert ReviewSession(work).get(3)["taxon"] == "Ammonia, sp."
    text = path.read_text(encoding="utf-8-sig")
    path.write_text(text.replace('"Ammonia, sp."', "Ammonia, sp."), encoding="utf-8-sig")  # re-saved unquoted
    capsys.readouterr()
    s = ReviewSession(work)
    assert s.get(3)["decision"] == "accepted" and s.get(3)["taxon"] == "Ammonia, sp."
    out = capsys.readouterr().out
    assert "review.csv" in out and "line 4" in out
    assert read_review(work).set_index("id").loc[3, "taxon"] == "Ammonia, sp."
    # a row that cannot be told apart or whose numbers do not parse: kept in the file, not applied
    broken = text.replace('"Ammonia, sp."', "Ammonia, sp.").splitlines()[3].replace("31.5", "x,y")
    path.write_text(text.replace(text.splitlines()[3], broken), encoding="utf-8-sig")
    s = ReviewSession(work)
    assert s.get(3) is None and s.summary()["stale_rows"] == 1 and "line 4" in capsys.readouterr().out
    s.set(4, "rejected")
    assert [",".join(r) for r in csv.reader(open(path, encoding="utf-8-sig")) if r[0] == "3"] == [broken]
    assert _decided(path)["4"] == ("rejected", "") and len(_decided(path)) == 4


def test_a_save_keeps_the_previous_file_beside_it(tmp_path):
    work, path = _reviewed(tmp_path)
    mine = _resave(path)  # the person's own version, from a spreadsheet
    s = ReviewSession(work)
    s.set(3, "rejected")
    backup = path.with_name("review.csv.bak")
    assert backup.read_bytes() == mine
    s.set(4, "accepted")  # our own earlier writes are not what the backup is for: it keeps the person's version
    assert backup.read_bytes() == mine
    stamp = path.stat().st_mtime_ns, path.stat().st_ino
    ReviewSession(work).save()  # nothing changed: nothing written
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == stamp and backup.read_bytes() == mine
    assert len(_decided(path)) == 4
    s.set(3, "")  # undone: the only way a decision leaves the file
    assert sorted(_decided(path)) == ["1", "2", "4"]
    before = path.read_bytes()
    s.decisions.pop(1)  # as a bug that lost a row would
    with pytest.raises(RuntimeError, match="lose review decisions"):
        s.save()
    assert path.read_bytes() == before


def test_an_edit_saved_while_the_review_is_open_is_built_on_not_overwritten(tmp_path, capsys):
    """A spreadsheet (or a second panel) saves review.csv while a review session is open: the session's next click
    keeps that file's decisions and its own, the newer of the two where both decided a specimen, and keeps the
    file it found as review.csv.bak. Here the spreadsheet was opened before the session's click on specimen 3, so
    its file lacks that decision: it is kept too."""
    work, path = _reviewed(tmp_path)
    s = ReviewSession(work)
    opened_before = path.read_bytes()
    s.set(3, "accepted", "Cythere")

    def reject_1_accept_4(rows):  # the person changes specimen 1 and decides 4 in the spreadsheet
        head = rows[0]
        for r in rows[1:]:
            if r[head.index("id")] == "1":
                r[head.index("decision")], r[head.index("updated")] = "rejected", "2999-01-01T00:00:00"
        rows.append([{"id": "4", "decision": "accepted", "taxon": "Elphidium"}.get(c, "") for c in head])
    path.write_bytes(opened_before)
    spreadsheet = _resave(path, edit=reject_1_accept_4)
    s.set(2, "accepted", "Bairdia")  # the session's next click
    assert _decided(path) == {"1": ("rejected", "Ammonia beccarii (Linné)"), "2": ("accepted", "Bairdia"),
                              "3": ("accepted", "Cythere"), "4": ("accepted", "Elphidium")}
    assert (path.parent / "review.csv.bak").read_bytes() == spreadsheet and "changed on disk" in capsys.readouterr().out
    assert path.read_bytes().startswith(b"\xef\xbb\xbfid,decision,")  # UTF-8 with a BOM: Excel reads the accents


def test_a_click_that_cannot_be_saved_says_so_and_decides_nothing(tmp_path, monkeypatch):
    """review.csv locked (Excel on Windows holds the files it has open): the click is not saved, the panel says so
    and stays on the specimen, and nothing is recorded as decided; once the file is free, the click saves."""
    pytest.importorskip("ipywidgets")
    import microfossil.io as mio
    vol, pred, work, _, _ = make_case(tmp_path)
    extract_fossils(vol, work, pred, min_voxels=20)
    p = ReviewPanel(work)
    first, real = p.current, mio.os.replace

    def locked(src, dst):
        if str(dst).endswith("review.csv"):
            raise PermissionError(13, "Permission denied", str(dst))
        real(src, dst)
    monkeypatch.setattr(mio.os, "replace", locked)
    p.accept_b.click()
    assert "Not saved" in p.status.value and "close it" in p.status.value and p.current == first
    assert p.session.get(first) is None and not (work / "exports" / "review.csv").exists()
    monkeypatch.setattr(mio.os, "replace", real)
    p.accept_b.click()
    assert ReviewSession(work).get(first)["decision"] == "accepted" and p.current != first


def test_a_review_on_drive_writes_only_its_decisions_there_until_it_ends(tmp_path, monkeypatch, colab_modules):
    """Colab, its run folder on (stub) Drive: 100 clicks in the panel (accept, reject, a taxon typed) write nothing
    to Drive but `review.csv`, rewritten in place (no file replaced or deleted: nothing in Drive's bin); the previews
    and gallery they change are drawn on the local disk, shown from there, and copied to Drive in place by
    `flush_drive`, after which Drive's gallery is that of the decisions."""
    import hashlib
    import shutil

    pytest.importorskip("ipywidgets")
    from microfossil import runtime
    content, gdrive = tmp_path / "content", tmp_path / "gdrive"
    (gdrive / "MyDrive").mkdir(parents=True)
    content.mkdir()
    for k, v in {"MICROFOSSIL_COLAB_ROOT": content, "COLAB_STUB_DRIVE": gdrive}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("MICROFOSSIL_HEADLESS", raising=False)
    monkeypatch.setattr(runtime, "in_colab", lambda: True)
    monkeypatch.setattr(runtime, "_BEFORE_FLUSH", {})
    from google.colab import drive
    drive.mount(str(content / "drive"))
    vol, pred, case, _, _ = make_case(tmp_path)
    work = content / "drive" / "MyDrive" / "microfossil_runs" / "run"
    shutil.move(case, work)
    extract_fossils(vol, work, pred, min_voxels=20)

    def on_drive():
        return {str(p.relative_to(gdrive)): (p.stat().st_ino, hashlib.sha1(p.read_bytes()).hexdigest())
                for p in gdrive.rglob("*") if p.is_file()}

    panel = ReviewPanel(work)
    n = len(panel.ids)
    seen = [on_drive()]
    for k in range(100):
        if k % 5 == 4:
            panel.taxon.value = f"Taxon {k}"
        else:
            panel.decide(["accepted", "rejected"][(k // n) % 2])
        seen.append(on_drive())
    review = "MyDrive/microfossil_runs/run/exports/review.csv"
    for before, after in zip(seen, seen[1:]):
        assert set(before) - {review} == set(after) - {review}  # nothing new, nothing deleted
        assert all(after[f][0] == before[f][0] for f in before)  # no file replaced: the same inodes
        assert [f for f in before if after[f] != before[f]] in ([], [review])  # only the decisions written
    assert len({s[review][1] for s in seen[1:]}) > 50  # (each click saved at once)
    panel.session.set(panel.ids[0], "rejected")
    panel.pos = 0
    panel.show()  # the preview on show is the one drawn on the local disk: the rejected one's grey swatch
    assert tuple(np.asarray(Image.open(__import__("io").BytesIO(panel.image.value)).convert("RGB"))[10, 10]) == tuple(GREY)
    last = on_drive()
    assert runtime.flush_drive()  # the end of the review: the drawings go to Drive, in place
    drive.mount(str(content / "drive"))
    now = on_drive()
    assert set(now) == set(last) and all(now[f][0] == last[f][0] for f in last)
    changed = sorted(f.rsplit("/", 1)[1] for f in last if now[f] != last[f])
    assert "gallery.png" in changed and "gallery.json" in changed and any(f.endswith("_preview.png") for f in changed)
    assert not draw_gallery(work)["redrawn"].any()  # Drive's gallery shows the decisions as they are
    rejected = draw_gallery(work).set_index("id").loc[panel.ids[0]]
    assert rejected["marker"] == "x"
