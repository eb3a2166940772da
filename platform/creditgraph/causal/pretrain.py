"""``creditgraph pretrain``: teacher soft labels, per-feature DML weights alpha_j, the feature DAG.

Reads the built graph (``RUN/graph``) and writes, atomically, ``RUN/pretrain``::

    manifest.json        version, config, graph version, timings, teacher OOF AUC, counts
    teacher.txt          the teacher's final LightGBM model (text format)
    teacher.json         the teacher's parameters
    soft_labels.parquet  node, soft_label, is_oof (one row per user, node order)
    leaves.npy           int32 [n_users, n_trees]: the teacher's leaf per tree (GBDT encoding)
    alpha.parquet        feature, alpha, stderr, ci_low, ci_high, scale, n_rows, seconds, status,
                         error (one row per feature, graph feature order)
    dag.json             {"nodes": [...], "edges": [[parent, child, delta], ...], "score": ...}

What sees which labels: the teacher and the DML are fitted on the labeled users of split
``train`` only. Those users' soft labels are out-of-fold (``is_oof``); every other user (val,
test, unlabeled) is scored by the final teacher, which never saw a val/test label. The DAG uses
the features of the train split (no labels).

Scales: the DML treatment of feature j is the graph's standardized value z_j (after the graph
stage's log1p of skewed features) with missing entries left missing, restandardized on the rows
used, so alpha_j is the change of the soft label (a default probability) per one standard
deviation of the model's input x_j, holding the other features fixed. The teacher sees the raw
features (trees are invariant to monotone transforms) with NaN kept native.

alpha_j is an effect on the teacher's prediction: a feature the teacher leans on by chance (noise
it overfitted) gets a small non-zero alpha_j with a tight interval. Early stopping and the
regularized defaults of ``TeacherConfig`` keep that small; more labeled users shrink it further.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from creditgraph.causal.config import PretrainConfig
from creditgraph.causal.dml import dml_ray, dml_sequential
from creditgraph.data.errors import DataValidationError
from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.layout import PretrainFiles, RunLayout, as_layout
from creditgraph.utils.io import atomic_dir, write_json
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

VERSION = 1


def _teacher_inputs(g: GraphArtifacts, include_treatment: bool) -> np.ndarray:
    X = np.asarray(g.raw, dtype=np.float32)
    if include_treatment:
        limit = np.log1p(g.users["treatment"].to_numpy(np.float64)).astype(np.float32)
        X = np.hstack([X, limit[:, None]])
    return X


def _masked_z(g: GraphArtifacts) -> np.ndarray:
    """The standardized features with missing entries as NaN again (omega = 0)."""
    return np.where(np.asarray(g.omega, dtype=bool), g.z, np.nan).astype(np.float32)


def run_pretrain(
    run: RunLayout | str | Path, config: PretrainConfig | None = None
) -> dict[str, Any]:
    """Fit the teacher, alpha_j and the DAG on a built graph and write ``RUN/pretrain``.

    With ``config.use_ray`` the DML runs as Ray tasks on the running Ray runtime. Returns a
    summary dict.
    """
    cfg = config or PretrainConfig()
    run = as_layout(run)
    g = GraphArtifacts.load(run)
    users = g.users
    outcome = users["outcome"].to_numpy(np.float64)
    train = g.split_mask("train")
    fit_rows = np.flatnonzero(train & np.isfinite(outcome))
    _check_labels(outcome[fit_rows])
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    tc = cfg.teacher
    Xt = _teacher_inputs(g, tc.include_treatment)
    teacher = tc.build().fit(Xt[fit_rows], outcome[fit_rows])
    soft = teacher.predict_risk(Xt)
    soft[fit_rows] = teacher.oof_proba_
    is_oof = np.zeros(g.n_users, dtype=bool)
    is_oof[fit_rows] = True
    leaves = teacher.leaves(Xt)
    timings["teacher"] = time.perf_counter() - t0
    log.info(
        "pretrain: teacher OOF AUC %.4f on %s labeled train users",
        teacher.oof_auc_,
        f"{len(fit_rows):,}",
    )

    t1 = time.perf_counter()
    Z = _masked_z(g)
    names = g.feature_names
    controls = Xt[fit_rows, -1:] if tc.include_treatment else None
    if cfg.use_ray:
        alpha = dml_ray(Z[fit_rows], soft[fit_rows], names, cfg.dml, controls, progress=True)
    else:
        alpha = dml_sequential(Z[fit_rows], soft[fit_rows], names, cfg.dml, controls, progress=True)
    timings["dml"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    dag = cfg.dag.build().fit(Z[train], names)
    timings["dag"] = time.perf_counter() - t2

    ok = alpha[alpha["status"] == "ok"]
    top = ok.reindex(ok["alpha"].abs().sort_values(ascending=False).index).head(10)
    summary = {
        "run": str(run.root),
        "teacher_oof_auc": teacher.oof_auc_,
        "n_fit_users": len(fit_rows),
        "n_features": len(names),
        "dml_failed": alpha.loc[alpha["status"] != "ok", "feature"].tolist(),
        "top_alpha": [
            {"feature": r.feature, "alpha": r.alpha, "ci_low": r.ci_low, "ci_high": r.ci_high}
            for r in top.itertuples()
        ],
        "dag_edges": len(dag.edges_),
        "n_trees": teacher.n_trees_,
        "timings_s": timings,
    }
    manifest = {
        "version": VERSION,
        "graph_fingerprint": g.manifest.get("fingerprint"),
        "config": cfg.model_dump(),
        "feature_names": names,
        "teacher_oof_auc": teacher.oof_auc_,
        "teacher_fold_counts": np.bincount(teacher.fold_).tolist(),
        "dag_score": dag.score_,
        "dag_iterations": dag.n_iter_,
        "summary": summary,
    }
    with atomic_dir(run.pretrain.dir) as tmp_dir:
        tmp = PretrainFiles(tmp_dir)
        teacher.save(tmp.teacher, tmp.teacher_params)
        pd.DataFrame(
            {"node": users["node"].to_numpy(np.int64), "soft_label": soft, "is_oof": is_oof}
        ).to_parquet(tmp.soft_labels, index=False)
        np.save(tmp.leaves, leaves)
        alpha.to_parquet(tmp.alpha, index=False)
        write_json(
            tmp.dag,
            {
                "nodes": names,
                "edges": [[p, c, delta] for p, c, delta in dag.named_edges()],
                "score": dag.score_,
            },
        )
        timings["total"] = time.perf_counter() - t0
        write_json(tmp.manifest, manifest)
    log.info(
        "pretrain: %d features (%d failed), %d DAG edges in %.1fs",
        len(names),
        len(summary["dml_failed"]),
        len(dag.edges_),
        timings["total"],
    )
    return summary


def _check_labels(y: np.ndarray) -> None:
    if len(y) == 0 or len(np.unique(y)) < 2:
        raise DataValidationError(
            "graph/users.parquet",
            "outcome",
            "the teacher needs labeled train users of both classes (0 and 1)",
            count=len(y),
        )
