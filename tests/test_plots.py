"""Figures: each one drawn and saved, on volumes with and without labels, with the legend right under the panels;
training curves with earlier attempts."""
import csv

import matplotlib
import numpy as np
from PIL import Image

from conftest import make_case
from microfossil import plots
from microfossil.split import split_volume

matplotlib.use("Agg")


def test_volume_figures_are_saved(tmp_path):
    vol = make_case(tmp_path)[0]
    vol.labels = (vol.images > 100).astype(np.uint8)
    figs = {"slice": plots.plot_slice(vol, path=tmp_path / "f" / "slice.png"),
            "ortho": plots.plot_orthoviews(vol, path=tmp_path / "f" / "ortho.png"),
            "hist": plots.plot_histogram(vol, path=tmp_path / "f" / "hist.png"),
            "pred": plots.plot_predictions(vol, vol.labels, [0, 20], path=tmp_path / "f" / "pred.png"),
            "split": plots.plot_split(vol, split_volume(vol, 0.2, 0.1), path=tmp_path / "f" / "split.png")}
    assert all(f.axes for f in figs.values())
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["hist.png", "ortho.png", "pred.png", "slice.png",
                                                                   "split.png"]
    labels = [t.get_text() for t in figs["split"].legends[0].get_texts()]
    assert labels[0].startswith("validation: slices 0-") and any(t.startswith("training: slices") for t in labels)
    assert any(t.startswith("test: slices") for t in labels)
    published = plots.plot_split(vol, split_volume(vol, 0.2, 0.0))  # validation on the test block: it says so
    assert any("published recipe" in t.get_text() for t in published.legends[0].get_texts())
    vol.labels = None  # a new scan: no labels to overlay
    assert len(plots.plot_orthoviews(vol).axes) == 3 and plots.plot_histogram(vol).axes


def _widest_white_band(path):
    """Height in pixels of the tallest run of blank rows in a saved figure."""
    blank = (np.asarray(Image.open(path).convert("L")) > 245).all(1)
    runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], blank.astype(int), [0]]))))[::2]
    return int(runs.max()) if len(runs) else 0


def test_legend_sits_right_under_the_panels(tmp_path):
    """No empty band in a saved figure (the old layout left 40-100 px between the panels and the legend at 90 dpi),
    and the legend just below the lowest panel, in the class colours."""
    vol = make_case(tmp_path)[0]
    vol.labels = (vol.images > 100).astype(np.uint8) * 2
    figs = {"slice": plots.plot_slice(vol, path=tmp_path / "slice.png"),
            "ortho": plots.plot_orthoviews(vol, path=tmp_path / "ortho.png"),
            "pred": plots.plot_predictions(vol, vol.labels, [5, 12, 20], path=tmp_path / "pred.png"),
            "split": plots.plot_split(vol, split_volume(vol, 0.2), path=tmp_path / "split.png")}
    for name, fig in figs.items():
        assert _widest_white_band(tmp_path / f"{name}.png") < 25, name
        legend = fig.legends[0].get_window_extent()
        lowest = min(ax.get_tightbbox().y0 for ax in fig.axes)
        assert 0 <= lowest - legend.y1 < 0.15 * fig.dpi, name  # under the panels, less than 0.15 inch below
    handles = figs["slice"].legends[0].legend_handles
    assert [h.get_label() for h in handles] == ["foraminifera", "ostracod"]
    assert tuple(handles[1].get_facecolor()) == tuple(plots.get_class_colours(3)[2])


def _write_history(path, n, iou):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "train_loss", "valid_loss", "mean_iou", "time"])
        w.writerows([[e, 1.0 / (e + 1), 1.2 / (e + 1), iou, "00:01"] for e in range(n)])


def test_history_draws_both_phases_and_earlier_attempts(tmp_path):
    _write_history(tmp_path / "history" / "p_frozen.csv", 3, 0.5)
    _write_history(tmp_path / "history" / "p_unfrozen.csv", 2, 0.6)
    _write_history(tmp_path / "history" / "attempts" / "p_frozen.attempt1.csv", 4, 0.4)
    fig = plots.plot_history(tmp_path, ["p_frozen", "p_unfrozen"], path=tmp_path / "h.png")
    loss, iou = fig.axes
    assert [ln.get_label() for ln in iou.lines] == ["p_frozen attempt1", "p_frozen", "p_unfrozen"]
    assert list(iou.lines[2].get_xdata()) == [3, 4]  # phase 2 follows the latest attempt of phase 1
    assert (tmp_path / "h.png").exists()


def test_attempts_show_what_differs_between_them(tmp_path):
    """Every plan entry that differs between a phase's attempts is a column (here frozen, bs and class weights), and
    the history labels an earlier attempt with how its plan differed from the latest one."""
    from microfossil.io import write_json
    plan = {"epochs": 2, "lr": 1e-3, "pct_start": 0.25, "bs": 8, "frozen": True, "class_weights": None, "wd": 0.01,
            "start": "random init", "valid_slices": [0, 1], "test_slices": [8, 9]}
    (tmp_path / "models" / "attempts").mkdir(parents=True)
    write_json(tmp_path / "models" / "attempts" / "p_frozen.attempt1.json", {"attempt": 1, "plan": plan, "final": {}})
    write_json(tmp_path / "models" / "p_frozen.json", {"attempt": 2, "plan": {**plan, "bs": 4, "frozen": False,
                                                                              "class_weights": [1, 2]}, "final": {}})
    table = plots.attempts(tmp_path, ["p_frozen"])
    assert table[["bs", "class_weights", "frozen"]].values.tolist() == [[8, None, True], [4, [1, 2], False]]
    assert "wd" not in table and table.columns.tolist()[:4] == ["phase", "attempt", "latest", "epochs"]
    _write_history(tmp_path / "history" / "p_frozen.csv", 2, 0.5)
    _write_history(tmp_path / "history" / "attempts" / "p_frozen.attempt1.csv", 2, 0.4)
    labels = [ln.get_label() for ln in plots.plot_history(tmp_path, ["p_frozen"]).axes[1].lines]
    assert labels == ["p_frozen attempt1 (bs 8, frozen True, class_weights None)", "p_frozen"]
