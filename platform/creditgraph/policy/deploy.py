"""The deployed policy: every step of a decision, composed in one place.

Batch scoring, the online service and the evaluation all decide through
:meth:`DeployedPolicy.decide`, so what the evaluation measures is what production does:

1. the run's calibration maps the model's curves (the caller passes calibrated curves);
2. feasibility is judged on the certified upper bound ``sigmoid(logit(p_cal) + lambda sigma)``
   at the ceiling (the guarantee; ``policy/guarantee.py``), or on the calibrated curve itself when
   the policy has no guarantee;
3. the DSL rule, guardrails, stability, cluster caps and exploration of ``policy/decide.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from creditgraph.policy.calibrate import Calibration
from creditgraph.policy.config import PolicyConfig
from creditgraph.policy.decide import DecisionTable, decide, decide_with_caps, exploration_draws
from creditgraph.policy.guarantee import upper_bound


@dataclass
class DeployedPolicy:
    """A resolved policy (concrete grid and caps) with the run's calibration."""

    config: PolicyConfig
    calibration: Calibration | None

    @property
    def grid(self) -> np.ndarray:
        return self.config.grid_values()

    def calibrate(self, p: np.ndarray) -> np.ndarray:
        return np.asarray(p) if self.calibration is None else self.calibration.calibrate(p)

    def guarantee(self, r_max: float | None = None) -> dict:
        """What decisions at ``r_max`` rest on: the certified tightening and its statement."""
        r_max = self.config.r_max if r_max is None else r_max
        cal = self.calibration
        if self.config.guarantee is None or cal is None:
            reason = (
                "no guarantee configured (policy.guarantee: null)"
                if self.config.guarantee is None
                else "the run has no calibration stage"
            )
            return {"certified": False, "lambda": None, "for_r_max": None, "reason": reason}
        ceilings = sorted(cal.lambdas)
        usable = [r for r in ceilings if r >= r_max - 1e-12] or [ceilings[-1]]
        r = min(usable, key=lambda c: abs(c - r_max))
        lam = cal.lambdas[r]
        return {
            "certified": lam is not None and abs(r - r_max) < 1e-12,
            "lambda": lam,
            "for_r_max": r,
            "delta": cal.config.get("delta"),
            "alpha": cal.config.get("alpha"),
            "statement": cal.statements[r],
        }

    def bound(
        self, curves: np.ndarray, logit_std: np.ndarray, r_max: float | None = None
    ) -> np.ndarray | None:
        """The upper bound the decision at ``r_max`` is judged on (None: the estimate itself;
        all ones when nothing was certified: decline everyone)."""
        if self.config.guarantee is None or self.calibration is None:
            return None
        lam = self.guarantee(r_max)["lambda"]
        if lam is None:
            return np.ones_like(np.asarray(curves, dtype=np.float64))
        return upper_bound(curves, logit_std, lam)

    def draws(self, ids, decision_time: float | None) -> np.ndarray | None:
        """Exploration draws keyed on each user id and the decision date (None ids: never)."""
        ex = self.config.exploration
        if decision_time is None or ex.share <= 0 or ids is None:
            return None
        salt = f"{int(np.floor(decision_time))}/{ex.seed}"
        keys = [None if k is None else str(k) for k in ids]
        out = np.full((len(keys), 2), 1.0 - 1e-12)
        named = [i for i, k in enumerate(keys) if k is not None]
        if named:
            out[named] = exploration_draws(np.array([keys[i] for i in named]), salt)
        return out

    def decide(
        self,
        curves: np.ndarray,
        logit_std: np.ndarray,
        *,
        dsl_score: np.ndarray | None = None,
        guardrail_hits=None,
        r_max: float | None = None,
        cluster_id: np.ndarray | None = None,
        user_cap: np.ndarray | None = None,
        current: np.ndarray | None = None,
        ids=None,
        decision_time: float | None = None,
        grid: np.ndarray | None = None,
    ) -> DecisionTable:
        """Decisions on calibrated ``curves``: with ``user_cap`` the per-user caps are given (a
        snapshot's, or an applicant's cluster room); else caps are allocated over ``cluster_id``
        among the users passed (a whole batch)."""
        r = self.config.r_max if r_max is None else float(r_max)
        common = {
            "dsl_score": dsl_score,
            "cluster_id": cluster_id,
            "guardrail_hits": guardrail_hits,
            "config": self.config,
            "bound": self.bound(curves, logit_std, r),
            "current": current,
            "draws": self.draws(ids, decision_time),
        }
        grid = self.grid if grid is None else np.asarray(grid, dtype=np.float64)
        if user_cap is not None:
            return decide_with_caps(curves, grid, r, user_cap=user_cap, **common)
        return decide(curves, grid, r, **common)
