"""Evaluation metrics for causal risk curves, limit policies and factual default predictions.

Conventions used throughout:

- A *curve* array has shape ``[n_users, G]``: p(default | do(L = grid[g])) for each user; ``grid``
  is a strictly increasing ``float[G]`` of limits shared by all users.
- Curves are read between grid points by linear interpolation and held flat beyond the ends
  (:func:`curve_at`); the factual prediction of a user is its curve at its observed limit.
- Everything is vectorized numpy; nothing here loops over users.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from creditgraph.data.errors import DataValidationError
from creditgraph.model.calibration import (
    calibration_table,
    expected_calibration_error,
    labeled_pairs,
)
from creditgraph.policy.config import DEFAULT_LGD, DEFAULT_MARGIN
from creditgraph.policy.decide import (
    _curves,
    broadcast_per_user,
    check_grid,
    curve_at,
    largest_feasible_limit,
)

if TYPE_CHECKING:
    import pandas as pd


def mise(
    pred: np.ndarray, true: np.ndarray, grid: np.ndarray, *, per_user: bool = False
) -> float | tuple[float, np.ndarray]:
    """Mean integrated squared error of estimated curves against the true curves.

    For user ``u``: ``ISE_u = (1 / (grid[-1] - grid[0])) * ∫ (p̂_u(L) - p_u(L))² dL`` over the
    grid range, by the trapezoid rule on the grid points (so a non-uniform grid weights each
    point by the length of limit it covers, not equally). ``ISE_u`` is the average squared error
    per unit of limit; a constant error ``c`` gives ``c²``. MISE is the mean of ``ISE_u`` over
    users. With ``per_user=True`` returns ``(mise, ise[n])``.
    """
    grid = check_grid(grid)
    if grid.size < 2:
        raise ValueError("MISE needs a grid of at least two limits")
    pred = _curves(pred, grid, "pred")
    true = _curves(true, grid, "true")
    if pred.shape != true.shape:
        raise ValueError(f"pred {pred.shape} and true {true.shape} differ in shape")
    sq = (pred - true) ** 2
    dx = np.diff(grid)
    ise = ((sq[:, 1:] + sq[:, :-1]) * 0.5 * dx).sum(axis=1) / (grid[-1] - grid[0])
    value = float(ise.mean()) if ise.size else float("nan")
    return (value, ise) if per_user else value


def oracle_policy_limits(
    true_curves: np.ndarray,
    grid: np.ndarray,
    r_max: float | np.ndarray,
    *,
    cap: float | np.ndarray | None = None,
    contiguous: bool = False,
) -> np.ndarray:
    """The oracle's limits: the largest grid limit whose TRUE risk is ``<= r_max``, else 0.

    Same rule as :func:`~creditgraph.policy.decide.largest_feasible_limit` (with ``cap`` and
    ``contiguous``), except that a user with no feasible grid limit is declined (limit 0) rather
    than given the smallest grid limit.
    """
    limits, idx = largest_feasible_limit(true_curves, grid, r_max, cap, contiguous=contiguous)
    n = limits.shape[0]
    r = broadcast_per_user(r_max, n, "r_max")
    ok = np.asarray(true_curves, dtype=np.float64)[np.arange(n), idx] <= r
    if cap is not None:
        ok &= limits <= broadcast_per_user(cap, n, "cap")
    return np.where(ok, limits, 0.0)


def _check_limits(limits: np.ndarray, n: int, name: str) -> np.ndarray:
    limits = np.asarray(limits, dtype=np.float64)
    if limits.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {limits.shape}")
    bad = ~(np.isfinite(limits) & (limits >= 0))
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{name} must be finite and >= 0; bad rows {rows[:5].tolist()} ({rows.size} in all)"
        )
    return limits


def _judge_one(
    limits: np.ndarray, p: np.ndarray, r: np.ndarray, margin: float, lgd: float
) -> dict[str, float]:
    """Metrics of one policy given each user's limit and true risk at that limit."""
    granted = limits > 0
    n_granted = int(granted.sum())
    value = margin * limits * (1.0 - p) - lgd * limits * p
    total = float(limits.sum())
    pg, rg, lg = p[granted], r[granted], limits[granted]
    return {
        "n_granted": float(n_granted),
        "granted_share": float(granted.mean()),
        # nobody granted: no over-ceiling user, but no portfolio either (NaN default rates)
        "over_ceiling_rate": float((pg > rg).mean()) if n_granted else 0.0,
        "excess_risk": float(np.maximum(pg - rg, 0.0).mean()) if n_granted else 0.0,
        "portfolio_default_rate": float(pg.mean()) if n_granted else float("nan"),
        "portfolio_default_rate_amount": float((lg * pg).sum() / total)
        if total > 0
        else float("nan"),
        "granted_total": total,
        "granted_mean": float(limits.mean()),
        "value_mean": float(value.mean()),
        "value_total": float(value.sum()),
    }


