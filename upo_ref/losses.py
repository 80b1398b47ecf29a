r"""Preference losses as pure functions of per-sequence log-probs (equation numbers: Sun et al.).

Every loss takes the same four tensors, each of shape (B,), one entry per preference pair
(x, y_w, y_l):

* ``policy_chosen_logps``      log pi(y_w | x)       summed over the response tokens
* ``policy_rejected_logps``    log pi(y_l | x)
* ``reference_chosen_logps``   log pi_ref(y_w | x)
* ``reference_rejected_logps`` log pi_ref(y_l | x)

and returns the per-example loss, shape (B,); average it yourself. Summed log-probs are the
default everywhere in upo_ref, as in the DPO reference code; ``upo_ref.lm.logprobs`` can average
over response tokens instead (``average=True``), which changes what beta means and is therefore
an explicit option, never a silent default. Nothing here needs log-probs to be <= 0: only
differences enter.

The divergence enters only through f' of a density ratio, always evaluated from its logarithm by
``Divergence.f_prime_of_log``, so no ratio exp(log_u) is ever formed and no loss overflows.

Summary (h, Uh defined below; f' of a log-ratio means f'(exp(log-ratio))):

=========  ===============================================  ======
loss       per-example value                                eq.
=========  ===============================================  ======
DPO        -log sigma(beta h)                               (4)
IPO        (h - 1/(2 beta))^2                               (9-10)
f-DPO      -log sigma(beta [f'(u_w) - f'(u_l)])             (5)
IUPO       (Uh - 1/(2 beta))^2                              (23-24)
=========  ===============================================  ======

Shift invariance (tested bit for bit on exactly representable inputs): log-probs are defined up
to what a response's tokenisation or a model's normaliser adds, so a loss should not see a constant
added where it cannot matter. DPO and IPO depend on h only and are unchanged by a constant added to
(a) one response's policy *and* reference log-prob, or (b) both responses of one model. f-DPO and
IUPO's kkt form depend on each response's log-ratio policy/reference and have (a) only; IUPO's
paper form depends on each model's chosen/rejected log-ratio and has (b) only. (Under reverse KL
every form is a function of h and has both.)

Gradients: every f' carries its own derivative (``Divergence.f_prime_of_log``), accurate where the
true one is a normal number. Where a loss saturates (f-DPO with f' = -inf on the rejected
response: loss 0) its gradient is 0, not NaN, and where a loss is not representable it raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_beta, check_logps
from .divergences import Divergence, as_divergence

__all__ = [
    "h_pi",
    "uh_pi",
    "dpo_loss",
    "ipo_loss",
    "fdpo_loss",
    "iupo_loss",
    "IUPO_FORMS",
    "PreferenceLoss",
    "LOSS_NAMES",
    "softplus",
]

IUPO_FORMS = ("paper", "kkt")

# torch's softplus returns x itself above its default threshold of 20, an error of log1p(e^-20),
# about 2e-9. Above 40, log1p(e^-x) < 5e-18 is below float64 rounding of x: returning x is exact.
SOFTPLUS_THRESHOLD = 40.0


def softplus(x: Tensor) -> Tensor:
    """log(1 + e^x) = -log sigma(-x), exact to rounding for every x (see SOFTPLUS_THRESHOLD)."""
    return F.softplus(x, threshold=SOFTPLUS_THRESHOLD)


def h_pi(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> Tensor:
    r"""IPO's h_pi(x, y_w, y_l), eq. (9), shape (B,):
    log(pi(y_w)/pi(y_l)) - log(pi_ref(y_w)/pi_ref(y_l))."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    return pi_logratios - ref_logratios


