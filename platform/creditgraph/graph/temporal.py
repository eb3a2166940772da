"""User-user edges from shared entities, directed in time (seed 001: no information from the future).

An edge ``v -> u`` (information flows from v to u) exists when, for some entity e:

* u was seen with e at a time ``ts`` with ``as_of_u - W <= ts <= as_of_u`` (W = history window);
* v was seen with e at a time in the same window ``[as_of_u - W, as_of_u]``;
* ``as_of_v <= as_of_u`` (v's snapshot is not later than u's), and v != u;
* e is not a super-node *for u*: at most ``max_degree`` distinct users had been seen with e by
  ``as_of_u`` (a cumulative count, so the cut itself uses no future information).

The edge weight is the sum of the entity-type weights over the distinct entities shared in that
window; ``etypes`` is a bitmask of the entity types involved. Everything is vectorized: sightings
are sorted by (entity, time) and each query (u, e) is answered by two binary searches.

This user-user graph is the two-hop view user -> entity -> user of the time-directed user-entity
graph: a weighted mean over in-neighbours v with weights ``w_uv = sum of w_e over shared e`` equals
the weighted mean over (entity, co-user) pairs, ``sum_e w_e * sum_{v in N_e} x_v / sum_e w_e |N_e|``.
That identity is what lets an applicant the model has never seen be scored from the stored
per-entity sums of its entities alone (:mod:`creditgraph.graph.entities`), and why the structural
features count (entity, co-user) pairs (:func:`structural_features`), which per-entity counts give.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from creditgraph.data.spec import EntityType


@dataclass
class TemporalEdges:
    """Directed user-user edges; ``pairs[u, t]``: (entity, co-user) pairs of type t reaching u."""

    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    etypes: np.ndarray
    pairs: np.ndarray | None = None
    type_weights: np.ndarray | None = None
    stats: dict = field(default_factory=dict)


def _segment_keys(ent: np.ndarray, t: np.ndarray, tmin: float, span: float) -> np.ndarray:
    return ent.astype(np.float64) * span + (t - tmin)


def temporal_user_edges(
    links: pd.DataFrame,
    as_of: np.ndarray,
    entities: dict[str, EntityType],
    history_days: float,
    type_names: list[str] | None = None,
) -> TemporalEdges:
    """Build directed, time-respecting user-user edges from validated links.

    ``links`` has ``user_idx, entity_type, entity_id, ts_days``; ``as_of`` is float days per user.
    ``type_names`` fixes the entity types (and so the structural feature columns; a trained run
    passes its own); default: the declared types and those present, sorted.
    """
    n_users = len(as_of)
    empty = TemporalEdges(
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
        np.zeros(0, np.float32),
        np.zeros(0, np.uint16),
    )
    if links is None or len(links) == 0:
        types = sorted(entities) if type_names is None else list(type_names)
        empty.pairs = np.zeros((n_users, len(types)), np.float32)
        empty.type_weights = np.array(
            [entities.get(t, EntityType()).weight for t in types], np.float32
        )
        empty.stats = {"sightings": 0, "edges": 0, "entity_types": types}
        return empty

    present = set(links["entity_type"].unique())
    if type_names is None:
        type_names = sorted(present | set(entities))
    elif present - set(type_names):
        raise ValueError(f"entity types {sorted(present - set(type_names))} unknown to this graph")
    type_code = {t: i for i, t in enumerate(type_names)}
    spec = {t: entities.get(t, EntityType()) for t in type_names}
    w_of_type = np.array([spec[t].weight for t in type_names], dtype=np.float64)
    maxdeg_of_type = np.array([spec[t].max_degree for t in type_names], dtype=np.int64)

    ent = links.groupby(["entity_type", "entity_id"], sort=False).ngroup().to_numpy(np.int64)
    etype_of_row = links["entity_type"].map(type_code).to_numpy(np.int64)
    n_ent = int(ent.max()) + 1
    ent_type = np.zeros(n_ent, dtype=np.int64)
    ent_type[ent] = etype_of_row
    user = links["user_idx"].to_numpy(np.int64)
    ts = links["ts_days"].to_numpy(np.float64)

    # drop exact duplicate sightings
    key = np.lexsort((ts, user, ent))
    ent, user, ts = ent[key], user[key], ts[key]
    dup = np.r_[False, (ent[1:] == ent[:-1]) & (user[1:] == user[:-1]) & (ts[1:] == ts[:-1])]
    ent, user, ts = ent[~dup], user[~dup], ts[~dup]

    tmin = float(min(ts.min(), as_of.min()) - history_days - 1)
    span = float(max(ts.max(), as_of.max()) - tmin + 2)
    t_user = as_of[user]
    future = ts > t_user
    stale = ts < t_user - history_days

    # first sighting of each (user, entity): the cumulative distinct-user count per entity
    first = np.r_[True, (ent[1:] != ent[:-1]) | (user[1:] != user[:-1])]
    f_ent, f_ts = ent[first], ts[first]
    order = np.lexsort((f_ts, f_ent))
    f_key = _segment_keys(f_ent[order], f_ts[order], tmin, span)

    # sightings re-sorted by (entity, ts) for the window searches
    order = np.lexsort((ts, ent))
    ent, user, ts, t_user = ent[order], user[order], ts[order], t_user[order]
    future, stale = future[order], stale[order]
    s_key = _segment_keys(ent, ts, tmin, span)

    # queries: (u, e) with a sighting of e in u's own window
    valid = ~future & ~stale
    q = pd.DataFrame({"u": user[valid], "e": ent[valid]}).drop_duplicates().to_numpy()
    qu, qe = q[:, 0].astype(np.int64), q[:, 1].astype(np.int64)
    qt = as_of[qu]
    seg_start = qe.astype(np.float64) * span
    degree = np.searchsorted(f_key, seg_start + (qt - tmin), "right") - np.searchsorted(
        f_key, seg_start, "left"
    )
    cut = degree > maxdeg_of_type[ent_type[qe]]
    supernodes = np.unique(qe[cut])
    supernode_types = np.bincount(ent_type[supernodes], minlength=len(type_names))
    qu, qe, qt = qu[~cut], qe[~cut], qt[~cut]

    lo = np.searchsorted(s_key, qe * span + np.maximum(qt - history_days - tmin, 0.0), "left")
    hi = np.searchsorted(s_key, qe * span + (qt - tmin), "right")
    lengths = hi - lo
    total = int(lengths.sum())
    q_rep = np.repeat(np.arange(len(qu)), lengths)
    offsets = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = lo[q_rep] + offsets
    src = user[pos]
    dst = qu[q_rep]
    e = qe[q_rep]
    keep = (src != dst) & (as_of[src] <= qt[q_rep])
    src, dst, e = src[keep], dst[keep], e[keep]

    # distinct (src, dst, entity), then aggregate per (src, dst)
    pair = src * n_users + dst
    o = np.lexsort((e, pair))
    pair, e = pair[o], e[o]
    distinct = np.r_[True, (pair[1:] != pair[:-1]) | (e[1:] != e[:-1])][: len(pair)]
    pair, e = pair[distinct], e[distinct]
    n_types = len(type_names)
    pairs = np.bincount(
        (pair % n_users) * n_types + ent_type[e], minlength=n_users * n_types
    ).reshape(n_users, n_types)
    upair, start = np.unique(pair, return_index=True)
    inv = np.repeat(np.arange(len(upair)), np.diff(np.r_[start, len(pair)]))
    weight = np.bincount(inv, weights=w_of_type[ent_type[e]], minlength=len(upair))
    bits = (1 << ent_type[e]).astype(np.uint16)
    etypes = np.bitwise_or.reduceat(bits, start) if len(bits) else np.zeros(0, np.uint16)

    out = TemporalEdges(
        src=(upair // n_users).astype(np.int64),
        dst=(upair % n_users).astype(np.int64),
        weight=weight.astype(np.float32),
        etypes=etypes.astype(np.uint16),
        pairs=pairs.astype(np.float32),
        type_weights=w_of_type.astype(np.float32),
    )
    out.stats = {
        "entity_types": type_names,
        "sightings": len(ts),
        "sightings_after_as_of": int(future.sum()),
        "sightings_outside_window": int(stale.sum()),
        "entities": n_ent,
        "supernodes_cut": len(supernodes),
        "supernodes_cut_by_type": dict(zip(type_names, supernode_types.tolist(), strict=True)),
        "queries_cut": int(cut.sum()),
        "edges": len(upair),
        "users_with_in_edges": len(np.unique(out.dst)),
        "mean_in_degree": float(len(upair) / max(n_users, 1)),
    }
    return out


def structural_features(edges: TemporalEdges, n_users: int) -> tuple[np.ndarray, list[str]]:
    """Per-user counts of the (entity, co-user) pairs that reach the user, past-only.

    ``log1p`` of the number of pairs, of their total entity-type weight (= the weighted in-degree
    of the user-user view) and of the pairs per entity type. Pairs, not distinct neighbours: a
    per-entity count of co-users is all an online applicant's stored entities give, so batch and
    online compute the same numbers. Only incoming information is used: out-edges point to later
    users and would leak the future.
    """
    types = edges.stats.get("entity_types", [])
    pairs = np.zeros((n_users, len(types)), np.float64) if edges.pairs is None else edges.pairs
    return struct_from_pairs(np.asarray(pairs, np.float64), edges.type_weights), struct_names(types)


def struct_names(types: list[str]) -> list[str]:
    """Names of the structural features for these entity types."""
    return ["shared_pairs", "shared_weight"] + [f"shared_pairs_{t}" for t in types]


def struct_from_pairs(pairs: np.ndarray, type_weights: np.ndarray | None) -> np.ndarray:
    """The structural features from pair counts per entity type ``[n, T]`` (one formula, used in
    batch and for applicants)."""
    pairs = np.asarray(pairs, dtype=np.float64)
    w = np.ones(pairs.shape[1]) if type_weights is None else np.asarray(type_weights, np.float64)
    cols = (
        np.column_stack([pairs.sum(1), pairs @ w, pairs])
        if pairs.shape[1]
        else np.zeros((pairs.shape[0], 2))
    )
    return np.log1p(cols).astype(np.float32)
