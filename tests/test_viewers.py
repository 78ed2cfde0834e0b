"""The interactive views: the slice browser's sliders, overlay and marks, what it reads, its static figure; the 3D
views of one specimen and of all of them, their meshes and class colours, and the HTML pages written headless."""
import html
import io
import re
import shutil

import matplotlib
import numpy as np
import pytest
import trimesh
from PIL import Image

from conftest import CODES, make_case, volume_of
from microfossil import viewers
from microfossil.exports import GREY
from microfossil.extraction import extract_fossils
from microfossil.plots import get_class_colours
from microfossil.review import ReviewSession
from microfossil.specimens import NOT_A_FOSSIL

matplotlib.use("Agg")
pytest.importorskip("ipywidgets")
pytest.importorskip("plotly")


def pixels(png):
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def lines(p, colour, axis=1):
    """Rows (`axis` 1) or columns (0) of view `p` drawn across in `colour`."""
    return list(np.flatnonzero((p == colour).all(-1).mean(axis) > 0.9))


def rgb(k, n=3):
    """The plotly colour of class `k` of `n` (grey: None), as in every figure and preview of the project."""
    return "rgb({},{},{})".format(*(GREY if k is None else (round(255 * v) for v in get_class_colours(n)[k][:3])))


class Reads:
    """An array that records what is read from it: a stand-in for a memory-mapped volume larger than RAM."""

    def __init__(self, a):
        self.a, self.keys = a, []

    shape = property(lambda self: self.a.shape)

    def __getitem__(self, key):
        self.keys.append(key)
        return self.a[key]


@pytest.fixture
def live(monkeypatch):
    """A Jupyter or Colab kernel, as far as the views can tell."""
    monkeypatch.setattr(viewers, "has_widget_frontend", lambda: True)


def small_volume(tmp_path):
    """12 slices of 40x56: a box of class 1 in the truth (slices 3-8); the prediction calls it class 2."""
    images = (np.linspace(20, 160, 56)[None, None] + 8 * np.arange(12)[:, None, None] + np.zeros((12, 40, 1))).astype(np.uint8)
    truth = np.zeros(images.shape, np.uint8)
    truth[3:9, 10:20, 20:30] = 1
    pred = np.where(truth > 0, 2, 0).astype(np.uint8)
    return volume_of(images, truth, tmp_path, CODES), pred


