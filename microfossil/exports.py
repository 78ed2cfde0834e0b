"""What a specimen leaves on disk: a watertight mesh (STL, in µm), CT and mask crops (TIFF stacks carrying the voxel
size for ImageJ/Fiji), a preview image, and the gallery of every specimen.

The previews and the gallery show each specimen's current class (the catalogue's, then the
review's decision, read by `decisions.read_decisions`), so they are drawn from the catalogue and
the crops on disk (`draw_gallery`) after the extraction, after the specimen classifier and after
each review decision. With the run folder on Google Drive, a review decision draws on the local
disk instead (`local=True`: a folder of `runtime.local_dir`, seeded from Drive's gallery), and
`publish_drawings` copies what changed to Drive in place, once, when the review ends
(`runtime.flush_drive`, or the next `draw_gallery` on Drive): a click then writes only the
decision to Drive, not a preview, a gallery page of 100 tiles and the gallery's record, each
a replaced file in Drive's bin.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np

from .decisions import read_decisions
from .io import finish_commit, read_json, replacing, write_json
from .runtime import copy_in_place, file_digest, local_dir, on_drive
from .plots import get_class_colours
from .specimens import NOT_A_FOSSIL, centroid

GALLERY_RECORD = "gallery.json"  # beside the gallery: what each preview and tile shows, so a redraw skips the same
GREY = [150, 150, 150]  # not a fossil: flagged by the specimen classifier or rejected in the review
DRAWINGS, DRAWN_FROM = "drawings", "drawn_from.json"  # the review's drawings on the local disk, and the Drive state
                                                      # they were drawn over (`_drive_state`)


def mesh(mask, spacing, max_voxels=2 ** 24):
    """Watertight triangle mesh of boolean `mask` in µm: `(verts (n, 3) z y x, faces (m, 3))`, outward normals.

    Marching cubes on the mask smoothed by a 0.5-voxel Gaussian, each mask voxel kept inside
    (so one-voxel-thin walls survive). A sphere's area comes out within ~4% (a plain binary
    mesh overestimates it by ~9%). Masks over `max_voxels` are meshed on a coarser grid
    (block occupancy), so a huge false specimen cannot exhaust memory.
    """
    from scipy import ndimage
    from skimage.measure import marching_cubes
    spacing = np.asarray(spacing, float)
    f = max(1, math.ceil((mask.size / max_voxels) ** (1 / 3)))
    if f == 1:
        pad = 2
        m = np.pad(mask, pad).astype(np.float32)
        field = np.maximum(ndimage.gaussian_filter(m, 0.5), 0.55 * m)
    else:
        pad = 1
        shape = [math.ceil(s / f) * f for s in mask.shape]
        m = np.zeros(shape, np.float32)
        m[tuple(slice(0, s) for s in mask.shape)] = mask
        blocks = m.reshape(shape[0] // f, f, shape[1] // f, f, shape[2] // f, f)
        field = np.pad(np.maximum(blocks.mean((1, 3, 5)), 0.55 * blocks.max((1, 3, 5))), pad)
    verts, faces, _, _ = marching_cubes(field, 0.5, allow_degenerate=False)
    verts = ((verts - pad) * f + (f - 1) / 2) * spacing  # back to the voxel grid of `mask`, then µm
    tri = verts[faces]
    if np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() < 0:
        faces = faces[:, ::-1]  # orient the normals outwards
    return verts.astype(np.float32), np.ascontiguousarray(faces)


def write_stl(path, verts, faces):
    """Binary STL of a mesh whose `verts` are z, y, x in µm (written as x, y, z); atomic."""
    xyz = verts[:, ::-1].astype(np.float32)
    tri = xyz[faces[:, ::-1]]  # swapping z and x mirrors the mesh: reverse the winding to keep normals outward
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    rec = np.zeros(len(tri), dtype=[("normal", "<f4", (3,)), ("verts", "<f4", (3, 3)), ("attr", "<u2")])
    rec["normal"], rec["verts"] = n, tri
    with replacing(path) as tmp, open(tmp, "wb") as fh:
        fh.write(b"microfossil-ct specimen mesh, units: micrometres".ljust(80, b" "))
        fh.write(np.uint32(len(rec)).tobytes())
        fh.write(rec.tobytes())


def write_stack(path, arr, spacing):
    """Multi-page TIFF with the voxel size in ImageJ/Fiji metadata (µm); atomic."""
    import tifffile
    with replacing(path) as tmp:
        tifffile.imwrite(tmp, arr, imagej=True, resolution=(1 / spacing[2], 1 / spacing[1]),
                         metadata={"spacing": spacing[0], "unit": "um", "axes": "ZYX"}, compression="zlib")


def _fit(img, size):
    """Resize 2D uint8/RGB `img` so that its longest side is `size` (nearest neighbour when enlarging)."""
    from PIL import Image
    im = Image.fromarray(img)
    s = size / max(im.size)
    return im.resize((max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s))),
                     Image.NEAREST if s >= 1 else Image.BILINEAR)


def export_specimen(d, images, cc, lbl, bb, margin, spacing, verts, faces):
    """Write folder `d`: CT and mask crops as TIFF stacks (`bb` plus `margin`) and the STL mesh (the preview is drawn
    by `draw_gallery`)."""
    d.mkdir()
    crop = tuple(slice(max(0, s.start - margin), min(size, s.stop + margin)) for s, size in zip(bb, cc.shape))
    write_stack(d / f"{d.name}_ct.tif", np.asarray(images[crop]), spacing)
    write_stack(d / f"{d.name}_mask.tif", (cc[crop] == lbl).astype(np.uint8) * 255, spacing)
    write_stl(d / f"{d.name}.stl", verts, faces)


def specimen_look(row, decision, codes, colours):
    """What specimen `row` of the catalogue shows, given its review `decision` (a row of `review.csv` or None):
    `{"name", "status", "colour", "marker"}`; the colour is that of the class `labels_clean.tif` paints it with."""
    index = {c: k for k, c in enumerate(codes) if k}
    cls, seg = str(row["class"]), str(row.get("seg_class", row["class"]))
    verdict = (decision or {}).get("decision")
    if verdict == "rejected":
        return {"name": NOT_A_FOSSIL, "status": f"rejected in review; was {cls}", "colour": GREY, "marker": "x"}
    if verdict == "accepted":
        name = (decision.get("taxon") or decision.get("predicted_class") or cls).strip()
        k = index.get(name, index.get(cls, index.get(seg)))
        return {"name": name, "status": "accepted in review", "colour": colours[k] if k else GREY, "marker": "check"}
    if cls == NOT_A_FOSSIL or str(row.get("flagged")).lower() == "true":
        return {"name": NOT_A_FOSSIL, "status": f"flagged by the classifier; segmentation: {seg}", "colour": GREY,
                "marker": "x"}
    k = index.get(cls, index.get(seg))
    return {"name": cls, "status": "" if cls == seg else f"segmentation: {seg}", "colour": colours[k] if k else GREY,
            "marker": None}


def _outline(mask, width=1):
    """The `width` pixels around boolean `mask` (outside it, so that the specimen's own voxels stay in sight)."""
    from scipy import ndimage
    return ndimage.binary_dilation(mask, iterations=width) & ~mask


def _outlined(ct, mask, colour):
    """RGB of CT slice `ct` with the outline of `mask` drawn in `colour`."""
    rgb = np.repeat(ct[..., None], 3, -1)
    rgb[_outline(mask)] = colour
    return rgb


def _tile(ct, mask, colour, size):
    """Gallery tile: CT slice `ct` contrast-stretched and scaled to fit `size`, the outline of `mask` in `colour`."""
    from PIL import Image
    lo, hi = np.percentile(ct, [1, 99.5])
    img = np.clip((ct.astype(np.float32) - lo) * (255 / max(hi - lo, 1.0)), 0, 255).astype(np.uint8)
    s = size / max(ct.shape)
    wh = (max(1, round(ct.shape[1] * s)), max(1, round(ct.shape[0] * s)))
    img = np.asarray(Image.fromarray(img).resize(wh, Image.BICUBIC if s > 1 else Image.BOX))
    if s > 1:  # the outline drawn at the tile's resolution: smooth, and as thick at every size
        m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(wh, Image.BILINEAR)) > 127
        edge = _outline(m, max(1, round(size / 80)))
    else:  # shrunk: the outline of the voxels, kept however thin
        edge = np.asarray(Image.fromarray(_outline(mask).astype(np.uint8) * 255).resize(wh, Image.BOX)) > 0
    rgb = np.repeat(img[..., None], 3, -1)
    rgb[edge] = colour
    return Image.fromarray(rgb)


