"""Faults around a run folder: a second run on it, a crash mid-write, damaged or missing files, a
full disk, other data under the same config, an eval set that is not its reference's, half-precision
weights. Each gets a clear error naming the file and the fix, or is repaired with a warning, and
nothing that was on disk before the failure is lost."""

from __future__ import annotations

import copy
import errno
import json
import pickle
import subprocess
import sys

import pytest
import torch
from test_train import CPU, FailOnCall, Interrupted, small_phase, synthetic, without_time

from upo_ref.lm import runfiles
from upo_ref.lm.runfiles import LOCK, RunLockedError, identity_differences, run_lock
from upo_ref.lm.tokenize import fingerprint
from upo_ref.lm.train import (
    CHECKPOINT,
    METRICS,
    PreferencePhase,
    ReferenceLogps,
    RunFolderError,
    SFTPhase,
    evaluate,
    read_metrics,
    train,
)
from upo_ref.losses import PreferenceLoss

__all__ = ["synthetic"]  # the fixture, shared with test_train


def run(synthetic, out, loss_fn=None, model=None, train_set=None, eval_set=None, **phase):
    """One short IPO run of the synthetic task in ``out`` (96 examples, evaluations every 32)."""
    cfg, data, new_model, reference = synthetic
    loss_fn = loss_fn or PreferenceLoss("ipo")
    model = model or new_model()
    train(
        model,
        PreferencePhase(loss_fn, 0.1, reference, data.pad_id),
        data.pref_train if train_set is None else train_set,
        data.pref_eval if eval_set is None else eval_set,
        small_phase(**phase),
        out,
        CPU,
        progress=False,
    )
    return model


def interrupted(synthetic, out):
    """A run killed in its 6th step: checkpoint at 64 examples, metrics up to 80."""
    with pytest.raises(Interrupted):
        run(synthetic, out, FailOnCall(PreferenceLoss("ipo"), 6, Interrupted))


def test_a_second_run_on_a_folder_refuses_naming_the_holder(synthetic, tmp_path):
    with run_lock(tmp_path):
        holder = json.loads((tmp_path / LOCK).read_text())
        with pytest.raises(
            RunLockedError, match=rf"in use by another run: .*\"pid\": {holder['pid']}"
        ):
            run(synthetic, tmp_path)
    assert not (tmp_path / METRICS).exists()  # the refused run wrote nothing
    run(synthetic, tmp_path)  # released: the folder is usable again
    with run_lock(tmp_path):  # and train() released it when it returned
        pass


def test_a_run_in_another_process_holds_the_folder_until_it_exits(synthetic, tmp_path):
    """The real case: two commands on one folder. The second refuses, naming the first's pid; once
    the first is killed (-9: no clean-up of its own), the folder is free."""
    code = (
        "import sys, time; from upo_ref.lm.runfiles import run_lock\n"
        "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(RunLockedError, match=rf'"pid": {holder.pid}, "host": '):
            run(synthetic, tmp_path, n_examples=32)
    finally:
        holder.kill()
        holder.wait()
    run(synthetic, tmp_path, n_examples=32)


def test_a_partial_last_record_is_dropped_with_a_warning_and_resume_stays_exact(
    synthetic, tmp_path, capsys
):
    straight = run(synthetic, tmp_path / "a")
    interrupted(synthetic, tmp_path / "b")
    with open(tmp_path / "b" / METRICS, "a", encoding="utf-8") as fh:
        fh.write('{"split": "train", "examples_seen": 96, "lo')  # a crash mid-write
    resumed = run(synthetic, tmp_path / "b")
    assert "dropped a partial last record" in capsys.readouterr().err
    a, b = read_metrics(tmp_path / "a" / METRICS), read_metrics(tmp_path / "b" / METRICS)
    assert without_time(a) == without_time(b)
    for p, q in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(p, q)


def test_an_unreadable_record_before_the_last_is_an_error_naming_file_line_and_fix(
    synthetic, tmp_path
):
    interrupted(synthetic, tmp_path)
    path = tmp_path / METRICS
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = "garbage\n"
    path.write_text("".join(lines))
    with pytest.raises(RunFolderError, match=rf"{METRICS}:2: not a metrics record.*--fresh-run"):
        run(synthetic, tmp_path)
    assert path.read_text() == "".join(lines)  # left as it was, for the user to look at


def test_missing_metrics_and_missing_checkpoint_are_errors_not_silent_restarts(synthetic, tmp_path):
    interrupted(synthetic, tmp_path / "a")
    (tmp_path / "a" / METRICS).unlink()
    with pytest.raises(RunFolderError, match=r"no metrics file beside it.*--fresh-run a`"):
        run(synthetic, tmp_path / "a")
    interrupted(synthetic, tmp_path / "b")
    before = (tmp_path / "b" / METRICS).read_text()
    (tmp_path / "b" / CHECKPOINT).unlink()
    with pytest.raises(RunFolderError, match=r"records training up to examples_seen 80 but"):
        run(synthetic, tmp_path / "b")
    assert (tmp_path / "b" / METRICS).read_text() == before


def test_a_truncated_checkpoint_is_an_error_naming_it_and_the_fix(synthetic, tmp_path):
    interrupted(synthetic, tmp_path)
    path = tmp_path / CHECKPOINT
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(
        RunFolderError, match=rf"{CHECKPOINT} cannot be read .*damaged.*--fresh-run"
    ):
        run(synthetic, tmp_path)


def test_a_full_disk_keeps_the_previous_checkpoint_and_leaves_no_temporary_file(
    synthetic, tmp_path, monkeypatch
):
    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(state, path):
        calls.append(path)
        if len(calls) < 3:
            return real_save(state, path)
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runfiles.torch, "save", save_until_the_disk_is_full)
    with pytest.raises(OSError, match=r"No space left.*the previous checkpoint .* is intact"):
        run(synthetic, tmp_path)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint.tmp").exists()
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert state["examples_seen"] == 32  # the checkpoint of the evaluation at 32 survived
    run(synthetic, tmp_path)  # and resumes
    evals = [r["examples_seen"] for r in read_metrics(tmp_path / METRICS) if r["split"] == "eval"]
    assert evals == [0, 32, 64, 96]


