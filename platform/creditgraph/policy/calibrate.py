"""``calibrate`` stage: calibrated curves and the guarantee's tightening, on held-out users.

The decision turns on the estimated risk right at the ceiling, so it must be calibrated there,
and a risk officer needs a stated guarantee. On the validation users of the run (never used to
fit the model's weights; only for early stopping), split by a keyed hash of the user id into two
exchangeable halves:

1. **calibration half** — a monotone map ``p -> p_cal`` (``model/calibration.CurveCalibrator``,
   isotonic by default) fitted on the predicted risk at each user's logged limit and its
   outcome, weighted by stabilized inverse-probability weights of the logged limit (the model's
   ZILN treatment tower), so it calibrates the *interventional* risk the decision uses rather than
   the risk under the historical policy; reliability tables per limit band before and after;
2. **guarantee half** — for each ceiling ``r_max`` of the policy (and the usual 0.05/0.10/0.20),
   the tightening ``lambda`` of the upper bound ``U = sigmoid(logit(p_cal) + lambda * sigma)``
   (``sigma``: the spread of the model's thinned towers on the logit scale) chosen by
   Learn-then-Test (``policy/guarantee.py``): with probability at least ``1 - delta`` the
   expected default rate of the granted book is at most ``r_max``, under the assumptions the
   statement lists; off-policy, with the ZILN density of the logged limits.

Outputs (``RUN/calibration``): ``calibrator.json``, ``guarantee.json`` (per ceiling: lambda,
certified, the test table and the statement), ``reliability.json``, ``manifest.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.layout import CalibrationFiles, RunLayout, as_layout
from creditgraph.model.calibration import CurveCalibrator, reliability_by_band
from creditgraph.model.infer import Inference
from creditgraph.policy.config import PolicyConfig
from creditgraph.policy.guarantee import choose_tightening, upper_bound
from creditgraph.policy.ope import LoggedData
from creditgraph.utils.io import atomic_dir, read_json, write_json
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

#: Ceilings the guarantee is always certified for, besides the policy's own.
STANDARD_CEILINGS = (0.05, 0.10, 0.20)
WEIGHT_CLIP = (0.1, 10.0)


def _halves(ids: np.ndarray, seed: int = 29) -> np.ndarray:
    """True for the calibration half, False for the guarantee half (stable per user id)."""
    h = pd.util.hash_pandas_object(pd.Series(ids), index=False, hash_key=f"{seed:016d}")
    return (h.to_numpy(np.uint64) % np.uint64(2)) == 0


def run_calibration(run: RunLayout | str | Path, policy: PolicyConfig | None = None) -> dict:
    """Fit the calibrator and certify the tightening per ceiling; write ``RUN/calibration``."""
    run = as_layout(run)
    art = GraphArtifacts.load(run)
    policy = (policy or PolicyConfig()).resolve(art.manifest.get("limits", {}))
    grid = policy.grid_values()
    inf = Inference.load(run)
    val = np.flatnonzero(art.split_mask("val"))
    limit = art.users["treatment"].to_numpy(np.float64)
    y_all = art.users["outcome"].to_numpy(np.float64)
    out = inf.score_graph(art.raw, limit, art.struct, art.src, art.dst, art.weight, grid, rows=val)
    _, sigma = inf.uncertainty(out["x"], grid)
    first = inf.first(art.raw[val], limit[val], art.struct[val])
    log_f, log_marginal = inf.log_density(art.raw[val], art.struct[val], first.h0, limit[val])
    y = y_all[val]
    ids = art.users[art.id_column].to_numpy()[val]
    cal_half = _halves(ids)
    weights = np.clip(np.exp(np.clip(log_marginal - log_f, -20, 20)), *WEIGHT_CLIP)

    calibrator = (
        CurveCalibrator(method=policy.calibration).fit(
            out["p_factual"][cal_half], y[cal_half], sample_weight=weights[cal_half]
        )
        if policy.calibration != "none"
        else None
    )
    p_fact_cal = _apply(calibrator, out["p_factual"])
    curves_cal = _apply(calibrator, out["curve"])
    g = ~cal_half
    reliability = {
        "before": _jsonable(reliability_by_band(out["p_factual"][g], y[g], limit[val][g])),
        "after": _jsonable(reliability_by_band(p_fact_cal[g], y[g], limit[val][g])),
    }
    logged = LoggedData(
        limit=limit[val][g], outcome=y[g], log_density=log_f[g], p_hat_logged=p_fact_cal[g]
    )
    ceilings = sorted({*STANDARD_CEILINGS, policy.r_max})
    results = {}
    for r in ceilings:
        res = choose_tightening(curves_cal[g], sigma[g], grid, r, logged, policy.guarantee)
        results[f"{r:g}"] = {
            "r_max": r,
            "lambda": None if not np.isfinite(res.lambda_) else float(res.lambda_),
            "certified": bool(res.certified),
            "statement": res.statement(),
            "table": res.table.to_dict("records"),
            "n_calibration": int(res.n_calibration),
        }
        log.info(
            "guarantee at r_max %.2f: lambda %s (%s)",
            r,
            results[f"{r:g}"]["lambda"],
            "certified" if res.certified else "nothing certified: decline everyone",
        )
    ece_before = reliability["before"]["all"]["ece"]
    ece_after = reliability["after"]["all"]["ece"]
    summary = {
        "n_val": len(val),
        "n_calibration_half": int(cal_half.sum()),
        "n_guarantee_half": int(g.sum()),
        "method": policy.calibration,
        "ece_before": ece_before,
        "ece_after": ece_after,
        "guarantee": {
            k: {"lambda": v["lambda"], "certified": v["certified"]} for k, v in results.items()
        },
    }
    with atomic_dir(run.calibration.dir) as tmp_dir:
        tmp = CalibrationFiles(tmp_dir)
        write_json(tmp.calibrator, calibrator.to_dict() if calibrator is not None else None)
        write_json(
            tmp.guarantee,
            {"config": policy.guarantee.model_dump(mode="json"), "by_ceiling": results},
        )
        write_json(tmp.reliability, reliability)
        write_json(tmp.manifest, {"version": 1, "grid": grid.tolist(), "summary": summary})
    log.info("calibration: ECE %.4f -> %.4f on held-out users", ece_before, ece_after)
    return summary


def _apply(calibrator: CurveCalibrator | None, p: np.ndarray) -> np.ndarray:
    return np.asarray(p, dtype=np.float64) if calibrator is None else calibrator.transform(p)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


@dataclass
class Calibration:
    """A run's calibration, as scoring applies it: the map and the tightening per ceiling."""

    calibrator: CurveCalibrator | None
    lambdas: dict[float, float | None]  # r_max -> lambda (None: nothing certified)
    statements: dict[float, str]
    config: dict

    @classmethod
    def load(cls, run: RunLayout | str | Path) -> Calibration | None:
        files = as_layout(run).calibration
        if not files.exists():
            return None
        cal = read_json(files.calibrator)
        guarantee = read_json(files.guarantee)
        by = guarantee["by_ceiling"]
        return cls(
            calibrator=None if cal is None else CurveCalibrator.from_dict(cal),
            lambdas={v["r_max"]: v["lambda"] for v in by.values()},
            statements={v["r_max"]: v["statement"] for v in by.values()},
            config=guarantee["config"],
        )

    def calibrate(self, p: np.ndarray) -> np.ndarray:
        return _apply(self.calibrator, p)

    def tightening(self, r_max: float) -> float | None:
        """The certified lambda for this ceiling; KeyError when it was not calibrated for it."""
        for r, lam in self.lambdas.items():
            if abs(r - r_max) < 1e-12:
                return lam
        raise KeyError(r_max)

    def bound(self, p_cal: np.ndarray, sigma: np.ndarray, r_max: float) -> np.ndarray:
        """The upper bound the guaranteed policy decides on; 1 everywhere (decline everyone)
        when nothing was certified for this ceiling."""
        lam = self.tightening(r_max)
        if lam is None:
            return np.ones_like(np.asarray(p_cal, dtype=np.float64))
        return upper_bound(p_cal, sigma, lam)
