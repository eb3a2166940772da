"""The on-disk form of a built heterograph (``RUN/graph``) and its loader.

Layout (all written atomically by :func:`creditgraph.graph.build.build_graph`)::

    RUN/graph/manifest.json       counts, dataset spec, config, input fingerprint, timings
    RUN/graph/users.parquet       node, <id>, as_of, t_days, treatment, outcome, split
    RUN/graph/features.npz        raw (float32, NaN = missing), z (float32), omega (uint8),
                                  struct (float32 entity-pair counts, names in the manifest)
    RUN/graph/feature_stats.json  per feature: name, transform, mean, std, missing_share
    RUN/graph/uu_edges.npz        src, dst (int64 node ids; information flows src -> dst),
                                  weight (float32), etypes (uint16 bitmask of entity types)
    RUN/graph/links.parquet       node, entity_type, entity_key (keyed hash), ts_days
    RUN/graph/salt.key            the secret that keys entity ids (0600)

Paths come from :class:`creditgraph.layout.GraphFiles`.

The user-feature edges of the heterograph are complete (every user x every feature), so they are
stored densely as ``z``/``omega`` and materialised as PyG edges only on request.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from creditgraph.layout import RunLayout, as_layout
from creditgraph.utils.io import read_json


@dataclass
class GraphArtifacts:
    """A built graph loaded into memory (numpy arrays; see module docstring)."""

    root: Path
    manifest: dict
    users: pd.DataFrame
    feature_stats: list[dict]
    raw: np.ndarray
    z: np.ndarray
    omega: np.ndarray
    struct: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    etypes: np.ndarray

    @property
    def feature_names(self) -> list[str]:
        return [s["name"] for s in self.feature_stats]

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def id_column(self) -> str:
        return self.manifest["dataset"]["id"]

    def split_mask(self, split: str) -> np.ndarray:
        return (self.users["split"] == split).to_numpy()

    @classmethod
    def load(cls, run: RunLayout | str | Path) -> GraphArtifacts:
        files = as_layout(run).graph
        if not files.exists():
            raise FileNotFoundError(f"no built graph at {files.dir}; run `creditgraph build` first")
        feats = np.load(files.features)
        edges = np.load(files.edges)
        return cls(
            root=files.dir,
            manifest=read_json(files.manifest),
            users=pd.read_parquet(files.users),
            feature_stats=read_json(files.feature_stats),
            raw=feats["raw"],
            z=feats["z"],
            omega=feats["omega"],
            struct=feats["struct"],
            src=edges["src"],
            dst=edges["dst"],
            weight=edges["weight"],
            etypes=edges["etypes"],
        )
