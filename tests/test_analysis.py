"""The JS-IUPO reachability analysis (closed forms and a brute-force check), loss gradients,
relative errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from upo_ref.divergences import get_divergence
from upo_ref.experiments.analysis import (
    loss_and_gradients,
    paper_optimal_logratio,
    paper_reachability_threshold,
    paper_uh_supremum,
    reachable_fraction,
    reference_logratios,
    relative_error,
)
from upo_ref.losses import PreferenceLoss, iupo_loss, uh_pi

JS = get_divergence("jensen_shannon")
FKL = get_divergence("forward_kl")
BOUNDED = [JS, FKL, get_divergence("alpha", alpha=0.3), get_divergence("alpha", alpha=0.7)]
BETAS = [0.05, 0.1, 0.2, 0.5, 1.0, 3.0]
THRESHOLD_RTOL = 1e-13  # float64 evaluation of one closed form against another
GRID = 1e-3  # brute-force grid spacing in c (nats)


def t64(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# --- the threshold c*(beta) ---------------------------------------------------------------------
@pytest.mark.parametrize("beta", BETAS)
def test_threshold_closed_forms(beta):
    T = 1 / (2 * beta)
    assert paper_reachability_threshold(beta, JS) == pytest.approx(
        -math.log(math.expm1(T)), rel=THRESHOLD_RTOL, abs=1e-15
    )
    assert paper_reachability_threshold(beta, FKL) == pytest.approx(
        -math.log(T), rel=THRESHOLD_RTOL, abs=1e-15
    )
    for a in (0.3, 0.7):
        alpha = get_divergence("alpha", alpha=a)
        assert paper_reachability_threshold(beta, alpha) == pytest.approx(
            -math.log(a * T) / a, rel=THRESHOLD_RTOL, abs=1e-15
        )
    assert paper_reachability_threshold(beta, "reverse_kl") == math.inf
    assert paper_reachability_threshold(beta, "chi_squared") == math.inf


def test_threshold_at_the_papers_betas():
    # The numbers notebook 3 states: -4.99, -2.41, -0.54 nats; and c* = 0 exactly at
    # beta = 1/(2 log 2).
    assert [round(paper_reachability_threshold(b, JS), 2) for b in (0.1, 0.2, 0.5)] == [
        -4.99,
        -2.41,
        -0.54,
    ]
    assert abs(paper_reachability_threshold(1 / (2 * math.log(2)), JS)) < 1e-15


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("div", BOUNDED, ids=lambda d: repr(d))
def test_threshold_agrees_with_brute_force(div, beta):
    """Scan c, and for each c find sup_a Uh by evaluating the paper-form Uh itself at a huge
    policy log-ratio."""
    T = 1 / (2 * beta)
    c_star = paper_reachability_threshold(beta, div)
    c = torch.arange(-60.0, 60.0, GRID, dtype=torch.float64)
    a_huge = torch.full_like(c, 800.0)  # f'(e^800) = sup f' to the last bit for these divergences
    zero = torch.zeros_like(c)
    sup_uh = uh_pi(
        a_huge, zero, c, zero, div, form="paper"
    )  # log pi ratio a, reference log-ratio c
    reachable = sup_uh > T
    # reachable is exactly the set c < c*, up to the grid
    assert reachable[c < c_star - GRID].all() and not reachable[c > c_star + GRID].any()


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0])
def test_paper_loss_reaches_zero_exactly_below_the_threshold(beta):
    c_star = paper_reachability_threshold(beta, JS)
    a = torch.arange(-40.0, 80.0, 0.01, dtype=torch.float64)
    zero = torch.zeros_like(a)
    for c, reachable in ((c_star - 0.05, True), (c_star + 0.05, False)):
        loss = iupo_loss(a, zero, torch.full_like(a, c), zero, beta, JS)  # (len(a),)
        if reachable:
            assert loss.min().item() < 1e-4
        else:
            floor = (paper_uh_supremum(t64(c), JS).item() - 1 / (2 * beta)) ** 2
            assert loss.min().item() >= floor > 0
            assert (loss[1:] <= loss[:-1]).all()  # non-increasing in a: the infimum is at a = +inf


def test_paper_optimal_logratio_zeroes_the_loss_where_reachable_and_is_inf_elsewhere():
    beta = 0.1
    c = t64(-12.0, -8.0, -6.0, -5.1, -4.9, 0.0, 5.0)
    a_star = paper_optimal_logratio(c, beta, JS)
    reachable = c < paper_reachability_threshold(beta, JS)
    assert torch.isinf(a_star[~reachable]).all() and torch.isfinite(a_star[reachable]).all()
    loss = iupo_loss(
        a_star[reachable],
        torch.zeros(int(reachable.sum()), dtype=torch.float64),
        c[reachable],
        torch.zeros(int(reachable.sum()), dtype=torch.float64),
        beta,
        JS,
    )
    assert loss.max().item() < 1e-20
    # far below the threshold the paper form's margin a* - c tends to IPO's T = 1/(2 beta)
    assert (a_star[0] - c[0]).item() == pytest.approx(5.0, abs=1e-3)


@pytest.mark.parametrize("c", [-4.0, 0.0, 4.0, 10.0])
def test_unreachable_push_decays_like_the_probability_ratio(c):
    beta = 0.1
    T = 1 / (2 * beta)
    limit = 2 * (T - softplus(t64(-c)).item())  # -dL/da * e^a as a -> inf
    for a in (25.0, 35.0):
        _, d_chosen, d_rejected = loss_and_gradients(
            PreferenceLoss("iupo", JS), t64(a), t64(0.0), t64(c), t64(0.0), beta
        )
        assert -d_chosen.item() * math.exp(a) == pytest.approx(limit, rel=1e-9)
        assert (
            d_rejected.item() == -d_chosen.item()
        )  # the paper form sees only log pi(y_w) - log pi(y_l)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x), exact for these |x| <= 30.

    (torch's F.softplus returns x itself beyond x = 20.)
    """
    return torch.log1p(torch.exp(x))


