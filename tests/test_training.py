"""PhaseCheckpoint: a phase resumes after a disconnect, skips when finished, and trains again from its starting weights
when its plan changes, keeping the earlier attempt."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from fastai.callback.core import Callback

from microfossil.learner import build_learner
from microfossil.loaders import make_dls
from microfossil.split import split_volume
from microfossil.plots import attempts
from microfossil.training import PhaseCheckpoint, load_stage, phase_done, read_record, set_seed, weights_sha256


class _Disconnect(Callback):
    """Simulates a Colab disconnect right after epoch `at` was checkpointed."""
    order = 90

    def __init__(self, at): self.at = at

    def after_epoch(self):
        if self.epoch == self.at:
            raise KeyboardInterrupt("simulated disconnect")


class _Watch(Callback):
    """Records the epochs trained and the model's weights when training starts."""
    order = 90

    def __init__(self): self.trained, self.start = [], None

    def before_train(self):
        if not self.trained:
            self.start = {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}
        self.trained.append(self.epoch)


def _learner(vol, work, frac=0.25):
    return build_learner(make_dls(vol, frac, bs=2, device=torch.device("cpu")), pretrained=False, work_dir=work)


def _same_weights(a, b):
    return all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a if not k.endswith("num_batches_tracked"))


def _history(work, name):
    with open(work / "history" / f"{name}.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_phase_resumes_after_a_disconnect_then_skips(odd_vol, tmp_path, capsys):
    learn = _learner(odd_vol, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        learn.fit_one_cycle(3, 1e-3, pct_start=0.5, cbs=[PhaseCheckpoint("t_frozen"), _Disconnect(at=1)])
    models = tmp_path / "models"
    assert json.loads((models / "t_frozen.progress.json").read_text())["epoch"] == 1
    assert not phase_done(tmp_path, "t_frozen")

    learn2 = _learner(odd_vol, tmp_path)  # a fresh session: new learner, same cell
    watch = _Watch()
    learn2.fit_one_cycle(3, 1e-3, pct_start=0.5, cbs=[PhaseCheckpoint("t_frozen"), watch])
    assert watch.trained == [2] and "resuming after epoch 2 of 3" in capsys.readouterr().out
    assert phase_done(tmp_path, "t_frozen") and not (models / "t_frozen.progress.pth").exists()
    rec = read_record(tmp_path, "t_frozen")
    assert rec["epochs"] == 3 and rec["lr"] == 0.001 and rec["attempt"] == 1 and 0 <= rec["final"]["iou_background"] <= 1
    assert "mean_iou_fossils" in rec["final"] and "mean_iou" not in rec["final"]  # no mean with the background in it
    assert rec["trained_on"]["shape"] == list(odd_vol.shape) and rec["trained_on"]["sampled_sha256"]
    rows = _history(tmp_path, "t_frozen")  # one header, one row per epoch: the resume appended no skipped epoch
    assert [r["epoch"] for r in rows] == ["0", "1", "2"] and all(r["mean_iou_fossils"] for r in rows)

    watch = _Watch()  # finished, same plan: nothing is trained, the saved weights are loaded
    learn2.fit_one_cycle(3, 1e-3, pct_start=0.5, cbs=[PhaseCheckpoint("t_frozen"), watch])
    assert watch.trained == [] and "already trained with this plan" in capsys.readouterr().out


def test_changed_plan_retrains_from_the_phase_start_and_keeps_the_attempt(odd_vol, tmp_path, capsys):
    learn = _learner(odd_vol, tmp_path)
    init = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    learn.fit_one_cycle(1, 1e-3, pct_start=0.9, cbs=PhaseCheckpoint("t_frozen"))
    learn.unfreeze()
    learn.fit_one_cycle(1, slice(1e-5, 1e-3), cbs=PhaseCheckpoint("t_unfrozen", start="t_frozen"))
    first = torch.load(tmp_path / "models" / "t_frozen.pth")
    capsys.readouterr()

    learn.freeze()  # the user changes lr_frozen and re-runs the phase-1 cell, in the same session
    watch = _Watch()
    learn.fit_one_cycle(1, 2e-3, pct_start=0.9, cbs=[PhaseCheckpoint("t_frozen"), watch])
    out = capsys.readouterr().out
    assert "plan changed: lr 0.001 -> 0.002" in out and "attempt 1 kept as models/attempts/t_frozen.attempt1.pth" in out
    assert _same_weights(watch.start, init)  # retrained from the weights the phase started from, not the trained ones
    assert read_record(tmp_path, "t_frozen")["lr"] == 0.002 and read_record(tmp_path, "t_frozen")["attempt"] == 2
    kept = tmp_path / "models" / "attempts" / "t_frozen.attempt1"
    assert _same_weights(torch.load(f"{kept}.pth"), first) and json.loads(open(f"{kept}.json").read())["plan"]["lr"] == 0.001
    assert (tmp_path / "history" / "attempts" / "t_frozen.attempt1.csv").exists()

    learn.unfreeze()  # phase 2, unchanged, now starts from another phase 1: trained again
    watch = _Watch()
    learn.fit_one_cycle(1, slice(1e-5, 1e-3), cbs=[PhaseCheckpoint("t_unfrozen", start="t_frozen"), watch])
    assert "start t_frozen.attempt1 -> t_frozen.attempt2" in capsys.readouterr().out
    assert _same_weights(watch.start, torch.load(tmp_path / "models" / "t_frozen.pth"))
    table = attempts(tmp_path, ["t_frozen", "t_unfrozen"])
    assert table[["phase", "attempt", "latest"]].values.tolist() == [
        ["t_frozen", 1, False], ["t_frozen", 2, True], ["t_unfrozen", 1, False], ["t_unfrozen", 2, True]]
    assert table["lr"].tolist()[:2] == [0.001, 0.002] and table["lr"].tolist()[3] == [1e-05, 0.001]
    valid = split_volume(odd_vol).plan()["valid_slices"]  # every attempt's scores are on the validation block
    assert (table["scores on"] == f"validation block {valid[0]}-{valid[1]}").all() and "mean_iou" not in table
    assert "mean_iou_fossils" in table
    assert "bs" not in table and "frozen" not in table  # the same in every attempt: not shown


def test_a_retrain_in_a_new_session_starts_from_the_same_initial_weights(odd_vol, tmp_path, capsys):
    learn = _learner(odd_vol, tmp_path)
    init = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("t_frozen"))
    assert "no initial weights kept" not in capsys.readouterr().out  # a fresh learner's weights are its start
    torch.manual_seed(1234)  # a new session, unseeded (or with another seed): the decoder gets other random weights
    learn2 = _learner(odd_vol, tmp_path)
    assert not _same_weights(learn2.model.state_dict(), init)
    watch = _Watch()
    learn2.fit_one_cycle(1, 2e-3, cbs=[PhaseCheckpoint("t_frozen"), watch])
    assert _same_weights(watch.start, init)


def test_an_interrupt_during_a_resumed_fit_does_not_skip_epochs_of_later_fits(odd_vol, tmp_path):
    learn = _learner(odd_vol, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        learn.fit_one_cycle(3, 1e-3, cbs=[PhaseCheckpoint("t_frozen"), _Disconnect(at=0)])
    with pytest.raises(KeyboardInterrupt):  # resumed (epoch 0 skipped), then interrupted again
        learn.fit_one_cycle(3, 1e-3, cbs=[PhaseCheckpoint("t_frozen"), _Disconnect(at=1)])
    watch = _Watch()
    learn.fit_one_cycle(2, 1e-3, cbs=watch)  # any other fit: every epoch trains
    assert watch.trained == [0, 1]


def test_a_phase_trained_by_the_earlier_code_is_kept_as_attempt_1(odd_vol, tmp_path, capsys):
    """Run folders of the earlier `train_phase` have a flat record with fewer keys and no attempt number."""
    learn = _learner(odd_vol, tmp_path)
    learn.fit_one_cycle(1, 1e-3, pct_start=0.25, cbs=PhaseCheckpoint("t_frozen"))
    rec = read_record(tmp_path, "t_frozen")
    flat = {k: rec[k] for k in ("epochs", "lr", "pct_start", "size", "wd", "context_slices", "triplanar", "arch",
                                "codes")}
    (tmp_path / "models" / "t_frozen.json").write_text(json.dumps({**flat, "name": "t_frozen", "final": rec["final"]}))
    watch = _Watch()
    learn.fit_one_cycle(1, 1e-3, pct_start=0.25, cbs=[PhaseCheckpoint("t_frozen"), watch])
    assert watch.trained == [] and "already trained" in capsys.readouterr().out
    learn.fit_one_cycle(1, 2e-3, pct_start=0.25, cbs=PhaseCheckpoint("t_frozen"))
    assert "attempt 1 kept as models/attempts/t_frozen.attempt1.pth" in capsys.readouterr().out
    assert read_record(tmp_path, "t_frozen")["attempt"] == 2 and read_record(tmp_path, "t_frozen.attempt1")["lr"] == 0.001
    assert attempts(tmp_path, ["t_frozen"])["attempt"].tolist() == [1, 2]


def test_force_retrains_an_unchanged_plan(odd_vol, tmp_path, capsys):
    learn = _learner(odd_vol, tmp_path)
    learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("t_frozen"))
    watch = _Watch()
    learn.fit_one_cycle(1, 1e-3, cbs=[PhaseCheckpoint("t_frozen", force=True), watch])
    assert watch.trained == [0] and "force=True" in capsys.readouterr().out
    assert phase_done(tmp_path, "t_frozen.attempt1") and read_record(tmp_path, "t_frozen")["attempt"] == 2


def test_force_applies_once_and_never_instead_of_a_resume(odd_vol, tmp_path, capsys, monkeypatch):
    """force=True trains a finished phase once: the same cell run again (or in a new session) loads that attempt; run
    once with force=False, force=True trains it once more. An interrupted phase resumes even with force=True. Under
    run_pipeline --force the time the run began comes from the environment: a phase trained since is loaded."""
    learn = _learner(odd_vol, tmp_path)
    learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("t_frozen"))
    for expect_trained, force in ((True, True), (False, True), (False, False), (True, True)):
        watch = _Watch()
        learn.fit_one_cycle(1, 1e-3, cbs=[PhaseCheckpoint("t_frozen", force=force), watch])
        assert bool(watch.trained) == expect_trained, (expect_trained, force)
    out = capsys.readouterr().out
    assert "force=True has retrained it once already" in out and "force=True (once" in out
    assert read_record(tmp_path, "t_frozen")["attempt"] == 3
    with pytest.raises(KeyboardInterrupt):  # a forced retrain cut short by a disconnect...
        learn.fit_one_cycle(1, 2e-3, cbs=[PhaseCheckpoint("t_frozen", params={"force": True}), _Disconnect(at=0)])
    with pytest.raises(KeyboardInterrupt):
        learn.fit_one_cycle(3, 2e-3, cbs=[PhaseCheckpoint("t_frozen", force=True), _Disconnect(at=1)])
    watch = _Watch()  # ...resumes where it stopped, force or not
    learn.fit_one_cycle(3, 2e-3, cbs=[PhaseCheckpoint("t_frozen", force=True), watch])
    assert watch.trained == [2] and "resuming after epoch 2 of 3" in capsys.readouterr().out
    monkeypatch.setenv("MICROFOSSIL_FORCE_SINCE", "0")  # a --force run begun before it: trained since, so loaded
    watch = _Watch()
    learn.fit_one_cycle(3, 2e-3, cbs=[PhaseCheckpoint("t_frozen", force=True), watch])
    assert watch.trained == []


