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
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from creditgraph.data.spec import EntityType


@dataclass
class TemporalEdges:
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    etypes: np.ndarray
    stats: dict = field(default_factory=dict)


def _segment_keys(ent: np.ndarray, t: np.ndarray, tmin: float, span: float) -> np.ndarray:
    return ent.astype(np.float64) * span + (t - tmin)


def temporal_user_edges(
    links: pd.DataFrame,
    as_of: np.ndarray,
    entities: dict[str, EntityType],
    history_days: float,
) -> TemporalEdges:
    """Build directed, time-respecting user-user edges from validated links.

    ``links`` has ``user_idx, entity_type, entity_id, ts_days``; ``as_of`` is float days per user.
    """
    n_users = len(as_of)
    empty = TemporalEdges(
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
        np.zeros(0, np.float32),
        np.zeros(0, np.uint16),
    )
    if links is None or len(links) == 0:
        empty.stats = {"sightings": 0, "edges": 0}
        return empty

    type_names = sorted(set(links["entity_type"].unique()))
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
    """Per-user in-degree features from the directed (past-only) edges, full graph.

    ``log1p`` of the in-degree, of the weighted in-degree and of the in-degree per entity type.
    Only incoming edges are used: out-edges point to later users and would leak the future.
    """
    types = edges.stats.get("entity_types", [])
    cols = [
        np.bincount(edges.dst, minlength=n_users),
        np.bincount(edges.dst, weights=edges.weight, minlength=n_users),
    ]
    cols += [
        np.bincount(edges.dst, weights=(edges.etypes >> i) & 1, minlength=n_users)
        for i in range(len(types))
    ]
    names = ["in_degree", "in_weight"] + [f"in_degree_{t}" for t in types]
    return np.log1p(np.stack(cols, axis=1)).astype(np.float32), names
