"""Learn-then-Test choice of the ceiling tightening, checked against a known truth."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import stats

from creditgraph.evaluate.metrics import check_guarantee, judge_limits
from creditgraph.policy.guarantee import (
    GuaranteeConfig,
    choose_tightening,
    finite_sample_ucb,
    tightened_limits,
    upper_bound,
)
from creditgraph.policy.ope import LoggedData, kernel_weights

GRID = np.arange(0.0, 20_001.0, 1000.0)
R_MAX = 0.1
SCALE = 5000.0
LAMBDAS = [0.25 * i for i in range(13)]  # 0 .. 3


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _logit(p):
    return np.log(p) - np.log1p(-p)


def true_risk(x, limit):
    """p(default | x, do(L)), increasing in L (limit broadcasts against x)."""
    return _sigmoid(-3.2 + x + 1.3 * np.log1p(limit / SCALE))


def scored_users(n, rng, bias, noise, sigma):
    """True curves and a model's curves: logit error = bias + a per-user noise of sd `noise`."""
    x = rng.normal(size=n)
    true = true_risk(x[:, None], GRID[None, :])
    p_hat = _sigmoid(_logit(true) + bias + rng.normal(0.0, noise, n)[:, None])
    return x, true, p_hat, np.full_like(p_hat, sigma)


def calibration_users(n, seed, bias=-0.8, noise=0.3, sigma=0.5, randomized=False):
    """Held-out users with logged limits from a known (confounded or randomized) policy."""
    rng = np.random.default_rng(seed)
    x, true, p_hat, sig = scored_users(n, rng, bias, noise, sigma)
    if randomized:  # a limit test: log-limit uniform on [log 500, log 25000] for everyone
        lo, hi = math.log(500.0), math.log(25_000.0)
        u = rng.uniform(lo, hi, n)
        limit, log_density = np.exp(u), np.full(n, -math.log(hi - lo))
    else:  # history: riskier users get credit less often and smaller limits
        p_pos = _sigmoid(1.5 - 0.5 * x)
        mu = math.log(6000.0) - 0.3 * x
        pos = rng.random(n) < p_pos
        u = rng.normal(mu, 0.8)
        limit = np.where(pos, np.exp(u), 0.0)
        log_density = np.where(pos, np.log(p_pos) + stats.norm.logpdf(u, mu, 0.8), np.log1p(-p_pos))
    y = (rng.random(n) < true_risk(x, limit)).astype(float)
    return LoggedData(limit, y, log_density), true, p_hat, sig


@pytest.fixture(scope="module")
def population():
    """Fresh users scored by the same optimistic model: where the policies' truth is read."""
    _, true, p_hat, sigma = scored_users(40_000, np.random.default_rng(99), -0.8, 0.3, 0.5)
    return true, p_hat, sigma


def _true_rate(result, population):
    true, p_hat, sigma = population
    limits = result.limits_for(p_hat, sigma, GRID)
    return judge_limits(limits, true, GRID, R_MAX)["portfolio_default_rate"]


def test_chosen_policy_keeps_the_true_portfolio_rate_under_the_ceiling(population):
    true, p_hat, sigma = population
    untightened, _ = tightened_limits(p_hat, sigma, GRID, R_MAX, 0.0)
    # not vacuous: the optimistic model's own policy breaks the ceiling
    assert judge_limits(untightened, true, GRID, R_MAX)["portfolio_default_rate"] > 0.14
    config = GuaranteeConfig(delta=0.1, lambdas=LAMBDAS, n_boot=200)
    reps, ok, certified, shares = 30, 0, 0, []
    for r in range(reps):
        logged, _, cal_p, cal_s = calibration_users(5000, seed=r)
        result = choose_tightening(cal_p, cal_s, GRID, R_MAX, logged, config)
        rate = _true_rate(result, population)
        ok += not rate > R_MAX  # NaN: nobody granted, no defaults
        certified += result.certified
        shares.append(
            result.table.set_index("lambda").loc[result.lambda_, "granted_share"]
            if result.certified
            else 0.0
        )
    assert ok / reps >= 1 - config.delta - 0.05
    assert certified / reps >= 0.7  # and it does grant in most repetitions
    assert np.mean(shares) > 0.4


