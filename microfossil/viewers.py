"""Interactive views: a slice browser over the volume and its labels, and 3D views of the specimens.

The slice browser draws each view as a PNG into an `ipywidgets.Image`, reading only the
slices it shows; it works alike in Jupyter and in Colab. The 3D views are plotly figures;
beside a widget, a figure goes in an `<iframe srcdoc>` of its own page, since plotly's
`FigureWidget` needs a custom widget manager and `fig.show()` inside an `Output` fails in
Colab ("Plotly is not defined", colabtools #5889). Headless (`review.has_widget_frontend()`
false) each writes a file instead: a PNG of the slices, an HTML page of a 3D view.
Needs ipywidgets, matplotlib and plotly; never torch.
"""
from __future__ import annotations

import html
import math
import sys
from io import BytesIO
from pathlib import Path

import numpy as np

from .decisions import read_decisions
from .exports import mesh, preview_file, specimen_folders, specimen_look
from .io import finish_commit, read_json, replacing
from .plots import get_class_colours, save_figure
from .review import has_widget_frontend
from .runtime import enable_colab_widgets
from .specimens import NOT_A_FOSSIL

VIEW_SIZE = 512  # longest side of a view on screen, in pixels
ALPHA = 0.45  # opacity of the label overlay, as in the figures of `plots`
Z_LINE, Y_LINE, X_LINE = (255, 215, 0), (0, 200, 255), (255, 60, 220)  # the z, y and x positions, in every view


# --- the slice browser ---

def _sources(vol, labels):
    """The label volumes that can be overlaid, by name: the ground truth of `vol`, the given `labels`."""
    if labels is not None and tuple(labels.shape) != tuple(vol.shape):
        raise ValueError(f"the labels to overlay are {tuple(labels.shape)} but the volume in {vol.source} is "
                         f"{tuple(vol.shape)}: they come from another dataset (re-run the prediction of 05 on it).")
    return {name: lab for name, lab in (("ground truth", vol.labels), ("prediction", labels)) if lab is not None}


def _lut(codes):
    """RGB (256, 3) and opacity (256,) of each label value: the class colours of `plots`, background clear."""
    n = len(codes) if codes else 10
    rgba = np.zeros((256, 4))
    rgba[:n] = get_class_colours(n)
    return np.round(rgba[:, :3] * 255), np.where(rgba[:, 3] > 0, ALPHA, 0.0)


def _render(img, lab, lut, size=VIEW_SIZE):
    """RGB uint8 of 2D slice `img` with `lab` overlaid (or None), its longest side `size` (at most 4x enlarged)."""
    from PIL import Image
    img = np.asarray(img)
    h, w = img.shape
    s = min(size / max(h, w), 4.0)
    out = (max(1, round(w * s)), max(1, round(h * s)))
    gray = np.asarray(Image.fromarray(img).resize(out, Image.BILINEAR if s < 1 else Image.NEAREST), np.float32)
    rgb = np.repeat(gray[..., None], 3, -1)
    if lab is not None:
        lab = np.asarray(Image.fromarray(np.minimum(np.asarray(lab), 255).astype(np.uint8)).resize(out, Image.NEAREST))
        a = lut[1][lab][..., None]
        rgb = rgb * (1 - a) + lut[0][lab] * a
    return np.round(rgb).astype(np.uint8)


def _mark(rgb, shape, rows=(), cols=()):
    """A copy of view `rgb` (of a `shape` slice) with a line across each `(position, colour)` of `rows` and `cols`."""
    rgb = rgb.copy()
    sy, sx = rgb.shape[0] / shape[0], rgb.shape[1] / shape[1]
    for pos, colour in rows:
        rgb[min(int((pos + 0.5) * sy), rgb.shape[0] - 1)] = colour
    for pos, colour in cols:
        rgb[:, min(int((pos + 0.5) * sx), rgb.shape[1] - 1)] = colour
    return rgb


def _png(rgb):
    from PIL import Image
    buf = BytesIO()
    Image.fromarray(rgb).save(buf, "png", compress_level=1)
    return buf.getvalue()


def _swatch(colour, name):
    return (f'<span style="display:inline-block;width:12px;height:12px;background:rgb{tuple(int(c) for c in colour)};'
            f'margin:0 4px 0 12px"></span>{html.escape(name)}')


