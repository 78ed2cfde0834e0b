"""The embedded synthetic sample: a micro-CT volume of a carbonate core with foraminifera and ostracods.

It stands in for the LAPiX volume, which cannot be downloaded everywhere, and it is what
the first command and the tests run on. Everything is drawn from `seed`, so a sample is
the same on every machine. It is written in the published dataset layout (see `volume`).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from .io import replacing

# Sizes (slices, height, width). "default" runs the whole quick-mode demo on a 2-core CPU in
# minutes, and is tall enough that its default test block (the last 13 slices) holds whole specimens of each
# class, and its validation block (the first 6) specimens of each class; "full" is the size of the published LAPiX volume (983 slices of 1004 x 956).
SAMPLE_SIZES = {"default": (64, 192, 192), "full": (983, 1004, 956)}

SAMPLE_CODES = ["background", "foraminifera", "ostracod"]
SAMPLE_VERSION = 3  # raised when the generator draws other volumes: a sample made by an older one is made again

# The knobs real cores vary, for a family of development volumes (`make_sample(style=...)`, bench/robustness.py).
# The defaults draw the embedded sample; a style names only the knobs it changes.
STYLE_DEFAULTS = {
    "foram_density": 1.0, "ostracod_density": 1.0,  # specimens per volume of core, times the sample's
    "foram_size": 1.0, "ostracod_size": 1.0,        # their linear size, times the sample's (within what the test block holds)
    "foram_infill": (0.6, 0.4, 0.0),                # shares of foraminifera hollow, sediment-filled, spar-filled
    "ostracod_infill": (0.6, 0.4, 0.0),             # the same for ostracods (independent of the class)
    "broken": 0.0,                                  # share of fossils with a piece of shell broken off
    "touching": 0.0,                                # share of fossils placed against another one
    "noise": 0.035, "blur": 0.9, "rings": 0.05,     # scanner: noise sigma, blur sigma (voxels), ring artefacts' amplitude
    "contrast": 1.0, "gamma": 1.0, "offset": 0.0,   # scanner: grey = 0.5 + contrast * (grey ** gamma - 0.5) + offset
}
INFILL_GREY = {"hollow": 0.10, "sediment": 0.52, "spar": 0.72}  # a fossil's inside (matrix 0.45, shell 0.82)


def sample_style(style=None):
    """`style` (None or a dict of some `STYLE_DEFAULTS` knobs) completed with the defaults; an unknown knob or a bad
    infill mix is an error that names it."""
    style = dict(style or {})
    unknown = sorted(set(style) - set(STYLE_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown sample style knob(s) {unknown}: the knobs are {sorted(STYLE_DEFAULTS)}")
    out = {**STYLE_DEFAULTS, **style}
    for k in ("foram_infill", "ostracod_infill"):
        mix = tuple(float(x) for x in out[k])
        if len(mix) != 3 or min(mix) < 0 or abs(sum(mix) - 1) > 1e-6:
            raise ValueError(f"style {k}={out[k]!r}: three shares (hollow, sediment-filled, spar-filled) summing to 1")
        out[k] = mix
    return out


def _rotation(rng):
    q = rng.normal(size=4)
    a, b, c, d = q / np.linalg.norm(q)
    return np.array([[a*a+b*b-c*c-d*d, 2*(b*c-a*d), 2*(b*d+a*c)],
                     [2*(b*c+a*d), a*a-b*b+c*c-d*d, 2*(c*d-a*b)],
                     [2*(b*d-a*c), 2*(c*d+a*b), a*a-b*b-c*c+d*d]])


def _infill(rng, mix):
    """hollow, sediment or spar, drawn from `mix` (their shares); one draw, as the sample's first generator made."""
    u = rng.uniform()
    return "sediment" if u < mix[1] else "spar" if u < mix[1] + mix[2] else "hollow"


