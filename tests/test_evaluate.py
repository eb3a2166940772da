"""Evaluation layer: curve metrics, the limit rule, baselines and report figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from creditgraph.data.errors import DataValidationError
from creditgraph.evaluate import plots
from creditgraph.evaluate.baselines import (
    BASELINES,
    ConstantCurve,
    EconmlDMLCurve,
    LGBMSLearner,
    MissingEncoder,
    lgbm_classifier,
    lgbm_regressor,
    make_baseline,
)
from creditgraph.evaluate.metrics import (
    calibration_table,
    classification_metrics,
    curve_at,
    evaluate_curves,
    judge_limits,
    mise,
    oracle_policy_limits,
    policy_metrics,
    truth_curves,
)
from creditgraph.policy.decide import largest_feasible_limit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def dose_response(n: int, seed: int = 0, f: int = 6):
    """Confounded, zero-inflated limits with a known causal curve.

    Risk rises with log1p(limit / 5000) (slope varies with x2); risky users (high x0) get credit
    less often and smaller limits, so the raw association of limit and default is confounded.
    x3 is missing more often for risky users (MNAR), x4 at random.
    """
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, f))
    x0, x1, x2 = X[:, 0], X[:, 1], X[:, 2]
    scale = 5000.0
    base = -1.6 + 1.0 * x0 + 0.4 * x1
    beta = 0.9 + 0.4 * np.tanh(x2)
    granted = rng.random(n) < _sigmoid(1.0 - 1.5 * x0)
    T = np.where(granted, np.exp(np.log(scale) - 0.8 * x0 + 0.5 * rng.normal(size=n)), 0.0)
    Y = (rng.random(n) < _sigmoid(base + beta * np.log1p(T / scale))).astype(float)
    X[rng.random(n) < _sigmoid(-1.5 + x0), 3] = np.nan
    X[rng.random(n) < 0.2, 4] = np.nan
    grid = np.linspace(0.0, np.quantile(T[T > 0], 0.9), 11)
    true = _sigmoid(base[:, None] + beta[:, None] * np.log1p(grid / scale)[None, :])
    return X, T, Y, grid, true


# ---------------------------------------------------------------- curve reading and MISE


def test_curve_at_interpolates_linearly_and_holds_ends_flat():
    grid = np.array([0.0, 10.0, 30.0])
    curves = np.array([[0.0, 0.1, 0.5], [0.2, 0.2, 0.2]])
    # user 0 at 5 (halfway 0..10) and 20 (halfway 10..30); user 1 is flat
    got = curve_at(curves, grid, np.array([[5.0, 20.0, -3.0, 99.0], [5.0, 20.0, 0.0, 30.0]]))
    np.testing.assert_allclose(got[0], [0.05, 0.3, 0.0, 0.5])
    np.testing.assert_allclose(got[1], [0.2, 0.2, 0.2, 0.2])
    np.testing.assert_allclose(curve_at(curves, grid, np.array([10.0, 30.0])), [0.1, 0.2])
    np.testing.assert_allclose(curve_at(curves, grid, 30.0), [0.5, 0.2])
    with pytest.raises(ValueError):
        curve_at(curves, grid, np.zeros(5))


def test_mise_zero_for_identical_and_c_squared_for_offset():
    rng = np.random.default_rng(0)
    grid = np.array([0.0, 1.0, 5.0, 20.0, 100.0])  # non-uniform on purpose
    true = rng.uniform(0.1, 0.8, size=(7, grid.size))
    assert mise(true, true, grid) == 0.0
    for c in (0.05, -0.2):
        value, per_user = mise(true + c, true, grid, per_user=True)
        assert value == pytest.approx(c**2)
        np.testing.assert_allclose(per_user, c**2)


def test_mise_integrates_over_limit_not_grid_points():
    # error e(L) = L / Lmax on [0, Lmax]: (1/Lmax) ∫ e² dL = 1/3, independent of point spacing
    grid = np.linspace(0.0, 50.0, 2001) ** 2 / 50.0  # dense near 0, sparse near the top
    err = grid / grid[-1]
    true = np.zeros((1, grid.size))
    assert mise(err[None, :], true, grid) == pytest.approx(1 / 3, abs=1e-4)
    # the user whose error is larger has the larger per-user ISE
    _, ise = mise(np.vstack([err, 2 * err]), np.zeros((2, grid.size)), grid, per_user=True)
    assert ise[1] == pytest.approx(4 * ise[0])


# ---------------------------------------------------------------- the limit rule


def test_largest_feasible_limit_monotone_and_infeasible():
    grid = np.array([0.0, 100.0, 200.0, 300.0])
    curves = np.array(
        [
            [0.01, 0.02, 0.04, 0.08],  # everything under 0.05 up to 200
            [0.01, 0.02, 0.03, 0.04],  # all feasible -> the top
            [0.20, 0.30, 0.40, 0.50],  # nothing feasible -> smallest grid point
        ]
    )
    limits, idx = largest_feasible_limit(curves, grid, 0.05)
    np.testing.assert_array_equal(idx, [2, 3, 0])
    np.testing.assert_array_equal(limits, [200.0, 300.0, 0.0])


def test_largest_feasible_limit_non_monotone_scans_whole_grid():
    grid = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    curves = np.array([[0.1, 0.3, 0.1, 0.3, 0.3], [0.3, 0.1, 0.3, 0.1, 0.3]])
    _, idx = largest_feasible_limit(curves, grid, 0.2)
    np.testing.assert_array_equal(idx, [2, 3])  # a feasible point above an infeasible one counts
    _, idx_c = largest_feasible_limit(curves, grid, 0.2, contiguous=True)
    # first-crossing rule: user 0 stops before its first breach; user 1 breaches at the start
    np.testing.assert_array_equal(idx_c, [0, 0])


def test_largest_feasible_limit_caps_per_user_ceiling_and_nan():
    grid = np.array([0.0, 10.0, 20.0, 30.0])
    curves = np.tile([0.0, 0.1, 0.2, 0.3], (4, 1))
    r = np.array([0.15, 0.25, 1.0, 1.0])
    cap = np.array([100.0, 100.0, 15.0, 30.0])
    limits, _ = largest_feasible_limit(curves, grid, r, cap)
    np.testing.assert_array_equal(limits, [10.0, 20.0, 10.0, 30.0])
    # a scalar cap below every positive grid point leaves only the first point
    limits, _ = largest_feasible_limit(curves, grid, 1.0, cap=5.0)
    np.testing.assert_array_equal(limits, [0.0] * 4)
    # NaN risk is never feasible
    with_nan = curves.copy()
    with_nan[:, 3] = np.nan
    _, idx = largest_feasible_limit(with_nan, grid, 1.0)
    np.testing.assert_array_equal(idx, [2] * 4)
    with pytest.raises(ValueError):
        largest_feasible_limit(curves, grid[::-1], 0.1)
    with pytest.raises(ValueError):
        largest_feasible_limit(curves, grid, np.array([0.1, 0.2]))


# ---------------------------------------------------------------- policy metrics


def _increasing_truth(n=200, seed=0):
    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 1000.0, 21)
    base = rng.uniform(0.01, 0.08, size=n)
    slope = rng.uniform(0.05, 0.3, size=n)
    true = np.clip(base[:, None] + slope[:, None] * grid[None, :] / grid[-1], 0, 1)
    return grid, true


def test_policy_on_true_curves_is_the_oracle():
    grid, true = _increasing_truth()
    m = policy_metrics(true, true, grid, r_max=0.1)
    assert m["over_ceiling_rate"] == 0.0 == m["oracle_over_ceiling_rate"]
    assert m["violation_rate"] == m["over_ceiling_rate"]  # report alias
    assert m["granted_ratio"] == 1.0
    assert m["limit_satisfaction"] == 1.0
    assert m["exact_match_rate"] == 1.0
    assert m["regret_mean"] == 0.0
    assert m["mean_abs_limit_gap"] == 0.0
    assert 0.0 < m["portfolio_default_rate"] <= 0.1
    assert m["portfolio_default_rate"] == m["oracle_portfolio_default_rate"]


def test_policy_shifted_curves_grant_less_or_violate():
    grid, true = _increasing_truth()
    up = policy_metrics(true + 0.02, true, grid, r_max=0.1)  # pessimistic estimate
    assert up["granted_ratio"] < 1.0
    assert up["limit_satisfaction"] < 1.0
    assert up["over_ceiling_rate"] == 0.0
    assert up["portfolio_default_rate"] < up["oracle_portfolio_default_rate"]
    down = policy_metrics(true - 0.02, true, grid, r_max=0.1)  # optimistic estimate
    assert down["granted_ratio"] > 1.0
    assert down["limit_satisfaction"] == 1.0  # granting more than the oracle is not extra
    assert down["over_ceiling_rate"] > 0.0
    assert down["excess_risk"] > 0.0
    assert down["portfolio_default_rate"] > 0.1


def test_policy_value_follows_its_definition():
    grid = np.array([0.0, 10.0])
    true = np.array([[0.0, 0.1]])
    m = policy_metrics(true, true, grid, r_max=0.2, margin=0.3, lgd=0.6)
    # decided limit 10 at true risk 0.1: 0.3 * 10 * 0.9 - 0.6 * 10 * 0.1
    assert m["value_mean"] == pytest.approx(0.3 * 10 * 0.9 - 0.6 * 10 * 0.1)
    assert m["granted_total"] == 10.0 == m["oracle_total"]
    assert m["granted_share"] == 1.0
    # an estimate that refuses credit has value 0 and positive regret against the oracle
    refuse = policy_metrics(np.array([[0.5, 0.5]]), true, grid, r_max=0.2, margin=0.3, lgd=0.6)
    assert refuse["value_mean"] == 0.0
    assert refuse["granted_share"] == 0.0 and refuse["n_granted"] == 0.0
    assert refuse["over_ceiling_rate"] == 0.0  # declined at 0 although p(0) is not the issue
    assert np.isnan(refuse["portfolio_default_rate"])  # no book, no default rate
    assert refuse["limit_satisfaction"] == 0.0
    assert refuse["regret_mean"] == pytest.approx(m["value_mean"])


def _hand_built():
    grid = np.array([0.0, 10.0, 20.0])
    true = np.array(
        [
            [0.50, 0.60, 0.70],  # too risky even at 0: the oracle declines
            [0.05, 0.08, 0.20],  # oracle 10
            [0.01, 0.03, 0.05],  # oracle 20
            [0.02, 0.06, 0.30],  # oracle 10
        ]
    )
    return grid, true


def test_judge_limits_declined_users_are_not_violations():
    grid, true = _hand_built()
    # user 0 declined (no violation although its risk at 0 is 0.5), user 1 over-granted
    m = judge_limits(np.array([0.0, 20.0, 20.0, 10.0]), true, grid, 0.1)
    assert m["n_granted"] == 3.0 and m["granted_share"] == 0.75
    assert m["over_ceiling_rate"] == pytest.approx(1 / 3)  # only user 1 (0.20 > 0.1)
    assert m["excess_risk"] == pytest.approx(0.10 / 3)
    # the oracle declines user 0 and never breaks the ceiling
    assert m["oracle_n_granted"] == 3.0 and m["oracle_over_ceiling_rate"] == 0.0
    assert m["oracle_total"] == 40.0 and m["granted_total"] == 50.0
    assert m["granted_ratio"] == pytest.approx(50 / 40)


def test_judge_limits_amount_weighting_and_off_grid_limits():
    grid, true = _hand_built()
    # user 1 at 15 (halfway 10..20: 0.14), user 2 at 5 (halfway 0..10: 0.02), user 3 at 10
    limits = np.array([0.0, 15.0, 5.0, 10.0])
    m = judge_limits(limits, true, grid, 0.1, margin=0.1, lgd=0.4)
    p = np.array([0.14, 0.02, 0.06])
    assert m["portfolio_default_rate"] == pytest.approx(p.mean())
    assert m["portfolio_default_rate_amount"] == pytest.approx((limits[1:] * p).sum() / 30.0)
    assert m["portfolio_default_rate_amount"] > m["portfolio_default_rate"]  # big limit, big risk
    assert m["over_ceiling_rate"] == pytest.approx(1 / 3)
    value = 0.1 * limits[1:] * (1 - p) - 0.4 * limits[1:] * p
    assert m["value_total"] == pytest.approx(value.sum())
    assert m["value_mean"] == pytest.approx(value.sum() / 4)
    # satisfaction over the three users the oracle grants (10, 20, 10): 1, 5/20, 1
    assert m["limit_satisfaction"] == pytest.approx((1.0 + 0.25 + 1.0) / 3)
    ora_value = 0.1 * np.array([10, 20, 10]) * (1 - np.array([0.08, 0.05, 0.06])) - 0.4 * np.array(
        [10, 20, 10]
    ) * np.array([0.08, 0.05, 0.06])
    assert m["oracle_value_mean"] == pytest.approx(ora_value.sum() / 4)


def test_judge_limits_oracle_override_per_user_ceiling_and_bad_input():
    grid, true = _hand_built()
    limits = np.array([0.0, 10.0, 20.0, 10.0])
    m = judge_limits(limits, true, grid, 0.1, oracle_limits=np.array([0.0, 20.0, 20.0, 20.0]))
    assert m["limit_satisfaction"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert m["oracle_over_ceiling_rate"] == pytest.approx(2 / 3)
    # a per-user ceiling: user 3 has a ceiling of 0.05, so 10 (0.06) breaks it
    r = np.array([0.1, 0.1, 0.1, 0.05])
    assert judge_limits(limits, true, grid, r)["over_ceiling_rate"] == pytest.approx(1 / 3)
    with pytest.warns(UserWarning, match="above the largest truth-grid limit"):
        judge_limits(np.array([0.0, 0.0, 25.0, 0.0]), true, grid, 0.1)
    for bad in (np.array([0.0, -1.0, 0.0, 0.0]), np.array([0.0, np.nan, 0.0, 0.0]), np.zeros(3)):
        with pytest.raises(ValueError, match="limits"):
            judge_limits(bad, true, grid, 0.1)
    np.testing.assert_array_equal(oracle_policy_limits(true, grid, 0.1), [0.0, 10.0, 20.0, 10.0])
    np.testing.assert_array_equal(
        oracle_policy_limits(true, grid, 0.1, cap=15.0), [0.0, 10.0, 10.0, 10.0]
    )


# ---------------------------------------------------------------- factual prediction metrics


def test_classification_metrics_perfect_and_random_scores():
    rng = np.random.default_rng(1)
    y = (rng.random(2000) < 0.2).astype(float)
    perfect = classification_metrics(y, y)
    assert perfect["auc"] == 1.0 and perfect["ap"] == 1.0 and perfect["brier"] == 0.0
    noise = classification_metrics(y, rng.random(y.size))
    assert abs(noise["auc"] - 0.5) < 0.05
    assert noise["ap"] < 0.3


def test_calibration_ece_small_when_calibrated_large_when_not():
    rng = np.random.default_rng(2)
    p = rng.beta(1.5, 6.0, size=40_000)
    y = (rng.random(p.size) < p).astype(float)
    good = classification_metrics(y, p, n_bins=10)
    assert good["ece"] < 0.01
    bad = classification_metrics(y, 0.5 * p, n_bins=10)
    # predictions halved: every bin is off by about half its rate
    assert bad["ece"] == pytest.approx(0.5 * p.mean(), rel=0.15)
    t = good["calibration"]
    assert t["count"].sum() == p.size and t["count"].max() - t["count"].min() <= 1  # equal mass
    assert np.all(np.diff(t["mean_pred"]) > 0)


def test_classification_drops_unlabeled_and_handles_one_class():
    y = np.array([0.0, 1.0, np.nan, 1.0, 0.0])
    p = np.array([0.1, 0.9, 0.5, 0.8, 0.2])
    m = classification_metrics(y, p, n_bins=2)
    assert m["n"] == 4 and m["n_unlabeled"] == 1 and m["auc"] == 1.0
    one = classification_metrics(np.zeros(3), np.array([0.1, 0.2, 0.3]))
    assert np.isnan(one["auc"]) and np.isnan(one["ap"])
    table = calibration_table(np.array([0.0, 1.0]), np.array([0.2, 0.7]), n_bins=10)
    assert table["count"].tolist() == [1, 1]  # fewer users than bins: empty bins dropped
    with pytest.raises(ValueError):
        classification_metrics(np.array([0.0, 2.0]), np.array([0.1, 0.2]))


def test_truth_curves_pivots_long_format_and_rejects_gaps():
    grid = np.array([0.0, 50.0, 100.0])
    curves = np.array([[0.1, 0.2, 0.3], [0.05, 0.06, 0.07], [0.4, 0.5, 0.6]])
    long = pd.DataFrame(
        {
            "user_idx": np.repeat([7, 3, 9], 3),
            "limit": np.tile(grid, 3),
            "p_default": curves.ravel(),
        }
    ).sample(frac=1.0, random_state=0)
    g, got = truth_curves(long, np.array([9, 7]))
    np.testing.assert_array_equal(g, grid)
    np.testing.assert_array_equal(got, curves[[2, 0]])
    with pytest.raises(DataValidationError):
        truth_curves(long.iloc[1:], np.array([3, 7, 9]))


def test_evaluate_curves_one_row_with_segments():
    grid, true = _increasing_truth(n=40)
    pred = true.copy()
    pred[:10] += 0.1  # only the "gang" users are off, by 0.1 everywhere
    segs = np.array(["gang"] * 10 + ["ordinary"] * 30)
    y = (np.random.default_rng(0).random(40) < true[:, 0]).astype(float)
    row = evaluate_curves(
        pred, true, grid, r_max=0.1, y=y, factual=curve_at(pred, grid, 0.0), segments=segs
    )
    assert row["mise_gang"] == pytest.approx(0.01) and row["mise_ordinary"] == 0.0
    assert row["mise"] == pytest.approx(0.01 * 10 / 40)
    assert {"violation_rate", "granted_ratio", "auc", "ece", "calibration"} <= set(row)
    with pytest.raises(ValueError):
        evaluate_curves(pred, true, grid, r_max=0.1, y=y)


def test_evaluate_config_checks_baseline_names():
    from pydantic import ValidationError

    from creditgraph.evaluate.config import EvaluateConfig

    cfg = EvaluateConfig(baselines=["constant"], baseline_params={"constant": {}})
    assert make_baseline(cfg.baselines[0]).__class__ is ConstantCurve
    with pytest.raises(ValidationError):
        EvaluateConfig(baselines=["xgboost"])
    with pytest.raises(ValidationError):
        EvaluateConfig(baselines=["constant"], baseline_params={"lgbm_slearner": {}})


# ---------------------------------------------------------------- baselines


@pytest.fixture(scope="module")
def confounded():
    X, T, Y, grid, true = dose_response(4000, seed=3)
    n = 3000
    return (X[:n], T[:n], Y[:n]), (X[n:], T[n:], Y[n:], true[n:]), grid


FAST = {
    "lgbm_slearner": {"estimator": lgbm_classifier(80)},
    "lgbm_slearner_monotone": {"estimator": lgbm_classifier(80)},
    "econml_forest": {
        "model_y": lgbm_classifier(60),
        "model_t": lgbm_regressor(60),
        "forest_estimators": 16,
        "cv": 2,
    },
    "econml_linear": {"model_y": lgbm_classifier(60), "model_t": lgbm_regressor(60), "cv": 2},
}


@pytest.mark.parametrize("name", sorted(FAST))
def test_baselines_recover_an_increasing_curve_better_than_constant(confounded, name):
    (Xtr, Ttr, Ytr), (Xte, Tte, Yte, true), grid = confounded
    est = make_baseline(name, **FAST[name]).fit(Xtr, Ttr, Ytr)
    curves = est.predict_curves(Xte, grid)
    assert curves.shape == true.shape
    assert np.isfinite(curves).all() and curves.min() >= 0.0 and curves.max() <= 1.0
    # right shape: risk rises with the limit on average (as the true curves do)
    assert np.mean(curves[:, -1] - curves[:, 0]) > 0.3 * np.mean(true[:, -1] - true[:, 0])
    const = ConstantCurve().fit(Xtr, Ttr, Ytr).predict_curves(Xte, grid)
    assert mise(curves, true, grid) < 0.5 * mise(const, true, grid)
    # the factual prediction is the curve at the user's own limit
    on_grid = grid[np.arange(len(Xte)) % grid.size]
    np.testing.assert_allclose(
        est.predict_factual(Xte, on_grid), curve_at(curves, grid, on_grid), atol=1e-9
    )
    fact = classification_metrics(Yte, est.predict_factual(Xte, Tte))
    assert fact["auc"] > 0.6


def test_baseline_inputs_validated_and_unlabeled_dropped(confounded):
    (Xtr, Ttr, Ytr), _, grid = confounded
    Y = Ytr.copy()
    Y[:10] = np.nan
    est = LGBMSLearner(lgbm_classifier(10)).fit(Xtr, Ttr, Y)
    assert est.predict_curves(Xtr[:5], grid).shape == (5, grid.size)
    with pytest.raises(ValueError):
        LGBMSLearner(lgbm_classifier(10)).fit(Xtr, -Ttr - 1.0, Ytr)
    # the nuisance models are estimators passed in (econml's convention), cloned, never refitted
    given = lgbm_classifier(10)
    LGBMSLearner(given).fit(Xtr, Ttr, Ytr)
    assert not hasattr(given, "booster_")
    mono = LGBMSLearner(lgbm_classifier(30), monotone_limit=True).fit(Xtr, Ttr, Ytr)
    assert (np.diff(mono.predict_curves(Xtr[:50], grid), axis=1) >= -1e-12).all()
    with pytest.raises(ValueError):
        ConstantCurve().fit(Xtr, Ttr, np.zeros_like(Ytr))
    with pytest.raises(ValueError):
        EconmlDMLCurve(final="tree").fit(Xtr, Ttr, Ytr)
    with pytest.raises(ValueError):
        make_baseline("nope")
    assert {"lgbm_slearner", "econml_forest", "econml_linear", "constant"} <= set(BASELINES)
    assert make_baseline("econml_linear", cv=4).get_params()["cv"] == 4


def test_missing_encoder_keeps_missingness_as_indicators():
    X = np.array([[1.0, np.nan, 5.0], [3.0, 2.0, np.nan], [np.nan, 4.0, 7.0], [5.0, 6.0, 9.0]])
    enc = MissingEncoder().fit(X)
    out = enc.transform(X)
    assert out.shape == (4, 6) and np.isfinite(out).all()
    np.testing.assert_array_equal(out[:, 3:], np.isnan(X).astype(float))
    np.testing.assert_array_equal(out[2, :3], [3.0, 4.0, 7.0])  # medians of observed values
    # indicators only for columns with NaN in training; a new NaN elsewhere gets the median
    clean = MissingEncoder().fit(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    np.testing.assert_array_equal(clean.transform(np.array([[np.nan, 1.0]])), [[3.0, 1.0]])


# ---------------------------------------------------------------- figures


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_plots_write_png_files(tmp_path):
    grid, true = _increasing_truth(n=30)
    est = {"model": true + 0.01, "lgbm": true * 0.9}
    segs = np.array(["gang"] * 10 + ["ordinary"] * 15 + ["high-missingness"] * 5)
    users = plots.sample_users_by_segment(segs, k=3, seed=0)
    assert set(users) == {"gang", "ordinary", "high-missingness"}
    assert all(len(v) == 3 for v in users.values())
    rng = np.random.default_rng(0)
    p = rng.random(500)
    y = (rng.random(500) < p).astype(float)
    tables = {"model": calibration_table(y, p), "lgbm": calibration_table(y, p**2)}
    rows = [
        {"name": "full", "kind": "model", "mise": 0.010, "seed": 0},
        {"name": "full", "kind": "model", "mise": 0.012, "seed": 1},
        {"name": "no IPW", "kind": "ablation", "mise": 0.02, "mise_sd": 0.003},
        {"name": "lgbm", "kind": "baseline", "mise": float("nan")},
    ]
    results = {k: policy_metrics(v, true, grid, 0.1) for k, v in est.items()}
    written = [
        plots.plot_curves(grid, true, est, users, tmp_path / "curves.png", r_max=0.1),
        plots.plot_calibration(tables, tmp_path / "calibration.png"),
        plots.plot_metric_bars(rows, "mise", tmp_path / "ablation.png", error_col="mise_sd"),
        plots.plot_policy(results, tmp_path / "policy.png", r_max=0.1),
    ]
    for path in written:
        assert _is_png(path), path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    with pytest.raises(ValueError):
        plots.plot_metric_bars(rows, "auc", tmp_path / "none.png")