def _mark(draw, x, y, marker, colour, size=12):
    """Draw `marker` ("x": not a fossil, "check": accepted in review) in a `size` square at `x`, `y`."""
    if marker is None:
        return
    pts = ([(x, y), (x + size, y + size)], [(x, y + size), (x + size, y)]) if marker == "x" else \
        ([(x, y + size // 2), (x + size // 3, y + size), (x + size, y)],)
    for width, fill in ((5, (0, 0, 0)), (3, tuple(colour))):  # a dark rim: visible on bright and dark CT alike
        for p in pts:
            draw.line(p, fill=fill, width=width)


def _font(size):
    from PIL import ImageFont
    try:  # matplotlib's own DejaVu Sans, else Pillow's font
        from matplotlib import font_manager
        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:
        try:
            return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
        except (TypeError, OSError):
            return ImageFont.load_default()


def _clip(draw, text, font, width):
    """`text`, shortened with an ellipsis to fit in `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _preview(ct, mask, row, look, panel=180):
    """Preview image: the class and measurements of catalogue `row`, as `look` says, over three orthogonal mid-slices
    (the mask outlined in the class colour) and the specimen's maximum-intensity projection."""
    from PIL import Image, ImageDraw
    zc, yc, xc = _centre(mask)
    col = look["colour"]
    views = [("z (YX), at the centroid", _outlined(ct[zc], mask[zc], col)),
             ("y (ZX)", _outlined(ct[:, yc], mask[:, yc], col)), ("x (ZY)", _outlined(ct[:, :, xc], mask[:, :, xc], col)),
             ("MIP of specimen", np.where(mask, ct, 0).max(0))]
    out = Image.new("RGB", (4 * (panel + 6) + 6, panel + 62), (255, 255, 255))
    draw, font, big = ImageDraw.Draw(out), _font(13), _font(15)
    draw.rectangle((6, 5, 18, 17), fill=tuple(col))
    title = f"#{row['id']}  {look['name']}" + (f"  ·  {look['status']}" if look["status"] else "")
    draw.text((24, 2), _clip(draw, title, big, out.size[0] - 50), fill=(0, 0, 0), font=big)
    _mark(draw, out.size[0] - 20, 5, look["marker"], col)
    draw.text((6, 22), f"volume {row['volume_um3']:.4g} µm³   ESD {row['esd_um']:.3g} µm   "
                       f"sphericity {row['sphericity']:.2f}   {row['voxels']} voxels", fill=(60, 60, 60), font=font)
    for k, (name, img) in enumerate(views):
        im = _fit(img, panel)
        x0 = 6 + k * (panel + 6)
        out.paste(im, (x0 + (panel - im.size[0]) // 2, 40 + (panel - im.size[1]) // 2))
        draw.text((x0, panel + 44), name, fill=(80, 80, 80), font=font)
    return out


def _save_png(img, path):
    with replacing(path) as tmp:
        img.save(tmp, format="PNG", compress_level=3)  # on CT noise as small as the default level, 3 times faster


def specimen_folders(exp_dir):
    """Each exported specimen's folder (`fossil_<id>`), by id."""
    return {int(d.name[7:]): d for d in Path(exp_dir).glob("fossil_*") if d.name[7:].isdigit() and d.is_dir()}


def _centre(mask):
    """The voxel (z, y, x) at the centroid of boolean `mask` (its middle when it is empty)."""
    return tuple(int(round(c)) for c in centroid(mask)) if mask.any() else tuple(s // 2 for s in mask.shape)


def _crops(d, whole_ct=True):
    """The mask crop of specimen folder `d` and its CT crop (`whole_ct`), or the two slices at the centroid."""
    import tifffile
    paths = [d / f"{d.name}_mask.tif", d / f"{d.name}_ct.tif"]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: the specimen folders are incomplete; re-run the extraction cell "
                                    "of 05_predict_export (same work_dir).")
    mask = tifffile.imread(paths[0]) > 0
    mask = mask[None] if mask.ndim == 2 else mask  # a one-slice crop
    if whole_ct:
        return mask, tifffile.imread(paths[1]).reshape(mask.shape)
    z = _centre(mask)[0]
    return mask[z], tifffile.imread(paths[1], key=z)


def _draw_header(draw, text, codes, colours, font, width):
    """A page's first line: `text`, then the colour of each class."""
    draw.text((6, 4), text, fill="black", font=font)
    x = 18 + draw.textlength(text, font=font)
    for name, col in [*zip(codes[1:], colours[1:]), (f"{NOT_A_FOSSIL} (x)", GREY)]:
        if x + 14 + draw.textlength(name, font=font) > width:
            break
        draw.rectangle((x, 6, x + 9, 15), fill=tuple(col))
        draw.text((x + 13, 4), name, fill="black", font=font)
        x += 27 + draw.textlength(name, font=font)


def _draw_tile(page, x0, y0, sid, look, slices, tile, font):
    """Draw specimen `sid`'s tile (from its central `slices`, mask and CT) and caption on `page` at `x0`, `y0`."""
    from PIL import ImageDraw
    draw = ImageDraw.Draw(page)
    draw.rectangle((x0, y0, x0 + tile + 5, y0 + tile + 31), fill="white")
    im = _tile(slices[1], slices[0], look["colour"], tile)
    page.paste(im, (x0 + (tile - im.size[0]) // 2, y0 + (tile - im.size[1]) // 2))
    _mark(draw, x0 + tile - 16, y0 + 4, look["marker"], look["colour"])
    draw.rectangle((x0, y0 + tile + 4, x0 + 8, y0 + tile + 12), fill=tuple(look["colour"]))
    draw.text((x0 + 12, y0 + tile + 2), _clip(draw, f"#{sid} {look['name']}", font, tile - 12), fill="black", font=font)
    draw.text((x0, y0 + tile + 16), _clip(draw, look["status"], font, tile), fill=(90, 90, 90), font=font)


def _drive_state(work_dir):
    """What the drawings on the local disk were drawn over: the catalogue's size and time and the gallery record's hash
    on Drive. When either changed since (a new extraction, a classifier, a drawing on Drive), they are stale."""
    exp = Path(work_dir) / "exports"
    cat, rec = exp / "fossils.csv", exp / GALLERY_RECORD
    return {"catalogue": [cat.stat().st_size, cat.stat().st_mtime_ns] if cat.exists() else None,
            "record": file_digest(rec) if rec.exists() else None}


def _local_drawings(work_dir, create=True):
    """The folder on the local disk where a review of run folder `work_dir` (on Drive) draws, or None: off Drive, or
    `create` False and none there. It mirrors `exports/`: `gallery*.png`, the record, `fossil_<id>/..._preview.png`."""
    if not on_drive(work_dir):
        return None
    if not create:
        folder = local_dir(work_dir) / DRAWINGS
        return folder if folder.is_dir() else None
    return local_dir(work_dir, DRAWINGS)


def _seeded(work_dir):
    """The local drawings folder of run folder `work_dir`, holding Drive's gallery and record when it held none or
    stale ones (their previews are read from Drive until one is drawn again)."""
    folder, state = _local_drawings(work_dir), _drive_state(work_dir)
    if read_json(folder / DRAWN_FROM) != state:
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
        exp = Path(work_dir) / "exports"
        for p in [*exp.glob("gallery*.png"), exp / GALLERY_RECORD]:
            if p.exists():
                shutil.copyfile(p, folder / p.name)
        write_json(folder / DRAWN_FROM, state)
    return folder


def preview_file(work_dir, folder):
    """The preview PNG of specimen folder `folder` as it stands: the one a review on Drive drew on the local disk since
    the last `publish_drawings`, else the folder's own."""
    mine = Path(folder) / f"{Path(folder).name}_preview.png"
    local = _local_drawings(work_dir, create=False)
    if local is not None and (local / DRAWN_FROM).exists():
        drawn = local / Path(folder).name / mine.name
        if drawn.exists():
            return drawn
    return mine


def publish_drawings(work_dir):
    """Copy what a review on Drive drew on the local disk to the run folder's `exports/` on Drive: each preview and
    gallery page that differs, written over the Drive file in place (nothing in Drive's bin), the gallery record last
    (a copy cut short leaves Drive's record older, so those are drawn again). Stale drawings (Drive changed since)
    are dropped. Returns `(files, bytes)` written."""
    folder = _local_drawings(work_dir, create=False)
    if folder is None or not (folder / DRAWN_FROM).exists():
        return 0, 0
    if read_json(folder / DRAWN_FROM) != _drive_state(work_dir):
        shutil.rmtree(folder)
        return 0, 0
    exp, n, size = Path(work_dir) / "exports", 0, 0
    for p in [*sorted(folder.rglob("*.png")), folder / GALLERY_RECORD]:
        dst = exp / p.relative_to(folder)
        if not p.exists() or not dst.parent.is_dir():
            continue
        if dst.exists() and dst.stat().st_size == p.stat().st_size and dst.read_bytes() == p.read_bytes():
            continue
        size += copy_in_place(p, dst)["size"]
        n += 1
    pages = (read_json(folder / GALLERY_RECORD) or {}).get("pages", [])
    for p in exp.glob("gallery*.png"):  # a layout drawn anew (rare in a review): its old pages
        if p.name not in pages:
            p.unlink()
    write_json(folder / DRAWN_FROM, _drive_state(work_dir))
    return n, size


def draw_gallery(work_dir, per_page=100, tile=160, exp_dir=None, local=False):
    """Draw the gallery `exports/gallery*.png` and each exported specimen's preview as the catalogue and the review
    stand now; return the tile table (`id`, `name`, `status`, `colour`, `marker`, `page`; `left`, `top` and `size`
    of its square on the page; `redrawn`).

    Each tile is the specimen's CT slice at its centroid with its outline in its class colour
    (the colours of the figures; grey with an x when it is not a fossil: flagged by the
    specimen classifier or rejected in the review; a tick when accepted in the review),
    captioned with its id and class; largest specimen first, `per_page` tiles a page. Reads the
    crops in the specimen folders, never the volume. `exports/gallery.json` records what each
    preview and tile shows, so that only those that changed are drawn again.
    `exp_dir` is where the catalogue, the specimen folders and the gallery are (default
    `work_dir/exports`; the extraction draws its new gallery in its stage, `io.staged`); the
    review is always that of `work_dir/exports`. `local`: a review decision's drawing; with the run
    folder on Drive it goes to the local disk until `publish_drawings` (see the module's docstring).
    """
    import pandas as pd
    from PIL import Image, ImageDraw
    review_dir = Path(work_dir) / "exports"
    if exp_dir is None:
        finish_commit(work_dir)  # an extraction a kill cut in the middle of its commit
    exp_dir = Path(exp_dir) if exp_dir is not None else review_dir
    if not (exp_dir / "fossils.csv").exists():
        raise FileNotFoundError(f"{exp_dir / 'fossils.csv'} not found: run the extraction cell of 05_predict_export "
                                "first (same work_dir).")
    draw_dir, on_drive_now = exp_dir, exp_dir == review_dir and on_drive(work_dir)
    if on_drive_now and local:
        draw_dir = _seeded(work_dir)
    elif on_drive_now:
        publish_drawings(work_dir)  # a review's drawings first: what is drawn below builds on them
    cat = pd.read_csv(exp_dir / "fossils.csv")
    codes = ["background", *[c[5:] for c in cat.columns if c.startswith("frac_")]]
    colours = [[int(round(255 * v)) for v in c[:3]] for c in get_class_colours(len(codes))]
    decisions, folders = read_decisions(review_dir, cat, quiet=True)[0], specimen_folders(exp_dir)
    shown = cat[cat["id"].isin(list(folders))].sort_values(["voxels", "id"], ascending=[False, True])
    rows = {int(r["id"]): r for _, r in shown.iterrows()}
    looks = {sid: specimen_look(r, decisions.get(sid), codes, colours) for sid, r in rows.items()}
    ids, cols = list(looks), min(10, max(1, len(looks)))
    pages = ["gallery.png" if k == 0 else f"gallery_{k + 1:02d}.png" for k in range(math.ceil(len(ids) / per_page))]
    old = read_json(draw_dir / GALLERY_RECORD) or {}
    same_layout = (old.get("ids") == ids and old.get("layout") == [per_page, tile, cols]
                   and all((draw_dir / p).exists() for p in pages))
    drawn = {int(k): v for k, v in old.get("looks", {}).items()} if same_layout else {}
    changed = {sid for sid in ids if drawn.get(sid) != looks[sid]}
    central = {}  # the slices at the centroid of the crops read for a preview, for their tile
    for sid in ids:
        p = folders[sid] / f"{folders[sid].name}_preview.png"
        out = p if draw_dir == exp_dir else draw_dir / folders[sid].name / p.name  # (a review's, on the local disk)
        if sid in changed or not (p.exists() or out.exists()):
            mask, ct = _crops(folders[sid])
            out.parent.mkdir(exist_ok=True)
            _save_png(_preview(ct, mask, rows[sid], looks[sid]), out)
            z = _centre(mask)[0]
            central[sid] = mask[z], ct[z]
    if not same_layout:
        for p in draw_dir.glob("gallery*.png"):
            p.unlink()
    font, table = _font(11), []
    for k, name in enumerate(pages):
        on_page = ids[k * per_page:(k + 1) * per_page]
        slots = [(sid, 6 + (j % cols) * (tile + 6), 22 + (j // cols) * (tile + 32)) for j, sid in enumerate(on_page)]
        table += [{"id": sid, **looks[sid], "page": name, "left": x0, "top": y0, "size": tile,
                   "redrawn": sid in changed} for sid, x0, y0 in slots]
        if not changed.intersection(on_page):
            continue
        if same_layout:
            page = Image.open(draw_dir / name).convert("RGB")
        else:
            page = Image.new("RGB", (cols * (tile + 6) + 6, 26 + math.ceil(len(on_page) / cols) * (tile + 32)), "white")
            _draw_header(ImageDraw.Draw(page), f"{len(ids)} specimens, largest first, page {k + 1} of {len(pages)}:",
                         codes, colours, font, page.size[0])
        for sid, x0, y0 in slots:
            if sid in changed:
                _draw_tile(page, x0, y0, sid, looks[sid], central.pop(sid, None) or _crops(folders[sid], False), tile, font)
        _save_png(page, draw_dir / name)
    record = {"layout": [per_page, tile, cols], "ids": ids, "pages": pages, "looks": {str(k): v for k, v in looks.items()}}
    if (ids or old) and record != old:  # (unchanged: not written again, so no replaced copy in Drive's bin)
        write_json(draw_dir / GALLERY_RECORD, record)
    table = pd.DataFrame(table, columns=["id", "name", "status", "colour", "marker", "page", "left", "top", "size",
                                         "redrawn"])
    table["colour"] = ["#%02x%02x%02x" % tuple(c) for c in table["colour"]]
    return table
