"""Per-feature causal weights alpha_j by double machine learning (econml), one Ray task per batch.

For feature j: treatment T = x_j (standardized by the std of its observed values, so alpha_j is
the effect of a one-sd change), controls W = the other features, outcome = the teacher's soft
label. econml's ``LinearDML`` residualizes Y and T on the controls with cross-fitted LightGBM
nuisances and fits theta_j(X) in the final stage; alpha_j is the mean of theta_j(X) over the rows
used, with econml's standard error and confidence interval of that mean.

Rows where x_j is missing are dropped for feature j only. Missing controls:

* ``heterogeneity="linear"``: theta_j(X) is linear in the other features, standardized with
  missing values set to 0 (the observed mean); the missingness indicators of those features go
  into W, so the nuisances see exactly the information that native NaN handling would give.
* ``heterogeneity="constant"``: X is empty and W holds the other features with NaN, which the
  LightGBM nuisances handle natively (``allow_missing=True``).

:func:`dml_ray` and :func:`dml_sequential` give the same numbers for the same seeds: each
feature's seed is derived from ``(config.seed, j)`` only, never from scheduling order.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import ray
from econml.dml import LinearDML
from sklearn.base import clone
from tqdm.auto import tqdm

from creditgraph.causal.config import DMLConfig
from creditgraph.utils.logs import get_logger
from creditgraph.utils.runtime import require_ray

log = get_logger(__name__)

COLUMNS = [
    "feature",
    "alpha",
    "stderr",
    "ci_low",
    "ci_high",
    "scale",
    "n_rows",
    "seconds",
    "status",
    "error",
]


def feature_seed(seed: int, j: int) -> int:
    """The seed of feature ``j``: depends on the base seed and the feature index only."""
    return int(np.random.SeedSequence([seed, j]).generate_state(1)[0] % (2**31 - 1))


def subsample_rows(n: int, max_rows: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded random subsample of ``max_rows`` rows, or None if no cap applies."""
    if max_rows is None or n <= max_rows:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_rows, replace=False))


def _seeded(estimator: Any, seed: int) -> Any:
    """A fresh copy of a nuisance estimator, seeded when it takes a ``random_state``."""
    est = clone(estimator)
    if "random_state" in est.get_params():
        est.set_params(random_state=seed)
    return est