def _draw_fossil(kind, rng, scale, mix=(0.6, 0.4, 0.0)):
    """One foraminifer (chambers along a spiral) or ostracod (an ellipsoid shell), centre not yet placed; its inside
    drawn from `mix` (shares hollow, sediment-filled, spar-filled)."""
    R = _rotation(rng)
    if kind == "foram":
        n_ch, r0, g = rng.integers(4, 9), rng.uniform(2.5, 4.0) * scale, rng.uniform(1.15, 1.3)
        radii = r0 * g ** np.arange(n_ch)
        ang = np.cumsum(np.full(n_ch, rng.uniform(0.75, 1.0)))
        dist = 1.35 * radii
        local = np.stack([rng.uniform(-0.3, 0.3) * radii, dist * np.cos(ang), dist * np.sin(ang)], 1)
        local -= local.mean(0)
        return dict(kind="foram", label=1, R=R, chambers=local, radii=radii, infill=_infill(rng, mix))
    L = rng.uniform(7, 13) * scale
    axes = np.array([0.5, 0.65, 1.0]) * L * rng.uniform(0.9, 1.1, 3)
    return dict(kind="ostracod", label=2, R=R, axes=axes, infill=_infill(rng, mix))


def _scaled(o, f=1.0):
    """Fossil `o` shrunk by `f`, with its wall thickness and bounding radius (`extent`) set for its size."""
    o = dict(o)
    if o["kind"] == "foram":
        o["chambers"], o["radii"] = o["chambers"] * f, o["radii"] * f
        o["wall"] = max(1.2, 0.12 * o["radii"].max())
        o["extent"] = float(np.max(np.linalg.norm(o["chambers"], axis=1) + o["radii"]))
    else:
        o["axes"] = o["axes"] * f
        o["wall"], o["extent"] = max(1.2, 0.1 * o["axes"].min()), float(o["axes"].max())
    return o


def _z_half(o):
    """Half the height (z extent) of fossil `o` as rotated: its labelled voxels lie within centre z +- this."""
    rz = o["R"][0]  # volume z of local point p is p @ R[0]
    if o["kind"] == "foram":
        return float(np.max(np.abs(o["chambers"] @ rz) + o["radii"]))
    return float(np.linalg.norm(rz * o["axes"]))