def judge_limits(
    limits: np.ndarray,
    true_curves: np.ndarray,
    grid: np.ndarray,
    r_max: float | np.ndarray,
    *,
    oracle_limits: np.ndarray | None = None,
    margin: float = DEFAULT_MARGIN,
    lgd: float = DEFAULT_LGD,
) -> dict[str, float]:
    """Judge any policy's decided limits with the true curves, as a risk officer reads them.

    ``limits[n]`` (``>= 0``, 0 = declined) may lie off the truth grid: the true risk at a limit,
    ``p_u = p_true_u(L_u)``, is read by linear interpolation (:func:`curve_at`; limits above
    ``grid[-1]`` get the risk at ``grid[-1]`` and a warning). ``r_max`` is a scalar or per user.
    The oracle grants each user the largest truth-grid limit with ``p_true <= r_max``, or
    declines (0) when there is none (:func:`oracle_policy_limits`), unless ``oracle_limits``
    is given.

    Returned keys (every policy key also appears for the oracle as ``oracle_<key>``):

    - ``n_users``, ``n_granted``, ``granted_share``: users with ``L > 0``.
    - ``over_ceiling_rate``: among granted users, the share with ``p_u > r_max``. A declined
      user is never a violation, whatever their risk at 0. 0 when nobody is granted.
    - ``excess_risk``: mean over granted users of ``max(0, p_u - r_max)`` (0 when none).
    - ``portfolio_default_rate``: mean ``p_u`` over granted users (the expected default rate of
      the book); ``portfolio_default_rate_amount``: the same weighted by ``L_u`` (the expected
      share of granted credit that defaults). NaN when nobody is granted.
    - ``granted_total``, ``granted_mean``: sum / mean of ``L_u`` over all users.
    - ``granted_ratio``: ``granted_total / oracle_granted_total`` (NaN when the oracle grants
      nothing); ``oracle_total`` is an alias of ``oracle_granted_total``.
    - ``limit_satisfaction``: over users the oracle grants (``L_oracle > 0``), the mean of
      ``min(L_u, L_oracle) / L_oracle``: how much of the credit a user could safely have had
      the policy gives (1 = all of it; granting more than the oracle does not count extra).
      NaN when the oracle grants nobody.
    - ``value_mean``, ``value_total``: ``V_u = margin * L_u * (1 - p_u) - lgd * L_u * p_u``,
      assuming the limit is drawn in full. ``margin`` is the revenue per unit of limit that is
      repaid over the horizon (default 0.05), ``lgd`` the share of the limit lost when the user
      defaults (default 0.5).
    """
    grid = check_grid(grid)
    true_curves = _curves(true_curves, grid, "true_curves")
    n = true_curves.shape[0]
    if n == 0:
        raise ValueError("judge_limits needs at least one user")
    limits = _check_limits(limits, n, "limits")
    r = broadcast_per_user(r_max, n, "r_max")
    if oracle_limits is None:
        ora = oracle_policy_limits(true_curves, grid, r)
    else:
        ora = _check_limits(oracle_limits, n, "oracle_limits")
    for name, arr in (("limits", limits), ("oracle_limits", ora)):
        above = arr > grid[-1]
        if above.any():
            warnings.warn(
                f"{name}: {int(above.sum())} limit(s) above the largest truth-grid limit "
                f"{grid[-1]:g} (rows {np.flatnonzero(above)[:5].tolist()}); their true risk is "
                "read at the grid's end, which understates it for increasing curves",
                stacklevel=2,
            )
    est = _judge_one(limits, curve_at(true_curves, grid, limits), r, margin, lgd)
    orc = _judge_one(ora, curve_at(true_curves, grid, ora), r, margin, lgd)
    out: dict[str, float] = {"n_users": float(n), **est}
    out.update({f"oracle_{k}": v for k, v in orc.items()})
    tot = orc["granted_total"]
    out["oracle_total"] = tot
    out["granted_ratio"] = est["granted_total"] / tot if tot > 0 else float("nan")
    pos = ora > 0
    out["limit_satisfaction"] = (
        float((np.minimum(limits[pos], ora[pos]) / ora[pos]).mean()) if pos.any() else float("nan")
    )
    return out