def test_plan_is_read_off_the_fit(odd_vol, tmp_path):
    """What fastai will do is what is recorded: discriminative rates, the one-cycle shape, the frozen layers."""
    learn = _learner(odd_vol, tmp_path)
    learn.unfreeze()
    learn.fit_one_cycle(1, slice(1e-6, 1e-4), pct_start=0.3, div=10, wd=0.05, cbs=PhaseCheckpoint("t_unfrozen"))
    plan = read_record(tmp_path, "t_unfrozen")
    assert plan["lr"] == [1e-06, 0.0001] and plan["pct_start"] == 0.3 and plan["div"] == 10 and plan["wd"] == 0.05
    assert plan["frozen"] is False and plan["bs"] == 2 and plan["size"] == [35, 33] and plan["start"] == "random init"
    assert plan["moms"] == [0.95, 0.85, 0.95] and plan["codes"] == odd_vol.codes and plan["context_slices"] == 1
    assert plan["loss"] == "cross_entropy" and plan["crop_size"] is None
    assert plan["class_weights"] is None and plan["oversample_rare"] == 1.0 and plan["infill_augment"] == 0.0
    assert plan["scanner_augment"] == 0.0


def test_another_loss_or_crop_size_is_another_plan(odd_vol, tmp_path, capsys):
    """The loss, its class weights, the rare-class oversampling and the training crop are in the plan: changing any
    trains the phase again; a record written before they were recorded reads as the published recipe (cross-entropy,
    no weights, each slice once, whole slices)."""
    learn = _learner(odd_vol, tmp_path, frac=1.0)
    learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("t_frozen"))
    rec_file = tmp_path / "models" / "t_frozen.json"
    rec = json.loads(rec_file.read_text())
    for k in ("loss", "crop_size", "class_weights", "oversample_rare", "infill_augment", "scanner_augment"):
        del rec["plan"][k]
    rec_file.write_text(json.dumps(rec))  # as the earlier code wrote it
    capsys.readouterr()
    learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("t_frozen"))
    assert "already trained with this plan" in capsys.readouterr().out
    dice = build_learner(make_dls(odd_vol, 1.0, bs=2, device=torch.device("cpu"), crop_size=64), pretrained=False,
                         work_dir=tmp_path, loss="ce_dice")
    dice.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("t_frozen"))
    out = capsys.readouterr().out
    assert "loss cross_entropy -> ce_dice" in out and "crop_size None -> 64" in out
    assert read_record(tmp_path, "t_frozen")["crop_size"] == 64 and read_record(tmp_path, "t_frozen")["attempt"] == 2
    rare = build_learner(make_dls(odd_vol, 1.0, bs=2, device=torch.device("cpu"), crop_size=64, oversample_rare=3),
                         pretrained=False, work_dir=tmp_path, loss="ce_dice", class_weights="inverse_sqrt")
    rare.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("t_frozen"))
    out = capsys.readouterr().out
    assert "oversample_rare 1.0 -> 3.0" in out and "class_weights None -> [" in out
    rec = read_record(tmp_path, "t_frozen")
    assert rec["attempt"] == 3 and rec["class_weights"] == rare.class_weights and rec["oversample_rare"] == 3.0
    seen = build_learner(make_dls(odd_vol, 1.0, bs=2, device=torch.device("cpu"), crop_size=64, oversample_rare=3,
                                  scanner_augment=0.5), pretrained=False, work_dir=tmp_path, loss="ce_dice",
                         class_weights="inverse_sqrt")
    seen.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("t_frozen"))
    assert "scanner_augment 0.0 -> 0.5" in capsys.readouterr().out
    assert read_record(tmp_path, "t_frozen")["scanner_augment"] == 0.5


