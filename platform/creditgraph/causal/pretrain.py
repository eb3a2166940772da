"""``creditgraph pretrain``: teacher soft labels, per-feature DML weights alpha_j, the feature DAG.

Reads the built graph (``RUN/graph``) and writes, atomically, ``RUN/pretrain``::

    manifest.json        version, config, input fingerprint, timings, teacher OOF AUC, counts
    teacher.txt          the teacher's final LightGBM model (text format)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from creditgraph.causal.config import PretrainConfig
from creditgraph.causal.dag import HillClimbDAG
from creditgraph.causal.dml import dml_ray, dml_sequential
from creditgraph.causal.teacher import Teacher
from creditgraph.data.errors import DataValidationError
from creditgraph.graph.artifacts import PRETRAIN_DIR, GraphArtifacts
from creditgraph.utils.io import atomic_dir, fingerprint, read_json, write_json
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


def _stage_fingerprint(g: GraphArtifacts, cfg: PretrainConfig) -> str:
    graph_fp = g.manifest.get("fingerprint") or fingerprint(g.manifest)
    # use_ray changes where the work runs, not the numbers
    return fingerprint(VERSION, graph_fp, cfg.model_dump(exclude={"use_ray"}))


def run_pretrain(
    run_dir: str | Path,
    config: PretrainConfig | None = None,
    reuse: bool = False,
    address: str | None = None,
) -> dict[str, Any]:
    """Fit the teacher, alpha_j and the DAG on a built graph and write ``RUN/pretrain``.

    With ``reuse``, an existing output whose fingerprint (graph input + config) matches is kept
    and its summary returned. With ``config.use_ray`` the DML runs as Ray tasks on the running
    Ray runtime, or on ``address`` / a new local one if none is running. Returns a summary dict.
    """
    cfg = config or PretrainConfig()
    run_dir = Path(run_dir)
    g = GraphArtifacts.load(run_dir)
    out = run_dir / PRETRAIN_DIR
    fp = _stage_fingerprint(g, cfg)
    if reuse and (out / "manifest.json").exists():
        old = read_json(out / "manifest.json")
        if old.get("fingerprint") == fp:
            log.info("pretrain: reusing %s (same input and config)", out)
            return {**old["summary"], "reused": True}

    users = g.users
    outcome = users["outcome"].to_numpy(np.float64)
    train = g.split_mask("train")
    fit_rows = np.flatnonzero(train & np.isfinite(outcome))
    _check_labels(outcome[fit_rows])
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    tc = cfg.teacher
    Xt = _teacher_inputs(g, tc.include_treatment)
    teacher = Teacher(tc.n_folds, tc.params, tc.n_jobs, tc.early_stopping, tc.seed).fit(
        Xt[fit_rows], outcome[fit_rows]
    )
    soft = teacher.predict_proba(Xt)
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
        from creditgraph.utils.runtime import init_ray

        init_ray(address)
        alpha = dml_ray(Z[fit_rows], soft[fit_rows], names, cfg.dml, controls, progress=True)
    else:
        alpha = dml_sequential(Z[fit_rows], soft[fit_rows], names, cfg.dml, controls, progress=True)
    timings["dml"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    dc = cfg.dag
    dag = HillClimbDAG(
        score="gaussian",
        max_parents=dc.max_parents,
        tabu_length=dc.tabu_length,
        max_iter=dc.max_iter,
        penalty=dc.penalty,
        epsilon=dc.epsilon,
        restarts=dc.restarts,
        perturb_moves=dc.perturb_moves,
        max_rows=dc.max_rows,
        seed=dc.seed,
    ).fit(Z[train], names)
    timings["dag"] = time.perf_counter() - t2

    ok = alpha[alpha["status"] == "ok"]
    top = ok.reindex(ok["alpha"].abs().sort_values(ascending=False).index).head(10)
    summary = {
        "run": str(run_dir),
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
        "fingerprint": fp,
        "graph_fingerprint": g.manifest.get("fingerprint"),
        "config": cfg.model_dump(),
        "feature_names": names,
        "teacher_oof_auc": teacher.oof_auc_,
        "teacher_fold_counts": np.bincount(teacher.fold_).tolist(),
        "dag_score": dag.score_,
        "dag_iterations": dag.n_iter_,
        "summary": summary,
    }
    with atomic_dir(out) as tmp:
        teacher.save(tmp / "teacher.txt")
        pd.DataFrame(
            {"node": users["node"].to_numpy(np.int64), "soft_label": soft, "is_oof": is_oof}
        ).to_parquet(tmp / "soft_labels.parquet", index=False)
        np.save(tmp / "leaves.npy", leaves)
        alpha.to_parquet(tmp / "alpha.parquet", index=False)
        write_json(
            tmp / "dag.json",
            {
                "nodes": names,
                "edges": [[p, c, delta] for p, c, delta in dag.named_edges()],
                "score": dag.score_,
            },
        )
        timings["total"] = time.perf_counter() - t0
        write_json(tmp / "manifest.json", manifest)
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


@dataclass
class PretrainArtifacts:
    """``RUN/pretrain`` loaded for the model stage (arrays in graph node / feature order)."""

    root: Path
    manifest: dict
    feature_names: list[str]
    alpha_table: pd.DataFrame
    alpha: np.ndarray  # float32 [n_features]; NaN where the DML failed
    alpha_stderr: np.ndarray  # float32 [n_features]
    dag_src: np.ndarray  # int64 [n_edges] parent feature index
    dag_dst: np.ndarray  # int64 [n_edges] child feature index
    dag_delta: np.ndarray  # float32 [n_edges] BIC lost by removing the edge
    soft_label: np.ndarray  # float32 [n_users]
    is_oof: np.ndarray  # bool [n_users]
    leaves: np.ndarray  # int32 [n_users, n_trees]

    @property
    def alpha_filled(self) -> np.ndarray:
        """alpha with failed features set to 0 (no causal weight)."""
        return np.nan_to_num(self.alpha, nan=0.0)

    def teacher(self) -> Teacher:
        """The final teacher model (predict_proba / leaves)."""
        return Teacher.load(self.root / "teacher.txt")

    @classmethod
    def load(cls, run_dir: str | Path) -> PretrainArtifacts:
        root = Path(run_dir) / PRETRAIN_DIR
        if not (root / "manifest.json").exists():
            raise FileNotFoundError(
                f"no pretrain output at {root}; run `creditgraph pretrain` first"
            )
        manifest = read_json(root / "manifest.json")
        names = list(manifest["feature_names"])
        table = pd.read_parquet(root / "alpha.parquet")
        table = table.set_index("feature").loc[names].reset_index()
        dag = read_json(root / "dag.json")
        index = {n: i for i, n in enumerate(names)}
        edges = dag["edges"]
        soft = pd.read_parquet(root / "soft_labels.parquet").sort_values("node")
        return cls(
            root=root,
            manifest=manifest,
            feature_names=names,
            alpha_table=table,
            alpha=table["alpha"].to_numpy(np.float32),
            alpha_stderr=table["stderr"].to_numpy(np.float32),
            dag_src=np.array([index[e[0]] for e in edges], dtype=np.int64),
            dag_dst=np.array([index[e[1]] for e in edges], dtype=np.int64),
            dag_delta=np.array([e[2] for e in edges], dtype=np.float32),
            soft_label=soft["soft_label"].to_numpy(np.float32),
            is_oof=soft["is_oof"].to_numpy(bool),
            leaves=np.load(root / "leaves.npy"),
        )