def _make_objects(shape, seed, test_pct=0.2, valid_pct=0.1, style=None):
    """Draw the sample's objects (fossils, pores, grains) deterministically from `seed` and `style` (`sample_style`).

    The fossils are kept apart in z as the default split (`test_pct`, `valid_pct`, see `split`)
    needs it: about 30 % of each class (at least one) lies wholly in the test block (the last
    slices), about 10 % (at least one) in the validation block (the first slices, where the scan's
    top may cut a specimen off, as any scan's does), the rest wholly in the training block between,
    so that the automatic gaps are empty, each block holds specimens of every class and none is in
    two blocks. Every fossil is no taller than the test block allows: one size distribution in
    every block. (With a test block under 6 slices the fossils go anywhere; with a validation
    block under 3 slices none is placed in it.) `style`'s broken shells and touching fossils are drawn from a
    generator of their own, so that a style without them draws the same volume as before they existed.
    """
    st = sample_style(style)
    Z, H, W = shape
    rng = np.random.default_rng(seed)
    rng_extra = np.random.default_rng([seed, 34])  # broken and touching fossils
    scale = math.sqrt(min(H, W) / 256)
    core_r = 0.46 * min(H, W)
    core_vox = math.pi * core_r ** 2 * Z
    objs = []
    taken_c, taken_r = np.empty((0, 3)), np.empty(0)  # placed objects, for vectorised overlap checks

    def place(radius, tries=200, zrange=None):
        nonlocal taken_c, taken_r
        for _ in range(tries):
            rr = core_r - radius - 2
            if rr <= 0:
                return None
            a, d = rng.uniform(0, 2 * math.pi), rr * math.sqrt(rng.uniform())
            z = rng.uniform(*zrange) if zrange else rng.uniform(-radius * 0.3, Z - 1 + radius * 0.3)
            c = np.array([z, H / 2 + d * math.sin(a), W / 2 + d * math.cos(a)])
            if np.all(np.linalg.norm(taken_c - c, axis=1) > taken_r + radius + 2):
                taken_c, taken_r = np.vstack([taken_c, c]), np.append(taken_r, radius)
                return c
        return None

    def place_against(o, zrange, tries=100):
        """A centre for fossil `o` against a fossil already placed (their shells meeting), in `zrange`; None if none."""
        nonlocal taken_c, taken_r
        partners = [i for i, f in enumerate(objs) if f["kind"] in ("foram", "ostracod")]
        for _ in range(tries if partners else 0):
            j = partners[rng_extra.integers(len(partners))]
            u = rng_extra.normal(size=3)
            c = objs[j]["center"] + u / np.linalg.norm(u) * (objs[j]["extent"] + o["extent"]) * rng_extra.uniform(0.55, 0.8)
            others = np.ones(len(taken_r), bool)  # taken_c holds the placed objects in the order of objs
            others[j] = False
            if (zrange and not zrange[0] <= c[0] <= zrange[1]) or math.hypot(c[1] - H / 2, c[2] - W / 2) > core_r - o["extent"] - 2:
                continue
            if np.all(np.linalg.norm(taken_c[others] - c, axis=1) > taken_r[others] + o["extent"] + 2):
                taken_c, taken_r = np.vstack([taken_c, c]), np.append(taken_r, o["extent"])
                return c
        return None

    n_test = max(1, int(round(Z * test_pct)))
    n_valid = max(1, int(round(Z * valid_pct))) if valid_pct else 0
    t0 = Z - n_test
    apart = n_test >= 6
    in_valid = apart and n_valid >= 3
    room = (n_test - 1) / 2  # half the height a fossil may have
    n_foram = max(2, round(core_vox * 6.0e-6 / scale ** 3 * st["foram_density"]))
    n_ostra = max(2, round(core_vox * 4.0e-6 / scale ** 3 * st["ostracod_density"]))
    for kind, n in (("foram", n_foram), ("ostracod", n_ostra)):
        size, mix = st[f"{kind}_size"], st[f"{kind}_infill"]
        draw = lambda: _scaled(_draw_fossil(kind, rng, scale * size, mix))  # noqa: E731
        n_test_k = max(1, round(0.3 * n))
        n_valid_k = max(1, round(0.1 * n)) if in_valid else 0
        for i in range(n):
            block = "test" if i < n_test_k else "valid" if i < n_test_k + n_valid_k else "train"
            o = draw()
            if apart:  # every fossil no taller than the test block allows: one size distribution in every block
                for _ in range(50):  # a smaller or flatter-lying specimen when it does not fit
                    if _z_half(o) <= room:
                        break
                    o = draw()
                if _z_half(o) > room:
                    o = _scaled(o, room / _z_half(o))
                zh = _z_half(o)
                # the z range its centre may take: wholly in its block, but for the scan's top, which may cut it
                top = n_valid if in_valid else 0  # the first slice a training fossil may reach
                zrange = {"test": (t0 + zh, Z - 1 - zh), "valid": (-0.3 * zh, max(-0.3 * zh, n_valid - 1 - zh)),
                          "train": ((top + zh) if in_valid else -0.3 * zh, t0 - 1 - zh)}[block]
            else:
                zrange = None
            if st["broken"] and rng_extra.uniform() < st["broken"]:  # a plane cuts a cap off its shell
                n_cut = rng_extra.normal(size=3)
                o["cut"] = (n_cut / np.linalg.norm(n_cut), rng_extra.uniform(0.1, 0.5) * o["extent"])
            c = None
            if st["touching"] and rng_extra.uniform() < st["touching"]:
                c = place_against(o, zrange)
            if c is None:
                c = place(o["extent"], zrange=zrange)
            if c is not None:
                objs.append({**o, "center": c})
    for _ in range(max(4, round(core_vox * 1.5e-5 / scale ** 3))):  # pores: dark ellipsoids
        axes = rng.uniform(1.5, 6, 3) * scale
        c = place(float(axes.max()), tries=20)
        if c is not None:
            objs.append(dict(kind="pore", label=0, center=c, extent=float(axes.max()), R=_rotation(rng), axes=axes))
    for _ in range(max(4, round(core_vox * 1.0e-5 / scale ** 3))):  # dense mineral grains (pyrite)
        axes = rng.uniform(1.0, 3.5, 3) * scale
        c = place(float(axes.max()), tries=20)
        if c is not None:
            objs.append(dict(kind="grain", label=0, center=c, extent=float(axes.max()), R=_rotation(rng), axes=axes))
    return objs


