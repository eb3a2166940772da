"""The limit decision: the largest limit on the grid whose estimated risk stays under a ceiling.

This module is the single home of that rule; evaluation (``creditgraph.evaluate.metrics``),
batch scoring and serving all call :func:`largest_feasible_limit`. On top of it,
:func:`decide` (batch) and :func:`online_decision` (one user) apply the whole policy, in order:

1. **Risk ceiling.** ``L_base`` = the largest grid limit with ``p(L) <= r_max``.
2. **DSL rule.** Uncertain users get a lower ceiling,
   ``r_eff = r_max * (1 - strength * max(0, dsl - threshold) / (1 - threshold))``: no change up
   to ``threshold``, then linear down to ``r_max * (1 - strength)`` at ``dsl = 1``. It is
   monotone, so a higher DSL score never gives a higher limit. ``L_risk`` = the largest grid
   limit with ``p(L) <= r_eff``.
3. **Guardrail.** A user matched by a high-risk rule gets the largest feasible limit at most
   ``guardrail.cap`` (0 by default); the decision names the rule.
4. **Cluster cap.** Each cluster of at least ``min_size`` users has a cap on the TOTAL limit
   granted inside it, ``min(cap_per_member * size, cap_total)``. When the members' limits after
   steps 1-3 (their demands ``d_i``, total ``D``) exceed the cap, every member gets the largest
   feasible grid limit at most ``d_i * cap / D``; since each limit is snapped down, the cluster's
   total never exceeds the cap (given a grid starting at 0; a grid starting higher cannot go
   below its first point). Members of a cluster within its cap get a per-user cap
   ``d_i + (cap - D) * d_i / D``: their own limit is unchanged, and the per-user caps add up to
   the cluster's cap, so online re-decisions within them can never push the cluster over it.

Two more steps run when their inputs are given (batch scoring and the service always give them):

* **Guaranteed bound.** With ``bound`` (the certified upper bound of each curve, see
  ``policy/guarantee.py``) feasibility is judged on the bound instead of the estimate; the
  estimate is still what ``p_default_at_limit`` reports, next to ``p_upper_at_limit``.
* **Stability** (after the guardrail, before the cluster cap): with ``current`` limits, a user not
  hit by a rule keeps at least ``(1 - max_cut)`` of its current limit (the smallest grid limit at
  or above it, never above the current one) unless the risk bound there exceeds
  ``hard_ceiling``.
* **Exploration** (last): users whose draw ``u < share`` get their limit times a factor drawn
  log-uniformly from ``[low, high]``, snapped down to the grid and kept where the risk bound is
  at most ``max_risk``; the factor is reported (``explore_factor``) for later off-policy
  evaluation.

The per-user cap (``user_cap``, ``inf`` = none) is part of the batch output: the online path,
which decides one user at a time, passes it to :func:`online_decision` and gets exactly the
batch's decision for the same curve. A batch decided in chunks on several workers uses
:func:`decide_with_caps` for its second pass (demands per chunk, one global allocation by
:func:`allocate_cluster_caps`, final decisions per chunk): same result as one :func:`decide`.

Every decision reports the constraint that bound it (``binding_constraint``), the last one that
lowered the limit in the order above: ``cluster_cap`` (lowered by the cluster's cap),
``guardrail`` (lowered by a rule's cap), ``dsl`` (the DSL-lowered ceiling gives less than
``r_max`` would), ``no_feasible_limit`` (no grid limit meets ``r_max``: the smallest one is
given), ``grid_max`` (the largest grid limit is feasible, the grid is what stops it), else
``risk_ceiling``. A user hit by a rule whose limit the rule's cap did not lower keeps its other
binding constraint; the ``rule`` column names the rule either way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from creditgraph.policy.config import ClusterConfig, PolicyConfig

BINDINGS = (
    "risk_ceiling",
    "grid_max",
    "no_feasible_limit",
    "dsl",
    "guardrail",
    "cluster_cap",
    "stability",
    "exploration",
)
_CODE = {name: np.int8(i) for i, name in enumerate(BINDINGS)}


def check_grid(grid: np.ndarray) -> np.ndarray:
    """``grid`` as a float array; raises unless it is 1-D, non-empty and strictly increasing."""
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size == 0:
        raise ValueError(f"grid must be a non-empty 1-D array, got shape {grid.shape}")
    if grid.size > 1 and not np.all(np.diff(grid) > 0):
        raise ValueError("grid must be strictly increasing")
    return grid


def broadcast_per_user(value: float | np.ndarray, n: int, name: str) -> np.ndarray:
    """A scalar or ``[n]`` setting (ceiling, cap) as a float array of length ``n``."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a scalar or have shape ({n},), got {arr.shape}")
    return arr


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


