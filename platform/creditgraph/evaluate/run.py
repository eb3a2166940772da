"""``creditgraph evaluate``: trained models and baselines scored on held-out users, in one report.

Evaluation scores the models it is given (the pipeline trains the model and its ablations as their
own stages) next to the baselines a risk modeller would pick instead, on the test split:

* with ``truth.parquet`` (simulated data): MISE of the curves against the true curves, policy
  metrics of the decided limits against the oracle, and the predictive metrics;
* without it (real data): what can be measured without a truth — AUC, AP, Brier score, ECE and a
  reliability figure of the factual default prediction on held-out users, next to LightGBM on
  the same split, and the fitted curves of sample users (no truth lines).

Results and figures go to ``RUN/eval`` atomically.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from creditgraph.data.load import load_dataset
from creditgraph.evaluate import plots
from creditgraph.evaluate.baselines import make_baseline
from creditgraph.evaluate.config import EvaluateConfig
from creditgraph.evaluate.decisions import (
    POLICY_COLUMNS,
    bare_limits,
    deployed_decisions,
    frontier,
    ope_report,
    policy_rows,
)
from creditgraph.evaluate.metrics import classification_metrics, evaluate_curves, truth_curves
from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.layout import EvalFiles, ModelFiles, RunLayout, as_layout
from creditgraph.model.calibration import reliability_by_band
from creditgraph.model.infer import Inference
from creditgraph.policy.calibrate import Calibration
from creditgraph.policy.clusters import build_clusters
from creditgraph.policy.config import PolicyConfig
from creditgraph.policy.deploy import DeployedPolicy
from creditgraph.rules.estimator import ConstrainedRuleSet
from creditgraph.utils.io import atomic_dir, write_json
from creditgraph.utils.logs import get_logger
from creditgraph.utils.tables import markdown_table

log = get_logger(__name__)

FULL = "creditgraph"

#: Model variants of the ablation study: ModelConfig overrides and the row's kind. The pipeline
#: trains each named in ``evaluate.ablations`` as its own stage (``ablation:<name>``).
ABLATIONS: dict[str, tuple[dict, str]] = {
    "towers_no_graph": ({"use_graph": False}, "baseline"),
    "no_interference": ({"use_interference": False}, "ablation"),
    "no_ipw": ({"use_ipw": False}, "ablation"),
    "no_dsl": ({"use_dsl": False}, "ablation"),
    "no_alpha": ({"use_alpha": False}, "ablation"),
    "abs_alpha_dsl": ({"dsl_alpha": "abs"}, "ablation"),
    "no_alpha_dsl": ({"dsl_alpha": "none"}, "ablation"),
    "no_teacher_score": ({"use_teacher_score": False}, "ablation"),
    "no_balance": ({"balance_weight": 0.0}, "ablation"),
    "with_balance": ({"balance_weight": 0.05}, "ablation"),
}

HEADLINE = [
    "name",
    "kind",
    "mise",
    "mise_gang",
    "mise_ordinary",
    "violation_rate",
    "granted_ratio",
    "value_mean",
    "auc",
    "ap",
    "ece",
    "fit_seconds",
]
PREDICTIVE = ["name", "kind", "auc", "ap", "brier", "log_loss", "ece", "base_rate", "mean_pred"]


def model_curves(
    run: RunLayout, folder: ModelFiles, art: GraphArtifacts, grid: np.ndarray, rows: np.ndarray
) -> dict[str, np.ndarray]:
    """Curves on ``grid`` and factual predictions of ``rows`` of the run's graph, by one model
    (scored as batch scoring and serving score them: :class:`Inference`)."""
    inference = Inference.load(run, folder)
    return inference.score_graph(
        art.raw,
        art.users["treatment"].to_numpy(np.float64),
        art.struct,
        art.src,
        art.dst,
        art.weight,
        grid,
        rows=rows,
    )


def run_evaluation(
    run: RunLayout | str | Path,
    cfg: EvaluateConfig | None = None,
    models: Mapping[str, ModelFiles] | None = None,
    data_dir: str | Path | None = None,
    *,
    policy: PolicyConfig | None = None,
) -> dict:
    """Score ``models`` (default: the trained model) and the baselines on the test users, and
    measure the decisions of the model's deployed ``policy`` stage by stage.

    ``data_dir`` defaults to the dataset the graph was built from (its truth and segments).
    """
    cfg = cfg or EvaluateConfig()
    run = as_layout(run)
    models = dict(models or {FULL: run.model})
    art = GraphArtifacts.load(run)
    ds = load_dataset(data_dir or art.manifest["data_dir"])
    for name, folder in models.items():
        if not folder.exists():
            raise FileNotFoundError(f"no trained model {name!r} at {folder.dir}")
    deployed = DeployedPolicy(
        (policy or PolicyConfig()).resolve(art.manifest.get("limits", {})), Calibration.load(run)
    )
    test_idx = np.flatnonzero(art.split_mask("test"))
    has_truth = ds.truth is not None
    all_idx = np.arange(art.n_users)
    if has_truth:
        grid, true_all = truth_curves(ds.truth, all_idx)
        true = true_all[test_idx]
    else:
        grid, true, true_all = deployed.grid, None, None
        log.info("%s has no truth.parquet: predictive metrics and off-policy estimates", ds.root)
    segments = _segments(ds, art, test_idx)
    y = art.users["outcome"].to_numpy()[test_idx]
    limit = art.users["treatment"].to_numpy(np.float64)
    t_test = limit[test_idx]

    rows: list[dict] = []
    curves: dict[str, np.ndarray] = {}
    factual: dict[str, np.ndarray] = {}
    policy_table: list[dict] = []
    frontier_points: list[dict] = []

    def add(name: str, kind: str, c: np.ndarray, f: np.ndarray, seconds: float) -> None:
        if has_truth:
            row = evaluate_curves(
                c, true, grid, r_max=cfg.r_max, y=y, factual=f, segments=segments,
                contiguous=cfg.contiguous, margin=cfg.margin, lgd=cfg.lgd,
                n_bins=cfg.calibration_bins,
            )  # fmt: skip
            bare = bare_limits(c, grid, cfg.r_max)
            policy_table.extend(
                policy_rows(
                    name, {"bare": bare}, true, grid, cfg.r_max, margin=cfg.margin, lgd=cfg.lgd
                )
            )
            if kind == "baseline" and name != "constant":
                frontier_points.extend(frontier(name, true, grid, cfg.r_max, curves=c))
        else:
            row = classification_metrics(y, f, cfg.calibration_bins)
        rows.append({"name": name, "kind": kind, "fit_seconds": seconds, **row})
        curves[name], factual[name] = c, f
        log.info(
            "%-22s %s AUC %.3f",
            name,
            f"MISE {row['mise']:.5f} " if has_truth else "",
            row.get("auc", float("nan")),
        )

    full = None
    for name, folder in models.items():
        out = model_curves(run, folder, art, grid, all_idx if name == FULL else test_idx)
        kind = "model" if name == FULL else ABLATIONS.get(name, ({}, "model"))[1]
        if name == FULL:
            full = out
            add(name, kind, out["curve"][test_idx], out["p_factual"][test_idx], 0.0)
        else:
            add(name, kind, out["curve"], out["p_factual"], 0.0)

    decisions = _deployed_report(
        run, art, ds, deployed, full, grid, true_all, test_idx, cfg, policy_table, frontier_points
    )
    if deployed.calibration is not None:
        add(
            f"{FULL}_calibrated",
            "model",
            deployed.calibrate(full["curve"][test_idx]),
            deployed.calibrate(full["p_factual"][test_idx]),
            0.0,
        )

    train = art.split_mask("train") & np.isfinite(art.users["outcome"].to_numpy())
    x, yy = art.raw.astype(np.float64), art.users["outcome"].to_numpy()
    for name in cfg.baselines:
        t0 = time.perf_counter()
        est = make_baseline(name, **cfg.baseline_params.get(name, {})).fit(
            x[train], limit[train], yy[train]
        )
        seconds = time.perf_counter() - t0
        add(
            name,
            "baseline",
            est.predict_curves(x[test_idx], grid),
            est.predict_factual(x[test_idx], t_test),
            seconds,
        )

    columns = HEADLINE if has_truth else PREDICTIVE
    table = pd.DataFrame([{k: r.get(k) for k in columns} for r in rows])
    ptable = pd.DataFrame([{k: r.get(k) for k in POLICY_COLUMNS} for r in policy_table])
    with atomic_dir(run.eval.dir) as tmp_dir:
        tmp = EvalFiles(tmp_dir)
        write_json(
            tmp.metrics,
            {
                "r_max": cfg.r_max,
                "n_test": len(test_idx),
                "has_truth": has_truth,
                "grid": grid.tolist(),
                "rows": rows,
                "policies": policy_table,
                "frontier": frontier_points,
                **decisions,
            },
        )
        table.to_csv(tmp.dir / "headline.csv", index=False)
        text = markdown_table(table.to_dict("records")) + "\n"
        if len(ptable):
            text += "\n" + markdown_table(ptable.to_dict("records")) + "\n"
        (tmp.dir / "headline.md").write_text(text)
        write_json(tmp.manifest, {"version": 2, "has_truth": has_truth, "models": list(models)})
        _figures(tmp, cfg, grid, true, curves, factual, y, segments, rows, has_truth)
        if frontier_points:
            plots.plot_frontier(
                frontier_points, policy_table, tmp.figures / "frontier.png", cfg.r_max
            )
        if decisions.get("reliability"):
            plots.plot_reliability_bands(decisions["reliability"], tmp.figures / "reliability.png")
    log.info("evaluation written to %s", run.eval.dir)
    return {
        "rows": [{k: r.get(k) for k in columns} for r in rows],
        "policies": [{k: r.get(k) for k in POLICY_COLUMNS} for r in policy_table],
        "ope": decisions.get("ope", []),
        "guarantee": decisions.get("guarantee"),
        "eval_dir": str(run.eval.dir),
        "has_truth": has_truth,
    }


def _deployed_report(
    run: RunLayout,
    art: GraphArtifacts,
    ds,
    deployed: DeployedPolicy,
    full: dict,
    grid: np.ndarray,
    true_all: np.ndarray | None,
    test_idx: np.ndarray,
    cfg: EvaluateConfig,
    policy_table: list[dict],
    frontier_points: list[dict],
) -> dict:
    """The model's decisions stage by stage, the frontier, reliability and the OPE check."""
    inf = Inference.load(run)
    r = cfg.r_max
    limit = art.users["treatment"].to_numpy(np.float64)
    _, sigma = inf.uncertainty(full["x"], grid)
    cal = deployed.calibrate(full["curve"])
    p_fact_cal = deployed.calibrate(full["p_factual"])
    ids = art.users[art.id_column].to_numpy()
    t = float(art.users["t_days"].max())
    rule = None
    if run.rules.exists():
        hits = ConstrainedRuleSet.load(run.rules.dir).match(
            pd.DataFrame(art.raw.astype(np.float64), columns=art.feature_names)
        )
        rule = np.array([None if h is None or h != h or h == "" else str(h) for h in hits], object)
    clusters = build_clusters(
        ds.links,
        ds.n_users,
        ds.spec.entities,
        t,
        history_days=deployed.config.clusters.history_days or ds.spec.history_days,
        min_size=deployed.config.clusters.min_size,
        split_above=deployed.config.clusters.split_above,
    )
    frame = deployed_decisions(
        deployed, cal, sigma, grid, r, dsl=full["dsl"], rule=rule,
        cluster_id=clusters.cluster_id, current=limit, ids=ids, decision_time=t,
    )  # fmt: skip
    bound = deployed.bound(cal, sigma, r)
    stages = {
        "bare": bare_limits(full["curve"], grid, r),
        "calibrated": bare_limits(cal, grid, r),
        "guaranteed": bare_limits(bound, grid, r) if bound is not None else None,
        "deployed": frame["limit"].to_numpy(),
    }
    stages = {k: v[test_idx] for k, v in stages.items() if v is not None}
    y = art.users["outcome"].to_numpy()[test_idx]
    rel = {
        "before": _plain(reliability_by_band(full["p_factual"][test_idx], y, limit[test_idx])),
        "after": _plain(reliability_by_band(p_fact_cal[test_idx], y, limit[test_idx])),
    }
    out: dict = {
        "guarantee": deployed.guarantee(r),
        "reliability": rel,
        "deployed_summary": {
            "granted_share": float((stages["deployed"] > 0).mean()),
            "mean_limit": float(stages["deployed"].mean()),
            "binding_constraints": frame["binding_constraint"]
            .iloc[test_idx]
            .value_counts()
            .to_dict(),
            "explored": int(frame["explore_factor"].iloc[test_idx].notna().sum()),
        },
    }
    true_rate = None
    if true_all is not None:
        true = true_all[test_idx]
        rows = policy_rows(FULL, stages, true, grid, r, margin=cfg.margin, lgd=cfg.lgd)
        # the model's stages first; they replace the bare-rule row its curves already got
        policy_table[:] = rows + [
            p for p in policy_table if not (p["name"] == FULL and p["policy"] in stages)
        ]
        true_rate = next(x for x in rows if x["policy"] == "deployed")["portfolio_default_rate"]
        frontier_points.extend(
            frontier(FULL, true, grid, r, curves=cal[test_idx], logit_std=sigma[test_idx])
        )
        frontier_points.extend(
            frontier(f"{FULL} (bare)", true, grid, r, curves=full["curve"][test_idx])
        )
    first = inf.first(art.raw[test_idx], limit[test_idx], art.struct[test_idx])
    log_f, _ = inf.log_density(art.raw[test_idx], art.struct[test_idx], first.h0, limit[test_idx])
    out["ope"] = ope_report(
        stages["deployed"], cal[test_idx], grid, limit[test_idx], y, log_f,
        p_fact_cal[test_idx], true_rate=true_rate, margin=cfg.margin, lgd=cfg.lgd,
    )  # fmt: skip
    return out


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _segments(ds, art: GraphArtifacts, test_idx: np.ndarray) -> np.ndarray | None:
    if ds.segments is None:
        return None
    seg = ds.segments.set_index("user_id")["segment"]
    return seg.reindex(art.users[art.id_column].to_numpy()[test_idx]).fillna("unknown").to_numpy()


