"""Training: the synthetic task is really learnt, resume is exact, a non-finite loss stops cleanly,
one forward pass per step, the loss interface, accumulation, the schedule, and the config checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from upo_ref.bench import evals_per_run
from upo_ref.lm.config import DataConfig, ModelConfig, PhaseConfig
from upo_ref.lm.experiment import prepare_data
from upo_ref.lm.models import build_model
from upo_ref.lm.presets import get_preset
from upo_ref.lm.train import (
    CHECKPOINT,
    NonFiniteLossError,
    PreferencePhase,
    RunFolderError,
    SFTPhase,
    example_indices,
    read_metrics,
    reference_logps,
    train,
)
from upo_ref.losses import PreferenceLoss, ipo_loss

MIN_HELD_OUT_ACCURACY = (
    0.9  # the bar; each of 12 seeds tried reaches >= 0.95 (see upo_ref.lm.synthetic)
)
CPU = torch.device("cpu")
replace = dataclasses.replace


@pytest.fixture(scope="module")
def synthetic():
    """The synthetic preset's data, a builder of its initial model, pi_ref's log-probs (once)."""
    cfg = get_preset("synthetic")
    data = prepare_data(cfg)

    def new_model(**overrides):
        return build_model(
            replace(cfg.model, **overrides), data.vocab_size, cfg.data.max_length, data.pad_id
        )

    ref_model = new_model()
    reference = {
        split: reference_logps(ref_model, pairs, cfg.pref.eval_batch_size, data.pad_id, CPU)
        for split, pairs in (("train", data.pref_train), ("eval", data.pref_eval))
    }
    return cfg, data, new_model, reference


def small_phase(**overrides) -> PhaseConfig:
    base = dict(
        n_examples=96,
        batch_size=16,
        eval_every=32,
        lr=1e-3,
        optimizer="adamw",
        warmup_steps=2,
        eval_batch_size=256,
    )
    return PhaseConfig(**{**base, **overrides})


def without_time(records):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


# ------------------------------------------------------------------------------------------------
# The learning check
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, divergence",
    [("dpo", None), ("ipo", None), ("iupo", "jensen_shannon")],
    ids=["DPO", "IPO", "JS-IUPO"],
)
def test_synthetic_task_is_learnt(synthetic, tmp_path, name, divergence):
    cfg, data, new_model, reference = synthetic
    phase = PreferencePhase(PreferenceLoss(name, divergence), cfg.betas[0], reference, data.pad_id)
    final = train(
        new_model(), phase, data.pref_train, data.pref_eval, cfg.pref, tmp_path, CPU, progress=False
    )
    evals = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "eval"]
    # Step 0: pi = pi_ref, evaluated in the same batches as pi_ref's log-probs, so every margin is
    # exactly 0: every pair is a tie, and a tie counts half (metrics.preference_metrics).
    assert evals[0]["examples_seen"] == 0
    assert evals[0]["rewards/margins"] == 0.0 and evals[0]["rewards/accuracies"] == 0.5
    assert final["rewards/accuracies"] >= MIN_HELD_OUT_ACCURACY
    assert final["rewards/margins"] > 0
    assert [r["examples_seen"] for r in evals] == [0, 384, 768, 1152, 1536]


def test_sft_learns_the_chosen_responses(synthetic, tmp_path):
    """SFT on the chosen responses: per-token NLL from about log(13) (uniform over the vocabulary)
    to below log(8) * 6/7 (uniform over the 8 content tokens, EOS free), i.e. it learns the liked
    tokens."""
    cfg, data, new_model, _ = synthetic
    phase_cfg = small_phase(n_examples=1024, eval_every=1024, lr=3e-3)
    final = train(
        new_model(),
        SFTPhase(data.pad_id),
        data.sft_train,
        data.sft_eval,
        phase_cfg,
        tmp_path,
        CPU,
        progress=False,
    )
    first = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert first["nll_per_token"] > 2.4
    assert final["nll_per_token"] < math.log(8) * 6 / 7


# ------------------------------------------------------------------------------------------------
# Checkpoints: exact resume, refusal of a foreign checkpoint, non-finite stops
# ------------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


class FailOnCall:
    """A loss that behaves like ``loss_fn`` until its ``n``-th training call, then fails with
    ``failure``: an exception class to raise, or a function of the log-probs whose value it returns.
    """

    def __init__(self, loss_fn, n, failure):
        self.loss_fn, self.n, self.failure, self.calls = loss_fn, n, failure, 0

    def __call__(self, pc, pr, rc, rr, beta):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.n:
                if isinstance(self.failure, type):
                    raise self.failure()
                return self.failure(pc, pr, rc, rr, beta)
        return self.loss_fn(pc, pr, rc, rr, beta)


def test_resume_is_exact(synthetic, tmp_path):
    """Interrupt a run between two checkpoints, resume it in a new process-like setting (fresh model
    object): same metrics, bit for bit, and the same final weights as an uninterrupted run. Dropout
    is on, so the saved RNG state matters; microbatches exercise gradient accumulation."""
    cfg, data, new_model, reference = synthetic
    phase_cfg = small_phase(microbatch_size=8)
    loss = PreferenceLoss("ipo")

    def run(out, loss_fn, model=None):
        model = model or new_model(dropout=0.1)
        phase = PreferencePhase(loss_fn, 0.1, reference, data.pad_id)
        train(model, phase, data.pref_train, data.pref_eval, phase_cfg, out, CPU, progress=False)
        return model

    straight = run(tmp_path / "a", loss)
    with pytest.raises(
        Interrupted
    ):  # 2 microbatches per step: call 11 is in step 6 (examples 80..96)
        run(tmp_path / "b", FailOnCall(loss, 11, Interrupted))
    assert torch.load(tmp_path / "b" / CHECKPOINT, weights_only=False)["examples_seen"] == 64
    assert max(r["examples_seen"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")) == 80
    resumed = run(tmp_path / "b", loss)
    a, b = (
        read_metrics(tmp_path / "a" / "metrics.jsonl"),
        read_metrics(tmp_path / "b" / "metrics.jsonl"),
    )
    assert without_time(a) == without_time(b)
    assert [r["examples_seen"] for r in a if r["split"] == "eval"] == [0, 32, 64, 96]
    for (name, p), q in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    # A finished run resumes to its end at once and returns the same final metrics.
    again = train(
        new_model(),
        PreferencePhase(loss, 0.1, reference, data.pad_id),
        data.pref_train,
        data.pref_eval,
        phase_cfg,
        tmp_path / "a",
        CPU,
        progress=False,
    )
    last = without_time(a)[-1]
    assert again == {k: v for k, v in last.items() if k not in ("split", "examples_seen", "step")}


def test_resume_refuses_a_checkpoint_of_another_config(synthetic, tmp_path):
    cfg, data, new_model, reference = synthetic
    phase = PreferencePhase(PreferenceLoss("ipo"), 0.1, reference, data.pad_id)
    train(
        new_model(),
        phase,
        data.pref_train,
        data.pref_eval,
        small_phase(n_examples=32),
        tmp_path,
        CPU,
        progress=False,
    )
    with pytest.raises(
        RunFolderError,
        match=r"was written by a different run configuration; what differs \(checkpoint -> this "
        r"run\): cfg.lr: 0.001 -> 0.002[.] Use another output folder, or to start this run over: "
        r"`--fresh-run test_resume_refuses_a_checkpoi0`",
    ):
        train(
            new_model(),
            phase,
            data.pref_train,
            data.pref_eval,
            small_phase(n_examples=32, lr=2e-3),
            tmp_path,
            CPU,
            progress=False,
        )


@pytest.mark.parametrize(
    "failure, message",
    [
        (
            lambda pc, pr, rc, rr, beta: ipo_loss(pc, pr, rc, rr, beta) * float("nan"),
            "non-finite loss",
        ),
        # sqrt(|x - x|) is 0 but its gradient is inf: a finite loss with a non-finite gradient.
        (lambda pc, pr, rc, rr, beta: (pc - pc.detach()).abs().sqrt(), "non-finite gradient norm"),
    ],
    ids=["nan-loss", "inf-gradient"],
)
def test_non_finite_stops_before_the_update_and_keeps_the_last_good_checkpoint(
    synthetic, tmp_path, failure, message
):
    cfg, data, new_model, reference = synthetic
    model = new_model()
    phase = PreferencePhase(
        FailOnCall(PreferenceLoss("ipo"), 5, failure), 0.1, reference, data.pad_id
    )
    with pytest.raises(
        NonFiniteLossError,
        match=rf"{message}.* at step 4 \(examples_seen 64\); stopped before the "
        rf"update. The last good checkpoint is .*{CHECKPOINT}",
    ):
        train(
            model,
            phase,
            data.pref_train,
            data.pref_eval,
            small_phase(),
            tmp_path,
            CPU,
            progress=False,
        )
    state = torch.load(tmp_path / CHECKPOINT, weights_only=False)
    assert state["examples_seen"] == 64  # the evaluation at 64 came just before the failing step
    for name, p in model.state_dict().items():  # the failing step changed nothing
        assert torch.equal(p, state["model"][name]), name
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert max(r["examples_seen"] for r in records) == 64
    assert all(math.isfinite(v) for r in records for k, v in r.items() if isinstance(v, float))


def test_non_finite_policy_logps_are_reported(synthetic, tmp_path):
    cfg, data, new_model, reference = synthetic
    model = new_model()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    phase = PreferencePhase(PreferenceLoss("ipo"), 0.1, reference, data.pad_id)
    with pytest.raises(
        ValueError,
        match=r"policy_chosen_logps has \d+ non-finite value\(s\), the first nan",
    ):
        train(
            model,
            phase,
            data.pref_train,
            data.pref_eval,
            small_phase(),
            tmp_path,
            CPU,
            progress=False,
        )


# ------------------------------------------------------------------------------------------------
# The loop's mechanics
# ------------------------------------------------------------------------------------------------


def test_one_forward_pass_per_step_and_none_for_the_reference(synthetic, tmp_path):
    """Chosen and rejected share one forward pass, and pi_ref is never run during training: the
    model body runs once per microbatch and once per eval batch, nothing more."""
    cfg, data, new_model, reference = synthetic
    model = new_model()
    calls = []
    model.base_model.register_forward_hook(lambda module, args, out: calls.append(1))
    phase_cfg = small_phase(n_examples=64, eval_every=32, microbatch_size=8, eval_batch_size=100)
    train(
        model,
        PreferencePhase(PreferenceLoss("ipo"), 0.1, reference, data.pad_id),
        data.pref_train,
        data.pref_eval,
        phase_cfg,
        tmp_path,
        CPU,
        progress=False,
    )
    steps, micro = 64 // 16, 16 // 8
    evals, eval_batches = 3, math.ceil(len(data.pref_eval) / 100)
    assert len(calls) == steps * micro + evals * eval_batches


def test_an_objective_gets_the_per_pair_extras_it_names(synthetic, tmp_path):
    """The interface of combined losses (e.g. auxiliary-objective UPO): an objective names its
    per-pair inputs in ``extra_keys``, and the phase's ``extras`` of those names arrive in each
    call, looked up by index for each split (here each pair's extra is its index, negated for
    eval)."""
    cfg, data, new_model, reference = synthetic
    seen = {"train": [], "eval": []}

    class WithExtras:
        label, extra_keys, divergence = "IPO with an extra", ("aux_reward",), None

        def losses(self, pc, pr, rc, rr, beta, extras):
            split = "train" if torch.is_grad_enabled() else "eval"
            seen[split].extend((extras["aux_reward"] * (1 if split == "train" else -1)).tolist())
            return ipo_loss(pc, pr, rc, rr, beta)

        def metrics(self, pc, pr, rc, rr, beta, extras):
            return {}

    extras = {
        "train": {"aux_reward": torch.arange(len(data.pref_train), dtype=torch.float32)},
        "eval": {"aux_reward": -torch.arange(len(data.pref_eval), dtype=torch.float32)},
    }
    phase_cfg = small_phase(n_examples=48, eval_every=48)
    phase = PreferencePhase(WithExtras(), 0.1, reference, data.pad_id, extras=extras)
    train(
        new_model(),
        phase,
        data.pref_train,
        data.pref_eval,
        phase_cfg,
        tmp_path,
        CPU,
        progress=False,
    )
    assert seen["train"] == example_indices(len(data.pref_train), phase_cfg.seed, 0, 48)
    assert seen["eval"] == list(range(len(data.pref_eval))) * 2  # evaluations at 0 and 48


def test_example_stream_is_a_pure_function_of_position():
    n = 10
    stream = example_indices(n, seed=3, start=0, count=35)
    for epoch in range(3):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert stream[:n] != stream[n : 2 * n]  # a new permutation each epoch
    assert example_indices(n, seed=3, start=17, count=11) == stream[17:28]
    assert example_indices(n, seed=4, start=0, count=n) != stream[:n]
    with pytest.raises(ValueError, match="empty"):
        example_indices(0, 0, 0, 1)


def test_gradient_accumulation_equals_the_full_batch(synthetic, tmp_path):
    cfg, data, new_model, reference = synthetic
    records = {}
    for micro in (None, 4):
        out = tmp_path / str(micro)
        train(
            new_model(),
            PreferencePhase(PreferenceLoss("ipo"), 0.1, reference, data.pad_id),
            data.pref_train,
            data.pref_eval,
            small_phase(n_examples=32, microbatch_size=micro),
            out,
            CPU,
            progress=False,
        )
        records[micro] = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"][
            0
        ]
    for key in ("loss", "grad_norm", "rewards/margins"):
        assert records[4][key] == pytest.approx(records[None][key], rel=1e-5, abs=1e-7), key


def test_learning_rate_warmup(synthetic, tmp_path):
    cfg, data, new_model, reference = synthetic
    phase_cfg = small_phase(n_examples=96, warmup_steps=3, lr=1e-3)
    train(
        new_model(),
        PreferencePhase(PreferenceLoss("ipo"), 0.1, reference, data.pad_id),
        data.pref_train,
        data.pref_eval,
        phase_cfg,
        tmp_path,
        CPU,
        progress=False,
    )
    lrs = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert lrs == [1e-3 * min(1.0, (s + 1) / 4) for s in range(6)]
    assert lrs[:3] == [2.5e-4, 5e-4, 7.5e-4]


def test_evaluation_after_each_step_that_crosses_a_multiple_of_eval_every(synthetic, tmp_path):
    cfg, data, new_model, reference = synthetic
    train(
        new_model(),
        PreferencePhase(PreferenceLoss("ipo"), 0.1, reference, data.pad_id),
        data.pref_train,
        data.pref_eval,
        small_phase(n_examples=112, eval_every=40),
        tmp_path,
        CPU,
        progress=False,
    )
    evals = [
        r["examples_seen"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["split"] == "eval"
    ]
    assert evals == [0, 48, 80, 112]  # 40 is crossed by the step to 48, 80 is hit, 112 is the end
    assert len(evals) == 1 + evals_per_run(small_phase(n_examples=112, eval_every=40))  # bench's


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown preset 'papr'; choose one of quick, paper, synthetic"
    ):
        get_preset("papr")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(n_examples=100, batch_size=16, eval_every=32, lr=1e-3),
            "must be a multiple of batch_size",
        ),
        (dict(n_examples=96, batch_size=16, eval_every=0, lr=1e-3), "eval_every must be >= 1"),
        (
            dict(n_examples=96, batch_size=16, eval_every=32, lr=1e-3, microbatch_size=5),
            "must divide batch_size",
        ),
        (
            dict(n_examples=96, batch_size=16, eval_every=32, lr=1e-3, optimizer="sgd"),
            "optimizer must be one of",
        ),
        (dict(n_examples=96, batch_size=16, eval_every=32, lr=0.0), "lr > 0"),
    ],
)
def test_phase_config_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PhaseConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(datasets=("hh", "synthetic")), "cannot be mixed"),
        (dict(datasets=("hh", "imdb")), "datasets must be a non-empty subset"),
        (dict(datasets=()), "datasets must be a non-empty subset"),
        (dict(hh_split="random"), "hh_split must be"),
        (dict(max_length=64, max_prompt_length=64), "max_prompt_length < max_length"),
        (dict(datasets=("trl",)), "dataset 'trl' and trl_train go together"),
        (dict(trl_train="t.jsonl"), "dataset 'trl' and trl_train go together"),
        (dict(datasets=("hh",), trl_eval="e.jsonl"), "trl_eval is the eval set of trl_train"),
    ],
)
def test_data_config_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_tiny_model_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a = build_model(ModelConfig(init_seed=5), vocab_size=20, n_positions=8)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model(ModelConfig(init_seed=5), vocab_size=20, n_positions=8)
    c = build_model(ModelConfig(init_seed=6), vocab_size=20, n_positions=8)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(
        a.lm_head.weight, c.lm_head.weight
    )
    assert all(m.p == 0.0 for m in a.modules() if isinstance(m, torch.nn.Dropout))


def test_training_flushes_subnormals_on_the_cpu_and_restores_the_default():
    from upo_ref.lm.train import subnormals_flushed

    tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal in float32
    assert (tiny * 1.0).item() != 0.0
    with subnormals_flushed(torch.device("cpu")):
        assert (tiny * 1.0).item() == 0.0
    assert (tiny * 1.0).item() != 0.0
    # Inside a command (flush_subnormals for the whole process) a training run leaves it on.
    from upo_ref.lm.train import flush_subnormals

    assert flush_subnormals()
    try:
        with subnormals_flushed(torch.device("cpu")):
            assert (tiny * 1.0).item() == 0.0
        assert (tiny * 1.0).item() == 0.0
    finally:
        flush_subnormals(False)
    assert (tiny * 1.0).item() != 0.0


# ------------------------------------------------------------------------------------------------
# Precision: "bfloat16-matmul"
# ------------------------------------------------------------------------------------------------

# float32 accumulation's error per product summed, relative to sum |x_k w_k| (2^-24, with room)
F32_ACCUMULATION_PER_TERM = 4 * 2.0**-24


def test_bfloat16_matmul_rounds_the_inputs_only_and_restores_the_setting():
    """Inside the block a float32 matmul is the float32-accumulated product of the bf16-rounded
    inputs, with a float32 output, where oneDNN rounds them (``utils.cpu``: CPUs with AMX);
    elsewhere the setting leaves the float32 product as it is, and the mode is refused. After the
    block, even one left by an exception, the previous setting is back."""
    from upo_ref.lm.phases import autocast
    from upo_ref.utils.cpu import bf16_matmul_rounds_inputs, fp32_matmuls_in_bf16

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 96, generator=g), torch.randn(96, 80, generator=g)
    bound = x.shape[1] * F32_ACCUMULATION_PER_TERM * (x.abs().double() @ w.abs().double()).max()
    exact = x.double() @ w.double()
    of_rounded = x.bfloat16().double() @ w.bfloat16().double()
    # the rounding of the inputs is visible: far above float32's own error
    assert (of_rounded - exact).abs().max().item() > 10 * bound
    backend = torch.backends.mkldnn.matmul
    before = backend.fp32_precision
    if not bf16_matmul_rounds_inputs():
        with fp32_matmuls_in_bf16():  # what the mode would set: here it changes nothing
            y = x @ w
        assert (y.double() - exact).abs().max().item() <= bound
        with pytest.raises(ValueError, match='"bfloat16-matmul" has no effect on this CPU'):
            with autocast(CPU, "bfloat16-matmul"):
                pass
        assert backend.fp32_precision == before
        return
    with autocast(CPU, "bfloat16-matmul"):
        y = x @ w
    assert backend.fp32_precision == before
    assert y.dtype == torch.float32
    assert (y.double() - of_rounded).abs().max().item() <= bound
    with pytest.raises(RuntimeError, match="inside"):
        with autocast(CPU, "bfloat16-matmul"):
            raise RuntimeError("inside")
    assert backend.fp32_precision == before


def test_bfloat16_matmul_is_refused_off_the_cpu():
    from upo_ref.lm.phases import autocast

    with pytest.raises(ValueError, match=r'"bfloat16-matmul" is a CPU mode .* use "auto"'):
        with autocast(torch.device("cuda"), "bfloat16-matmul"):
            pass


def test_bfloat16_matmul_covers_the_backward_pass_of_a_training_step(
    synthetic, tmp_path, monkeypatch
):
    """The gradients of a step are computed under the same matmul precision as its forward pass
    (a backward outside the block would run in full float32), and training leaves the setting as
    it found it. (What the setting is seen as is what is checked, so the CPU's own answer to
    whether it rounds, ``utils.cpu.bf16_matmul_rounds_inputs``, is taken as yes.)"""
    from upo_ref.utils import cpu

    monkeypatch.setattr(cpu, "bf16_matmul_rounds_inputs", lambda: True)
    cfg, data, new_model, reference = synthetic
    model = new_model()
    seen = []
    param = next(p for p in model.parameters() if p.requires_grad)
    param.register_hook(lambda grad: seen.append(torch.backends.mkldnn.matmul.fp32_precision))
    before = torch.backends.mkldnn.matmul.fp32_precision
    phase = PreferencePhase(
        PreferenceLoss("ipo"), 0.1, reference, data.pad_id, precision="bfloat16-matmul"
    )
    train(
        model,
        phase,
        data.pref_train,
        data.pref_eval,
        small_phase(n_examples=48, eval_every=48),
        tmp_path,
        CPU,
        progress=False,
    )
    assert seen == ["bf16"] * 3  # one backward per step of 16
    assert torch.backends.mkldnn.matmul.fp32_precision == before