def test_slice_browser_sliders_overlay_and_marks(tmp_path, live):
    vol, pred = small_volume(tmp_path)
    vol.images = Reads(vol.images)
    b = viewers.browse_slices(vol, pred)
    assert (b.z.max, b.y.max, b.x.max) == (11, 39, 55) and (b.z.value, b.y.value, b.x.value) == (6, 20, 28)
    assert b.overlay.options == ("none", "ground truth", "prediction") and b.overlay.value == "prediction"
    assert [v.value[:4] for v in (b.xy, b.xz, b.yz)] == [b"\x89PNG"] * 3
    s = 4  # 56 px enlarged 4x at most (nearest), so pixel (4y+1, 4x+1) shows voxel (y, x)
    gray = float(vol.images.a[6, 12, 22])
    over = lambda k: np.round(gray * 0.55 + get_class_colours(3)[k][:3] * 255 * 0.45)
    assert np.allclose(pixels(b.xy.value)[12 * s + 1, 22 * s + 1], over(2), atol=1)
    b.overlay.value = "ground truth"
    assert np.allclose(pixels(b.xy.value)[12 * s + 1, 22 * s + 1], over(1), atol=1)
    b.overlay.value = "none"
    assert np.allclose(pixels(b.xy.value)[12 * s + 1, 22 * s + 1], gray, atol=1)
    # moving z redraws the axial slice and moves the z line in the XZ and YZ views; only that slice is read
    vol.images.keys.clear()
    xy, xz, yz = b.xy.value, b.xz.value, b.yz.value
    b.z.value = 2
    assert b.xy.value != xy and b.xz.value != xz and b.yz.value != yz and vol.images.keys == [2]
    assert "z = 2" in b.captions[0].value
    for view in (b.xz, b.yz):  # one line across each, in the rows of z = 2
        assert [r // s for r in lines(pixels(view.value), viewers.Z_LINE)] == [2]
    assert [c // s for c in lines(pixels(b.xz.value), viewers.X_LINE, axis=0)] == [28]  # x marked in XZ
    assert [c // s for c in lines(pixels(b.yz.value), viewers.Y_LINE, axis=0)] == [20]  # y marked in YZ
    assert [r // s for r in lines(pixels(b.xy.value), viewers.Y_LINE)] == [20]  # and both in XY
    assert [c // s for c in lines(pixels(b.xy.value), viewers.X_LINE, axis=0)] == [28]
    b.y.value = 5
    assert all(np.ndim(k) == 0 or sum(isinstance(i, int) for i in k) == 1 for k in vol.images.keys)  # planes only


def test_slice_browser_of_a_large_volume_shows_views_of_at_most_512_px(tmp_path, live):
    images = np.zeros((3, 1100, 700), np.uint8)
    vol = volume_of(images, None, tmp_path, CODES)
    b = viewers.browse_slices(vol)
    assert b.overlay.options == ("none",)
    assert Image.open(io.BytesIO(b.xy.value)).size == (326, 512)
    assert max(Image.open(io.BytesIO(b.yz.value)).size) == 512


def test_slice_browser_headless_writes_a_figure_with_the_legend_under_it(tmp_path):
    vol, pred = small_volume(tmp_path)
    np.save(tmp_path / "pred.npy", pred)
    pred = np.load(tmp_path / "pred.npy", mmap_mode="r")  # a memory-mapped prediction
    assert not viewers.has_widget_frontend()
    assert viewers.browse_slices(vol, pred, path=tmp_path / "figures" / "slices.png") is None
    p = np.asarray(Image.open(tmp_path / "figures" / "slices.png").convert("RGB")).astype(int)
    ink = np.flatnonzero((p < 240).any(-1).any(1))  # rows with anything drawn
    assert np.diff(ink).max() < 20  # no empty band: panels, rows and legend follow one another (matplotlib 3.10,
                                    # Colab's, leaves 12 blank rows above the legend; 3.11 fewer)
    bottom = p[ink[-1] - 12:ink[-1] + 1]
    for k in (1, 2):  # the legend's swatches, under the panels, in the class colours of the other figures
        assert (np.abs(bottom - get_class_colours(3)[k][:3] * 255).max(-1) < 3).any()
    vol.labels = None
    viewers.browse_slices(vol, path=tmp_path / "figures" / "plain.png")
    assert (tmp_path / "figures" / "plain.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="another dataset"):
        viewers.browse_slices(vol, pred[:5], path=tmp_path / "x.png")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run extracted from the case with known objects, voxels of 2 µm; the smallest of 4 specimens not exported."""
    vol, pred, work, _, _ = make_case(tmp_path_factory.mktemp("viewers"), voxel_size=2.0)
    cat = extract_fossils(vol, work, pred, min_voxels=20, max_exports=3)
    assert len(cat) == 4 and cat.exported.sum() == 3
    return work, cat


def copy_run(run, tmp_path, classes=None):
    """A copy of the run, with `classes` ({id: class}) written into its catalogue as the specimen classifier would."""
    work = shutil.copytree(run[0], tmp_path / "run")
    if classes:
        import pandas as pd
        cat = pd.read_csv(work / "exports" / "fossils.csv")
        cat.insert(2, "seg_class", cat["class"])
        cat["class"] = [classes.get(i, c) for i, c in zip(cat["id"], cat["class"])]
        cat["flagged"] = cat["class"] == NOT_A_FOSSIL
        cat.to_csv(work / "exports" / "fossils.csv", index=False)
    return work


def test_specimen_mesh_is_its_stl_coloured_by_class(run):
    work, cat = run
    big = cat.loc[cat.voxels.idxmax()]
    fig = viewers.plot_specimen_3d(work)  # the largest by default
    (m,) = fig.data
    assert m.type == "mesh3d" and m.color == rgb(CODES.index(big["class"])) and f"#{big['id']}" in m.name
    stl = trimesh.load(next((work / "exports").glob(f"fossil_{big['id']:04d}/*.stl")))
    xyz = np.stack([m.x, m.y, m.z], 1)
    assert len(xyz) == len(stl.vertices) and len(m.i) == len(stl.faces)
    assert np.allclose(xyz.min(0), stl.bounds[0]) and np.allclose(xyz.max(0), stl.bounds[1])


def test_specimen_without_export_is_meshed_from_the_specimen_ids(run):
    work, cat = run
    small = cat.loc[cat.voxels.idxmin()]
    assert not small["exported"]
    m = viewers.plot_specimen_3d(work, small["id"]).data[0]
    t = trimesh.Trimesh(np.stack([m.x, m.y, m.z], 1), np.stack([m.i, m.j, m.k], 1))
    assert t.is_watertight and t.volume == pytest.approx(8 * small["voxels"], rel=0.15)  # µm³, outward normals
    assert t.bounds[0][2] >= 2 * small["z0"] - 2 and t.bounds[1][2] <= 2 * small["z1"] + 2  # z in µm, in place


def test_specimen_colours_follow_the_current_class(run, tmp_path):
    """As the previews show them: the classifier's class (grey when "not a fossil"), then the review's decision."""
    cat = run[1].set_index("id")
    a, b, c, d = cat.index
    work = copy_run(run, tmp_path, {a: NOT_A_FOSSIL})
    ReviewSession(work).set(b, "rejected")
    ReviewSession(work).set(c, "accepted", "Ammonia")
    shown = {sid: viewers.plot_specimen_3d(work, sid).data[0] for sid in (a, b, c, d)}
    assert shown[a].color == shown[b].color == rgb(None) and NOT_A_FOSSIL in shown[b].name
    assert shown[c].name == f"#{c} Ammonia" and shown[c].color == rgb(CODES.index(cat.loc[c, "class"]))
    assert shown[d].color == rgb(CODES.index(cat.loc[d, "class"]))
    meshes = [(m.name, m.color) for m in viewers.plot_specimens_3d(work).data if m.type == "mesh3d"]
    assert meshes == [(f"{cat.loc[d, 'class']} (1)", shown[d].color), ("Ammonia (1)", shown[c].color),
                      (f"{NOT_A_FOSSIL} (2)", rgb(None))]
    with pytest.raises(ValueError, match="no specimen #99"):
        viewers.plot_specimen_3d(work, 99)
    with pytest.raises(FileNotFoundError, match="05_predict_export"):
        viewers.plot_specimen_3d(tmp_path / "elsewhere")


def test_view_specimen_shows_mesh_beside_preview(run, live):
    work, cat = run
    big = cat.loc[cat.voxels.idxmax()]
    box = viewers.view_specimen(work, big["id"])
    caption, (mesh_view, preview) = box.children[0], box.children[1].children
    assert f"specimen #{big['id']}" in caption.value
    page = html.unescape(re.search(r'srcdoc="([^"]*)"', mesh_view.value)[1])
    assert '"type":"mesh3d"' in page and rgb(CODES.index(big["class"])) in page
    assert preview.value == next((work / "exports").glob(f"fossil_{big['id']:04d}/*_preview.png")).read_bytes()
    small = viewers.view_specimen(work, cat.loc[cat.voxels.idxmin(), "id"])
    assert small.children[1].children[1].value == b"" and "capped" in small.children[0].value


def test_views_headless_write_html_that_opens_offline(run, tmp_path):
    work = copy_run(run, tmp_path)
    sid = int(run[1]["id"].iloc[0])
    assert viewers.view_specimen(work, sid) is None and viewers.view_specimens(work) is None
    for name in (f"specimen_{sid}.html", "specimens_3d.html"):
        page = (work / "figures" / name).read_text()
        assert '"type":"mesh3d"' in page and 'src="https://cdn.plot.ly' not in page and len(page) > 1e6


def test_overview_has_one_mesh_per_class_in_place(run, tmp_path, live):
    work, cat = run
    fig = viewers.view_specimens(work)
    meshes = [d for d in fig.data if d.type == "mesh3d"]
    assert [(d.name, d.color) for d in meshes] == [("foraminifera (2)", rgb(1)), ("ostracod (2)", rgb(2))]
    assert all(d.showlegend for d in meshes)
    (dots,) = [d for d in fig.data if d.type == "scatter3d"]
    assert len(dots.x) == 4 and f"#{cat['id'][0]} {cat['class'][0]}" in dots.hovertext
    assert np.allclose(sorted(dots.z), sorted(2 * cat["centroid_z"]))
    for d in meshes:  # in place, in µm: each class's mesh spans the bounding boxes of its specimens
        xyz, c = np.stack([d.x, d.y, d.z], 1), cat[cat["class"] == d.name.split(" ")[0]]
        assert np.allclose(xyz.min(0), 2 * (c[["x0", "y0", "z0"]].min().to_numpy() - 0.5), atol=2.5)
        assert np.allclose(xyz.max(0), 2 * (c[["x1", "y1", "z1"]].max().to_numpy() - 0.5), atol=2.5)
    ostracod = np.stack([meshes[1].x, meshes[1].y, meshes[1].z], 1)
    # a big volume is meshed on a coarser grid: the same meshes, fewer vertices, in the same place
    coarse = viewers.plot_specimens_3d(work, max_voxels=40 * 64 * 72 // 8)
    assert "2x coarser" in coarse.layout.title.text
    c = [d for d in coarse.data if d.type == "mesh3d"]
    assert [d.name for d in c] == [d.name for d in meshes] and len(c[1].x) < len(meshes[1].x)
    cz = np.stack([c[1].x, c[1].y, c[1].z], 1)
    assert np.abs(cz.min(0) - ostracod.min(0)).max() < 5 and np.abs(cz.max(0) - ostracod.max(0)).max() < 5
    # a specimen the classifier calls "not a fossil" gets a grey mesh of its own
    flagged = viewers.plot_specimens_3d(copy_run(run, tmp_path, {int(cat["id"][0]): NOT_A_FOSSIL}))
    assert [(d.name, d.color) for d in flagged.data if d.type == "mesh3d"][-1] == (f"{NOT_A_FOSSIL} (1)", rgb(None))


def test_views_of_an_empty_catalogue(tmp_path, live, capsys):
    vol, pred, work, _, _ = make_case(tmp_path)
    extract_fossils(vol, work, np.zeros_like(pred))
    assert viewers.view_specimen(work) is None and "No specimen" in capsys.readouterr().out
    fig = viewers.view_specimens(work)
    assert [d.type for d in fig.data] == ["scatter3d"] and len(fig.data[0].x) == 0
