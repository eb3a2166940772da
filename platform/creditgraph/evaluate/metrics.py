"""Evaluation metrics for causal risk curves, limit policies and factual default predictions.

Conventions used throughout:

- A *curve* array has shape ``[n_users, G]``: p(default | do(L = grid[g])) for each user; ``grid``
  is a strictly increasing ``float[G]`` of limits shared by all users.
- Curves are read between grid points by linear interpolation and held flat beyond the ends
  (:func:`curve_at`); the factual prediction of a user is its curve at its observed limit.
- Everything is vectorized numpy; nothing here loops over users.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from creditgraph.data.errors import DataValidationError
from creditgraph.policy.decide import broadcast_per_user, check_grid, largest_feasible_limit

if TYPE_CHECKING:
    import pandas as pd

#: Defaults of the policy value (see :func:`policy_metrics`).
DEFAULT_MARGIN = 0.05
DEFAULT_LGD = 0.5


def _curves(arr: np.ndarray, grid: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != grid.size:
        raise ValueError(f"{name} must have shape (n, {grid.size}), got {arr.shape}")
    return arr


def curve_at(curves: np.ndarray, grid: np.ndarray, at: float | np.ndarray) -> np.ndarray:
    """Read each user's curve at arbitrary limits by linear interpolation over the grid.

    ``at`` is a scalar (same limit for everyone), ``float[n]`` (one limit per user, e.g. the
    observed limit: this is the factual prediction) or ``float[n, k]`` (k limits per user).
    Limits outside ``[grid[0], grid[-1]]`` take the value at the nearest end. The result has the
    shape of ``at`` broadcast to ``[n]`` / ``[n, k]``.
    """
    grid = check_grid(grid)
    curves = _curves(curves, grid, "curves")
    n = curves.shape[0]
    at = np.asarray(at, dtype=np.float64)
    squeeze = at.ndim < 2
    if at.ndim == 0:
        at2 = np.full((n, 1), float(at))
    elif at.ndim == 1 and at.shape == (n,):
        at2 = at[:, None]
    elif at.ndim == 2 and at.shape[0] == n:
        at2 = at
    else:
        raise ValueError(f"at must be a scalar, ({n},) or ({n}, k), got {at.shape}")
    if grid.size == 1:
        out = np.repeat(curves, at2.shape[1], axis=1)
        return out[:, 0] if squeeze else out
    # Interval index i with grid[i] <= at < grid[i+1], clamped to the first/last interval.
    i = np.clip(np.searchsorted(grid, at2, side="right") - 1, 0, grid.size - 2)
    lo, hi = grid[i], grid[i + 1]
    w = np.clip((at2 - lo) / (hi - lo), 0.0, 1.0)
    rows = np.arange(n)[:, None]
    out = (1.0 - w) * curves[rows, i] + w * curves[rows, i + 1]
    return out[:, 0] if squeeze else out


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
    ``pred_curves``; the *oracle* applies the same rule (same ``r_max``, ``cap``, ``contiguous``)
    to ``true_curves``. ``p_u = true_curves[u, index_u]`` is the true risk at the decided limit.

    Returned keys (``oracle_*`` are the same quantities for the oracle policy):

    - ``mean_true_risk``: mean of ``p_u``.
    - ``violation_rate``: share of users with ``p_u > r_max_u``. The oracle is 0 unless some
      user's true risk exceeds the ceiling even at the smallest grid limit (the fallback).
    - ``mean_excess_risk``: mean of ``max(0, p_u - r_max_u)``.
    - ``approval_rate``: share of users granted more than the smallest grid limit.
    - ``total_granted``, ``mean_granted``: sum / mean of ``L_u``.
    - ``granted_ratio``: ``total_granted / oracle_total_granted`` (< 1: too cautious,
      > 1: grants beyond what the true curves allow).
    - ``mean_abs_limit_gap``: mean ``|L_u - L_u^oracle|``; ``exact_match_rate``: share of users
      whose decided limit equals the oracle's.
    - ``value_mean`` / ``value_total``: policy value, assuming the granted limit is drawn in full,
      ``V_u = margin * L_u * (1 - p_u) - lgd * L_u * p_u`` (``margin``: revenue per unit of limit
      repaid; ``lgd``: loss given default per unit of limit). Defaults ``margin=0.05, lgd=0.5``.
    - ``regret_mean``: ``oracle_value_mean - value_mean``. The oracle maximises the limit under
      the ceiling, not the value, so regret can be negative.
    """
    grid = check_grid(grid)
    pred_curves = _curves(pred_curves, grid, "pred_curves")
    true_curves = _curves(true_curves, grid, "true_curves")
    if pred_curves.shape != true_curves.shape:
        raise ValueError(f"pred {pred_curves.shape} and true {true_curves.shape} differ in shape")
    n = pred_curves.shape[0]
    r = broadcast_per_user(r_max, n, "r_max")
    rows = np.arange(n)

    def judge(curves: np.ndarray) -> dict[str, float]:
        limits, idx = largest_feasible_limit(curves, grid, r, cap, contiguous=contiguous)
        p = true_curves[rows, idx]
        value = margin * limits * (1.0 - p) - lgd * limits * p
        return {
            "mean_true_risk": float(p.mean()),
            "violation_rate": float((p > r).mean()),
            "mean_excess_risk": float(np.maximum(p - r, 0.0).mean()),
            "approval_rate": float((idx > 0).mean()),
            "total_granted": float(limits.sum()),
            "mean_granted": float(limits.mean()),
            "value_total": float(value.sum()),
            "value_mean": float(value.mean()),
            "_limits": limits,
        }

    if n == 0:
        raise ValueError("policy_metrics needs at least one user")
    est = judge(pred_curves)
    ora = judge(true_curves)
    est_limits, ora_limits = est.pop("_limits"), ora.pop("_limits")
    out: dict[str, float] = {"n_users": float(n), **est}
    out.update({f"oracle_{k}": v for k, v in ora.items()})
    tot = ora["total_granted"]
    out["granted_ratio"] = est["total_granted"] / tot if tot > 0 else float("nan")
    out["mean_abs_limit_gap"] = float(np.abs(est_limits - ora_limits).mean())
    out["exact_match_rate"] = float((est_limits == ora_limits).mean())
    out["regret_mean"] = ora["value_mean"] - est["value_mean"]
    return out


def _labeled(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
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
    y, p, _ = _labeled(y, p)
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


def classification_metrics(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict:
    """Discrimination and calibration of factual default predictions.

    Unlabeled rows (``y`` NaN) are dropped and counted in ``n_unlabeled``. Keys: ``n``,
    ``n_unlabeled``, ``base_rate``, ``mean_pred``, ``auc``, ``ap`` (average precision), ``brier``,
    ``log_loss`` (p clipped to [1e-12, 1 - 1e-12]), ``ece`` (equal-mass bins, see
    :func:`calibration_table`) and ``calibration`` (the table itself). AUC/AP are NaN when only
    one class is present.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    y, p, n_unlabeled = _labeled(y, p)
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
