"""Online decision API vs the Ray Serve echo floor, plus where the time of one decision goes.

One local Ray runtime and Ray Serve on loopback host two applications side by side:

* ``decision``: the real app (:func:`creditgraph.serving.app.build_app`) on a trained run:
  ingress ``DecisionAPI`` -> ``GraphEncoder`` (store reads + last hop) -> ``OutcomeTower``
  (``@serve.batch``) -> limit policy;
* ``echo``: the same composition doing nothing: a FastAPI ingress with the same path and JSON
  body, calling a first deployment and then a second one with ``@serve.batch`` (the tower's batch
  size and wait), answering a tiny JSON. Its latency is Ray Serve's own floor for this shape.

Load comes from a separate Python process (``httpx.AsyncClient``, N concurrent requests for
random known user ids, a warm-up and then a fixed measuring window), alternating between the two
apps round by round so slow drifts of a shared machine hit both alike. Every deployment runs one
replica (fixed, no autoscaling). The in-process breakdown times the replica classes' own code
(``GraphEncoder.func_or_class`` etc.) without Serve.

Environment: BENCH_SERVING_CONCURRENCY (default "1,8"), BENCH_SERVING_SECONDS (measuring window
per round, default 15), BENCH_SERVING_WARMUP (default 3), BENCH_SERVING_ROUNDS (default 2),
BENCH_SERVING_RUN (a trained run to use; default ``demo_runs/run`` when valid, else one is built
at 20k users under ``runs/bench_serving``), BENCH_SERVING_PROFILE (calls in the breakdown, 1000).
"""

# No `from __future__ import annotations`: FastAPI must see the echo request model itself.
import asyncio
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr
from ray import serve

from benchmarks._measure import in_child
from benchmarks._report import markdown_table, write_section

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = [int(c) for c in os.environ.get("BENCH_SERVING_CONCURRENCY", "1,8").split(",")]
SECONDS = float(os.environ.get("BENCH_SERVING_SECONDS", "15"))
WARMUP = float(os.environ.get("BENCH_SERVING_WARMUP", "3"))
ROUNDS = int(os.environ.get("BENCH_SERVING_ROUNDS", "2"))
PROFILE_CALLS = int(os.environ.get("BENCH_SERVING_PROFILE", "1000"))
USERS = 20_000
TARGET = 1.5
PATH = "/v1/decisions"


# --------------------------------------------------------------------------- the echo floor
class EchoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: StrictStr | StrictInt


echo_api = FastAPI(title="echo")


def _tower_batching() -> tuple[int, float]:
    """The OutcomeTower's ``@serve.batch`` settings, so the echo batches exactly alike."""
    from creditgraph.serving.app import OutcomeTower

    curves = OutcomeTower.func_or_class.curves
    return curves._get_max_batch_size(), curves._get_batch_wait_timeout_s()


_BATCH_SIZE, _BATCH_WAIT = _tower_batching()


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class EchoFirst:
    """Stands for GraphEncoder: a plain (sync) method."""

    def encode(self, user_id):
        return {"user_id": user_id}


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class EchoSecond:
    """Stands for OutcomeTower: request batching with the tower's settings."""

    @serve.batch(max_batch_size=_BATCH_SIZE, batch_wait_timeout_s=_BATCH_WAIT)
    async def curves(self, items: list) -> list:
        return [len(items)] * len(items)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(echo_api)
class EchoAPI:
    def __init__(self, first, second):
        self.first = first
        self.second = second

    @echo_api.post(PATH)
    async def decide(self, req: EchoRequest) -> dict:
        enc = await self.first.encode.remote(req.user_id)
        batch = await self.second.curves.remote(enc["user_id"])
        return {"user_id": req.user_id, "batch": batch}


def echo_app() -> serve.Application:
    return EchoAPI.options(num_replicas=1).bind(
        EchoFirst.options(num_replicas=1).bind(), EchoSecond.options(num_replicas=1).bind()
    )


