"""``creditgraph evaluate-policy``: what a candidate limit policy would do, before it is deployed.

The candidate (a ``policy`` section of a pipeline.yaml: ceiling, guarantee, DSL rule, caps...)
decides every user of a logged dataset (historical limits and outcomes) with the run's model,
exactly as batch scoring would (the same Ray Data passes and ``policy/deploy.py``). Its portfolio
default rate, credit granted and value are then estimated from the logged outcomes by off-policy
evaluation (``policy/ope.py``): the direct method (the model's calibrated curves), inverse-
propensity weighting with a kernel around the logged limit and the ZILN density of the logged
limits (Kallus & Zhou, AISTATS 2018), its self-normalized form, and doubly robust; 95 % bootstrap
intervals. Where the data has randomized limit tests with a known distribution
(``dataset.yaml: limit_tests``) the same estimators run on those users with the *known* density:
the unconfounded check. On simulated data the true rate is reported next to the estimates.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from creditgraph.data.load import load_dataset
from creditgraph.evaluate.decisions import ope_report
from creditgraph.evaluate.metrics import judge_limits, truth_curves
from creditgraph.layout import RunLayout, as_layout
from creditgraph.model.infer import FirstHop
from creditgraph.policy.clusters import build_clusters
from creditgraph.policy.config import DEFAULT_LGD, DEFAULT_MARGIN, PolicyConfig
from creditgraph.policy.deploy import DeployedPolicy
from creditgraph.serving.context import ScoringBundle
from creditgraph.serving.score import _run_finish, _run_first, batch_graph
from creditgraph.utils.io import atomic_dir, write_json
from creditgraph.utils.logs import get_logger
from creditgraph.utils.runtime import require_ray
from creditgraph.utils.tables import markdown_table

log = get_logger(__name__)


def evaluate_policies(
    run: RunLayout | str | Path,
    data_dir: str | Path,
    policies: dict[str, PolicyConfig],
    out_dir: str | Path | None = None,
    *,
    margin: float = DEFAULT_MARGIN,
    lgd: float = DEFAULT_LGD,
    batch_size: int = 16_384,
    max_actors: int = 2,
    random_state: int = 0,
) -> dict:
    """Off-policy estimates of each candidate policy on the logged data of ``data_dir``.

    The model's curves are computed once; each policy then decides every user and is estimated.
    Returns ``{name: {"summary": ..., "estimates": [...], "randomized": [...], "truth": ...}}``
    and writes ``out_dir/report.json`` and ``report.md`` when given.
    """
    require_ray("policy evaluation")
    t0 = time.perf_counter()
    run = as_layout(run)
    first_policy = next(iter(policies.values()))
    bundle = ScoringBundle.load(run, first_policy)
    ds = load_dataset(data_dir)
    g = batch_graph(bundle, ds)
    grid = bundle.policy.grid_values()
    h0, c0, s0 = _run_first(g, run, batch_size, 1, max_actors)
    tokens = bundle.inference.propagate(FirstHop(h0, c0, s0), g.src, g.dst, g.weight)
    ev, _ = _run_finish(g, tokens, h0, bundle, None, grid, batch_size, 1, max_actors)
    log_f, _ = bundle.inference.log_density(g.raw, g.struct, h0, g.limit)
    y = ds.outcome
    truth = None
    if ds.truth is not None:
        truth = truth_curves(ds.truth, np.arange(ds.n_users))
    tests = _limit_tests(ds)
    report = {}
    for name, policy in policies.items():
        resolved = policy.resolve(bundle.limit_scale)
        if not np.array_equal(resolved.grid_values(), grid):
            raise ValueError(f"policy {name!r}: every candidate must use the run's grid")
        deployed = DeployedPolicy(resolved, bundle.calibration)
        clusters = build_clusters(
            ds.links, ds.n_users, bundle.entities, g.time,
            history_days=resolved.clusters.history_days or bundle.history_days,
            min_size=resolved.clusters.min_size, split_above=resolved.clusters.split_above,
        )  # fmt: skip
        table = deployed.decide(
            ev.curves, ev.logit_std, dsl_score=ev.dsl, cluster_id=clusters.cluster_id,
            current=g.limit, ids=g.ids, decision_time=g.time,
        )  # fmt: skip
        limits = table.limit
        true_rate = None
        entry: dict = {
            "summary": {
                "r_max": resolved.r_max,
                "granted_share": float((limits > 0).mean()),
                "granted_total": float(limits.sum()),
                "mean_limit": float(limits.mean()),
                "binding_constraints": table.counts(),
                "guarantee": deployed.guarantee(),
            }
        }
        if truth is not None:
            t_grid, t_curves = truth
            judged = judge_limits(limits, t_curves, t_grid, resolved.r_max, margin=margin, lgd=lgd)
            true_rate = judged["portfolio_default_rate"]
            entry["truth"] = judged
        entry["estimates"] = ope_report(
            limits, ev.curves, grid, g.limit, y, log_f, ev.p_factual,
            true_rate=true_rate, margin=margin, lgd=lgd, random_state=random_state,
        )  # fmt: skip
        if tests is not None:
            mask, density = tests
            entry["randomized"] = ope_report(
                limits[mask], ev.curves[mask], grid, g.limit[mask], y[mask], density,
                ev.p_factual[mask], true_rate=None, margin=margin, lgd=lgd,
                random_state=random_state,
            )  # fmt: skip
            for row in entry["randomized"]:
                row["users"] = int(mask.sum())
        report[name] = entry
        dr = next(r for r in entry["estimates"] if r["method"] == "dr")
        log.info(
            "policy %s: granted %.1f%%, DR default rate %.4f [%.4f, %.4f]%s",
            name,
            100 * entry["summary"]["granted_share"],
            dr["default_rate"],
            dr["ci_low"],
            dr["ci_high"],
            "" if true_rate is None else f", truth {true_rate:.4f}",
        )
    result = {"policies": report, "seconds": time.perf_counter() - t0, "users": ds.n_users}
    if out_dir is not None:
        with atomic_dir(Path(out_dir)) as tmp:
            write_json(tmp / "report.json", result)
            (tmp / "report.md").write_text(_markdown(report))
    return result


def _limit_tests(ds) -> tuple[np.ndarray, np.ndarray] | None:
    """Randomized limit-test users and the known log density of their limits (in log L)."""
    spec = ds.spec.limit_tests
    if spec is None or ds.segments is None or spec.column not in ds.segments:
        return None
    seg = ds.segments.set_index("user_id")[spec.column]
    mask = seg.reindex(pd.Index(ds.ids)).fillna(False).to_numpy(bool)
    if not mask.any():
        return None
    return mask, spec.log_density(ds.treatment[mask])


def _markdown(report: dict) -> str:
    rows = []
    for name, entry in report.items():
        for r in entry["estimates"] + entry.get("randomized", []):
            rows.append(
                {
                    "policy": name,
                    "users": "limit tests (known density)"
                    if "users" in r
                    else "all (ZILN density)",
                    "method": r["method"],
                    "default_rate": r["default_rate"],
                    "ci_low": r["ci_low"],
                    "ci_high": r["ci_high"],
                    "true_default_rate": r.get("true_default_rate"),
                    "granted_share": entry["summary"]["granted_share"],
                }
            )
    return markdown_table(rows) + "\n"
