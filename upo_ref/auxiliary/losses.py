r"""Auxiliary-objective UPO (Badrinath et al., arXiv 2405.17956): a preference loss plus an
advantage-weighted maximum-likelihood term for a designer reward that is not a preference.

.. math::

    L_{UPO} = L_{pref} + \gamma \, L_{\pi}, \qquad
    L_{\pi}(x, y) = -\, w\big(A_\theta(x, y)\big) \log \pi_\phi(y \mid x), \qquad
    A_\theta(x, y) = R(x, y) - V_\theta(x),

with ``L_pref`` DPO (``upo_ref.losses.dpo_loss``) or KTO (:func:`kto_loss`), ``R`` an auxiliary
reward (``upo_ref.auxiliary.rewards``: readability, safety), and ``V_theta`` a value network fitted
to the same offline data (:class:`ValueNetwork`, :func:`expectile_loss`). MODPO (Zhou et al. 2023),
the main multi-objective baseline the paper compares with, is :func:`modpo_loss`.

Like ``upo_ref.losses``, every loss here is a pure function of per-sequence tensors of shape (B,)
(summed log-probs, per-response rewards, per-prompt values) returning per-example losses (B,).

What is a reconstruction
------------------------
This implementation is built from the paper's abstract and a summary card, not its full text, and
no code of theirs is public. The card gives the decomposition above, A = R - V with V "a value
network trained on the same offline data", "alpha/beta temperature scales", a KL regulariser, and
gamma = 0 reducing to the base method. Everything below beyond that is a reconstruction, named
where it is made:

* **weight function** w(A) = exp(min(A / alpha, log c)), c = :data:`WEIGHT_CAP` (AWR, Peng et al.
  2019; IQL's policy extraction, Kostrikov et al. 2021, which clamps exp(A / alpha) at 100). It is
  the weighted-MLE projection of the KL-regularised improvement step
  argmax_pi E_pi[A] - alpha KL(pi || mu), whose solution is mu(y|x) exp(A(x, y) / alpha) / Z(x):
  this is where the card's KL regularisation of the auxiliary term lives, with alpha its strength.
  No separate KL term is added (on offline samples y ~ mu it would not estimate KL(pi || pi_ref)).
* **value loss**: expectile regression (IQL); tau = 0.5 gives least squares, V = E_mu[R | x], the
  advantage baseline of AWR, and is the default the toy experiments use.
* **pairs**: with DPO as the base, each pair's two responses are two (x, y, R) samples of the
  auxiliary term; L_pi is averaged over them (:func:`upo_dpo_loss`).
* **several rewards**: a weighted sum with explicit weights, before the value network
  (:func:`combine_rewards`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..checks import check_beta, check_logps
from ..losses import dpo_loss, h_pi, softplus

__all__ = [
    "WEIGHT_CAP",
    "advantages",
    "advantage_weights",
    "auxiliary_loss",
    "expectile_loss",
    "ValueNetwork",
    "fit_value_network",
    "last_token_pool",
    "kto_reference_point",
    "kto_loss",
    "modpo_loss",
    "combine_rewards",
    "upo_loss",
    "upo_dpo_loss",
    "upo_kto_loss",
]

# The largest weight one example can get, relative to an example with A = 0. IQL's code clamps
# exp(A / alpha) at 100 for the same reason: one high-advantage sample (or one outlier reward)
# must not dominate a batch. The clamp acts on the exponent (A / alpha <= log 100), so the weight is
# finite for every advantage, +-1e30 included and in float32, where exp overflows above 88.7.
WEIGHT_CAP = 100.0


# --- input checks for the arguments ``upo_ref.checks`` does not cover ---------------------------
def _check_number(value: float, name: str, what: str, allow_zero: bool = False) -> float:
    """A finite real number > 0 (>= 0 with ``allow_zero``); returns it as a float."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a single number, got a tensor of shape {tuple(value.shape)}"
            )
        value = value.item()
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound} ({what}), got {value!r}")
    return float(value)


def _check_alpha(alpha: float) -> float:
    return _check_number(
        alpha, "alpha", "the temperature of the advantage weights exp(A / alpha), e.g. 1.0"
    )