def test_next_stage_loads_the_latest_or_a_named_attempt(odd_vol, tmp_path, capsys):
    learn = _learner(odd_vol, tmp_path)
    learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("256_unfrozen"))
    learn.fit_one_cycle(1, 3e-3, cbs=PhaseCheckpoint("256_unfrozen"))  # a second attempt
    nxt = _learner(odd_vol, tmp_path, frac=0.5)  # the 1/4-size weights load strictly into the 1/2-size model
    load_stage(nxt, "256_unfrozen")
    assert _same_weights(nxt.model.state_dict(), torch.load(tmp_path / "models" / "256_unfrozen.pth"))
    load_stage(nxt, "256_unfrozen.attempt1")
    assert _same_weights(nxt.model.state_dict(), torch.load(tmp_path / "models" / "attempts" / "256_unfrozen.attempt1.pth"))
    assert "attempts/256_unfrozen.attempt1.pth" in capsys.readouterr().out
    watch = _Watch()
    nxt.fit_one_cycle(1, 1e-3, cbs=[PhaseCheckpoint("512_frozen", start="256_unfrozen.attempt1"), watch])
    assert read_record(tmp_path, "512_frozen")["start"] == "256_unfrozen.attempt1"


def test_load_stage_names_the_missing_checkpoint_and_a_context_mismatch(odd_vol, tmp_path):
    learn = _learner(odd_vol, tmp_path)
    with pytest.raises(FileNotFoundError, match="256_unfrozen.pth"):
        load_stage(learn, "256_unfrozen")
    learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("256_unfrozen"))
    k5 = build_learner(make_dls(odd_vol, 0.25, bs=2, context_slices=5), pretrained=False, work_dir=tmp_path)
    with pytest.raises(ValueError, match="trained with context_slices=1, this learner has context_slices=5"):
        load_stage(k5, "256_unfrozen")
    with pytest.raises(FileNotFoundError, match="not trained"):
        learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("t_unfrozen", start="t_frozen"))


