"""A training phase that survives a disconnect and a user who tweaks: `PhaseCheckpoint`, a fastai callback.

Passed to `learn.fit_one_cycle(..., cbs=PhaseCheckpoint("256_frozen", start=...))`, it
- reads the phase's *plan* off the fit about to run (epochs, learning rates and the
  one-cycle schedule fastai will apply, weight decay, batch size, size, context slices,
  frozen or not, starting weights), so whatever the user changed in the cell is seen;
- same plan as the finished phase: loads its weights and skips the fit; same plan as an
  interrupted one: resumes after its last finished epoch (as fastai's `start_epoch` does);
- another plan (or `force`): keeps the finished attempt in `models/attempts/`, reloads the
  phase's starting weights (never the weights trained in memory) and trains again;
- saves weights and optimizer after every epoch, the history CSV, and at the end
  `models/<phase>.pth` with `models/<phase>.json` (plan, attempt number, final metrics, size and hash).

On Google Drive (Colab) the per-epoch checkpoint stays on the runtime's local disk
(`runtime.local_dir`), and Drive gets a resumable copy at most every `drive_minutes`, written
in place over one of two slots (`models/resume.a.pth`, `resume.b.pth`, each with its record),
so nothing goes to Drive's trash and one complete copy always remains. After a lost runtime,
the phase resumes from the newest slot whose size and hash match its record, and says which
epochs were lost. Finished weights are checked against their record before they are used.

The next stage starts from `models/<phase>.pth`, the latest attempt; "256_unfrozen.attempt1"
names an earlier one (`load_stage`, `load_model`).
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import shutil
import time
from pathlib import Path


from fastai.learner import Callback, CancelFitException, SkipToEpoch, load_model, save_model
from fastai.torch_core import set_seed

from .bundle import write_bundle
from .io import attempt_files, read_json, replacing, write_json, write_text
from .learner import check_held, lr_plan, sig
from .loaders import n_input_channels
from .params import FORCE_SINCE
from .plots import validated_on
from .runtime import copy_in_place, file_digest, local_dir, matches, on_drive, require_mounted, write_in_place
from .split import check_split

SLOTS = ("a", "b")  # the two resumable copies on Drive, overwritten in turn
PLAN_KEYS = ("epochs", "lr", "pct_start", "div", "div_final", "moms", "wd", "bs", "size", "frozen", "context_slices",
             "triplanar", "train_slices", "valid_slices", "test_slices", "seed", "arch", "codes", "start", "loss",
             "crop_size", "class_weights", "oversample_rare", "infill_augment", "scanner_augment")
_PLAN_DEFAULTS = {"loss": "cross_entropy", "crop_size": None, "class_weights": None,  # what a record made before
                  "oversample_rare": 1.0, "infill_augment": 0.0, "scanner_augment": 0.0}  # these keys existed used


def checkpoint_files(work_dir, name):
    """`(weights, record)` paths of finished phase `name` in `work_dir/models`: "256_unfrozen" is its latest attempt,
    "256_unfrozen.attempt1" attempt 1 (kept in `models/attempts/` once a later attempt exists)."""
    models = Path(work_dir) / "models"
    m = re.fullmatch(r"(.+)\.attempt(\d+)", name)
    if m and (read_json(models / f"{m[1]}.json") or {}).get("attempt", 1) != int(m[2]):
        return models / "attempts" / f"{name}.pth", models / "attempts" / f"{name}.json"
    base = m[1] if m else name
    return models / f"{base}.pth", models / f"{base}.json"


def weights_sha256(path):
    """The SHA-256 of a weights file, in hex: what the outputs made with it record."""
    return file_digest(path)


def phase_done(work_dir, name):
    """True when phase `name` (e.g. "256_frozen", or "256_frozen.attempt1") is finished in `work_dir/models/`."""
    return all(p.exists() for p in checkpoint_files(work_dir, name))


def check_weights(work_dir, name):
    """Stop unless the weights of finished phase `name` are the file their record describes (size and SHA-256): on
    Drive, a file written on another runtime may not be fully uploaded yet. Returns the weights' path."""
    weights, record = checkpoint_files(work_dir, name)
    rec = read_json(record) or {}
    size, sha = rec.get("file_size"), rec.get("sha256")
    ok = sha is None or (matches(weights, size, sha) if size is not None else weights_sha256(weights) == sha)
    if not ok:
        lag = (" It is on Google Drive: if it was written on another runtime in the last minutes, Drive may still be "
               "uploading it; wait a minute and run the cell again. If it stays so,") if on_drive(weights) else ""
        raise ValueError(f"{weights} is not the file {record.name} describes (size or SHA-256 differ).{lag} train the "
                         "phase again (force=True), or put the trained file back.")
    return weights