def largest_feasible_limit(
    curves: np.ndarray,
    grid: np.ndarray,
    r_max: float | np.ndarray,
    cap: float | np.ndarray | None = None,
    *,
    contiguous: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """For each user, the largest grid limit ``L`` with ``p(L) <= r_max`` (and ``L <= cap``).

    Parameters
    ----------
    curves : float[n, G]
        Estimated p(default | do(L)) of each user at each grid limit. NaN counts as infeasible.
    grid : float[G]
        Strictly increasing limits.
    r_max : float or float[n]
        Risk ceiling, one for all users or one per user.
    cap : float or float[n], optional
        Upper bound on the limit (e.g. a cluster cap); grid points above it are infeasible.
    contiguous : bool
        ``False`` (default, the design's rule ``L* = max{L : p(L) <= r_max}``): scan the whole
        grid, so for a non-monotone curve a feasible limit above an infeasible stretch is chosen.
        ``True``: the more conservative "first crossing" rule, the largest ``L`` such that every
        grid limit up to and including ``L`` is feasible.

    Returns
    -------
    limits : float[n]
        The decided limit, ``grid[index]``.
    index : int64[n]
        Its grid position. When no grid point is feasible the user gets ``index = 0``, the
        smallest grid limit (normally 0 = no credit), even if it breaks the ceiling or the cap:
        the decision never grants more than the smallest option when nothing is acceptable.
    """
    grid = check_grid(grid)
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim != 2 or curves.shape[1] != grid.size:
        raise ValueError(f"curves must have shape (n, {grid.size}), got {curves.shape}")
    n = curves.shape[0]
    r = broadcast_per_user(r_max, n, "r_max")
    c = None if cap is None else broadcast_per_user(cap, n, "cap")
    index = _feasible_index(curves, grid, r, c, contiguous)
    return grid[index], index


def _feasible_index(
    curves: np.ndarray,
    grid: np.ndarray,
    r_max: np.ndarray,
    cap: np.ndarray | None,
    contiguous: bool,
) -> np.ndarray:
    """The rule of :func:`largest_feasible_limit` on checked inputs (``r_max``, ``cap``: [n])."""
    feasible = curves <= r_max[:, None]  # NaN compares False
    if cap is not None:
        feasible &= grid[None, :] <= cap[:, None]
    if contiguous:
        # Only the leading run of feasible points counts: cumulative AND along the grid.
        feasible = np.logical_and.accumulate(feasible, axis=1)
    any_ok = feasible.any(axis=1)
    last = grid.size - 1 - np.argmax(feasible[:, ::-1], axis=1)
    return np.where(any_ok, last, 0).astype(np.int64)


def effective_ceiling(
    r_max: float | np.ndarray, dsl_score: float | np.ndarray, threshold: float, strength: float
) -> np.ndarray:
    """The DSL rule: the risk ceiling lowered for users whose DSL score exceeds ``threshold``."""
    if not 0 <= threshold < 1 or not 0 <= strength <= 1:
        raise ValueError("need 0 <= threshold < 1 and 0 <= strength <= 1")
    excess = np.maximum(np.asarray(dsl_score, dtype=np.float64) - threshold, 0.0)
    return np.asarray(r_max, dtype=np.float64) * (1.0 - strength * excess / (1.0 - threshold))


@dataclass(frozen=True)
class Decision:
    """One user's decision (what :func:`online_decision` returns; a row of a DecisionTable)."""

    limit: float
    index: int
    p_default_at_limit: float
    binding_constraint: str
    dsl_score: float
    rule: str | None
    cluster_id: int
    user_cap: float | None  # None: no cap
    r_max_effective: float
    risk_limit: float
    p_upper_at_limit: float = float("nan")
    explore_factor: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DecisionTable:
    """Decisions for ``n`` users, as arrays (see the module docstring for the rules).

    ``risk_limit`` is the limit from the (DSL-lowered) risk ceiling alone, before guardrails and
    cluster caps; ``user_cap`` the per-user cap the cluster allocation gave (``inf`` = none).
    """

    limit: np.ndarray
    index: np.ndarray
    p_default_at_limit: np.ndarray
    binding_code: np.ndarray
    dsl_score: np.ndarray
    rule: np.ndarray
    cluster_id: np.ndarray
    user_cap: np.ndarray
    r_max_effective: np.ndarray
    risk_limit: np.ndarray
    p_upper_at_limit: np.ndarray | None = None
    explore_factor: np.ndarray | None = None
    demand: np.ndarray | None = None  # the limit before cluster caps and exploration

    def __len__(self) -> int:
        return len(self.limit)

    @property
    def binding_constraint(self) -> np.ndarray:
        """Binding constraint names, ``object[n]``."""
        return np.asarray(BINDINGS, dtype=object)[self.binding_code]

    def counts(self) -> dict[str, int]:
        """How many decisions each constraint bound."""
        c = np.bincount(self.binding_code, minlength=len(BINDINGS))
        return {name: int(c[i]) for i, name in enumerate(BINDINGS)}

    def row(self, i: int) -> Decision:
        cap = float(self.user_cap[i])
        return Decision(
            limit=float(self.limit[i]),
            index=int(self.index[i]),
            p_default_at_limit=float(self.p_default_at_limit[i]),
            binding_constraint=BINDINGS[int(self.binding_code[i])],
            dsl_score=float(self.dsl_score[i]),
            rule=self.rule[i],
            cluster_id=int(self.cluster_id[i]),
            user_cap=None if math.isinf(cap) else cap,
            r_max_effective=float(self.r_max_effective[i]),
            risk_limit=float(self.risk_limit[i]),
            p_upper_at_limit=float(self.p_upper_at_limit[i])
            if self.p_upper_at_limit is not None
            else float("nan"),
            explore_factor=float(self.explore_factor[i])
            if self.explore_factor is not None
            else float("nan"),
        )

    def to_frame(self, user_ids: np.ndarray | pd.Series | None = None) -> pd.DataFrame:
        """One row per user (``user_id`` first when given); ``user_cap`` is NaN when uncapped."""
        cols: dict[str, Any] = {} if user_ids is None else {"user_id": np.asarray(user_ids)}
        cols.update(
            limit=self.limit,
            p_default_at_limit=self.p_default_at_limit,
            dsl_score=self.dsl_score,
            binding_constraint=pd.Categorical.from_codes(self.binding_code, BINDINGS),
            cluster_id=self.cluster_id,
            rule=pd.array(self.rule, dtype="string"),
            user_cap=np.where(np.isinf(self.user_cap), np.nan, self.user_cap),
            r_max_effective=self.r_max_effective,
            risk_limit=self.risk_limit,
        )
        if self.p_upper_at_limit is not None:
            cols["p_upper_at_limit"] = self.p_upper_at_limit
        if self.explore_factor is not None:
            cols["explore_factor"] = self.explore_factor
        return pd.DataFrame(cols)


@dataclass
class _RiskStage:
    """Steps 1-3 and stability (everything but the cluster cap and exploration); row-wise."""

    feas: np.ndarray  # what feasibility is judged on: the bound, or the estimate
    r_eff: np.ndarray
    i_base: np.ndarray
    ok_base: np.ndarray
    i_eff: np.ndarray
    ok_eff: np.ndarray
    guard_cap: np.ndarray
    i_guard: np.ndarray
    i_stable: np.ndarray
    dsl: np.ndarray
    rule: np.ndarray


def _feasible_at(curves: np.ndarray, index: np.ndarray, r: np.ndarray) -> np.ndarray:
    return curves[np.arange(len(index)), index] <= r  # NaN compares False


def _capped(
    curves: np.ndarray,
    grid: np.ndarray,
    r: np.ndarray,
    cap: np.ndarray,
    uncapped: np.ndarray,
    contiguous: bool,
) -> np.ndarray:
    """Grid index of the largest feasible limit under ``cap``; only capped rows are recomputed."""
    out = uncapped.copy()
    rows = np.flatnonzero(np.isfinite(cap))
    if len(rows) == len(cap):
        return _feasible_index(curves, grid, r, cap, contiguous)
    if len(rows):
        out[rows] = _feasible_index(curves[rows], grid, r[rows], cap[rows], contiguous)
    return out


def _rule_names(hits: Any, n: int) -> np.ndarray:
    out = np.full(n, None, dtype=object)
    if hits is None:
        return out
    arr = np.asarray(hits, dtype=object).reshape(-1)
    if arr.shape != (n,):
        raise ValueError(f"guardrail_hits must have {n} entries, got {arr.shape[0]}")
    hit = ~pd.isna(arr)  # None, NaN, pd.NA: no rule
    hit[hit] = arr[hit] != ""
    out[hit] = [str(x) for x in arr[hit]]
    return out


def _optional(arr: Any, n: int, name: str) -> np.ndarray | None:
    if arr is None:
        return None
    a = np.asarray(arr, dtype=np.float64)
    if a.shape != (n,) and not (a.ndim == 2 and a.shape[0] == n):
        raise ValueError(f"{name} must have {n} rows, got shape {a.shape}")
    return a


def _stable_index(
    st_feas: np.ndarray,
    grid: np.ndarray,
    i_guard: np.ndarray,
    rule: np.ndarray,
    current: np.ndarray | None,
    config: PolicyConfig,
    r_max: np.ndarray,
) -> np.ndarray:
    """Stability: keep at least (1 - max_cut) of the current limit unless the bound is too high."""
    sc = config.stability
    if current is None or not sc.enabled:
        return i_guard
    floor = current * (1.0 - sc.max_cut)
    # the smallest grid limit at or above the floor, never above the current limit
    i_floor = np.searchsorted(grid, floor - 1e-9 * np.maximum(floor, 1.0), side="left")
    i_cur = np.searchsorted(grid, current + 1e-9 * np.maximum(current, 1.0), side="right") - 1
    i_floor = np.clip(np.minimum(i_floor, i_cur), 0, grid.size - 1)
    risk = st_feas[np.arange(len(i_floor)), i_floor]
    hard = 1.5 * r_max if sc.hard_ceiling is None else np.full(len(r_max), sc.hard_ceiling)
    keep = (
        (floor > 0) & (grid[i_floor] > grid[i_guard]) & (risk <= hard) & pd.isna(rule).astype(bool)
    )
    return np.where(keep, i_floor, i_guard)


def _risk_stage(
    curves: np.ndarray,
    grid: np.ndarray,
    r_max: float | np.ndarray,
    dsl_score: float | np.ndarray | None,
    guardrail_hits: Any,
    config: PolicyConfig,
    bound: np.ndarray | None = None,
    current: np.ndarray | None = None,
) -> _RiskStage:
    n = curves.shape[0]
    feas = curves if bound is None else np.asarray(bound, dtype=curves.dtype)
    if feas.shape != curves.shape:
        raise ValueError(f"bound must have the curves' shape {curves.shape}, got {feas.shape}")
    r = broadcast_per_user(r_max, n, "r_max")
    if not np.all((r > 0) & (r <= 1)):
        raise ValueError("r_max must be in (0, 1]")
    dsl = broadcast_per_user(0.0 if dsl_score is None else dsl_score, n, "dsl_score")
    if not np.all((dsl >= 0) & (dsl <= 1)):  # NaN fails too
        raise ValueError("dsl_score must be in [0, 1] (no NaN)")
    r_eff = effective_ceiling(r, dsl, config.dsl.threshold, config.dsl.strength)
    contiguous = config.contiguous
    i_base = _feasible_index(feas, grid, r, None, contiguous)
    i_eff = _feasible_index(feas, grid, r_eff, None, contiguous)
    rule = _rule_names(guardrail_hits, n)
    guard_cap = np.full(n, np.inf)
    if config.guardrail.enabled:
        guard_cap[pd.notna(rule)] = config.guardrail.cap
    i_guard = _capped(feas, grid, r_eff, guard_cap, i_eff, contiguous)
    cur = _optional(current, n, "current")
    i_stable = _stable_index(feas, grid, i_guard, rule, cur, config, r)
    return _RiskStage(
        feas=feas,
        r_eff=r_eff,
        i_base=i_base,
        ok_base=_feasible_at(feas, i_base, r),
        i_eff=i_eff,
        ok_eff=_feasible_at(feas, i_eff, r_eff),
        guard_cap=guard_cap,
        i_guard=i_guard,
        i_stable=i_stable,
        dsl=dsl,
        rule=rule,
    )


def _explored(
    st: _RiskStage, grid: np.ndarray, i_final: np.ndarray, draws: np.ndarray | None, config
) -> tuple[np.ndarray, np.ndarray]:
    """Exploration: a share of granted users get a randomized multiple of their limit."""
    ex = config.exploration
    factor = np.full(len(i_final), np.nan)
    if draws is None or ex.share <= 0:
        return i_final, factor
    u, v = draws[:, 0], draws[:, 1]
    chosen = (u < ex.share) & (i_final > 0) & pd.isna(st.rule).astype(bool)
    f = np.exp(np.log(ex.low) + v * (np.log(ex.high) - np.log(ex.low)))
    target = grid[i_final] * f
    i_target = np.clip(np.searchsorted(grid, target * (1 + 1e-12), side="right") - 1, 0, None)
    safe = _feasible_index(st.feas, grid, np.full(len(i_final), ex.max_risk), None, False)
    i_new = np.minimum(i_target, safe)
    out = np.where(chosen, i_new, i_final)
    factor[chosen] = f[chosen]
    return out, factor


def _final_stage(
    curves: np.ndarray,
    grid: np.ndarray,
    st: _RiskStage,
    user_cap: np.ndarray,
    cluster_id: np.ndarray,
    config: PolicyConfig,
    draws: np.ndarray | None = None,
) -> DecisionTable:
    cap = np.minimum(st.guard_cap, user_cap)
    i_capped = _capped(st.feas, grid, st.r_eff, cap, st.i_eff, config.contiguous)
    # stability raises a limit the risk stage cut too far; the cluster cap still applies
    i_cluster = np.where(
        st.i_stable > st.i_guard,
        np.minimum(st.i_stable, np.searchsorted(grid, user_cap * (1 + 1e-12), side="right") - 1),
        i_capped,
    )
    i_cluster = np.clip(i_cluster, 0, grid.size - 1)
    i_final, factor = _explored(st, grid, i_cluster, draws, config)
    code = np.full(len(i_final), _CODE["risk_ceiling"], dtype=np.int8)
    code[st.ok_base & (st.i_base == grid.size - 1)] = _CODE["grid_max"]
    code[~st.ok_base] = _CODE["no_feasible_limit"]
    code[(st.i_eff < st.i_base) | (st.ok_base & ~st.ok_eff)] = _CODE["dsl"]
    code[st.i_guard < st.i_eff] = _CODE["guardrail"]
    code[(st.i_stable > st.i_guard) & (i_cluster == st.i_stable)] = _CODE["stability"]
    code[i_cluster < np.maximum(st.i_guard, st.i_stable)] = _CODE["cluster_cap"]
    code[np.isfinite(factor) & (i_final != i_cluster)] = _CODE["exploration"]
    rows = np.arange(len(i_final))
    return DecisionTable(
        limit=grid[i_final],
        index=i_final,
        p_default_at_limit=curves[rows, i_final],
        binding_code=code,
        dsl_score=st.dsl,
        rule=st.rule,
        cluster_id=cluster_id,
        user_cap=user_cap,
        r_max_effective=st.r_eff,
        risk_limit=grid[st.i_eff],
        p_upper_at_limit=st.feas[rows, i_final],
        explore_factor=factor,
        demand=grid[st.i_stable],
    )


def allocate_cluster_caps(
    demand: np.ndarray, cluster_id: np.ndarray, config: ClusterConfig
) -> np.ndarray:
    """Per-user caps that keep every cluster's total limit within its cap (``inf`` = none).

    ``demand`` is each user's limit before the cluster cap. Over-cap clusters: ``d_i * cap / D``;
    clusters within their cap: ``d_i`` plus the user's share of the slack (equal shares when
    ``D = 0``). Users with ``cluster_id < 0`` or in clusters below ``min_size`` get ``inf``.
    """
    demand = np.asarray(demand, dtype=np.float64)
    cluster_id = np.asarray(cluster_id, dtype=np.int64)
    user_cap = np.full(len(demand), np.inf)
    inside = np.flatnonzero(cluster_id >= 0)
    if not config.enabled or not len(inside):
        return user_cap
    _, inv = np.unique(cluster_id[inside], return_inverse=True)
    size = np.bincount(inv).astype(np.float64)
    d = demand[inside]
    total = np.bincount(inv, weights=d)
    cap = config.cap_for_size(size)
    over = total > cap
    capped = np.isfinite(cap[inv])
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(total[inv] > 0, d / total[inv], 1.0 / size[inv])
        # 1e-12 relative: a share that is a grid point up to float error is not snapped a
        # whole step down (the excess over the cap this can cause is < 1e-12 of it)
        scaled = d * (cap[inv] / total[inv]) * (1.0 + 1e-12)
        within = d + (cap[inv] - total[inv]) * share
    user_cap[inside] = np.where(~capped, np.inf, np.where(over[inv], scaled, within))
    return user_cap


def _as_inputs(
    curves: np.ndarray, grid: np.ndarray | None, config: PolicyConfig | None
) -> tuple[np.ndarray, np.ndarray, PolicyConfig]:
    config = config or PolicyConfig()
    grid = check_grid(config.grid_values() if grid is None else grid)
    curves = np.asarray(curves)
    if curves.dtype not in (np.float32, np.float64):  # float32 kept: no 2x copy at 1M users
        curves = curves.astype(np.float64)
    if curves.ndim != 2 or curves.shape[1] != grid.size:
        raise ValueError(f"curves must have shape (n, {grid.size}), got {curves.shape}")
    return curves, grid, config


def decide(
    curves: np.ndarray,
    grid: np.ndarray | None = None,
    r_max: float | np.ndarray | None = None,
    *,
    dsl_score: float | np.ndarray | None = None,
    cluster_id: np.ndarray | None = None,
    guardrail_hits: np.ndarray | list | None = None,
    config: PolicyConfig | None = None,
    bound: np.ndarray | None = None,
    current: np.ndarray | None = None,
    draws: np.ndarray | None = None,
) -> DecisionTable:
    """Decide limits for ``n`` users at once (see the module docstring for the rules).

    Parameters
    ----------
    curves : float[n, G]
        Estimated p(default | do(L)) at each grid limit (NaN = infeasible).
    grid : float[G], optional
        The limits (default: ``config.grid``).
    r_max : float or float[n], optional
        Risk ceiling (default: ``config.r_max``).
    dsl_score : float[n] in [0, 1], optional
        DSL (uncertainty) score per user; ``None`` = 0.
    cluster_id : int[n], optional
        Cluster per user (``-1`` = none), e.g. :attr:`Clusters.cluster_id`. Cluster sizes and
        totals are counted over the users passed here, so pass every member of a cluster in one
        call (decide the whole scoring batch at once; curves can be computed in parallel).
    guardrail_hits : str or None per user, optional
        Name of the high-risk rule that matched the user (e.g.
        ``ConstrainedRuleSet.match(X)``), ``None``/NaN/"" when none did.
    config : PolicyConfig, optional
        DSL rule, guardrail cap, cluster caps, ``contiguous``, stability, exploration.
    bound : float[n, G], optional
        The certified upper bound of each curve: feasibility is judged on it (the guarantee).
    current : float[n], optional
        Each user's current limit (stability: a rescoring never cuts more than ``max_cut``).
    draws : float[n, 2] in [0, 1), optional
        Per-user uniform draws for exploration (``u`` chooses, ``v`` sets the factor); keyed
        hashes of the user, so online and batch agree. ``None``: no exploration.
    """
    curves, grid, config = _as_inputs(curves, grid, config)
    n = curves.shape[0]
    cid = np.full(n, -1, dtype=np.int64) if cluster_id is None else np.asarray(cluster_id)
    if cid.shape != (n,) or cid.dtype.kind not in "iu":
        raise ValueError(f"cluster_id must be integers of shape ({n},)")
    cid = cid.astype(np.int64)
    st = _risk_stage(
        curves,
        grid,
        config.r_max if r_max is None else r_max,
        dsl_score,
        guardrail_hits,
        config,
        bound,
        current,
    )
    user_cap = allocate_cluster_caps(grid[st.i_stable], cid, config.clusters)
    return _final_stage(curves, grid, st, user_cap, cid, config, _draws(draws, n))


def decide_with_caps(
    curves: np.ndarray,
    grid: np.ndarray | None = None,
    r_max: float | np.ndarray | None = None,
    *,
    user_cap: np.ndarray,
    dsl_score: float | np.ndarray | None = None,
    cluster_id: np.ndarray | None = None,
    guardrail_hits: np.ndarray | list | None = None,
    config: PolicyConfig | None = None,
    bound: np.ndarray | None = None,
    current: np.ndarray | None = None,
    draws: np.ndarray | None = None,
) -> DecisionTable:
    """Decisions with the per-user caps already allocated: the second pass of a distributed run.

    A batch spread over workers decides in two passes: (1) each chunk runs :func:`decide` without
    ``cluster_id`` (its ``demand`` is each user's demand), (2) one place allocates
    :func:`allocate_cluster_caps` over all users, (3) each chunk runs this function with its
    users' ``user_cap`` (``inf`` or NaN = none). The result equals :func:`decide` on all users at
    once, row for row; ``cluster_id`` is only reported.
    """
    curves, grid, config = _as_inputs(curves, grid, config)
    n = curves.shape[0]
    cap = np.asarray(user_cap, dtype=np.float64).reshape(-1)
    if cap.shape != (n,):
        raise ValueError(f"user_cap must have shape ({n},), got {cap.shape}")
    cap = np.where(np.isnan(cap), np.inf, cap)
    if np.any(cap < 0):
        raise ValueError("user_cap must be >= 0")
    cid = np.full(n, -1, dtype=np.int64) if cluster_id is None else np.asarray(cluster_id)
    if cid.shape != (n,) or cid.dtype.kind not in "iu":
        raise ValueError(f"cluster_id must be integers of shape ({n},)")
    st = _risk_stage(
        curves,
        grid,
        config.r_max if r_max is None else r_max,
        dsl_score,
        guardrail_hits,
        config,
        bound,
        current,
    )
    return _final_stage(curves, grid, st, cap, cid.astype(np.int64), config, _draws(draws, n))


def online_decision(
    curve: np.ndarray,
    grid: np.ndarray | None = None,
    r_max: float | None = None,
    dsl_score: float = 0.0,
    user_cap: float | None = None,
    guardrail_rule: str | None = None,
    *,
    cluster_id: int = -1,
    config: PolicyConfig | None = None,
    bound: np.ndarray | None = None,
    current: float | None = None,
    draws: np.ndarray | None = None,
) -> Decision:
    """One user's decision, as :func:`decide` makes it, given the batch's per-user cap.

    ``user_cap`` is the ``user_cap`` the batch allocated to this user (``None`` or ``inf`` = no
    cap); with the same curve, DSL score, rule and config the result equals the batch's row.
    """
    curve = np.asarray(curve)
    if curve.ndim != 1:
        raise ValueError(f"curve must be 1-D, got shape {curve.shape}")
    curves, grid, config = _as_inputs(curve[None, :], grid, config)
    cap = np.inf if user_cap is None else float(user_cap)
    if not cap >= 0:
        raise ValueError("user_cap must be >= 0")
    st = _risk_stage(
        curves,
        grid,
        config.r_max if r_max is None else r_max,
        np.array([dsl_score], dtype=np.float64),
        [guardrail_rule],
        config,
        None if bound is None else np.asarray(bound)[None, :],
        None if current is None else np.array([current], dtype=np.float64),
    )
    table = _final_stage(
        curves,
        grid,
        st,
        np.array([cap]),
        np.array([cluster_id], dtype=np.int64),
        config,
        _draws(None if draws is None else np.asarray(draws)[None, :], 1),
    )
    return table.row(0)


def _draws(draws: np.ndarray | None, n: int) -> np.ndarray | None:
    if draws is None:
        return None
    d = np.asarray(draws, dtype=np.float64)
    if d.shape != (n, 2) or not np.all((d >= 0) & (d < 1)):
        raise ValueError(f"draws must be uniform values in [0, 1) of shape ({n}, 2)")
    return d


def exploration_draws(keys: np.ndarray, salt: str) -> np.ndarray:
    """Two uniform draws per key (user id) from a keyed hash of ``salt`` and the key: the same
    user gets the same draws wherever it is decided (batch or online) for the same ``salt``
    (e.g. the decision date and the exploration seed)."""
    import hashlib

    out = np.empty((len(keys), 2))
    for i, k in enumerate(keys):
        h = hashlib.blake2b(f"{salt}\x1f{k}".encode(), digest_size=16).digest()
        out[i, 0] = int.from_bytes(h[:8], "little") / 2**64
        out[i, 1] = int.from_bytes(h[8:], "little") / 2**64
    return out