def test_two_runs_of_a_phase_with_the_same_seed_give_the_same_weights(odd_vol, tmp_path):
    """In fresh folders, fresh learners, with lr_find run before one of them: the same seed gives the same weights
    (Python, NumPy and torch are seeded, and the phase seeds again when it starts training); another seed does not."""
    def run(work, seed, lr_find=False):
        set_seed(seed, reproducible=True)
        learn = build_learner(make_dls(odd_vol, 0.25, bs=2, device=torch.device("cpu"), seed=seed), pretrained=False,
                              work_dir=work)
        if lr_find:
            learn.lr_find(num_it=5, show_plot=False)
        learn.fit_one_cycle(2, 1e-3, cbs=PhaseCheckpoint("t_frozen"))
        return {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
    a, b, c = run(tmp_path / "a", 0), run(tmp_path / "b", 0, lr_find=True), run(tmp_path / "c", 1)
    assert _same_weights(a, b) and not _same_weights(a, c)
    plan = read_record(tmp_path / "a", "t_frozen")
    assert plan["seed"] == 0 and {k: plan[k] for k in split_volume(odd_vol).plan()} == split_volume(odd_vol).plan()
    assert plan["sha256"] == weights_sha256(tmp_path / "a" / "models" / "t_frozen.pth")


def test_the_next_stage_stops_on_another_split(odd_vol, tmp_path):
    learn = _learner(odd_vol, tmp_path)
    learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("256_unfrozen"))
    other = build_learner(make_dls(odd_vol, 0.5, bs=2, split=split_volume(odd_vol, 0.5, 0.0), device=torch.device("cpu")),
                          pretrained=False, work_dir=tmp_path)
    with pytest.raises(ValueError, match="test_pct, valid_pct and gap_slices of the training notebooks"):
        load_stage(other, "256_unfrozen")


