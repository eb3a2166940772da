"""The order family's event graph: time direction, shadow orders, label and link timing, cuts,
the time split, and the ClusterGCN shards."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from creditgraph.data.errors import DataValidationError
from creditgraph.data.orders import labels_known_at, load_orders
from creditgraph.data.simulate_orders import OrderSimConfig, simulate_orders_to_dir
from creditgraph.graph.entities import entity_key
from creditgraph.graph.events import (
    ENTITY_FEATURES,
    KIND_ENTITY,
    KIND_ORDER,
    KIND_SHADOW,
    REL_ENTITY_TO_ORDER,
    REL_ENTITY_TO_SHADOW,
    REL_HISTORY,
    REL_SHADOW_TO_ENTITY,
    SPLIT_EARLY,
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VAL,
    EventGraph,
    EventGraphConfig,
    EventPartitionConfig,
    OrderSplitConfig,
    build_event_graph,
    entity_keys_fast,
    event_shard_paths,
    load_event_shard,
    partition_events,
    run_build_events,
    split_orders,
)
from creditgraph.layout import RunLayout

SALT = bytes(range(32))
START = pd.Timestamp("2025-01-01")
FRAUD_REVEALED = ENTITY_FEATURES.index("log_fraud_revealed")
CUT = ENTITY_FEATURES.index("cut")


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("orders_graph") / "data"
    simulate_orders_to_dir(OrderSimConfig(n_orders=6000, n_buyers=900, seed=3), out)
    return out


@pytest.fixture(scope="module")
def graph(sim) -> tuple:
    ds = load_orders(sim)
    return ds, build_event_graph(ds, EventGraphConfig(), salt=SALT)


def _write(d: Path, orders: list[dict], links: list[dict], max_degree: int = 2) -> Path:
    """A hand-made order dataset (times in days after START)."""
    d.mkdir(parents=True, exist_ok=True)
    o = pd.DataFrame(orders)
    o["ts"] = START + pd.to_timedelta(o["ts"], unit="D")
    o["label_known_at"] = START + pd.to_timedelta(o["label_known_at"], unit="D")
    o["is_fraud"] = o["is_fraud"].astype("Int8")
    o.to_parquet(d / "orders.parquet", index=False)
    lk = pd.DataFrame(links)
    lk["ts"] = START + pd.to_timedelta(lk["ts"], unit="D")
    lk.to_parquet(d / "order_links.parquet", index=False)
    spec = {
        "name": "handmade",
        "family": "orders",
        "entities": {"device": {"max_degree": 50}, "ip": {"max_degree": max_degree}},
        "history_days": 30,
        "orders": {"truth": None, "reference_time": "2025-03-01"},
    }
    (d / "dataset.yaml").write_text(yaml.safe_dump(spec))
    return d


def _order(i: int, ts: float, buyer: int, fraud: int, known: float) -> dict:
    return {"order_id": i, "ts": ts, "buyer_id": buyer, "amount": 10.0, "f1": float(i),
            "is_fraud": fraud, "label_known_at": known}  # fmt: skip


def _handmade(tmp_path: Path, fraud_known_at: float) -> tuple:
    orders = [
        _order(1, 1.5, 10, 1, fraud_known_at),  # A: a fraud on device D, IP P
        _order(2, 5.5, 11, 0, 65.5),  # B: device D again, IP P
        _order(3, 5.7, 12, 0, 65.7),  # C: IP P (its third buyer: P becomes a super-node)
        _order(4, 6.5, 13, 0, 66.5),  # E's first order-time use, after A's late link
        _order(5, 4.05, 14, 0, 64.05),  # device E in the very slice of A's late link
        _order(6, 7.5, 15, 0, 67.5),  # IP P once more, after the cut
    ]
    links = [
        {"order_id": 1, "entity_type": "device", "entity_id": "D", "ts": 1.5},
        {"order_id": 1, "entity_type": "ip", "entity_id": "P", "ts": 1.5},
        {"order_id": 1, "entity_type": "device", "entity_id": "E", "ts": 4.1},  # seen later
        {"order_id": 2, "entity_type": "device", "entity_id": "D", "ts": 5.5},
        {"order_id": 2, "entity_type": "ip", "entity_id": "P", "ts": 5.5},
        {"order_id": 3, "entity_type": "ip", "entity_id": "P", "ts": 5.7},
        {"order_id": 4, "entity_type": "device", "entity_id": "E", "ts": 6.5},
        {"order_id": 5, "entity_type": "device", "entity_id": "E", "ts": 4.05},
        {"order_id": 6, "entity_type": "ip", "entity_id": "P", "ts": 7.5},
    ]
    ds = load_orders(_write(tmp_path / f"d{fraud_known_at}", orders, links))
    return ds, build_event_graph(ds, EventGraphConfig(), salt=SALT)


def _sources(g: EventGraph, order: int, rel: int = REL_ENTITY_TO_ORDER) -> np.ndarray:
    """Entity-slice indices feeding a real order."""
    m = (g.dst == order) & (g.rel == rel)
    return g.src[m] - 2 * g.n_orders


def _entity(g: EventGraph, etype: str, eid: str) -> int:
    return int(np.flatnonzero(g.entity_key == entity_key(SALT, etype, eid))[0])


def test_every_edge_points_forward_in_time(graph):
    _ds, g = graph
    kind, sl = g.node_kind(), g.node_slice()
    s, d = sl[g.src], sl[g.dst]
    assert (s <= d).all(), "an edge from a later slice into an earlier one"
    into_order = g.rel == REL_ENTITY_TO_ORDER
    assert (kind[g.dst[into_order]] == KIND_ORDER).all()
    assert (s[into_order] < d[into_order]).all(), "an order fed by its own slice"
    assert (d[into_order] - s[into_order] <= g.window_slices).all()
    assert not np.isin(kind[g.src], [KIND_ORDER]).any(), "real orders must be sinks"
    assert (kind[g.dst[~into_order]] != KIND_ORDER).all()
    m = g.rel == REL_ENTITY_TO_SHADOW
    assert (s[m] == d[m]).all() and (kind[g.dst[m]] == KIND_SHADOW).all()
    h = g.rel == REL_HISTORY
    assert (s[h] < d[h]).all() and (d[h] - s[h] <= g.window_slices).all()
    assert (g.es_entity[g.src[h] - 2 * g.n_orders] == g.es_entity[g.dst[h] - 2 * g.n_orders]).all()
    np.testing.assert_allclose(g.recency[into_order], (d - s)[into_order] * g.slice_days)
    # the simulated data has every kind of edge, late links and label reveals
    assert all((g.rel == r).any() for r in range(4))
    assert g.stats["late_links"] > 0 and g.stats["label_reveals"] > 0


def test_an_order_is_reached_only_by_what_was_known_before_its_slice(graph):
    ds, g = graph
    n = g.n_nodes
    a = sp.csr_matrix((np.ones(len(g.src), bool), (g.dst, g.src)), shape=(n, n))
    sl, kind = g.node_slice(), g.node_kind()
    start = sl * g.slice_days  # the slice's start, in days since 1970
    rng = np.random.default_rng(0)
    picks = rng.choice(np.flatnonzero(_sources_any(g)), 40, replace=False)
    for o in picks:
        seen = np.zeros(n, bool)
        frontier = np.array([o])
        while len(frontier):
            nxt = np.unique(a[frontier].indices)
            frontier = nxt[~seen[nxt]]
            seen[frontier] = True
        anc = np.flatnonzero(seen)
        assert len(anc) > 0
        assert (sl[anc] < sl[o]).all()
        shadows = anc[kind[anc] == KIND_SHADOW] - g.n_orders
        assert (ds.t_days[shadows] < start[o]).all(), "a later order reached an earlier one"
        ents = anc[kind[anc] == KIND_ENTITY] - 2 * g.n_orders
        revealed = g.es_feat[ents, FRAUD_REVEALED] > 0
        assert (start[ents[revealed] + 2 * g.n_orders] < ds.t_days[o]).all()


def _sources_any(g: EventGraph) -> np.ndarray:
    fed = np.zeros(g.n_orders, bool)
    fed[g.dst[g.rel == REL_ENTITY_TO_ORDER]] = True
    return fed


def test_labels_and_late_links_arrive_at_their_own_time(tmp_path):
    _ds, g = _handmade(tmp_path, fraud_known_at=3.2)
    D, E, P = _entity(g, "device", "D"), _entity(g, "device", "E"), _entity(g, "ip", "P")
    base = int(np.floor((START - pd.Timestamp("1970-01-01")).days))
    # B (day 5.5) reads D's state of day 3: the slice A's fraud became known in
    src = _sources(g, 1)
    d_src = src[g.es_entity[src] == D]
    assert g.es_slice[d_src].tolist() == [base + 3]
    assert g.es_feat[d_src[0], FRAUD_REVEALED] > 0
    # A's device E, seen on day 4.1 (after A): only orders of later slices see it
    e_src = _sources(g, 3)  # order 4 at day 6.5
    assert g.es_slice[e_src[g.es_entity[e_src] == E]].tolist() == [base + 4]
    assert len(_sources(g, 4)) == 0  # order 5 at day 4.05, the late link's own slice
    shadow_a = g.n_orders + 0
    e4 = 2 * g.n_orders + int(np.flatnonzero((g.es_entity == E) & (g.es_slice == base + 4))[0])
    assert ((g.src == shadow_a) & (g.dst == e4) & (g.rel == REL_SHADOW_TO_ENTITY)).any()
    assert not ((g.src == e4) & (g.dst == shadow_a)).any(), "a later slice fed an earlier order"
    # P had 3 buyers by day 5 (max_degree 2): cut there, still feeding orders, no shadows
    p5 = np.flatnonzero((g.es_entity == P) & (g.es_slice == base + 5))[0]
    assert g.es_feat[p5, CUT] == 1
    node = 2 * g.n_orders + p5
    assert not ((g.dst == node) & (g.rel == REL_SHADOW_TO_ENTITY)).any()
    assert not ((g.src == node) & (g.rel == REL_ENTITY_TO_SHADOW)).any()
    assert (g.es_entity[_sources(g, 5)] == P).all() and p5 in _sources(g, 5)

    # the same fraud known only on day 6: B no longer sees it, later orders would
    _ds2, g2 = _handmade(tmp_path, fraud_known_at=6.0)
    src = _sources(g2, 1)
    d_src = src[g2.es_entity[src] == D]
    assert g2.es_slice[d_src].tolist() == [base + 1]
    assert g2.es_feat[d_src[0], FRAUD_REVEALED] == 0
    d6 = np.flatnonzero((g2.es_entity == D) & (g2.es_slice == base + 6))
    assert len(d6) == 1 and g2.es_feat[d6[0], FRAUD_REVEALED] > 0


def test_entities_are_stored_as_keyed_hashes_only(sim, tmp_path):
    run = RunLayout(tmp_path / "run")
    run_build_events(sim, run, EventGraphConfig(), OrderSplitConfig(min_positives=5))
    g = EventGraph.load(run)
    ents = pd.read_parquet(run.events.dir / "entities.parquet")
    assert list(ents.columns) == ["key", "type"]
    assert ents["key"].str.fullmatch(r"[0-9a-f]{32}").all()
    raw_ids = set(pd.read_parquet(sim / "order_links.parquet")["entity_id"].astype(str))
    assert not raw_ids & set(ents["key"])
    # keys are the shared layer's keyed hashes, salted per run (0600 salt file)
    salt = (run.events.dir / "salt.key").read_bytes()
    assert (run.events.dir / "salt.key").stat().st_mode & 0o777 == 0o600
    assert g.entity_key[0] in set(ents["key"])
    fast = entity_keys_fast(salt, ["device"], np.array([0]), np.array([1_000_007]))
    assert fast[0] == entity_key(salt, "device", 1_000_007) == entity_key(salt, "device", "1000007")
    assert entity_key(SALT, "device", 1_000_007) != fast[0]


def test_time_split_uses_labels_known_at_the_cutoff(sim):
    ds = load_orders(sim)
    with pytest.warns(UserWarning, match="reference time"):
        arrays, info = split_orders(ds, OrderSplitConfig(min_positives=5))
    split, y = arrays["split"], arrays["y_train"]
    t = ds.t_days
    periods = [t[split == c] for c in (SPLIT_EARLY, SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST)]
    for before, after in itertools.pairwise(periods):
        assert before.max() <= after.min(), "the splits must follow each other in time"
    assert info["cutoff_mode"] == "reference" and not info["strict"]
    ref = info["reference_day"] + t.min()
    expected = labels_known_at(ds, ref, mature_days=60)
    labeled = np.isin(split, (SPLIT_EARLY, SPLIT_TRAIN, SPLIT_VAL))
    np.testing.assert_array_equal(y[labeled], expected[labeled])
    assert np.isfinite(y[labeled]).all() and np.isnan(y[split == SPLIT_TEST]).all()
    assert (t[labeled] <= ref - 60).all(), "immature labels (frauds known first) slipped in"
    # test labels: the eventual outcome, for every test order
    assert np.isfinite(arrays["y_eval"][split == SPLIT_TEST]).all()
    # the strict cut-off at the test start has no clean label yet on a 90-day world
    with pytest.raises(DataValidationError, match="is_fraud"):
        split_orders(ds, OrderSplitConfig(cutoff="test_start", min_positives=5))


def test_shards_cover_the_graph_with_halos(sim, tmp_path, ray_session):
    run = RunLayout(tmp_path / "run")
    run_build_events(sim, run, EventGraphConfig(), OrderSplitConfig(min_positives=5))
    summary = partition_events(run, EventPartitionConfig(part_size=2000), hops=3)
    g = EventGraph.load(run)
    owned = np.zeros(g.n_nodes, int)
    for p in event_shard_paths(run):
        s = load_event_shard(p)
        nodes, k = s["nodes"], int(s["n_owned"])
        owned[nodes[:k]] += 1
        # every edge into a node closer than the halo depth is in the shard
        inner = set(nodes[s["hop"] < 3].tolist())
        want = int(np.isin(g.dst, list(inner)).sum())
        assert len(s["src"]) == want
    assert (owned == 1).all(), "every node is owned by exactly one shard"
    train = event_shard_paths(run, train_only=True)
    assert 0 < len(train) < summary["num_parts"]
