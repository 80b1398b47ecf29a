"""High-precision references (mpmath, 80 digits) for f, f'(e^x) and its derivative, and the losses'
gradients, with the condition numbers that say how exact a floating-point answer can be.

Inputs are taken exactly (a float is a dyadic rational). The slow, obviously-correct formulas are
the book's: f'(e^x) is f' of the number e^x, computed with 80 digits, never a stable rewrite.
"""

from __future__ import annotations

import mpmath as mp

DIGITS = 80
# Step of the central differences that give condition numbers: with 80 digits a relative step of
# 1e-30 leaves ~50 correct digits of the derivative, far more than any tolerance needs.
DIFF_STEP = mp.mpf("1e-30")


def f_book(name: str, u, alpha: float):
    """f(u) as printed in the divergences' docstrings (the paper's table), in mpmath."""
    a = mp.mpf(alpha)
    if name == "reverse_kl":
        return u * mp.log(u)
    if name == "forward_kl":
        return -mp.log(u)
    if name == "jensen_shannon":
        return u * mp.log(u) - (u + 1) * mp.log((u + 1) / 2)
    if name == "alpha":
        return (u ** (1 - a) - (1 - a) * u - a) / (a * (a - 1))
    if name == "chi_squared":
        return (u - 1) ** 2
    if name == "total_variation":
        return abs(u - 1) / 2
    raise AssertionError(name)


def f_prime_book(name: str, u, alpha: float):
    """f'(u) from the book's formula for f, differentiated numerically with 80 digits."""
    with mp.workdps(DIGITS):
        return mp.diff(lambda v: f_book(name, v, alpha), mp.mpf(u))


def f_prime_of_log(name: str, x, alpha: float):
    """(f'(e^x), d/dx f'(e^x) = e^x f''(e^x)) with u = e^x formed in 80 digits (more for tiny x)."""
    X = mp.mpf(x)
    # e^x - 1 and log(e^x) cancel to ~x: carry enough digits that 80 of them survive for tiny |x|.
    extra = int(-mp.log10(abs(X))) if 0 < abs(X) < 1 else 0
    with mp.workdps(DIGITS + extra):
        value, derivative = _f_prime_of_log(name, +X, alpha)
    return value, derivative


def _f_prime_of_log(name, X, alpha):
    a, one = mp.mpf(alpha), mp.mpf(1)
    u = mp.exp(X)
    if name == "reverse_kl":
        return mp.log(u) + 1, one
    if name == "forward_kl":
        return -1 / u, 1 / u
    if name == "jensen_shannon":
        return mp.log(2 * u / (1 + u)), 1 / (1 + u)
    if name == "alpha":
        return (1 - u ** (-a)) / a, u ** (-a)
    if name == "chi_squared":
        return 2 * (u - 1), 2 * u
    if name == "total_variation":
        return mp.sign(X) / 2, mp.mpf(0)
    raise AssertionError(name)


# --- losses -------------------------------------------------------------------------------------
# A loss is a function of two log-ratios (d1, d2): DPO/IPO and IUPO's paper form take d1 = pc - pr,
# d2 = rc - rr; f-DPO and IUPO's kkt form d1 = pc - rc, d2 = pr - rr. The loss code forms these two
# differences first, each rounded once: that is the only place the four inputs enter, and its
# rounding (an ulp of the inputs) is the inputs' own uncertainty, so the reference starts from the
# rounded differences and the test measures everything after them.
SOFTPLUS_LOSSES = ("dpo", "fdpo")
PAIRS = {  # which differences a loss takes: (d1, d2) as index pairs into (pc, pr, rc, rr)
    "dpo": ((0, 1), (2, 3)),
    "ipo": ((0, 1), (2, 3)),
    "fdpo": ((0, 2), (1, 3)),
    "iupo_kkt": ((0, 2), (1, 3)),
    "iupo_paper": ((0, 1), (2, 3)),
}
# Relative perturbations of the computed intermediates for the condition number: the two
# differences, the two f' values, the margin, beta and the target 1/(2 beta). (A relative error in
# a derivative factor or a final product moves the gradient by that much and no more: counted
# in ROUNDED_FINAL_OPS.)
PERTURBED = ("d1", "d2", "F1", "F2", "m", "beta", "c")
ROUNDED_FINAL_OPS = 6
# Beyond beta |m| = 1e5 the softplus losses' sigma(-beta m) is below e^{-1e5} (or 1 to within it),
# far outside every dtype; the reference takes the limit rather than form exp(1e5000)-sized numbers.
# (Any f' factor multiplying it is at most e^{1e4} on the tested inputs.)
SATURATED = mp.mpf(1e5)


