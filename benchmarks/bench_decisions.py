"""Decisions a risk officer can sign: each method's limits judged against the true curves.

Datasets: the default simulated market (50,000 users, seeds 0, 1, 2) and a semi-synthetic one
built on the real UCI credit-card covariates (``creditgraph simulate --covariates``: real limits up
to 1,000,000 NT$, simulated outcomes with a known truth). For each, the pipeline trains the model
(and the no-graph towers), calibrates it and certifies the guarantee; the baselines are fitted on
the same training users. On the held-out test users, for r_max in {0.05, 0.10, 0.20}:

* creditgraph: ``bare`` (raw curves), ``calibrated``, ``guaranteed`` (the certified bound) and
  ``deployed`` (what ``score`` applies: bound + DSL rule + stability + cluster caps + exploration);
* LightGBM S-learner (plain and monotone in the limit), econml CausalForestDML, the towers without
  the graph: the bare rule;

judged by over-ceiling rate among granted users, excess risk, portfolio default rate (count and
amount weighted), granted/oracle, limit satisfaction and value. The frontier (over-ceiling rate vs
granted/oracle as each method tightens) is drawn in one figure. Off-policy evaluation is validated
on (seed, candidate policy) pairs: bias and RMSE of DM, IPW, SNIPW and DR against the truth and the
coverage of their 95 % intervals.

Resumable: each (dataset, seed) result is cached in ``BENCH_DECISIONS_DIR``
(default ``benchmarks/.cache/decisions``) and reused. Overrides: BENCH_DECISIONS_USERS (50000),
BENCH_DECISIONS_SEEDS ("0,1,2"), BENCH_DECISIONS_EPOCHS, BENCH_DECISIONS_SEMI_ROWS (all rows).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._report import ROOT, markdown_table, write_section
from creditgraph.config import PipelineConfig, override_many
from creditgraph.data.load import load_dataset
from creditgraph.data.semisynthetic import SemiSyntheticConfig, semisynthetic_to_dir
from creditgraph.data.simulate import SimulationConfig, simulate_to_dir
from creditgraph.evaluate.baselines import make_baseline
from creditgraph.evaluate.decisions import bare_limits, frontier, ope_report
from creditgraph.evaluate.metrics import judge_limits, mise, truth_curves
from creditgraph.evaluate.plots import plot_frontier
from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.layout import RunLayout
from creditgraph.model.infer import Inference
from creditgraph.pipeline import Pipeline, StageContext, credit_stages
from creditgraph.policy.calibrate import Calibration
from creditgraph.policy.clusters import build_clusters
from creditgraph.policy.deploy import DeployedPolicy
from creditgraph.utils.io import read_json, write_json
from creditgraph.utils.runtime import init_ray

USERS = int(os.environ.get("BENCH_DECISIONS_USERS", "50000"))
SEEDS = [int(s) for s in os.environ.get("BENCH_DECISIONS_SEEDS", "0,1,2").split(",")]
EPOCHS = os.environ.get("BENCH_DECISIONS_EPOCHS")
SEMI_ROWS = os.environ.get("BENCH_DECISIONS_SEMI_ROWS")
CACHE = Path(os.environ.get("BENCH_DECISIONS_DIR", ROOT / "benchmarks" / ".cache" / "decisions"))
UCI = ROOT.parent / "shared" / "data" / "uci_taiwan_credit_default.csv"
CEILINGS = (0.05, 0.10, 0.20)
BASELINES = ("lgbm_slearner", "lgbm_slearner_monotone", "econml_forest")
FIGURE = ROOT / "docs" / "figures" / "bench_decisions_frontier.png"
POLICY_METRICS = [
    "over_ceiling_rate",
    "excess_risk",
    "portfolio_default_rate",
    "portfolio_default_rate_amount",
    "granted_ratio",
    "limit_satisfaction",
    "value_mean",
]


def _config(seed: int) -> PipelineConfig:
    updates = {"evaluate.ablations": ["towers_no_graph"], "train.seed": seed}
    if EPOCHS:
        updates["train.epochs"] = int(EPOCHS)
    return override_many(PipelineConfig(), updates)


def _dataset(name: str, seed: int) -> Path:
    data = CACHE / f"{name}-s{seed}" / "data"
    if (data / "dataset.yaml").exists():
        return data
    if name == "sim":
        simulate_to_dir(SimulationConfig(n_users=USERS, seed=seed), data)
    else:
        cfg = SemiSyntheticConfig(seed=seed, n_users=int(SEMI_ROWS) if SEMI_ROWS else None)
        semisynthetic_to_dir(UCI, cfg, data)
    return data


def _run_one(name: str, seed: int) -> dict:
    """Train, calibrate, score every method and judge it; the result is cached per seed."""
    cached = CACHE / f"{name}-s{seed}" / "result.json"
    if cached.exists():
        return read_json(cached)
    t0 = time.perf_counter()
    data = _dataset(name, seed)
    run = RunLayout(CACHE / f"{name}-s{seed}" / "run")
    cfg = _config(seed)
    stages = [s for s in credit_stages(cfg) if s.name != "evaluate"]
    Pipeline(stages).run(StageContext(data, run), cfg)
    result = _judge(data, run, cfg, seed)
    result["seconds"] = time.perf_counter() - t0
    write_json(cached, result)
    return result


def _judge(data: Path, run: RunLayout, cfg: PipelineConfig, seed: int) -> dict:
    art = GraphArtifacts.load(run)
    ds = load_dataset(data)
    all_idx = np.arange(art.n_users)
    test = np.flatnonzero(art.split_mask("test"))
    grid, true_all = truth_curves(ds.truth, all_idx)
    true = true_all[test]
    limit = art.users["treatment"].to_numpy(np.float64)
    y = art.users["outcome"].to_numpy()
    ids = art.users[art.id_column].to_numpy()
    t_now = float(art.users["t_days"].max())
    deployed = DeployedPolicy(
        cfg.policy.resolve(art.manifest.get("limits", {})), Calibration.load(run)
    )
    inf = Inference.load(run)
    full = inf.score_graph(art.raw, limit, art.struct, art.src, art.dst, art.weight, grid)
    _, sigma = inf.uncertainty(full["x"], grid)
    cal = deployed.calibrate(full["curve"])
    p_fact_cal = deployed.calibrate(full["p_factual"])
    towers = Inference.load(run, run.ablation("towers_no_graph")).score_graph(
        art.raw, limit, art.struct, art.src, art.dst, art.weight, grid, rows=test
    )
    curves = {"creditgraph": full["curve"][test], "towers_no_graph": towers["curve"]}
    train = art.split_mask("train") & np.isfinite(y)
    x = art.raw.astype(np.float64)
    for b in BASELINES:
        est = make_baseline(b).fit(x[train], limit[train], y[train])
        curves[b] = est.predict_curves(x[test], grid)
    mises = {k: float(mise(v, true, grid)) for k, v in curves.items()}
    mises["creditgraph_calibrated"] = float(mise(cal[test], true, grid))
    clusters = build_clusters(
        ds.links, ds.n_users, ds.spec.entities, t_now,
        history_days=deployed.config.clusters.history_days or ds.spec.history_days,
        min_size=deployed.config.clusters.min_size,
        split_above=deployed.config.clusters.split_above,
    )  # fmt: skip
    policies, points, ope = [], [], []
    first = inf.first(art.raw[test], limit[test], art.struct[test])
    log_f, _ = inf.log_density(art.raw[test], art.struct[test], first.h0, limit[test])
    for r in CEILINGS:
        stages = {
            "bare": bare_limits(full["curve"], grid, r)[test],
            "calibrated": bare_limits(cal, grid, r)[test],
            "guaranteed": bare_limits(deployed.bound(cal, sigma, r), grid, r)[test],
            "deployed": deployed.decide(
                cal, sigma, dsl_score=full["dsl"], r_max=r, cluster_id=clusters.cluster_id,
                current=limit, ids=ids, decision_time=t_now, grid=grid,
            ).limit[test],
        }  # fmt: skip
        for stage, lim in stages.items():
            m = judge_limits(lim, true, grid, r, margin=cfg.evaluate.margin, lgd=cfg.evaluate.lgd)
            policies.append({"method": "creditgraph", "policy": stage, "r_max": r, **m})
        g = deployed.guarantee(r)
        policies[-2]["lambda"] = g["lambda"]
        for name, c in curves.items():
            if name == "creditgraph":
                continue
            lim = bare_limits(c, grid, r)
            m = judge_limits(lim, true, grid, r, margin=cfg.evaluate.margin, lgd=cfg.evaluate.lgd)
            policies.append({"method": name, "policy": "bare", "r_max": r, **m})
        # off-policy evaluation of the deployed policy and of the bare calibrated rule at r
        for stage in ("deployed", "calibrated"):
            truth_rate = judge_limits(stages[stage], true, grid, r)["portfolio_default_rate"]
            for row in ope_report(
                stages[stage], cal[test], grid, limit[test], y[test], log_f, p_fact_cal[test],
                true_rate=truth_rate, margin=cfg.evaluate.margin, lgd=cfg.evaluate.lgd,
                random_state=seed,
            ):  # fmt: skip
                ope.append({"r_max": r, "policy": stage, **row})
    r = 0.10
    points += frontier("creditgraph", true, grid, r, curves=cal[test], logit_std=sigma[test])
    for name, c in curves.items():
        if name != "creditgraph":
            points += frontier(name, true, grid, r, curves=c)
    return {"mise": mises, "policies": policies, "frontier": points, "ope": ope}


def _fmt(values: list[float]) -> str:
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return "n/a"
    return f"{arr.mean():.4g}" + (f" ± {arr.std(ddof=1):.2g}" if arr.size > 1 else "")


def main() -> None:
    init_ray()
    CACHE.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {"sim": [], "semi-uci": []}
    for seed in SEEDS:
        results["sim"].append(_run_one("sim", seed))
        print(f"sim seed {seed} done")
    if UCI.exists():
        results["semi-uci"].append(_run_one("semi-uci", SEEDS[0]))
        print("semi-synthetic UCI done")
    body = [
        f"Simulated market: {USERS:,} users, seeds {SEEDS}; semi-synthetic: the UCI covariates "
        f"(30,000 real card holders, real limits), seed {SEEDS[0]}. Test users (20 %) against "
        "`truth.parquet`; mean ± sd over seeds. Over-ceiling rate: share of *granted* users whose "
        "true risk at their limit exceeds r_max (declined users are never violations); granted "
        "ratio: credit granted / the oracle's; limit satisfaction: mean min(L, L_oracle)/L_oracle.",
    ]
    for dname, runs in results.items():
        if not runs:
            continue
        body.append(f"\n### {dname}: MISE against the true curves\n")
        names = list(runs[0]["mise"])
        body.append(
            markdown_table(
                [{"model": n, "MISE": _fmt([r["mise"][n] for r in runs])} for n in names]
            )
        )
        best = min(names, key=lambda n: np.mean([r["mise"][n] for r in runs]))
        body.append(f"\nLowest MISE: **{best}**.")
        rows = []
        frame = pd.DataFrame([p for r in runs for p in r["policies"]])
        for (method, policy, rmax), grp in frame.groupby(["method", "policy", "r_max"], sort=False):
            row = {"r_max": rmax, "method": method, "policy": policy}
            for m in POLICY_METRICS:
                row[m] = _fmt(grp[m].tolist())
            rows.append(row)
        rows.sort(key=lambda r: (r["r_max"], r["method"] != "creditgraph"))
        body.append(f"\n### {dname}: decisions\n")
        body.append(markdown_table(rows))
        ok = frame[(frame.method == "creditgraph") & (frame.policy == "guaranteed")]
        body.append(
            "\nGuaranteed policy: portfolio default rate <= r_max in "
            f"{int((ok.portfolio_default_rate <= ok.r_max + 1e-12).sum())} of {len(ok)} "
            "(seed, r_max) cases; over-ceiling rate <= alpha (0.10) in "
            f"{int((ok.over_ceiling_rate <= 0.10).sum())} of {len(ok)}; limit satisfaction >= 0.6 in "
            f"{int((ok.limit_satisfaction >= 0.6).sum())} of {len(ok)}."
        )
    ope = pd.DataFrame([o for r in results["sim"] + results["semi-uci"] for o in r["ope"]])
    if len(ope):
        ope["err"] = ope["default_rate"] - ope["true_default_rate"]
        rows = []
        for method, grp in ope.groupby("method", sort=False):
            rows.append(
                {
                    "method": method,
                    "pairs": len(grp),
                    "bias": f"{grp['err'].mean():+.4f}",
                    "RMSE": f"{np.sqrt((grp['err'] ** 2).mean()):.4f}",
                    "95 % interval covers the truth": f"{grp['covers_truth'].mean():.2f}",
                }
            )
        body.append(
            "\n### Off-policy evaluation against the truth\n\n"
            f"{len(ope) // 4} (dataset, seed, r_max, policy) pairs: the deployed policy and the "
            "calibrated bare rule at each ceiling, estimated from the logged limits and outcomes of "
            "the test users with the ZILN density (goal: DR coverage >= 0.90).\n"
        )
        body.append(markdown_table(rows))
    pts = [p for r in results["sim"][:1] for p in r["frontier"]]
    if pts:
        pol = [p for p in results["sim"][0]["policies"] if p["r_max"] == 0.10]
        FIGURE.parent.mkdir(parents=True, exist_ok=True)
        plot_frontier(pts, [{"name": p["method"], **p} for p in pol], FIGURE, 0.10)
        body.append(
            f"\nFrontier at r_max = 0.10 (sim seed {SEEDS[0]}): "
            f"[{FIGURE.relative_to(ROOT)}]({FIGURE.relative_to(ROOT)})."
        )
    text = "\n".join(body)
    write_section(
        "Decisions: calibration, guarantee, deployed policy, OPE",
        text,
        "benchmarks/bench_decisions.py",
    )
    print(text)
    print(json.dumps({k: [r.get("seconds") for r in v] for k, v in results.items()}))


if __name__ == "__main__":
    main()