def _check_cap(cap: float) -> float:
    return _check_number(
        cap,
        "cap",
        "the largest weight; without one exp(A / alpha) overflows, default WEIGHT_CAP = "
        f"{WEIGHT_CAP:g}",
    )


def _check_tau(tau: float) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0.0 < tau < 1.0:
        raise ValueError(
            "tau must be a number strictly between 0 and 1 (the expectile; 0.5 is least squares), "
            f"got {tau!r}"
        )
    return float(tau)


def _check_vectors(*tensors: Tensor, names: tuple[str, ...], finite: bool = True) -> None:
    """Rewards, values, advantages: 1-D floating tensors of one shape (B,) and dtype; finite, or
    with ``finite=False`` at least not NaN (an advantage of +-inf still has a finite weight)."""
    first = tensors[0]
    for x, name in zip(tensors, names, strict=True):
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 1:
            got = (
                f"shape {tuple(x.shape)}, dtype {x.dtype}"
                if isinstance(x, Tensor)
                else type(x).__name__
            )
            raise ValueError(
                f"{name} must be a 1-D floating-point torch.Tensor of shape (B,), got {got}"
            )
        if x.shape != first.shape or x.dtype != first.dtype:
            raise ValueError(
                f"{name} is {tuple(x.shape)} {x.dtype} but {names[0]} is {tuple(first.shape)} "
                f"{first.dtype}: they must have one shape (B,) and one dtype"
            )
        bad = ~torch.isfinite(x) if finite else torch.isnan(x)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name} has {int(bad.sum())} {'non-finite' if finite else 'NaN'} value(s), the "
                f"first {x[i].item()!r} at index {i}; look for a reward model or value network "
                "that overflowed"
            )


def _check_all_finite(x: Tensor, name: str) -> None:
    """Any-shape tensor of rewards or features: finite everywhere."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name} has {int((~torch.isfinite(x)).sum())} non-finite value(s); rewards and "
            "features must be finite"
        )


def _check_mask(mask: Tensor, like: Tensor, name: str) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(
            f"{name} must be a torch.bool tensor of shape (B,) (True = desirable), got "
            f"{type(mask).__name__ if not isinstance(mask, Tensor) else mask.dtype}"
        )
    if mask.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but the log-probs have shape {tuple(like.shape)}"
        )


# --- advantages and their weights ----------------------------------------------------------------
def advantages(rewards: Tensor, values: Tensor) -> Tensor:
    r"""A_theta(x, y) = R(x, y) - V_theta(x), with V detached: the policy loss never trains V. (B,)

    ``rewards`` R(x, y) and ``values`` V(x) are (B,), one per response; a prompt's value is repeated
    for each of its responses.
    """
    _check_vectors(rewards, values, names=("rewards", "values"))
    return rewards - values.detach()


def advantage_weights(advantages: Tensor, alpha: float, cap: float = WEIGHT_CAP) -> Tensor:
    r"""w(A) = exp(min(A / alpha, log cap)), detached; shape of ``advantages``. (Reconstruction:
    AWR/IQL.)

    Finite and in [0, cap] for every finite or infinite advantage: the exponent is clamped *before*
    exp, so nothing overflows (clamping exp(A / alpha) afterwards would give inf, then NaN
    gradients). A = -inf (or A / alpha below about -745 in float64, -104 in float32) gives weight 0.
    Small alpha approaches "imitate only the best response" (weights concentrate on the largest A);
    large alpha approaches plain maximum likelihood (all weights 1).

    Note that with these weights V(x) only rescales all responses of one prompt by exp(-V(x) /
    alpha): within a prompt the relative weights are exp((R_i - R_j) / alpha) whatever V is. V
    matters for how prompts are weighted against each other and for where the cap binds.
    """
    alpha = _check_alpha(alpha)
    cap = _check_cap(cap)
    _check_vectors(advantages, names=("advantages",), finite=False)
    exponent = torch.clamp(advantages.detach() / alpha, max=math.log(cap))
    return torch.exp(exponent)


def auxiliary_loss(
    policy_logps: Tensor, advantages: Tensor, alpha: float, cap: float = WEIGHT_CAP
) -> Tensor:
    r"""UPO's auxiliary term L_pi(x, y) = -w(A(x, y)) log pi(y|x), advantage-weighted MLE. (B,)

    Its gradient with respect to log pi(y|x) is exactly -w(A): every response in the data has its
    log-probability raised (w > 0), in proportion to its weight, so responses with A > 0 are raised
    more than those with A < 0, whose weight is below 1 and tends to 0 as A -> -inf. (Probability
    mass moves towards high-advantage responses because pi is normalised.) Alone, the term is
    minimised by pi(y|x) proportional to the weighted empirical distribution, mu(y|x) w(A(x, y)).
    """
    check_logps(policy_logps, names=("policy_logps",))
    _check_vectors(policy_logps, advantages, names=("policy_logps", "advantages"), finite=False)
    return -advantage_weights(advantages, alpha, cap) * policy_logps


# --- the value network ---------------------------------------------------------------------------
def expectile_loss(values: Tensor, targets: Tensor, tau: float) -> Tensor:
    r"""Expectile regression (IQL, Kostrikov et al. 2021): L_tau(u) = |tau - 1(u < 0)| u^2, u = R -
    V. (B,)

    ``values`` V(x) (B,) are trained towards ``targets`` R(x, y) (B,). tau = 0.5 gives half the
    squared error, whose minimiser is the mean; tau > 0.5 penalises V < R more, so the minimiser
    (the tau-expectile of R) rises with tau towards max R; tau < 0.5 moves it towards min R.
    """
    tau = _check_tau(tau)
    _check_vectors(values, targets, names=("values", "targets"))
    u = targets - values
    weight = torch.abs(tau - (u < 0).to(u.dtype))  # |tau - 1(u < 0)|, in u's dtype
    return weight * u.square()


class ValueNetwork(nn.Module):
    """V_theta(x): a small MLP from a fixed prompt feature vector (B, in_features) to a value (B,).

    ``hidden_sizes=()`` makes it a linear head, e.g. on the reference model's pooled hidden state
    (:func:`last_token_pool`) for a language model. Tanh hidden units; the last layer starts at
    zero, so V = 0 and A = R before training.
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int] = (64,),
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(
                f"in_features must be a positive int (the feature size), got {in_features!r}"
            )
        sizes = [in_features, *hidden_sizes]
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive ints, got {tuple(hidden_sizes)!r}")
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b, dtype=dtype), nn.Tanh()]
        out = nn.Linear(sizes[-1], 1, dtype=dtype)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)
        self.in_features = in_features

    def forward(self, features: Tensor) -> Tensor:
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(
                f"features must have shape (B, {self.in_features}), got {tuple(features.shape)}"
            )
        return self.net(features).squeeze(-1)  # (B, 1) -> (B,)


