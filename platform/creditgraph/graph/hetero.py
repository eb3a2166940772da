"""The heterograph of seed 000 as a PyG ``HeteroData``.

Node types: ``user`` and ``feature``. Edge types:

* ``(user, has, feature)``: every (user, feature) pair, ``edge_attr = [omega, z]`` (a missing value
  keeps its edge with omega = 0, z = 0);
* ``(user, shares, user)``: directed in time (``src -> dst``), ``edge_weight`` from shared entities;
* ``(feature, causes, feature)``: the feature DAG from causal pretraining (empty until then).

Feature nodes carry ``alpha`` (per-feature causal effect from DML; zeros until pretraining).
"""

from __future__ import annotations

import numpy as np
import torch
from torch_geometric.data import HeteroData

from creditgraph.graph.artifacts import GraphArtifacts

USER, FEATURE = "user", "feature"
HAS = (USER, "has", FEATURE)
SHARES = (USER, "shares", USER)
CAUSES = (FEATURE, "causes", FEATURE)


def to_heterodata(
    art: GraphArtifacts,
    alpha: np.ndarray | None = None,
    dag_edges: np.ndarray | None = None,
    materialize_user_feature_edges: bool = True,
) -> HeteroData:
    """Assemble the heterograph. ``dag_edges`` is ``int [2, E]`` (parent, child) feature indices.

    The dense ``z``/``omega`` matrices are always attached to the user store (the model's fast
    path); the explicit ``(user, has, feature)`` edges are materialised on request because they
    number ``n_users * n_features``.
    """
    n, f = art.z.shape
    data = HeteroData()
    data[USER].num_nodes = n
    data[USER].z = torch.from_numpy(art.z)
    data[USER].omega = torch.from_numpy(art.omega.astype(np.float32))
    data[USER].struct = torch.from_numpy(art.struct)
    data[USER].treatment = torch.from_numpy(art.users["treatment"].to_numpy(np.float32))
    data[USER].y = torch.from_numpy(art.users["outcome"].to_numpy(np.float32))
    data[USER].t_days = torch.from_numpy(art.users["t_days"].to_numpy(np.float64))
    data[FEATURE].num_nodes = f
    data[FEATURE].alpha = torch.from_numpy(
        np.zeros(f, np.float32) if alpha is None else np.asarray(alpha, np.float32)
    )
    data[FEATURE].names = list(art.feature_names)
    if materialize_user_feature_edges:
        users = torch.arange(n).repeat_interleave(f)
        feats = torch.arange(f).repeat(n)
        data[HAS].edge_index = torch.stack([users, feats])
        data[HAS].edge_attr = torch.stack(
            [data[USER].omega.reshape(-1), data[USER].z.reshape(-1)], dim=1
        )
    data[SHARES].edge_index = torch.from_numpy(np.stack([art.src, art.dst]).astype(np.int64))
    data[SHARES].edge_weight = torch.from_numpy(art.weight)
    dag = np.zeros((2, 0), np.int64) if dag_edges is None else np.asarray(dag_edges, np.int64)
    data[CAUSES].edge_index = torch.from_numpy(dag.reshape(2, -1))
    return data
