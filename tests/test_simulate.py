"""The simulator: the properties every benchmark relies on actually hold in its output."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import skew

from creditgraph.data.simulate import SimulationConfig, _peer_mean, dose_response, simulate


@pytest.fixture(scope="module")
def world():
    cfg = SimulationConfig(n_users=20_000, seed=11)
    return cfg, simulate(cfg)


def test_same_seed_same_world():
    a = simulate(SimulationConfig(n_users=500, seed=1))
    b = simulate(SimulationConfig(n_users=500, seed=1))
    c = simulate(SimulationConfig(n_users=500, seed=2))
    pd.testing.assert_frame_equal(a["users"], b["users"])
    assert not a["users"]["credit_limit"].equals(c["users"]["credit_limit"])


def test_missing_not_at_random(world):
    _, t = world
    risk = t["segments"]["latent_risk"].to_numpy()
    for col in ("external_score", "debt_to_revenue", "late_payment_ratio"):
        miss = t["users"][col].isna().to_numpy()
        assert miss.mean() > 0.02
        assert risk[miss].mean() > risk[~miss].mean() + 0.2, col
    # noise features are missing completely at random
    miss = t["users"]["noise_normal"].isna().to_numpy()
    assert abs(risk[miss].mean() - risk[~miss].mean()) < 0.15


def test_limits_are_zero_inflated_lognormal_and_confounded(world):
    _, t = world
    u = t["users"]
    lim = u["credit_limit"].to_numpy()
    assert 0.2 < (lim == 0).mean() < 0.7
    assert abs(skew(np.log(lim[lim > 0]))) < 1.0
    # the old policy (users outside the randomized limit tests) is confounded by the features
    test = t["segments"]["limit_test"].to_numpy()
    assert 0.1 < test.mean() < 0.2
    old = ~test
    granted = (lim[old] > 0).astype(float)
    late = u["late_payment_ratio"].fillna(u["late_payment_ratio"].median()).to_numpy()[old]
    gmv = np.log1p(u["gmv_90d"].to_numpy()[old])
    assert np.corrcoef(granted, late)[0, 1] < -0.05  # riskier-looking users got less credit
    assert np.corrcoef(np.log1p(lim[old]), gmv)[0, 1] > 0.3  # capacity drives size
    # limit tests ignore the features: their limits barely track capacity
    assert (
        abs(np.corrcoef(np.log1p(lim[test]), np.log1p(u["gmv_90d"].to_numpy()[test]))[0, 1]) < 0.1
    )


def test_gangs_share_entities_and_default_together(world):
    _, t = world
    seg, links = t["segments"], t["links"]
    gang = seg.set_index("user_id")["gang_id"]
    lk = links.assign(gang=gang.reindex(links["user_id"]).to_numpy())
    per_entity = lk[lk["gang"] >= 0].groupby(["entity_type", "entity_id"])["user_id"].nunique()
    assert (per_entity >= 2).sum() > 0.5 * seg.loc[seg.gang_id >= 0, "gang_id"].nunique()
    p = seg["p_default_observed"].to_numpy()
    assert p[seg.gang_id >= 0].mean() > 2 * p[seg.gang_id < 0].mean()
    # correlated defaults: gang-level default rates vary more than binomial noise alone
    y = t["users"]["default"].to_numpy()
    g = seg["gang_id"].to_numpy()
    df = pd.DataFrame({"g": g, "y": y}).query("g >= 0").dropna()
    rates = df.groupby("g")["y"].agg(["mean", "size"])
    rbar = df["y"].mean()
    binomial_var = (rbar * (1 - rbar) / rates["size"]).mean()
    assert rates["mean"].var() > 1.5 * binomial_var


def test_public_supernodes_exist(world):
    _, t = world
    deg = t["links"].groupby(["entity_type", "entity_id"])["user_id"].nunique()
    assert (deg > 100).sum() >= 20  # above every max_degree of the default spec


def test_links_before_and_after_as_of_and_labels_mature(world):
    cfg, t = world
    u = t["users"].set_index("user_id")
    lk = t["links"]
    as_of = u.loc[lk["user_id"], "as_of"].to_numpy()
    after = lk["ts"].to_numpy() > as_of
    assert 0.05 < after.mean() < 0.5
    start = pd.Timestamp(cfg.start)
    snapshot = start + pd.Timedelta(days=cfg.span_days + cfg.snapshot_lag_days)
    immature = u["as_of"] + pd.Timedelta(days=cfg.label_window_days) > snapshot
    assert u.loc[immature, "default"].isna().all()
    assert u.loc[~immature, "default"].notna().all()


def test_truth_is_a_nonlinear_increasing_curve(world):
    cfg, t = world
    grid = np.asarray(cfg.truth_grid)
    p = t["truth"]["p_default"].reshape(-1, len(grid))
    assert p.shape == (cfg.n_users, len(grid))
    assert np.all(np.diff(p, axis=1) >= -1e-6)
    # the truth at the observed limit is the probability the outcome was drawn from
    seg = t["segments"]
    assert np.all((seg["p_default_observed"] > 0) & (seg["p_default_observed"] < 1))
    # segments respond differently: gangs rise early, manufacturers late
    rho = np.array([0.25, 1.5])
    gang = dose_response(rho, np.array([2, 2]))
    manu = dose_response(rho, np.array([1, 1]))
    assert gang[0] / gang[1] > 0.4 > manu[0] / manu[1]


def test_peer_effect_uses_only_earlier_peers():
    group = np.array([0, 0, 0, -1, 1, 1])
    t = np.array([3.0, 1.0, 2.0, 0.0, 5.0, 4.0])
    v = np.array([10.0, 20.0, 30.0, 99.0, 7.0, 8.0])
    out = _peer_mean(group, t, v)
    # user 0 (t=3) sees users 1 and 2; user 1 (t=1) sees nobody; user 3 has no group
    np.testing.assert_allclose(out, [25.0, 0.0, 20.0, 0.0, 8.0, 0.0])


def test_weighted_groups_recruit_heavier_users():
    from creditgraph.data.simulate import _groups

    rng = np.random.default_rng(0)
    risk = rng.normal(0, 1, 5000)
    idx = np.arange(5000)
    plain = _groups(np.random.default_rng(1), idx, 0.05, (3, 8))
    weighted = _groups(np.random.default_rng(1), idx, 0.05, (3, 8), weights=np.exp(risk))
    assert (plain >= 0).sum() == (weighted >= 0).sum() == 250
    assert abs(risk[plain >= 0].mean()) < 0.2
    assert risk[weighted >= 0].mean() > 0.6  # E[r | picked ~ exp(r)] = 1 for a standard normal


def test_cli_without_covariates_writes_the_default_world(tmp_path):
    from typer.testing import CliRunner

    from creditgraph.cli import app

    out = tmp_path / "sim"
    res = CliRunner().invoke(app, ["simulate", "--out", str(out), "--users", "300", "--seed", "3"])
    assert res.exit_code == 0, res.output
    direct = simulate(SimulationConfig(n_users=300, seed=3))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "users.parquet"), direct["users"])
    pd.testing.assert_frame_equal(pd.read_parquet(out / "links.parquet"), direct["links"])
    res = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "x"), "--drop", "Y"])
    assert res.exit_code == 2 and "--covariates" in res.output
