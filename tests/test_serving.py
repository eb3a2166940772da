"""The online decision service on Ray Serve: equality with batch scoring, validation, resilience."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pandas as pd
import pytest

from creditgraph.config import PipelineConfig
from creditgraph.serving.app import TOKEN_ENV, build_app
from creditgraph.serving.score import score_users

PORT = 8765
URL = f"http://127.0.0.1:{PORT}"
TOKEN = "s3cret-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def batch(trained_run, sim_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_scores") / "out"
    score_users(trained_run, sim_data, out, PipelineConfig())  # also writes the per-user caps
    return pd.read_parquet(out / "decisions.parquet"), pd.read_parquet(out / "curves.parquet")


@pytest.fixture(scope="module")
def service(trained_run, batch):
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    app = build_app({"run_dir": str(trained_run)}, replicas=2, ingress_env={TOKEN_ENV: TOKEN})
    serve.run(app, name="creditgraph", route_prefix="/")
    yield URL
    serve.delete("creditgraph")


def _post(body: dict) -> httpx.Response:
    return httpx.post(f"{URL}/v1/decisions", json=body, headers=AUTH, timeout=30)


def test_online_decision_equals_batch_scoring(service, batch):
    dec, cur = batch
    sample = dec.sort_values("user_id").iloc[:: max(1, len(dec) // 25)]
    assert set(sample["binding_constraint"]) >= {"risk_ceiling"} or len(sample) > 0
    for _, row in sample.iterrows():
        r = _post({"user_id": int(row.user_id)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["limit"] == pytest.approx(row.limit, abs=1e-5)
        assert body["p_default_at_limit"] == pytest.approx(row.p_default_at_limit, abs=1e-5)
        assert body["dsl_score"] == pytest.approx(row.dsl_score, abs=1e-5)
        assert body["binding_constraint"] == row.binding_constraint
        mine = cur[cur.user_id == row.user_id].sort_values("limit")
        np.testing.assert_allclose(body["curve"]["p_default"], mine["p_default"], atol=1e-5)
        assert body["model_version"]


def test_fresh_features_and_custom_grid_change_the_answer(service, batch):
    uid = int(batch[0]["user_id"].iloc[0])
    base = _post({"user_id": uid}).json()
    grid = {"start": 0, "stop": 20_000, "step": 500}
    r = _post({"user_id": uid, "r_max": 0.3, "grid": grid, "features": {"late_payment_ratio": 0.9}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["curve"]["limit"]) == 41 and body["r_max"] == 0.3
    assert body["curve"]["p_default"] != base["curve"]["p_default"][:41]


def test_health_model_and_openapi(service):
    assert httpx.get(f"{URL}/healthz").json() == {"status": "ok"}  # no token needed
    info = httpx.get(f"{URL}/v1/model", headers=AUTH).json()
    assert info["model_version"] and info["users"] > 0 and "gmv_90d" in info["features"]
    assert "/v1/decisions" in httpx.get(f"{URL}/openapi.json", headers=AUTH).json()["paths"]


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"user_id": 1}, 404, None),
        ({"user_id": 10000000, "features": {"gmv_90d": float("nan")}}, 422, "gmv_90d"),
        ({"user_id": 10000000, "features": {"gmv_90d": "lots"}}, 422, "gmv_90d"),
        ({"user_id": 10000000, "features": {"no_such_feature": 1.0}}, 422, "no_such_feature"),
        ({"user_id": 1.5}, 422, "user_id"),
        ({"user_id": 10000000, "r_max": "high"}, 422, "r_max"),
        ({"user_id": 10000000, "r_max": 1.5}, 422, "r_max"),
        ({"user_id": 10000000, "grid": {"start": 0, "stop": 1e9, "step": 1}}, 422, "grid"),
        ({"user_id": 10000000, "surprise": 1}, 422, "surprise"),
    ],
)
def test_bad_requests_are_rejected_with_the_field_named(service, body, code, field):
    content = json.dumps(body, allow_nan=True)  # NaN is sent as the JSON literal NaN
    headers = {"content-type": "application/json", **AUTH}
    r = httpx.post(f"{URL}/v1/decisions", content=content, headers=headers, timeout=30)
    assert r.status_code == code, r.text
    if field:
        assert field in r.text


def test_oversize_body_is_413(service):
    body = {"user_id": 10000000, "features": {f"f{i}": 1.0 for i in range(10_000)}}
    r = _post(body)
    assert r.status_code == 413


def test_bearer_token_is_required(service):
    url = f"{URL}/v1/model"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    assert httpx.post(f"{URL}/v1/decisions", json={"user_id": 1}, timeout=30).status_code == 401
    assert httpx.get(url, headers=AUTH, timeout=30).status_code == 200


def test_killing_a_replica_under_load_recovers(service, batch):
    import ray

    def encoder_replicas() -> list[dict]:
        named = ray.util.list_named_actors(all_namespaces=True)
        return [a for a in named if a["namespace"] == "serve" and "GraphEncoder" in a["name"]]

    ids = [int(u) for u in batch[0]["user_id"].iloc[:50]]
    log: list[tuple[float, bool]] = []
    stop = threading.Event()

    def load() -> None:
        i = 0
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.post(
                        f"{URL}/v1/decisions", json={"user_id": ids[i % len(ids)]}, headers=AUTH
                    )
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                log.append((time.monotonic(), ok))
                i += 1

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)
    replicas = encoder_replicas()
    assert len(replicas) == 2
    victim = ray.get_actor(replicas[0]["name"], namespace="serve")
    t_kill = time.monotonic()
    ray.kill(victim, no_restart=True)
    time.sleep(15)  # Serve notices the dead replica and starts a replacement
    stop.set()
    for t in threads:
        t.join()
    before = [ok for t, ok in log if t < t_kill]
    after = [ok for t, ok in log if t > t_kill]
    errors = sum(not ok for ok in after)
    last = [ok for t, ok in log if t > log[-1][0] - 5]  # the final 5 seconds
    assert before and all(before)
    assert len(after) > 20
    assert all(last), f"errors still happening at the end ({errors} errors after the kill)"
    alive = encoder_replicas()
    assert len(alive) == 2 and replicas[0]["name"] not in {a["name"] for a in alive}, "not replaced"
    print(f"{errors} errors out of {len(after)} requests after the kill")