def test_larger_delta_never_gives_a_more_conservative_lambda():
    finite = {"estimator": "ipw", "bound": "bernstein", "weight_clip": 12.0}
    cases = (
        (calibration_users(5000, seed=11), {}),  # bootstrap, confounded history
        (calibration_users(20_000, seed=12, randomized=True), finite | {"weights_bounded": True}),
    )
    for (logged, _, p_hat, sigma), extra in cases:
        lams = []
        for delta in (0.01, 0.05, 0.1, 0.2, 0.4, 0.6):
            config = GuaranteeConfig(delta=delta, lambdas=LAMBDAS, n_boot=200, **extra)
            lams.append(choose_tightening(p_hat, sigma, GRID, R_MAX, logged, config).lambda_)
        assert all(a >= b for a, b in itertools.pairwise(lams)), (extra, lams)
        assert lams[0] > lams[-1], (extra, lams)  # delta matters


def test_good_model_still_grants():
    logged, _, p_hat, sigma = calibration_users(6000, seed=21, bias=0.0, noise=0.1, sigma=0.2)
    result = choose_tightening(p_hat, sigma, GRID, R_MAX, logged, GuaranteeConfig(n_boot=200))
    assert result.certified and result.lambda_ < 3
    _, true, new_p, new_s = scored_users(20_000, np.random.default_rng(22), 0.0, 0.1, 0.2)
    m = judge_limits(result.limits_for(new_p, new_s, GRID), true, GRID, R_MAX)
    assert m["limit_satisfaction"] > 0.6 and m["granted_share"] > 0.6
    assert m["portfolio_default_rate"] <= R_MAX
    check = check_guarantee(result, calibration_users(6000, 21, 0.0, 0.1, 0.2)[1], GRID)
    assert check["portfolio_ok"] == 1.0 and 0 <= check["over_ceiling_rate"] <= 1
    text = result.statement()
    assert f"lambda = {result.lambda_:g}" in text and "exchangeable" in text
    assert "overlap" in text and "rests on the propensity" in text


def test_nothing_certified_declines_everyone_and_says_so():
    # sigma = 0: tightening cannot help an optimistic model, every lambda is the same policy
    logged, _, p_hat, _ = calibration_users(4000, seed=31, bias=-1.5)
    result = choose_tightening(
        p_hat, 0.0, GRID, R_MAX, logged, GuaranteeConfig(lambdas=[0.0, 1.0, 2.0], n_boot=200)
    )
    assert not result.certified and math.isinf(result.lambda_)
    assert (result.limits == 0).all()
    assert (result.limits_for(p_hat, 0.0, GRID) == 0).all()
    assert result.table["tested"].tolist() == [True, False, False]
    assert result.table["ucb"].iloc[0] > R_MAX
    assert "declines everyone" in result.statement()


def test_finite_sample_bounds_cover_the_truth_on_a_randomized_test():
    """Finite-sample UCBs of a fixed policy's rate, on randomized limit-test users."""
    delta, reps = 0.1, 20
    covered = {"bounded": 0, "clipped": 0}
    for r in range(reps):
        logged, true, p_hat, sigma = calibration_users(8000, seed=100 + r, randomized=True)
        limits, idx = tightened_limits(p_hat, sigma, GRID, R_MAX, 1.5)
        g = limits > 0
        truth = true[np.arange(len(limits)), idx][g].mean()
        w = kernel_weights(logged, limits, 0.2)[g]
        y = logged.outcome[g]
        # uniform design on a log-width of log(50): w <= K(0) / h * log(50) = 7.8
        bounded = finite_sample_ucb(w, y, delta, 8.0, "bernstein", bounded=True)
        clipped = finite_sample_ucb(w, y, delta, 8.0, "bernstein")
        hoeffding = finite_sample_ucb(w, y, delta, 8.0, "hoeffding", bounded=True)
        covered["bounded"] += bounded >= truth
        covered["clipped"] += clipped >= truth
        assert truth < bounded < clipped  # knowing the weights' range buys a tighter bound
        assert bounded < hoeffding  # Bernstein uses the (small) variance of w * y
        assert bounded - truth < 0.08
    assert min(covered.values()) >= (1 - delta) * reps
    with pytest.raises(ValueError, match="exceeds weight_clip"):
        finite_sample_ucb(w, y, delta, 1.0, "bernstein", bounded=True)


