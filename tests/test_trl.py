"""TRL with upo_ref's losses: the same loss, gradients and metrics as upo_ref's own trainer on the
same batch, for every loss; a short TRL run learns the synthetic task; conflicting configs and
incomplete rows are refused; the core imports without TRL or Accelerate."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel
from trl import DPOConfig

from upo_ref.bench import loss_zoo
from upo_ref.divergences import get_divergence
from upo_ref.integrations.synthetic_text import synthetic_dataset, synthetic_tokenizer
from upo_ref.integrations.trl import UPOTrainer, check_dataset
from upo_ref.lm.presets import get_preset
from upo_ref.lm.synthetic import SyntheticTask
from upo_ref.lm.train import PreferencePhase, reference_logps
from upo_ref.losses import PreferenceLoss
from upo_ref.utils.stats import mean_se

# float32 on the CPU: TRL's fused LM head scores every position in tiles, upo_ref's only the
# response positions; the same sums in another order differ by a few float32 ulps of values ~10.
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6
# Gradients: the largest difference of a tensor, relative to its largest entry (the entries near
# 0 of a sum computed in another order carry only absolute rounding error).
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-7
METRIC_ATOL = 1e-5
# The learning test's bar, as for upo_ref's own trainer (tests/test_train.py).
MIN_HELD_OUT_ACCURACY = 0.9
# The training loss of the last quarter of the steps is below the first quarter's by more than this
# many standard errors of the difference (batches are independent draws).
LOSS_DROP_SES = 3.0
BETA = 0.1
CPU = torch.device("cpu")
TASK = SyntheticTask()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=TASK.vocab_size,
        n_positions=16,
        bos_token_id=TASK.eos_id,
        eos_token_id=TASK.eos_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def trl_config(tmp_path, **overrides) -> DPOConfig:
    base = dict(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        beta=BETA,
        max_steps=1,
        per_device_train_batch_size=8,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        bf16=False,  # TRL's default is bf16 autocast, also on the CPU; upo_ref's CPU runs: float32
        gradient_checkpointing=False,  # TRL's default is on; same gradients, slower
    )
    return DPOConfig(**{**base, **overrides})


def trainer_for(loss, tmp_path, pairs, model=None, ref=None, eval_pairs=None, **overrides):
    model = tiny_gpt2() if model is None else model
    return UPOTrainer(
        model,
        copy.deepcopy(model) if ref is None else ref,
        trl_config(tmp_path, **overrides),
        train_dataset=synthetic_dataset(TASK, pairs),
        eval_dataset=None if eval_pairs is None else synthetic_dataset(TASK, eval_pairs),
        processing_class=synthetic_tokenizer(TASK),
        loss=loss,
    )


@pytest.fixture(scope="module")
def pairs():
    return TASK.pairs(8, stream=0)


def test_trl_tokenizes_the_synthetic_text_to_the_tasks_ids(tmp_path, pairs):
    trainer = trainer_for(PreferenceLoss("dpo"), tmp_path, pairs)
    rows = trainer.train_dataset
    assert [tuple(r["prompt_ids"]) for r in rows] == [p.prompt for p in pairs]
    assert [tuple(r["chosen_ids"]) for r in rows] == [p.chosen for p in pairs]
    assert [tuple(r["rejected_ids"]) for r in rows] == [p.rejected for p in pairs]


@pytest.mark.parametrize("loss", loss_zoo(), ids=lambda loss: loss.label)  # every loss
def test_trl_step_equals_upo_refs_preference_phase(tmp_path, pairs, loss):
    policy, ref = tiny_gpt2(0), tiny_gpt2(1)  # a reference other than the policy: h != 0
    ours = copy.deepcopy(policy)  # before TRL patches the policy's forward
    trainer = trainer_for(loss, tmp_path, pairs, copy.deepcopy(policy), copy.deepcopy(ref))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()

    reference = {"train": reference_logps(ref, pairs, len(pairs), TASK.eos_id, CPU)}
    phase = PreferencePhase(loss, BETA, reference, TASK.eos_id)
    ours.train()
    losses, metrics = phase.losses(ours, phase.collate(pairs, range(len(pairs))), "train")
    losses.mean().backward()

    torch.testing.assert_close(trl_loss, losses.mean(), rtol=LOSS_RTOL, atol=LOSS_ATOL)
    for (name, p_trl), p_ours in zip(
        trainer.model.named_parameters(), ours.parameters(), strict=True
    ):
        error = float((p_trl.grad - p_ours.grad).abs().max())
        assert error <= GRAD_RTOL * float(p_ours.grad.abs().max()) + GRAD_ATOL, name
    logged = trainer._metrics["train"]
    assert set(metrics) == set(logged)
    for name, values in metrics.items():
        assert logged[name] == [pytest.approx(float(values.mean()), abs=METRIC_ATOL)], name


def test_a_short_trl_run_with_js_iupo_learns_the_synthetic_task(tmp_path):
    """One pass over 1,536 fresh pairs with upo_ref's ``synthetic`` preset (batch 32, AdamW 5e-4,
    constant, gradient norm clipped at 10, beta 0.1; pi_ref precomputed once, as upo_ref does): the
    training loss falls, and held-out pairs are ranked right as often as upo_ref's trainer must."""
    cfg = get_preset("synthetic").pref
    train_pairs, eval_pairs = TASK.pairs(cfg.n_examples, stream=0), TASK.pairs(256, stream=1)
    trainer = trainer_for(
        PreferenceLoss("iupo", "jensen_shannon"),
        tmp_path,
        train_pairs,
        eval_pairs=eval_pairs,
        max_steps=-1,
        num_train_epochs=1,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        weight_decay=0.01,  # torch's AdamW default, which upo_ref's trainer uses
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=1,
        precompute_ref_log_probs=True,
    )
    trainer.train()
    losses = torch.tensor([r["loss"] for r in trainer.state.log_history if "loss" in r])
    assert len(losses) == cfg.n_examples // cfg.batch_size
    # At pi = pi_ref the paper-form Uh is 0 on every pair: the first loss is (0 - 1/(2 beta))^2.
    assert losses[0] == pytest.approx((1 / (2 * BETA)) ** 2, rel=1e-6)
    quarter = len(losses) // 4
    (first, first_se), (last, last_se) = mean_se(losses[:quarter]), mean_se(losses[-quarter:])
    assert first - last > LOSS_DROP_SES * math.hypot(first_se, last_se)
    final = trainer.evaluate()
    assert final["eval_rewards/accuracies"] >= MIN_HELD_OUT_ACCURACY
    assert final["eval_scores/margins"] > 0