def _render_object(o, img, lab, z0):
    """Paint object `o` into the slab `img`/`lab` whose first slice is z index `z0`."""
    Zs, H, W = img.shape
    e = o["extent"] + 2
    lo = np.floor(o["center"] - e).astype(int)
    hi = np.ceil(o["center"] + e).astype(int) + 1
    lo_c = np.maximum(lo, [z0, 0, 0])
    hi_c = np.minimum(hi, [z0 + Zs, H, W])
    if np.any(hi_c <= lo_c):
        return
    g = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo_c, hi_c)], indexing="ij"), -1)
    p = (g - o["center"].astype(np.float32)) @ o["R"].astype(np.float32)  # local coordinates
    sl = tuple(slice(a - (z0 if i == 0 else 0), b - (z0 if i == 0 else 0)) for i, (a, b) in enumerate(zip(lo_c, hi_c)))
    sub_img, sub_lab = img[sl], lab[sl]
    if o["kind"] in ("pore", "grain"):
        inside = np.sum((p / o["axes"]) ** 2, -1) < 1
        sub_img[inside] = 0.14 if o["kind"] == "pore" else 0.97
        return
    if o["kind"] == "foram":
        d = np.stack([np.linalg.norm(p - c, axis=-1) - r for c, r in zip(o["chambers"], o["radii"])], 0)
        inside = (d < 0).any(0)
        wall = inside & (np.max(np.where(d < 0, d, -np.inf), 0) > -o["wall"])
    else:
        rho = np.linalg.norm(p / o["axes"], axis=-1)
        inside = rho < 1
        wall = inside & (rho > 1 - o["wall"] / o["axes"].min())
        wall &= ~((np.abs(p[..., 1]) < 0.6) & (p[..., 0] < 0))  # gape between the two valves
    if "cut" in o:  # the broken-off piece is matrix
        normal, d = o["cut"]
        off = p @ normal.astype(np.float32) > d
        inside, wall = inside & ~off, wall & ~off
    sub_img[inside] = INFILL_GREY[o["infill"]]
    sub_img[wall] = 0.82
    sub_lab[inside] = o["label"]


def _texture(zs, H, W, seed):
    """Smooth carbonate-matrix texture on slices `zs`: a sum of random 3D plane waves, seamless in z."""
    rng = np.random.default_rng(seed + 7919)
    k = rng.normal(size=(24, 3)) * np.array([0.05, 0.05, 0.05]) * rng.uniform(0.3, 3.0, (24, 1))
    ph, amp = rng.uniform(0, 2 * np.pi, 24), 1 / np.sqrt(24)
    y, x = np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32)
    out = np.zeros((len(zs), H, W), np.float32)
    for kk, p in zip(k, ph):
        ey, ex = np.exp(1j * kk[1] * y).astype(np.complex64), np.exp(1j * kk[2] * x).astype(np.complex64)
        plane = np.outer(ey, ex)
        for i, z in enumerate(zs):
            out[i] += amp * (plane * np.exp(1j * (kk[0] * z + p))).real
    return out


def _sample_slabs(shape, seed, bit_depth, s0, s1, objs, style=None):
    """Yield (z, image slice, label slice) of the sample for z in [s0, s1): one slab, blurred with a margin, through
    the scanner of `style` (`sample_style`: blur, ring artefacts, noise, then contrast, gamma and offset)."""
    from scipy import ndimage
    st = sample_style(style)
    Z, H, W = shape
    yy, xx = np.mgrid[:H, :W].astype(np.float32)
    r = np.hypot(yy - (H - 1) / 2, xx - (W - 1) / 2)
    core_r = 0.46 * min(H, W)
    core = r < core_r
    rng_r = np.random.default_rng(seed + 1)
    rings = sum(a * np.exp(-0.5 * ((r - r0) / 0.8) ** 2)
                for r0, a in zip(rng_r.uniform(0, core_r, 6), rng_r.uniform(-st["rings"], st["rings"], 6))).astype(np.float32)
    maxval, dtype = (255, np.uint8) if bit_depth == 8 else (65535, np.uint16)
    m = 3  # margin for the 3D blur
    a0, a1 = max(0, s0 - m), min(Z, s1 + m)
    img = np.where(core, 0.45 + 0.07 * _texture(np.arange(a0, a1), H, W, seed), 0.04).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    for o in objs:
        _render_object(o, img, lab, a0)
    img[:, ~core] = 0.04
    img = ndimage.gaussian_filter(img, st["blur"])[s0 - a0: s1 - a0]
    lab = lab[s0 - a0: s1 - a0]
    for i, z in enumerate(range(s0, s1)):
        noise = np.random.default_rng([seed, z]).normal(0, st["noise"], (H, W)).astype(np.float32)
        sl = np.clip((img[i] + rings + noise) * 0.9 + 0.05, 0, 1)
        if (st["contrast"], st["gamma"], st["offset"]) != (1.0, 1.0, 0.0):  # another scanner's response
            sl = np.clip(0.5 + st["contrast"] * (sl ** st["gamma"] - 0.5) + st["offset"], 0, 1)
        yield z, (sl * maxval + 0.5).astype(dtype), lab[i]


