"""The decision itself, measured: each stage of the deployed policy, the frontier, and OPE.

For the model, on the same held-out users and the same grid:

* ``bare`` — the largest limit whose *raw* estimated risk is under the ceiling;
* ``calibrated`` — the same rule on the calibrated curves;
* ``guaranteed`` — on the certified upper bound (``policy/guarantee.py``);
* ``deployed`` — exactly what ``score`` and ``serve`` apply (``policy/deploy.py``): the bound, the
  DSL rule, guardrails, stability, cluster caps and exploration;

and the bare rule for every baseline. With a truth (simulated data) each is judged by
:func:`~creditgraph.evaluate.metrics.judge_limits` (over-ceiling rate among granted users, excess
risk, portfolio default rate, granted/oracle, limit satisfaction, value); the *frontier* sweeps
how far each method tightens (our bound's lambda; the baselines' ceiling) and records the
over-ceiling rate against the share of the oracle's credit granted. Without a truth the report
gives the deployed decisions on the data's own scale and the off-policy estimate of their
default rate. The off-policy estimate (DM, IPW, DR with bootstrap intervals) is reported in both
cases, next to the truth when there is one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from creditgraph.evaluate.metrics import judge_limits
from creditgraph.policy.decide import curve_at, largest_feasible_limit
from creditgraph.policy.deploy import DeployedPolicy
from creditgraph.policy.guarantee import upper_bound
from creditgraph.policy.ope import LoggedData, estimate_policy

#: the policy metrics of the report, in order
POLICY_COLUMNS = [
    "name",
    "policy",
    "over_ceiling_rate",
    "excess_risk",
    "portfolio_default_rate",
    "portfolio_default_rate_amount",
    "granted_share",
    "granted_ratio",
    "limit_satisfaction",
    "value_mean",
]
LAMBDAS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0]
CEILING_SCALES = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]


def bare_limits(curves: np.ndarray, grid: np.ndarray, r_max: float) -> np.ndarray:
    return largest_feasible_limit(curves, grid, r_max)[0]


def policy_rows(
    name: str,
    limits: dict[str, np.ndarray],
    true: np.ndarray,
    grid: np.ndarray,
    r_max: float,
    *,
    margin: float,
    lgd: float,
) -> list[dict]:
    """One row per policy stage of one method, judged against the true curves."""
    rows = []
    for policy, lim in limits.items():
        m = judge_limits(lim, true, grid, r_max, margin=margin, lgd=lgd)
        rows.append({"name": name, "policy": policy, **m})
    return rows


def frontier(
    name: str,
    true: np.ndarray,
    grid: np.ndarray,
    r_max: float,
    *,
    curves: np.ndarray,
    logit_std: np.ndarray | None = None,
) -> list[dict]:
    """Over-ceiling rate vs granted/oracle as the method tightens: our upper bound's lambda when
    ``logit_std`` is given, else the ceiling scaled down (what a baseline can do)."""
    out = []
    if logit_std is not None:
        for lam in LAMBDAS:
            lim = bare_limits(upper_bound(curves, logit_std, lam), grid, r_max)
            m = judge_limits(lim, true, grid, r_max)
            out.append({"name": name, "knob": "lambda", "value": lam, **_point(m)})
    else:
        for scale in CEILING_SCALES:
            lim = bare_limits(curves, grid, r_max * scale)
            m = judge_limits(lim, true, grid, r_max)
            out.append({"name": name, "knob": "ceiling_scale", "value": scale, **_point(m)})
    return out


def _point(m: dict) -> dict:
    return {
        "over_ceiling_rate": m["over_ceiling_rate"],
        "granted_ratio": m["granted_ratio"],
        "portfolio_default_rate": m["portfolio_default_rate"],
        "limit_satisfaction": m["limit_satisfaction"],
    }


def ope_report(
    deployed_limits: np.ndarray,
    curves: np.ndarray,
    grid: np.ndarray,
    logged_limit: np.ndarray,
    outcome: np.ndarray,
    log_density: np.ndarray,
    p_logged: np.ndarray,
    *,
    true_rate: float | None = None,
    margin: float,
    lgd: float,
    random_state: int = 0,
) -> list[dict]:
    """DM, IPW, SNIPW and DR estimates (95 % bootstrap intervals) of the deployed policy's
    portfolio default rate and value from the logged limits and outcomes; the truth alongside."""
    labeled = np.isfinite(outcome)
    logged = LoggedData(
        limit=logged_limit[labeled],
        outcome=outcome[labeled],
        log_density=log_density[labeled],
        p_hat_logged=p_logged[labeled],
    )
    target = deployed_limits[labeled]
    p_target = curve_at(curves[labeled], grid, target)
    table = estimate_policy(
        logged, target, p_target, margin=margin, lgd=lgd, random_state=random_state, n_boot=200
    )
    rows = table.reset_index().rename(columns={"index": "method"}).to_dict("records")
    for r in rows:
        r["true_default_rate"] = true_rate
        if true_rate is not None and np.isfinite(true_rate):
            r["covers_truth"] = bool(r["ci_low"] <= true_rate <= r["ci_high"])
    return rows


def deployed_decisions(
    deployed: DeployedPolicy,
    curves_cal: np.ndarray,
    logit_std: np.ndarray,
    grid: np.ndarray,
    r_max: float,
    *,
    dsl: np.ndarray,
    rule: np.ndarray | None,
    cluster_id: np.ndarray,
    current: np.ndarray,
    ids: np.ndarray,
    decision_time: float,
) -> pd.DataFrame:
    """The deployed policy's decisions for a whole batch (caps allocated among its users)."""
    table = deployed.decide(
        curves_cal,
        logit_std,
        dsl_score=dsl,
        guardrail_hits=rule,
        r_max=r_max,
        cluster_id=cluster_id,
        current=current,
        ids=ids,
        decision_time=decision_time,
        grid=grid,
    )
    return table.to_frame(ids)
