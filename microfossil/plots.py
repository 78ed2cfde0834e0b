"""Figures: slices with their labels, orthogonal views, histograms, training curves and predictions.

Every function returns its matplotlib figure and, given `path`, saves it there too (the
headless runs keep them in `work_dir/figures/`). Needs matplotlib, never torch.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .io import attempt_files, read_json


def get_class_colours(n):
    """RGBA colours `(n, 4)` of `n` classes, as every figure and the gallery draw them; class 0, the background,
    transparent."""
    import matplotlib
    cols = matplotlib.colormaps["tab10" if n <= 10 else "tab20"](np.arange(n) % (10 if n <= 10 else 20))
    cols[0, 3] = 0
    return cols


def _cmap(n):
    import matplotlib.colors as mcolors
    return mcolors.ListedColormap(get_class_colours(n))


def _image_panels(rows, aspects, width, title_in=0.3, gap_in=0.15):
    """Figure of `rows` rows of image panels, column widths in proportion to `aspects` (width / height of each
    column's images), sized so that every image fills its panel: no band around the images."""
    import matplotlib.pyplot as plt
    h = (width - gap_in * (len(aspects) - 1)) / sum(aspects)  # every panel of a row is h inches high
    height = rows * (h + title_in)
    fig, axs = plt.subplots(rows, len(aspects), figsize=(width, height), squeeze=False,
                            gridspec_kw={"width_ratios": aspects})
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - title_in / height, hspace=title_in / h,
                        wspace=gap_in * len(aspects) / (width - gap_in * (len(aspects) - 1)))
    return fig, axs


def _overlay(ax, img, lab, n, title=None):
    ax.imshow(img, cmap="gray", vmin=0, vmax=255)
    if lab is not None:
        lab = np.ma.masked_greater_equal(np.asarray(lab), n)  # (a value beyond the classes: unlabelled, no colour)
        ax.imshow(lab, cmap=_cmap(n), vmin=-0.5, vmax=n - 0.5, alpha=0.45, interpolation="nearest")
    ax.set_axis_off()
    if title: ax.set_title(title, fontsize=9)


def _legend_under(fig, handles, axes=None, **kwargs):
    """A legend of `handles` centred right under `axes` (default: every panel of `fig`), below their tick and axis
    labels: no empty band between the panels and the legend once saved with a tight bounding box."""
    boxes = [fig.transFigure.inverted().transform_bbox(ax.get_tightbbox()) for ax in (axes or fig.axes)]
    x = (min(b.x0 for b in boxes) + max(b.x1 for b in boxes)) / 2
    return fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(x, min(b.y0 for b in boxes)),
                      frameon=False, fontsize=8, **kwargs)


def _legend(fig, codes):
    """Legend of the fossil classes (the background left out), right under the panels."""
    import matplotlib.patches as mpatches
    cols = get_class_colours(len(codes))
    _legend_under(fig, [mpatches.Patch(color=cols[i], label=c) for i, c in enumerate(codes) if i],
                  ncol=min(6, len(codes)))


def save_figure(path, fig=None):
    """Save `fig` (default: the current figure, e.g. the one `learn.lr_find()` just drew) as `path`; None: nothing."""
    import matplotlib.pyplot as plt
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        (fig or plt.gcf()).savefig(path, dpi=90, bbox_inches="tight")


def plot_slice(vol, z=None, path=None):
    """Slice `z` (default: the one with most fossil pixels) beside its mask overlay."""
    if z is None:
        n = len(vol.codes or [])
        z = int(np.argmax([((lab > 0) & (lab < n)).sum() for lab in vol.labels])) if vol.labels is not None \
            else len(vol.images) // 2
    aspect = vol.shape[2] / vol.shape[1]
    fig, axs = _image_panels(1, [aspect, aspect], 10)
    axs = axs[0]
    _overlay(axs[0], vol.images[z], None, 1, f"slice {z}: {vol.stems[z]}")
    _overlay(axs[1], vol.images[z], vol.labels[z] if vol.labels is not None else None, len(vol.codes), "labels")
    if vol.labels is not None: _legend(fig, vol.codes)
    save_figure(path, fig)
    return fig


