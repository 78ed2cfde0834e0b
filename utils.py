"""The names the notebooks use, from the `microfossil` package beside this file.

The notebooks `import utils`; the code lives in `microfossil/`, one module per concern
(its `__init__.py` has the map). A name is imported on first use, so a notebook that
only reviews (06) never loads torch or fastai.
"""
import importlib
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # `microfossil/` sits beside this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

_NAMES = {  # module of the microfossil package: the names the notebooks take from it
    "runtime": ["local_dir", "cache_dirs", "flush_drive"],
    "paths": ["use_run"],
    "bundle": ["check_intensity", "matched_volume", "bundle_examples", "update_bundle", "run_bundle"],
    "volume": ["load_volume", "describe_volume", "read_voxel_size"],
    "split": ["split_volume", "describe_split", "scoring_split"],
    "loaders": ["get_device", "make_dls"],
    "learner": ["build_learner", "valley"],
    "training": ["set_seed", "PhaseCheckpoint", "load_stage", "phase_done", "save_bundle"],
    "prediction": ["load_model", "predict_volume", "threshold_plan"],
    "extraction": ["extract_fossils"],
    "evaluation": ["save_metrics", "evaluate_heldout", "describe_specimen_scores", "variant_name", "evaluation_row",
                   "write_evaluation"],
    "classifier": ["classify_specimens"],
    "assemblage": ["write_assemblage"],
    "review": ["ReviewSession", "ReviewPanel", "has_widget_frontend", "read_review"],
    "viewers": ["browse_slices", "view_specimen", "view_specimens"],
    "plots": ["save_figure", "plot_slice", "plot_orthoviews", "plot_histogram", "plot_split", "plot_history",
              "attempts", "plot_predictions"],
}
_MODULE_OF = {name: module for module, names in _NAMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"utils has no {name!r}: the notebooks' names are listed in utils._NAMES, "
                             "everything else is in the microfossil package")
    value = getattr(importlib.import_module(f"microfossil.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # the next use is a plain attribute
    return value


def __dir__():
    return __all__
