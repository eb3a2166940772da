"""Off-policy evaluation of a limit policy: kernel IPW / SNIPW / DR against a known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, stats

from creditgraph.policy.ope import (
    LoggedData,
    bootstrap_sums,
    estimate_policy,
    kernel_weights,
    log_density_in_log_limit,
    silverman_bandwidth,
)

MU0 = 8.5  # mean log limit of the historical policy
SD_U = 0.5  # its spread in log limit given x


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def risk(x, limit):
    """True p(default | x, do(L)), increasing in L."""
    u = np.log(np.where(limit > 0, limit, 1.0))
    return np.where(limit > 0, _sigmoid(-1.2 + 1.5 * x + 0.8 * (u - MU0)), _sigmoid(-1.7 + 1.5 * x))


def misspecified(x, limit):
    """An outcome model that ignores the limit's effect."""
    return _sigmoid(-1.1 + 1.5 * x) + 0.0 * limit


def target_of(x):
    """The candidate: larger limits than history for most, declines the riskiest (x >= 1.5)."""
    return np.where(x < 1.5, np.exp(MU0 + 0.4 + 0.1 * x), 0.0)


def logged_world(n, seed, model=risk):
    """Randomized, confounded logging policy with a known ZILN density in u = log L."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    p_pos = _sigmoid(1.5 - 0.5 * x)
    mu_u = MU0 + 0.3 * x
    pos = rng.random(n) < p_pos
    u = rng.normal(mu_u, SD_U)
    limit = np.where(pos, np.exp(u), 0.0)
    log_density = np.where(pos, np.log(p_pos) + stats.norm.logpdf(u, mu_u, SD_U), np.log1p(-p_pos))
    y = (rng.random(n) < risk(x, limit)).astype(float)
    t = target_of(x)
    return LoggedData(limit, y, log_density, model(x, limit)), t, model(x, t)


def true_default_rate() -> float:
    """E[risk(x, target(x)) | granted] for x ~ N(0, 1), by quadrature."""
    num, _ = integrate.quad(
        lambda x: stats.norm.pdf(x) * float(risk(np.array(x), target_of(np.array(x)))), -12, 1.5
    )
    return num / stats.norm.cdf(1.5)


R, N = 100, 2000


@pytest.fixture(scope="module")
def replications():
    """R independent logged samples, each estimated with the true and a misspecified model."""
    out = {"true": [], "misspecified": []}
    for r in range(R):
        logged, t, pt = logged_world(N, seed=1000 + r)
        out["true"].append(estimate_policy(logged, t, pt, n_boot=200, random_state=r))
        bad, _, bad_t = logged_world(N, seed=1000 + r, model=misspecified)
        out["misspecified"].append(
            estimate_policy(bad, t, bad_t, methods=("dm", "dr"), n_boot=200, random_state=r)
        )
    return out


def _series(results, method, col="default_rate"):
    return np.array([df.loc[method, col] for df in results])


def test_ipw_and_dr_are_unbiased_on_a_randomized_logging_policy(replications):
    truth = true_default_rate()
    for method in ("ipw", "snipw", "dr"):
        est = _series(replications["true"], method)
        se_mean = est.std(ddof=1) / math.sqrt(R)
        assert se_mean < 0.004, method
        assert abs(est.mean() - truth) < 4 * se_mean + 0.002, (method, est.mean(), truth)


def test_dr_has_lower_variance_than_ipw(replications):
    sd = {m: _series(replications["true"], m).std() for m in ("ipw", "dr")}
    assert sd["dr"] < 0.9 * sd["ipw"]


def test_dm_is_biased_when_the_model_is_misspecified_and_dr_is_not(replications):
    truth = true_default_rate()
    dm = _series(replications["misspecified"], "dm")
    dr = _series(replications["misspecified"], "dr")
    assert truth - dm.mean() > 0.03  # the model misses the risk of larger limits
    assert abs(dr.mean() - truth) < 4 * dr.std(ddof=1) / math.sqrt(R) + 0.002
    assert np.mean(_series(replications["misspecified"], "dm", "ci_high") < truth) > 0.9


def test_dr_bootstrap_interval_covers_the_truth(replications):
    truth = true_default_rate()
    for model in ("true", "misspecified"):
        lo = _series(replications[model], "dr", "ci_low")
        hi = _series(replications[model], "dr", "ci_high")
        assert np.mean((lo <= truth) & (truth <= hi)) >= 0.85, model


def test_dm_value_and_granted_total_follow_their_definitions():
    logged, t, pt = logged_world(3000, seed=1)
    df = estimate_policy(logged, t, pt, methods=("dm", "ipw"), margin=0.1, lgd=0.4, n_boot=50)
    value = 0.1 * t * (1 - pt) - 0.4 * t * pt
    assert df.loc["dm", "value_mean"] == pytest.approx(value.mean())
    assert df.loc["dm", "default_rate"] == pytest.approx(pt[t > 0].mean())
    assert df.loc["dm", "default_rate_amount"] == pytest.approx((t * pt).sum() / t.sum())
    assert (df["granted_total"] == t.sum()).all()
    assert df.loc["dm", "n_effective"] == df.loc["dm", "n_granted"] == (t > 0).sum()
    assert (
        df.loc["ipw", "value_ci_low"] < df.loc["ipw", "value_mean"] < df.loc["ipw", "value_ci_high"]
    )
    assert 0 < df.loc["ipw", "n_effective"] < df.loc["ipw", "n_granted"]
    # same random_state, same intervals
    again = estimate_policy(logged, t, pt, methods=("dm", "ipw"), margin=0.1, lgd=0.4, n_boot=50)
    assert again.equals(df)


def test_unlabeled_users_are_dropped_and_declined_targets_carry_no_risk():
    logged, t, pt = logged_world(3000, seed=2)
    y = logged.outcome.copy()
    y[::5] = np.nan
    part = LoggedData(logged.limit, y, logged.log_density, logged.p_hat_logged)
    keep = np.isfinite(y)
    sub = LoggedData(
        logged.limit[keep], y[keep], logged.log_density[keep], logged.p_hat_logged[keep]
    )
    a = estimate_policy(part, t, pt, n_boot=20, bandwidth=0.2)
    b = estimate_policy(sub, t[keep], pt[keep], n_boot=20, bandwidth=0.2)
    cols = ["default_rate", "default_rate_amount", "value_mean", "n_effective"]
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy())
    assert a.loc["dm", "granted_total"] == t.sum() > b.loc["dm", "granted_total"]
    # declining everyone: no granted user, NaN default rate, zero value, a warning
    with pytest.warns(UserWarning, match="grants no labeled user"):
        none = estimate_policy(logged, np.zeros(3000), pt, n_boot=20, bandwidth=0.2)
    assert none["default_rate"].isna().all() and (none["value_mean"] == 0).all()


def test_kernel_weights_average_one_and_vanish_without_both_limits():
    rng = np.random.default_rng(3)
    n = 200_000
    mu, sd, p_pos = 8.0, 0.6, 0.7  # one covariate profile, many draws of its logged limit
    pos = rng.random(n) < p_pos
    u = rng.normal(mu, sd, n)
    limit = np.where(pos, np.exp(u), 0.0)
    ld = np.where(pos, np.log(p_pos) + stats.norm.logpdf(u, mu, sd), np.log(1 - p_pos))
    logged = LoggedData(limit, np.zeros(n), ld)
    target = np.full(n, math.exp(8.3))
    for kernel in ("gaussian", "epanechnikov"):
        w = kernel_weights(logged, target, 0.15, kernel=kernel)
        assert w.mean() == pytest.approx(1.0, abs=0.03), kernel
        assert (w[~pos] == 0).all()
    target[:10] = 0.0
    w = kernel_weights(logged, target, 0.15, weight_clip=5.0)
    assert (w[:10] == 0).all() and w.max() == 5.0


def test_known_density_of_a_randomized_limit_test():
    """A randomized test draws L uniformly on [lo, hi] for everyone: the density is known."""
    rng = np.random.default_rng(4)
    n, lo, hi = 20_000, 2000.0, 12000.0
    x = rng.normal(size=n)
    limit = rng.uniform(lo, hi, n)
    y = (rng.random(n) < risk(x, limit)).astype(float)
    ld = log_density_in_log_limit(np.full(n, -math.log(hi - lo)), limit, variable="limit")
    target = np.where(x < 1.0, 4000.0 + 2000.0 * (x < 0), 0.0)
    truth = risk(x, target)[target > 0].mean()
    df = estimate_policy(LoggedData(limit, y, ld, risk(x, limit)), target, risk(x, target))
    for method in ("ipw", "dr"):
        assert abs(df.loc[method, "default_rate"] - truth) < 4 * df.loc[method, "se"] + 0.003


def test_density_conversion_matches_a_change_of_variables():
    rng = np.random.default_rng(5)
    u = rng.normal(8.0, 0.7, 50)
    limit = np.exp(u)
    f_u = stats.norm.logpdf(u, 8.0, 0.7)
    f_l = f_u - u  # density of L = exp(u): f_u / L
    np.testing.assert_allclose(log_density_in_log_limit(f_l, limit, variable="limit"), f_u)
    scale = 3000.0
    f_s = f_u - (np.log(limit) - np.log(limit + scale))  # ds/du = L / (L + scale)
    np.testing.assert_allclose(
        log_density_in_log_limit(f_s, limit, variable="log1p", scale=scale), f_u
    )
    zero = log_density_in_log_limit(np.array([-0.5]), np.array([0.0]), variable="limit")
    assert zero[0] == -0.5  # the point mass at 0 is unchanged


def test_silverman_bandwidth_rule():
    limit = np.exp(np.random.default_rng(6).normal(8.0, 0.5, 4000))
    limit[:500] = 0.0
    u = np.log(limit[limit > 0])
    iqr = np.subtract(*np.quantile(u, [0.75, 0.25]))
    expect = 0.9 * min(u.std(ddof=1), iqr / 1.349) * u.size ** (-0.2)
    assert silverman_bandwidth(limit) == pytest.approx(expect)
    with pytest.raises(ValueError, match="bandwidth"):
        silverman_bandwidth(np.array([0.0, 5.0, 5.0]))


def test_bootstrap_sums_resample_rows():
    cols = np.arange(12, dtype=float).reshape(6, 2)
    sums = bootstrap_sums(cols, 500, random_state=0)
    assert sums.shape == (500, 2)
    # every resample has 6 rows: column 1 = column 0 + 6 row by row
    np.testing.assert_allclose(sums[:, 1], sums[:, 0] + 6)
    assert sums[:, 0].mean() == pytest.approx(cols[:, 0].sum(), rel=0.05)


def test_bad_input_names_the_field_and_rows():
    logged, t, pt = logged_world(200, seed=7)
    with pytest.raises(ValueError, match=r"LoggedData\.limit .*rows \[3\]"):
        LoggedData(np.r_[logged.limit[:3], -1.0], np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match=r"LoggedData\.outcome"):
        LoggedData(np.ones(3), np.array([0.0, 2.0, np.nan]), np.zeros(3))
    with pytest.raises(ValueError, match=r"LoggedData\.log_density"):
        LoggedData(np.array([0.0, 5.0]), np.zeros(2), np.array([np.nan, -np.inf]))
    LoggedData(np.array([0.0, 5.0]), np.zeros(2), np.array([np.nan, -1.0]))  # 0: ignored
    with pytest.raises(ValueError, match="p_hat_target"):
        estimate_policy(logged, t, np.where(t > 0, 1.5, pt))
    with pytest.raises(ValueError, match="target"):
        estimate_policy(logged, -t, pt)
    no_model = LoggedData(logged.limit, logged.outcome, logged.log_density)
    with pytest.raises(ValueError, match="p_hat_logged"):
        estimate_policy(no_model, t, pt, methods=("dr",))
    with pytest.raises(ValueError, match="unknown methods"):
        estimate_policy(logged, t, pt, methods=("dm", "magic"))


def test_warns_without_overlap_or_effective_sample():
    logged, t, pt = logged_world(3000, seed=8)
    with pytest.warns(UserWarning) as caught:
        estimate_policy(logged, t * 50.0, pt, methods=("ipw",), n_boot=20)
    assert any("outside the range of logged positive limits" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match="effective sample size"):
        estimate_policy(logged, t, pt, methods=("ipw",), bandwidth=1e-4, n_boot=20)


def test_ziln_tower_density_is_the_density_of_log_limit():
    """The model's ZILN log-density plugs in as LoggedData.log_density without conversion."""
    import torch

    from creditgraph.model.towers import ziln_log_density

    rng = np.random.default_rng(9)
    n, scale = 500, 5000.0
    dens = {
        "logit_p": torch.tensor(rng.normal(1.0, 0.5, n)),
        "mu": torch.tensor(rng.normal(0.2, 0.3, n)),
        "log_sigma": torch.tensor(rng.normal(-0.5, 0.2, n)),
    }
    limit = np.where(rng.random(n) < 0.8, np.exp(rng.normal(8.5, 0.6, n)), 0.0)
    got = ziln_log_density(dens, torch.tensor(limit), scale).numpy()
    p = _sigmoid(dens["logit_p"].numpy())
    mu_u = dens["mu"].numpy() + math.log(scale)  # the same normal, shifted to u = log L
    sd = np.exp(dens["log_sigma"].numpy())
    u = np.log(np.where(limit > 0, limit, 1.0))
    want = np.where(limit > 0, np.log(p) + stats.norm.logpdf(u, mu_u, sd), np.log1p(-p))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
