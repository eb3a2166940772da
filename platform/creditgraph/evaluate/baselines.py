"""Baseline risk-curve estimators a risk modeller would pick instead of the graph model.

All share one interface (scikit-learn style; learned state ends in ``_``):

- ``fit(X[n, F], T[n], Y[n]) -> self``: ``X`` raw features (NaN = missing, kept as
  information), ``T`` the historical limit (``>= 0``, zero-inflated, heavy tailed), ``Y`` the
  0/1 default. Rows with ``Y`` NaN (unlabeled) are dropped.
- ``predict_curves(X, grid) -> float[n, G]``: p(default | do(L)) at each grid limit, in [0, 1].
- ``predict_factual(X, T) -> float[n]``: the prediction at each user's own limit.

Estimators: :class:`LGBMSLearner` (LightGBM with the limit as a feature), :class:`EconmlDMLCurve`
(econml double machine learning with a nonlinear treatment basis) and :class:`ConstantCurve`
(the training default rate everywhere, the "no model" reference).
"""

from __future__ import annotations

import time
import warnings
from typing import ClassVar

import numpy as np
from econml.dml import CausalForestDML, LinearDML
from lightgbm import LGBMClassifier, LGBMModel, LGBMRegressor
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.multioutput import MultiOutputRegressor

from creditgraph.policy.decide import check_grid
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)


def _check_X(X: np.ndarray, n: int | None = None) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D [n, F], got shape {X.shape}")
    if np.isinf(X).any():
        raise ValueError("X has infinite values (use NaN for missing)")
    if n is not None and X.shape[0] != n:
        raise ValueError(f"X has {X.shape[0]} rows, expected {n}")
    return X


def _check_T(T: np.ndarray, n: int) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64).ravel()
    if T.shape != (n,):
        raise ValueError(f"T must have shape ({n},), got {T.shape}")
    if not (np.isfinite(T).all() and (T >= 0).all()):
        raise ValueError("T (limit) must be finite and >= 0")
    return T