def test_paper_uh_supremum_is_softplus_for_js():
    c = torch.linspace(-30, 30, 601, dtype=torch.float64)
    # a few ulps of the larger of log 2 and |f'(e^c)| (the difference is formed in float64)
    eps = torch.finfo(torch.float64).eps
    torch.testing.assert_close(paper_uh_supremum(c, JS), softplus(-c), rtol=4 * eps, atol=4 * eps)


# --- loss_and_gradients, relative_error ----------------------------------------------------------
def test_loss_and_gradients_hand_values_for_dpo_and_ipo():
    pc, pr, rc, rr = (
        t64(-1.0, -3.0),
        t64(-2.0, -1.0),
        t64(-1.5, -2.0),
        t64(-1.5, -2.0),
    )  # h = (1, -2)
    beta = 0.5
    value, d_w, d_l = loss_and_gradients(PreferenceLoss("dpo"), pc, pr, rc, rr, beta)
    h = t64(1.0, -2.0)
    torch.testing.assert_close(value, F.softplus(-beta * h), rtol=1e-15, atol=0)
    torch.testing.assert_close(d_w, -beta * torch.sigmoid(-beta * h), rtol=1e-15, atol=0)
    torch.testing.assert_close(d_l, beta * torch.sigmoid(-beta * h), rtol=1e-15, atol=0)
    _, d_w, d_l = loss_and_gradients(PreferenceLoss("ipo"), pc, pr, rc, rr, beta)
    torch.testing.assert_close(d_w, 2 * (h - 1.0), rtol=1e-15, atol=0)
    torch.testing.assert_close(d_l, -2 * (h - 1.0), rtol=1e-15, atol=0)


def test_relative_error_cases():
    approx = t64(1.1, math.nan, math.inf, math.inf, 0.0, 1e-8, -math.inf, 2.0)
    ref = t64(1.0, 1.0, math.inf, 1e300, 0.0, 0.0, -math.inf, 2.0)
    err = relative_error(approx, ref)
    assert err[0].item() == pytest.approx(0.1, rel=1e-14)
    assert err[1:].tolist() == [math.inf, 0.0, math.inf, 0.0, math.inf, 0.0, 0.0]


# --- the worked pair of notebook 03 ------------------------------------------------------------
# pi(y_w) = 0.3, pi(y_l) = 0.1, pi_ref(y_w) = pi_ref(y_l) = 0.2, beta = 0.5 (T = 1):
# u_w = 1.5, u_l = 0.5, a = log 3, c = 0, h = log 3. Every value below is derived by hand in the
# notebook; JS: f'(u) = log(2u / (1 + u)) and d f'(e^x)/dx = sigmoid(-x) = 1 / (1 + e^x).
WORKED = tuple(torch.tensor([math.log(p)], dtype=torch.float64) for p in (0.3, 0.1, 0.2, 0.2))
WORKED_BETA = 0.5
WORKED_RTOL = 1e-14  # float64: a handful of roundings from the log-probs to the loss
WORKED_HAND = {  # loss: (value, dL/d log pi(y_w), dL/d log pi(y_l))
    "dpo": (math.log(1 + 3**-0.5), -0.5 / (1 + 3**0.5), 0.5 / (1 + 3**0.5)),  # eq. (4)
    "ipo": ((math.log(3) - 1) ** 2, 2 * (math.log(3) - 1), -2 * (math.log(3) - 1)),  # eq. (10)
    # eq. (26): Uh = f'(3) - f'(1) = log(6/4) - 0 = log 1.5; d/da of f'(e^a) at a = log 3 is 1/4
    "paper": ((math.log(1.5) - 1) ** 2, (math.log(1.5) - 1) / 2, -(math.log(1.5) - 1) / 2),
    # eq. (17) form: Uh = f'(1.5) - f'(0.5) = log 1.2 - log(2/3) = log 1.8; slopes 1/2.5 and 1/1.5
    "kkt": ((math.log(1.8) - 1) ** 2, 0.8 * (math.log(1.8) - 1), -(4 / 3) * (math.log(1.8) - 1)),
}
WORKED_LOSSES = {
    "dpo": PreferenceLoss("dpo"),
    "ipo": PreferenceLoss("ipo"),
    "paper": PreferenceLoss("iupo", JS),
    "kkt": PreferenceLoss("iupo", JS, form="kkt"),
}


