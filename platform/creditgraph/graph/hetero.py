"""The graph layer's in-memory view of a built run (``RUN/graph``) as a PyG ``HeteroData``.

Node types come from the run's dataset, not from code: ``user``, ``feature`` and one node type
per entity type of ``dataset.yaml`` (the run manifest's ``entity_types``: device, ip, address...).
Edge types:

* ``(user, seen_with, <entity type>)``: the links (``RUN/graph/links.parquet``), ``time`` = when
  the user was seen with the entity (days). Entity nodes carry ``key`` (the keyed hash of
  ``graph/entities.py``; raw ids are never stored) and ``time`` (first sighting);
* ``(user, shares, user)``: the derived user-user view, two hops user -> entity -> user, directed
  in time (``src -> dst``) with ``edge_weight``, ``etypes`` (entity-type bitmask) and ``time``
  (the receiving user's decision time). It is exactly :func:`temporal_user_edges` of the link
  edges (:func:`shares_from_links` recomputes it);
* ``(feature, causes, feature)``: the feature DAG from causal pretraining (empty until then);
* ``(user, has, feature)``, on request: every (user, feature) pair, ``edge_attr = [omega, z]`` (a
  missing value keeps its edge with omega = 0, z = 0).

Users carry ``z``, ``omega``, ``struct``, ``treatment``, ``y`` and ``time`` (``as_of`` in days);
feature nodes carry ``alpha`` and ``names``. The view holds every link observed by the run's
latest decision time, so a link can be later than its own user's ``as_of`` (it may still reach
later users). Whoever computes on the view takes, for a user ``u``, only edges with ``time <=
time[u]`` (what PyG's temporal samplers do with ``time_attr="time"``; the shares edges already
obey it), or asks for the graph as known at a time ``T`` with ``at=T``.

Where it serves: inspecting and checking a run (``tests/test_graph.py`` rebuilds the shares
edges from the link edges; ``benchmarks/bench_batching.py`` sizes the view) and as the typed
node/edge layout a second model family plugs into. The model does not train on it: it computes on
dense user x feature matrices and sparse user-user edges per shard (``model/batch.py``;
docs/model.md, "Batches" says why).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch_geometric.data import HeteroData

from creditgraph.data.spec import DatasetSpec
from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.graph.temporal import TemporalEdges, temporal_user_edges
from creditgraph.layout import GraphFiles

USER, FEATURE = "user", "feature"
SEEN_WITH = "seen_with"
HAS = (USER, "has", FEATURE)
SHARES = (USER, "shares", USER)
CAUSES = (FEATURE, "causes", FEATURE)


def seen_with(entity_type: str) -> tuple[str, str, str]:
    """The edge type of the links to one entity type."""
    return (USER, SEEN_WITH, entity_type)


def entity_types(data: HeteroData) -> list[str]:
    """The entity node types of a view, in the run's order (the ``etypes`` bit order)."""
    return list(data.entity_types)