def policy_metrics(
    pred_curves: np.ndarray,
    true_curves: np.ndarray,
    grid: np.ndarray,
    r_max: float | np.ndarray,
    *,
    cap: float | np.ndarray | None = None,
    contiguous: bool = False,
    margin: float = DEFAULT_MARGIN,
    lgd: float = DEFAULT_LGD,
) -> dict[str, float]:
    """Judge the limits decided on estimated curves with the true curves, against the oracle.

    The decided limit ``L_u`` is :func:`~creditgraph.policy.decide.largest_feasible_limit` on
    ``pred_curves`` (a user with no feasible limit gets the smallest grid limit, as in
    production); the oracle applies the same rule (same ``r_max``, ``cap``, ``contiguous``) to
    ``true_curves`` and declines users with no feasible limit (:func:`oracle_policy_limits`).

    Returns every :func:`judge_limits` key, plus:

    - ``violation_rate`` / ``oracle_violation_rate``: aliases of ``over_ceiling_rate`` (share
      of GRANTED users whose true risk at their limit exceeds ``r_max``), kept for reports.
    - ``mean_abs_limit_gap``: mean ``|L_u - L_u^oracle|``; ``exact_match_rate``: share of users
      whose decided limit equals the oracle's.
    - ``regret_mean``: ``oracle_value_mean - value_mean``. The oracle maximises the limit under
      the ceiling, not the value, so regret can be negative.
    """
    grid = check_grid(grid)
    pred_curves = _curves(pred_curves, grid, "pred_curves")
    true_curves = _curves(true_curves, grid, "true_curves")
    if pred_curves.shape != true_curves.shape:
        raise ValueError(f"pred {pred_curves.shape} and true {true_curves.shape} differ in shape")
    n = pred_curves.shape[0]
    if n == 0:
        raise ValueError("policy_metrics needs at least one user")
    r = broadcast_per_user(r_max, n, "r_max")
    limits, _ = largest_feasible_limit(pred_curves, grid, r, cap, contiguous=contiguous)
    ora = oracle_policy_limits(true_curves, grid, r, cap=cap, contiguous=contiguous)
    out = judge_limits(limits, true_curves, grid, r, oracle_limits=ora, margin=margin, lgd=lgd)
    out["violation_rate"] = out["over_ceiling_rate"]
    out["oracle_violation_rate"] = out["oracle_over_ceiling_rate"]
    out["mean_abs_limit_gap"] = float(np.abs(limits - ora).mean())
    out["exact_match_rate"] = float((limits == ora).mean())
    out["regret_mean"] = out["oracle_value_mean"] - out["value_mean"]
    return out


