"""Every notebook parameter is checked where it enters: a wrong type or range stops with its name and what it takes."""
import papermill as pm
import pytest

import run_pipeline
from conftest import ROOT
from microfossil.params import RULES, ParameterError, check_params

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _defaults(nb):
    return {k: eval(v["default"]) for k, v in pm.inspect_notebook(str(nb)).items()}  # noqa: S307 (our own cells)


def test_every_notebook_parameter_has_a_rule_and_the_defaults_pass():
    for nb in NOTEBOOKS:
        values = _defaults(nb)
        assert set(values) <= set(RULES), f"{nb.name}: no rule for {set(values) - set(RULES)}"
        check_params(values)


@pytest.mark.parametrize("name, value, says", [
    ("bs", 0, "bs=0: bs is the batch size (None: what fits the GPU's free memory); it takes None or a whole number >= 1"),
    ("bs", -1, "whole number >= 1"),
    ("bs", 4.5, "whole number >= 1"),
    ("bs", True, "whole number >= 1"),
    ("min_voxels", -5, "min_voxels=-5"),
    ("test_pct", 0, "0 would leave nothing to score"),
    ("test_pct", 1.5, "below 1"),
    ("test_pct", float("nan"), "test_pct=nan"),
    ("valid_pct", -0.1, "0: validate on the test block"),
    ("valid_pct", 1.0, "below 1"),
    ("context_slices", 2, "odd whole number"),
    ("connectivity", 8, "one of 6, 18, 26"),
    ("loss", "dice", "one of 'cross_entropy', 'ce_dice', 'focal'"),
    ("class_weights", "balanced", "\"balance_fossils\", \"balance_fossils_sqrt\", \"inverse_sqrt\", \"inverse\" or a list of positive numbers"),
    ("class_weights", [1, 0, 2], "a list of positive numbers, one per class"),
    ("oversample_rare", 0.5, "a number at least 1"),
    ("tta", "yes", "True or False"),
    ("crop_size", 16, "None or a whole number >= 32"),
    ("voxel_size_um", [1, 2], "three, [z, y, x]"),
    ("voxel_size_um", -2.5, "one positive number"),
    ("lr_frozen", 0, "above 0"),
    ("epochs_unfrozen", 0, ">= 1"),
    ("sample_size", "big", "'default', 'full'"),
])
def test_a_bad_value_is_named_with_what_it_takes(name, value, says):
    with pytest.raises(ParameterError) as e:
        check_params({"bs": 4, name: value})
    assert says in str(e.value) and "parameters cell" in str(e.value)


def test_good_values_of_other_types_pass_and_unknown_names_are_left_alone():
    import numpy as np
    check_params({"bs": np.int64(4), "voxel_size_um": [5, 2.5, 2.5], "data_dir": ROOT, "crop_size": None,
                  "min_voxels": 0, "ROOT": object(), "lr_unfrozen_lo": 1e-5, "lr_unfrozen_hi": 1e-5,
                  "class_weights": [1, 5.5, 20], "oversample_rare": 3})
    check_params({"class_weights": "inverse_sqrt", "oversample_rare": 1.0})
    with pytest.raises(ParameterError, match="lr_unfrozen_lo=0.001 is above lr_unfrozen_hi=0.0001"):
        check_params({"lr_unfrozen_lo": 1e-3, "lr_unfrozen_hi": 1e-4})
    with pytest.raises(ParameterError, match="(?s)bs=0.*tta='no'"):  # every bad one at once
        check_params({"bs": 0, "tta": "no"})


def test_crops_with_tri_planar_training_stop_with_the_fix(tiny, tmp_path, capsys):
    """Tri-planar training is the default of 02-04 and crops are cut from axial slices only: crop_size alone stops
    before any notebook starts, saying which of the two to change, instead of in make_dls after 01 has run."""
    with pytest.raises(ParameterError, match="crop_size=48 with triplanar=True.*set triplanar=False"):
        check_params({"crop_size": 48, "triplanar": True})
    check_params({"crop_size": 48, "triplanar": False})
    check_params({"crop_size": None, "triplanar": True})
    with pytest.raises(SystemExit):
        run_pipeline.main(["--data-dir", str(tiny), "--work-dir", str(tmp_path / "w"), "-p", "crop_size", "48"])
    assert "02_train_256.ipynb: Bad parameter value" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_the_runner_stops_a_bad_parameter_before_any_notebook(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_pipeline.main(["--data-dir", str(tiny), "--work-dir", str(tmp_path / "w"), "--smoke", "-p", "bs", "0"])
    assert "bs=0: bs is the batch size" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_notebook_stops_at_its_first_cell_on_a_bad_parameter(tiny, tmp_path):
    """Through papermill, as run_pipeline and the headless users run it: 05 with bs=0 stops in the cell after the
    parameters with the message, before it loads anything."""
    with pytest.raises(pm.PapermillExecutionError) as e:
        pm.execute_notebook(str(ROOT / "notebooks" / "05_predict_export.ipynb"), str(tmp_path / "out.ipynb"),
                            cwd=str(ROOT / "notebooks"), kernel_name="python3", progress_bar=False,
                            parameters={"data_dir": str(tiny), "work_dir": str(tmp_path / "w"), "bs": 0})
    assert e.value.ename == "ParameterError" and "bs=0" in e.value.evalue
    assert not (tmp_path / "w").exists()


def test_the_runner_checks_each_notebook_with_its_own_defaults(tiny, tmp_path, capsys):
    """-p lr_unfrozen_lo 1e-5 suits 02 and 03 but not 04, whose lr_unfrozen_hi is 2e-6: it stops before 02 starts,
    naming 04, rather than after two notebooks of training."""
    with pytest.raises(SystemExit):
        run_pipeline.main(["--data-dir", str(tiny), "--work-dir", str(tmp_path / "w"), "-p", "lr_unfrozen_lo", "1e-5"])
    assert "04_train_full.ipynb: Bad parameter value" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
