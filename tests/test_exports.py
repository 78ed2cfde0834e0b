"""What a specimen leaves on disk: a closed mesh with the right area, TIFF stacks with the voxel size; the previews and
the gallery, drawn in the class colours and drawn again only where a class changed."""
import math

import numpy as np
import pandas as pd
import tifffile
import trimesh
from PIL import Image

from conftest import ball
from microfossil.exports import draw_gallery, export_specimen, mesh, write_stack, write_stl
from microfossil.specimens import NOT_A_FOSSIL

ORANGE, GREEN = (255, 127, 14), (44, 160, 44)  # tab10, the figures' colours of classes 1 and 2


def test_sphere_mesh_is_closed_and_its_area_close(tmp_path):
    for r in (3, 8, 15):
        m = ball((2 * r + 5,) * 3, (r + 2,) * 3, r)
        verts, faces = mesh(m, (2.0, 1.0, 1.0))  # anisotropic voxels: z is twice as long
        write_stl(tmp_path / "s.stl", verts, faces)
        t = trimesh.load(tmp_path / "s.stl")
        assert t.is_watertight and t.volume > 0
        ext = t.bounds[1] - t.bounds[0]  # x, y, z in µm
        assert ext[2] > 1.8 * ext[0]
        iso_v, iso_f = mesh(m, (1.0, 1.0, 1.0))
        area = trimesh.Trimesh(iso_v, iso_f).area
        assert abs(area / (4 * math.pi * r * r) - 1) < 0.06, (r, area)


def test_coarse_mesh_of_a_huge_mask_is_still_closed():
    m = ball((40, 40, 40), (20, 20, 20), 17)
    verts, faces = mesh(m, (1.0, 1.0, 1.0), max_voxels=4000)  # meshed on blocks of voxels
    assert trimesh.Trimesh(verts, faces).is_watertight


def test_stack_and_specimen_folder(tmp_path):
    write_stack(tmp_path / "a.tif", np.zeros((3, 4, 5), np.uint8), (5.0, 2.5, 2.5))
    with tifffile.TiffFile(tmp_path / "a.tif") as t:
        assert t.imagej_metadata["spacing"] == 5.0 and t.imagej_metadata["unit"] == "um"
    cc = np.zeros((20, 20, 20), np.uint16)
    cc[ball(cc.shape, (10, 10, 10), 5)] = 7
    images = np.where(cc > 0, 200, 50).astype(np.uint8)
    box = (slice(5, 16),) * 3
    v, f = mesh(cc[box] == 7, (1, 1, 1))
    export_specimen(tmp_path / "fossil_0001", images, cc, 7, box, 3, (1.0, 1.0, 1.0), v, f)
    names = sorted(p.name for p in (tmp_path / "fossil_0001").iterdir())
    assert names == ["fossil_0001.stl", "fossil_0001_ct.tif", "fossil_0001_mask.tif"]  # the preview: draw_gallery
    assert tifffile.imread(tmp_path / "fossil_0001" / "fossil_0001_ct.tif").shape == (17, 17, 17)  # box + 3 around


def _catalogue(tmp_path, n, classes=("foraminifera", "ostracod")):
    """A run folder whose catalogue lists `n` exported balls, specimen k of radius 3 + k % 4, class `classes[k % 2]`."""
    exp = tmp_path / "run" / "exports"
    exp.mkdir(parents=True)
    rows = []
    for k in range(1, n + 1):
        r = 3 + k % 4
        m = ball((2 * r + 7,) * 3, (r + 3,) * 3, r)
        d = exp / f"fossil_{k:04d}"
        export_specimen(d, np.where(m, 200, 60).astype(np.uint8), m.astype(np.uint8), 1, (slice(0, len(m)),) * 3, 0,
                        (1.0, 1.0, 1.0), *mesh(m, (1, 1, 1)))
        rows.append({"id": k, "class": classes[k % 2], "voxels": int(m.sum()), "volume_um3": float(m.sum()),
                     "esd_um": 2.0 * r, "sphericity": 0.95, "centroid_z": 10.0 * k, "centroid_y": 5.0,
                     "centroid_x": 5.0, "frac_foraminifera": 1.0, "frac_ostracod": 0.0})
    pd.DataFrame(rows).to_csv(exp / "fossils.csv", index=False)
    return tmp_path / "run"


def _tile_pixels(work, row):
    """The RGB pixels of a tile's square in its gallery page (a row of `draw_gallery`'s table)."""
    page = np.asarray(Image.open(work / "exports" / row["page"]).convert("RGB"))
    return page[row["top"]:row["top"] + row["size"], row["left"]:row["left"] + row["size"]].reshape(-1, 3)