@pytest.mark.parametrize(
    "loss, overrides, message",
    [
        (PreferenceLoss("iupo", "jensen_shannon"), dict(loss_type="sigmoid_norm"), "loss_type"),
        (PreferenceLoss("dpo"), dict(loss_type="ipo"), "counterpart is 'sigmoid'"),
        (PreferenceLoss("ipo"), dict(loss_type=["ipo", "sft"]), "several TRL losses"),
        (PreferenceLoss("dpo"), dict(f_divergence_type="js_divergence"), "defined with reverse KL"),
        (
            PreferenceLoss("fdpo", "jensen_shannon"),
            dict(f_divergence_type="forward_kl"),
            "'js_divergence'",
        ),
        (
            PreferenceLoss("iupo", "chi_squared"),
            dict(f_divergence_type="forward_kl"),
            "TRL has no such divergence",
        ),
        (
            PreferenceLoss("fdpo", get_divergence("alpha", alpha=0.3)),
            dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
            "alpha=0.3 is coef=0.7",
        ),
        (PreferenceLoss("dpo"), dict(ld_alpha=0.5), "ld_alpha=None"),
        (PreferenceLoss("dpo"), dict(use_weighting=True), "use_weighting=False"),
    ],
)
def test_a_config_that_conflicts_with_the_loss_is_refused(
    tmp_path, pairs, loss, overrides, message
):
    with pytest.raises(ValueError, match=message):
        trainer_for(loss, tmp_path, pairs, **overrides)


@pytest.mark.parametrize(
    "loss, overrides",
    [
        (PreferenceLoss("iupo", "jensen_shannon"), dict()),  # TRL's defaults
        (
            PreferenceLoss("iupo", "jensen_shannon", "kkt"),
            dict(loss_type="ipo", f_divergence_type="js_divergence"),
        ),
        (
            PreferenceLoss("fdpo", get_divergence("alpha", alpha=0.3)),
            dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.7),
        ),
    ],
)
def test_a_config_that_agrees_with_the_loss_is_accepted(tmp_path, pairs, loss, overrides):
    assert trainer_for(loss, tmp_path, pairs, **overrides).upo_loss == loss


def test_a_loss_that_is_not_a_preference_loss_is_refused(tmp_path, pairs):
    with pytest.raises(TypeError, match="PreferenceLoss"):
        trainer_for("iupo", tmp_path, pairs)


@pytest.mark.parametrize("column", ["prompt", "chosen", "rejected"])
def test_a_dataset_without_a_column_is_refused(column):
    rows = {"prompt": ["t0"], "chosen": [" c1"], "rejected": [" c2"]}
    del rows[column]
    with pytest.raises(ValueError, match=f"train_dataset has no column '{column}'"):
        check_dataset(Dataset.from_dict(rows))


def test_a_row_without_a_value_is_refused_by_the_trainer(tmp_path, pairs):
    rows = [{"prompt": "t0", "chosen": " c1", "rejected": " c2"}, {"prompt": "t1", "chosen": " c3"}]
    with pytest.raises(ValueError, match=r"eval_dataset: row 1 has no 'rejected'"):
        UPOTrainer(
            tiny_gpt2(),
            tiny_gpt2(1),
            trl_config(tmp_path),
            train_dataset=synthetic_dataset(TASK, pairs),
            eval_dataset=Dataset.from_list(rows),
            processing_class=synthetic_tokenizer(TASK),
            loss=PreferenceLoss("dpo"),
        )


def test_the_core_imports_without_trl_or_accelerate():
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("trl", "accelerate", "datasets"):
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
                return None

        sys.meta_path.insert(0, Block())
        import upo_ref, upo_ref.lm.train, upo_ref.lm.experiment, upo_ref.reproduce
        assert not {"trl", "accelerate", "datasets"} & {m.split(".")[0] for m in sys.modules}
        try:
            import upo_ref.integrations.trl
        except ModuleNotFoundError as err:
            assert "blocked" in str(err), err
        else:
            raise AssertionError("upo_ref.integrations.trl imported with trl blocked")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)
