"""The benchmarks measure what they say: the fast and naive steps compute the same update, the
FLOP count behind MFU matches torch's own count, and the loss bench covers every loss."""

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from upo_ref.bench import (
    check_grid_preset,
    evals_per_run,
    grid_seconds,
    loss_zoo,
    random_pair_batch,
    reference_logps_of,
    step_flops,
    step_fn,
    time_grid_parts,
    time_losses,
)
from upo_ref.bench import main as bench_main
from upo_ref.divergences import DIVERGENCE_NAMES
from upo_ref.lm.config import PhaseConfig
from upo_ref.lm.experiment import load_experiment_data
from upo_ref.lm.presets import get_preset, smoke
from upo_ref.losses import LOSS_NAMES, PreferenceLoss

TINY = dict(
    n_layer=2,
    n_head=2,
    n_embd=32,
    vocab_size=97,
    n_positions=24,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
)
CPU = torch.device("cpu")


def tiny_models(**extra):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY, **extra))
    torch.manual_seed(1)
    ref = GPT2LMHeadModel(GPT2Config(**TINY, **extra)).eval()
    return model, ref


def test_fast_and_naive_steps_compute_the_same_update():
    model, ref = tiny_models()
    batch = random_pair_batch(3, 24, 10, TINY["vocab_size"])
    loss_fn = PreferenceLoss("iupo", "jensen_shannon")
    fast_model, naive_model = model, copy.deepcopy(model)
    fast = step_fn(
        fast_model, ref, batch, reference_logps_of(ref, batch), loss_fn, 0.1, CPU, naive=False
    )
    naive = step_fn(naive_model, ref, batch, None, loss_fn, 0.1, CPU, naive=True)
    for _ in range(2):  # two steps: the second starts from the first's (equal) parameters
        torch.testing.assert_close(fast(), naive(), rtol=1e-5, atol=1e-6)
    for p_fast, p_naive in zip(fast_model.parameters(), naive_model.parameters(), strict=True):
        torch.testing.assert_close(p_fast, p_naive, rtol=1e-4, atol=1e-6)


def test_step_flops_matches_torchs_flop_counter():
    # Eager attention: its score and value products are plain matmuls that torch's counter sees.
    model, ref = tiny_models(attn_implementation="eager")
    B, T, P = 3, 24, 10
    batch = random_pair_batch(B, T, P, TINY["vocab_size"])
    fast = step_fn(
        model,
        ref,
        batch,
        reference_logps_of(ref, batch),
        PreferenceLoss("ipo"),
        0.1,
        CPU,
        naive=False,
    )
    with FlopCounterMode(display=False) as counter:
        fast()
    ours = step_flops(TINY["n_layer"], TINY["n_embd"], TINY["vocab_size"], B, T, T - P)
    # The head scores positions prompt-1 .. T-2 (each predicts the next token): T - P positions per
    # row, exactly what step_flops counts; torch counts every matmul of forward and backward.
    assert counter.get_total_flops() == ours


def test_loss_bench_covers_every_loss_and_divergence():
    zoo = loss_zoo()
    assert {loss.name for loss in zoo} == set(LOSS_NAMES)
    named = {
        (loss.name, loss.divergence.name if loss.divergence else None, loss.form) for loss in zoo
    }
    for div in DIVERGENCE_NAMES:
        assert {("fdpo", div, "paper"), ("iupo", div, "paper"), ("iupo", div, "kkt")} <= named
    assert zoo[0] == PreferenceLoss("dpo")  # the baseline the ratios are taken against


def test_loss_bench_ratios_are_per_round_and_their_median():
    rows = time_losses(pairs=64, repeats=2, rounds=3)
    assert [r.label for r in rows] == [loss.label for loss in loss_zoo()]
    for row in rows:
        assert len(row.seconds) == len(row.ratios) == 3
        for s, ratio, dpo in zip(row.seconds, row.ratios, rows[0].seconds, strict=True):
            assert ratio == s / dpo  # each round's ratio is taken against that round's DPO time
        assert row.ratio_to_dpo == sorted(row.ratios)[1]
    assert rows[0].ratios == [1.0, 1.0, 1.0]


def test_loss_bench_rejects_zero_rounds():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        time_losses(pairs=8, repeats=1, rounds=0)


def test_evals_per_run_follows_the_training_loops_schedule():
    # step 0 needs no pass; then one per crossing of a multiple of eval_every, and one at the end
    def n(n_examples, batch_size, eval_every):
        return evals_per_run(
            PhaseConfig(
                n_examples=n_examples, batch_size=batch_size, eval_every=eval_every, lr=1e-4
            )
        )

    assert evals_per_run(get_preset("smol").pref) == 2  # 1,024 and 2,048 examples
    assert n(48, 16, 32) == 2  # 32, then the end at 48
    assert n(48, 16, 16) == 3
    assert n(64, 16, 100) == 1  # the end only
    assert n(48, 16, 24) == 2  # 32 crosses 24, 48 is both a crossing and the end: one pass


def test_grid_seconds_are_the_per_pair_times_times_the_grids_counts():
    cfg = get_preset("smol")  # 8 runs of 2,048 examples, 2 eval passes each
    got = grid_seconds(cfg, n_train=10, n_eval=20, trunk_s=2.0, forward_s=1.0, step_s=3.0)
    assert got == {
        "trunk_s": 2.0 * 30,
        "reference_s": 1.0 * 30,
        "training_s": 3.0 * 2048 * 8,
        "evaluation_s": 1.0 * 20 * 2 * 8,
        "per_run_training_s": 3.0 * 2048,
        "per_run_evaluation_s": 1.0 * 20 * 2,
    }


def test_grid_bench_refuses_what_it_cannot_time(capsys):
    check_grid_preset(get_preset("smol"))  # what it times
    with pytest.raises(ValueError, match="trains its whole model"):
        check_grid_preset(get_preset("quick"))
    with pytest.raises(ValueError, match="does not time an SFT phase"):
        check_grid_preset(get_preset("smol-sft"))
    with pytest.raises(SystemExit) as exit_:
        bench_main(["grid", "--preset", "quick"])
    assert exit_.value.code == 2 and "trains its whole model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        bench_main(["grid", "--precision", "float16"])
    assert exit_.value.code == 2 and "--precision 'float16': must be one of" in (
        capsys.readouterr().err
    )
    with pytest.raises(ValueError, match="--pairs must be between"):
        time_grid_parts(smoke(get_preset("smol")), 10**6, ["float32"], CPU)


def test_grid_bench_times_the_presets_own_pairs():
    cfg = smoke(get_preset("smol"))
    _, data = load_experiment_data(cfg)
    n = cfg.pref.batch_size
    parts = time_grid_parts(cfg, n, ["float32", "bfloat16"], CPU)
    assert (parts["n_train"], parts["n_eval"]) == (len(data.pref_train), len(data.pref_eval))
    lengths = [len(p.prompt) + len(r) for p in data.pref_eval[:n] for r in (p.chosen, p.rejected)]
    assert parts["tokens"] == pytest.approx(sum(lengths) / len(lengths), rel=1e-12)
    assert set(parts["trunk_s"]) == {"float32", "bfloat16"}
