"""Post-hoc calibration of risk curves and reliability per limit band."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from creditgraph.model.calibration import (
    CurveCalibrator,
    calibration_table,
    expected_calibration_error,
    reliability_by_band,
)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def miscalibrated(n: int, seed: int):
    """True risk sigmoid(z); the model is over-confident: sigmoid(1.6 z + 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-2.2, 0.8, size=n)
    y = (rng.random(n) < _sigmoid(z)).astype(float)
    return _sigmoid(1.6 * z + 1.0), y, _sigmoid(z)


def _ece(p, y):
    return expected_calibration_error(calibration_table(y, p, 10))


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_calibration_removes_miscalibration_on_fresh_users(method):
    p_fit, y_fit, _ = miscalibrated(20_000, seed=0)
    p_new, y_new, true_new = miscalibrated(40_000, seed=1)
    cal = CurveCalibrator(method=method).fit(p_fit, y_fit)
    before, after = _ece(p_new, y_new), _ece(cal.transform(p_new), y_new)
    assert before > 0.025
    assert after < before / 3 and after < 0.012
    # closer to the true risk of each user, not only on average
    err_before = np.abs(p_new - true_new).mean()
    assert np.abs(cal.transform(p_new) - true_new).mean() < 0.5 * err_before


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_calibrated_curves_stay_monotone_and_nan_stays_nan(method):
    p_fit, y_fit, _ = miscalibrated(5_000, seed=2)
    cal = CurveCalibrator(method=method, min_count=100).fit(p_fit, y_fit)
    ramp = np.linspace(0.0, 1.0, 2001)
    mapped = cal.transform(ramp)
    assert np.all(np.diff(mapped) > 0)  # strictly increasing: no flat steps
    assert mapped.min() >= 0.0 and mapped.max() <= 1.0
    rng = np.random.default_rng(3)
    curves = np.sort(rng.random((50, 12)), axis=1)
    curves[0, 5] = np.nan
    out = cal.transform(curves)
    assert out.shape == curves.shape
    assert np.isnan(out[0, 5]) and np.isfinite(np.delete(out.ravel(), 5)).all()
    assert np.all(np.diff(out[1:], axis=1) >= 0)


def test_isotonic_bin_without_defaults_does_not_map_to_zero():
    rng = np.random.default_rng(4)
    p = np.concatenate([np.full(300, 0.001), rng.uniform(0.05, 0.4, 3000)])
    y = np.concatenate([np.zeros(300), (rng.random(3000) < p[300:]).astype(float)])
    cal = CurveCalibrator(min_count=300).fit(p, y)
    assert cal.transform(np.array([0.001]))[0] > 0.0
    assert cal.knots_x_[0] == 0.0 and cal.knots_x_[-1] == 1.0  # anchored ends


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_unlabeled_dropped_and_zero_weight_equals_subset(method):
    p, y, _ = miscalibrated(4_000, seed=5)
    ref = CurveCalibrator(method=method, min_count=100).fit(p, y)
    y_nan = y.copy()
    y_nan[::7] = np.nan
    w = np.ones_like(p)
    w[::7] = 0.0
    a = CurveCalibrator(method=method, min_count=100).fit(p, y_nan)
    b = CurveCalibrator(method=method, min_count=100).fit(p, y, sample_weight=w)
    c = CurveCalibrator(method=method, min_count=100).fit(p[w > 0], y[w > 0])
    ramp = np.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(a.transform(ramp), c.transform(ramp), atol=1e-10)
    np.testing.assert_allclose(b.transform(ramp), c.transform(ramp), atol=1e-10)
    assert a.n_fit_ == c.n_fit_ == int((w > 0).sum())
    assert not np.allclose(ref.transform(ramp), c.transform(ramp))


def test_platt_integer_weights_equal_replicated_rows():
    p, y, _ = miscalibrated(3_000, seed=6)
    w = np.random.default_rng(7).integers(1, 4, size=p.size).astype(float)
    a = CurveCalibrator(method="platt").fit(p, y, sample_weight=w)
    b = CurveCalibrator(method="platt").fit(
        np.repeat(p, w.astype(int)), np.repeat(y, w.astype(int))
    )
    assert a.coef_ == pytest.approx(b.coef_, rel=1e-3)
    assert a.intercept_ == pytest.approx(b.intercept_, rel=1e-3)