def fit_feature(
    X: np.ndarray,
    y: np.ndarray,
    j: int,
    cfg: DMLConfig,
    name: str | None = None,
    controls: np.ndarray | None = None,
    model_y: Any = None,
    model_t: Any = None,
) -> dict[str, Any]:
    """Estimate alpha_j for column ``j`` of ``X`` (NaN = missing); raises on failure.

    ``controls`` are extra columns that are always controls, never treatments (e.g. the limit).
    ``model_y`` / ``model_t`` are the nuisance estimators (scikit-learn regressors, econml's
    convention; default ``cfg.nuisance()``), cloned and seeded per feature.
    """
    t0 = time.perf_counter()
    x = X[:, j]
    rows = np.flatnonzero(~np.isnan(x) & ~np.isnan(y))
    if len(rows) < cfg.min_rows:
        raise ValueError(f"only {len(rows)} rows with x_j observed (min_rows={cfg.min_rows})")
    t = x[rows].astype(np.float64)
    scale = float(t.std())
    if not np.isfinite(scale) or scale <= 1e-12:
        raise ValueError("treatment is constant on its observed rows")
    t = (t - t.mean()) / scale
    others = np.delete(X[rows], j, axis=1).astype(np.float64)
    if controls is not None:
        others = np.hstack([others, np.asarray(controls, dtype=np.float64)[rows]])
    yy = np.asarray(y, dtype=np.float64)[rows]
    seed = feature_seed(cfg.seed, j)
    est = LinearDML(
        model_y=_seeded(model_y if model_y is not None else cfg.nuisance(), seed),
        model_t=_seeded(model_t if model_t is not None else cfg.nuisance(), seed + 1),
        cv=cfg.cv,
        random_state=seed,
        allow_missing=cfg.heterogeneity == "constant",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        if cfg.heterogeneity == "linear":
            het, indicators = _heterogeneity_design(others)
            if het.shape[1] == 0:
                est.fit(yy, t, X=None, W=indicators)
                inf = est.const_marginal_ate_inference()
            else:
                est.fit(yy, t, X=het, W=indicators)
                # theta is linear in X, so mean theta(X) = theta(mean X): one row gives econml's
                # point and (exact) standard error of the mean without n per-row predictions
                inf = est.const_marginal_ate_inference(het.mean(axis=0, keepdims=True))
        else:
            est.fit(yy, t, X=None, W=others)
            inf = est.const_marginal_ate_inference()
        lo, hi = inf.conf_int_mean(alpha=1 - cfg.ci_level)
    return {
        "feature": name if name is not None else str(j),
        "alpha": float(np.squeeze(inf.mean_point)),
        "stderr": float(np.squeeze(inf.stderr_mean)),
        "ci_low": float(np.squeeze(lo)),
        "ci_high": float(np.squeeze(hi)),
        "scale": scale,
        "n_rows": len(rows),
        "seconds": time.perf_counter() - t0,
        "status": "ok",
        "error": None,
    }


def _heterogeneity_design(others: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Standardized, zero-imputed effect modifiers and the missingness indicators as W.

    Columns constant on these rows (or never observed) carry no information and would make the
    final stage rank-deficient, so they are dropped; so are constant indicators.
    """
    miss = np.isnan(others)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # all-missing columns
        mu = np.nanmean(others, axis=0)
        sd = np.nanstd(others, axis=0)
    keep = np.isfinite(sd) & (sd > 1e-12)
    het = (others[:, keep] - mu[keep]) / sd[keep]
    het[miss[:, keep]] = 0.0
    share = miss.mean(0)
    varying = (share > 0) & (share < 1)
    return het, (miss[:, varying].astype(np.float64) if varying.any() else None)


def _failure(name: str, exc: BaseException) -> dict[str, Any]:
    return {
        "feature": name,
        "alpha": np.nan,
        "stderr": np.nan,
        "ci_low": np.nan,
        "ci_high": np.nan,
        "scale": np.nan,
        "n_rows": 0,
        "seconds": np.nan,
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
    }


def _table(results: dict[int, dict[str, Any]], names: Sequence[str]) -> pd.DataFrame:
    df = pd.DataFrame([results[j] for j in range(len(names))], columns=COLUMNS)
    df["n_rows"] = df["n_rows"].astype(np.int64)
    df["error"] = df["error"].astype(object)
    failed = df.loc[df["status"] != "ok", ["feature", "error"]]
    for row in failed.itertuples():
        log.warning("DML failed for feature %s: %s", row.feature, row.error)
    return df


def _fit_batch(
    X: np.ndarray,
    y: np.ndarray,
    controls: np.ndarray | None,
    batch: list[int],
    names: list[str],
    cfg: DMLConfig,
    nuisances: tuple[Any, Any],
) -> list[dict[str, Any]]:
    return [fit_feature(X, y, j, cfg, names[i], controls, *nuisances) for i, j in enumerate(batch)]


def dml_sequential(
    X: np.ndarray,
    y: np.ndarray,
    feature_names: Sequence[str],
    cfg: DMLConfig,
    controls: np.ndarray | None = None,
    progress: bool = False,
    model_y: Any = None,
    model_t: Any = None,
) -> pd.DataFrame:
    """The plain loop: every feature in turn in this process, retried up to ``max_retries``."""
    X, y, controls = _prepare(X, y, controls, cfg)
    results: dict[int, dict[str, Any]] = {}
    for j in tqdm(range(X.shape[1]), desc="DML", disable=not progress):
        for attempt in range(cfg.max_retries + 1):
            try:
                results[j] = fit_feature(X, y, j, cfg, feature_names[j], controls, model_y, model_t)
                break
            except Exception as exc:
                if attempt == cfg.max_retries:
                    results[j] = _failure(feature_names[j], exc)
    return _table(results, feature_names)


def dml_ray(
    X: np.ndarray,
    y: np.ndarray,
    feature_names: Sequence[str],
    cfg: DMLConfig,
    controls: np.ndarray | None = None,
    progress: bool = False,
    model_y: Any = None,
    model_t: Any = None,
) -> pd.DataFrame:
    """All features as Ray tasks (``features_per_task`` per task, ``n_jobs`` CPUs each).

    The data go to the object store once. A task that still fails after ``max_retries`` Ray
    retries is split into single-feature tasks, so one bad feature is reported (name and error)
    without losing the others in its batch. Needs a running Ray runtime.
    """
    require_ray("the per-feature DML on Ray")

    X, y, controls = _prepare(X, y, controls, cfg)
    names = list(feature_names)
    if len(names) != X.shape[1]:
        raise ValueError(f"{len(names)} names for {X.shape[1]} columns")
    refs = ray.put(X), ray.put(y), ray.put(controls), ray.put(cfg), ray.put((model_y, model_t))
    remote = ray.remote(_fit_batch).options(
        num_cpus=cfg.n_jobs, max_retries=cfg.max_retries, retry_exceptions=True
    )

    def submit(batch: list[int]) -> Any:
        return remote.remote(*refs[:3], batch, [names[j] for j in batch], *refs[3:])

    d, step = len(names), cfg.features_per_task
    pending = {submit(b): b for b in (list(range(i, min(i + step, d))) for i in range(0, d, step))}
    results: dict[int, dict[str, Any]] = {}
    with tqdm(total=len(names), desc="DML (Ray)", disable=not progress) as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            batch = pending.pop(done[0])
            try:
                for j, res in zip(batch, ray.get(done[0]), strict=True):
                    results[j] = res
                bar.update(len(batch))
            except Exception as exc:
                if len(batch) > 1:
                    pending.update({submit([j]): [j] for j in batch})
                else:
                    results[batch[0]] = _failure(names[batch[0]], getattr(exc, "cause", exc))
                    bar.update(1)
    return _table(results, names)


def _prepare(
    X: np.ndarray, y: np.ndarray, controls: np.ndarray | None, cfg: DMLConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    X = np.ascontiguousarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.float64)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X {X.shape} and y {y.shape} do not match")
    keep = subsample_rows(len(y), cfg.max_rows, cfg.seed)
    if keep is not None:
        X, y = X[keep], y[keep]
        controls = None if controls is None else np.asarray(controls)[keep]
    return X, y, controls