def classification_metrics(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict:
    """Discrimination and calibration of factual default predictions.

    Unlabeled rows (``y`` NaN) are dropped and counted in ``n_unlabeled``. Keys: ``n``,
    ``n_unlabeled``, ``base_rate``, ``mean_pred``, ``auc``, ``ap`` (average precision), ``brier``,
    ``log_loss`` (p clipped to [1e-12, 1 - 1e-12]), ``ece`` (equal-mass bins, see
    :func:`calibration_table`) and ``calibration`` (the table itself). AUC/AP are NaN when only
    one class is present.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, p, n_unlabeled = labeled_pairs(y, p)
    table = calibration_table(y, p, n_bins)
    both = y.size > 0 and 0 < y.sum() < y.size
    pc = np.clip(p, 1e-12, 1 - 1e-12)
    empty = y.size == 0
    return {
        "n": int(y.size),
        "n_unlabeled": n_unlabeled,
        "base_rate": float(y.mean()) if not empty else float("nan"),
        "mean_pred": float(p.mean()) if not empty else float("nan"),
        "auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "ap": float(average_precision_score(y, p)) if both else float("nan"),
        "brier": float(((p - y) ** 2).mean()) if not empty else float("nan"),
        "log_loss": float(-(y * np.log(pc) + (1 - y) * np.log1p(-pc)).mean())
        if not empty
        else float("nan"),
        "ece": expected_calibration_error(table),
        "calibration": table,
    }


def truth_curves(truth: pd.DataFrame, user_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The true curves of the given users as ``(grid[G], curves[len(user_idx), G])``.

    ``truth`` is ``Dataset.truth`` (long format: ``user_idx``, ``limit``, ``p_default``). Every
    requested user must have exactly one value at every limit of the common grid (the sorted
    set of limits in ``truth``); otherwise :class:`DataValidationError` is raised.
    """
    import pandas as pd

    user_idx = np.asarray(user_idx, dtype=np.int64)
    grid = np.unique(truth["limit"].to_numpy(dtype=np.float64))
    sel = truth[truth["user_idx"].isin(user_idx)]
    pos = pd.Index(user_idx).get_indexer(sel["user_idx"].to_numpy())
    if pd.Index(user_idx).has_duplicates:
        raise ValueError("user_idx has duplicates")
    g = np.searchsorted(grid, sel["limit"].to_numpy(dtype=np.float64))
    counts = np.zeros((user_idx.size, grid.size), dtype=np.int64)
    np.add.at(counts, (pos, g), 1)
    bad = counts != 1
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise DataValidationError(
            "truth",
            "limit",
            f"each user needs exactly one p_default at each of the {grid.size} grid limits",
            rows=user_idx[rows[:5]].tolist(),
            count=int(rows.size),
        )
    curves = np.empty((user_idx.size, grid.size))
    curves[pos, g] = sel["p_default"].to_numpy(dtype=np.float64)
    return grid, curves


def evaluate_curves(
    pred_curves: np.ndarray,
    true_curves: np.ndarray,
    grid: np.ndarray,
    *,
    r_max: float | np.ndarray,
    y: np.ndarray | None = None,
    factual: np.ndarray | None = None,
    segments: np.ndarray | None = None,
    cap: float | np.ndarray | None = None,
    contiguous: bool = False,
    margin: float = DEFAULT_MARGIN,
    lgd: float = DEFAULT_LGD,
    n_bins: int = 10,
) -> dict:
    """Every metric of one estimator on the held-out users, as one flat row for the report.

    ``mise``, ``mise_<segment>`` per segment label when ``segments`` (``[n]`` labels) is given,
    every :func:`policy_metrics` key, and, when ``y`` (0/1, NaN = unlabeled) and ``factual``
    (the prediction at the observed limit, e.g. ``curve_at(pred_curves, grid, T)``) are given,
    the :func:`classification_metrics` keys with the table under ``calibration``.
    """
    value, ise = mise(pred_curves, true_curves, grid, per_user=True)
    row: dict = {"mise": value}
    if segments is not None:
        labels = np.asarray(segments).astype(str)
        if labels.shape != ise.shape:
            raise ValueError(f"segments must have shape {ise.shape}, got {labels.shape}")
        for seg in sorted(set(labels.tolist())):
            row[f"mise_{seg}"] = float(ise[labels == seg].mean())
    row.update(
        policy_metrics(
            pred_curves,
            true_curves,
            grid,
            r_max,
            cap=cap,
            contiguous=contiguous,
            margin=margin,
            lgd=lgd,
        )
    )
    if (y is None) != (factual is None):
        raise ValueError("give both y and factual, or neither")
    if y is not None:
        row.update(classification_metrics(y, factual, n_bins))
    return row


def check_guarantee(
    result, true_curves: np.ndarray, grid: np.ndarray, limits: np.ndarray | None = None
) -> dict[str, float]:
    """Simulated data only: :func:`judge_limits` of a certified policy
    (:class:`~creditgraph.policy.guarantee.GuaranteeResult`; ``limits`` default its calibration
    users'), plus ``portfolio_ok`` (the rate is ``<= r_max``) and ``alpha_ok`` (the over-ceiling
    share among granted is ``<= alpha``)."""
    limits = result.limits if limits is None else limits
    out = judge_limits(limits, true_curves, grid, result.r_max)
    rate = out["portfolio_default_rate"]
    out["portfolio_ok"] = float(not rate > result.r_max)  # NaN (nobody granted) is fine
    out["alpha_ok"] = float(out["over_ceiling_rate"] <= result.config.alpha)
    return out
