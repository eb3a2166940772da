"""Evaluating the order-risk network on a later period, next to the tabular models a team would
deploy instead (seed 001, §2.3 and §3.5).

Test orders are those of the last ``test_days`` of the data (``RUN/events``, split ``test``):
every model was trained on earlier orders with the labels known at the training cut-off. Each
row of the report is one model scored on the same test orders:

* ``gnn`` (and its ablations ``gnn:<name>``): the trained networks;
* ``lightgbm``: LightGBM on the same raw order features, trained on every labeled training order
  (early stopping on the validation period);
* ``gbdt+lr``: the leaf encoder's GBDT, its leaves one-hot encoded into a logistic regression
  trained on the network's training orders (Facebook's GBDT+LR: the network's input without the
  graph);
* ``truth`` (simulated data only): the true fraud probability, the ceiling any model can reach.

Metrics: average precision (AP), ROC AUC, and recall at fixed alert rates (the share of test
orders a risk team would review). Segment recalls (simulated data) show where the graph helps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score

from creditgraph.causal.leaves import LeafEncoder, network_train_codes
from creditgraph.graph.events import (
    SPLIT_EARLY,
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VAL,
    load_orders_table,
)
from creditgraph.layout import ModelFiles, RunLayout, as_layout
from creditgraph.model.orders import OrderEvalConfig, infer_run, load_order_model
from creditgraph.utils.io import atomic_dir, read_json, write_json
from creditgraph.utils.logs import get_logger
from creditgraph.utils.tables import markdown_table

log = get_logger(__name__)


def recall_at_alert_rate(y: np.ndarray, score: np.ndarray, rate: float) -> float:
    """Share of the frauds among the ``ceil(rate * n)`` highest-scored orders (ties broken by
    order, so the alert budget is exact)."""
    y = np.asarray(y, dtype=np.float64)
    if y.sum() == 0:
        return float("nan")
    k = max(1, int(np.ceil(rate * len(y))))
    top = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")[:k]
    return float(y[top].sum() / y.sum())


def order_metrics(y: np.ndarray, score: np.ndarray, alert_rates: list[float]) -> dict[str, float]:
    """AP, ROC AUC and recall at each alert rate on the labeled rows of ``y`` (NaN = unlabeled)."""
    y = np.asarray(y, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    ok = np.isfinite(y)
    if not np.isfinite(score[ok]).all():
        raise ValueError("scores must be finite for every labeled order")
    y, score = y[ok], score[ok]
    both = 0 < y.sum() < len(y)
    out = {
        "n": len(y),
        "positives": int(y.sum()),
        "ap": float(average_precision_score(y, score)) if both else float("nan"),
        "auc": float(roc_auc_score(y, score)) if both else float("nan"),
    }
    for r in alert_rates:
        out[f"recall@{r:g}"] = recall_at_alert_rate(y, score, r)
    return out


def lightgbm_baseline(
    X: np.ndarray,
    y: np.ndarray,
    train: np.ndarray,
    val: np.ndarray,
    *,
    trees: int = 500,
    seed: int = 0,
    n_jobs: int = 2,
) -> lgb.LGBMClassifier:
    """LightGBM on raw features (NaN = missing), early-stopped on the validation rows."""
    model = lgb.LGBMClassifier(
        n_estimators=trees,
        learning_rate=0.05,
        num_leaves=31,
        min_child_samples=50,
        subsample=0.8,
        subsample_freq=1,
        colsample_bytree=0.8,
        reg_lambda=1.0,
        random_state=seed,
        n_jobs=n_jobs,
        deterministic=True,
        verbose=-1,
    )
    model.fit(
        X[train],
        y[train],
        eval_set=[(X[val], y[val])],
        callbacks=[lgb.early_stopping(50, verbose=False)],
    )
    return model


def one_hot_leaves(leaves: np.ndarray, fold: np.ndarray, num_leaves: int) -> sp.csr_matrix:
    """Leaves as a sparse one-hot matrix over (model, tree, leaf) codes."""
    n, t = leaves.shape
    n_models = int(fold.max()) + 1 if len(fold) else 1
    cols = (
        leaves.astype(np.int64)
        + np.arange(t) * num_leaves
        + (fold.astype(np.int64) * t * num_leaves)[:, None]
    )
    data = np.ones(n * t, dtype=np.float32)
    rows = np.repeat(np.arange(n), t)
    return sp.csr_matrix((data, (rows, cols.ravel())), shape=(n, n_models * t * num_leaves))


def gbdt_lr_baseline(
    onehot: sp.csr_matrix, y: np.ndarray, train: np.ndarray, seed: int = 0
) -> LogisticRegression:
    """Logistic regression on one-hot GBDT leaves (L2, scikit-learn defaults otherwise)."""
    return LogisticRegression(C=0.1, max_iter=2000, random_state=seed).fit(onehot[train], y[train])


def run_order_evaluation(
    run: RunLayout | str | Path,
    cfg: OrderEvalConfig | None = None,
    models: dict[str, ModelFiles] | None = None,
) -> dict[str, Any]:
    """Score the test period with every model and the baselines; write ``RUN/eval``."""
    cfg = cfg or OrderEvalConfig()
    run = as_layout(run)
    models = models if models is not None else {"gnn": run.model}
    t0 = time.perf_counter()
    orders = load_orders_table(run)
    split = orders["split"].to_numpy()
    test = split == SPLIT_TEST
    y_eval = orders["y_eval"].to_numpy(np.float64)
    y_train = orders["y_train"].to_numpy(np.float64)
    scores: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    versions: dict[str, str] = {}
    for name, files in models.items():
        model, meta = load_order_model(files)
        logit, _ = infer_run(model, run)
        scores[name] = logit[test]
        kinds[name] = "graph network"
        versions[name] = meta["version"]
    timings = {"networks": time.perf_counter() - t0}
    if cfg.baselines:
        t1 = time.perf_counter()
        X = np.load(run.events.dir / "features.npy")
        labeled = np.isfinite(y_train)
        tr = np.flatnonzero(labeled & np.isin(split, (SPLIT_EARLY, SPLIT_TRAIN)))
        va = np.flatnonzero(labeled & (split == SPLIT_VAL))
        lgbm = lightgbm_baseline(X, y_train, tr, va, trees=cfg.lightgbm_trees, seed=cfg.seed)
        scores["lightgbm"] = lgbm.predict_proba(X[test])[:, 1]
        kinds["lightgbm"] = "tabular (raw features)"
        leaf_meta = read_json(run.leaves.manifest)
        leaves, fold = np.load(run.leaves.leaves), np.load(run.leaves.folds)
        onehot = one_hot_leaves(leaves, fold, leaf_meta["num_leaves"])
        codes = network_train_codes(leaf_meta["mode"])
        lr_rows = np.flatnonzero(labeled & np.isin(split, codes))
        lr = gbdt_lr_baseline(onehot, y_train, lr_rows, seed=cfg.seed)
        scores["gbdt+lr"] = lr.predict_proba(onehot[np.flatnonzero(test)])[:, 1]
        kinds["gbdt+lr"] = "tabular (GBDT leaves)"
        enc = LeafEncoder.load(run.leaves.dir)
        scores["gbdt (leaf encoder)"] = enc.predict_proba(X[test], fold[test])[:, 1]
        kinds["gbdt (leaf encoder)"] = "tabular (earlier period)"
        timings["baselines"] = time.perf_counter() - t1
    p_true = orders["p_true"].to_numpy()[test]
    if np.isfinite(p_true).all():
        scores["truth"] = p_true
        kinds["truth"] = "oracle (simulated p_fraud)"

    y = y_eval[test]
    rows = [
        {"name": name, "kind": kinds[name], **order_metrics(y, s, cfg.alert_rates)}
        for name, s in scores.items()
    ]
    segments: dict[str, dict[str, float]] = {}
    head = cfg.alert_rates[len(cfg.alert_rates) // 2]
    if "segment" in orders.columns:
        seg = orders["segment"].to_numpy()[test]
        for name, s in scores.items():
            k = max(1, int(np.ceil(head * np.isfinite(y).sum())))
            ok = np.isfinite(y)
            top = np.zeros(len(y), bool)
            top[np.flatnonzero(ok)[np.argsort(-s[ok], kind="stable")[:k]]] = True
            segments[name] = {
                str(g): float((top & (seg == g) & (y == 1)).sum() / max(((seg == g) & (y == 1)).sum(), 1))
                for g in sorted(set(seg)) if g and ((seg == g) & (y == 1)).any()
            }  # fmt: skip
    by_name = {r["name"]: r for r in rows}
    gain = None
    if "gnn" in by_name and "lightgbm" in by_name:
        gain = by_name["gnn"]["ap"] / by_name["lightgbm"]["ap"] - 1.0
    events = read_json(run.events.manifest)
    metrics = {
        "n_test": int(test.sum()),
        "test_labeled": int(np.isfinite(y).sum()),
        "test_positives": int(np.nansum(y)),
        "alert_rates": cfg.alert_rates,
        "headline_alert_rate": head,
        "rows": rows,
        "segment_recall": segments,
        "ap_gain_vs_lightgbm": gain,
        "split": events["split"],
        "model_versions": versions,
        "timings_s": {**timings, "total": time.perf_counter() - t0},
    }
    with atomic_dir(run.eval.dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        cols = ["name", "kind", "ap", "auc", *[f"recall@{r:g}" for r in cfg.alert_rates]]
        table = markdown_table([{k: r[k] for k in cols} for r in rows], cols)
        (tmp / "headline.md").write_text(headline_text(metrics, table))
        frame = pd.DataFrame({"order_id": orders["order_id"].to_numpy()[test], "y_eval": y})
        for name, s in scores.items():
            frame[name] = s
        frame.to_parquet(tmp / "test_scores.parquet", index=False)
        write_json(tmp / "manifest.json", {"config": cfg.model_dump(), "rows": len(rows)})
    log.info("order evaluation: %s", {r["name"]: round(r["ap"], 4) for r in rows})
    return {
        "ap": {r["name"]: r["ap"] for r in rows},
        "auc": {r["name"]: r["auc"] for r in rows},
        "ap_gain_vs_lightgbm": gain,
        "n_test": metrics["n_test"],
    }


def headline_text(metrics: dict, table: str) -> str:
    """The evaluation as a short markdown report."""
    s = metrics["split"]
    gain = metrics["ap_gain_vs_lightgbm"]
    lines = [
        "# Order risk: evaluation on the later period",
        "",
        f"Test orders: days {s['test_start_day']:.0f}-{s['span_days']:.0f} of the data "
        f"({metrics['n_test']:,} orders, {metrics['test_positives']:,} frauds; labels: "
        f"{s['eval_label_source']}). Training cut-off: {s['cutoff_mode']} (day "
        f"{s['cutoff_day']:.0f}; {'strict' if s['strict'] else 'not strict'}), labels matured "
        f"{s['mature_days']} days.",
        "",
        table,
        "",
    ]
    if gain is not None:
        lines.append(f"GNN vs LightGBM in AP: {gain:+.1%}.")
    return "\n".join(lines) + "\n"
