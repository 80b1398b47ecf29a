"""Gradients of every loss with respect to each of its four log-prob inputs, against an 80-digit
reference (tests/reference.py), on random and extreme inputs, in float32 and float64; gradcheck.

The contract: for any input the loss accepts (it raises ValueError where the loss is not
representable), the gradient is never NaN; it is +-inf only where the true gradient exceeds the
dtype; 0 (or subnormal) only where the true gradient underflows; elsewhere it is accurate to
GRAD_RTOL plus what the conditioning of the problem allows (GRAD_ULPS ulps per unit of the
reference's condition number). So no loss returns a finite value with a NaN gradient.
"""

from __future__ import annotations

import math

import mpmath as mp
import pytest
import reference
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import F32_RTOL, F64_RTOL, betas, divergence_of, logp_batches

from upo_ref.divergences import DIVERGENCE_NAMES
from upo_ref.losses import dpo_loss, fdpo_loss, ipo_loss, iupo_loss

GRAD_RTOL = {torch.float32: F32_RTOL, torch.float64: F64_RTOL}
# Allowance for conditioning: a backward-stable computation is wrong by about eps times the
# condition number; 4 ulps per unit covers a few roundings of each perturbed intermediate.
GRAD_ULPS = 4

LOSSES = {
    "dpo": lambda logps, beta, div: dpo_loss(*logps, beta),
    "ipo": lambda logps, beta, div: ipo_loss(*logps, beta),
    "fdpo": lambda logps, beta, div: fdpo_loss(*logps, beta, div),
    "iupo_paper": lambda logps, beta, div: iupo_loss(*logps, beta, div, form="paper"),
    "iupo_kkt": lambda logps, beta, div: iupo_loss(*logps, beta, div, form="kkt"),
}
CASES = [("dpo", "reverse_kl"), ("ipo", "reverse_kl")] + [
    (kind, name) for kind in ("fdpo", "iupo_paper", "iupo_kkt") for name in DIVERGENCE_NAMES
]
CASE_IDS = [f"{k}-{n}" if k not in ("dpo", "ipo") else k for k, n in CASES]
DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64], ids=["float32", "float64"]
)


def check_gradients(kind, name, alpha, logps, beta):
    """Loss and gradients of one batch against the reference; True if the loss accepted it."""
    div = divergence_of(name, alpha)
    leaves = [x.clone().requires_grad_(True) for x in logps]
    try:
        loss = LOSSES[kind](leaves, beta, div)
    except ValueError as e:
        assert "not representable" in str(e)
        return False
    assert torch.isfinite(loss).all()
    grads = torch.autograd.grad(loss.sum(), leaves)
    dtype, finfo = logps[0].dtype, torch.finfo(logps[0].dtype)
    (a, b), (c, d) = reference.PAIRS[kind]
    d1s, d2s = (
        (logps[a] - logps[b]).tolist(),
        (logps[c] - logps[d]).tolist(),
    )  # as the loss forms them
    for i, (d1, d2) in enumerate(zip(d1s, d2s, strict=True)):
        _, (g1, g2), (D1, D2) = reference.loss_reference(kind, name, alpha, d1, d2, beta)
        for j, exact, which, D in (
            (a, g1, 1, D1),
            (b, -g1, 1, D1),
            (c, g2, 2, D2),
            (d, -g2, 2, D2),
        ):
            # A derivative factor below the smallest normal number is computed to an absolute
            # error of up to that number (subnormal or flushed to 0); a normal gradient made from
            # it carries that error times the other factors, exact / D.
            underflow = abs(exact / D) * finfo.tiny if 0 < abs(D) < finfo.tiny else 0
            got = grads[j][i].item()
            where = (
                f"{kind}/{div} d loss / d input {j} at {[x[i].item() for x in logps]}, beta={beta}"
                f" [{dtype}]: {got!r}, reference {mp.nstr(exact, 17)}"
            )
            assert not math.isnan(got), where
            if abs(exact) > finfo.max:
                assert math.isinf(got) and (got > 0) == (exact > 0), where
            elif abs(exact) < finfo.tiny:
                assert abs(got - exact) <= finfo.tiny, where
            elif abs(got - exact) > GRAD_RTOL[dtype] * abs(exact) + underflow:
                # then the conditioning must say why
                kappa = reference.gradient_condition(kind, name, alpha, d1, d2, beta, which)
                tol = GRAD_RTOL[dtype] + GRAD_ULPS * finfo.eps * kappa
                assert abs(got - exact) <= tol * abs(exact) + underflow, (
                    f"{where}, condition {mp.nstr(kappa, 3)}"
                )
    return True


