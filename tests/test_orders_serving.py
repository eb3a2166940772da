"""Serving the order-risk network: batch scoring on Ray Data, snapshots of entity embeddings,
online scoring equal to batch, and the Ray Serve endpoint ``POST /v1/orders/score``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from creditgraph.causal.leaves import LeafConfig, run_leaves
from creditgraph.data.orders import load_orders
from creditgraph.data.simulate_orders import OrderSimConfig, simulate_orders_to_dir
from creditgraph.graph.events import (
    EventGraphConfig,
    EventPartitionConfig,
    OrderSplitConfig,
    load_orders_table,
    partition_events,
    run_build_events,
)
from creditgraph.layout import RunLayout
from creditgraph.model.orders import (
    OrderNet,
    OrderNetConfig,
    infer_run,
    save_order_model,
    spec_for,
)
from creditgraph.serving.orders import (
    OrderScorer,
    embed_and_score,
    publish_order_snapshot,
    score_orders,
)
from creditgraph.serving.snapshot import Registry

PORT = 8791
APP = "creditgraph-orders-test"
TOKEN = "orders-test-token"
HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("orders_serving") / "data"
    simulate_orders_to_dir(OrderSimConfig(n_orders=6000, n_buyers=900, seed=7), out)
    return out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory, ray_session) -> RunLayout:
    """A run with a (randomly initialized) network: serving is exact whatever the weights."""
    run = RunLayout(tmp_path_factory.mktemp("orders_serving_run") / "run")
    run_build_events(data, run, EventGraphConfig(), OrderSplitConfig(min_positives=5))
    run_leaves(run, LeafConfig(n_estimators=20))
    partition_events(run, EventPartitionConfig(part_size=3000), hops=3)
    torch.manual_seed(0)
    save_order_model(run.model, OrderNet(OrderNetConfig(hidden=16), spec_for(run)))
    return run


@pytest.fixture(scope="module")
def batch(run) -> tuple[np.ndarray, np.ndarray]:
    return embed_and_score(run)


def _context(data: Path, rows: np.ndarray) -> dict[int, list[tuple[str, object]]]:
    """The entities each order named when it was placed (links observed at its own time)."""
    ds = load_orders(data)
    lk = ds.links
    at_order = lk["ts_days"].to_numpy() <= ds.t_days[lk["order_idx"].to_numpy()]
    lk = lk[at_order & lk["order_idx"].isin(rows)]
    out: dict[int, list] = {int(r): [] for r in rows}
    for o, t, i in zip(lk["order_idx"], lk["entity_type"], lk["entity_id"], strict=True):
        out[int(o)].append((str(t), i.item() if hasattr(i, "item") else i))
    return out


def _features(run: RunLayout, row: int) -> dict[str, float | None]:
    names = json.loads(run.events.manifest.read_text())["feature_names"]
    x = np.load(run.events.dir / "features.npy")[row]
    return {n: None if np.isnan(v) else float(v) for n, v in zip(names, x, strict=True)}


@pytest.fixture(scope="module")
def snapshot(run, batch, tmp_path_factory) -> tuple[Path, dict, np.ndarray]:
    """A promoted snapshot as of the start of the last slice holding orders, and those orders."""
    orders = load_orders_table(run)
    last = int(orders["slice"].max())
    sd = json.loads(run.events.manifest.read_text())["config"]["slice_days"]
    reg = tmp_path_factory.mktemp("orders_registry")
    meta = publish_order_snapshot(run, reg, z=batch[1], decision_time=last * sd, promote=True)
    rows = np.flatnonzero(orders["slice"].to_numpy() == last)
    return reg, meta, rows


def test_batch_scoring_is_exact_and_leaves_the_run_alone(run, batch, tmp_path):
    logit, z = batch
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run.root.rglob("*"))
    local_logit, local_z = infer_run(load_model(run), run)
    np.testing.assert_allclose(logit, local_logit, atol=1e-6)
    np.testing.assert_allclose(z, local_z, atol=1e-6)
    out = tmp_path / "scores"
    summary = score_orders(run, out, registry=tmp_path / "reg")
    scores = pd.read_parquet(out / "scores.parquet")
    assert summary["orders_scored"] == len(scores) == len(logit)
    np.testing.assert_allclose(scores["score"], 1 / (1 + np.exp(-logit.astype(float))), atol=1e-6)
    assert Registry(tmp_path / "reg").current() is None  # published, not promoted
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run.root.rglob("*")) == before


def load_model(run: RunLayout) -> OrderNet:
    from creditgraph.model.orders import load_order_model

    return load_order_model(run.model)[0]


def test_online_scores_equal_batch_for_the_same_snapshot(run, data, batch, snapshot):
    reg, meta, rows = snapshot
    logit, _ = batch
    orders = load_orders_table(run)
    ctx = _context(data, rows)
    scorer = OrderScorer(run, reg)
    assert scorer.snapshot.id == meta["id"]
    used = 0
    for r in rows[:60]:
        res = scorer.score(
            scorer.raw_vector(_features(run, r)), ctx[int(r)], float(orders["t_days"][r])
        )
        assert res["logit"] == pytest.approx(float(logit[r]), abs=1e-5)
        used += sum(e["used"] for e in res["entities"])
        for e in res["entities"]:
            assert HEX32.match(e["key"])
        contrib = [e["contribution"] for e in res["top_entities"]]
        assert contrib == sorted(contrib, reverse=True)
    assert used > 0, "no order of the slice had a stored entity: the test would prove nothing"
    # an order placed before the snapshot's decision time would read its own future
    early = float(orders["t_days"].min())
    with pytest.raises(ValueError, match="before the served snapshot"):
        scorer.score(scorer.raw_vector({}), [], early)
    # the snapshot holds keyed hashes only, one state per entity
    store = scorer.snapshot.store
    assert store.count("order_entity") == meta["counts"]["entities"] > 0
    scorer.close()


@pytest.fixture(scope="module")
def service(run, snapshot, monkeypatch_module):
    from ray import serve

    from creditgraph.serving.app import TOKEN_ENV, build_app

    reg = snapshot[0]
    monkeypatch_module.setenv(TOKEN_ENV, TOKEN)
    serve.shutdown()  # a Serve instance of another module may listen elsewhere
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    app = build_app({"run_dir": str(run.root), "snapshots": str(reg)})
    serve.run(app, name=APP, route_prefix="/orders-test")
    yield f"http://127.0.0.1:{PORT}/orders-test", reg
    serve.delete(APP)
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_service_scores_an_order_like_the_scorer(run, data, snapshot, service):
    base, reg = service
    _, meta, rows = snapshot
    orders = load_orders_table(run)
    r = int(rows[0])
    ctx = _context(data, rows)[r]
    ts = (pd.Timestamp("1970-01-01") + pd.Timedelta(days=float(orders["t_days"][r]))).isoformat()
    body = {
        "order_id": "o-1",
        "ts": ts,
        "features": _features(run, r),
        "entities": [{"entity_type": t, "entity_id": i} for t, i in ctx],
    }
    auth = {"authorization": f"Bearer {TOKEN}"}
    url = f"{base}/v1/orders/score"
    assert httpx.post(url, json=body, timeout=60).status_code == 401
    res = httpx.post(url, json=body, headers=auth, timeout=60)
    assert res.status_code == 200, res.text
    out = res.json()
    scorer = OrderScorer(run, reg)
    want = scorer.score(scorer.raw_vector(body["features"]), ctx, float(orders["t_days"][r]))
    scorer.close()
    assert out["score"] == pytest.approx(want["score"], abs=1e-6)
    assert out["snapshot"] == meta["id"] and out["order_id"] == "o-1"
    raw_ids = [re.compile(rf"(?<![\w.]){re.escape(str(i))}(?![\w.])") for _, i in ctx]
    assert raw_ids and not any(p.search(res.text) for p in raw_ids)
    assert all(HEX32.match(e["key"]) for e in out["entities"])
    # bad input: a 422 naming the field
    bad = httpx.post(url, json={**body, "features": {"nope": 1.0}}, headers=auth, timeout=60)
    assert bad.status_code == 422 and "features" in json.dumps(bad.json()["detail"])
    old = httpx.post(url, json={**body, "ts": "2024-01-01"}, headers=auth, timeout=60)
    assert old.status_code == 422 and "ts" in json.dumps(old.json()["detail"])
    wrong = {**body, "entities": [{"entity_type": "phone", "entity_id": 1}]}
    assert httpx.post(url, json=wrong, headers=auth, timeout=60).status_code == 422
    assert httpx.get(f"{base}/healthz", timeout=30).json() == {"status": "ok"}
    info = httpx.get(f"{base}/v1/orders/model", headers=auth, timeout=30).json()
    assert info["family"] == "orders" and info["snapshot"] == meta["id"]
    # the decision log names entities by key only
    logs = list((reg / "decision_log").glob("online-*.jsonl"))
    text = "".join(p.read_text() for p in logs)
    assert '"order_score"' in text and all(e["key"] in text for e in out["entities"])
    assert not any(p.search(text) for p in raw_ids)
