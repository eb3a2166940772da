"""Post-hoc calibration of risk curves, and reliability per limit band.

A :class:`CurveCalibrator` learns a monotone map ``p -> p_cal`` from held-out labeled users: their
predicted risk at their factual (logged) limit and their outcome. Applied elementwise to a whole
curve array ``[n, G]`` it keeps every curve non-decreasing in the limit, because the map is
non-decreasing (strictly increasing for ``"isotonic"``, and for ``"platt"`` unless the data say
the model is anti-informative).

**Interventional calibration.** Fitted on all held-out users, the map calibrates
``p(default | x, L observed)``: under confounded historical limits that is not the causal
``p(default | x, do(L))`` the decision uses. Two ways to target the causal risk with the same
API: fit on the users of a randomized limit test only (pass that subset), or fit on all users with
``sample_weight`` = stabilized inverse-probability weights of their logged limit (for instance
``exp(log f(L) - log f(L | x))`` from the ZILN tower), which reweights the held-out sample to
one where the limit is independent of the covariates.

:func:`reliability_by_band` shows the calibration of the factual predictions separately for users
declined historically (``L = 0``) and for quantile bands of the positive limits, so a report can
show the table and ECE per band before and after calibration
(``reliability_by_band(cal.transform(p), y, limits)``).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted


def labeled_pairs(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y {y.shape} and p {p.shape} differ in shape")
    keep = np.isfinite(y)
    y, p = y[keep], p[keep]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0/1 (NaN = unlabeled is dropped)")
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("predicted probabilities must be finite and in [0, 1]")
    return y, p, int((~keep).sum())


def calibration_table(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Reliability table on equal-mass bins of the predicted probability.

    Users are sorted by ``p`` and split into ``n_bins`` groups of (nearly) equal size; empty
    groups (fewer users than bins) are dropped. Unlabeled rows (``y`` NaN) are ignored.
    Returns arrays ``p_lo``, ``p_hi`` (range of ``p`` in the bin), ``mean_pred``, ``obs_rate``
    and ``count``, one entry per bin (JSON-able via ``write_json``; ``pd.DataFrame(table)``
    gives a table).
    """
    y, p, _ = labeled_pairs(y, p)
    order = np.argsort(p, kind="stable")
    parts = [b for b in np.array_split(order, max(1, int(n_bins))) if b.size]
    return {
        "p_lo": np.array([p[b].min() for b in parts]),
        "p_hi": np.array([p[b].max() for b in parts]),
        "mean_pred": np.array([p[b].mean() for b in parts]),
        "obs_rate": np.array([y[b].mean() for b in parts]),
        "count": np.array([b.size for b in parts], dtype=np.int64),
    }


def expected_calibration_error(table: dict[str, np.ndarray]) -> float:
    """ECE of a calibration table: count-weighted mean of ``|mean_pred - obs_rate|``."""
    count = np.asarray(table["count"], dtype=np.float64)
    if count.sum() == 0:
        return float("nan")
    gap = np.abs(np.asarray(table["mean_pred"]) - np.asarray(table["obs_rate"]))
    return float((count * gap).sum() / count.sum())


Method = Literal["isotonic", "platt"]
_FORMAT = "creditgraph.curve_calibrator/1"