def _loss_grads(kind, name, alpha, d1, d2, beta, e):
    """(loss, dL/dd1, dL/dd2) with the intermediates perturbed by relative errors e[k]."""
    F1, D1 = f_prime_of_log(name, d1 * (1 + e["d1"]), alpha)
    F2, D2 = f_prime_of_log(name, d2 * (1 + e["d2"]), alpha)
    if kind in ("dpo", "ipo"):
        F1, D1, F2, D2 = d1 * (1 + e["d1"]), mp.mpf(1), d2 * (1 + e["d2"]), mp.mpf(1)
    beta = mp.mpf(beta) * (1 + e["beta"])
    m = (F1 * (1 + e["F1"]) - F2 * (1 + e["F2"])) * (1 + e["m"])
    if kind in SOFTPLUS_LOSSES:
        if beta * m > SATURATED:  # sigma(-beta m) < e^{-beta m}: the gradient is 0 in every dtype
            return mp.exp(-beta * m), mp.mpf(0), mp.mpf(0)
        if beta * m < -SATURATED:  # the loss is beyond every dtype (and the code raises)
            return -beta * m, -beta * D1, beta * D2
        s = 1 / (1 + mp.exp(beta * m))  # sigma(-beta m)
        return mp.log1p(mp.exp(-beta * m)), -beta * s * D1, beta * s * D2
    r = m - (1 / (2 * beta)) * (1 + e["c"])
    return r * r, 2 * r * D1, -2 * r * D2


def loss_reference(kind, name, alpha, d1, d2, beta):
    """Loss, gradients (dL/dd1, dL/dd2) and the derivative factors (d/dd f'(e^d) at d1, d2) at the
    rounded differences d1, d2, in 80 digits."""
    with mp.workdps(DIGITS):
        zero = dict.fromkeys(PERTURBED, mp.mpf(0))
        loss, g1, g2 = _loss_grads(kind, name, alpha, mp.mpf(d1), mp.mpf(d2), beta, zero)
        if kind in ("dpo", "ipo"):
            return loss, (g1, g2), (mp.mpf(1), mp.mpf(1))
        factors = (f_prime_of_log(name, d1, alpha)[1], f_prime_of_log(name, d2, alpha)[1])
        return loss, (g1, g2), factors


def gradient_condition(kind, name, alpha, d1, d2, beta, i):
    """Relative condition number of the gradient dL/dd_i (i = 1 or 2), in 80 digits.

    It is ROUNDED_FINAL_OPS + sum_k |d log|g| / d e_k| over the relative perturbations e_k of
    PERTURBED: a computation that rounds each intermediate once, to a few ulps, is wrong by at most
    about eps times it. (Slow: the tests compute it only where a gradient misses GRAD_RTOL.)
    """
    with mp.workdps(DIGITS):
        d1, d2 = mp.mpf(d1), mp.mpf(d2)
        zero = dict.fromkeys(PERTURBED, mp.mpf(0))
        g = _loss_grads(kind, name, alpha, d1, d2, beta, zero)[i]
        kappa = mp.mpf(ROUNDED_FINAL_OPS)
        if g == 0:
            return kappa
        for k in PERTURBED:
            up = _loss_grads(kind, name, alpha, d1, d2, beta, {**zero, k: DIFF_STEP})[i]
            down = _loss_grads(kind, name, alpha, d1, d2, beta, {**zero, k: -DIFF_STEP})[i]
            kappa += abs((up - down) / (2 * DIFF_STEP * g))
        return kappa
