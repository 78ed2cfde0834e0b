"""The review: a person goes through the specimens, accepts or rejects each and names its taxon.

Every decision is saved at once to `exports/review.csv` (atomically; on Google Drive rewritten in
place, so that a click leaves no replaced copy in Drive's bin), so a disconnect loses nothing.
On Drive the previews and gallery a decision changes are drawn on the local disk and copied to
Drive when the review ends (`exports.publish_drawings`, run by `flush_drive`). A person may open
that file in a spreadsheet and save it again: it is read however the spreadsheet wrote it
(`decisions.read_decisions`), every row of it and every column a person added are written back,
and a file that cannot be read stops the review with what to do, untouched. No save drops a
decision (only undoing one does), and before a save replaces a `review.csv` that is not what
this session last wrote (a spreadsheet's, an edited one, one whose decisions a new extraction
moved), that file is kept beside it as `review.csv.bak`.
Needs pandas, and ipywidgets for the panel; never torch.
"""
from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from .decisions import DECISIONS, REVIEW_COLUMNS, REVIEW_FILE, read_decisions
from .exports import draw_gallery, preview_file, publish_drawings, specimen_folders
from .io import finish_commit, replacing
from .runtime import before_flush, enable_colab_widgets, headless, on_drive, write_in_place

REVIEW_ORDERS = {"confidence": "least certain first", "confidence_desc": "most certain first",
                 "size": "largest first", "size_asc": "smallest first", "id": "by id"}