def _logit(p: np.ndarray, eps: float) -> np.ndarray:
    p = np.clip(p, eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def _check_probs(p: Any, name: str, allow_nan: bool) -> np.ndarray:
    arr = np.asarray(p, dtype=np.float64)
    finite = np.isfinite(arr)
    bad = ~((finite & (arr >= 0) & (arr <= 1)) | (allow_nan & np.isnan(arr)))
    if bad.any():
        pos = np.argwhere(bad)[:5].tolist()
        raise ValueError(
            f"{name} must be probabilities in [0, 1]"
            + (" (NaN allowed)" if allow_nan else "")
            + f"; bad entries at {pos} ({int(bad.sum())} in all)"
        )
    return arr


class CurveCalibrator(BaseEstimator):
    """Monotone post-hoc calibration of predicted default probabilities (scikit-learn style).

    Parameters
    ----------
    method : {"isotonic", "platt"}
        ``"isotonic"``: centered isotonic regression. Users are sorted by ``p`` and cut into
        equal-count bins of at least ``min_count`` users; sklearn's ``IsotonicRegression`` pools
        adjacent bins (PAV); each pooled block becomes one knot at (its mean prediction, its
        default rate), and the knots, anchored at (0, 0) and (1, 1), are joined linearly. The
        map is strictly increasing: a step function would give a whole range of limits the same
        risk, and the decision would slide to the top of any step whose average is under the
        ceiling. ``"platt"``: ``sigmoid(a * logit(p) + b)`` by unpenalized logistic regression
        (``a`` clipped at 0 from below, with a warning, so the map stays non-decreasing).
    min_count : int
        Fewest labeled users to fit at all (below it, or with one class only, the calibrator is
        the identity map and warns) and, for ``"isotonic"``, fewest users per bin.
    prior_count : float
        ``"isotonic"``: each bin's default rate is shrunk toward its mean prediction by this many
        pseudo-users, so a bin without defaults does not map to a risk of exactly 0.
    eps : float
        Probabilities are clipped to ``[eps, 1 - eps]`` before a logit (``"platt"``).

    Learned state: ``method_`` (``"isotonic"``, ``"platt"`` or ``"identity"``), ``n_fit_``,
    ``knots_x_``/``knots_y_`` (isotonic), ``coef_``/``intercept_`` (Platt).
    """

    def __init__(
        self,
        method: Method = "isotonic",
        min_count: int = 200,
        prior_count: float = 2.0,
        eps: float = 1e-6,
    ):
        self.method = method
        self.min_count = min_count
        self.prior_count = prior_count
        self.eps = eps

    def _check_params(self) -> None:
        if self.method not in ("isotonic", "platt"):
            raise ValueError(f"method must be 'isotonic' or 'platt', got {self.method!r}")
        if int(self.min_count) < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        if not self.prior_count >= 0:
            raise ValueError(f"prior_count must be >= 0, got {self.prior_count}")
        if not 0 < self.eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {self.eps}")

    def fit(
        self, p: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None
    ) -> CurveCalibrator:
        """Fit on predicted risk ``p[n]`` at the factual limit and outcomes ``y[n]`` (0/1; NaN =
        unlabeled, dropped). ``sample_weight[n] >= 0``: e.g. inverse-probability weights for an
        interventional calibration (module docstring)."""
        self._check_params()
        p = _check_probs(p, "p", allow_nan=False).ravel()
        y = np.asarray(y, dtype=np.float64).ravel()
        if y.shape != p.shape:
            raise ValueError(f"y {y.shape} and p {p.shape} differ in shape")
        if sample_weight is None:
            w = np.ones_like(p)
        else:
            w = np.asarray(sample_weight, dtype=np.float64).ravel()
            if w.shape != p.shape:
                raise ValueError(f"sample_weight {w.shape} and p {p.shape} differ in shape")
            bad = ~(np.isfinite(w) & (w >= 0))
            if bad.any():
                raise ValueError(
                    "sample_weight must be finite and >= 0; bad rows "
                    f"{np.flatnonzero(bad)[:5].tolist()} ({int(bad.sum())} in all)"
                )
        keep = np.isfinite(y) & (w > 0)
        if not np.isin(y[keep], (0.0, 1.0)).all():
            rows = np.flatnonzero(keep & ~np.isin(y, (0.0, 1.0)))
            raise ValueError(f"y must be 0/1 (NaN = unlabeled); bad rows {rows[:5].tolist()}")
        p, y, w = p[keep], y[keep], w[keep]
        self.n_fit_ = int(p.size)
        self.knots_x_ = self.knots_y_ = None
        self.coef_ = self.intercept_ = None
        if p.size < int(self.min_count) or y.min(initial=1.0) == y.max(initial=0.0):
            warnings.warn(
                f"CurveCalibrator: {p.size} labeled users (min_count={self.min_count}), "
                f"{int(y.sum())} defaults: too little to calibrate; using the identity map",
                stacklevel=2,
            )
            self.method_ = "identity"
            return self
        if self.method == "isotonic":
            self._fit_isotonic(p, y, w)
        else:
            self._fit_platt(p, y, w)
        self.method_ = self.method
        return self

    def _fit_isotonic(self, p: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        order = np.argsort(p, kind="stable")
        bins = np.array_split(order, max(1, p.size // int(self.min_count)))
        bw = np.array([w[b].sum() for b in bins])
        bp = np.array([(w[b] * p[b]).sum() for b in bins]) / bw
        # shrink each bin's rate toward its mean prediction by prior_count pseudo-users,
        # counted in units of the bin's average weight
        k = self.prior_count * bw / np.array([b.size for b in bins])
        by = (np.array([(w[b] * y[b]).sum() for b in bins]) + k * bp) / (bw + k)
        fitted = IsotonicRegression(y_min=0.0, y_max=1.0).fit_transform(bp, by, sample_weight=bw)
        block = np.concatenate([[0], np.cumsum(np.abs(np.diff(fitted)) > 1e-12)])
        bsum = np.bincount(block, weights=bw)
        cx = np.bincount(block, weights=bw * bp) / bsum
        cy = np.bincount(block, weights=bw * fitted) / bsum
        kx, ky = [0.0], [0.0]
        for x_, y_ in zip(cx, cy, strict=True):
            if x_ > kx[-1] and y_ >= ky[-1]:
                kx.append(float(x_))
                ky.append(float(y_))
        if kx[-1] < 1.0:
            kx.append(1.0)
            ky.append(1.0)
        self.knots_x_ = np.array(kx)
        self.knots_y_ = np.array(ky)

    def _fit_platt(self, p: np.ndarray, y: np.ndarray, w: np.ndarray) -> None:
        lr = LogisticRegression(C=np.inf).fit(_logit(p, self.eps)[:, None], y, sample_weight=w)
        a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        if a < 0:
            warnings.warn(
                f"CurveCalibrator: Platt slope {a:.3g} < 0 (predictions anti-correlated with "
                "outcomes); clipped to 0, so every probability maps to the same value",
                stacklevel=3,
            )
            a = 0.0
            b = float(_logit(np.array([np.average(y, weights=w)]), self.eps)[0])
        self.coef_, self.intercept_ = a, b

    def transform(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, same shape as ``p`` (any shape, e.g. curves ``[n, G]``);
        NaN stays NaN. The map is non-decreasing, so calibrated curves stay monotone."""
        check_is_fitted(self, "method_")
        arr = _check_probs(p, "p", allow_nan=True)
        if self.method_ == "identity":
            return arr.copy()
        if self.method_ == "isotonic":
            out = np.interp(arr, self.knots_x_, self.knots_y_)
            return np.where(np.isnan(arr), np.nan, out)
        z = self.coef_ * _logit(arr, self.eps) + self.intercept_
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict[str, Any]:
        """The fitted calibrator as plain JSON types (``write_json`` it; no pickle)."""
        check_is_fitted(self, "method_")

        def floats(a: np.ndarray | None) -> list[float] | None:
            return None if a is None else [float(v) for v in a]

        return {
            "format": _FORMAT,
            "params": self.get_params(),
            "method_": self.method_,
            "n_fit_": self.n_fit_,
            "knots_x_": floats(self.knots_x_),
            "knots_y_": floats(self.knots_y_),
            "coef_": self.coef_,
            "intercept_": self.intercept_,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CurveCalibrator:
        """Rebuild a fitted calibrator from :meth:`to_dict` output."""
        if data.get("format") != _FORMAT:
            raise ValueError(f"not a saved CurveCalibrator (format {data.get('format')!r})")
        cal = cls(**data["params"])
        cal._check_params()
        method = data["method_"]
        if method not in ("isotonic", "platt", "identity"):
            raise ValueError(f"saved CurveCalibrator has unknown method_ {method!r}")
        cal.method_ = method
        cal.n_fit_ = int(data["n_fit_"])
        kx, ky = data.get("knots_x_"), data.get("knots_y_")
        cal.knots_x_ = None if kx is None else np.asarray(kx, dtype=np.float64)
        cal.knots_y_ = None if ky is None else np.asarray(ky, dtype=np.float64)
        cal.coef_, cal.intercept_ = data.get("coef_"), data.get("intercept_")
        if method == "isotonic" and (
            cal.knots_x_ is None
            or cal.knots_x_.shape != cal.knots_y_.shape
            or np.any(np.diff(cal.knots_x_) <= 0)
            or np.any(np.diff(cal.knots_y_) < 0)
        ):
            raise ValueError("saved isotonic CurveCalibrator has invalid knots")
        if method == "platt" and (cal.coef_ is None or cal.intercept_ is None or cal.coef_ < 0):
            raise ValueError("saved Platt CurveCalibrator needs coef_ >= 0 and intercept_")
        return cal


def reliability_by_band(
    p: np.ndarray, y: np.ndarray, limits: np.ndarray, n_bands: int = 4, n_bins: int = 10
) -> dict[str, dict[str, Any]]:
    """Calibration of factual predictions per band of the factual limit.

    Bands: ``"zero"`` (users with ``L = 0``, omitted when there are none) and ``"q1"`` ...
    ``"qK"``, quantile bands of the positive limits of labeled users (``K <= n_bands``: equal
    quantiles collapse), plus ``"all"``. Unlabeled users (``y`` NaN) are ignored. Each entry:
    ``limit_lo``, ``limit_hi`` (the band's range), ``n``, ``n_defaults``, ``mean_pred``,
    ``obs_rate``, ``ece`` and ``table`` (:func:`~creditgraph.evaluate.metrics.calibration_table`
    with ``n_bins`` equal-mass bins).
    """
    p = _check_probs(p, "p", allow_nan=False).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    limits = np.asarray(limits, dtype=np.float64).ravel()
    if not (p.shape == y.shape == limits.shape):
        raise ValueError(f"p {p.shape}, y {y.shape} and limits {limits.shape} differ in shape")
    if not (np.isfinite(limits).all() and (limits >= 0).all()):
        raise ValueError("limits must be finite and >= 0")
    if n_bands < 1:
        raise ValueError(f"n_bands must be >= 1, got {n_bands}")
    lab = np.isfinite(y)
    p, y, limits = p[lab], y[lab], limits[lab]

    def entry(mask: np.ndarray) -> dict[str, Any]:
        table = calibration_table(y[mask], p[mask], n_bins)
        return {
            "limit_lo": float(limits[mask].min()),
            "limit_hi": float(limits[mask].max()),
            "n": int(mask.sum()),
            "n_defaults": int(y[mask].sum()),
            "mean_pred": float(p[mask].mean()),
            "obs_rate": float(y[mask].mean()),
            "ece": expected_calibration_error(table),
            "table": table,
        }

    out: dict[str, dict[str, Any]] = {}
    zero = limits == 0
    if zero.any():
        out["zero"] = entry(zero)
    pos = limits[~zero]
    if pos.size:
        edges = np.unique(np.quantile(pos, np.linspace(0.0, 1.0, n_bands + 1)))
        if edges.size == 1:
            band = np.zeros(limits.size, dtype=np.int64)
        else:
            band = np.clip(np.searchsorted(edges, limits, side="right") - 1, 0, edges.size - 2)
        for b in range(max(1, edges.size - 1)):
            mask = ~zero & (band == b)
            if mask.any():
                out[f"q{b + 1}"] = entry(mask)
    if lab.any():
        out["all"] = entry(np.ones(limits.size, dtype=bool))
    return out
