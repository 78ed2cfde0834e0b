"""The assemblage along the core: how many specimens of each class, and how much of them, per depth interval.

The table micropaleontologists draw for biostratigraphy, from the catalogue (`exports/fossils.csv`) as the specimen
classifier and the review leave it: a specimen rejected in the review or flagged "not a fossil" is not counted; one
accepted with a taxon typed in counts under that taxon, else under its class. Depth is the specimen's centroid along
z (the core's axis, slice 0 at the top), in mm when the voxel size is known (`exports/extraction.json`), else in
slices.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .decisions import read_decisions
from .io import read_json, write_csv
from .specimens import NOT_A_FOSSIL
from .volume import NO_VOXEL_SIZE

SLICES_PER_INTERVAL = 100  # the interval when the voxel size is not known
ASSEMBLAGE = "assemblage.csv"


def assemblage_table(work_dir, depth_interval_mm=1.0):
    """The assemblage of run `work_dir` as a DataFrame: a row per depth interval of `depth_interval_mm` (from the top of
    the scan; `SLICES_PER_INTERVAL` slices when the voxel size is not known; the last one ends with the scan), the count and the
    volume (mm³, else voxels) of each class or taxon there, and the total count."""
    import pandas as pd
    exp_dir = Path(work_dir) / "exports"
    if not (exp_dir / "fossils.csv").exists():
        raise FileNotFoundError(f"{exp_dir / 'fossils.csv'} not found: run the extraction cell of 05 first (same "
                                "work_dir).")
    cat = pd.read_csv(exp_dir / "fossils.csv")
    info = read_json(exp_dir / "extraction.json") or {}
    n_slices = int((info.get("shape") or [int(cat["z1"].max()) if len(cat) else 1])[0]) + int(info.get("z_offset", 0))
    known = info.get("voxel_size_source") not in (None, NO_VOXEL_SIZE)
    z_um = float(info["voxel_size_um"][0]) if known else 1.0
    step = float(depth_interval_mm) * 1000 / z_um if known else SLICES_PER_INTERVAL  # in slices
    names = list(info.get("codes", [])[1:])
    decisions, _ = read_decisions(exp_dir, cat, quiet=True)
    flagged = cat["flagged"].astype(bool).to_numpy() if "flagged" in cat else np.zeros(len(cat), bool)
    taxa = []
    for sid, cls, flag in zip(cat["id"], cat["class"], flagged):
        d = decisions.get(int(sid), {})
        taxon = (d.get("taxon") or "").strip() if d.get("decision") == "accepted" else ""
        out = d.get("decision") == "rejected" or ((flag or cls == NOT_A_FOSSIL) and d.get("decision") != "accepted")
        taxa.append(None if out else taxon or cls)
    names += sorted({t for t in taxa if t is not None} - set(names))
    taxa = np.array(taxa, object)
    edges = np.append(np.arange(0, n_slices, step), n_slices)  # the last interval ends with the scan
    interval = np.clip(np.searchsorted(edges, cat["centroid_z"].to_numpy(float), side="right") - 1, 0, len(edges) - 2)
    size = cat["volume_um3"].to_numpy(float) / 1e9 if known else cat["voxels"].to_numpy(float)
    unit, vol_unit, per_slice = ("mm", "mm3", z_um / 1000) if known else ("slice", "voxels", 1)
    rows = []
    for k in range(len(edges) - 1):
        at = interval == k
        row = {f"depth_from_{unit}": edges[k] * per_slice, f"depth_to_{unit}": edges[k + 1] * per_slice}
        for name in names:
            mine = at & (taxa == name)
            row[f"{name}_count"] = int(mine.sum())
            row[f"{name}_volume_{vol_unit}"] = float(size[mine].sum())
        row["total_count"] = int(sum(row[f"{name}_count"] for name in names))
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs.update(unit=unit, classes=names)
    return table


def write_assemblage(work_dir, depth_interval_mm=1.0):
    """Write `exports/assemblage.csv` (`assemblage_table`) and `figures/assemblage.png`; return the table."""
    from .plots import plot_assemblage
    table = assemblage_table(work_dir, depth_interval_mm)
    write_csv(Path(work_dir) / "exports" / ASSEMBLAGE, table)
    plot_assemblage(table, path=Path(work_dir) / "figures" / "assemblage.png")
    unit = table.attrs["unit"]
    print(f"Assemblage along the core: {len(table)} intervals of "
          + (f"{depth_interval_mm:g} mm" if unit == "mm" else f"{SLICES_PER_INTERVAL} slices (no voxel size known)")
          + f", {int(table['total_count'].sum()) if len(table) else 0} specimens, in "
          f"{Path(work_dir) / 'exports' / ASSEMBLAGE}.")
    return table
