"""``creditgraph evaluate``: the trained model, its ablations and the baselines, scored on held-out
users against the true curves, in one run; results and figures in ``RUN/eval``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from creditgraph.config import PipelineConfig
from creditgraph.data.load import load_dataset
from creditgraph.evaluate.baselines import make_baseline
from creditgraph.evaluate.metrics import classification_metrics, evaluate_curves, truth_curves
from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.graph.partition import shard_paths
from creditgraph.utils.io import atomic_dir, write_json
from creditgraph.utils.logs import get_logger
from creditgraph.utils.tables import markdown_table

log = get_logger(__name__)

EVAL_DIR = "eval"
FULL = "creditgraph"

#: Model variants of the ablation study: ModelConfig overrides and the row's kind.
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


def _model_curves(
    run_dir: Path, folder: Path, grid: np.ndarray, keep: np.ndarray
) -> dict[str, np.ndarray]:
    from creditgraph.causal.pretrain import PretrainArtifacts
    from creditgraph.model.artifact import load_model
    from creditgraph.model.predict import Predictor, predict_shards
    from creditgraph.train.trainer import model_extras

    model, _ = load_model(folder)
    try:
        pre = PretrainArtifacts.load(run_dir)
    except FileNotFoundError:
        pre = None
    return predict_shards(
        Predictor(model, grid, mc_samples=1), shard_paths(run_dir), keep, **model_extras(model, pre)
    )


def run_evaluation(run_dir: str | Path, cfg: PipelineConfig | None = None) -> dict:
    """Score the model, its ablations and the baselines on the test users; write ``RUN/eval``."""
    from creditgraph.evaluate import plots
    from creditgraph.train.trainer import MODEL_DIR, run_training

    cfg = cfg or PipelineConfig()
    ev = cfg.evaluate
    run_dir = Path(run_dir).resolve()
    art = GraphArtifacts.load(run_dir)
    ds = load_dataset(art.manifest["data_dir"])
    if ds.truth is None:
        raise FileNotFoundError(
            f"{art.manifest['data_dir']} has no truth.parquet: nothing to evaluate against"
        )
    test_idx = np.flatnonzero(art.split_mask("test"))
    keep = np.zeros(art.n_users, dtype=bool)
    keep[test_idx] = True
    grid, true = truth_curves(ds.truth, test_idx)
    segments = None
    if ds.segments is not None:
        seg = ds.segments.set_index("user_id")["segment"]
        segments = (
            seg.reindex(art.users[art.id_column].to_numpy()[test_idx]).fillna("unknown").to_numpy()
        )
    y = art.users["outcome"].to_numpy()[test_idx]
    t_test = art.users["treatment"].to_numpy()[test_idx]

    rows: list[dict] = []
    curves: dict[str, np.ndarray] = {}
    factual: dict[str, np.ndarray] = {}

    def add(name: str, kind: str, c: np.ndarray, f: np.ndarray, seconds: float) -> None:
        row = evaluate_curves(
            c, true, grid, r_max=ev.r_max, y=y, factual=f, segments=segments,
            contiguous=ev.contiguous, margin=ev.margin, lgd=ev.lgd, n_bins=ev.calibration_bins,
        )  # fmt: skip
        rows.append({"name": name, "kind": kind, "fit_seconds": seconds, **row})
        curves[name], factual[name] = c, f
        log.info(
            "%-18s MISE %.5f  violations %.3f  AUC %.3f",
            name,
            row["mise"],
            row["violation_rate"],
            row.get("auc", float("nan")),
        )

    variants = [(FULL, "model", run_dir / MODEL_DIR, None)]
    for name in ev.ablations:
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation {name!r}; choose from {sorted(ABLATIONS)}")
        overrides, kind = ABLATIONS[name]
        variants.append((name, kind, run_dir / "ablations" / name, overrides))
    for name, kind, folder, overrides in variants:
        seconds = 0.0
        if overrides is not None:
            mcfg = cfg.model.model_copy(update=overrides)
            summary = run_training(
                run_dir, mcfg, cfg.train, out_name=f"ablations/{name}", reuse=True
            )
            seconds = summary["seconds"]
        elif not (folder / "model.json").exists():
            raise FileNotFoundError(f"no trained model at {folder}; run `creditgraph train` first")
        out = _model_curves(run_dir, folder, grid, keep)
        if not np.array_equal(out["node"], test_idx):
            raise AssertionError("prediction did not cover every test user exactly once")
        add(name, kind, out["curve"], out["p_factual"], seconds)

    train = art.split_mask("train") & np.isfinite(art.users["outcome"].to_numpy())
    x, t, yy = (
        art.raw.astype(np.float64),
        art.users["treatment"].to_numpy(),
        art.users["outcome"].to_numpy(),
    )
    for name in ev.baselines:
        t0 = time.perf_counter()
        est = make_baseline(name, **ev.baseline_params.get(name, {})).fit(
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

    table = pd.DataFrame([{k: r.get(k) for k in HEADLINE} for r in rows])
    with atomic_dir(run_dir / EVAL_DIR) as tmp:
        write_json(tmp / "metrics.json", {"r_max": ev.r_max, "n_test": len(test_idx), "rows": rows})
        table.to_csv(tmp / "headline.csv", index=False)
        (tmp / "headline.md").write_text(markdown_table(table.to_dict("records")) + "\n")
        figs = tmp / "figures"
        figs.mkdir()
        sample = plots.sample_users_by_segment(
            segments if segments is not None else np.full(len(test_idx), "all"),
            k=ev.curves_per_segment,
            seed=ev.seed,
        )
        shown = {
            k: v
            for k, v in curves.items()
            if k in (FULL, "lgbm_slearner", "econml_forest", "towers_no_graph")
        }
        plots.plot_curves(grid, true, shown, sample, figs / "curves_by_segment.png", r_max=ev.r_max)
        cal = {
            k: classification_metrics(y, factual[k], ev.calibration_bins)["calibration"]
            for k in shown
        }
        plots.plot_calibration(cal, figs / "calibration.png")
        plots.plot_metric_bars(
            rows, "mise", figs / "mise.png", title="MISE against the true curves (lower is better)"
        )
        plots.plot_policy({r["name"]: r for r in rows}, figs / "policy.png", r_max=ev.r_max)
    log.info("evaluation written to %s", run_dir / EVAL_DIR)
    return {
        "rows": [{k: r.get(k) for k in HEADLINE} for r in rows],
        "eval_dir": str(run_dir / EVAL_DIR),
    }