def read_record(work_dir, name):
    """The record of finished phase `name`, flat: its plan, with `name`, `attempt`, `final` metrics and `seconds`."""
    rec = read_json(checkpoint_files(work_dir, name)[1])
    return None if rec is None else {**rec.get("plan", {}), **{k: v for k, v in rec.items() if k != "plan"}}


def save_bundle(work_dir, name, vol):
    """Write the model bundle of finished phase `name` (`work_dir/bundle/`, see `bundle`) from training volume `vol`:
    the weights and what they expect, for 05 on another scan (`model_path`). Returns its folder."""
    weights, _ = checkpoint_files(work_dir, name)
    if not phase_done(work_dir, name):
        raise FileNotFoundError(f"{weights} not found: train the phase first.")
    rec = read_record(work_dir, name)
    rec["checkpoint"] = {"name": f"{name.split('.attempt')[0]}.attempt{rec.get('attempt', 1)}",
                         "sha256": weights_sha256(weights)}
    dest = write_bundle(work_dir, weights, rec, vol)
    print(f"Model bundle written: {dest} (the weights, classes {rec['codes']}, context_slices "
          f"{rec.get('context_slices', 1)}, training size {rec['size']}); copy it to use the model on another scan "
          "(05's model_path)")
    return dest


def _check_context(rec, name, context):
    k_prev = rec.get("context_slices", 1)
    if n_input_channels(context) != n_input_channels(k_prev):
        raise ValueError(f"{name} was trained with context_slices={k_prev}, this learner has context_slices={context}: "
                         "use the same value in every training notebook (or init_from=None to start afresh).")


def load_stage(learn, name):
    """Load finished checkpoint `name` (e.g. the previous stage's "256_unfrozen") strictly into `learn`."""
    if name is None:
        return learn
    weights, _ = checkpoint_files(learn.path, name)
    if not phase_done(learn.path, name):
        lag = (" (It is on Google Drive: if that notebook finished on another runtime moments ago, Drive may still be "
               "uploading it; wait a minute and run this cell again.)") if on_drive(learn.path) else ""
        raise FileNotFoundError(f"{weights} not found: run the notebook that trains '{name.split('_')[0]}' first with "
                                f"the same work_dir, or set init_from=None to start from ImageNet weights.{lag}")
    check_weights(learn.path, name)
    rec = read_record(learn.path, name)
    _check_context(rec, name, getattr(learn.dls, "context_slices", 1))
    if getattr(learn.dls, "split", None) is not None:
        check_split(learn.dls.split, rec, name)
    load_model(weights, learn.model, learn.opt, with_opt=False, device=learn.dls.device, strict=True)
    learn.at_init = False
    print(f"Loaded weights of {name} ({weights})")
    return learn


def _asked_bs(dls):
    """The plan's batch size: the parameters cell's ("auto": bs=None), not the loaders' (`bs_used`), which an
    out-of-memory error may have halved: a resume on another GPU or after a halving is the same plan."""
    bs = getattr(dls, "made_with", {}).get("bs", dls.train.bs)  # (DataLoaders made elsewhere: theirs)
    return "auto" if bs is None else int(bs)


def _plan_of(rec, plan):
    """The plan recorded in `rec`, on the keys of `plan`. A record of the earlier code is flat and knows fewer keys:
    those it lacks are taken as unchanged."""
    if rec is None:
        return None
    if "plan" in rec:
        return {k: rec["plan"].get(k, _PLAN_DEFAULTS.get(k)) for k in PLAN_KEYS}
    return {k: rec.get(k, plan[k]) for k in PLAN_KEYS}


def _diff(old, new):
    changed = [f"{k} {old.get(k)} -> {new.get(k)}" for k in PLAN_KEYS if old.get(k) != new.get(k)]
    return ", ".join(changed) or "same plan"