def uh_pi(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    divergence: Divergence | str,
    form: str = "paper",
) -> Tensor:
    r"""IUPO's unified preference function Uh_pi(x, y_w, y_l), shape (B,).

    ``form="paper"``, eq. (23) as printed: f' of the chosen/rejected ratio *within* each model,

    .. math:: Uh = f'\!\left(\frac{\pi(y_w)}{\pi(y_l)}\right) -
       f'\!\left(\frac{\pi_{ref}(y_w)}{\pi_{ref}(y_l)}\right).

    ``form="kkt"``, the form eq. (17) implies: f' of each response's policy/reference ratio,

    .. math:: Uh^{kkt} = f'\!\left(\frac{\pi(y_w)}{\pi_{ref}(y_w)}\right) -
       f'\!\left(\frac{\pi(y_l)}{\pi_{ref}(y_l)}\right).

    Why they differ: eq. (23) is obtained "by induction" from IPO's h, which can be grouped either
    way only because log turns a ratio of ratios into a difference of logs:
    log(a/b) - log(c/d) = log(a/c) - log(b/d). For any other f' that regrouping is false, and only
    the kkt form is what the KKT condition (17) says the optimum satisfies. Under reverse KL
    (f' = log + 1) both forms equal h (Prop. 4.1); under Jensen-Shannon they differ (tests pin
    both).
    """
    if form not in IUPO_FORMS:
        raise ValueError(
            f"form must be one of {IUPO_FORMS} (eq. 23 as printed, or the eq. 17 form), "
            f"got {form!r}"
        )
    f_prime_of_log = as_divergence(divergence).f_prime_of_log
    if form == "paper":
        return f_prime_of_log(policy_chosen_logps - policy_rejected_logps) - f_prime_of_log(
            reference_chosen_logps - reference_rejected_logps
        )
    return f_prime_of_log(policy_chosen_logps - reference_chosen_logps) - f_prime_of_log(
        policy_rejected_logps - reference_rejected_logps
    )