def to_heterodata(
    art: GraphArtifacts,
    alpha: np.ndarray | None = None,
    dag_edges: np.ndarray | None = None,
    materialize_user_feature_edges: bool = True,
    at: float | None = None,
) -> HeteroData:
    """Assemble the run's heterograph (see the module docstring).

    ``dag_edges`` is ``int [2, E]`` (parent, child) feature indices. The dense ``z``/``omega``
    matrices are always on the user store (the model's layout); the explicit ``(user, has,
    feature)`` edges number ``n_users * n_features`` and are materialised on request. ``at``
    (days, the unit of ``users.t_days``) keeps only the link and shares edges known by then.
    """
    types = list(art.manifest.get("entity_types", []))
    clash = sorted({USER, FEATURE} & set(types))
    if clash:
        raise ValueError(f"{art.root}: entity types {clash} clash with the node types user/feature")
    links_path = GraphFiles(art.root).links
    if not links_path.exists():
        raise FileNotFoundError(
            f"{links_path} is missing: the graph was built before links were stored; "
            "rebuild it with `creditgraph build`"
        )
    links = pd.read_parquet(links_path)
    if at is not None:
        links = links.loc[links["ts_days"].to_numpy(np.float64) <= at]

    n, f = art.z.shape
    t_days = art.users["t_days"].to_numpy(np.float64, copy=True)
    data = HeteroData()
    data.entity_types = types
    data[USER].num_nodes = n
    data[USER].z = torch.from_numpy(art.z)
    data[USER].omega = torch.from_numpy(art.omega.astype(np.float32))
    data[USER].struct = torch.from_numpy(art.struct)
    data[USER].treatment = torch.from_numpy(art.users["treatment"].to_numpy(np.float32))
    data[USER].y = torch.from_numpy(art.users["outcome"].to_numpy(np.float32))
    data[USER].time = torch.from_numpy(t_days)
    data[FEATURE].num_nodes = f
    data[FEATURE].alpha = torch.from_numpy(
        np.zeros(f, np.float32) if alpha is None else np.asarray(alpha, np.float32)
    )
    data[FEATURE].names = list(art.feature_names)

    type_code, present = pd.factorize(links["entity_type"])
    present = list(present)
    node = links["node"].to_numpy(np.int64)
    ts_all = links["ts_days"].to_numpy(np.float64)
    for etype in types:
        rows = type_code == (present.index(etype) if etype in present else -2)
        code, keys = pd.factorize(links["entity_key"][rows], sort=True)
        ts = np.array(ts_all[rows], dtype=np.float64)
        first = np.full(len(keys), np.inf)
        np.minimum.at(first, code, ts)
        data[etype].num_nodes = len(keys)
        data[etype].key = keys.to_numpy(str).tolist()
        data[etype].time = torch.from_numpy(first)
        store = data[seen_with(etype)]
        store.edge_index = torch.from_numpy(np.stack([node[rows], code.astype(np.int64)]))
        store.time = torch.from_numpy(ts)

    keep = np.ones(len(art.src), bool) if at is None else t_days[art.dst] <= at
    data[SHARES].edge_index = torch.from_numpy(
        np.stack([art.src[keep], art.dst[keep]]).astype(np.int64)
    )
    data[SHARES].edge_weight = torch.from_numpy(art.weight[keep])
    data[SHARES].etypes = torch.from_numpy(art.etypes[keep].astype(np.int64))
    data[SHARES].time = torch.from_numpy(t_days[art.dst[keep]])

    dag = np.zeros((2, 0), np.int64) if dag_edges is None else np.asarray(dag_edges, np.int64)
    data[CAUSES].edge_index = torch.from_numpy(dag.reshape(2, -1))
    if materialize_user_feature_edges:
        users = torch.arange(n).repeat_interleave(f)
        feats = torch.arange(f).repeat(n)
        data[HAS].edge_index = torch.stack([users, feats])
        data[HAS].edge_attr = torch.stack(
            [data[USER].omega.reshape(-1), data[USER].z.reshape(-1)], dim=1
        )
    return data


def shares_from_links(data: HeteroData, spec: DatasetSpec) -> TemporalEdges:
    """Recompute the user-user view from the view's link edges: two hops user -> entity -> user
    with the dataset's entity weights, super-node cut-offs and history window.

    On a view of a whole run this gives back the run's stored ``(user, shares, user)`` edges;
    it is the check that a run's user-user edges are the two-hop view of its links.
    """
    types = entity_types(data)
    frames = [
        pd.DataFrame(
            {
                "user_idx": data[seen_with(t)].edge_index[0].numpy(),
                "entity_type": t,
                "entity_id": data[seen_with(t)].edge_index[1].numpy(),
                "ts_days": data[seen_with(t)].time.numpy(),
            }
        )
        for t in types
    ]
    links = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["user_idx", "entity_type", "entity_id", "ts_days"])
    )
    return temporal_user_edges(
        links, data[USER].time.numpy(), spec.entities, spec.history_days, type_names=types
    )