def as_dtype(logps, dtype):
    return tuple(x.to(dtype) for x in logps)


@DTYPES
@pytest.mark.parametrize("kind, name", CASES, ids=CASE_IDS)
@settings(max_examples=15)
@given(logps=logp_batches(low=-1e4, size=3), beta=betas, alpha=st.floats(0.02, 0.98))
def test_loss_gradients_match_the_reference_on_random_inputs(kind, name, dtype, logps, beta, alpha):
    check_gradients(kind, name, alpha, as_dtype(logps, dtype), beta)


# Log-ratios where f' crosses 0, where Jensen-Shannon switches branch, and where exp(+-x)
# approaches and passes the float32 and float64 limits.
EXTREME = [-1e4, -130.0, -88.7, -40.0, -17.0, -1.0, 0.0, 1e-6, 17.0, 88.7, 130.0, 1e4]


@DTYPES
@pytest.mark.parametrize("kind, name", CASES, ids=CASE_IDS)
def test_loss_gradients_on_extreme_log_ratios(kind, name, dtype):
    # Every pair (d1, d2) of extreme log-ratios, as the log-ratios the loss takes; the other two
    # inputs are 0, so the rounded differences are the values themselves.
    d1, d2 = (
        torch.tensor(EXTREME, dtype=dtype).repeat_interleave(len(EXTREME)),
        torch.tensor(EXTREME, dtype=dtype).repeat(len(EXTREME)),
    )
    zero = torch.zeros_like(d1)
    (a, _), (c, _) = reference.PAIRS[kind]
    logps = [zero, zero, zero, zero]
    logps[a], logps[c] = d1, d2
    accepted = [
        check_gradients(kind, name, 0.5, tuple(x[i : i + 1] for x in logps), 0.1)
        for i in range(len(d1))
    ]
    assert sum(accepted) >= len(accepted) // 2  # the battery exercises the accepted inputs


def test_saturated_fdpo_has_loss_zero_and_gradient_zero_not_nan():
    # log pi(y_l)/pi_ref(y_l) = -100 nats: f'_FKL = -e^100 = -inf in float32, the loss is 0.
    pr = torch.tensor([-130.0], requires_grad=True)
    loss = fdpo_loss(
        torch.tensor([-30.0]), pr, torch.tensor([-30.0]), torch.tensor([-30.0]), 0.1, "forward_kl"
    )
    loss.backward()
    assert loss.item() == 0.0 and pr.grad.item() == 0.0


def test_ipo_raises_in_float16_like_its_equal_iupo():
    logps = tuple(torch.tensor([v], dtype=torch.float16) for v in (-300.0, -10.0, -10.0, -10.0))
    for fn in (lambda: ipo_loss(*logps, 0.1), lambda: iupo_loss(*logps, 0.1, "reverse_kl")):
        with pytest.raises(ValueError, match="not representable in torch.float16"):
            fn()


@pytest.mark.parametrize("kind, name", CASES, ids=CASE_IDS)
def test_gradcheck_in_float64(kind, name):
    g = torch.Generator().manual_seed(0)
    logps = tuple(
        (-20 * torch.rand(5, generator=g, dtype=torch.float64)).requires_grad_(True)
        for _ in range(4)
    )
    div = divergence_of(name, 0.3)
    assert torch.autograd.gradcheck(lambda *x: LOSSES[kind](x, 0.5, div), logps)