_KILLABLE_PHASE = """
import os, random, signal, sys
sys.path.insert(0, {root!r})
import torch
from fastai.callback.core import Callback
from microfossil.learner import build_learner
from microfossil.loaders import make_dls
from microfossil.volume import load_volume

class Kill(Callback):  # SIGKILL in the middle of epoch `at`: no Python clean-up runs, as when Colab drops the runtime
    order = 90
    def __init__(self, at): self.at = at
    def after_batch(self):
        if self.epoch == self.at and self.iter == 1:
            os.kill(os.getpid(), signal.SIGKILL)

from microfossil.training import PhaseCheckpoint
at = int(sys.argv[1])
vol = load_volume({data!r})
learn = build_learner(make_dls(vol, 0.25, bs=2, device=torch.device("cpu"), seed=0), pretrained=False, work_dir=sys.argv[2])
learn.fit_one_cycle(4, 1e-3, pct_start=0.5, cbs=[PhaseCheckpoint("k_frozen", drive_minutes=0)] + ([Kill(at)] if at >= 0 else []))
"""


def test_a_phase_killed_at_a_random_epoch_resumes_to_the_same_history(tiny, tmp_path):
    """Fault injection with a real process: a phase SIGKILLed in the middle of a random epoch, then run again, ends with
    one history row per epoch, as an uninterrupted run does, and its plot cell (`plot_history`) draws it."""
    import random
    import signal
    import subprocess
    import sys

    from conftest import ROOT
    from microfossil.plots import plot_history
    script = tmp_path / "phase.py"
    script.write_text(_KILLABLE_PHASE.format(root=str(ROOT), data=str(tiny)))
    at = random.Random().randrange(1, 4)  # a random epoch after the first checkpoint
    run = lambda kill, work: subprocess.run([sys.executable, str(script), str(kill), str(work)],  # noqa: E731
                                            capture_output=True, text=True, timeout=300)
    whole = run(-1, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = run(at, tmp_path / "killed")
    assert killed.returncode == -signal.SIGKILL, (at, killed.returncode, killed.stderr[-2000:])
    assert not (tmp_path / "killed" / "models" / "k_frozen.pth").exists()
    again = run(-1, tmp_path / "killed")
    assert again.returncode == 0 and f"resuming after epoch {at} of 4" in again.stdout, (at, again.stdout, again.stderr[-2000:])
    rows, want = _history(tmp_path / "killed", "k_frozen"), _history(tmp_path / "whole", "k_frozen")
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in want] == ["0", "1", "2", "3"], at
    assert all(float(r["train_loss"]) > 0 and 0 <= float(r["iou_background"]) <= 1 for r in rows)
    assert read_record(tmp_path / "killed", "k_frozen")["epochs_trained"] == 4
    fig = plot_history(tmp_path / "killed", ["k_frozen"], path=tmp_path / "h.png")
    assert len(fig.axes[0].lines[0].get_xdata()) == 4 and (tmp_path / "h.png").stat().st_size > 0


