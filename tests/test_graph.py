"""The heterograph: leak-free directed edges, super-node cuts, complete user-feature edges."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from creditgraph.data.load import load_dataset
from creditgraph.data.spec import EntityType
from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.graph.hetero import (
    CAUSES,
    FEATURE,
    HAS,
    SHARES,
    USER,
    entity_types,
    seen_with,
    shares_from_links,
    to_heterodata,
)
from creditgraph.graph.temporal import structural_features, temporal_user_edges


@pytest.fixture(scope="module")
def ds(sim_data):
    return load_dataset(sim_data)


def _edges(links: pd.DataFrame, ds) -> tuple[dict, np.ndarray]:
    e = temporal_user_edges(links, ds.t_days, ds.spec.entities, ds.spec.history_days)
    struct, _ = structural_features(e, ds.n_users)
    return e, struct


def _in_edges(e, u: int) -> dict[int, float]:
    m = e.dst == u
    return dict(zip(e.src[m].tolist(), np.round(e.weight[m], 6).tolist(), strict=True))


def _well_connected(e, k: int = 6) -> np.ndarray:
    deg = np.bincount(e.dst)
    return np.argsort(-deg)[:k]


def test_edges_respect_time(ds, built_run):
    art = GraphArtifacts.load(built_run)
    t = ds.t_days
    assert len(art.src) > 0
    assert np.all(t[art.src] <= t[art.dst]), "an edge carries information from a later user"
    assert np.all(art.src != art.dst)


def test_future_links_never_reach_a_user(ds):
    """Deleting everything observed after u's as_of leaves u's edges and inputs unchanged."""
    full, struct_full = _edges(ds.links, ds)
    for u in _well_connected(full):
        past = ds.links[ds.links["ts_days"] <= ds.t_days[u]]
        assert len(past) < len(ds.links)
        cut, struct_cut = _edges(past, ds)
        assert _in_edges(cut, u) == _in_edges(full, u)
        np.testing.assert_array_equal(struct_cut[u], struct_full[u])
        # and the in-neighbours' own inputs (2-hop context) do not move either
        for v in _in_edges(full, u):
            assert _in_edges(cut, v) == _in_edges(full, v)
            np.testing.assert_array_equal(struct_cut[v], struct_full[v])


def test_moving_a_link_after_as_of_removes_exactly_its_edge(ds):
    full, _ = _edges(ds.links, ds)
    u = int(_well_connected(full, 1)[0])
    links = ds.links.copy()
    mine = links.index[(links["user_idx"] == u) & (links["ts_days"] <= ds.t_days[u])]
    links.loc[mine, "ts_days"] = ds.t_days[u] + 1.0  # now only seen after u's decision
    moved, _ = _edges(links, ds)
    assert _in_edges(moved, u) == {}
    # moving someone's future link to an even later time changes nothing for u
    later = ds.links.copy()
    fut = later.index[later["ts_days"] > ds.t_days[u]]
    later.loc[fut, "ts_days"] += 17.0
    shifted, _ = _edges(later, ds)
    assert _in_edges(shifted, u) == _in_edges(full, u)


def test_post_default_collection_links_do_not_leak(ds):
    """The simulator links defaulters to collection phones after as_of; they create no edge."""
    full, _ = _edges(ds.links, ds)
    y = ds.outcome
    defaulters = np.flatnonzero(y == 1)
    into_defaulters = np.isin(full.dst, defaulters)
    both_default = into_defaulters & np.isin(full.src, defaulters)
    # without time filtering, collection phones would tie most defaulters together
    assert both_default.sum() < 0.5 * max(into_defaulters.sum(), 1)


def test_history_window_excludes_stale_links(ds):
    full, _ = _edges(ds.links, ds)
    old = ds.links.copy()
    old["ts_days"] = ds.t_days[old["user_idx"].to_numpy()] - ds.spec.history_days - 5
    stale, _ = _edges(old, ds)
    assert len(stale.src) == 0 and len(full.src) > 0


def test_supernode_is_cut_not_a_clique():
    n, max_degree = 60, 10
    as_of = np.arange(n, dtype=float) + 100.0
    links = pd.DataFrame(
        {
            "user_idx": np.arange(n),
            "entity_type": "ip",
            "entity_id": "public-wifi",
            "ts_days": as_of,  # seen at decision time
        }
    )
    e = temporal_user_edges(
        links, as_of, {"ip": EntityType(weight=0.3, max_degree=max_degree)}, 90.0
    )
    # users arriving after the entity passed max_degree get no edge through it
    assert set(np.unique(e.dst)) <= set(range(max_degree))
    assert len(e.src) <= max_degree * (max_degree - 1) // 2 < n * (n - 1) // 2
    assert e.stats["supernodes_cut"] == 1 and e.stats["queries_cut"] == n - max_degree


def test_shared_entity_weights_add_up():
    as_of = np.array([10.0, 20.0])
    links = pd.DataFrame(
        {
            "user_idx": [0, 1, 0, 1, 0, 1],
            "entity_type": ["device", "device", "address", "address", "address", "address"],
            "entity_id": ["d1", "d1", "a1", "a1", "a1", "a1"],
            "ts_days": [5.0, 15.0, 5.0, 15.0, 6.0, 16.0],  # repeated sightings count once
        }
    )
    ents = {"device": EntityType(weight=1.0), "address": EntityType(weight=0.5)}
    e = temporal_user_edges(links, as_of, ents, 90.0)
    assert e.src.tolist() == [0] and e.dst.tolist() == [1]
    assert e.weight[0] == pytest.approx(1.5)
    assert int(e.etypes[0]) == 0b11


def test_heterodata_has_every_user_feature_edge(built_run):
    art = GraphArtifacts.load(built_run)
    data = to_heterodata(art, dag_edges=np.array([[0], [1]]))
    n, f = art.z.shape
    assert data[HAS].edge_index.shape == (2, n * f)
    attr = data[HAS].edge_attr.numpy()
    missing = np.isnan(art.raw).reshape(-1)
    assert missing.any()
    assert np.all(attr[missing] == 0.0), "a missing value keeps its edge with omega = 0, z = 0"
    assert np.all(attr[~missing, 0] == 1.0)
    assert data[SHARES].edge_index.shape[1] == len(art.src)
    assert data[CAUSES].edge_index.tolist() == [[0], [1]]
    assert data[USER].num_nodes == n


def test_heterodata_node_types_and_links_come_from_the_dataset(built_run, ds):
    """One node type per declared entity type; one timestamped edge per stored sighting, the
    entity named by its keyed hash, never by its raw id."""
    art = GraphArtifacts.load(built_run)
    data = to_heterodata(art, materialize_user_feature_edges=False)
    declared = sorted(ds.spec.entities)
    assert declared and set(data.node_types) == {USER, FEATURE, *declared}
    assert HAS not in data.edge_types
    kept = ds.links[ds.links["ts_days"] <= ds.t_days.max()]
    for t in declared:
        mine = kept[kept["entity_type"] == t]
        e = data[seen_with(t)]
        assert e.edge_index.shape[1] == len(mine) > 0
        assert data[t].num_nodes == mine["entity_id"].nunique()
        # the same sightings: (user, time) pairs match the dataset's
        got = sorted(zip(e.edge_index[0].tolist(), e.time.tolist(), strict=True))
        want = sorted(zip(mine["user_idx"].tolist(), mine["ts_days"].tolist(), strict=True))
        assert got == want
        keys = set(data[t].key)
        assert all(len(k) == 32 for k in keys)
        assert not keys & set(map(str, mine["entity_id"].unique()))
    # some links are later than their own user's as_of: the view keeps them with their time
    user, ts = (
        np.concatenate([data[seen_with(t)].edge_index[0].numpy() for t in declared]),
        np.concatenate([data[seen_with(t)].time.numpy() for t in declared]),
    )
    assert (ts > ds.t_days[user]).any()


def test_heterodata_shares_edges_are_the_two_hop_view_of_its_links(built_run, ds):
    art = GraphArtifacts.load(built_run)
    data = to_heterodata(art, materialize_user_feature_edges=False)
    e = shares_from_links(data, ds.spec)
    assert len(e.src) == len(art.src) > 0
    np.testing.assert_array_equal(e.src, art.src)
    np.testing.assert_array_equal(e.dst, art.dst)
    np.testing.assert_allclose(e.weight, art.weight, rtol=1e-6)
    np.testing.assert_array_equal(e.etypes, art.etypes)
    shares = data[SHARES]
    np.testing.assert_array_equal(shares.edge_index.numpy(), np.stack([art.src, art.dst]))
    # a shares edge is known at its receiver's decision time, never before its sender's
    t = data[USER].time.numpy()
    np.testing.assert_array_equal(shares.time.numpy(), t[art.dst])
    assert np.all(t[art.src] <= shares.time.numpy())


def test_heterodata_at_a_time_holds_only_what_was_known(built_run, ds):
    art = GraphArtifacts.load(built_run)
    at = float(np.median(ds.t_days))
    data = to_heterodata(art, materialize_user_feature_edges=False, at=at)
    for t in entity_types(data):
        assert data[seen_with(t)].time.numel() > 0
        assert float(data[seen_with(t)].time.max()) <= at
        assert float(data[t].time.max()) <= at
    assert 0 < data[SHARES].edge_index.shape[1] < len(art.src)
    assert float(data[SHARES].time.max()) <= at
    # the users decided by `at` keep exactly their shares edges of the whole view
    whole = to_heterodata(art, materialize_user_feature_edges=False)
    early = whole[SHARES].time.numpy() <= at
    np.testing.assert_array_equal(
        data[SHARES].edge_index.numpy(), whole[SHARES].edge_index.numpy()[:, early]
    )


def test_heterodata_needs_the_stored_links(built_run, tmp_path):
    import shutil

    graph = tmp_path / "graph"
    shutil.copytree(built_run / "graph", graph)
    (graph / "links.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"links\.parquet"):
        to_heterodata(GraphArtifacts.load(tmp_path))


def test_standardization_stats_are_stored_and_reused(built_run, ds):
    from creditgraph.graph.features import FeatureStandardizer

    art = GraphArtifacts.load(built_run)
    std = FeatureStandardizer.from_records(art.feature_stats)
    z, omega = std.transform(ds.feature_matrix())
    np.testing.assert_allclose(z, art.z, atol=1e-6)
    np.testing.assert_array_equal(omega, art.omega)
    train = art.split_mask("train")
    obs = art.omega[train].astype(bool)
    col = art.z[train][:, 0][obs[:, 0]]
    assert abs(col.mean()) < 0.05 and abs(col.std() - 1) < 0.05