def fit_value_network(
    value_network: ValueNetwork,
    features: Tensor,
    rewards: Tensor,
    tau: float = 0.5,
    steps: int = 500,
    lr: float = 1e-2,
) -> list[float]:
    """Fit V on offline (x, R) data by full-batch Adam on the mean expectile loss; returns the loss
    per step.

    ``features`` (N, in_features) holds each response's prompt features, ``rewards`` (N,) its
    reward. In place; deterministic given the network's initial weights.
    """
    _check_tau(tau)
    if features.dim() != 2 or features.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"features (N, d) and rewards (N,) disagree: {tuple(features.shape)} vs "
            f"{tuple(rewards.shape)}"
        )
    _check_all_finite(features, "features")
    _check_vectors(rewards, names=("rewards",))
    optimiser = torch.optim.Adam(value_network.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        optimiser.zero_grad()
        loss = expectile_loss(value_network(features), rewards, tau).mean()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    return history


def last_token_pool(hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
    """The hidden state of each sequence's last non-padding token: (B, T, H), (B, T) -> (B, H).

    The value head's input for a language model: V(x) reads the reference model's state after the
    prompt. Right padding assumed (mask = 1 then 0); a row with no token raises.
    """
    if hidden_states.dim() != 3 or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            "hidden_states must be (B, T, H) and attention_mask (B, T); got "
            f"{tuple(hidden_states.shape)} and {tuple(attention_mask.shape)}"
        )
    lengths = attention_mask.sum(dim=1)  # (B,)
    if bool((lengths == 0).any()):
        raise ValueError(
            "attention_mask has a row with no token; every prompt needs at least one token"
        )
    index = (lengths - 1).long()  # (B,)
    return hidden_states[torch.arange(hidden_states.shape[0], device=index.device), index]  # (B, H)


# --- KTO -----------------------------------------------------------------------------------------
def kto_reference_point(policy_kl_logps: Tensor, reference_kl_logps: Tensor) -> Tensor:
    r"""KTO's reference point z0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)]),
    detached. ()

    As in ContextualAI/HALOs: (x_i, y'_i) are *mismatched* pairs (each prompt with another example's
    response), so the mean log-ratio is a batch estimate of KL(pi || pi_ref) that needs no sampling.
    It is detached (no gradient flows through the reference point) and clamped at 0 because a KL is
    non-negative. Returns a 0-dim tensor.
    """
    check_logps(
        policy_kl_logps, reference_kl_logps, names=("policy_kl_logps", "reference_kl_logps")
    )
    return (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    z0: Tensor | float,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> Tensor:
    r"""KTO (Ethayarajh et al. 2024, eq. 7; HALOs' ``KTOTrainer``), one loss per response. (B,)

    With r = log(pi(y|x) / pi_ref(y|x)) and z0 the reference point (:func:`kto_reference_point`):

    * desirable y:   lambda_D (1 - sigma(beta (r - z0)))
    * undesirable y: lambda_U (1 - sigma(beta (z0 - r)))

    computed as lambda sigma(-t), which equals lambda (1 - sigma(t)) and keeps full precision where
    sigma(t) is near 1. ``desirable`` is a bool (B,) tensor; from preference pairs, chosen responses
    are desirable and rejected ones undesirable. The loss lies in (0, lambda) for every finite r.
    """
    check_logps(policy_logps, reference_logps, names=("policy_logps", "reference_logps"))
    _check_mask(desirable, policy_logps, "desirable")
    beta = check_beta(beta)
    lambda_d = _check_number(lambda_d, "lambda_d", "KTO's weight of desirable responses, e.g. 1.0")
    lambda_u = _check_number(
        lambda_u, "lambda_u", "KTO's weight of undesirable responses, e.g. 1.0"
    )
    # z0 is a constant: no gradient flows through the reference point.
    z0 = torch.as_tensor(z0, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    if z0.numel() != 1:
        raise ValueError(
            f"z0 must be a single number (the batch KL estimate), got shape {tuple(z0.shape)}"
        )
    _check_all_finite(z0, "z0")
    r = policy_logps - reference_logps  # log pi / pi_ref
    desirable_losses = lambda_d * torch.sigmoid(-beta * (r - z0))
    undesirable_losses = lambda_u * torch.sigmoid(-beta * (z0 - r))
    return torch.where(desirable, desirable_losses, undesirable_losses)


# --- MODPO, the baseline --------------------------------------------------------------------------
def modpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_margin_rewards: Tensor,
    rejected_margin_rewards: Tensor,
    beta: float,
    w: Sequence[float],
) -> Tensor:
    r"""MODPO (Zhou et al. 2023, ZHZisZZ/modpo ``modpo_loss``): DPO with the other objectives as a
    margin. (B,)

    .. math::

        -\log\sigma\!\Big(\tfrac{1}{w_0}\big[\beta h_\pi
            - w_{1:}\cdot(r_{1:}(x, y_w) - r_{1:}(x, y_l))\big]\Big)

    ``w = (w_0, w_1, ..., w_K)``: w_0 > 0 weighs the preference being trained on, w_k the k-th
    margin reward. ``chosen_margin_rewards``/``rejected_margin_rewards`` are (B,) for one other
    objective or (B, K) for K. Its optimum has beta log(pi / pi_ref) = w_0 r_pref + sum_k w_k r_k (+
    a function of x): the KL-regularised optimum of the weighted reward. With w = (1,) (no margin)
    it is DPO.
    """
    check_logps(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    beta = check_beta(beta)
    w = [
        float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else math.nan for v in w
    ]
    if len(w) < 1 or not all(math.isfinite(v) for v in w) or w[0] <= 0:
        raise ValueError(
            "w must be finite numbers (w_0 > 0 for the preference, then one per margin reward), "
            f"got {w!r}"
        )
    chosen_m, rejected_m = chosen_margin_rewards, rejected_margin_rewards
    if chosen_m.dim() == 1:
        chosen_m, rejected_m = chosen_m.unsqueeze(-1), rejected_m.unsqueeze(-1)  # (B,) -> (B, 1)
    B = policy_chosen_logps.shape[0]
    for m, name in ((chosen_m, "chosen_margin_rewards"), (rejected_m, "rejected_margin_rewards")):
        if m.shape != (B, len(w) - 1):
            raise ValueError(
                f"{name} must be (B,) or (B, K) with B = {B} and K = len(w) - 1 = {len(w) - 1}, "
                f"got {tuple(m.shape)}"
            )
        _check_all_finite(m, name)
    w_rest = torch.tensor(w[1:], dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
    margin = (chosen_m - rejected_m) @ w_rest  # (B, K) @ (K,) -> (B,)
    h = h_pi(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    logits = (beta * h - margin) / w[0]
    return softplus(-logits)


# --- several rewards, and the combined loss -------------------------------------------------------
def combine_rewards(rewards: Tensor, weights: Sequence[float]) -> Tensor:
    r"""R = sum_k c_k R_k for rewards (B, K) and explicit weights c (K,): (B,). (Reconstruction.)

    A linear scalarisation, taken *before* the value network, so one V fits the combined reward and
    A = R - V. The weights carry the units: Flesch reading ease spans about 0-100 while a safety
    logit spans a few units, so choose c (or rescale each R_k) with that in mind; nothing is
    normalised silently.
    """
    if rewards.dim() != 2 or rewards.shape[1] != len(weights):
        raise ValueError(
            f"rewards must be (B, K) with K = len(weights) = {len(weights)}, got "
            f"{tuple(rewards.shape)}"
        )
    _check_all_finite(rewards, "rewards")
    c = torch.tensor([float(v) for v in weights], dtype=rewards.dtype, device=rewards.device)
    _check_all_finite(c, "weights")
    return rewards @ c  # (B, K) @ (K,) -> (B,)


def upo_loss(preference_losses: Tensor, auxiliary_losses: Tensor, gamma: float) -> Tensor:
    r"""The UPO objective per example: L_pref + gamma L_pi. (B,)

    gamma = 0 returns the base loss exactly (x + 0 * finite = x in floating point), with exactly the
    base gradients; larger gamma trades preference fit for auxiliary reward.
    """
    gamma = _check_number(
        gamma, "gamma", "the weight of the auxiliary term; 0 is the base method", allow_zero=True
    )
    if preference_losses.shape != auxiliary_losses.shape:
        raise ValueError(
            f"preference_losses {tuple(preference_losses.shape)} and auxiliary_losses "
            f"{tuple(auxiliary_losses.shape)} must have the same shape (B,)"
        )
    return preference_losses + gamma * auxiliary_losses


def upo_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    values: Tensor,
    beta: float,
    gamma: float,
    alpha: float,
    cap: float = WEIGHT_CAP,
) -> Tensor:
    r"""UPO with DPO as the base: DPO + gamma (L_pi(x, y_w) + L_pi(x, y_l)) / 2. (B,)

    ``chosen_rewards``/``rejected_rewards`` are the auxiliary rewards R(x, y_w), R(x, y_l);
    ``values`` is V(x), shared by both responses of a pair. Averaging L_pi over the pair's two
    responses is a reconstruction: it weighs every response of the data equally, so gamma is "per
    response".
    """
    pref = dpo_loss(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    )
    a_w, a_l = advantages(chosen_rewards, values), advantages(rejected_rewards, values)
    aux_w = auxiliary_loss(policy_chosen_logps, a_w, alpha, cap)  # L_pi(x, y_w)
    aux_l = auxiliary_loss(policy_rejected_logps, a_l, alpha, cap)  # L_pi(x, y_l)
    aux = (aux_w + aux_l) / 2
    return upo_loss(pref, aux, gamma)


def upo_kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    z0: Tensor | float,
    rewards: Tensor,
    values: Tensor,
    beta: float,
    gamma: float,
    alpha: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    cap: float = WEIGHT_CAP,
) -> Tensor:
    r"""UPO with KTO as the base: KTO + gamma L_pi, one loss per response. (B,)"""
    pref = kto_loss(policy_logps, reference_logps, desirable, z0, beta, lambda_d, lambda_u)
    aux = auxiliary_loss(policy_logps, advantages(rewards, values), alpha, cap)
    return upo_loss(pref, aux, gamma)