class PhaseCheckpoint(Callback):
    """Checkpoint, resume, skip or retrain one training phase; see the module's docstring. Pass it in `cbs`.

    `start` names the checkpoint the phase starts from ("256_frozen", the previous stage's
    "256_unfrozen", ...), or None for the learner's own initial weights (ImageNet or random),
    kept as `models/<phase>.start.pth` so that a retrain starts from the same ones. `force`
    retrains a finished phase once (`_force_used`), never instead of resuming an interrupted one. `params`, a notebook's
    `globals()`, gives `force` and `drive_minutes` and is checked against what the learner and its DataLoaders were
    made with (`learner.check_held`) before anything trains.
    """
    order = 55  # after the Recorder (50) has logged an epoch; before the progress bar (60) opens for a fit it skips

    def __init__(self, name, start=None, force=False, drive_minutes=15, params=None):
        if params is not None:
            force, drive_minutes = params.get("force", force), params.get("drive_minutes", drive_minutes)
        self.phase, self.start, self.force, self.drive_minutes, self.params = name, start, force, drive_minutes, params

    # --- files ---
    @property
    def models(self): return Path(self.learn.path) / "models"

    @property
    def on_drive(self): return on_drive(self.learn.path)

    def _path(self, suffix): return self.models / f"{self.phase}{suffix}"

    def _progress(self, suffix):
        """The per-epoch checkpoint: in `models/`, or on the runtime's local disk when the run folder is on Drive."""
        return local_dir(self.learn.path, "models") / f"{self.phase}.progress{suffix}"

    def _slot(self, s, suffix): return self.models / f"resume.{s}{suffix}"

    @property
    def history(self): return Path(self.learn.path) / "history" / f"{self.phase}.csv"

    def _save(self, path, with_opt):
        with replacing(path) as tmp:
            save_model(tmp, self.learn.model, self.learn.opt, with_opt=with_opt)

    def _drop_progress(self):
        for suffix in (".pth", ".json"):
            self._progress(suffix).unlink(missing_ok=True)
        for s, rec in self._slots():  # this phase's copies on Drive: deleted (emptied in place, their earlier
            if rec.get("phase") == self.phase:  # contents would stay in Drive's version history, counted for 30 days)
                for suffix in (".pth", ".json"):
                    self._slot(s, suffix).unlink(missing_ok=True)

    def _slots(self):
        """`(slot, record)` of the resumable copies on Drive (record `{}` for an empty or unreadable one)."""
        out = []
        for s in SLOTS:
            try:
                rec = read_json(self._slot(s, ".json")) or {}
            except ValueError:  # cut short by a lost runtime
                rec = {}
            out.append((s, rec))
        return out

    def _copy_to_drive(self):
        """A resumable copy of the last epoch on Drive, over the slot that does not hold the newest good copy."""
        if self._last_slot is None:  # the first copy of this fit: over another phase's, an empty or the older one
            recs = dict(self._slots())
            s = min(SLOTS, key=lambda s: (recs[s].get("phase") == self.phase, recs[s].get("saved_at", 0)))
        else:
            s = SLOTS[1 - SLOTS.index(self._last_slot)]
        written = copy_in_place(self._progress(".pth"), self._slot(s, ".pth"))
        write_in_place(self._slot(s, ".json"), json.dumps({
            "phase": self.phase, "plan": self.plan, "attempt": self.attempt, "epoch": self.epoch, **written,
            "rows": self.rows,  # the history up to this copy: the history file on Drive may be older or newer
            "saved_at": time.time(), "saved": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2, default=str))
        self._last_slot, self._last_copy = s, time.time()

    def _resume_from_drive(self):
        """The newest copy of this phase's plan on Drive whose weights match their record, or None; says which
        copies are not usable and why."""
        good = []
        for s, rec in self._slots():
            if rec.get("phase") != self.phase:
                continue
            if _plan_of(rec, self.plan) != self.plan:
                print(f"{self.phase}: the copy in models/resume.{s}.pth had another plan; not used")
            elif not matches(self._slot(s, ".pth"), rec.get("size"), rec.get("sha256")):
                print(f"{self.phase}: models/resume.{s}.pth (epoch {rec['epoch'] + 1}, saved {rec.get('saved')}) does "
                      "not match its record (size or hash): Drive had not received all of it; not used")
            else:
                good.append((rec["epoch"], s, rec))
        return max(good, default=None, key=lambda g: g[0])

    def _drop_resume(self):
        self.learn.remove_cbs(self.learn.cbs.filter(lambda cb: isinstance(cb, _Resume)))

    def _load(self, path, with_opt):
        load_model(path, self.learn.model, self.learn.opt, with_opt=with_opt, device=self.learn.dls.device, strict=True)

    # --- the plan ---
    def _start_name(self):
        if self.start is None:  # what was asked for: whether the download worked this session does not change the plan
            return "ImageNet weights" if getattr(self.learn, "pretrained", False) else "random init"
        rec = read_record(self.learn.path, self.start)
        if rec is None:
            raise FileNotFoundError(f"{self.phase} starts from {self.start}, which is not trained in "
                                    f"{self.models}: run its cell (or notebook) first with the same work_dir.")
        if "attempt" not in rec or ".attempt" in self.start:
            return self.start
        return f"{self.start}.attempt{rec['attempt']}"

    def _plan(self):
        learn, dls = self.learn, self.learn.dls
        opt = learn.opt
        valid = getattr(dls, "valid_idx", [])
        split = dls.split.plan() if getattr(dls, "split", None) is not None else {
            "valid_slices": [int(valid[0]), int(valid[-1])] if len(valid) else [], "test_slices": None}
        return {"epochs": int(learn.n_epoch), **lr_plan(learn, len(opt.param_lists)),
                "wd": sig(opt.hypers[-1].get("wd", 0.0)), "bs": _asked_bs(dls), "size": list(dls.size),
                "frozen": bool(opt.frozen_idx), "context_slices": int(getattr(dls, "context_slices", 1)),
                "triplanar": bool(getattr(dls, "triplanar", False)), "train_slices": None, **split, "seed": getattr(dls, "seed", None),
                "arch": getattr(learn, "arch_name", None), "codes": list(dls.codes), "start": self._start_name(),
                "loss": getattr(learn, "loss_name", "cross_entropy"), "class_weights": getattr(learn, "class_weights", None),
                **{k: getattr(dls, k, _PLAN_DEFAULTS[k])  # (DataLoaders made elsewhere: the published recipe's)
                   for k in ("crop_size", "oversample_rare", "infill_augment", "scanner_augment")}}

    # --- attempts ---
    def _attempt_numbers(self):
        nums = [n for n, _ in attempt_files(self.models / "attempts", self.phase, ".json")]
        current = read_json(self._path(".json"))
        return nums + ([current.get("attempt", 1)] if current else [])  # a record of the earlier code: attempt 1

    def _archive(self, rec):
        """Move the finished attempt (weights, record, history) to `models/attempts/`; return its new name."""
        n = rec.get("attempt", 1)
        dest = self.models / "attempts"
        dest.mkdir(parents=True, exist_ok=True)
        kept = f"{self.phase}.attempt{n}"
        shutil.move(self._path(".pth"), dest / f"{kept}.pth")  # moved, not copied and deleted: nothing in Drive's trash
        shutil.move(self._path(".json"), dest / f"{kept}.json")
        if "attempt" not in rec:  # a record of the earlier code
            write_json(dest / f"{kept}.json", {**rec, "attempt": n})
        if self.history.exists():
            (self.history.parent / "attempts").mkdir(exist_ok=True)
            shutil.move(self.history, self.history.parent / "attempts" / f"{kept}.csv")
        return kept

    def _load_start(self):
        """Put the phase's starting weights in the model: a finished checkpoint, or the learner's initial weights.

        Initial weights (ImageNet encoder, random decoder) are kept as `<phase>.start.pth` the first
        time, and every later attempt starts from them, in this session or another.
        """
        if self.start is not None:
            self._load(checkpoint_files(self.learn.path, self.start)[0], with_opt=False)
        else:
            kind = {k: self.plan[k] for k in ("start", "arch", "codes", "context_slices")}
            if self._path(".start.pth").exists() and read_json(self._path(".start.json")) == kind:
                self._load(self._path(".start.pth"), with_opt=False)
            else:
                if not getattr(self.learn, "at_init", False):
                    print(f"{self.phase}: no initial weights kept for this learner; it starts from the weights in "
                          "memory (re-run the learner cell first to start from fresh ones)")
                self._save(self._path(".start.pth"), with_opt=False)
                write_json(self._path(".start.json"), kind)
        self.learn.opt.clear_state()

    def _seed(self, offset=0):
        """Seed Python, NumPy and torch (fastai's `set_seed`, deterministic where torch allows) and the order of the
        training slices from the plan's seed: a phase's weights then depend on its plan and starting weights only,
        not on what ran before it in the session (lr_find, another phase). A resume seeds `offset` on."""
        seed = self.plan.get("seed")
        if seed is not None:
            set_seed(int(seed) + offset, reproducible=True)
            self.learn.dls.train.rng = random.Random(int(seed) + offset)

    # --- fastai events ---
    def before_fit(self):
        if self.params is not None:
            check_held(self.learn, self.params)
        require_mounted(self.learn.path)
        self.models.mkdir(parents=True, exist_ok=True)
        self.plan, self.skipped, self.skip_to, self.rows = self._plan(), False, 0, []
        self._last_slot, self._last_copy = None, time.time()
        self._drop_resume()  # one an interrupted fit left
        done = read_json(self._path(".json")) if self._path(".pth").exists() else None
        progress = read_json(self._progress(".json")) if self._progress(".pth").exists() else None
        old, interrupted = _plan_of(done, self.plan), _plan_of(progress, self.plan)
        force = self.force and not _force_used(self.models, done, self.phase)
        if not self.force:
            clear_force(self.learn.path)
        copy = None
        if self.on_drive and not (done and old == self.plan and not force) and interrupted != self.plan:
            copy = self._resume_from_drive()  # the local disk was lost with the runtime: the last copy on Drive
        if done and old == self.plan and not force:
            check_weights(self.learn.path, self.phase)
            self._load(self._path(".pth"), with_opt=False)
            self.skipped, self.learn.at_init = True, False
            print(f"{self.phase}: already trained with this plan (attempt {done.get('attempt', 1)}), loaded "
                  f"models/{self.phase}.pth{_scores(done.get('final', {}), done.get('plan'))}; " +
                  (f"force=True has retrained it once already ({done.get('finished')}); to train it yet again, run "
                   "this cell once with force=False, then force=True" if self.force else "force=True trains it again"))
            raise CancelFitException()
        self.forced = force
        if progress and interrupted == self.plan or copy:  # (force retrains a finished phase, never an interrupted one)
            if copy is None:
                self._load(self._progress(".pth"), with_opt=True)
            else:
                progress, self._last_slot = copy[2], copy[1]  # the next copy goes over the other slot
                self._load(self._slot(copy[1], ".pth"), with_opt=True)
            self.attempt, self.skip_to = progress.get("attempt", 1), progress["epoch"] + 1
            rows = _read_rows(self.history)
            self.rows = [r for r in (progress.get("rows") or rows) if int(r["epoch"]) < self.skip_to]
            self.learn.add_cb(_Resume(self.skip_to, self))
            self._seed(self.skip_to)
            print(f"{self.phase}: resuming after epoch {self.skip_to} of {self.plan['epochs']}"
                  + ("" if copy is None else _lost(copy, len(rows), self.skip_to)))
        else:
            if progress:
                print(f"{self.phase}: the interrupted run had another plan ({_diff(interrupted, self.plan)}); it is discarded")
            if self.on_drive and not progress and not self.force:
                lost = len(_read_rows(self.history))
                if lost and not done:
                    print(f"{self.phase}: {lost} epoch(s) of an earlier run were trained on a lost runtime with no usable "
                          "copy of this plan on Drive (one is made every drive_minutes); the phase starts over")
            self._drop_progress()
            self.attempt = max([0, *self._attempt_numbers()]) + 1
            why = ""
            if done:
                change = ("force=True (once: a later fit with it loads this attempt)" if old == self.plan
                          else f"plan changed: {_diff(old, self.plan)}")
                kept = self._archive(done)
                why = f"{change}; attempt {kept.rsplit('attempt', 1)[1]} kept as models/attempts/{kept}.pth; "
            if self.on_drive and self.history.exists():
                write_in_place(self.history, "")  # emptied, not deleted: nothing in Drive's trash
            else:
                self.history.unlink(missing_ok=True)
            self._load_start()
            self._seed()
            print(f"{self.phase}: {why}training attempt {self.attempt} from {self.plan['start']}")
        self.t0 = time.time()

    def after_epoch(self):
        if self.epoch < self.skip_to:
            return
        rec = self.learn.recorder  # the history first: a resume keeps the rows of the epochs it skips
        self.rows.append({k: _plain(v) for k, v in zip(rec.metric_names, rec.log)})
        self.history.parent.mkdir(exist_ok=True)
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, list(rec.metric_names))
        w.writeheader()
        w.writerows(self.rows)
        if self.on_drive:  # a few hundred bytes, rewritten in place: it also tells a resume what a lost runtime did
            write_in_place(self.history, text.getvalue())
        else:
            write_text(self.history, text.getvalue())
        self._save(self._progress(".pth"), with_opt=True)
        write_json(self._progress(".json"), {"plan": self.plan, "attempt": self.attempt, "epoch": self.epoch})
        last = self.epoch == self.n_epoch - 1  # the phase's own checkpoint follows at once
        if self.on_drive and not last and time.time() - self._last_copy >= 60 * self.drive_minutes:
            self._copy_to_drive()

    def after_fit(self):
        self._drop_resume()
        if self.skipped:
            return
        self.learn.at_init = False
        self._save(self._path(".pth"), with_opt=False)
        last = self.rows[-1] if self.rows else {}
        final = {k: float(v) for k, v in last.items() if k not in ("epoch", "time") and v not in ("", None)}
        rec = {"name": self.phase, "attempt": self.attempt, "plan": {**self.plan, "bs_used": int(self.learn.dls.train.bs)},
               "final": final,
               "sha256": weights_sha256(self._path(".pth")), "file_size": self._path(".pth").stat().st_size,
               "epochs_trained": len(self.rows), "seconds": round(time.time() - self.t0, 1),
               "trained_on": getattr(self.learn.dls, "trained_on", None),  # the scan: path, shape, sampled-bytes hash
               "forced_at": time.time() if self.forced else None,  # trained under force=True: `_force_used`
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json(self._path(".json"), rec)
        self._drop_progress()
        print(f"{self.phase}: saved models/{self.phase}.pth (attempt {self.attempt}) after {rec['seconds']:.0f}s"
              f"{_scores(final, self.plan)}")


def _force_used(models, done, phase):
    """True when force=True has already retrained finished phase `done` (its record) since force was set: the time it
    was set is kept in `models/force.json` (run_pipeline.py --force: the environment's `params.FORCE_SINCE`, kept
    until the run completes), so a re-run, a resume after a disconnect or a new runtime does not train it again."""
    since = os.environ.get(FORCE_SINCE)
    if since is None:
        since = (read_json(models / "force.json") or {}).get("since")
        if since is None:
            since = time.time()
            write_json(models / "force.json", {"since": since, "phase": phase})
    return bool(done and (done.get("forced_at") or 0) >= float(since))


def clear_force(work_dir):
    """Forget when force=True was set (a fit with force=False calls it): the next force=True retrains every phase once."""
    (Path(work_dir) / "models" / "force.json").unlink(missing_ok=True)


class _Resume(SkipToEpoch):
    """fastai's `start_epoch` for a resumed phase: the epochs already trained are skipped (after the progress bar has
    counted them, hence a callback of its own, later than `PhaseCheckpoint`). Inert once its phase's fit has ended,
    even when an interrupt left it on the learner."""
    def __init__(self, epoch, phase):
        super().__init__(epoch)
        self.phase = phase

    def before_epoch(self):
        if self.phase in self.learn.cbs:
            super().before_epoch()


def _lost(copy, trained, skip_to):
    """What a runtime loss cost, for the resume message: `trained` epochs in the history on Drive, `skip_to` in the copy."""
    msg = f", from the copy on Drive saved {copy[2].get('saved')} (models/resume.{copy[1]}.pth); the local checkpoint was lost with the runtime"
    if trained > skip_to:
        msg += (f"; epoch(s) {skip_to + 1}-{trained} trained on it after that copy are lost and trained again "
                "(a smaller drive_minutes copies more often)")
    return msg


def _plain(v):
    v = getattr(v, "value", v)
    return v.item() if hasattr(v, "item") else v


def _scores(final, plan=None):
    """The last epoch's scores in words: the fossil classes' mean IoU, each class's IoU and the published metric, on
    the block they were measured on."""
    keys = [k for k in final if k == "mean_iou_fossils" or k.startswith("iou_")] + ["acc_nonbg"]
    shown = ", ".join(f"{k} {final[k]:.3f}" for k in keys if isinstance(final.get(k), (int, float)))
    return f"; {validated_on(plan or {})} at this stage's size: {shown}" if shown else ""


def _read_rows(path):
    if not Path(path).exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