# --------------------------------------------------------------------------- load generator
def _load(url: str, ids: list, concurrency: int, warmup: float, seconds: float) -> dict:
    """Run in the load process: ``concurrency`` closed-loop clients; latencies of the window."""
    import httpx

    async def go() -> dict:
        rng = np.random.default_rng(concurrency)
        lat: list[float] = []
        errors = 0
        t_start = time.perf_counter()
        t_measure, t_end = t_start + warmup, t_start + warmup + seconds
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:

            async def worker() -> None:
                nonlocal errors
                while (now := time.perf_counter()) < t_end:
                    body = {"user_id": ids[int(rng.integers(len(ids)))]}
                    r = await client.post(url, json=body)
                    done = time.perf_counter()
                    if now >= t_measure:
                        if r.status_code == 200:
                            lat.append(done - now)
                        else:
                            errors += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {"latency_s": lat, "errors": errors, "seconds": seconds}

    return asyncio.run(go())


def _run_load(url: str, ids_file: str, concurrency: int) -> dict:
    """The load generator in its own process, so it never shares the GIL with Serve's client."""
    return in_child(
        f"from benchmarks.bench_serving import _load; ids = json.load(open({ids_file!r}))",
        f"_load({url!r}, ids, {concurrency}, {WARMUP}, {SECONDS})",
        "load generator",
    )


# --------------------------------------------------------------------------- the trained run
def _run_is_usable(run: Path) -> bool:
    if not ((run / "model" / "model.json").exists() and (run / "graph" / "manifest.json").exists()):
        return False
    try:
        from creditgraph.model.artifact import load_model

        load_model(run / "model")
    except Exception as exc:  # a run from older code: build a fresh one instead
        print(f"bench_serving: {run} is not loadable ({exc}); building a new run")
        return False
    return True


def trained_run() -> Path:
    """A trained run with a fresh embedding store holding the batch's cluster caps."""
    from creditgraph.config import PipelineConfig
    from creditgraph.serving.embed import default_store_uri
    from creditgraph.serving.score import score_users
    from creditgraph.serving.store import open_store
    from creditgraph.utils.io import read_json

    if os.environ.get("BENCH_SERVING_RUN"):
        run = Path(os.environ["BENCH_SERVING_RUN"]).resolve()
        data = Path(os.environ.get("BENCH_SERVING_DATA", run.parent / "data"))
    elif _run_is_usable(ROOT / "demo_runs" / "run"):
        run, data = ROOT / "demo_runs" / "run", ROOT / "demo_runs" / "data"
    else:
        from creditgraph.data.simulate import SimulationConfig, simulate_to_dir
        from creditgraph.pipeline import run_pipeline

        base = ROOT / "runs" / "bench_serving"
        run, data = base / "run", base / "data"
        sim = SimulationConfig(n_users=USERS, seed=0)
        marker = data / "simulation.json"
        if not (marker.exists() and read_json(marker) == sim.model_dump(mode="json")):
            simulate_to_dir(sim, data)
        run_pipeline(data, run, PipelineConfig(), stop_after="train")
    uri = default_store_uri(run)
    fp = read_json(run / "model" / "model.json")["summary"]["fingerprint"]
    fresh = False
    if Path(uri).exists():
        with open_store(uri) as st:
            meta = st.get_json("meta") or {}
            fresh = meta.get("model_fingerprint") == fp and st.count("cap") > 0
    if not fresh:  # builds the store if needed and writes the per-user caps
        with tempfile.TemporaryDirectory(prefix="bench_serving_scores_") as tmp:
            score_users(run, data, Path(tmp) / "out", PipelineConfig())
    return run


def _user_ids(run: Path) -> list:
    import pandas as pd

    from creditgraph.utils.io import read_json

    id_col = read_json(run / "graph" / "manifest.json")["dataset"]["id"]
    ids = pd.read_parquet(run / "graph" / "users.parquet", columns=[id_col])[id_col]
    return [v.item() if hasattr(v, "item") else v for v in ids.to_numpy()]