def test_other_data_under_the_same_config_does_not_resume(synthetic, tmp_path):
    cfg, data, new_model, reference = synthetic

    def sft(train_set):
        phase_cfg, model = small_phase(n_examples=32), new_model()
        train(
            model,
            SFTPhase(data.pad_id),
            train_set,
            data.sft_eval,
            phase_cfg,
            tmp_path,
            CPU,
            progress=False,
        )

    sft(data.sft_train)
    with pytest.raises(RunFolderError, match=r"what differs .*: data[.]train: [0-9a-f]+ -> "):
        sft(data.sft_train[1:] + data.sft_train[:1])  # same examples, another order


def test_the_eval_set_must_be_the_one_of_its_reference_log_probs(synthetic, tmp_path):
    cfg, data, new_model, reference = synthetic
    swapped = data.pref_eval[1:] + data.pref_eval[:1]
    with pytest.raises(ValueError, match=r"eval set is not the one its reference log-probs were"):
        run(synthetic, tmp_path, eval_set=swapped)
    with pytest.raises(ValueError, match=r"eval set has 10 pairs but .* computed for 256"):
        run(synthetic, tmp_path, eval_set=data.pref_eval[:10])
    phase = PreferencePhase(PreferenceLoss("ipo"), 0.1, reference, data.pad_id)
    with pytest.raises(ValueError, match=r"eval set is not the one"):
        evaluate(new_model(), phase, swapped, 64, CPU)
    at_step_0 = evaluate(new_model(), phase, data.pref_eval, 64, CPU)
    assert at_step_0["rewards/margins"] == 0.0  # pi = pi_ref, scored against its own reference


def test_reference_log_probs_keep_their_fingerprint_through_copy_and_pickle(synthetic):
    cfg, data, new_model, reference = synthetic
    ref = reference["eval"]
    for twin in (copy.deepcopy(ref), pickle.loads(pickle.dumps(ref))):
        assert type(twin) is ReferenceLogps and twin.pairs == ref.pairs == fingerprint(
            data.pref_eval
        )
        assert all(torch.equal(a, b) for a, b in zip(twin, ref, strict=True))


def test_half_precision_weights_are_refused(synthetic, tmp_path):
    cfg, data, new_model, reference = synthetic
    with pytest.raises(ValueError, match=r"weights are \['torch.bfloat16'\]; .*needs float32"):
        run(synthetic, tmp_path, model=new_model().to(torch.bfloat16))


def test_identity_differences_name_the_leaves_that_differ():
    old = {"cfg": {"lr": 1e-3, "seed": 0}, "loss": "IPO"}
    new = {"cfg": {"lr": 2e-3, "seed": 0}, "loss": "IPO", "data": {"train": "ab"}}
    assert identity_differences(old, new) == [
        "cfg.lr: 0.001 -> 0.002",
        "data: (absent) -> {'train': 'ab'}",
    ]
