"""Off-policy evaluation (OPE) of a candidate limit policy from logged (historical) limits.

Logged data (:class:`LoggedData`): for each user ``i`` the historical limit ``L_i >= 0`` (0 = no
credit), the outcome ``y_i`` (0/1; NaN = unlabeled, dropped from every estimate), the behaviour
density of the logged limit ``log_density_i`` and, for the doubly robust estimator, the model's
risk at the logged limit ``p_hat_logged_i``. A candidate deterministic policy gives each user a
limit ``target_i`` (0 = declined) and the model's risk there, ``p_hat_target_i``.

**The kernel variable is ``u = log L``** (for ``L > 0``). The behaviour density must be the
density of the ZILN model in that variable: for ``L_i > 0``,
``log f(u_i | x_i) = log P(L > 0 | x_i) + log N(log(L_i / scale); mu(x_i), sigma(x_i))``, which
is exactly :func:`~creditgraph.model.towers.ziln_log_density` (a shift by ``log scale`` changes
neither kernel distances nor the normal density, so the model's ``scale`` does not matter).
A density of another variable converts with :func:`log_density_in_log_limit`. For a randomized
limit test, pass the known design density here: the estimators are the same.

Estimators of the policy's **portfolio default rate** (mean true risk over users it grants,
``target > 0``; a declined user carries no risk), following Kallus & Zhou (AISTATS 2018) for the
continuous part, with ``w_i = K_h(u(L_i) - u(target_i)) / f(u(L_i) | x_i)`` when both ``L_i > 0``
and ``target_i > 0``, else ``w_i = 0`` (a logged 0 says nothing about a positive limit):

- ``dm``: the model's risk at the target, ``mean p_hat_target`` over granted users;
- ``ipw``: ``sum w_i y_i / n_granted``;
- ``snipw``: ``sum w_i y_i / sum w_i`` (self-normalized);
- ``dr``: ``mean(p_hat_target_i + w_i (y_i - p_hat_logged_i))`` over granted users.

``E[w_i | x_i] = 1`` when the density is right, so IPW/SNIPW/DR estimate the risk smoothed by
the kernel over ``log L``: their bias is ``O(h^2)`` for a risk smooth in ``log L``. Weights can be
clipped (``weight_clip``; this biases IPW/DR toward lower risk). The same terms weighted by the
target limit give the amount-weighted default rate and the value
``margin * L * (1 - p) - lgd * L * p`` per user (see :func:`creditgraph.evaluate.metrics.judge_limits`).
Intervals: percentile bootstrap over users (labeled users resampled with replacement).

The Open Bandit Pipeline's kernelized estimators were not used: its releases that have them
(0.5.x) require Python < 3.11, and the one release that installs here (0.4.1) has no
continuous-action estimators.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from creditgraph.policy.config import DEFAULT_LGD, DEFAULT_MARGIN

METHODS = ("dm", "ipw", "snipw", "dr")
Kernel = Literal["gaussian", "epanechnikov"]
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
#: Below this effective sample size among granted users an IPW-type estimate gets a warning.
MIN_EFFECTIVE = 30.0


def _rows(mask: np.ndarray) -> str:
    rows = np.flatnonzero(mask)
    return f"rows {rows[:5].tolist()} ({rows.size} in all)"


def _vector(value: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        want = "1-D" if n is None else f"shape ({n},)"
        raise ValueError(f"{name} must be {want}, got shape {arr.shape}")
    return arr


@dataclass
class LoggedData:
    """Logged limits, outcomes and behaviour densities of ``n`` users (module docstring).

    ``limit[n] >= 0``; ``outcome[n]`` 0/1 or NaN (unlabeled); ``log_density[n]``: log density of
    ``u = log L`` at the logged limit under the historical policy, finite wherever
    ``limit > 0`` (ignored where ``limit == 0``); ``p_hat_logged[n]`` (optional, needed by
    ``dr``): the model's risk at the logged limit, in [0, 1] for labeled users.
    """

    limit: np.ndarray
    outcome: np.ndarray
    log_density: np.ndarray
    p_hat_logged: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.limit = _vector(self.limit, "LoggedData.limit")
        n = self.limit.shape[0]
        self.outcome = _vector(self.outcome, "LoggedData.outcome", n)
        self.log_density = _vector(self.log_density, "LoggedData.log_density", n)
        bad = ~(np.isfinite(self.limit) & (self.limit >= 0))
        if bad.any():
            raise ValueError(f"LoggedData.limit must be finite and >= 0; {_rows(bad)}")
        bad = ~(np.isnan(self.outcome) | np.isin(self.outcome, (0.0, 1.0)))
        if bad.any():
            raise ValueError(f"LoggedData.outcome must be 0, 1 or NaN (unlabeled); {_rows(bad)}")
        bad = (self.limit > 0) & ~np.isfinite(self.log_density)
        if bad.any():
            raise ValueError(
                "LoggedData.log_density must be finite where the logged limit is positive (a "
                "zero density at a limit that was granted means the behaviour density is wrong); "
                + _rows(bad)
            )
        if self.p_hat_logged is not None:
            self.p_hat_logged = _vector(self.p_hat_logged, "LoggedData.p_hat_logged", n)
            p = self.p_hat_logged
            bad = self.labeled & ~(np.isfinite(p) & (p >= 0) & (p <= 1))
            if bad.any():
                raise ValueError(
                    f"LoggedData.p_hat_logged must be in [0, 1] for labeled users; {_rows(bad)}"
                )

    def __len__(self) -> int:
        return int(self.limit.shape[0])

    @property
    def labeled(self) -> np.ndarray:
        """Users with an observed outcome."""
        return np.isfinite(self.outcome)


def log_density_in_log_limit(
    log_density: np.ndarray,
    limit: np.ndarray,
    *,
    variable: Literal["limit", "log1p"],
    scale: float = 1.0,
) -> np.ndarray:
    """Convert a behaviour log-density of another variable to the density of ``u = log L``.

    ``variable="limit"``: ``log_density`` is of ``L`` itself (e.g. a uniform randomized test:
    ``-log(b - a)``), ``log f_u = log f_L + log L``. ``variable="log1p"``: of
    ``s = log1p(L / scale)`` (the outcome tower's encoding), ``log f_u = log f_s + log L -
    log(L + scale)``. Rows with ``L = 0`` are returned unchanged (the point mass at 0).
    """
    log_density = np.asarray(log_density, dtype=np.float64)
    limit = np.asarray(limit, dtype=np.float64)
    if log_density.shape != limit.shape:
        raise ValueError(f"log_density {log_density.shape} and limit {limit.shape} differ")
    pos = limit > 0
    safe = np.where(pos, limit, 1.0)
    if variable == "limit":
        jac = np.log(safe)
    elif variable == "log1p":
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        jac = np.log(safe) - np.log(safe + scale)
    else:
        raise ValueError(f"variable must be 'limit' or 'log1p', got {variable!r}")
    return np.where(pos, log_density + jac, log_density)


def silverman_bandwidth(limit: np.ndarray) -> float:
    """Silverman's rule on ``u = log L`` of the positive limits:
    ``0.9 * min(sd, IQR / 1.349) * n^(-1/5)``."""
    u = np.log(np.asarray(limit, dtype=np.float64)[np.asarray(limit) > 0])
    if u.size < 2:
        raise ValueError("need at least two positive logged limits to choose a bandwidth")
    q75, q25 = np.quantile(u, [0.75, 0.25])
    spread = min(float(u.std(ddof=1)), float(q75 - q25) / 1.349)
    if not spread > 0:
        spread = float(u.std(ddof=1))
    if not spread > 0:
        raise ValueError("all positive logged limits are equal: pass a bandwidth explicitly")
    return 0.9 * spread * u.size ** (-0.2)


def _log_kernel(z: np.ndarray, kernel: str) -> np.ndarray:
    if kernel == "gaussian":
        return -0.5 * z**2 - _LOG_SQRT_2PI
    if kernel == "epanechnikov":
        with np.errstate(divide="ignore"):
            return np.log(np.maximum(0.75 * (1.0 - z**2), 0.0))
    raise ValueError(f"kernel must be 'gaussian' or 'epanechnikov', got {kernel!r}")


def kernel_weights(
    logged: LoggedData,
    target: np.ndarray,
    bandwidth: float,
    *,
    kernel: Kernel = "gaussian",
    weight_clip: float | None = None,
) -> np.ndarray:
    """``w_i = K_h(log L_i - log target_i) / f(log L_i | x_i)`` where both are positive, else 0.

    ``E[w_i | x_i] = 1`` under a correct density; ``weight_clip`` caps ``w`` (``None``: no cap).
    """
    target = _vector(target, "target", len(logged))
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    both = (logged.limit > 0) & (target > 0)
    w = np.zeros(len(logged))
    z = (np.log(logged.limit[both]) - np.log(target[both])) / bandwidth
    log_w = _log_kernel(z, kernel) - math.log(bandwidth) - logged.log_density[both]
    w[both] = np.exp(np.minimum(log_w, 700.0))
    if weight_clip is not None:
        if not weight_clip > 0:
            raise ValueError(f"weight_clip must be > 0, got {weight_clip}")
        np.minimum(w, weight_clip, out=w)
    return w


def _check_target(
    logged: LoggedData, target: np.ndarray, p_hat_target: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    n = len(logged)
    target = _vector(target, "target", n)
    p_hat_target = _vector(p_hat_target, "p_hat_target", n)
    bad = ~(np.isfinite(target) & (target >= 0))
    if bad.any():
        raise ValueError(f"target must be finite and >= 0; {_rows(bad)}")
    p = p_hat_target
    bad = (target > 0) & ~(np.isfinite(p) & (p >= 0) & (p <= 1))
    if bad.any():
        raise ValueError(f"p_hat_target must be in [0, 1] where target > 0; {_rows(bad)}")
    return target, np.where(target > 0, p, 0.0)


def estimate_terms(
    logged: LoggedData,
    target: np.ndarray,
    p_hat_target: np.ndarray,
    method: str,
    weights: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per-user sums of one estimator, over LABELED users.

    Returns ``a, b`` (default rate among granted = ``sum a / sum b``), ``a_amount, b_amount``
    (amount-weighted default rate) and ``t`` (target limits), so that any resample of users
    gives the estimate from its sums. ``weights`` are :func:`kernel_weights` (all users).
    """
    target, p_t = _check_target(logged, target, p_hat_target)
    lab = logged.labeled
    t, pt, y, w = target[lab], p_t[lab], logged.outcome[lab], weights[lab]
    g = (t > 0).astype(np.float64)
    if method == "dm":
        mu, den = pt, g
    elif method in ("ipw", "snipw"):
        mu, den = w * y, (g * w if method == "snipw" else g)
    elif method == "dr":
        if logged.p_hat_logged is None:
            raise ValueError("method 'dr' needs LoggedData.p_hat_logged")
        mu, den = pt + w * (y - logged.p_hat_logged[lab]), g
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    mu = g * mu
    amount_den = t * w if method == "snipw" else t
    return {"a": mu, "b": den, "a_amount": t * mu, "b_amount": amount_den, "t": t}


def bootstrap_counts(
    m: int,
    n_boot: int,
    random_state: int | np.random.Generator | None = 0,
    max_cells: int = 4_000_000,
) -> Iterator[np.ndarray]:
    """Resample counts of ``m`` rows drawn with replacement, ``n_boot`` times, in chunks of
    ``float[k, m]`` with ``k * m <= max_cells`` (the same seed gives the same resamples)."""
    rng = np.random.default_rng(random_state)
    chunk = max(1, min(n_boot, max_cells // max(m, 1)))
    for s in range(0, n_boot, chunk):
        k = min(chunk, n_boot - s)
        dtype = np.int32 if k * m < 2**31 else np.int64
        draws = rng.integers(0, m, size=(k, m), dtype=dtype)
        draws += (np.arange(k, dtype=dtype) * m)[:, None]
        yield np.bincount(draws.ravel(), minlength=k * m).reshape(k, m).astype(np.float64)


def bootstrap_sums(
    columns: np.ndarray, n_boot: int, random_state: int | np.random.Generator | None = 0
) -> np.ndarray:
    """Column sums of ``columns[m, k]`` over ``n_boot`` resamples of its ``m`` rows with
    replacement: ``float[n_boot, k]`` (:func:`bootstrap_counts` times the columns)."""
    columns = np.asarray(columns, dtype=np.float64)
    if columns.shape[0] == 0:
        return np.zeros((n_boot, columns.shape[1]))
    return np.vstack(
        [c @ columns for c in bootstrap_counts(columns.shape[0], n_boot, random_state)]
    )


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _ess(w: np.ndarray) -> float:
    s2 = float((w**2).sum())
    return float(w.sum()) ** 2 / s2 if s2 > 0 else 0.0


def estimate_policy(
    logged: LoggedData,
    target: np.ndarray,
    p_hat_target: np.ndarray,
    *,
    methods: Sequence[str] = METHODS,
    bandwidth: float | None = None,
    kernel: Kernel = "gaussian",
    weight_clip: float | None = None,
    n_boot: int = 200,
    level: float = 0.95,
    margin: float = DEFAULT_MARGIN,
    lgd: float = DEFAULT_LGD,
    random_state: int = 0,
) -> pd.DataFrame:
    """Estimate a candidate policy's portfolio default rate and value from logged data.

    ``target[n]``: the candidate's limit per user (0 = declined); ``p_hat_target[n]``: the
    model's risk at that limit (ignored where ``target == 0``). ``bandwidth`` in ``log L``
    units (default :func:`silverman_bandwidth` of the labeled logged positive limits).
    Unlabeled users are dropped from every estimate; ``granted_total`` counts all users.

    Returns one row per method (index ``method``) with ``default_rate`` (portfolio default rate
    among granted users), ``ci_low``/``ci_high`` (bootstrap ``level`` interval), ``se``
    (bootstrap standard error), ``default_rate_amount`` (weighted by the limit),
    ``granted_total``, ``n_granted`` (labeled granted users), ``value_mean`` with
    ``value_ci_low``/``value_ci_high`` (per labeled user, ``margin``/``lgd`` as in
    :func:`~creditgraph.evaluate.metrics.judge_limits`), ``n_effective`` (Kish effective sample
    size of the weights among granted users; ``n_granted`` for ``dm``) and ``bandwidth``.
    """
    target, p_t = _check_target(logged, target, p_hat_target)
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown}; choose from {METHODS}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    lab = logged.labeled
    if not lab.any():
        raise ValueError("LoggedData.outcome: no labeled users to estimate from")
    weighted = [m for m in methods if m != "dm"]
    if bandwidth is None:
        bandwidth = silverman_bandwidth(logged.limit[lab]) if weighted else float("nan")
    w = (
        kernel_weights(logged, target, bandwidth, kernel=kernel, weight_clip=weight_clip)
        if (weighted)
        else np.zeros(len(logged))
    )
    granted = lab & (target > 0)
    n_granted = int(granted.sum())
    if n_granted == 0:
        warnings.warn("estimate_policy: the candidate policy grants no labeled user", stacklevel=2)
    elif weighted:
        pos = logged.limit[lab & (logged.limit > 0)]
        outside = (target[granted] < pos.min()) | (target[granted] > pos.max())
        if outside.mean() > 0.05:
            warnings.warn(
                f"estimate_policy: {outside.mean():.0%} of granted target limits lie outside the "
                f"range of logged positive limits [{pos.min():g}, {pos.max():g}]: no overlap, "
                "IPW/DR cannot see their risk",
                stacklevel=2,
            )
    terms = {m: estimate_terms(logged, target, p_t, m, w) for m in methods}
    cols = np.column_stack(
        [terms[m][k] for m in methods for k in ("a", "b", "a_amount", "b_amount")]
        + [terms[methods[0]]["t"]]
    )
    m_lab = int(lab.sum())
    k = len(methods)

    def stats(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Default rate, amount-weighted rate and value per method: ``[rows, k]`` each."""
        rate = _ratio(sums[:, 0 : 4 * k : 4], sums[:, 1 : 4 * k : 4])
        rate_amount = _ratio(sums[:, 2 : 4 * k : 4], sums[:, 3 : 4 * k : 4])
        mean_t = sums[:, -1:] / m_lab
        value = np.where(mean_t > 0, mean_t * (margin - (margin + lgd) * rate_amount), 0.0)
        return rate, rate_amount, value

    rate, rate_amount, value = stats(cols.sum(axis=0)[None, :])
    b_rate, _, b_value = stats(bootstrap_sums(cols, n_boot, random_state))
    q = [(1.0 - level) / 2.0, (1.0 + level) / 2.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN when nobody is granted
        ci = np.nanquantile(b_rate, q, axis=0)
        vci = np.nanquantile(b_value, q, axis=0)
        se = np.nanstd(b_rate, axis=0, ddof=1) if n_boot > 1 else np.full(k, np.nan)
    n_eff = np.array([float(n_granted) if m == "dm" else _ess(w[granted]) for m in methods])
    for name, ne in zip(methods, n_eff, strict=True):
        if name != "dm" and n_granted and ne < MIN_EFFECTIVE:
            warnings.warn(
                f"estimate_policy: method {name!r} has an effective sample size of {ne:.1f} "
                "among granted users; its estimate and interval are unreliable",
                stacklevel=2,
            )
    return pd.DataFrame(
        {
            "default_rate": rate[0],
            "ci_low": ci[0],
            "ci_high": ci[1],
            "se": se,
            "default_rate_amount": rate_amount[0],
            "granted_total": np.full(k, float(target.sum())),
            "n_granted": np.full(k, n_granted),
            "value_mean": value[0],
            "value_ci_low": vci[0],
            "value_ci_high": vci[1],
            "n_effective": n_eff,
            "bandwidth": np.full(k, float(bandwidth)),
        },
        index=pd.Index(methods, name="method"),
    )
