"""What a specimen leaves on disk: a watertight mesh (STL, in µm), CT and mask crops (TIFF stacks carrying the voxel
size for ImageJ/Fiji), a preview image, and the gallery of every specimen."""
from __future__ import annotations

import math

import numpy as np

from .io import replacing
from .specimens import centroid


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


def _outlined(ct, mask):
    """RGB of CT slice `ct` with the outline of `mask` drawn in red."""
    from scipy import ndimage
    rgb = np.repeat(ct[..., None], 3, -1)
    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    rgb[edge] = (255, 40, 40)
    return rgb


def _font(size):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError):
        return ImageFont.load_default()


def _preview(ct, mask, title, panel=180):
    """Preview image: three orthogonal mid-slices (mask outlined) and the specimen's maximum-intensity projection."""
    from PIL import Image, ImageDraw
    zc, yc, xc = (int(round(c)) for c in centroid(mask)) if mask.any() else (s // 2 for s in mask.shape)
    views = [("z (YX)", _outlined(ct[zc], mask[zc])), ("y (ZX)", _outlined(ct[:, yc], mask[:, yc])),
             ("x (ZY)", _outlined(ct[:, :, xc], mask[:, :, xc])),
             ("MIP of specimen", np.where(mask, ct, 0).max(0))]
    out = Image.new("RGB", (4 * (panel + 6) + 6, panel + 44), (255, 255, 255))
    draw, font = ImageDraw.Draw(out), _font(13)
    draw.text((6, 3), title, fill=(0, 0, 0), font=font)
    for k, (name, img) in enumerate(views):
        im = _fit(img, panel)
        x0 = 6 + k * (panel + 6)
        out.paste(im, (x0 + (panel - im.size[0]) // 2, 22 + (panel - im.size[1]) // 2))
        draw.text((x0, panel + 26), name, fill=(80, 80, 80), font=font)
    return out, views[-1][1]


def write_gallery(exp_dir, tiles, per_page=100, tile=128):
    """`gallery.png` (then `gallery_02.png`, ...): specimen thumbnails `(id, class, image)` in the given order."""
    from PIL import Image, ImageDraw
    for old in exp_dir.glob("gallery*.png"):
        old.unlink()
    cols, pages = min(10, max(1, len(tiles))), []
    for p0 in range(0, len(tiles), per_page):
        page = tiles[p0:p0 + per_page]
        rows = math.ceil(len(page) / cols)
        out = Image.new("RGB", (cols * (tile + 4) + 4, rows * (tile + 18) + 4), (255, 255, 255))
        draw, font = ImageDraw.Draw(out), _font(11)
        for k, (sid, cls, img) in enumerate(page):
            x0, y0 = 4 + (k % cols) * (tile + 4), 4 + (k // cols) * (tile + 18)
            im = _fit(img, tile)
            out.paste(im, (x0 + (tile - im.size[0]) // 2, y0 + (tile - im.size[1]) // 2))
            draw.text((x0, y0 + tile + 2), f"#{sid}  {cls}"[:24], fill=(0, 0, 0), font=font)
        path = exp_dir / ("gallery.png" if not pages else f"gallery_{len(pages) + 1:02d}.png")
        out.save(path)
        pages.append(path)
    return pages


def export_specimen(d, images, cc, lbl, bb, margin, spacing, verts, faces, title):
    """Write folder `d`: CT crop and mask TIFFs (`bb` plus `margin`), the STL mesh, the preview; return the MIP."""
    d.mkdir()
    crop = tuple(slice(max(0, s.start - margin), min(size, s.stop + margin)) for s, size in zip(bb, cc.shape))
    ct = np.asarray(images[crop])
    mask = cc[crop] == lbl
    write_stack(d / f"{d.name}_ct.tif", ct, spacing)
    write_stack(d / f"{d.name}_mask.tif", mask.astype(np.uint8) * 255, spacing)
    write_stl(d / f"{d.name}.stl", verts, faces)
    img, mip = _preview(ct, mask, title)
    img.save(d / f"{d.name}_preview.png")
    return mip
