"""The review's decisions on disk: `exports/review.csv`, read however a spreadsheet saved it.

People open the review file in Excel or LibreOffice and save it again: with `;` and decimal
commas (a Portuguese or German locale), another encoding, renamed or added columns, a row cut
short, an unquoted comma in a typed taxon. `read_decisions` is the one reader of the file
(the review session, the gallery, the viewers and the specimen classifier all go through it):
every row comes back, as a decision given to a specimen or as a row to keep as it is, and a
file it cannot read is an error naming it, never a reason to overwrite it. The writer is
`review.ReviewSession.save`.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np

REVIEW_FILE = "review.csv"  # in exports/: the review's decisions, one row per specimen (`review.ReviewSession`)
REVIEW_COLUMNS = ["id", "decision", "taxon", "predicted_class", "confidence", "voxels",
                  "centroid_z", "centroid_y", "centroid_x", "updated"]
DECISIONS = ("accepted", "rejected", "")  # "": undone
_CENTROID = ["centroid_z", "centroid_y", "centroid_x"]
_NUMERIC = ["id", "confidence", "voxels", *_CENTROID]
_COLUMN_OF = {**{c.replace("_", ""): c for c in REVIEW_COLUMNS}, "z": "centroid_z", "y": "centroid_y", "x": "centroid_x"}
_UNREADABLE = ("{path} cannot be read as the review's decisions: {why}. If a spreadsheet saved it, save it again "
               "as CSV UTF-8, comma-separated, its first line the column names (id, decision, taxon, ...). "
               "It is left as it is; move it away to start the review afresh.")


def _column(name):
    """The review column that header `name` means, told without case, spaces, underscores or hyphens ("Centroid Z" is
    `centroid_z`, so is a bare "z"), or None."""
    return _COLUMN_OF.get(re.sub(r"[\s_-]", "", name).lower())


def _decode(raw):
    """The text of a file's bytes `raw`: UTF-16 (its BOM says so), else UTF-8 (with or without a BOM), else
    Windows-1252 (what Excel calls plain "CSV"), else Latin-1."""
    for encoding in ["utf-16"] * (raw[:2] in (b"\xff\xfe", b"\xfe\xff")) + ["utf-8-sig", "cp1252"]:
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            pass
    return raw.decode("latin-1")


def _not_numbers(row, cols=_NUMERIC):
    """The columns among `cols` in which `row` holds something other than a number (empty is fine, so is "nan")."""
    bad = []
    for c in cols:
        try:
            float(row[c] or 0)
        except ValueError:
            bad.append(c)
    return bad


def _tidy(row):
    """`row` with a decimal point in its numbers (a spreadsheet's "12,5") and its decision in lower case."""
    for c in _NUMERIC:
        v = row[c].strip()
        row[c] = v.replace(",", ".") if v.count(",") == 1 and "." not in v else v
    if row["decision"].strip().lower() in DECISIONS:
        row["decision"] = row["decision"].strip().lower()
    return row


def _readable(row):
    """Whether tidied `row` has a known decision and numbers where numbers go."""
    return row["decision"] in DECISIONS and not _not_numbers(row)


def _rejoin(fields, cols, delimiter):
    """The `fields` of a row with more of them than its header has `cols`, the surplus read as `delimiter`s left
    unquoted in one text column: the first of `taxon`, a person's own column, `predicted_class` with which the row
    reads; else in its last column (so the row keeps everything). Returns `(fields, that column or None)`."""
    n = len(fields) - len(cols)
    for c in ["taxon", *[c for c in cols if c not in REVIEW_COLUMNS], "predicted_class", None]:
        if c is not None and c not in cols:
            continue
        k = cols.index(c) if c else len(cols) - 1
        joined = fields[:k] + [delimiter.join(fields[k:k + n + 1])] + fields[k + n + 1:]
        if c is None or _readable(_tidy({**dict.fromkeys(REVIEW_COLUMNS, ""), **dict(zip(cols, joined))})):
            return joined, c


def _review_rows(path, say):
    """The rows of review file `path` however a spreadsheet saved it: `(line, row, usable)` for each, `row` a dict of
    every column (`REVIEW_COLUMNS` first, by those names, then any other column as it is named).

    The delimiter (comma, semicolon or tab) is the one that makes the first line hold `id` and
    `decision`; the encoding as `_decode` finds it; a decimal comma in a number becomes a point.
    A row cut short keeps what it has; a row with too many fields is mended when an unquoted
    delimiter in one text column explains it, else kept as it is and not `usable`. Raises
    ValueError, naming `path`, when the file cannot be read; says (`say`) what it mended.
    """
    text = _decode(Path(path).read_bytes()).lstrip("\ufeff")  # a BOM left in the text by a re-encoding
    if not text.strip():
        say(f"{path} is empty: no review decision in it.")
        return []
    try:
        for delimiter in (",", ";", "\t"):
            reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
            header = next(reader)
            if {"id", "decision"} <= {_column(h) for h in header}:
                break
        else:
            raise ValueError(f"its first line, {text.splitlines()[0][:60]!r}, has no `id` and `decision` columns")
        cols = []
        for k, h in enumerate(header):
            c = _column(h) or h.strip() or f"column_{k + 1}"
            cols.append(c if c not in cols else f"{c}_{k + 1}")
        rows = []
        for fields in reader:
            if not "".join(fields).strip():
                continue
            line, usable = reader.line_num, True
            while len(fields) > len(cols) and not fields[-1].strip():
                fields = fields[:-1]  # a spreadsheet's trailing empty cells
            if len(fields) > len(cols):
                fields, into = _rejoin(fields, cols, delimiter)
                usable = into is not None
                say(f"{path}, line {line}: more fields than columns; " +
                    (f"an unquoted {delimiter!r} in its {into} read as part of it: {fields[cols.index(into)]!r}."
                     if usable else "no one column explains them: kept in the file as it is, not applied."))
            elif len(fields) < len(cols):
                say(f"{path}, line {line}: {len(fields)} fields of {len(cols)} (cut short?): read as far as it goes.")
            row = {**dict.fromkeys(REVIEW_COLUMNS + cols, ""), **dict(zip(cols, fields))}
            rows.append((line, _tidy(row) if usable else row, usable))
    except (csv.Error, ValueError) as e:
        raise ValueError(_UNREADABLE.format(path=path, why=e)) from None
    for c, h in zip(cols, header):  # the empty columns a spreadsheet adds after the last one
        if not h.strip() and not any(r[c] for _, r, _ in rows):
            for _, r, _ in rows:
                del r[c]
    return rows


def check_review_file(exp_dir):
    """Raise ValueError, naming it, when `exp_dir/review.csv` exists and cannot be read (see `read_decisions`)."""
    path = Path(exp_dir) / REVIEW_FILE
    if path.exists():
        _review_rows(path, lambda msg: None)


def read_decisions(exp_dir, cat, tol=3.0, quiet=False):
    """The review decisions of `exp_dir/review.csv` given to the specimens of catalogue `cat`: `(decisions by id,
    rows that match no specimen)`; every row of the file is in one or the other.

    The one reader of `review.csv`, as a spreadsheet may have saved it (`_review_rows`). A row
    goes to the specimen whose centroid lies within `tol` voxels of its own: its own id when
    that one does, else the nearest, so that decisions follow their specimen when a new
    extraction renumbers them; a row without a centroid goes to the specimen of its id, and takes
    that specimen's centroid. A specimen takes the first row only. Says what it could not apply
    and what it matched by id only (unless `quiet`); raises ValueError, naming the file, when the
    file cannot be read.
    """
    path = Path(exp_dir) / REVIEW_FILE
    say = (lambda msg: None) if quiet else print
    if not path.exists():
        return {}, []
    ids = cat["id"].to_numpy(int)
    cents = cat[_CENTROID].to_numpy(float)
    decisions, unmatched, by_id = {}, [], 0
    for line, r, usable in _review_rows(path, say):
        bad = _not_numbers(r, ["id", *_CENTROID]) if usable else []
        if bad:
            say(f"{path}, line {line}: " + ", ".join(f"{c} {r[c]!r}" for c in bad) +
                (" is not a number" if len(bad) == 1 else " are not numbers") + ": kept in the file, not applied.")
        usable = usable and not bad
        sid = float(r["id"]) if usable and r["id"] else None
        c = [float(r[a]) if usable and r[a] else None for a in _CENTROID]
        k = None
        if usable and len(ids) and None not in c:
            d = np.linalg.norm(cents - np.array(c), axis=1)
            same = ids == sid
            k = int(np.flatnonzero(same)[0]) if same.any() and d[same][0] <= tol else int(np.argmin(d))
            k = k if d[k] <= tol else None
        elif usable and (ids == sid).any():
            k = int(np.flatnonzero(ids == sid)[0])
        if k is None or int(ids[k]) in decisions:
            unmatched.append(r)
        else:
            row = decisions[int(ids[k])] = {**r, "id": int(ids[k])}
            if None in c:  # matched by id: it takes its specimen's centroid
                row.update(zip(_CENTROID, cents[k].tolist()))
                by_id += 1
            if r["decision"] not in DECISIONS:
                say(f"{path}, line {line}: decision {r['decision']!r} is neither 'accepted' nor 'rejected': shown "
                    "as not decided, kept in the file until the specimen is decided again.")
    if by_id:
        say(f"{path}: {by_id} row{'s' * (by_id != 1)} without a centroid matched by id only (the catalogue's ids); "
            "each takes its specimen's centroid at the next save.")
    return decisions, unmatched
