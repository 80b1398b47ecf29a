"""Each divergence: f(1) = 0, convexity, f' = d f/du, (f')^{-1}, the stable log-space f',
limits, errors."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import reference
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import ADMISSIBLE_NAMES, F32_RTOL, F64_RTOL, divergence_of, divergences

from upo_ref.divergences import DIVERGENCE_NAMES, AlphaDivergence, get_divergence

EPS64 = torch.finfo(torch.float64).eps
# A formula that subtracts terms of size O(1) leaves an absolute error of a few ulps of 1.
ROUNDING_ATOL = 16 * EPS64

ratios = st.floats(min_value=1e-4, max_value=1e4)
SMOOTH = tuple(n for n in DIVERGENCE_NAMES if n != "total_variation")


def t64(*xs):
    return torch.tensor(xs, dtype=torch.float64)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@given(alpha=st.floats(0.01, 0.99))
def test_f_of_one_is_zero(name, alpha):
    assert abs(divergence_of(name, alpha).f(t64(1.0)).item()) <= ROUNDING_ATOL


@given(div=divergences(), u=ratios, v=ratios, lam=st.floats(0.0, 1.0))
def test_f_is_convex(div, u, v, lam):
    fu, fv = div.f(t64(u)).item(), div.f(t64(v)).item()
    mid = div.f(t64(lam * u + (1 - lam) * v)).item()
    assert mid <= lam * fu + (1 - lam) * fv + F64_RTOL * (abs(fu) + abs(fv) + 1)


def direct_f_prime_atol(div, u: float) -> float:
    """Absolute rounding error of the direct formulas for f' near u = 1, where f'(u) -> f'(1).

    Each is a difference of O(1) terms (log u + 1, 2u - 2, 1 - u^{-alpha}, log of a ratio near 2),
    so it carries a few ulps of the larger term: ROUNDING_ATOL (1 + |log u|), and for the alpha-
    divergence that difference is divided by alpha. (Autograd of f is no reference here: its
    derivative of the alpha-divergence's f sums (1 - alpha) u^{-alpha} - (1 - alpha), divided by
    alpha (alpha - 1), and near u = 1 is several times less accurate than f' itself.)
    """
    return ROUNDING_ATOL * (1 + abs(math.log(u))) / getattr(div, "alpha", 1.0)


@given(div=divergences(SMOOTH), u=ratios)
def test_f_prime_is_the_derivative_of_f(div, u):
    # The reference: the book's f in 80 digits, differentiated numerically (tests/reference.py).
    alpha = getattr(div, "alpha", 0.5)
    exact = reference.f_prime_book(div.name, u, alpha)
    got = div.f_prime(t64(u)).item()
    assert abs(got - exact) <= F64_RTOL * abs(exact) + direct_f_prime_atol(div, u), (
        f"{div}: f'({u!r}) = {got!r}, derivative of f {float(exact)!r}"
    )
    # and the f that is differentiated is the code's f
    f_exact = reference.f_book(div.name, reference.mp.mpf(u), alpha)
    assert abs(div.f(t64(u)).item() - f_exact) <= F64_RTOL * abs(f_exact) + ROUNDING_ATOL * (
        1 + u
    ) / getattr(div, "alpha", 1.0)


def test_total_variation_f_prime_is_the_subgradient_of_f():
    tv = get_divergence("total_variation")
    x = t64(0.5, 1.0, 2.0).requires_grad_(True)
    (autograd,) = torch.autograd.grad(tv.f(x).sum(), x)
    assert tv.f_prime(t64(0.5, 1.0, 2.0)).tolist() == autograd.tolist() == [-0.5, 0.0, 0.5]


@given(div=divergences(SMOOTH), u=ratios)
def test_f_prime_inverse_undoes_f_prime(div, u):
    x = t64(u).requires_grad_(True)
    t = div.f_prime(x)
    (f_second,) = torch.autograd.grad(t.sum(), x)
    # Inverting a flat function loses digits: the relative condition number of t -> u is
    # |f'(u)| / (u f''(u)) (e.g. ~0.7 (1 + u) for Jensen-Shannon, whose f' flattens towards log 2).
    cond = abs(t.item()) / (u * f_second.item())
    back = div.f_prime_inverse(t.detach()).item()
    assert abs(back - u) <= 32 * EPS64 * (1 + cond) * u


@given(div=divergences(SMOOTH), log_u=st.floats(-30.0, 30.0))
def test_stable_f_prime_of_log_matches_naive_f_prime_where_safe(div, log_u):
    stable = div.f_prime_of_log(t64(log_u))
    naive = div.f_prime(torch.exp(t64(log_u)))
    atol = ROUNDING_ATOL * (1 + abs(log_u)) / (div.alpha if isinstance(div, AlphaDivergence) else 1)
    torch.testing.assert_close(stable, naive, rtol=F64_RTOL, atol=atol)


# --- stability against a 60-digit reference ----------------------------------------------------
def reference_f_prime_of_log(name: str, x: float, alpha: float) -> tuple[Decimal, Decimal]:
    """f'(exp(x)) and its derivative in x, in 60-digit decimal arithmetic (exact input x)."""
    with localcontext() as ctx:
        # e^x - 1 cancels to ~x: carry enough digits that 60 of them survive for tiny |x|.
        ctx.prec = 60 + (int(-math.log10(abs(x))) if 0 < abs(x) < 1 else 0)
        X, A, one = Decimal(x), Decimal(alpha), Decimal(1)
        u = X.exp()
        if name == "reverse_kl":
            return X + one, one
        if name == "forward_kl":
            return -(-X).exp(), (-X).exp()
        if name == "jensen_shannon":
            return (2 * u / (one + u)).ln(), one / (one + u)
        if name == "alpha":
            return (one - (-A * X).exp()) / A, (-A * X).exp()
        if name == "chi_squared":
            return 2 * (u - one), 2 * u
        if name == "total_variation":
            return Decimal((x > 0) - (x < 0)) / 2, Decimal(0)
    raise AssertionError(name)


EXTREME_LOG_U = [
    -1e4,
    -3e3,
    -745.0,
    -700.0,
    -100.0,
    -88.7,
    -50.0,
    -10.0,
    -1.0000001,
    -1.0,
    -0.9999999,
    -0.1,
    -1e-4,
    -1e-10,
    -1e-30,
    0.0,
    1e-30,
    1e-10,
    1e-4,
    0.1,
    1.0,
    10.0,
    50.0,
    88.7,
    100.0,
    700.0,
    745.0,
    3e3,
    1e4,
]
STABILITY = {torch.float32: F32_RTOL, torch.float64: F64_RTOL}
# Gradients: d/dx f'(e^x) = e^x f''(e^x) to relative accuracy wherever it is a normal number of
# the dtype, with no absolute slack (an absolute tolerance would hide a derivative that cancels
# to 0, as expm1's backward does for e^{-alpha x} beyond alpha x ~ 17 in float32).
GRAD_RTOL = {torch.float32: F32_RTOL, torch.float64: F64_RTOL}


def _check_gradient(name, xi, gi, dref, finfo, dtype):
    where = f"d/dx {name}({xi!r}) [{dtype}] = {gi!r}, reference {dref:.17e}"
    assert not math.isnan(gi), where
    if abs(dref) > Decimal(finfo.max):
        assert math.isinf(gi) and (gi > 0) == (dref > 0), where
    elif abs(dref) >= Decimal(finfo.tiny):  # a normal number: relative accuracy, never 0
        assert abs(Decimal(gi) - dref) <= Decimal(GRAD_RTOL[dtype]) * abs(dref), where
    else:  # underflows (or is 0): 0 or a subnormal, within the dtype's smallest normal
        assert abs(Decimal(gi) - dref) <= Decimal(finfo.tiny), where


def _check_stability(name: str, alpha: float, xs: list[float], dtype: torch.dtype) -> None:
    div = divergence_of(name, alpha)
    finfo = torch.finfo(dtype)
    x = torch.tensor(xs, dtype=dtype).requires_grad_(True)
    value = div.f_prime_of_log(x)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert not torch.isnan(value).any(), f"{name}: NaN value"
    assert not torch.isnan(grad).any(), f"{name}: NaN gradient"
    for xi, vi, gi in zip(x.detach().tolist(), value.detach().tolist(), grad.tolist(), strict=True):
        ref, dref = reference_f_prime_of_log(name, xi, alpha)
        _check_gradient(name, xi, gi, dref, finfo, dtype)
        representable = abs(ref) <= Decimal(finfo.max)
        if not representable:
            assert math.isinf(vi) and (vi > 0) == (ref > 0), (
                f"{name}({xi}) = {vi}, true value {ref:.3e}"
            )
            continue
        assert math.isfinite(vi), (
            f"{name}({xi}) = {vi} but the true value {ref:.6e} is representable"
        )
        err = abs(Decimal(vi) - ref)
        assert err <= Decimal(STABILITY[dtype]) * abs(ref) + Decimal(finfo.tiny), (
            f"{name}({xi!r}) [{dtype}] = {vi!r}, reference {ref:.17e}, "
            f"relative error {err / max(abs(ref), Decimal(finfo.tiny)):.2e}"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_f_prime_of_log_is_stable_at_the_extremes(name, dtype):
    for alpha in (0.01, 0.5, 0.99):
        _check_stability(name, alpha, EXTREME_LOG_U, dtype)


# Dense grids where a stable form switches branch (Jensen-Shannon at -1), where f' crosses 0, and
# across the range where expm1's backward used to cancel (alpha x ~ 17 in float32, ~ 37 in float64).
DENSE_LOG_U = sorted(
    set(
        torch.linspace(-1.01, -0.99, 41, dtype=torch.float64).tolist()
        + torch.linspace(-1e-6, 1e-6, 41, dtype=torch.float64).tolist()
        + torch.linspace(-120.0, 120.0, 241, dtype=torch.float64).tolist()
        + torch.linspace(-800.0, 800.0, 161, dtype=torch.float64).tolist()
    )
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_f_prime_of_log_and_its_gradient_on_dense_grids(name, dtype):
    for alpha in (0.05, 0.5, 0.95):
        xs = torch.tensor(DENSE_LOG_U, dtype=dtype).tolist()  # exactly the dtype's numbers
        _check_stability(name, alpha, xs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@given(
    name=st.sampled_from(DIVERGENCE_NAMES),
    alpha=st.floats(0.01, 0.99),
    xs=st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=8),
)
def test_f_prime_of_log_is_stable_on_random_log_ratios(dtype, name, alpha, xs):
    _check_stability(name, alpha, xs, dtype)


# --- alpha-divergence limits ---------------------------------------------------------------------
@given(u=st.floats(1e-2, 1e2), alpha=st.sampled_from([1e-2, 1e-4, 1e-6, 1e-8]))
def test_alpha_divergence_tends_to_reverse_kl_as_alpha_goes_to_zero(u, alpha):
    a, rkl = AlphaDivergence(alpha), get_divergence("reverse_kl")
    L = math.log(u)
    # Taylor: |(1 - e^{-z})/alpha - L| = |1 - z - e^{-z}| / alpha <= z^2 e^{|z|} / (2 alpha),
    # z = alpha L.
    bound = alpha * L * L * math.exp(alpha * abs(L)) / 2 + ROUNDING_ATOL * (1 + abs(L))
    assert (
        abs(a.f_prime(t64(u)).item() - (rkl.f_prime(t64(u)).item() - 1)) <= bound + F64_RTOL / alpha
    )
    # f_alpha -> u log u - u + 1: reverse KL's f plus a linear term that D_f averages to zero.
    f_lim = rkl.f(t64(u)).item() - (u - 1)
    assert abs(a.f(t64(u)).item() - f_lim) <= 10 * alpha * (1 + abs(L)) ** 3 * u + 1e-6


@given(u=st.floats(1e-2, 1e2), delta=st.sampled_from([1e-2, 1e-4, 1e-6, 1e-8]))
def test_alpha_divergence_tends_to_forward_kl_plus_one_as_alpha_goes_to_one(u, delta):
    a, fkl = AlphaDivergence(1 - delta), get_divergence("forward_kl")
    L = abs(math.log(u))
    # |d f'_alpha / d alpha| <= 4 (L + 2) e^L for alpha in [1/2, 1]; mean-value bound.
    bound = delta * 4 * (L + 2) * math.exp(L) + ROUNDING_ATOL * math.exp(L)
    assert abs(a.f_prime(t64(u)).item() - (fkl.f_prime(t64(u)).item() + 1)) <= bound
    f_lim = fkl.f(t64(u)).item() + (u - 1)
    assert (
        abs(a.f(t64(u)).item() - f_lim) <= delta * 8 * (L + 2) ** 2 * math.exp(L) * (1 + u) + 1e-6
    )


# --- admissibility, ranges and errors ------------------------------------------------------------
def test_admissibility_is_zero_not_in_dom_f_prime():
    for name in DIVERGENCE_NAMES:
        div = divergence_of(name)
        at_zero = div.f_prime(t64(0.0)).item()  # the direct formula's value (limit) at u = 0
        assert at_zero == div.f_prime_at_zero
        assert div.admissible == (name in ADMISSIBLE_NAMES) == (at_zero == -math.inf)


@pytest.mark.parametrize("name", SMOOTH)
def test_f_prime_range_is_the_image_of_f_prime(name):
    div = divergence_of(name)
    lo, hi = div.f_prime_range
    values = div.f_prime_of_log(torch.linspace(-700, 700, 10001, dtype=torch.float64))
    assert values.min().item() >= lo and values.max().item() <= hi
    # and both ends are approached: the range is not wider than the image
    for end, value in (
        (lo, div.f_prime_of_log(t64(-700.0)).item()),
        (hi, div.f_prime_of_log(t64(700.0)).item()),
    ):
        if math.isinf(end):
            assert abs(value) > 500 and (value > 0) == (end > 0)
        else:
            assert abs(value - end) <= F64_RTOL * (1 + abs(end))


def test_optimal_ratio_extends_the_inverse():
    chi, js = get_divergence("chi_squared"), get_divergence("jensen_shannon")
    assert chi.optimal_ratio(t64(-5.0, -2.0, 0.0, 2.0)).tolist() == [0.0, 0.0, 1.0, 2.0]
    assert js.optimal_ratio(t64(math.log(2), 5.0)).tolist() == [math.inf, math.inf]
    assert js.optimal_ratio(t64(-math.inf)).item() == 0.0
    with pytest.raises(ValueError, match="step function"):
        get_divergence("total_variation").optimal_ratio(t64(0.1))


@pytest.mark.parametrize(
    "name, t",
    [
        ("jensen_shannon", math.log(2)),
        ("jensen_shannon", 1.0),
        ("forward_kl", 0.0),
        ("alpha", 2.0),
        ("chi_squared", -2.5),
    ],
)
def test_f_prime_inverse_outside_the_range_raises(name, t):
    with pytest.raises(ValueError, match="outside the range of f'"):
        divergence_of(name, 0.5).f_prime_inverse(t64(0.0, t))


def test_f_prime_inverse_of_chi_squared_at_its_boundary_is_zero():
    assert get_divergence("chi_squared").f_prime_inverse(t64(-2.0)).item() == 0.0


def test_total_variation_has_no_inverse():
    with pytest.raises(ValueError, match="does not exist"):
        get_divergence("total_variation").f_prime_inverse(t64(0.0))


@pytest.mark.parametrize("alpha", [0, 1, -0.5, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_alpha_outside_the_open_unit_interval_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        get_divergence("alpha", alpha=alpha)


def test_unknown_name_and_misplaced_alpha_raise():
    with pytest.raises(ValueError, match="unknown divergence name 'kl'.*reverse_kl"):
        get_divergence("kl")
    with pytest.raises(ValueError, match="only the 'alpha' divergence"):
        get_divergence("reverse_kl", alpha=0.5)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_negative_or_nan_ratio_raises(name):
    div = divergence_of(name)
    for bad in (-1e-3, float("nan")):
        with pytest.raises(ValueError, match="u = pi / pi_ref must be >= 0"):
            div.f(t64(1.0, bad))
        with pytest.raises(ValueError, match="must be >= 0"):
            div.f_prime(t64(bad))


SECOND_DERIVATIVE = {  # d^2/dx^2 f'(e^x), by hand, for the torch.func test (alpha = 0.5)
    "reverse_kl": lambda x: torch.zeros_like(x),
    "forward_kl": lambda x: -torch.exp(-x),
    "jensen_shannon": lambda x: -torch.sigmoid(x) * torch.sigmoid(-x),
    "alpha": lambda x: -0.5 * torch.exp(-0.5 * x),
    "chi_squared": lambda x: 2 * torch.exp(x),
    "total_variation": lambda x: torch.zeros_like(x),
}


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_custom_gradients_compose_with_torch_func(name):
    # vmap(grad(.)) gives the same derivative as autograd, and grad(grad(.)) the second derivative.
    div = divergence_of(name, 0.5)
    x = t64(-30.0, -3.0, -1.0, -0.5, 2.0, 30.0)
    d1 = torch.func.vmap(torch.func.grad(div.f_prime_of_log))(x)
    leaf = x.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(div.f_prime_of_log(leaf).sum(), leaf)
    assert torch.equal(d1, autograd)
    d2 = torch.func.vmap(torch.func.grad(torch.func.grad(div.f_prime_of_log)))(x)
    # (Jensen-Shannon's second derivative is autograd through sigmoid, y (1 - y): accurate in
    # absolute terms only)
    torch.testing.assert_close(d2, SECOND_DERIVATIVE[name](x), rtol=F64_RTOL, atol=ROUNDING_ATOL)


def test_alpha_accepts_what_beta_accepts():
    """alpha, like beta, may be a NumPy scalar or a one-element tensor; a bool or a vector may
    not."""
    import numpy as np

    for alpha in (0.5, np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        assert get_divergence("alpha", alpha=alpha).alpha == 0.5
    for bad in (True, torch.tensor([0.5, 0.5]), np.float32(1.0), float("nan"), "0.5"):
        with pytest.raises(ValueError, match="alpha must be a number strictly between 0 and 1"):
            get_divergence("alpha", alpha=bad)