# --------------------------------------------------------------------------- in-process profile
class _Timer:
    """Accumulates wall time per label of wrapped callables (re-entrant calls count once)."""

    def __init__(self):
        self.total: dict[str, float] = {}
        self._depth: dict[str, int] = {}

    def wrap(self, obj, attr: str, label: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            depth = self._depth.get(label, 0)
            self._depth[label] = depth + 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[label] = depth
                if depth == 0:
                    self.total[label] = self.total.get(label, 0.0) + time.perf_counter() - t0

        setattr(obj, attr, timed)


def profile_decision(run: Path, ids: list, calls: int) -> list[dict]:
    """Mean µs per decision of each part of the decision path, in one process without Serve."""
    from creditgraph.config import PipelineConfig
    from creditgraph.policy.decide import online_decision
    from creditgraph.serving.app import GraphEncoder, OutcomeTower

    enc = GraphEncoder.func_or_class(str(run))
    tower = OutcomeTower.func_or_class(str(run))
    tower_fn = OutcomeTower.func_or_class.curves.__wrapped__  # the batch body, without the queue
    policy = PipelineConfig().policy
    grid = policy.grid.values()
    grid_t = tuple(float(g) for g in grid)
    timer = _Timer()
    sc, model = enc.scorer, enc.scorer.model
    timer.wrap(enc.store, "get_arrays", "store reads")
    timer.wrap(enc.store, "get_array", "store reads")
    timer.wrap(sc, "_inputs", "standardize + teacher prior")
    timer.wrap(model.encoder, "forward", "feature encoder h0")
    timer.wrap(sc, "_interference", "last hop + hop attention")
    if model.dsl is not None:
        timer.wrap(model.dsl, "forward", "DSL encoder")
    timer.wrap(sc, "dsl", "DSL score")
    rng = np.random.default_rng(0)
    picks = [ids[int(i)] for i in rng.integers(0, len(ids), calls + 50)]
    for uid in picks[:50]:  # warm-up (first calls allocate)
        e = enc.encode(uid, None)
        asyncio.run(tower_fn(tower, [(e["x"], grid_t)]))
    timer.total.clear()
    t_enc = t_tower = t_policy = 0.0
    for uid in picks[50:]:
        t0 = time.perf_counter()
        e = enc.encode(uid, None)
        t1 = time.perf_counter()
        curve = asyncio.run(tower_fn(tower, [(e["x"], grid_t)]))[0]
        t2 = time.perf_counter()
        online_decision(
            curve,
            grid,
            dsl_score=e["dsl_score"],
            user_cap=e["user_cap"],
            guardrail_rule=e["rule"],
            cluster_id=e["cluster_id"],
            config=policy,
        )
        t3 = time.perf_counter()
        t_enc, t_tower, t_policy = t_enc + t1 - t0, t_tower + t2 - t1, t_policy + t3 - t2
    enc.store.close()
    rows = [
        {"part": f"GraphEncoder: {k}", "µs per decision": v / calls * 1e6}
        for k, v in timer.total.items()
    ]
    rows.append(
        {
            "part": "GraphEncoder: glue (tensors, numpy, dicts)",
            "µs per decision": (t_enc - sum(timer.total.values())) / calls * 1e6,
        }
    )
    rows.append({"part": "GraphEncoder total", "µs per decision": t_enc / calls * 1e6})
    rows.append(
        {
            "part": "OutcomeTower (batch of 1, incl. an event loop)",
            "µs per decision": t_tower / calls * 1e6,
        }
    )
    rows.append({"part": "policy (online_decision)", "µs per decision": t_policy / calls * 1e6})
    rows.append(
        {"part": "all compute", "µs per decision": (t_enc + t_tower + t_policy) / calls * 1e6}
    )
    return rows


# --------------------------------------------------------------------------- the benchmark
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(runs: list[dict]) -> dict:
    lat = np.concatenate([np.asarray(r["latency_s"]) for r in runs]) * 1e3
    seconds = sum(r["seconds"] for r in runs)
    return {
        "requests": len(lat),
        "errors": sum(r["errors"] for r in runs),
        "p50": float(np.percentile(lat, 50)),
        "p90": float(np.percentile(lat, 90)),
        "p99": float(np.percentile(lat, 99)),
        "mean": float(lat.mean()),
        "rps": len(lat) / seconds,
    }


def measure(run: Path, ids: list) -> dict:
    """Deploy both apps, alternate load between them; ``{(app, c): summary}``."""
    import httpx
    import ray

    from creditgraph.serving.app import build_app
    from creditgraph.utils.runtime import init_ray

    init_ray()
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(
            build_app({"run_dir": str(run)}, replicas=1), name="decision", route_prefix="/decision"
        )
        serve.run(echo_app(), name="echo", route_prefix="/echo")
        urls = {app: f"http://127.0.0.1:{port}/{app}{PATH}" for app in ("echo", "decision")}
        for app, url in urls.items():  # both answer before anything is timed
            r = httpx.post(url, json={"user_id": ids[0]}, timeout=60)
            r.raise_for_status()
            print(f"{app}: {len(r.content)} bytes per answer")
        raw: dict = {}
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
            json.dump(ids, fh)
        try:
            for c in CONCURRENCY:
                for rnd in range(ROUNDS):
                    order = ("echo", "decision") if rnd % 2 == 0 else ("decision", "echo")
                    for app in order:
                        res = _run_load(urls[app], fh.name, c)
                        raw.setdefault((app, c), []).append(res)
                        lat = np.asarray(res["latency_s"]) * 1e3
                        print(
                            f"c={c} round {rnd} {app:8s}: p50 {np.percentile(lat, 50):.2f} ms, "
                            f"p99 {np.percentile(lat, 99):.2f} ms, {len(lat) / SECONDS:.0f} req/s, "
                            f"{res['errors']} errors"
                        )
        finally:
            os.unlink(fh.name)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {k: _summary(v) for k, v in raw.items()}


def main() -> None:
    t_all = time.perf_counter()
    run = trained_run()
    ids = _user_ids(run)
    print(f"bench_serving: run {run}, {len(ids):,} users")
    prof = profile_decision(run, ids, PROFILE_CALLS)
    for row in prof:
        print(f"  {row['part']:55s} {row['µs per decision']:8.0f} µs")
    res = measure(run, ids)

    rows, ratios = [], []
    for c in CONCURRENCY:
        e, d = res[("echo", c)], res[("decision", c)]
        for app, s in (("echo (Ray Serve floor)", e), ("decision API", d)):
            rows.append(
                {
                    "app": app,
                    "concurrency": c,
                    "requests": s["requests"],
                    "errors": s["errors"],
                    "p50 ms": round(s["p50"], 2),
                    "p90 ms": round(s["p90"], 2),
                    "p99 ms": round(s["p99"], 2),
                    "req/s": round(s["rps"], 1),
                }
            )
        ratios.append(
            {
                "concurrency": c,
                "p50 ratio decision/echo": round(d["p50"] / e["p50"], 2),
                "p99 ratio decision/echo": round(d["p99"] / e["p99"], 2),
                "req/s ratio decision/echo": round(d["rps"] / e["rps"], 2),
                f"p50 within {TARGET}x": "yes" if d["p50"] / e["p50"] <= TARGET else "no",
            }
        )
    prof_rows = [{**r, "µs per decision": round(r["µs per decision"])} for r in prof]
    body = (
        f"Trained run `{run.relative_to(ROOT) if run.is_relative_to(ROOT) else run}` "
        f"({len(ids):,} users); local Ray runtime, Ray Serve HTTP proxy on 127.0.0.1; "
        "both applications deployed side by side with **1 replica per deployment** "
        f"(0.25 CPU each, no autoscaling). Load: a separate process with `httpx.AsyncClient`, "
        f"N closed-loop concurrent requests for random known user ids, {WARMUP:.0f}s warm-up + "
        f"{SECONDS:.0f}s measured per round, {ROUNDS} rounds per app and concurrency, the two "
        "apps alternating. The echo app has the same composition (FastAPI ingress -> a plain "
        f"deployment -> a `@serve.batch` deployment with the tower's max_batch_size={_BATCH_SIZE} "
        f"and batch_wait_timeout_s={_BATCH_WAIT}), the same path and JSON body, and returns a "
        "tiny JSON; the decision answers with the whole 51-point curve.\n\n"
        + markdown_table(rows)
        + "\n\n"
        + markdown_table(ratios)
        + "\n\n### Where the time of one decision goes (in process, no Serve)\n\n"
        f"Mean over {PROFILE_CALLS:,} random users, one thread, the replica classes' own code "
        "(`GraphEncoder.func_or_class`, the OutcomeTower's batch body on a batch of one, "
        "`online_decision`).\n\n"
        + markdown_table(prof_rows)
        + f"\n\nWhole benchmark: {time.perf_counter() - t_all:.0f}s. Latency is measured by the "
        "client (its own overhead included, equal for both apps); the machine's 2 cores are "
        "shared by the proxy, the six replicas and the load process."
    )
    write_section(
        "Online decision API vs Ray Serve echo floor", body, "benchmarks/bench_serving.py"
    )
    print(body)


if __name__ == "__main__":
    main()