@pytest.mark.parametrize("name", list(WORKED_HAND))
def test_the_worked_pair_of_notebook_03_by_hand(name):
    value, d_chosen, d_rejected = loss_and_gradients(WORKED_LOSSES[name], *WORKED, WORKED_BETA)
    got = (value.item(), d_chosen.item(), d_rejected.item())
    assert got == pytest.approx(WORKED_HAND[name], rel=WORKED_RTOL, abs=0)


def test_worked_pair_uh_by_hand():
    assert uh_pi(*WORKED, JS).item() == pytest.approx(math.log(1.5), rel=WORKED_RTOL)
    assert uh_pi(*WORKED, JS, form="kkt").item() == pytest.approx(math.log(1.8), rel=WORKED_RTOL)


# --- the fraction of reachable pairs ----------------------------------------------------------
def test_reachable_fraction_counts_pairs_below_the_threshold():
    c_star = paper_reachability_threshold(0.1, JS)  # -4.9932
    c = t64(-6.0, c_star - 1e-9, c_star, 0.0, 3.0)  # c* itself is not reachable (strict)
    p, se = reachable_fraction(c, 0.1, JS)
    assert p == 2 / 5 and se == pytest.approx(math.sqrt(0.4 * 0.6 / 5), rel=1e-15)
    assert reachable_fraction(c, 0.1, "reverse_kl") == (1.0, 0.0)  # IPO: every pair


def test_reachable_fraction_rejects_bad_log_ratios():
    with pytest.raises(ValueError, match="1 non-finite value"):
        reachable_fraction(t64(0.0, math.nan), 0.1, JS)
    with pytest.raises(ValueError, match=r"non-empty \(N,\) tensor"):
        reachable_fraction(torch.zeros(2, 2, dtype=torch.float64), 0.1, JS)


def test_reference_logratios_are_the_trainers_reference_log_probs(tmp_path):
    from upo_ref.lm.experiment import load_experiment_data, prepare_reference
    from upo_ref.lm.presets import get_preset, smoke

    cfg = smoke(get_preset("quick"))
    c = reference_logratios(cfg, tmp_path)
    _, data = load_experiment_data(cfg)
    ref = prepare_reference(cfg, data, tmp_path, torch.device("cpu"), progress=False)  # resumed
    rc, rr = ref.reference["train"]
    assert torch.equal(c["summed"], rc - rr) and len(c["summed"]) == cfg.data.n_train_pairs
    assert c["averaged"].shape == c["summed"].shape and not torch.equal(c["averaged"], c["summed"])


def test_reference_logratios_of_a_partially_fine_tuned_preset_use_the_cached_trunk(tmp_path):
    from upo_ref.lm.experiment import load_experiment_data, prepare_reference
    from upo_ref.lm.presets import get_preset, smoke

    cfg = smoke(get_preset("smol"))  # a tiny random Llama, its top layer trained from the cache
    c = reference_logratios(cfg, tmp_path)
    _, data = load_experiment_data(cfg)
    ref = prepare_reference(cfg, data, tmp_path, torch.device("cpu"), progress=False)
    rc, rr = ref.reference["train"]
    assert torch.equal(c["summed"], rc - rr)
    # The per-token mean is the same sum divided by each response's token count.
    n_w = torch.tensor([len(p.chosen) for p in ref.pairs["train"]], dtype=torch.float32)
    n_l = torch.tensor([len(p.rejected) for p in ref.pairs["train"]], dtype=torch.float32)
    torch.testing.assert_close(c["averaged"], rc / n_w - rr / n_l, rtol=1e-6, atol=1e-6)