@pytest.mark.parametrize("method", ["isotonic", "platt"])
def test_to_dict_round_trips_through_json(method):
    p, y, _ = miscalibrated(3_000, seed=8)
    cal = CurveCalibrator(method=method, min_count=150).fit(p, y)
    back = CurveCalibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    x = np.random.default_rng(9).random((20, 7))
    np.testing.assert_array_equal(back.transform(x), cal.transform(x))
    assert back.get_params() == cal.get_params() and back.method_ == method
    bad = cal.to_dict() | {"format": "pickle"}
    with pytest.raises(ValueError, match="format"):
        CurveCalibrator.from_dict(bad)


def test_too_little_data_gives_identity_with_a_warning():
    p = np.array([0.1, 0.2, 0.3, 0.4])
    with pytest.warns(UserWarning, match="identity"):
        cal = CurveCalibrator(min_count=10).fit(p, np.array([0.0, 1.0, 0.0, 1.0]))
    assert cal.method_ == "identity"
    np.testing.assert_array_equal(cal.transform(p), p)
    with pytest.warns(UserWarning, match="identity"):  # one class only
        CurveCalibrator(min_count=2).fit(p, np.zeros(4))


def test_anti_informative_platt_is_clipped_to_a_constant_map():
    rng = np.random.default_rng(10)
    p = rng.uniform(0.05, 0.5, 5000)
    y = (rng.random(5000) < 0.55 - p).astype(float)  # higher prediction, fewer defaults
    with pytest.warns(UserWarning, match="slope"):
        cal = CurveCalibrator(method="platt").fit(p, y)
    out = cal.transform(np.array([0.05, 0.5]))
    assert out[0] == pytest.approx(out[1]) == pytest.approx(y.mean(), abs=1e-6)


def test_bad_input_is_rejected_with_the_field_named():
    p, y, _ = miscalibrated(500, seed=11)
    with pytest.raises(ValueError, match="method"):
        CurveCalibrator(method="beta").fit(p, y)
    with pytest.raises(ValueError, match="p must be probabilities"):
        CurveCalibrator().fit(np.append(p[:-1], 1.5), y)
    with pytest.raises(ValueError, match="y must be 0/1"):
        CurveCalibrator().fit(p, np.append(y[:-1], 2.0))
    with pytest.raises(ValueError, match="sample_weight"):
        CurveCalibrator().fit(p, y, sample_weight=-np.ones_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = CurveCalibrator(min_count=100).fit(p, y)
    with pytest.raises(ValueError, match="p must be probabilities"):
        cal.transform(np.array([[0.1, -0.2]]))


def test_reliability_by_band_finds_the_miscalibrated_band():
    rng = np.random.default_rng(12)
    n = 40_000
    limits = np.where(rng.random(n) < 0.2, 0.0, rng.lognormal(8.0, 0.8, n))
    true = _sigmoid(-2.5 + 0.4 * np.log1p(limits / 3000.0) + rng.normal(0, 0.5, n))
    y = (rng.random(n) < true).astype(float)
    top = limits >= np.quantile(limits[limits > 0], 0.75)
    p = np.where(top, 0.5 * true, true)  # the model halves the risk of the largest limits only
    y_lab = y.copy()
    y_lab[:1000] = np.nan  # unlabeled users are ignored
    bands = reliability_by_band(p, y_lab, limits, n_bands=4, n_bins=10)
    assert list(bands) == ["zero", "q1", "q2", "q3", "q4", "all"]
    assert sum(bands[k]["n"] for k in ("zero", "q1", "q2", "q3", "q4")) == n - 1000
    assert bands["zero"]["limit_hi"] == 0.0 and bands["q1"]["limit_lo"] > 0.0
    assert bands["q4"]["ece"] > 0.04
    assert max(bands[k]["ece"] for k in ("zero", "q1", "q2", "q3")) < 0.025
    assert bands["q4"]["obs_rate"] > 1.6 * bands["q4"]["mean_pred"]
    # after a calibration fitted on the same band, the band is fixed
    cal = CurveCalibrator().fit(p[top], y[top])
    fixed = reliability_by_band(np.where(top, cal.transform(p), p), y_lab, limits)
    assert fixed["q4"]["ece"] < 0.02
    with pytest.raises(ValueError, match="limits"):
        reliability_by_band(p, y, -limits)
