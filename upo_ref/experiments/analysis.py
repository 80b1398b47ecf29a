r"""Small analyses the notebooks show: loss gradients, accuracy of f' forms, JS-IUPO reachability.

The reachability analysis is the one the paper does not give. In the paper's form (eq. 23),

.. math:: Uh_\pi = f'\!\left(e^{a}\right) - f'\!\left(e^{c}\right), \qquad
          a = \log\frac{\pi(y_w)}{\pi(y_l)}, \quad c = \log\frac{\pi_{ref}(y_w)}{\pi_{ref}(y_l)},

and IUPO (eq. 24) regresses Uh onto T = 1/(2 beta). When f' is bounded above (Jensen-Shannon:
f' < log 2; forward KL: f' < 0; alpha: f' < 1/alpha), Uh < sup f' - f'(e^c) whatever the policy
does, so the target is reachable only on pairs with sup f' - f'(e^c) > T, i.e.

.. math:: c < c^*(\beta) = \log (f')^{-1}\big(\sup f' - T\big)
          \qquad (\text{JS: } c^* = -\log(e^{T} - 1), \text{ about } -4.99 \text{ at } \beta = 0.1).

On the other pairs the loss is decreasing in a for every a and its infimum is not attained: the
policy's margin a grows without bound, with a gradient dL/da = 2 (Uh - T) d f'(e^a)/da that for
JS is 2 (Uh - T) sigmoid(-a), so |dL/da| ~ 2 (T - softplus(-c)) e^{-a}
= 2 (T - softplus(-c)) pi(y_l)/pi(y_w): it never changes sign, like DPO's push, but decays at rate 1
in a, where DPO's beta sigmoid(-beta h) ~ beta e^{-beta h} decays at rate beta in h.
The kkt form (eq. 17) has no such bound: f'(pi(y_l)/pi_ref(y_l)) -> -inf as pi(y_l) -> 0.

Whether that matters on real data depends on how the reference's log-ratios c are distributed:
:func:`reachable_fraction` takes them (from any reference model, summed or token-averaged
log-probs) and :func:`reference_logratios` computes them for an experiment config's reference.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..checks import check_beta
from ..divergences import Divergence, as_divergence
from ..losses import PreferenceLoss
from ..utils.stats import binomial_se

__all__ = [
    "loss_and_gradients",
    "relative_error",
    "paper_uh_supremum",
    "paper_reachability_threshold",
    "paper_optimal_logratio",
    "reachable_fraction",
    "reference_logratios",
]


def loss_and_gradients(
    loss: PreferenceLoss,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """A loss and its derivatives in log pi(y_w) and log pi(y_l), pair by pair.

    Args: the four (B,) log-prob tensors of every loss, and beta.

    Returns:
        (loss, dL/d log pi(y_w), dL/d log pi(y_l)), each (B,) and detached. Each pair's loss depends
        only on its own log-probs, so the gradient of the sum is the per-pair derivative.
    """
    pc = policy_chosen_logps.detach().clone().requires_grad_(True)
    pr = policy_rejected_logps.detach().clone().requires_grad_(True)
    value = loss(pc, pr, reference_chosen_logps, reference_rejected_logps, beta)  # (B,)
    d_chosen, d_rejected = torch.autograd.grad(value.sum(), (pc, pr))
    return value.detach(), d_chosen, d_rejected


def relative_error(approx: Tensor, reference: Tensor) -> Tensor:
    """|approx - reference| / |reference| elementwise, in float64; +inf where approx is NaN or
    infinite (unless it equals an infinite reference); where reference == 0, 0 if approx == 0 else
    +inf."""
    a, r = approx.to(torch.float64), reference.to(torch.float64)
    err = (a - r).abs() / r.abs()
    err = torch.where(a == r, torch.zeros_like(err), err)  # also covers inf == inf and 0 == 0
    err = torch.where(torch.isfinite(a) | (a == r), err, torch.full_like(err, math.inf))
    return torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)


def _target(beta: float) -> float:
    return 1.0 / (2.0 * check_beta(beta))  # IUPO's regression target 1/(2 beta), eq. (24)


def paper_uh_supremum(ref_logratio: Tensor, divergence: Divergence | str) -> Tensor:
    r"""sup over policies of the paper-form Uh (eq. 23) on a pair: sup f' - f'(e^c). Shape of c.

    ``ref_logratio`` is c = log pi_ref(y_w) - log pi_ref(y_l). For Jensen-Shannon this equals
    softplus(-c) = log(1 + e^{-c}); it is computed as the difference, so it carries an absolute
    error of a few ulps of the larger of sup f' and |f'(e^c)|. +inf where f' is unbounded above
    (reverse KL).
    """
    div = as_divergence(divergence)
    return div.f_prime_range[1] - div.f_prime_of_log(ref_logratio)


def paper_reachability_threshold(beta: float, divergence: Divergence | str) -> float:
    r"""c*(beta): the paper-form IUPO target 1/(2 beta) is reachable on a pair iff c < c*.

    c is the reference's own log-ratio log(pi_ref(y_w)/pi_ref(y_l)). Since f' is increasing,
    sup f' - f'(e^c) > T  <=>  c < log (f')^{-1}(sup f' - T). Returns +inf when f' is unbounded
    above (reverse KL, chi-squared: every pair can reach the target), -inf when sup f' - T is at or
    below inf f' (no pair can). Closed forms (pinned by tests): Jensen-Shannon -log(e^T - 1),
    forward KL -log T, alpha -log(alpha T) / alpha, with T = 1/(2 beta).

    Computed in float64 as log((f')^{-1}(sup f' - T)); for Jensen-Shannon this is exact to a few
    ulps while e^{-T} is representable, i.e. for beta > 1/1490.
    """
    div = as_divergence(divergence)
    lo, hi = div.f_prime_range
    s = hi - _target(beta)
    if s == math.inf:
        return math.inf
    if s <= lo:
        return -math.inf
    return math.log(div.f_prime_inverse(torch.tensor(s, dtype=torch.float64)).item())


def paper_optimal_logratio(
    ref_logratio: Tensor, beta: float, divergence: Divergence | str
) -> Tensor:
    r"""a*(c): the policy log-ratio log(pi(y_w)/pi(y_l)) where the paper-form Uh equals 1/(2 beta).

    a* = log (f')^{-1}(T + f'(e^c)), the unique zero of the paper-form IUPO loss on one pair; +inf
    where the target is unreachable (c >= c*, see :func:`paper_reachability_threshold`). IPO's is
    a* = c + T for every c. Same shape as ``ref_logratio``.
    """
    div = as_divergence(divergence)
    return torch.log(div.optimal_ratio(_target(beta) + div.f_prime_of_log(ref_logratio)))


def reachable_fraction(
    ref_logratios: Tensor, beta: float, divergence: Divergence | str
) -> tuple[float, float]:
    r"""(fraction, its binomial standard error) of pairs where the paper-form target is reachable.

    ``ref_logratios`` (N,) are the reference's c = log pi_ref(y_w) - log pi_ref(y_l), from summed or
    token-averaged log-probs of any reference model; a pair counts iff c < c*(beta)
    (:func:`paper_reachability_threshold`). Non-finite log-ratios are an error, not skipped.
    """
    if ref_logratios.ndim != 1 or len(ref_logratios) == 0:
        raise ValueError(
            f"ref_logratios must be a non-empty (N,) tensor of per-pair log-ratios, "
            f"got shape {tuple(ref_logratios.shape)}"
        )
    if not torch.isfinite(ref_logratios).all():
        bad = int((~torch.isfinite(ref_logratios)).sum())
        raise ValueError(f"ref_logratios has {bad} non-finite value(s): fix the log-probs first")
    c_star = paper_reachability_threshold(beta, divergence)
    p = (ref_logratios.double() < c_star).double().mean().item()
    return p, binomial_se(p, len(ref_logratios))


def reference_logratios(cfg, out_dir, device: torch.device | None = None) -> dict[str, Tensor]:
    """c = log pi_ref(y_w) - log pi_ref(y_l) of every preference-training pair of the experiment
    config ``cfg`` (``upo_ref.lm.config``), under its reference model: the SFT model the main job
    trains (checkpoints under ``out_dir/sft``, resumed when present), the model as built when the
    config has no SFT phase; for a partially fine-tuned model its top (SFT'd the same way when
    the config has SFT) run on the cached trunk states (``out_dir/trunk_cache``, computed when
    absent). Returns {"summed": (N,), "averaged":
    (N,)} float32, from summed and from per-token-averaged response log-probs of the same model."""
    from ..lm.experiment import load_experiment_data, prepare_reference  # the LM stack, lazily
    from ..lm.train import reference_logps
    from ..lm.trunk_cache import collate_cached

    device = device or torch.device("cpu")
    _, data = load_experiment_data(cfg)
    ref = prepare_reference(cfg, data, out_dir, device, progress=False)
    partial = cfg.model.train_layers is not None
    collate = functools.partial(collate_cached, pad_id=data.pad_id) if partial else None
    out = {}
    for name, average in (("summed", False), ("averaged", True)):
        if average == cfg.average_logps:  # the kind the experiment itself uses: already computed
            rc, rr = ref.reference["train"]
        else:
            rc, rr = reference_logps(
                ref.model,
                ref.pairs["train"],
                cfg.pref.eval_batch_size,
                data.pad_id,
                device,
                average,
                ref.logps.response_only,
                collate=collate,
                precision=ref.logps.precision,
            )
        out[name] = rc - rr  # (N,)
    return out