class ReviewSession:
    """The review of the catalogue `work_dir/exports/fossils.csv`, saved in `exports/review.csv`.

    Each decision (`accepted` / `rejected`, with a taxon) is written at once with an atomic
    replace, so a disconnect loses nothing. Decisions are tied to a specimen by its id and
    centroid: after a new extraction (other parameters, new ids) they follow their specimen
    when its centroid moved less than `tol` voxels; the others are kept in the file (`stale`)
    and not shown. The columns a person added are kept too; see the module's docstring for a
    file saved by a spreadsheet and for `review.csv.bak`.
    """

    def __init__(self, work_dir, tol=3.0):
        import pandas as pd
        finish_commit(work_dir)  # an extraction a kill cut in the middle of its commit
        self.exp_dir = Path(work_dir) / "exports"
        self.path = self.exp_dir / REVIEW_FILE
        cat_path = self.exp_dir / "fossils.csv"
        if not cat_path.exists():
            raise FileNotFoundError(f"{cat_path} not found: run 05_predict_export (its extraction cell) first, "
                                    "with the same work_dir.")
        self.cat = pd.read_csv(cat_path).set_index("id", drop=False).rename_axis(None)
        self.codes = [c[5:] for c in self.cat.columns if c.startswith("frac_")]
        self._folders = specimen_folders(self.exp_dir)
        self.tol, self._mine = tol, {}  # _mine: the rows this session set, by id
        self.decisions, self.stale = read_decisions(self.exp_dir, self.cat, tol)
        self._decided = sum(bool(r["decision"]) for r in self._rows())  # a save may never write fewer
        self._written = self._content()  # what the file holds when this session wrote it (or would have)
        draw_gallery(work_dir)  # only what a kill left unfinished (after a classifier's commit, say) is drawn
        if on_drive(work_dir):  # the drawings of this review's clicks, made on the local disk, go to Drive then
            before_flush(("review drawings", str(work_dir)), lambda: publish_drawings(work_dir))

    def taxa(self):
        """Taxa to offer: the model's fossil classes, then every taxon typed so far."""
        seen = [d["taxon"] for d in self.decisions.values() if d.get("taxon")] + [r.get("taxon", "") for r in self.stale]
        return list(dict.fromkeys([*self.codes, *sorted(t for t in seen if t)]))

    def get(self, sid):
        """The decision row of specimen `sid`, or None when it is not reviewed yet."""
        return self.decisions.get(int(sid))

    def set(self, sid, decision=None, taxon=None):
        """Record `decision` ("accepted", "rejected" or "" to undo) and/or `taxon` for specimen `sid`; saved at once,
        and its preview and gallery tile drawn again when what they show changed."""
        sid = int(sid)
        if decision is not None and decision not in DECISIONS:
            raise ValueError(f"decision must be 'accepted', 'rejected' or '', not {decision!r}")
        self._sync()
        row = self.cat.loc[sid]
        undo = (self.decisions.get(sid), self._mine.get(sid), self._decided)  # if the save fails
        d = dict(self.decisions.get(sid) or {"decision": "", "taxon": ""})
        was_decided = bool(d["decision"])
        d.update({"id": sid, "predicted_class": row["class"], "confidence": row[self._confidence_column()],
                  "voxels": row["voxels"],
                  "centroid_z": row["centroid_z"], "centroid_y": row["centroid_y"], "centroid_x": row["centroid_x"],
                  "updated": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if decision is not None:
            d["decision"] = decision
        if taxon is not None:
            d["taxon"] = str(taxon).strip()
        self.decisions[sid] = self._mine[sid] = d
        self._decided += bool(d["decision"]) - was_decided
        try:
            self.save()
        except BaseException:  # e.g. the file locked by a spreadsheet: not saved, so not decided
            for store, old in ((self.decisions, undo[0]), (self._mine, undo[1])):
                store.pop(sid, None) if old is None else store.__setitem__(sid, old)
            self._decided = undo[2]
            raise
        draw_gallery(self.exp_dir.parent, local=True)
        return d

    def _sync(self):
        """Build on the file as it is on disk when someone else wrote it since this session did (a spreadsheet, a
        second panel): its rows, then this session's own where the file has none or an older one (`updated`).
        The file found is kept as `review.csv.bak` before the next save replaces it."""
        disk = self.path.read_bytes() if self.path.exists() else None
        if disk is None or disk == self._written:
            return
        decisions, self.stale = read_decisions(self.exp_dir, self.cat, self.tol)
        for sid, mine in self._mine.items():
            theirs = decisions.get(sid)
            if theirs is None or str(theirs.get("updated") or "") < str(mine["updated"]):
                decisions[sid] = mine
        self.decisions = decisions
        self._decided = sum(bool(r["decision"]) for r in self._rows())
        self._backup(disk, "it changed on disk while this review was open (a spreadsheet or another panel saved it); "
                           "its decisions are kept, this session's own newer ones over them")
        self._written = disk

    def _backup(self, old, why):
        backup = self.path.with_name(self.path.name + ".bak")
        with replacing(backup) as tmp:
            tmp.write_bytes(old)
        print(f"{self.path}: {why}. The version found is kept as {backup}.")

    def _rows(self):
        return [self.decisions[sid] for sid in sorted(self.decisions)] + self.stale

    def _content(self):
        """`review.csv` as it stands in this session: UTF-8 with a BOM (so that Excel reads accents right),
        comma-separated, `REVIEW_COLUMNS` then any other."""
        rows = self._rows()
        added = dict.fromkeys(k for r in rows for k in r if k not in REVIEW_COLUMNS)  # a person's own columns
        out = io.StringIO()
        wr = csv.DictWriter(out, REVIEW_COLUMNS + list(added))
        wr.writeheader()
        wr.writerows(rows)
        return out.getvalue().encode("utf-8-sig")

    def save(self):
        """Write `review.csv` (decisions, then the stale rows) to a temporary file and rename it over the old one;
        nothing when the file holds that already. The file it replaces goes to `review.csv.bak` first when it is
        not what this session last wrote."""
        rows, new = self._rows(), self._content()
        if sum(bool(r["decision"]) for r in rows) < self._decided:
            raise RuntimeError(f"Not saving {self.path}: it would lose review decisions (a bug; please report it). "
                               "The file is left as it was.")
        old = self.path.read_bytes() if self.path.exists() else None
        if old == new:
            return
        if old is not None and old != self._written:
            self._backup(old, "it was not as this review session last wrote it (a spreadsheet saved it, or a new "
                              "extraction moved its decisions)")
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        if old is not None and on_drive(self.path):  # the same Drive file (a replaced one would go to the bin); one
            write_in_place(self.path, new)            # write of a few kB, the old version kept as .bak when not ours
        else:
            with replacing(self.path) as tmp:
                tmp.write_bytes(new)
        self._written = new

    def order(self, cls="all", sort="confidence"):
        """Specimen ids of class `cls` ("all" for every class) in the order `sort` (a key of `REVIEW_ORDERS`)."""
        if sort not in REVIEW_ORDERS:
            raise ValueError(f"sort must be one of {list(REVIEW_ORDERS)}, not {sort!r}")
        c = self.cat if cls == "all" else self.cat[self.cat["class"] == cls]
        conf = self._confidence_column()
        key, asc = {"confidence": (conf, True), "confidence_desc": (conf, False),
                    "size": ("voxels", False), "size_asc": ("voxels", True), "id": ("id", True)}[sort]
        return [int(i) for i in c.sort_values([key, "id"], ascending=[asc, True], na_position="first")["id"]]

    def _confidence_column(self):
        """The specimen classifier's probability once it has run (`classify_specimens`), else the segmentation's."""
        return "class_probability" if "class_probability" in self.cat.columns else "confidence"

    def first_unreviewed(self, ids):
        """Position in `ids` of the first specimen without a decision (0 when all are reviewed)."""
        return next((k for k, sid in enumerate(ids) if not (self.get(sid) or {}).get("decision")), 0)

    def summary(self):
        dec = [d.get("decision") for d in self.decisions.values()]
        return {"specimens": len(self.cat), "accepted": dec.count("accepted"), "rejected": dec.count("rejected"),
                "to_review": len(self.cat) - dec.count("accepted") - dec.count("rejected"), "stale_rows": len(self.stale)}

    def preview(self, sid):
        """Path of specimen `sid`'s preview PNG, or None when its export was capped."""
        d = self._folders.get(int(sid))
        p = preview_file(self.exp_dir.parent, d) if d is not None else None
        return p if p is not None and p.exists() else None


def read_review(work_dir):
    """The review decisions so far, matched to the current catalogue: a table with `id`, `decision`, `taxon` and
    `predicted_class` (the specimen's class now where a row lacks it; empty before any review), for
    `classify_specimens`. Read as `ReviewSession` reads them."""
    import pandas as pd
    cols = ["id", "decision", "taxon", "predicted_class"]
    if not (Path(work_dir) / "exports" / REVIEW_FILE).exists():
        return pd.DataFrame(columns=cols)
    s = ReviewSession(work_dir)
    return pd.DataFrame([{**d, "predicted_class": d["predicted_class"] or s.cat.loc[sid, "class"]}
                         for sid, d in s.decisions.items()], columns=cols)


def has_widget_frontend():
    """True in a live Jupyter or Colab kernel; False in plain Python and in headless runs (`run_pipeline.py`)."""
    if headless():
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and hasattr(ip, "kernel")


class ReviewPanel:
    """ipywidgets panel over a `ReviewSession`: one specimen at a time; show it with `display(panel.box)`.

    Preview and measurements; accept / reject (then on to the next); a taxon field
    offering the classes seen so far; previous / next; filter by class; sort by
    confidence or size. Opens on the first specimen not reviewed yet.
    """

    def __init__(self, work_dir):
        import ipywidgets as w
        enable_colab_widgets()
        self.session = s = ReviewSession(work_dir)
        self.filter = w.Dropdown(options=["all", *sorted(set(s.cat["class"]))], description="class")
        self.sort = w.Dropdown(options=[(v, k) for k, v in REVIEW_ORDERS.items()], value="confidence", description="order")
        self.image = w.Image(format="png", layout=w.Layout(max_width="100%"))
        self.info = w.HTML()
        self.taxon = w.Combobox(options=s.taxa(), placeholder="taxon", description="taxon", ensure_option=False,
                                continuous_update=False)
        self.prev_b, self.next_b = w.Button(description="◀ previous"), w.Button(description="next ▶")
        self.accept_b = w.Button(description="accept", button_style="success")
        self.reject_b = w.Button(description="reject", button_style="danger")
        self.status = w.HTML()
        self.ids, self.pos = [], 0
        self.prev_b.on_click(lambda _: self.go(-1))
        self.next_b.on_click(lambda _: self.go(+1))
        self.accept_b.on_click(lambda _: self.decide("accepted"))
        self.reject_b.on_click(lambda _: self.decide("rejected"))
        self.filter.observe(lambda _: self.refresh(), "value")
        self.sort.observe(lambda _: self.refresh(), "value")
        self.taxon.observe(self._on_taxon, "value")
        self.box = w.VBox([w.HBox([self.filter, self.sort]), self.image, self.info,
                           w.HBox([self.prev_b, self.accept_b, self.reject_b, self.next_b]), self.taxon, self.status])
        self.refresh()

    @property
    def current(self):
        return self.ids[self.pos] if self.ids else None

    def refresh(self):
        """Re-apply the class filter and the order; go to the first specimen not reviewed yet."""
        self.ids = self.session.order(self.filter.value, self.sort.value)
        self.pos = self.session.first_unreviewed(self.ids)
        self.show()

    def go(self, step):
        if self.ids:
            self.pos = (self.pos + step) % len(self.ids)
        self.show()

    def decide(self, decision):
        """Record `decision` for the current specimen, with the taxon typed (default: its predicted class); next."""
        sid = self.current
        if sid is None:
            return
        taxon = self.taxon.value or (self.session.cat.loc[sid, "class"] if decision == "accepted" else "")
        if self._saved(sid, decision, taxon):
            self.taxon.options = self.session.taxa()
            self.go(+1)

    def _saved(self, sid, decision=None, taxon=None):
        """`session.set`, its failure shown in the panel (a button's error would vanish in the widget's log)."""
        try:
            self.session.set(sid, decision, taxon)
            return True
        except Exception as e:
            import html
            self.status.value = (f"<b style='color:#b00'>Not saved: {html.escape(str(e))}</b> If review.csv is open "
                                 "in a spreadsheet, close it (it may lock the file) and click again.")
            return False

    def _on_taxon(self, change):
        if self.current is not None and not self._showing and self._saved(self.current, taxon=change["new"]):
            self.taxon.options = self.session.taxa()
            self._show_status()

    _showing = False

    def show(self):
        s, sid = self.session, self.current
        self._showing = True
        try:
            if sid is None:
                self.image.value, self.info.value, self.taxon.value = b"", "<b>No specimen to review.</b>", ""
            else:
                row, d = s.cat.loc[sid], s.get(sid) or {}
                p = s.preview(sid)
                self.image.value = p.read_bytes() if p else b""
                fields = [f for f in ["class", "class_probability", "seg_class", "confidence", "voxels", "volume_um3",
                                      "surface_um2", "esd_um", "sphericity", "mean_intensity", "touches_border"]
                          if f in row.index]
                cells = "".join(f"<td><b>{f}</b><br>{row[f]:.4g}</td>" if isinstance(row[f], float)
                                else f"<td><b>{f}</b><br>{row[f]}</td>" for f in fields)
                note = "" if p else "<br><i>no preview: exports were capped (max_exports); re-run the extraction with a larger max_exports</i>"
                self.info.value = (f"<b>specimen #{sid}</b> ({self.pos + 1} of {len(self.ids)}), box z {row['z0']}-{row['z1']}, "
                                   f"y {row['y0']}-{row['y1']}, x {row['x0']}-{row['x1']}<table><tr>{cells}</tr></table>{note}")
                self.taxon.value = d.get("taxon", "")
        finally:
            self._showing = False
        self._show_status()

    def _show_status(self):
        sm, d = self.session.summary(), self.session.get(self.current) if self.current is not None else None
        mine = f"this one: <b>{d['decision'] or 'not decided'}</b> {d.get('taxon', '')}" if d else "this one: not reviewed"
        self.status.value = (f"{mine} · reviewed {sm['accepted'] + sm['rejected']} of {sm['specimens']} "
                             f"({sm['accepted']} accepted, {sm['rejected']} rejected) · saved to {self.session.path}")