class SliceBrowser:
    """Slice browser over `vol`: the axial slice (XY) at z and the XZ and YZ views through y and x, with the ground
    truth or `labels` (a prediction) overlaid; display it (it shows `box`) or `display(browser.box)`.

    Sliders `z`, `y`, `x` and the toggle `overlay`; each view (`xy`, `xz`, `yz`, `ipywidgets.Image`) marks where the
    others cut it: z in yellow, y in cyan, x in magenta. Only the slices shown are read, so a memory-mapped volume
    larger than RAM browses as fast as a small one.
    """

    def __init__(self, vol, labels=None, title=None, size=VIEW_SIZE):
        import ipywidgets as w
        enable_colab_widgets()
        self.vol, self.size, self.sources, self.lut = vol, size, _sources(vol, labels), _lut(vol.codes)
        Z, H, W = vol.shape
        slider = {"continuous_update": False, "layout": w.Layout(width="340px")}
        self.z = w.IntSlider(value=Z // 2, min=0, max=Z - 1, description="z (XY)", **slider)
        self.y = w.IntSlider(value=H // 2, min=0, max=H - 1, description="y (XZ)", **slider)
        self.x = w.IntSlider(value=W // 2, min=0, max=W - 1, description="x (YZ)", **slider)
        self.overlay = w.ToggleButtons(options=["none", *self.sources], value=([*self.sources] or ["none"])[-1],
                                       description="overlay")
        self.xy, self.xz, self.yz = (w.Image(format="png") for _ in range(3))
        self.captions = [w.HTML() for _ in range(3)]
        legend = "".join(_swatch(self.lut[0][k], c) for k, c in enumerate(vol.codes or []) if k)
        views = w.HBox([w.VBox([c, v]) for c, v in zip(self.captions, (self.xy, self.xz, self.yz))],
                       layout=w.Layout(flex_flow="row wrap"))
        self.box = w.VBox([w.HTML(f"<b>{html.escape(title or _title(vol))}</b>"), w.HBox([self.z, self.overlay]),
                           w.HBox([self.y, self.x]), views, w.HTML(legend if self.sources else "")])
        self._cache = {}
        for control in (self.z, self.y, self.x, self.overlay):
            control.observe(self.update, "value")
        self.update()

    def _view(self, name, pos, take):
        """The rendered view `name` through `pos` with the current overlay; re-read only when either changed."""
        key = (pos, self.overlay.value)
        if self._cache.get(name, (None,))[0] != key:
            lab = self.sources.get(self.overlay.value)
            img = take(self.vol.images)
            self._cache[name] = (key, _render(img, None if lab is None else take(lab), self.lut, self.size), img.shape)
        return self._cache[name][1:]

    def update(self, change=None):
        """Redraw the views for the sliders' positions and the overlay."""
        z, y, x = self.z.value, self.y.value, self.x.value
        xy, xy_shape = self._view("xy", z, lambda a: np.asarray(a[z]))
        xz, xz_shape = self._view("xz", y, lambda a: np.asarray(a[:, y, :]))
        yz, yz_shape = self._view("yz", x, lambda a: np.asarray(a[:, :, x]))
        self.xy.value = _png(_mark(xy, xy_shape, rows=[(y, Y_LINE)], cols=[(x, X_LINE)]))
        self.xz.value = _png(_mark(xz, xz_shape, rows=[(z, Z_LINE)], cols=[(x, X_LINE)]))
        self.yz.value = _png(_mark(yz, yz_shape, rows=[(z, Z_LINE)], cols=[(y, Y_LINE)]))
        dot = '<span style="color:rgb{}">&#9632;</span>'.format
        self.captions[0].value = f"XY at z = {z} {dot(Z_LINE)}"
        self.captions[1].value = f"XZ at y = {y} {dot(Y_LINE)}"
        self.captions[2].value = f"YZ at x = {x} {dot(X_LINE)}"

    def _ipython_display_(self):
        from IPython.display import display
        display(self.box)


def _title(vol):
    Z, H, W = vol.shape
    return f"{Path(str(vol.source)).name}: {Z} slices of {H}x{W}"


def _draw_slices(vol, sources, title, size=VIEW_SIZE):
    """The static figure: three axial slices and the XZ and YZ views through the centre, a row per overlay."""
    import matplotlib.patches as mpatches
    import matplotlib.pyplot as plt
    lut = _lut(vol.codes)
    Z, H, W = vol.shape
    zs = sorted({Z // 4, Z // 2, (3 * Z) // 4})
    marks = [(z, Z_LINE) for z in zs]
    views = [(f"XY z={z}", lambda a, z=z: a[z], {}) for z in zs] + [
        (f"XZ y={H // 2}", lambda a: a[:, H // 2, :], {"rows": marks}),
        (f"YZ x={W // 2}", lambda a: a[:, :, W // 2], {"rows": marks})]
    rows = list(sources.items()) or [("image", None)]
    images = [np.asarray(f(vol.images)) for _, f, _ in views]
    panels = [[_render(img, None if lab is None else np.asarray(f(lab)), lut, size) for img, (_, f, _) in zip(images, views)]
              for _, lab in rows]
    ratios = [p.shape[1] / p.shape[0] for p in panels[0]]
    ph = min(2.6, 15 / sum(ratios))  # panel height (inches): the row at most 15 inches wide
    fig, axs = plt.subplots(len(rows), len(views), squeeze=False, gridspec_kw={"width_ratios": ratios},
                            figsize=(ph * sum(ratios) * 1.03, (ph + 0.3) * len(rows)))
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - 0.2 / fig.get_figheight(), wspace=0.03, hspace=0.12)
    for r, (name, _) in enumerate(rows):
        for c, (t, _, _) in enumerate(views):
            axs[r, c].imshow(panels[r][c], interpolation="nearest")
            sy = panels[r][c].shape[0] / images[c].shape[0]
            for pos, colour in views[c][2].get("rows", ()):  # drawn, not burnt in: no line lost to resampling
                axs[r, c].axhline((pos + 0.5) * sy - 0.5, color=np.asarray(colour) / 255, lw=0.8)
            axs[r, c].set_axis_off()
            axs[r, c].set_title(f"{t}" + (f" · {name}" if name != "image" else ""), fontsize=8)
    fig.suptitle(title, fontsize=10, y=1 - 0.02 / fig.get_figheight(), va="bottom")
    handles = [mpatches.Patch(color=lut[0][k] / 255, label=c) for k, c in enumerate(vol.codes or []) if k]
    if sources and handles:  # under the panels: bbox_inches="tight" takes it in, with no gap above it
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(6, len(handles)),
                   fontsize=8, frameon=False, borderaxespad=0.2)
    return fig


def browse_slices(vol, labels=None, path=None, title=None):
    """Browse `vol` slice by slice with the ground truth or `labels` (a predicted label volume) overlaid.

    In Jupyter or Colab, returns a `SliceBrowser` (a cell shows it): a z slider over the
    axial slice, y and x sliders for the XZ and YZ views, and an overlay toggle. Headless
    (`has_widget_frontend()` false), and always when `path` is given, also draws a static
    figure there (three axial slices, the XZ and YZ views, the legend under them); headless
    it returns None.
    """
    import matplotlib.pyplot as plt
    sources, title = _sources(vol, labels), title or _title(vol)
    live = has_widget_frontend()
    if path is not None:
        fig = _draw_slices(vol, sources, title)
        save_figure(path, fig)
        if live:
            plt.close(fig)  # the browser is the view; the inline backend would show the figure again
    elif not live:
        print("No widget front end (headless run) and no path: nothing to show; give path= to save a figure.")
    return SliceBrowser(vol, labels, title) if live else None


# --- 3D views of the specimens ---

def read_stl(path):
    """Mesh of binary STL `path` (as `exports.write_stl` writes it): `(verts (n, 3) x y z, faces (m, 3))`, shared
    corners merged."""
    data = Path(path).read_bytes()
    n = int(np.frombuffer(data, np.uint32, 1, 80)[0])
    rec = np.frombuffer(data, [("normal", "<f4", (3,)), ("verts", "<f4", (3, 3)), ("attr", "<u2")], n, 84)
    verts, faces = np.unique(rec["verts"].reshape(-1, 3), axis=0, return_inverse=True)
    return verts, faces.reshape(-1, 3)


def _read_run(work_dir):
    """The catalogue, the record of the extraction, the voxel size and the class names of the run in `work_dir`."""
    import pandas as pd
    finish_commit(work_dir)  # an extraction a kill cut in the middle of its commit
    exp = Path(work_dir) / "exports"
    if not (exp / "fossils.csv").exists():
        raise FileNotFoundError(f"{exp / 'fossils.csv'} not found: run the extraction cell of 05_predict_export "
                                "first (same work_dir).")
    cat = pd.read_csv(exp / "fossils.csv")
    info = read_json(exp / "extraction.json", {})
    codes = info.get("codes") or ["background", *(c[5:] for c in cat.columns if c.startswith("frac_"))]
    return cat, info, np.asarray(info.get("voxel_size_um") or (1.0, 1.0, 1.0), np.float64), codes


def _looks(work_dir, cat, codes):
    """What each specimen of catalogue `cat` shows, by id: `{"name", "status", "colour"}` as in its preview and the
    gallery (`exports.specimen_look`): its class in the catalogue, then the review's decision; `NOT_A_FOSSIL` grey. The
    colour is a plotly colour string."""
    colours = [[round(255 * v) for v in c[:3]] for c in get_class_colours(len(codes))]
    decisions = read_decisions(Path(work_dir) / "exports", cat)[0]
    looks = {int(r["id"]): specimen_look(r, decisions.get(int(r["id"])), codes, colours) for _, r in cat.iterrows()}
    return {sid: {**v, "colour": "rgb({},{},{})".format(*v["colour"])} for sid, v in looks.items()}


def _row(cat, sid):
    if not len(cat):
        raise ValueError("the catalogue has no specimen: nothing to show.")
    if sid is None:
        return cat.loc[cat["voxels"].idxmax()]
    found = cat[cat["id"] == int(sid)]
    if not len(found):
        raise ValueError(f"no specimen #{sid} in the catalogue (ids {cat['id'].min()}-{cat['id'].max()}).")
    return found.iloc[0]


def _folder(work_dir, sid):
    """`exports/fossil_<id>/` of specimen `sid`, or None when its export was capped (`max_exports`)."""
    return specimen_folders(Path(work_dir) / "exports").get(int(sid))


def _specimen_mesh(work_dir, row, spacing):
    """Mesh of one specimen (x y z in µm, in place): its STL, else remeshed from `predictions/specimens.tif`."""
    d = _folder(work_dir, row["id"])
    if d is not None and (d / f"{d.name}.stl").exists():
        return read_stl(d / f"{d.name}.stl")
    import tifffile
    path = Path(work_dir) / "predictions" / "specimens.tif"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the extraction cell of 05_predict_export first.")
    z0, y0, x0, z1, y1, x1 = (int(row[k]) for k in ("z0", "y0", "x0", "z1", "y1", "x1"))
    with tifffile.TiffFile(path) as tif:
        crop = np.stack([tif.pages[z].asarray()[y0:y1, x0:x1] for z in range(z0, z1)]) == int(row["id"])
    verts, faces = mesh(crop, spacing)
    verts += np.array([z0, y0, x0], np.float32) * spacing.astype(np.float32)
    return verts[:, ::-1], faces[:, ::-1]  # z y x to x y z mirrors the mesh: reverse the winding, as in the STL


def _mesh3d(verts, faces, colour, name, **kw):
    import plotly.graph_objects as go
    return go.Mesh3d(x=verts[:, 0], y=verts[:, 1], z=verts[:, 2], i=faces[:, 0], j=faces[:, 1], k=faces[:, 2],
                     color=colour, name=name, flatshading=False, lighting={"ambient": 0.45, "diffuse": 0.7,
                                                                           "specular": 0.25}, **kw)


def _layout(fig, title):
    axis = lambda t: {"title": {"text": t}}
    fig.update_layout(title={"text": title, "font": {"size": 13}}, height=520, margin={"l": 0, "r": 0, "t": 40, "b": 0},
                      scene={"aspectmode": "data", "xaxis": axis("x (µm)"), "yaxis": axis("y (µm)"),
                             "zaxis": axis("z (µm)")}, legend={"itemsizing": "constant"})
    return fig


def _write_html(fig, path):
    """The figure as one HTML page with plotly.js inside (opens offline, anywhere); atomic."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        fig.write_html(str(tmp), include_plotlyjs=True, full_html=True)


def _iframe(fig, height=540):
    """An `<iframe srcdoc>` with the figure's own page, for an `ipywidgets.HTML`: its scripts run in their own
    document, in Jupyter and in Colab. plotly.js from the CDN in Colab (always online), inside it elsewhere."""
    page = fig.to_html(full_html=True, include_plotlyjs="cdn" if "google.colab" in sys.modules else True)
    return (f'<iframe srcdoc="{html.escape(page, quote=True)}" '
            f'style="width:100%;height:{height}px;border:0"></iframe>')


def _specimen_figure(work_dir, sid):
    """The figure of `plot_specimen_3d`, the specimen's catalogue row and what it shows (`_looks`)."""
    import plotly.graph_objects as go
    cat, _, spacing, codes = _read_run(work_dir)
    row = _row(cat, sid)
    look = _looks(work_dir, cat, codes)[int(row["id"])]  # the whole catalogue: decisions go to the nearest specimen
    verts, faces = _specimen_mesh(work_dir, row, spacing)
    fig = go.Figure(_mesh3d(verts, faces, look["colour"], f"#{row['id']} {look['name']}", showlegend=True))
    title = f"specimen #{row['id']}: {look['name']}, {row['volume_um3']:.4g} µm³, ESD {row['esd_um']:.3g} µm"
    return _layout(fig, title), row, look


def plot_specimen_3d(work_dir, sid=None, path=None):
    """Plotly figure of the mesh of specimen `sid` (default: the largest) in µm where the volume lies, named and
    coloured as its preview shows it (`_looks`); given `path`, also saved there as HTML."""
    fig = _specimen_figure(work_dir, sid)[0]
    if path is not None:
        _write_html(fig, path)
    return fig


def view_specimen(work_dir, sid=None, path=None):
    """Specimen `sid` (default: the largest) in 3D beside its preview; a cell shows the widget returned.

    Its mesh (turn and zoom it) and its preview image (`exports/fossil_<id>/..._preview.png`)
    side by side. Headless, writes the 3D view as an HTML page (default
    `work_dir/figures/specimen_<id>.html`, plotly.js inside so it opens offline) and returns None.
    With no specimen in the catalogue it says so and returns None.
    """
    if sid is None and not len(_read_run(work_dir)[0]):
        print("No specimen in the catalogue: nothing to show in 3D.")
        return None
    fig, row, look = _specimen_figure(work_dir, sid)
    if not has_widget_frontend():
        path = path or Path(work_dir) / "figures" / f"specimen_{row['id']}.html"
        _write_html(fig, path)
        print(f"No widget front end (headless run): the 3D view of specimen #{row['id']} is in {path}")
        return None
    if path is not None:
        _write_html(fig, path)
    import ipywidgets as w
    enable_colab_widgets()
    d = _folder(work_dir, row["id"])
    preview = preview_file(work_dir, d) if d is not None else None  # (a review's, drawn on the local disk in Colab)
    has_preview = preview is not None and preview.exists()
    note = "" if has_preview else " · no preview: its export was capped (re-run the extraction with a larger max_exports)"
    status = f" ({look['status']})" if look["status"] else ""
    return w.VBox([w.HTML(f"<b>specimen #{row['id']}</b>: {html.escape(look['name'] + status)}, {row['voxels']} voxels"
                          f"{note}"),
                   w.HBox([w.HTML(_iframe(fig), layout=w.Layout(width="45%")),
                           w.Image(value=preview.read_bytes() if has_preview else b"", format="png",
                                   layout=w.Layout(width="55%", object_fit="contain"))])])


def _class_volume(path, lut, f):
    """The volume of specimen ids in `path` as class numbers (`lut[id]`), on a grid `f` times coarser: each block
    takes its highest class number, so a specimen thinner than a block still shows. Read one page at a time."""
    import tifffile
    with tifffile.TiffFile(path) as tif:
        H, W = tif.pages[0].shape
        Z = len(tif.pages)
        out = np.zeros((math.ceil(Z / f), math.ceil(H / f), math.ceil(W / f)), np.uint8)
        for z in range(Z):
            page = np.zeros((out.shape[1] * f, out.shape[2] * f), np.uint8)
            ids = tif.pages[z].asarray()
            page[:H, :W] = lut[np.minimum(ids, len(lut) - 1)]
            np.maximum(out[z // f], page.reshape(out.shape[1], f, out.shape[2], f).max((1, 3)), out=out[z // f])
    return out


def plot_specimens_3d(work_dir, path=None, max_voxels=2 ** 23):
    """Plotly figure of every specimen in place, one mesh per class (the legend names them), from
    `predictions/specimens.tif` and the catalogue's current classes; given `path`, also saved there as HTML.

    Volumes over `max_voxels` are meshed on a coarser grid (a 1000³ volume on a 200³ one), in
    µm from the voxel size the extraction recorded. A dot marks each specimen's centroid, with
    its id and class on hover, so that specimens smaller than the grid are seen too.
    """
    import plotly.graph_objects as go
    cat, info, spacing, codes = _read_run(work_dir)
    path_ids = Path(work_dir) / "predictions" / "specimens.tif"
    if not path_ids.exists():
        raise FileNotFoundError(f"{path_ids} not found: run the extraction cell of 05_predict_export first.")
    looks = _looks(work_dir, cat, codes)
    names = {v["name"] for v in looks.values()}  # the model's classes in order, then taxa, then NOT_A_FOSSIL
    classes = [c for c in codes[1:] if c in names] + sorted(names - {*codes, NOT_A_FOSSIL}) + \
        [NOT_A_FOSSIL] * (NOT_A_FOSSIL in names)
    colour = {v["name"]: v["colour"] for v in looks.values()}
    lut = np.zeros(max(looks, default=0) + 2, np.uint8)
    for sid, v in looks.items():
        lut[sid] = classes.index(v["name"]) + 1
    shape = info.get("shape")
    if shape is None:
        import tifffile
        with tifffile.TiffFile(path_ids) as tif:
            shape = [len(tif.pages), *tif.pages[0].shape]
    f = max(1, math.ceil((float(np.prod(shape)) / max_voxels) ** (1 / 3)))
    grid = _class_volume(path_ids, lut, f)
    fig = go.Figure()
    for k, cls in enumerate(classes, 1):
        m = grid == k
        if not m.any():
            continue
        box = [np.flatnonzero(m.any(tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        lo = np.array([b[0] for b in box])
        verts, faces = mesh(m[tuple(slice(b[0], b[-1] + 1) for b in box)], spacing * f)
        verts += (lo * f + (f - 1) / 2).astype(np.float32) * spacing.astype(np.float32)  # a block's centre
        n = sum(v["name"] == cls for v in looks.values())
        fig.add_trace(_mesh3d(verts[:, ::-1], faces[:, ::-1], colour[cls], f"{cls} ({n})", showlegend=True,
                              legendgroup=cls, hoverinfo="name"))
    c = cat[["centroid_x", "centroid_y", "centroid_z"]].to_numpy(float) * spacing[::-1]
    dots = [looks[int(i)] for i in cat["id"]]
    fig.add_trace(go.Scatter3d(x=c[:, 0], y=c[:, 1], z=c[:, 2], mode="markers", showlegend=False, name="specimens",
                               marker={"size": 2, "color": [v["colour"] for v in dots]}, hoverinfo="text",
                               hovertext=[f"#{i} {v['name']}" for i, v in zip(cat["id"], dots)]))
    grid_note = f", meshed on a grid {f}x coarser" if f > 1 else ""
    _layout(fig, f"{len(cat)} specimens in place{grid_note}")
    if path is not None:
        _write_html(fig, path)
    return fig


def view_specimens(work_dir, path=None, max_voxels=2 ** 23):
    """Every specimen in 3D, coloured by class (`plot_specimens_3d`); a cell shows the figure returned. Headless,
    writes it as an HTML page (default `work_dir/figures/specimens_3d.html`) and returns None."""
    fig = plot_specimens_3d(work_dir, max_voxels=max_voxels)
    if not has_widget_frontend():
        path = path or Path(work_dir) / "figures" / "specimens_3d.html"
        _write_html(fig, path)
        print(f"No widget front end (headless run): the 3D view of every specimen is in {path}")
        return None
    if path is not None:
        _write_html(fig, path)
    return fig
