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

BINDINGS = ("risk_ceiling", "grid_max", "no_feasible_limit", "dsl", "guardrail", "cluster_cap")
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
        return pd.DataFrame(cols)


@dataclass
class _RiskStage:
    """Steps 1-3 (everything but the cluster cap); row-wise, so one user gives its batch row."""

    r_eff: np.ndarray
    i_base: np.ndarray
    ok_base: np.ndarray
    i_eff: np.ndarray
    ok_eff: np.ndarray
    guard_cap: np.ndarray
    i_guard: np.ndarray
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


def _risk_stage(
    curves: np.ndarray,
    grid: np.ndarray,
    r_max: float | np.ndarray,
    dsl_score: float | np.ndarray | None,
    guardrail_hits: Any,
    config: PolicyConfig,
) -> _RiskStage:
    n = curves.shape[0]
    r = broadcast_per_user(r_max, n, "r_max")
    if not np.all((r > 0) & (r <= 1)):
        raise ValueError("r_max must be in (0, 1]")
    dsl = broadcast_per_user(0.0 if dsl_score is None else dsl_score, n, "dsl_score")
    if not np.all((dsl >= 0) & (dsl <= 1)):  # NaN fails too
        raise ValueError("dsl_score must be in [0, 1] (no NaN)")
    r_eff = effective_ceiling(r, dsl, config.dsl.threshold, config.dsl.strength)
    contiguous = config.contiguous
    i_base = _feasible_index(curves, grid, r, None, contiguous)
    i_eff = _feasible_index(curves, grid, r_eff, None, contiguous)
    rule = _rule_names(guardrail_hits, n)
    guard_cap = np.full(n, np.inf)
    if config.guardrail.enabled:
        guard_cap[pd.notna(rule)] = config.guardrail.cap
    i_guard = _capped(curves, grid, r_eff, guard_cap, i_eff, contiguous)
    return _RiskStage(
        r_eff=r_eff,
        i_base=i_base,
        ok_base=_feasible_at(curves, i_base, r),
        i_eff=i_eff,
        ok_eff=_feasible_at(curves, i_eff, r_eff),
        guard_cap=guard_cap,
        i_guard=i_guard,
        dsl=dsl,
        rule=rule,
    )


def _final_stage(
    curves: np.ndarray,
    grid: np.ndarray,
    st: _RiskStage,
    user_cap: np.ndarray,
    cluster_id: np.ndarray,
    config: PolicyConfig,
) -> DecisionTable:
    cap = np.minimum(st.guard_cap, user_cap)
    i_final = _capped(curves, grid, st.r_eff, cap, st.i_eff, config.contiguous)
    # guardrail rows with no user cap: i_final == i_guard already (same cap, same rule)
    code = np.full(len(i_final), _CODE["risk_ceiling"], dtype=np.int8)
    code[st.ok_base & (st.i_base == grid.size - 1)] = _CODE["grid_max"]
    code[~st.ok_base] = _CODE["no_feasible_limit"]
    code[(st.i_eff < st.i_base) | (st.ok_base & ~st.ok_eff)] = _CODE["dsl"]
    code[st.i_guard < st.i_eff] = _CODE["guardrail"]
    code[i_final < st.i_guard] = _CODE["cluster_cap"]
    return DecisionTable(
        limit=grid[i_final],
        index=i_final,
        p_default_at_limit=curves[np.arange(len(i_final)), i_final],
        binding_code=code,
        dsl_score=st.dsl,
        rule=st.rule,
        cluster_id=cluster_id,
        user_cap=user_cap,
        r_max_effective=st.r_eff,
        risk_limit=grid[st.i_eff],
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
    grid = check_grid(config.grid.values() if grid is None else grid)
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
        DSL rule, guardrail cap, cluster caps, ``contiguous``.
    """
    curves, grid, config = _as_inputs(curves, grid, config)
    n = curves.shape[0]
    cid = np.full(n, -1, dtype=np.int64) if cluster_id is None else np.asarray(cluster_id)
    if cid.shape != (n,) or cid.dtype.kind not in "iu":
        raise ValueError(f"cluster_id must be integers of shape ({n},)")
    cid = cid.astype(np.int64)
    st = _risk_stage(
        curves, grid, config.r_max if r_max is None else r_max, dsl_score, guardrail_hits, config
    )
    user_cap = allocate_cluster_caps(grid[st.i_guard], cid, config.clusters)
    return _final_stage(curves, grid, st, user_cap, cid, config)


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
) -> DecisionTable:
    """Decisions with the per-user caps already allocated: the second pass of a distributed run.

    A batch spread over workers decides in two passes: (1) each chunk runs :func:`decide` without
    ``cluster_id`` (its ``limit`` is each user's demand), (2) one place allocates
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
        curves, grid, config.r_max if r_max is None else r_max, dsl_score, guardrail_hits, config
    )
    return _final_stage(curves, grid, st, cap, cid.astype(np.int64), config)


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
    )
    table = _final_stage(
        curves, grid, st, np.array([cap]), np.array([cluster_id], dtype=np.int64), config
    )
    return table.row(0)