def test_bernstein_guarantee_on_a_randomized_test_certifies_and_holds():
    logged, true, p_hat, sigma = calibration_users(20_000, seed=41, randomized=True)
    config = GuaranteeConfig(
        estimator="ipw",
        bound="bernstein",
        weight_clip=12.0,
        weights_bounded=True,
        lambdas=LAMBDAS,
        randomized=True,
    )
    result = choose_tightening(p_hat, sigma, GRID, R_MAX, logged, config)
    assert result.certified and result.lambda_ <= 2.5
    assert check_guarantee(result, true, GRID)["portfolio_ok"] == 1.0
    text = result.statement()
    assert "randomized limit test" in text and "rests on the propensity" not in text
    assert "holds in finite samples" in text
    # the same bound without the declared weight range cannot certify anything here
    clipped = choose_tightening(
        p_hat, sigma, GRID, R_MAX, logged, config.model_copy(update={"weights_bounded": False})
    )
    assert not clipped.certified and "declines everyone" in clipped.statement()


def test_upper_bound_and_tightened_limits():
    p = np.array([[0.0, 0.05, 0.1, 0.5, 1.0]])
    np.testing.assert_allclose(upper_bound(p, 0.7, 0.0), np.clip(p, 1e-9, 1 - 1e-9))
    u1, u2 = upper_bound(p, 0.7, 1.0), upper_bound(p, 0.7, 2.0)
    assert np.all(u2[:, 1:-1] > u1[:, 1:-1]) and np.all(u1[:, 1:-1] > p[:, 1:-1])
    np.testing.assert_allclose(upper_bound(p, 0.0, 5.0), upper_bound(p, 0.0, 0.0))
    assert np.isnan(upper_bound(np.array([np.nan]), 1.0, 1.0)[0])
    with pytest.raises(ValueError, match="sigma"):
        upper_bound(p, -1.0, 1.0)
    with pytest.raises(ValueError, match="lambda_"):
        upper_bound(p, 1.0, -0.5)
    # more tightening never grants more, user by user
    rng = np.random.default_rng(5)
    curves = np.sort(rng.uniform(0.01, 0.3, (200, GRID.size)), axis=1)
    sig = rng.uniform(0.0, 1.0, (200, GRID.size))
    prev = None
    for lam in (0.0, 0.5, 1.0, 2.0, math.inf):
        limits, _ = tightened_limits(curves, sig, GRID, R_MAX, lam)
        if prev is not None:
            assert np.all(limits <= prev)
        prev = limits
    assert (prev == 0).all()


def test_config_is_validated():
    with pytest.raises(ValidationError):
        GuaranteeConfig(bound="bernstein")  # needs estimator="ipw" and a weight_clip
    with pytest.raises(ValidationError):
        GuaranteeConfig(bound="hoeffding", estimator="ipw")  # no weight_clip
    with pytest.raises(ValidationError):
        GuaranteeConfig(lambdas=[0.0, -1.0])
    with pytest.raises(ValidationError):
        GuaranteeConfig(lambdas=[])
    with pytest.raises(ValidationError):
        GuaranteeConfig(delta=0.0)
    with pytest.raises(ValidationError):
        GuaranteeConfig(typo=1)
    logged, _, p_hat, sigma = calibration_users(300, seed=1)
    with pytest.raises(ValueError, match="p_hat must have shape"):
        choose_tightening(p_hat[:, :-1], sigma, GRID, R_MAX, logged)
    with pytest.raises(ValueError, match="r_max"):
        choose_tightening(p_hat, sigma, GRID, 0.0, logged)
