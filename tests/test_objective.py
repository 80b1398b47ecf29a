"""The one loss interface: the adapter of plain losses, the check of the extras, and the auxiliary
objectives against the pure functions they call (bit for bit, or, for the per-pair KTO objectives,
within a rounding bound of the per-response mean)."""

from __future__ import annotations

import math

import pytest
import torch

from upo_ref.auxiliary.baselines import kto_loss, kto_reference_point, modpo_loss
from upo_ref.auxiliary.frontier import (
    ToyConfig,
    make_bandit,
    method_loss,
    method_objective,
    sample_pairs,
)
from upo_ref.auxiliary.losses import upo_dpo_loss, upo_kto_loss
from upo_ref.auxiliary.objectives import (
    EXTRA_KEYS,
    KL_KEYS,
    KTOLoss,
    MODPOLoss,
    UPODPOLoss,
    UPOKTOLoss,
)
from upo_ref.divergences import get_divergence
from upo_ref.losses import PreferenceLoss, dpo_loss, iupo_loss
from upo_ref.objective import Objective, PreferenceObjective, as_objective, check_extras

# A mean of B pair-means against a mean of the same 2B numbers, in float64: a few ulps of the sum.
PER_PAIR_MEAN_RTOL = 1e-14
B = 16


def f64(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def inputs():
    """Log-probs (B,) each, and every extra any objective reads, (B,) each, in float64."""
    logps = tuple(f64(B, seed=i) - 5.0 for i in range(4))
    keys = EXTRA_KEYS + KL_KEYS
    extras = {
        k: f64(B, seed=10 + i) - (5.0 if k.startswith("kl") else 0.0) for i, k in enumerate(keys)
    }
    return logps, extras


def test_a_preference_loss_is_adapted_with_its_divergence_and_label(inputs):
    logps, extras = inputs
    loss = PreferenceLoss("iupo", "jensen_shannon")
    objective = as_objective(loss)
    assert isinstance(objective, Objective) and objective.extra_keys == ()
    assert objective.label == "JS-IUPO" and objective.divergence == get_divergence("jensen_shannon")
    expected = iupo_loss(*logps, 0.1, "jensen_shannon")
    assert torch.equal(objective.losses(*logps, 0.1, extras), expected)
    assert objective.metrics(*logps, 0.1, extras) == {}
    plain = as_objective(dpo_loss)  # any callable (pc, pr, rc, rr, beta) -> (B,)
    assert plain.divergence is None and torch.equal(
        plain.losses(*logps, 0.1, {}), dpo_loss(*logps, 0.1)
    )
    upo = UPODPOLoss(0.1)
    assert as_objective(upo) is upo  # an objective passes through
    with pytest.raises(ValueError, match="must be an Objective"):
        as_objective(0.5)


def test_the_auxiliary_objectives_call_their_functions_bit_for_bit(inputs):
    logps, e = inputs
    r_w, r_l, v = (e[k] for k in EXTRA_KEYS)
    expected = upo_dpo_loss(*logps, r_w, r_l, v, 0.1, 0.3, 0.5, 10.0)
    assert torch.equal(UPODPOLoss(0.3, 0.5, 10.0).losses(*logps, 0.1, e), expected)
    assert torch.equal(
        MODPOLoss(0.25).losses(*logps, 0.1, e), modpo_loss(*logps, r_w, r_l, 0.1, (0.75, 0.25))
    )
    assert MODPOLoss(0.25).extra_keys == ("chosen_rewards", "rejected_rewards")


def test_the_kto_objectives_are_the_per_response_losses_averaged_per_pair(inputs):
    """KTO on pairs: the 2B responses (chosen desirable, rejected undesirable) with z0 from the
    mismatched log-probs; pair i's loss is the mean of its two responses' losses, so the mean over
    pairs is the mean over responses up to rounding."""
    (pc, pr, rc, rr), e = inputs
    policy, reference = torch.cat([pc, pr]), torch.cat([rc, rr])
    desirable = torch.cat([torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)])
    z0 = kto_reference_point(
        torch.cat([e["kl_policy_chosen"], e["kl_policy_rejected"]]),
        torch.cat([e["kl_reference_chosen"], e["kl_reference_rejected"]]),
    )
    per_response = kto_loss(policy, reference, desirable, z0, 0.5)
    ours = KTOLoss().losses(pc, pr, rc, rr, 0.5, e)
    assert torch.equal(ours, (per_response[:B] + per_response[B:]) / 2)
    torch.testing.assert_close(ours.mean(), per_response.mean(), rtol=PER_PAIR_MEAN_RTOL, atol=0)
    rewards = torch.cat([e["chosen_rewards"], e["rejected_rewards"]])
    values = torch.cat([e["values"], e["values"]])
    per_response = upo_kto_loss(policy, reference, desirable, z0, rewards, values, 0.5, 0.2, 1.0)
    ours = UPOKTOLoss(0.2).losses(pc, pr, rc, rr, 0.5, e)
    assert torch.equal(ours, (per_response[:B] + per_response[B:]) / 2)


def test_the_frontier_calls_every_method_through_the_interface():
    """Each toy method is the objective of its config, and the toy's mean loss at pi_ref equals the
    direct function's: DPO log 2; MODPO with w_aux = 0 is DPO."""
    bandit = make_bandit(seed=1)
    pairs = sample_pairs(bandit, 50, seed=2)
    ref = bandit.reference_logps
    values = torch.zeros(bandit.n_prompts, dtype=torch.float64)
    kinds = {
        "dpo": PreferenceObjective,
        "kto": KTOLoss,
        "modpo": MODPOLoss,
        "upo-dpo": UPODPOLoss,
        "upo-kto": UPOKTOLoss,
    }
    for method, kind in kinds.items():
        objective = method_objective(ToyConfig(method, gamma=0.1))
        assert isinstance(objective, kind) and isinstance(objective, Objective)
    at_ref = {m: method_loss(bandit, pairs, ref, ToyConfig(m), values).item() for m in kinds}
    assert at_ref["dpo"] == pytest.approx(math.log(2.0), rel=1e-15)
    assert at_ref["modpo"] == at_ref["dpo"]
    assert at_ref["kto"] == pytest.approx(0.5, rel=1e-15)  # sigma(0) per response at pi = pi_ref


def test_check_extras_names_the_split_the_key_and_the_shape():
    objective = UPODPOLoss(0.1)
    good = {k: torch.zeros(3) for k in EXTRA_KEYS}
    check_extras(objective, {"train": good, "eval": good}, {"train": 3, "eval": 3})
    check_extras(as_objective(dpo_loss), {}, {"train": 3})  # no extras needed, none given
    with pytest.raises(ValueError, match=r"the 'eval' extras have no \['values'\]"):
        check_extras(
            objective,
            {"train": good, "eval": {k: v for k, v in good.items() if k != "values"}},
            {"eval": 3},
        )
    with pytest.raises(
        ValueError,
        match=r"extras\['train'\]\['chosen_rewards'\] must be a tensor of shape \(4,\), one",
    ):
        check_extras(objective, {"train": good}, {"train": 4})