# --- a run folder on Google Drive (Colab): per-epoch checkpoints local, Drive files never replaced ---

class _DriveWatch(Callback):
    """After every epoch (after PhaseCheckpoint has saved it): each file under the Drive run folder, with its inode."""
    order = 90

    def __init__(self, folder): self.folder, self.seen = folder, []

    def after_epoch(self):
        self.seen.append({str(p.relative_to(self.folder)): p.stat().st_ino for p in self.folder.rglob("*") if p.is_file()})


def _on_drive(tmp_path, monkeypatch):
    """A run folder under a fake Drive mount (`MICROFOSSIL_COLAB_ROOT`/drive); returns (run folder, local scratch)."""
    content = tmp_path / "content"
    monkeypatch.setenv("MICROFOSSIL_COLAB_ROOT", str(content))
    work = content / "drive" / "MyDrive" / "microfossil_runs" / "r"
    work.mkdir(parents=True)
    return work, content / "microfossil_local"


def test_on_drive_epochs_stay_local_and_no_drive_file_is_ever_replaced(odd_vol, tmp_path, monkeypatch, capsys):
    """Every epoch's checkpoint goes to the local disk; Drive gets resumable copies over two slots, rewritten in place
    (same files: nothing in Drive's trash), and the phase's weights at the end; no file on Drive is replaced or
    deleted during the phase, and none of its checkpoints is superseded at the end: the slots are deleted then (emptied
    in place, their earlier contents would stay in Drive's version history)."""
    work, local = _on_drive(tmp_path, monkeypatch)
    learn = _learner(odd_vol, work)
    watch = _DriveWatch(work)
    learn.fit_one_cycle(4, 1e-3, pct_start=0.5, cbs=[PhaseCheckpoint("t_frozen", drive_minutes=0), watch])
    for before, after in zip(watch.seen, watch.seen[1:]):
        assert all(after.get(name) == ino for name, ino in before.items()), (before, after)  # none replaced or gone
    assert {"models/resume.a.pth", "models/resume.b.pth"} <= set(watch.seen[1])  # a copy after epochs 1, 2 and 3
    assert not [n for seen in watch.seen for n in seen if "progress" in n or n.endswith(".partial")]
    assert list(local.rglob("t_frozen.progress.pth")) == []  # dropped at the end, as locally
    models = work / "models"
    assert sorted(p.name for p in models.iterdir()) == ["t_frozen.json", "t_frozen.pth", "t_frozen.start.json",
                                                        "t_frozen.start.pth"]
    rec = read_record(work, "t_frozen")
    assert rec["file_size"] == (models / "t_frozen.pth").stat().st_size and rec["sha256"] == weights_sha256(models / "t_frozen.pth")
    assert [r["epoch"] for r in _history(work, "t_frozen")] == ["0", "1", "2", "3"]


