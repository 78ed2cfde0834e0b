"""What a specimen leaves on disk: a closed mesh with the right area, TIFF stacks with the voxel size, a preview,
the gallery."""
import math

import numpy as np
import tifffile
import trimesh
from PIL import Image

from conftest import ball
from microfossil.exports import export_specimen, mesh, write_gallery, write_stack, write_stl


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
    mip = export_specimen(tmp_path / "fossil_0001", images, cc, 7, box, 3, (1.0, 1.0, 1.0), v, f, "#1 test")
    names = sorted(p.name for p in (tmp_path / "fossil_0001").iterdir())
    assert names == ["fossil_0001.stl", "fossil_0001_ct.tif", "fossil_0001_mask.tif", "fossil_0001_preview.png"]
    assert tifffile.imread(tmp_path / "fossil_0001" / "fossil_0001_ct.tif").shape == (17, 17, 17)  # box + 3 around
    assert mip.shape == (17, 17) and mip.max() == 200
    pages = write_gallery(tmp_path, [(k, "foram", mip) for k in range(1, 106)], per_page=100)
    assert [p.name for p in pages] == ["gallery.png", "gallery_02.png"]
    assert Image.open(pages[0]).size[0] == 10 * (128 + 4) + 4