def _figures(
    tmp: EvalFiles,
    cfg: EvaluateConfig,
    grid: np.ndarray,
    true: np.ndarray | None,
    curves: dict[str, np.ndarray],
    factual: dict[str, np.ndarray],
    y: np.ndarray,
    segments: np.ndarray | None,
    rows: list[dict],
    has_truth: bool,
) -> None:
    figs = tmp.figures
    figs.mkdir()
    sample = plots.sample_users_by_segment(
        segments if segments is not None else np.full(len(y), "all"),
        k=cfg.curves_per_segment,
        seed=cfg.seed,
    )
    shown_names = (
        FULL,
        "lgbm_slearner",
        "lgbm_slearner_monotone",
        "econml_forest",
        "towers_no_graph",
    )
    shown = {k: v for k, v in curves.items() if k in shown_names}
    plots.plot_curves(grid, true, shown, sample, figs / "curves_by_segment.png", r_max=cfg.r_max)
    cal = {
        k: classification_metrics(y, factual[k], cfg.calibration_bins)["calibration"] for k in shown
    }
    plots.plot_calibration(cal, figs / "calibration.png")
    if has_truth:
        plots.plot_metric_bars(
            rows, "mise", figs / "mise.png", title="MISE against the true curves (lower is better)"
        )
        plots.plot_policy({r["name"]: r for r in rows}, figs / "policy.png", r_max=cfg.r_max)
    else:
        plots.plot_metric_bars(
            rows,
            "auc",
            figs / "auc.png",
            title="ROC AUC of the factual prediction (higher is better)",
        )
