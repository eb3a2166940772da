"""``RUN/pretrain`` loaded for the later stages: teacher, soft labels, leaves, alpha_j, the DAG.

The loader lives apart from the stage that writes it (``causal/pretrain.py``) so that scoring,
which only reads it, does not import the DML machinery (econml).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from creditgraph.causal.teacher import Teacher
from creditgraph.layout import PretrainFiles, RunLayout, as_layout
from creditgraph.utils.io import read_json


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
        """The final teacher model (predict_risk / leaves)."""
        files = PretrainFiles(self.root)
        return Teacher.load(files.teacher, files.teacher_params)

    @classmethod
    def load(cls, run: RunLayout | str | Path) -> PretrainArtifacts:
        files = as_layout(run).pretrain
        if not files.exists():
            raise FileNotFoundError(
                f"no pretrain output at {files.dir}; run `creditgraph pretrain` first"
            )
        manifest = read_json(files.manifest)
        names = list(manifest["feature_names"])
        table = pd.read_parquet(files.alpha)
        table = table.set_index("feature").loc[names].reset_index()
        dag = read_json(files.dag)
        index = {n: i for i, n in enumerate(names)}
        edges = dag["edges"]
        soft = pd.read_parquet(files.soft_labels).sort_values("node")
        return cls(
            root=files.dir,
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
            leaves=np.load(files.leaves),
        )