def _stamps(work):
    """(inode, mtime) of every PNG of a run's exports: a file written again (atomically) gets a new inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (work / "exports").rglob("*.png")}


def _count(pixels, colour):
    return int((pixels == np.array(colour)).all(1).sum())


def test_gallery_tiles_show_the_central_slice_outlined_in_the_class_colour(tmp_path):
    work = _catalogue(tmp_path, 105)
    table = draw_gallery(work)
    assert list(dict.fromkeys(table["page"])) == ["gallery.png", "gallery_02.png"] and len(table) == 105
    assert Image.open(work / "exports" / "gallery.png").size[0] == 10 * (160 + 6) + 6
    voxels = pd.read_csv(work / "exports" / "fossils.csv").set_index("id").loc[table["id"], "voxels"].to_numpy()
    assert (np.diff(voxels) <= 0).all()  # largest first
    colour = {"foraminifera": ORANGE, "ostracod": GREEN}
    for _, row in table.iloc[[0, 1, 50, 104]].iterrows():
        px = _tile_pixels(work, row)
        assert row["name"] == ("foraminifera", "ostracod")[row["id"] % 2] and row["colour"] == "#%02x%02x%02x" % colour[row["name"]]
        other = GREEN if row["name"] == "foraminifera" else ORANGE
        assert _count(px, colour[row["name"]]) > 100 and _count(px, other) == 0  # the outline, in its colour only
        assert (px.max(1) == px.min(1)).mean() > 0.8 and px.max() == 255  # the rest is the CT slice, contrast-stretched
    preview = np.asarray(Image.open(work / "exports" / "fossil_0003" / "fossil_0003_preview.png").convert("RGB"))
    assert tuple(preview[10, 10]) == GREEN  # the title's colour swatch
    assert _count(preview.reshape(-1, 3), GREEN) > 100  # and the outlines


def test_gallery_redraws_only_what_changed(tmp_path):
    work = _catalogue(tmp_path, 12)
    draw_gallery(work)
    before = _stamps(work)
    assert not draw_gallery(work)["redrawn"].any()  # nothing changed: nothing drawn
    assert _stamps(work) == before
    cat = pd.read_csv(work / "exports" / "fossils.csv")
    cat["seg_class"], cat["flagged"] = cat["class"], False
    cat.loc[cat["id"] == 4, "class"] = "ostracod"  # the classifier changes one class and flags another
    cat.loc[cat["id"] == 5, ["class", "flagged"]] = [NOT_A_FOSSIL, True]
    cat.to_csv(work / "exports" / "fossils.csv", index=False)
    table = draw_gallery(work).set_index("id")
    assert sorted(table.index[table["redrawn"]]) == [4, 5]
    after = _stamps(work)
    assert sorted(p for p in after if after[p] != before[p]) == ["fossil_0004_preview.png", "fossil_0005_preview.png",
                                                                 "gallery.png"]
    assert table.loc[4, "name"] == "ostracod" and table.loc[4, "status"] == "segmentation: foraminifera"
    assert _count(_tile_pixels(work, table.loc[4]), GREEN) > 100 and _count(_tile_pixels(work, table.loc[4]), ORANGE) == 0
    assert table.loc[5, "name"] == NOT_A_FOSSIL and table.loc[5, "marker"] == "x" and table.loc[5, "colour"] == "#969696"
    px = _tile_pixels(work, table.loc[5])
    assert _count(px, ORANGE) == 0 and _count(px, GREEN) == 0
    fresh = draw_gallery(work, per_page=5)  # another layout: every page drawn again
    assert fresh["redrawn"].all() and sorted(p.name for p in (work / "exports").glob("gallery*.png")) == [
        "gallery.png", "gallery_02.png", "gallery_03.png"]


def test_the_gallery_reads_a_review_saved_by_a_spreadsheet(tmp_path):
    """review.csv re-saved by a spreadsheet (semicolons, decimal commas, Windows-1252, a column renamed): the tiles
    show its decisions; an empty review.csv is no decision."""
    work = _catalogue(tmp_path, 3)
    review = work / "exports" / "review.csv"
    review.write_bytes("id;Decision;taxon;predicted_class;confidence;voxels;Centroid Z;centroid_y;centroid_x;updated\r\n"
                       "2;rejected;;ostracod;0,9;300;20,4;5,0;5,0;01/02/2025 10:00\r\n"
                       "3;accepted;Ammonia, sp. (Linné);foraminifera;0,8;400;29,8;5,0;5,0;01/02/2025 10:01\r\n"
                       .encode("cp1252"))
    table = draw_gallery(work).set_index("id")
    assert table.loc[2, "name"] == NOT_A_FOSSIL and table.loc[3, "name"] == "Ammonia, sp. (Linné)"
    assert table.loc[1, "name"] == "ostracod"
    review.write_bytes(b"")
    table = draw_gallery(work).set_index("id")
    assert list(table.loc[[1, 2, 3], "name"]) == ["ostracod", "foraminifera", "ostracod"]
