"""Two processes through Accelerate make the run of one process with the same global batch: the
same metrics records (same examples, in the same order, metrics summed over both processes) to a
named float tolerance, one metrics file and one checkpoint, and a resume that is still exact.

The test launches this file itself as the worker of ``accelerate launch --num_processes 2 --cpu``
(``python tests/test_accelerate.py <out>``): each process runs ``python -m upo_ref.reproduce
--preset synthetic --smoke`` and a short preference run straight through, then interrupted and
resumed; the test process runs the same in one process and compares."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from upo_ref import reproduce
from upo_ref.lm.config import PhaseConfig
from upo_ref.lm.experiment import prepare_data
from upo_ref.lm.models import build_model
from upo_ref.lm.presets import get_preset
from upo_ref.lm.runfiles import LOCK
from upo_ref.lm.train import (
    CHECKPOINT,
    FINAL_EVAL,
    METRICS,
    PreferencePhase,
    read_metrics,
    reference_logps,
    train,
)
from upo_ref.losses import PreferenceLoss

# Metrics of two processes against one: the gradient and metric sums are added in another order.
# Measured: at most 6e-7 relative (reproduce --smoke, float32).
DP_RTOL = 1e-5
CPU = torch.device("cpu")
PHASE = PhaseConfig(
    n_examples=96,
    batch_size=16,  # 8 per process
    microbatch_size=4,  # 2 microbatches per process and step: accumulation under DDP
    eval_every=32,
    lr=1e-3,
    optimizer="adamw",
    warmup_steps=2,
    eval_batch_size=64,
)
INTERRUPT_AT_CALL = (
    11  # the loss's 11th training call on each process is in step 6 (examples 80..96)
)
REPRODUCE_ARGS = ["--preset", "synthetic", "--smoke", "--no-progress", "--fresh", "--threads", "1"]
RUNS = ("dpo_beta0.1", "ipo_beta0.1", "js-iupo_beta0.1")


class Interrupted(Exception):
    pass


class InterruptOnCall:
    """``loss_fn`` until its n-th call with gradients on, which raises :class:`Interrupted`."""

    def __init__(self, loss_fn, n):
        self.loss_fn, self.n, self.calls = loss_fn, n, 0

    def __call__(self, *args):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.n:
                raise Interrupted
        return self.loss_fn(*args)


def preference_runs(out: Path) -> None:
    """A JS-IUPO run straight through (``out/straight``) and one interrupted and resumed
    (``out/resumed``), on the synthetic task, from the same random-init model."""
    cfg = get_preset("synthetic")
    cfg = dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, n_train_pairs=96, n_eval_pairs=64)
    )
    data = prepare_data(cfg)
    model = build_model(cfg.model, data.vocab_size, cfg.data.max_length, data.pad_id)
    reference = {
        split: reference_logps(model, pairs, 64, data.pad_id, CPU)
        for split, pairs in (("train", data.pref_train), ("eval", data.pref_eval))
    }
    loss = PreferenceLoss("iupo", "jensen_shannon")

    def run(folder, loss_fn):
        phase = PreferencePhase(loss_fn, 0.1, reference, data.pad_id, divergence=loss.divergence)
        policy = build_model(cfg.model, data.vocab_size, cfg.data.max_length, data.pad_id)
        policy.load_state_dict(model.state_dict())
        train(
            policy, phase, data.pref_train, data.pref_eval, PHASE, out / folder, CPU, progress=False
        )

    run("straight", loss)
    try:
        run("resumed", InterruptOnCall(loss, INTERRUPT_AT_CALL))
    except Interrupted:
        pass
    run("resumed", loss)


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    reproduce.main([*REPRODUCE_ARGS, "--out", str(out / "reproduce")])
    preference_runs(out)


def without_time(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def assert_same_records(one: list[dict], two: list[dict]) -> None:
    assert len(one) == len(two)
    for a, b in zip(without_time(one), without_time(two), strict=True):
        assert a.keys() == b.keys()
        assert (a["split"], a["examples_seen"], a["step"]) == (
            b["split"],
            b["examples_seen"],
            b["step"],
        )
        for key, value in a.items():
            if key != "split":
                assert abs(b[key] - value) <= DP_RTOL * max(1.0, abs(value)), (
                    a["split"],
                    a["step"],
                    key,
                )


def test_two_processes_make_the_run_of_one(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--cpu",
        __file__,
        str(tmp_path / "two"),
    ]
    launched = subprocess.Popen(
        launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    try:
        reproduce.main([*REPRODUCE_ARGS, "--out", str(one / "reproduce")])
        preference_runs(one)
    finally:
        torch.set_num_threads(threads)
    output, _ = launched.communicate(timeout=600)
    assert launched.returncode == 0, output[-4000:]

    for run in RUNS:
        assert_same_records(
            read_metrics(one / "reproduce" / run / METRICS),
            read_metrics(tmp_path / "two" / "reproduce" / run / METRICS),
        )
    summary_one = json.loads((one / "reproduce" / "results" / "summary.json").read_text())
    summary_two = json.loads(
        (tmp_path / "two" / "reproduce" / "results" / "summary.json").read_text()
    )
    assert summary_one.keys() == summary_two.keys()
    straight, resumed = (
        read_metrics(tmp_path / "two" / f / METRICS) for f in ("straight", "resumed")
    )
    assert_same_records(read_metrics(one / "straight" / METRICS), straight)
    assert without_time(straight) == without_time(resumed)  # exact, as in one process
    assert [r["examples_seen"] for r in straight if r["split"] == "eval"] == [0, 32, 64, 96]
    ckpt = torch.load(tmp_path / "two" / "resumed" / CHECKPOINT, weights_only=False)
    assert ckpt["examples_seen"] == PHASE.n_examples
    # the finished run's files, each written by the main process only (no per-process copies)
    assert sorted(p.name for p in (tmp_path / "two" / "resumed").iterdir()) == sorted(
        [CHECKPOINT, FINAL_EVAL, LOCK, METRICS]
    )


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