def plot_orthoviews(vol, labels=None, path=None):
    """Orthogonal views XY, XZ and YZ through the volume centre, image on top and labels overlaid below."""
    labels = vol.labels if labels is None else labels
    Z, H, W = vol.shape
    views = [("XY (z=%d)" % (Z // 2), lambda a: a[Z // 2]), ("XZ (y=%d)" % (H // 2), lambda a: a[:, H // 2]),
             ("YZ (x=%d)" % (W // 2), lambda a: a[:, :, W // 2])]
    rows = 1 if labels is None else 2
    fig, axs = _image_panels(rows, [W / H, W / Z, H / Z], 14)
    for j, (t, f) in enumerate(views):
        _overlay(axs[0, j], f(vol.images), None, 1, t)
        if labels is not None:
            _overlay(axs[1, j], f(vol.images), f(labels), len(vol.codes), t + " + labels")
    if labels is not None: _legend(fig, vol.codes)
    save_figure(path, fig)
    return fig


def plot_histogram(vol, path=None):
    """Intensity histogram of the volume, per class when labels exist (log counts)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4))
    step = max(1, len(vol.images) // 32)
    imgs = vol.images[::step]
    if vol.labels is None:
        ax.hist(imgs.ravel(), bins=128, range=(0, 255), log=True, color="gray")
    else:
        labs = vol.labels[::step]
        cm = _cmap(len(vol.codes))
        for i, c in enumerate(vol.codes):
            v = imgs[labs == i]
            if v.size:
                ax.hist(v, bins=128, range=(0, 255), log=True, histtype="step", label=c,
                        color=cm(i)[:3] if i else "gray")
        ax.legend(fontsize=8)
    lo, hi = vol.window
    ax.set_xlabel(f"intensity (uint8; raw {vol.raw_dtype} window {lo:.4g}..{hi:.4g} mapped to 0..255)")
    ax.set_ylabel("voxels")
    save_figure(path, fig)
    return fig


def _history(path):
    import pandas as pd
    h = pd.read_csv(path)
    return h[pd.to_numeric(h["epoch"], errors="coerce").notna()]


def _fossil_iou(h):
    """The per-epoch mean IoU of the fossil classes of history `h` (a history written before `mean_iou_fossils`
    existed holds `mean_iou`, with the background in it: not shown)."""
    return h["mean_iou_fossils"].astype(float) if "mean_iou_fossils" in h else np.full(len(h), np.nan)


def validated_on(plan):
    """Which block the per-epoch scores of a phase with training `plan` were measured on, in words."""
    valid, test = plan.get("valid_slices"), plan.get("test_slices", plan.get("valid_slices"))
    if valid and valid == test:
        return f"test block {valid[0]}-{valid[1]}, the published recipe (valid_pct=0): not an unseen score"
    return f"validation block {valid[0]}-{valid[1]}" if valid else "no validation block"


def plot_history(work_dir, names, path=None):
    """Loss and the fossil classes' mean IoU per epoch of the phases in `names`, one after the other
    (`history/<name>.csv`), on the block they validated on (named on the axis); earlier attempts of a phase
    (`history/attempts/`) are drawn dotted beside its latest one, labelled with how their plan differed from it."""
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 2, figsize=(12, 4))
    off, models = 0, Path(work_dir) / "models"
    for n in names:
        hist = Path(work_dir) / "history"
        latest = (read_json(models / f"{n}.json") or {}).get("plan", {})
        for k, f in attempt_files(hist / "attempts", n, ".csv"):
            h = _history(f)
            x = off + np.arange(len(h))
            plan = (read_json(models / "attempts" / f"{n}.attempt{k}.json") or {}).get("plan", {})
            change = ", ".join(f"{key} {v}" for key, v in plan.items()
                               if key != "start" and json.dumps(v) != json.dumps(latest.get(key)))
            label = f"{n} attempt{k}" + (f" ({change})" if change and latest else "")
            axs[0].plot(x, h["valid_loss"].astype(float), ":", lw=1, label=f"{label} valid")
            axs[1].plot(x, _fossil_iou(h), ":", lw=1, label=label)
        if not (hist / f"{n}.csv").exists():
            continue
        h = _history(hist / f"{n}.csv")
        x = off + np.arange(len(h))
        axs[0].plot(x, h["train_loss"].astype(float), "-", label=f"{n} train")
        axs[0].plot(x, h["valid_loss"].astype(float), "--", label=f"{n} valid")
        axs[1].plot(x, _fossil_iou(h), "-o", ms=3, label=n)
        off += len(h)
    axs[0].set(xlabel="epoch", ylabel="loss")
    blocks = {validated_on((read_json(Path(work_dir) / "models" / f"{n}.json") or {}).get("plan", {})) for n in names
              if (Path(work_dir) / "models" / f"{n}.json").exists()}
    axs[1].set(xlabel="epoch", ylabel="fossil classes' mean IoU (stage size)")
    axs[1].set_title("; ".join(sorted(blocks)) or "validation block", fontsize=9)
    for a in axs:
        if a.get_legend_handles_labels()[0]:
            _legend_under(fig, a.get_legend_handles_labels()[0], axes=[a], ncol=2)
    save_figure(path, fig)
    return fig


_RECORD_KEYS = {"name", "attempt", "final", "sha256", "file_size", "epochs_trained", "seconds", "trained_on",
                "finished", "forced_at", "checkpoint"}  # a training record's entries that are not its plan


def attempts(work_dir, names):
    """The attempts of each phase in `names` (their training records in `work_dir/models/`), earlier ones and the
    latest, side by side: the schedule (epochs, lr, pct_start, start), every other plan entry that differs between
    the attempts of a phase (frozen, loss, class weights, bs, size, wd, seed...), the final scores, and the block they
    were measured on (`validated_on`: the validation block; the test block only with the published recipe's
    `valid_pct=0`, and then named so)."""
    import pandas as pd
    models = Path(work_dir) / "models"
    rows, differ = [], set()
    for name in names:
        kept = [p for _, p in attempt_files(models / "attempts", name, ".json")]
        recs = [r for r in (read_json(f) for f in [*kept, models / f"{name}.json"]) if r is not None]
        plans = [r.get("plan", {k: v for k, v in r.items() if k not in _RECORD_KEYS}) for r in recs]  # (flat: older)
        differ |= {k for k in set().union(*plans) if len({json.dumps(p.get(k), sort_keys=True) for p in plans}) > 1}
        for f, rec, plan in zip([*kept, models / f"{name}.json"], recs, plans):
            rows.append({"phase": name, "attempt": rec.get("attempt", 1), "latest": f.parent == models, "plan": plan,
                         "scores on": validated_on(plan),
                         **{k: v for k, v in rec.get("final", {}).items() if k != "mean_iou"},  # (with background)
                         "seconds": rec.get("seconds")})
    shown = ["epochs", "lr", "pct_start", *sorted(differ - {"epochs", "lr", "pct_start", "start"}), "start"]
    for row in rows:
        plan = row.pop("plan")
        row.update({k: plan.get(k) for k in shown})
    front = ["phase", "attempt", "latest", *shown]
    return pd.DataFrame(rows, columns=front + [c for c in dict.fromkeys(k for r in rows for k in r) if c not in front])


def plot_predictions(vol, pred, idx, path=None):
    """Image, ground truth and prediction side by side for slices `idx`."""
    idx = list(idx)
    fig, axs = _image_panels(len(idx), [vol.shape[2] / vol.shape[1]] * 3, 12)
    for r, z in enumerate(idx):
        _overlay(axs[r, 0], vol.images[z], None, 1, f"slice {z}")
        _overlay(axs[r, 1], vol.images[z], vol.labels[z] if vol.labels is not None else None, len(vol.codes),
                 "ground truth")
        _overlay(axs[r, 2], vol.images[z], pred[z], len(vol.codes), "prediction")
    _legend(fig, vol.codes)
    save_figure(path, fig)
    return fig


def plot_split(vol, split, path=None):
    """Where the split falls along z: the labelled voxels of each fossil class per slice, with the validation block,
    the training block, the test block and the gaps between them shaded (`split`, from `split.split_volume`)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 3.2))
    test = "test (also validation: the published recipe)" if split.published else "test"
    blocks = [(split.train_start, split.train_stop, "training", "tab:green"),
              (split.train_stop, split.test_start, "gap", "tab:gray"), (split.test_start, split.n_slices, test, "tab:red")]
    if not split.published:
        blocks = [(split.valid_start, split.valid_stop, "validation", "tab:blue"),
                  (split.valid_stop, split.train_start, "gap", "tab:gray")] + blocks
    for a, b, name, colour in blocks:
        if b > a:
            ax.axvspan(a - 0.5, b - 0.5, color=colour, alpha=0.15, label=f"{name}: slices {a}-{b - 1}")
    if vol.labels is not None:
        n = len(vol.codes)
        counts = np.stack([np.bincount(np.asarray(lab).ravel(), minlength=n)[:n] for lab in vol.labels])
        cm = _cmap(n)
        for k in range(1, n):
            ax.plot(np.arange(len(counts)), counts[:, k], color=cm(k), label=vol.codes[k])
        labelled = getattr(vol, "labelled", None)
        if labelled is not None and not np.all(labelled):  # sparse labels: which slices hold them
            zs = np.flatnonzero(labelled)
            ax.plot(zs, np.zeros(len(zs)), "|", color="black", markersize=14, label=f"labelled slices ({len(zs)})")
    ax.set_xlabel("slice (z)")
    ax.set_ylabel("labelled voxels")
    lo, lv = split.left_out.get("specimens", 0), 0 if split.published else split.valid_left_out.get("specimens", 0)
    ax.set_title(f"split: gaps of {split.valid_stop and split.train_start - split.valid_stop} and "
                 f"{split.test_start - split.train_stop} slices; specimens in two blocks, left out of the scores: "
                 f"{lo} of the test block, {lv} of the validation block", fontsize=9)
    handles = ax.get_legend_handles_labels()[0]
    _legend_under(fig, handles, ncol=min(5, len(handles)))
    save_figure(path, fig)
    return fig


def plot_assemblage(table, path=None):
    """The counts of each class or taxon along the core (`assemblage.assemblage_table`), depth downwards, a column
    each, as range charts of biostratigraphy are drawn."""
    import matplotlib.pyplot as plt
    names, unit = table.attrs["classes"], table.attrs["unit"]
    top, bottom = table.iloc[:, 0].to_numpy(float), table.iloc[:, 1].to_numpy(float)
    colours = get_class_colours(len(names) + 1)[1:]
    fig, axs = plt.subplots(1, max(1, len(names)), figsize=(1.2 + 2.2 * max(1, len(names)), 5), sharey=True,
                            squeeze=False)
    for ax, name, col in zip(axs[0], names, colours):
        ax.barh(top, table[f"{name}_count"], height=bottom - top, align="edge", color=col, edgecolor="k", lw=0.3)
        ax.set(title=name, xlabel="specimens")
    axs[0, 0].set(ylabel=f"depth ({'mm' if unit == 'mm' else 'slices'} from the top of the scan)")
    if len(table):
        axs[0, 0].set_ylim(bottom.max(), 0)
    fig.tight_layout()
    save_figure(path, fig)
    return fig