def _write_png_slab(out_dir, shape, seed, bit_depth, s0, s1, objs, style=None):
    from PIL import Image
    for z, sl, lab in _sample_slabs(shape, seed, bit_depth, s0, s1, objs, style):
        Image.fromarray(sl).save(out_dir / "train" / f"slice_{z:04d}.png")
        Image.fromarray(lab).save(out_dir / "train_masks_labels" / f"slice_{z:04d}_GT.png")


def make_sample(out_dir, n_slices=64, height=192, width=192, seed=0, bit_depth=8, fmt="png", slab=48, workers=None,
                style=None):
    """Write a synthetic micro-CT sample in the dataset layout to `out_dir`; deterministic from `seed`.

    A cylindrical carbonate core in air with pores, dense grains, foraminifera
    (chambers along a spiral, thin bright calcite walls, hollow or sediment-filled)
    and ostracods (two thin valves of an ellipsoid), then CT blur, noise and ring
    artefacts. Labels: 0 background, 1 foraminifera, 2 ostracod. `fmt` is "png"
    (one file per slice) or "tif-stack" (one multi-page TIFF). Works slab by slab,
    so the full 983 x 1004 x 956 size fits in a few GB of RAM; PNG slabs are written
    by up to `workers` processes (default: the CPU count, at most 8). `style`: the knobs of a family of volumes
    (`STYLE_DEFAULTS`: class ratio, sizes, infills, broken and touching fossils, the scanner); None draws the
    embedded sample.
    """
    import tifffile
    out_dir = Path(out_dir)
    (out_dir / "train").mkdir(parents=True, exist_ok=True)
    (out_dir / "train_masks_labels").mkdir(parents=True, exist_ok=True)
    (out_dir / "codes.txt").write_text("\n".join(SAMPLE_CODES) + "\n")
    shape = (n_slices, height, width)
    style = sample_style(style)  # an unknown knob stops here, before anything is written
    objs = _make_objects(shape, seed, style=style)
    slabs = [(s0, min(n_slices, s0 + slab)) for s0 in range(0, n_slices, slab)]
    if fmt == "tif-stack":
        with tifffile.TiffWriter(out_dir / "train" / "volume.tif") as ti, \
                tifffile.TiffWriter(out_dir / "train_masks_labels" / "volume_GT.tif") as tl:
            for s0, s1 in slabs:
                for _, sl, lab in _sample_slabs(shape, seed, bit_depth, s0, s1, objs, style):
                    ti.write(sl, contiguous=True)
                    tl.write(lab, contiguous=True)
        return out_dir
    workers = min(len(slabs), workers or min(8, os.cpu_count() or 1))
    if workers > 1 and sys.platform.startswith("linux"):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            for f in [pool.submit(_write_png_slab, out_dir, shape, seed, bit_depth, s0, s1, objs, style)
                      for s0, s1 in slabs]:
                f.result()
    else:
        for s0, s1 in slabs:
            _write_png_slab(out_dir, shape, seed, bit_depth, s0, s1, objs, style)
    return out_dir


def ensure_sample(out_dir, n_slices=64, height=192, width=192, seed=0, **kw):
    """Generate the embedded sample into `out_dir` unless an identical one is already there; return `out_dir`.

    Written to a temporary folder and renamed, so an interrupted run never leaves half a sample.
    """
    out_dir = Path(out_dir)
    if "style" in kw:  # only the knobs it changes, as JSON has them (the marker of a sample without a style unchanged)
        st = sample_style(kw.pop("style"))
        changed = {k: list(v) if isinstance(v, tuple) else v for k, v in st.items() if v != STYLE_DEFAULTS[k]}
        if changed:
            kw["style"] = changed
    spec = dict(n_slices=n_slices, height=height, width=width, seed=seed, **kw)
    marker = out_dir / "sample.json"
    if marker.exists() and json.loads(marker.read_text()) == {**spec, "version": SAMPLE_VERSION}:
        return out_dir
    t = time.time()
    print(f"Generating the synthetic sample ({n_slices} slices of {height}x{width}) in {out_dir} ...")
    with replacing(out_dir) as tmp:
        make_sample(tmp, **spec)
        (tmp / "sample.json").write_text(json.dumps({**spec, "version": SAMPLE_VERSION}))
    print(f"  done in {time.time() - t:.1f}s")
    return out_dir