def _check_representable(loss: Tensor, divergence: Divergence | str, what: str) -> Tensor:
    """Raise, naming the cause, where a loss overflowed its dtype; never return inf/NaN silently."""
    finite = torch.isfinite(loss)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0, 0])
        div = as_divergence(divergence)
        if not div.f_prime_grows_exponentially:
            cause = (
                f"{div.name}'s f' grows at most linearly in the log-ratio, so only a diverged run "
                "(log-ratios near the dtype's limit, or a squared margin beyond float16's 65504) "
                "gets here; look at the log-probs of that pair, or compute the loss in float32"
            )
        else:
            cause = (
                f"{div.name}'s f' grows exponentially in the log-ratio, so f' (or the loss built "
                "from it) exceeds the dtype; use float64, the 'kkt' form (whose log-ratios are "
                "policy vs reference, not chosen vs rejected), or a divergence whose f' grows "
                "linearly (reverse_kl, jensen_shannon)"
            )
        raise ValueError(
            f"{what}: the loss is not representable in {loss.dtype} for {int((~finite).sum())} "
            f"pair(s), the first at index {i}. {cause}"
        )
    return loss


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    r"""DPO, eq. (4), shape (B,):
    -log sigma(beta log(pi(y_w)/pi_ref(y_w)) - beta log(pi(y_l)/pi_ref(y_l))).

    Written as softplus(-beta h) = -log sigma(beta h), which is finite for every finite beta h
    (:func:`softplus`, exact to rounding also above torch's default threshold); where beta h itself
    overflows the dtype (float16) it raises, as f-DPO with reverse KL does. Shift invariances: (a)
    and (b) of the module docstring.
    """
    check_logps(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    beta = check_beta(beta)
    h = h_pi(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return _check_representable(softplus(-beta * h), "reverse_kl", "dpo_loss")


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    r"""IPO, eq. (10): (h_pi - 1/(2 beta))^2, h_pi of eq. (9). (B,)

    The target 1/(2 beta) is finite, so unlike DPO the loss stops pushing once the policy's
    log-ratio margin exceeds the reference's by 1/(2 beta): IPO stays regularised towards pi_ref.
    Where the square overflows the dtype (|h| > 255 in float16) it raises, as IUPO with reverse KL
    does. Shift invariances: (a) and (b) of the module docstring.
    """
    check_logps(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    beta = check_beta(beta)
    h = h_pi(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    return _check_representable((h - 1 / (2 * beta)) ** 2, "reverse_kl", "ipo_loss")


def fdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    divergence: Divergence | str,
) -> Tensor:
    r"""f-DPO, eq. (5) (and eq. 21, Prop. 3.2): (B,)

    .. math:: -\log\sigma\!\left(\beta f'\!\left(\frac{\pi(y_w)}{\pi_{ref}(y_w)}\right) - \beta
       f'\!\left(\frac{\pi(y_l)}{\pi_{ref}(y_l)}\right)\right)

    With reverse KL, f' = log + 1 and the +1 cancels: f-DPO is DPO (section 2.4). Shift
    invariance: (a) of the module docstring only (a constant added to one response's policy and
    reference log-prob). Where f'(u_l) overflows to -inf the loss is 0 and so is its gradient.
    """
    check_logps(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    beta = check_beta(beta)
    margin = uh_pi(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        divergence,
        form="kkt",
    )  # f'(u_w) - f'(u_l)
    return _check_representable(softplus(-beta * margin), divergence, "fdpo_loss")


def iupo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
    divergence: Divergence | str,
    form: str = "paper",
) -> Tensor:
    r"""IUPO, eq. (24): (Uh_pi - 1/(2 beta))^2, Uh_pi of eq. (23) (``form="paper"``) or of the
    eq. (17) form (``form="kkt"``); see :func:`uh_pi` for why the two differ. (B,)

    Under reverse KL both forms reduce to IPO (Prop. 4.1). With Jensen-Shannon (eq. 26) f' < log 2,
    so in the paper form Uh < log 2 - f'(pi_ref(y_w)/pi_ref(y_l)) and the target 1/(2 beta) can be
    reached only by pairs whose reference log-ratio log(pi_ref(y_w)/pi_ref(y_l)) is below
    log(e^{log 2 - 1/(2 beta)} / (2 - e^{log 2 - 1/(2 beta)})), about -5.0 nats at beta = 0.1. On
    all other pairs the loss keeps pushing pi(y_w)/pi(y_l) up without bound, with a gradient that
    decays like (pi(y_l)/pi(y_w)): the regularisation IPO gets from its finite target is lost. In
    the kkt form the target is always reachable (pushing pi(y_l) down makes f'(u_l) -> -inf).
    ``notebooks/03_loss_zoo.ipynb`` works this out and plots it.

    Overflow: the paper form takes f' of log(pi(y_w)/pi(y_l)), which for summed log-probs of long
    responses is routinely hundreds of nats. Where f' grows exponentially (forward KL, alpha) its
    value is then beyond float32 and this function raises a ValueError rather than return inf/NaN.

    Shift invariance: the paper form has (b) of the module docstring only (a constant added to both
    responses of one model), the kkt form (a) only.
    """
    check_logps(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
    )
    beta = check_beta(beta)
    uh = uh_pi(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        divergence,
        form=form,
    )
    return _check_representable((uh - 1 / (2 * beta)) ** 2, divergence, "iupo_loss")


LOSS_NAMES = ("dpo", "ipo", "fdpo", "iupo")


@dataclass(frozen=True)
class PreferenceLoss:
    """A loss chosen by name, as a value: ``PreferenceLoss("iupo", "jensen_shannon")(pc, pr, rc,
    rr, beta)``.

    ``name`` is one of ``LOSS_NAMES``; ``divergence`` is required by ``fdpo`` and ``iupo`` and
    refused by ``dpo`` and ``ipo`` (which are reverse KL by definition); ``form`` is IUPO's
    (``"paper"`` or ``"kkt"``). Used by the trainer and the bandit experiments so that a run is
    described by data.
    """

    name: str
    divergence: Divergence | str | None = None
    form: str = "paper"

    def __post_init__(self):
        if self.name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {self.name!r}; choose one of {', '.join(LOSS_NAMES)}")
        if self.name in ("dpo", "ipo") and self.divergence is not None:
            raise ValueError(
                f"{self.name} is defined with reverse KL and takes no divergence; use "
                f"{'fdpo' if self.name == 'dpo' else 'iupo'} for another divergence"
            )
        if self.name in ("fdpo", "iupo"):
            if self.divergence is None:
                raise ValueError(
                    f"{self.name} needs a divergence, e.g. PreferenceLoss({self.name!r}, "
                    f"'jensen_shannon')"
                )
            object.__setattr__(self, "divergence", as_divergence(self.divergence))
        if self.form not in IUPO_FORMS:
            raise ValueError(f"form must be one of {IUPO_FORMS}, got {self.form!r}")
        if self.name != "iupo" and self.form != "paper":
            raise ValueError(f"form={self.form!r} applies to iupo only, not {self.name!r}")

    def __call__(
        self,
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    ) -> Tensor:
        args = (
            policy_chosen_logps,
            policy_rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
            beta,
        )
        if self.name == "dpo":
            return dpo_loss(*args)
        if self.name == "ipo":
            return ipo_loss(*args)
        if self.name == "fdpo":
            return fdpo_loss(*args, self.divergence)
        return iupo_loss(*args, self.divergence, form=self.form)

    @property
    def label(self) -> str:
        """Short display name, e.g. 'IPO', 'JS-IUPO', 'f-DPO (alpha=0.5)', 'JS-IUPO (kkt)'."""
        base = {"dpo": "DPO", "ipo": "IPO", "fdpo": "f-DPO", "iupo": "IUPO"}[self.name]
        if self.divergence is None:
            return base
        short = self.divergence.short_label
        out = f"f-DPO ({short})" if self.name == "fdpo" else f"{short}-IUPO"
        return out + (" (kkt)" if self.form == "kkt" else "")