def _check_fit_inputs(
    X: np.ndarray, T: np.ndarray, Y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = _check_X(X)
    n = X.shape[0]
    T = _check_T(T, n)
    Y = np.asarray(Y, dtype=np.float64).ravel()
    if Y.shape != (n,):
        raise ValueError(f"Y must have shape ({n},), got {Y.shape}")
    keep = np.isfinite(Y)
    if not keep.all():
        log.info("dropping %d unlabeled rows before fitting", int((~keep).sum()))
        X, T, Y = X[keep], T[keep], Y[keep]
    if not np.isin(Y, (0.0, 1.0)).all():
        raise ValueError("Y must be 0/1 (NaN = unlabeled)")
    if Y.size == 0 or Y.min() == Y.max():
        raise ValueError("Y needs both classes to fit a default model")
    return X, T, Y.astype(np.int64)


class CurveEstimator(BaseEstimator):
    """Base class: subclasses implement ``fit``, ``predict_factual`` and usually a vectorized
    ``predict_curves`` (the default evaluates ``predict_factual`` once per grid limit)."""

    def fit(self, X: np.ndarray, T: np.ndarray, Y: np.ndarray) -> CurveEstimator:
        raise NotImplementedError

    def predict_factual(self, X: np.ndarray, T: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_curves(self, X: np.ndarray, grid: np.ndarray) -> np.ndarray:
        grid = check_grid(grid)
        X = _check_X(X)
        n = X.shape[0]
        return np.column_stack([self.predict_factual(X, np.full(n, g)) for g in grid])


class ConstantCurve(CurveEstimator):
    """The training default rate at every limit for every user (a flat, feature-blind curve)."""

    def fit(self, X: np.ndarray, T: np.ndarray, Y: np.ndarray) -> ConstantCurve:
        _, _, Y = _check_fit_inputs(X, T, Y)
        self.rate_ = float(Y.mean())
        return self

    def predict_factual(self, X: np.ndarray, T: np.ndarray) -> np.ndarray:
        X = _check_X(X)
        _check_T(T, X.shape[0])
        return np.full(X.shape[0], self.rate_)

    def predict_curves(self, X: np.ndarray, grid: np.ndarray) -> np.ndarray:
        grid = check_grid(grid)
        return np.full((_check_X(X).shape[0], grid.size), self.rate_)


def lgbm_classifier(n_estimators: int = 300, random_state: int = 0, **params) -> LGBMClassifier:
    """The LightGBM classifier the baselines use unless given another estimator: row/column
    subsampling, mild L2, one thread (the benchmark runs several fits side by side)."""
    return LGBMClassifier(
        **{
            "n_estimators": n_estimators,
            "learning_rate": 0.05,
            "num_leaves": 31,
            "min_child_samples": 50,
            "subsample": 0.8,
            "subsample_freq": 1,
            "colsample_bytree": 0.8,
            "reg_lambda": 1.0,
            "n_jobs": 1,
            "random_state": random_state,
            "verbose": -1,
            **params,
        }
    )


def lgbm_regressor(n_estimators: int = 200, random_state: int = 0, **params) -> LGBMRegressor:
    """The LightGBM regressor of the econml baselines' treatment nuisance (same settings)."""
    return LGBMRegressor(**lgbm_classifier(n_estimators, random_state, **params).get_params())


class LGBMSLearner(CurveEstimator):
    """S-learner: one classifier on ``[X, T]``; the curve sets ``T`` to each grid limit.

    ``estimator`` is any scikit-learn classifier taking NaN (default: :func:`lgbm_classifier`);
    missing features reach it as NaN. The limit enters untransformed: trees are invariant to
    monotone transforms of a feature. ``monotone_limit=True`` constrains the risk to be
    non-decreasing in the limit (LightGBM's ``monotone_constraints``; what a careful modeller
    adds); the default is the plain S-learner. Being a predictive model of the observed data, it
    estimates p(default | X, T), which equals the causal curve only if ``X`` captures all
    confounding.
    """

    def __init__(self, estimator=None, monotone_limit: bool = False, random_state: int = 0) -> None:
        self.estimator = estimator
        self.monotone_limit = monotone_limit
        self.random_state = random_state

    def fit(self, X: np.ndarray, T: np.ndarray, Y: np.ndarray) -> LGBMSLearner:
        X, T, Y = _check_fit_inputs(X, T, Y)
        t0 = time.perf_counter()
        model = clone(self.estimator) if self.estimator is not None else lgbm_classifier()
        if "random_state" in model.get_params():
            model.set_params(random_state=self.random_state)
        if self.monotone_limit:
            if not isinstance(model, LGBMModel):
                raise ValueError("monotone_limit needs a LightGBM estimator (monotone_constraints)")
            model.set_params(monotone_constraints=[0] * X.shape[1] + [1])
        self.model_ = model.fit(np.column_stack([X, T]), Y)
        self.n_features_in_ = X.shape[1]
        self.fit_seconds_ = time.perf_counter() - t0
        log.debug("LGBMSLearner fitted on %d rows in %.1f s", len(Y), self.fit_seconds_)
        return self

    def predict_factual(self, X: np.ndarray, T: np.ndarray) -> np.ndarray:
        X = _check_X(X)
        T = _check_T(T, X.shape[0])
        return self.model_.predict_proba(np.column_stack([X, T]))[:, 1]

    def predict_curves(self, X: np.ndarray, grid: np.ndarray) -> np.ndarray:
        grid = check_grid(grid)
        X = _check_X(X)
        n, g = X.shape[0], grid.size
        # One predict call on the n*G (user, limit) pairs, user-major.
        XT = np.column_stack([np.repeat(X, g, axis=0), np.tile(grid, n)])
        return self.model_.predict_proba(XT)[:, 1].reshape(n, g)


class LogPolyTreatment(TransformerMixin, BaseEstimator):
    """Treatment basis ``φ(T) = [u, u², ..., u^degree]`` with ``u = log1p(T / scale)``.

    The log compresses the heavy tail of the limit; ``scale`` (the median positive limit when
    not given) puts ``u`` on a unit scale so the powers stay well conditioned. No constant
    column: it would be absorbed by the outcome nuisance.
    """

    def __init__(self, degree: int = 3, scale: float | None = None) -> None:
        self.degree = degree
        self.scale = scale

    def fit(self, T: np.ndarray, y: None = None) -> LogPolyTreatment:
        T = np.asarray(T, dtype=np.float64).ravel()
        if self.scale is not None:
            self.scale_ = float(self.scale)
        else:
            pos = T[T > 0]
            self.scale_ = float(np.median(pos)) if pos.size else 1.0
        return self

    def transform(self, T: np.ndarray) -> np.ndarray:
        u = np.log1p(np.asarray(T, dtype=np.float64).ravel() / self.scale_)
        return np.column_stack([u**k for k in range(1, self.degree + 1)])


class MissingEncoder(TransformerMixin, BaseEstimator):
    """NaN → training median, plus a 0/1 missing indicator for every column that had NaN in
    training. Used only where a model cannot take NaN (econml's final stage); the indicators
    keep missingness as information instead of imputing it away."""

    def fit(self, X: np.ndarray, y: None = None) -> MissingEncoder:
        X = _check_X(X)
        nan = np.isnan(X)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column
            med = np.nanmedian(X, axis=0)
        self.fill_ = np.where(np.isnan(med), 0.0, med)
        self.indicator_cols_ = np.flatnonzero(nan.any(axis=0))
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        X = _check_X(X)
        nan = np.isnan(X)
        filled = np.where(nan, self.fill_[None, :], X)
        return np.column_stack([filled, nan[:, self.indicator_cols_].astype(np.float64)])


class EconmlDMLCurve(CurveEstimator):
    """Double machine learning (econml 0.17) on a nonlinear basis of the limit.

    Model (partially linear in the basis ``φ`` of :class:`LogPolyTreatment`)::

        E[Y | X, T] = g(X) + θ(X) · φ(T)

    econml cross-fits the nuisances ``m_y(X) = E[Y | X]`` (LightGBM classifier,
    ``discrete_outcome=True`` so the residual is ``Y - P(Y=1 | X)``) and ``m_t(X) = E[φ(T) | X]``
    (one LightGBM regressor per basis column: econml passes ``treatment_featurizer`` output to
    ``model_t``), then fits ``θ(X)`` on the residuals: ``final="forest"`` uses
    ``CausalForestDML`` (heterogeneous θ by a generalized random forest), ``final="linear"`` uses
    ``LinearDML`` (θ linear in X). The curve follows from ``E[Y | X] = g(X) + θ(X) · m_t(X)``::

        p(L | x) = m_y(x) + θ(x) · (φ(L) - m_t(x)),   clipped to [0, 1],

    with ``m_y`` and ``m_t`` the average of econml's fitted cross-fitting fold models
    (``models_y``/``models_t``), so no nuisance is refitted. ``X`` reaches econml through
    :class:`MissingEncoder` (median fill + missing indicators) because the final stage does not
    take NaN; LightGBM nuisances see the same encoded ``X`` (the indicators keep the
    information NaN carried).
    """

    FINALS: ClassVar[tuple[str, ...]] = ("forest", "linear")

    def __init__(
        self,
        final: str = "forest",
        model_y=None,
        model_t=None,
        degree: int = 3,
        cv: int = 3,
        forest_estimators: int = 64,
        forest_min_samples_leaf: int = 100,
        forest_max_depth: int | None = 10,
        n_jobs: int = 1,
        random_state: int = 0,
    ) -> None:
        self.final = final
        self.model_y = model_y
        self.model_t = model_t
        self.degree = degree
        self.cv = cv
        self.forest_estimators = forest_estimators
        self.forest_min_samples_leaf = forest_min_samples_leaf
        self.forest_max_depth = forest_max_depth
        self.n_jobs = n_jobs
        self.random_state = random_state

    def _make_dml(self):
        rs = self.random_state
        model_y = clone(self.model_y) if self.model_y is not None else lgbm_classifier(200, rs)
        model_t = clone(self.model_t) if self.model_t is not None else lgbm_regressor(200, rs)
        if self.degree > 1:
            model_t = MultiOutputRegressor(model_t)
        common = {
            "model_y": model_y,
            "model_t": model_t,
            "treatment_featurizer": LogPolyTreatment(self.degree, self.phi_.scale_),
            "discrete_outcome": True,
            "cv": self.cv,
            "random_state": self.random_state,
        }
        if self.final == "forest":
            # the GRF needs n_estimators to be a multiple of subforest_size (4)
            n_trees = 4 * max(1, -(-self.forest_estimators // 4))
            return CausalForestDML(
                **common,
                n_estimators=n_trees,
                min_samples_leaf=self.forest_min_samples_leaf,
                max_depth=self.forest_max_depth,
                inference=False,
                n_jobs=self.n_jobs,
            )
        if self.final == "linear":
            return LinearDML(**common, fit_cate_intercept=True)
        raise ValueError(f"final must be one of {self.FINALS}, got {self.final!r}")

    def fit(self, X: np.ndarray, T: np.ndarray, Y: np.ndarray) -> EconmlDMLCurve:
        if self.final not in self.FINALS:
            raise ValueError(f"final must be one of {self.FINALS}, got {self.final!r}")
        if self.degree < 1:
            raise ValueError("degree must be >= 1")
        X, T, Y = _check_fit_inputs(X, T, Y)
        t0 = time.perf_counter()
        self.encoder_ = MissingEncoder().fit(X)
        self.phi_ = LogPolyTreatment(self.degree).fit(T)
        Xe = self.encoder_.transform(X)
        self.dml_ = self._make_dml()
        self.dml_.fit(Y, T, X=Xe)
        self.models_y_ = [m for fold in self.dml_.models_y for m in fold]
        self.models_t_ = [m for fold in self.dml_.models_t for m in fold]
        self.n_features_in_ = X.shape[1]
        self.fit_seconds_ = time.perf_counter() - t0
        log.debug(
            "EconmlDMLCurve(%s) fitted on %d rows in %.1f s", self.final, len(Y), self.fit_seconds_
        )
        return self

    def _nuisances(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``m_y[n]``, ``m_t[n, k]`` and ``θ[n, k]`` for raw features ``X``."""
        Xe = self.encoder_.transform(_check_X(X))
        n = Xe.shape[0]
        m_y = np.mean([m.predict_proba(Xe)[:, 1] for m in self.models_y_], axis=0)
        m_t = np.mean([np.asarray(m.predict(Xe)).reshape(n, -1) for m in self.models_t_], axis=0)
        theta = np.asarray(self.dml_.const_marginal_effect(Xe)).reshape(n, -1)
        if theta.shape[1] != m_t.shape[1]:
            raise RuntimeError(f"θ has {theta.shape[1]} columns, basis has {m_t.shape[1]}")
        return m_y, m_t, theta

    def predict_factual(self, X: np.ndarray, T: np.ndarray) -> np.ndarray:
        X = _check_X(X)
        T = _check_T(T, X.shape[0])
        m_y, m_t, theta = self._nuisances(X)
        p = m_y + (theta * (self.phi_.transform(T) - m_t)).sum(axis=1)
        return np.clip(p, 0.0, 1.0)

    def predict_curves(self, X: np.ndarray, grid: np.ndarray) -> np.ndarray:
        grid = check_grid(grid)
        m_y, m_t, theta = self._nuisances(X)
        phi = self.phi_.transform(grid)  # [G, k]
        p = (m_y - (theta * m_t).sum(axis=1))[:, None] + theta @ phi.T
        return np.clip(p, 0.0, 1.0)


#: Baselines by the names reports and configs use: (class, preset parameters).
BASELINES: dict[str, tuple[type[CurveEstimator], dict]] = {
    "lgbm_slearner": (LGBMSLearner, {}),
    "lgbm_slearner_monotone": (LGBMSLearner, {"monotone_limit": True}),
    "econml_forest": (EconmlDMLCurve, {"final": "forest"}),
    "econml_linear": (EconmlDMLCurve, {"final": "linear"}),
    "constant": (ConstantCurve, {}),
}


def make_baseline(name: str, **params) -> CurveEstimator:
    """A baseline by name (see :data:`BASELINES`); ``params`` override its presets."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(BASELINES)}")
    cls, preset = BASELINES[name]
    return cls(**{**preset, **params})
