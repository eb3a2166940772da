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
from creditgraph.evaluate.metrics import classification_metrics, evaluate_curves, truth_curves
from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.layout import EvalFiles, ModelFiles, RunLayout, as_layout
from creditgraph.model.infer import Inference
from creditgraph.policy.config import data_grid
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
) -> dict:
    """Score ``models`` (default: the trained model) and the baselines on the test users.

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
    test_idx = np.flatnonzero(art.split_mask("test"))
    has_truth = ds.truth is not None
    if has_truth:
        grid, true = truth_curves(ds.truth, test_idx)
    else:
        train = art.split_mask("train")
        grid, true = data_grid(art.users["treatment"].to_numpy()[train]).values(), None
        log.info("%s has no truth.parquet: predictive metrics only", ds.root)
    segments = _segments(ds, art, test_idx)
    y = art.users["outcome"].to_numpy()[test_idx]
    t_test = art.users["treatment"].to_numpy()[test_idx]

    rows: list[dict] = []
    curves: dict[str, np.ndarray] = {}
    factual: dict[str, np.ndarray] = {}

    def add(name: str, kind: str, c: np.ndarray, f: np.ndarray, seconds: float) -> None:
        if has_truth:
            row = evaluate_curves(
                c, true, grid, r_max=cfg.r_max, y=y, factual=f, segments=segments,
                contiguous=cfg.contiguous, margin=cfg.margin, lgd=cfg.lgd,
                n_bins=cfg.calibration_bins,
            )  # fmt: skip
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

    for name, folder in models.items():
        out = model_curves(run, folder, art, grid, test_idx)
        kind = "model" if name == FULL else ABLATIONS.get(name, ({}, "model"))[1]
        add(name, kind, out["curve"], out["p_factual"], 0.0)

    train = art.split_mask("train") & np.isfinite(art.users["outcome"].to_numpy())
    x, t, yy = (
        art.raw.astype(np.float64),
        art.users["treatment"].to_numpy(),
        art.users["outcome"].to_numpy(),
    )
    for name in cfg.baselines:
        t0 = time.perf_counter()
        est = make_baseline(name, **cfg.baseline_params.get(name, {})).fit(
            x[train], t[train], yy[train]
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
            },
        )
        table.to_csv(tmp.dir / "headline.csv", index=False)
        (tmp.dir / "headline.md").write_text(markdown_table(table.to_dict("records")) + "\n")
        write_json(tmp.manifest, {"version": 1, "has_truth": has_truth, "models": list(models)})
        _figures(tmp, cfg, grid, true, curves, factual, y, segments, rows, has_truth)
    log.info("evaluation written to %s", run.eval.dir)
    return {
        "rows": [{k: r.get(k) for k in columns} for r in rows],
        "eval_dir": str(run.eval.dir),
        "has_truth": has_truth,
    }


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