def test_weights_that_do_not_match_their_record_are_not_trusted(odd_vol, tmp_path, monkeypatch):
    """A phase's weights cut short (Drive still uploading them) stop the next stage and the skip, naming the file."""
    work, _ = _on_drive(tmp_path, monkeypatch)
    learn = _learner(odd_vol, work)
    learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("t_frozen"))
    weights = work / "models" / "t_frozen.pth"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    with pytest.raises(ValueError, match="Drive may still be uploading"):
        load_stage(_learner(odd_vol, work), "t_frozen")
    with pytest.raises(ValueError, match="size or SHA-256"):
        _learner(odd_vol, work).fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("t_frozen"))


def test_a_lost_runtime_resumes_from_the_last_good_copy_on_drive_and_says_what_was_lost(tiny, tmp_path, monkeypatch):
    """A real process on a Colab-like layout, SIGKILLed in epoch 4 of 4; then its local disk is wiped (a new runtime)
    and the newest copy on Drive is found cut short (not fully uploaded). The re-run resumes from the older copy,
    names the epochs lost, and ends with one history row per epoch."""
    import shutil
    import signal

    from conftest import ROOT
    work, local = _on_drive(tmp_path, monkeypatch)
    script = tmp_path / "phase.py"
    script.write_text(_KILLABLE_PHASE.format(root=str(ROOT), data=str(tiny)))  # drive_minutes=0: a copy every epoch
    run = lambda at: subprocess.run([sys.executable, str(script), str(at), str(work)], capture_output=True,  # noqa: E731
                                    text=True, timeout=300, env=os.environ)
    killed = run(3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    slots = {s: json.loads((work / "models" / f"resume.{s}.json").read_text()) for s in "ab"}
    assert sorted(r["epoch"] for r in slots.values()) == [1, 2]  # copies after epochs 2 and 3 (0-based 1, 2)
    newest = max(slots, key=lambda s: slots[s]["epoch"])
    with open(work / "models" / f"resume.{newest}.pth", "r+b") as fh:  # Drive had not received all of it
        fh.truncate(1000)
    shutil.rmtree(local)  # a fresh runtime: the local disk is empty
    again = run(-1)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resume.{newest}.pth (epoch 3" in again.stdout and "not used" in again.stdout
    assert "resuming after epoch 2 of 4, from the copy on Drive" in again.stdout, again.stdout
    assert "epoch(s) 3-3 trained on it after that copy are lost and trained again" in again.stdout
    assert [r["epoch"] for r in _history(work, "k_frozen")] == ["0", "1", "2", "3"]
    assert read_record(work, "k_frozen")["epochs_trained"] == 4


def test_a_resume_from_drive_takes_the_history_from_the_copy_when_drives_history_lags(odd_vol, tmp_path, monkeypatch,
                                                                                       capsys):
    """Drive uploads each file on its own schedule: after a lost runtime the history file there may be older than the
    resumable copy. The copy carries the rows up to its epoch, so the resumed history has one row per epoch."""
    import shutil
    work, local = _on_drive(tmp_path, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _learner(odd_vol, work).fit_one_cycle(3, 1e-3, pct_start=0.5,
                                              cbs=[PhaseCheckpoint("t_frozen", drive_minutes=0), _Disconnect(at=1)])
    history = work / "history" / "t_frozen.csv"
    lines = history.read_text().splitlines(keepends=True)
    history.write_text("".join(lines[:2]))  # Drive has the header and epoch 1 only
    shutil.rmtree(local)  # a fresh runtime
    _learner(odd_vol, work).fit_one_cycle(3, 1e-3, pct_start=0.5, cbs=PhaseCheckpoint("t_frozen", drive_minutes=0))
    assert "resuming after epoch 2 of 3, from the copy on Drive" in capsys.readouterr().out
    assert [r["epoch"] for r in _history(work, "t_frozen")] == ["0", "1", "2"]


class _FakeOOM(Callback):
    """CUDA running out of memory (on CPU): torch's error, raised on every batch larger than `limit`."""
    def __init__(self, limit):
        self.limit, self.raised = limit, 0

    def before_batch(self):
        if len(self.xb[0]) > self.limit:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")


def test_an_out_of_memory_error_halves_the_batch_and_the_phase_goes_on(odd_vol, tmp_path, capsys):
    """A CUDA out-of-memory error in a fit: the batch is halved (down to what fits) and the phase trains to its end,
    saying so; its record keeps the plan's batch size and the one used, so the same cell run again loads it."""
    from microfossil.sample import make_sample
    from microfossil.volume import load_volume
    vol = load_volume(make_sample(tmp_path / "core", n_slices=20, height=40, width=40, seed=1))
    learn = build_learner(make_dls(vol, 1.0, bs=8, device=torch.device("cpu")), pretrained=False, work_dir=tmp_path)
    assert learn.dls.train.bs == 8
    oom = _FakeOOM(limit=2)
    learn.fit_one_cycle(1, 1e-3, cbs=[PhaseCheckpoint("t_frozen"), oom])
    out = capsys.readouterr().out
    assert oom.raised == 2 and "training: CUDA out of memory at batch size 8; going on with batch size 4" in out
    assert "going on with batch size 2" in out and learn.dls.train.bs == 2 == learn.dls.valid.bs
    rec = read_record(tmp_path, "t_frozen")
    assert rec["bs"] == 8 and rec["bs_used"] == 2 and rec["epochs_trained"] == 1
    learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("t_frozen"))  # the same plan: loaded, not trained again
    assert "already trained with this plan" in capsys.readouterr().out
    with pytest.raises(torch.OutOfMemoryError):  # at batch size 1 there is nothing left to halve
        learn.fit_one_cycle(1, 1e-3, cbs=[PhaseCheckpoint("t_unfrozen"), _FakeOOM(limit=0)])


def test_bs_none_takes_the_batch_that_fits_and_the_plan_says_auto(odd_vol, tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from microfossil import runtime
    dls = make_dls(odd_vol, 0.25, bs=None, device=torch.device("cpu"))
    assert "bs=None: 4 M pixels a batch off a GPU" in capsys.readouterr().out and dls.made_with["bs"] is None
    learn = build_learner(dls, pretrained=False, work_dir=tmp_path)
    learn.fit_one_cycle(1, 1e-3, cbs=PhaseCheckpoint("t_frozen"))
    rec = read_record(tmp_path, "t_frozen")
    assert rec["bs"] == "auto" and rec["bs_used"] == dls.train.bs
    # a Colab T4 (15 GB, 14.5 free) at full size of a 1004 x 956 scan, its volume (1.9 GB) already there: bs 3;
    # at half size (the volume 0.5 GB) the recipe's 16; an H100 at full size: 16 at most
    cuda = SimpleNamespace(type="cuda")
    for free, size, bs in ((12.6e9, (1004, 956), 3), (14.0e9, (502, 478), 16), (78e9, (1004, 956), 16)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (int(free), int(16e9)))
        assert runtime.batch_size_for(size, cuda)[0] == bs
