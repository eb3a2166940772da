"""Online decisions: in-process compute per decision, and the Ray Serve API vs its echo floor.

The targets (the inductive-graph issue): a new applicant's decision (``for_applicants`` +
``evaluate`` + ``decide``, one applicant with a few links) computes in at most 3 ms in process;
through Ray Serve the p50 latency is at most 1.25x and the p99 at most 1.5x the floor of an echo
application of the same composition measured in the same run, at concurrency 1 and 8, for known
users and for new applicants.

* **In process**: the scoring context's functions on the promoted snapshot, one thread, for
  random applicants (the features of a random user of the data, its limit, and 4 links drawn from
  the recent links, so most name entities the snapshot knows) and random known users; median wall
  and CPU time per decision and the split between its parts.
* **Ray Serve** on loopback: two applications side by side, every deployment with one replica
  (no autoscaling): ``decision`` (:func:`creditgraph.serving.app.build_app`, bearer-token auth
  on) and ``echo``: a FastAPI ingress with the same path and JSON body, calling a first deployment
  (a plain method, as ``GraphEncoder.encode``) and then a second one with ``@serve.batch`` (the
  tower's batch size and wait), answering a tiny JSON. Load comes from a separate process
  (``httpx.AsyncClient``, N closed-loop clients, a warm-up then a measuring window), alternating
  between the two applications round by round so the slow drifts of a shared machine hit both.

Environment: BENCH_SERVING_CONCURRENCY ("1,8"), BENCH_SERVING_SECONDS (measuring window per
round, 15), BENCH_SERVING_WARMUP (3), BENCH_SERVING_ROUNDS (2), BENCH_SERVING_CALLS (in-process
decisions per kind, 1000), BENCH_SERVING_USERS (users of the run built when none is given,
20000), BENCH_SERVING_RUN / BENCH_SERVING_DATA (a trained run and its dataset to use instead;
default: ``runs/bench_serving``, built once and reused).
"""

# No `from __future__ import annotations`: FastAPI must see the echo request's annotations.
import asyncio
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI
from ray import serve

from benchmarks._measure import in_child
from benchmarks._report import markdown_table, write_section

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = [int(c) for c in os.environ.get("BENCH_SERVING_CONCURRENCY", "1,8").split(",")]
SECONDS = float(os.environ.get("BENCH_SERVING_SECONDS", "15"))
WARMUP = float(os.environ.get("BENCH_SERVING_WARMUP", "3"))
ROUNDS = int(os.environ.get("BENCH_SERVING_ROUNDS", "2"))
CALLS = int(os.environ.get("BENCH_SERVING_CALLS", "1000"))
USERS = int(os.environ.get("BENCH_SERVING_USERS", "20000"))
TARGET_MS, TARGET_P50, TARGET_P99 = 3.0, 1.25, 1.5
PATH = "/v1/decisions"
TOKEN = "bench-serving-token"
LINKS_PER_APPLICANT = 4


# --------------------------------------------------------------------------- the echo floor
echo_api = FastAPI(title="echo")


def _tower_batching() -> tuple[int, float]:
    """The OutcomeTower's ``@serve.batch`` settings, so the echo batches exactly alike."""
    from creditgraph.serving.app import OutcomeTower

    method = OutcomeTower.func_or_class.evaluate
    return method._get_max_batch_size(), method._get_batch_wait_timeout_s()


_BATCH_SIZE, _BATCH_WAIT = _tower_batching()


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class EchoFirst:
    """Stands for GraphEncoder: a plain method taking the request's payload."""

    def encode(self, payload: dict) -> dict:
        return {"user_id": payload.get("user_id")}


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class EchoSecond:
    """Stands for OutcomeTower: request batching with the tower's settings."""

    @serve.batch(max_batch_size=_BATCH_SIZE, batch_wait_timeout_s=_BATCH_WAIT)
    async def evaluate(self, items: list) -> list:
        return [len(items)] * len(items)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(echo_api)
class EchoAPI:
    def __init__(self, first, second):
        self.first = first
        self.second = second

    @echo_api.post(PATH)
    async def decide(self, req: dict) -> dict:
        enc = await self.first.encode.remote(req)
        batch = await self.second.evaluate.remote(enc["user_id"])
        return {"user_id": req.get("user_id"), "batch": batch}


def echo_app() -> serve.Application:
    return EchoAPI.options(num_replicas=1).bind(
        EchoFirst.options(num_replicas=1).bind(), EchoSecond.options(num_replicas=1).bind()
    )


# --------------------------------------------------------------------------- load generator
def _load(url: str, bodies: list, concurrency: int, warmup: float, seconds: float) -> dict:
    """Run in the load process: ``concurrency`` closed-loop clients; latencies of the window."""
    import httpx

    async def go() -> dict:
        rng = np.random.default_rng(concurrency)
        lat: list[float] = []
        errors = 0
        t_start = time.perf_counter()
        t_measure, t_end = t_start + warmup, t_start + warmup + seconds
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(limits=limits, timeout=30.0, headers=headers) as client:

            async def worker() -> None:
                nonlocal errors
                while (now := time.perf_counter()) < t_end:
                    r = await client.post(url, json=bodies[int(rng.integers(len(bodies)))])
                    done = time.perf_counter()
                    if now >= t_measure:
                        if r.status_code == 200:
                            lat.append(done - now)
                        else:
                            errors += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return {"latency_s": lat, "errors": errors, "seconds": seconds}

    return asyncio.run(go())


def _run_load(url: str, bodies_file: str, concurrency: int) -> dict:
    """The load generator in its own process, so it never shares the GIL with Serve's proxy."""
    return in_child(
        f"from benchmarks.bench_serving import _load; bodies = json.load(open({bodies_file!r}))",
        f"_load({url!r}, bodies, {concurrency}, {WARMUP}, {SECONDS})",
        "load generator",
    )


# --------------------------------------------------------------------------- the trained run
def trained_run() -> tuple[Path, Path, Path]:
    """``(run, data, registry)``: a trained run whose registry serves a snapshot of its data."""
    from creditgraph.config import PipelineConfig
    from creditgraph.pipeline import run_pipeline
    from creditgraph.serving.score import score_users
    from creditgraph.serving.snapshot import Registry
    from creditgraph.utils.io import read_json
    from creditgraph.utils.runtime import init_ray

    if os.environ.get("BENCH_SERVING_RUN"):
        run = Path(os.environ["BENCH_SERVING_RUN"]).resolve()
        data = Path(os.environ.get("BENCH_SERVING_DATA", run.parent / "data")).resolve()
        base = run.parent
    else:
        from creditgraph.data.simulate import SimulationConfig, simulate_to_dir

        base = ROOT / "runs" / "bench_serving"
        run, data = base / "run", base / "data"
        sim = SimulationConfig(n_users=USERS, seed=0)
        marker = data / "simulation.json"
        if not (marker.exists() and read_json(marker) == sim.model_dump(mode="json")):
            simulate_to_dir(sim, data)
        init_ray()
        run_pipeline(data, run, PipelineConfig(), stop_after="calibrate")
    registry = base / "bench_serving_snapshots"
    reg = Registry(registry)
    version = read_json(run / "model" / "model.json")["version"]
    current = reg.current()
    if current is None or reg.meta(current)["model_version"] != version:
        init_ray()
        with tempfile.TemporaryDirectory(prefix="bench_serving_scores_") as tmp:
            score_users(run, data, Path(tmp) / "out", registry=registry, promote=True)
    return run, data, registry


def _requests(run: Path, data: Path, registry: Path, n: int = 500) -> dict:
    """Request bodies for known users and for new applicants, and the in-process inputs."""
    import pandas as pd

    from creditgraph.serving.snapshot import Registry
    from creditgraph.utils.io import read_json

    spec = read_json(run / "graph" / "manifest.json")["dataset"]
    id_col, features = spec["id"], read_json(run / "model" / "model.json")["spec"]["feature_names"]
    users = pd.read_parquet(data / "users.parquet")
    links = pd.read_parquet(data / "links.parquet")
    meta = Registry(registry).meta(Registry(registry).current())
    t = pd.Timestamp(meta["decision_time"])
    recent = links[(links.ts > t - pd.Timedelta(days=60)) & (links.ts <= t)]
    rng = np.random.default_rng(0)
    rows = users.iloc[rng.integers(0, len(users), n)]
    picks = recent.iloc[rng.integers(0, len(recent), n * LINKS_PER_APPLICANT)]
    applicants = []
    for i, (_, row) in enumerate(rows.iterrows()):
        feats = {f: (None if pd.isna(row[f]) else float(row[f])) for f in features}
        chosen = picks.iloc[i * LINKS_PER_APPLICANT : (i + 1) * LINKS_PER_APPLICANT]
        applicants.append(
            {
                "features": feats,
                "limit": float(row[spec["treatment"]]),
                "as_of": t.isoformat(),
                "links": [
                    {
                        "entity_type": str(lk.entity_type),
                        "entity_id": lk.entity_id.item()
                        if hasattr(lk.entity_id, "item")
                        else lk.entity_id,
                        "ts": (t - pd.Timedelta(days=1)).isoformat(),
                    }
                    for lk in chosen.itertuples()
                ],
            }
        )
    known = [{"user_id": v.item() if hasattr(v, "item") else v} for v in rows[id_col].to_numpy()]
    return {"known": known, "applicant": applicants}


# --------------------------------------------------------------------------- in process
def profile_decisions(run: Path, registry: Path, bodies: dict, calls: int) -> list[dict]:
    """Median wall and CPU time per decision and its parts, one thread, no Serve."""
    import pandas as pd
    import torch

    from creditgraph.serving.context import (
        Applicant,
        ScoringBundle,
        decide,
        encode,
        for_applicants,
        read_known,
        tower,
    )
    from creditgraph.serving.snapshot import Registry

    torch.set_num_threads(1)
    bundle = ScoringBundle.load(run)
    snap = Registry(registry).open()
    grid = bundle.policy.grid_values()
    t_days = snap.meta["decision_time_days"]
    epoch = pd.Timestamp("1970-01-01")

    def days(text: str) -> float:
        return (pd.Timestamp(text) - epoch) / pd.Timedelta(days=1)

    apps = [
        Applicant(
            user_id=None,
            raw=np.array(
                [
                    np.nan if b["features"][f] is None else b["features"][f]
                    for f in bundle.feature_names
                ]
            ),
            limit=b["limit"],
            as_of=days(b["as_of"]),
            links=[(lk["entity_type"], lk["entity_id"], days(lk["ts"])) for lk in b["links"]],
        )
        for b in bodies["applicant"]
    ]
    known = [b["user_id"] for b in bodies["known"]]
    rows = []
    for kind, items in (("new applicant", apps), ("known user", known)):
        parts = {"context": [], "encode": [], "tower": [], "decide": [], "total": [], "cpu": []}

        def one(item, parts=parts, kind=kind) -> None:
            c0, t0 = time.thread_time(), time.perf_counter()
            if kind == "new applicant":
                ctx = for_applicants(bundle, snap, [item])
            else:
                ctx = read_known(snap, [item])
            t1 = time.perf_counter()
            enc = encode(bundle, ctx)
            t2 = time.perf_counter()
            ev = tower(bundle, enc, grid)
            t3 = time.perf_counter()
            decide(bundle, ev, ctx, grid, decision_time=t_days)
            t4 = time.perf_counter()
            cpu = time.thread_time() - c0
            times = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0, cpu)
            for k, v in zip(parts, times, strict=True):
                parts[k].append(v)

        for i in range(50):  # warm-up
            one(items[i % len(items)])
        for v in parts.values():
            v.clear()
        for i in range(calls):
            one(items[i % len(items)])
        med = {k: float(np.median(v)) * 1e3 for k, v in parts.items()}
        rows.append(
            {
                "decision": kind,
                "context (snapshot reads, last hop) ms": round(med["context"], 3),
                "encode ms": round(med["encode"], 3),
                "tower ms": round(med["tower"], 3),
                "decide ms": round(med["decide"], 3),
                "total ms (p50)": round(med["total"], 3),
                "total ms (p90)": round(float(np.percentile(parts["total"], 90)) * 1e3, 3),
                "CPU ms (p50)": round(med["cpu"], 3),
                f"within {TARGET_MS:g} ms": "yes" if med["total"] <= TARGET_MS else "no",
            }
        )
    snap.close()
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
        "rps": len(lat) / seconds,
    }


def measure(run: Path, registry: Path, bodies: dict) -> dict:
    """Deploy both apps, alternate load between them; ``{(app, kind, c): summary}``."""
    import httpx
    import ray

    from creditgraph.serving.app import TOKEN_ENV, build_app
    from creditgraph.utils.runtime import init_ray

    os.environ[TOKEN_ENV] = TOKEN
    init_ray()
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    raw: dict = {}
    files = {}
    try:
        args = {"run_dir": str(run), "snapshots": str(registry), "replicas": 1}
        serve.run(build_app(args), name="decision", route_prefix="/decision")
        serve.run(echo_app(), name="echo", route_prefix="/echo")
        urls = {app: f"http://127.0.0.1:{port}/{app}{PATH}" for app in ("echo", "decision")}
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for app, url in urls.items():  # both answer before anything is timed
            for kind in ("known", "applicant"):
                r = httpx.post(url, json=bodies[kind][0], headers=auth, timeout=60)
                r.raise_for_status()
                print(f"{app} {kind}: {len(r.content)} bytes per answer")
        for kind in ("known", "applicant"):
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
                json.dump(bodies[kind], fh)
            files[kind] = fh.name
        for c in CONCURRENCY:
            for kind in ("known", "applicant"):
                for rnd in range(ROUNDS):
                    order = ("echo", "decision") if rnd % 2 == 0 else ("decision", "echo")
                    for app in order:
                        res = _run_load(urls[app], files[kind], c)
                        raw.setdefault((app, kind, c), []).append(res)
                        lat = np.asarray(res["latency_s"]) * 1e3
                        print(
                            f"c={c} {kind:9s} round {rnd} {app:8s}: p50 "
                            f"{np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms,"
                            f" {len(lat) / SECONDS:.0f} req/s, {res['errors']} errors"
                        )
    finally:
        for f in files.values():
            os.unlink(f)
        serve.shutdown()
        ray.shutdown()
    return {k: _summary(v) for k, v in raw.items()}


def main() -> None:
    t_all = time.perf_counter()
    run, data, registry = trained_run()
    bodies = _requests(run, data, registry)
    print(f"bench_serving: run {run}, snapshot registry {registry}")
    load_in = os.getloadavg()[0]
    prof = profile_decisions(run, registry, bodies, CALLS)
    for row in prof:
        print(row)
    load_serve = os.getloadavg()[0]
    res = measure(run, registry, bodies)
    load_end = os.getloadavg()[0]

    rows, ratios = [], []
    for kind in ("known", "applicant"):
        for c in CONCURRENCY:
            e, d = res[("echo", kind, c)], res[("decision", kind, c)]
            for app, s in (("echo (Ray Serve floor)", e), ("decision API", d)):
                rows.append(
                    {
                        "request": kind,
                        "concurrency": c,
                        "app": app,
                        "requests": s["requests"],
                        "errors": s["errors"],
                        "p50 ms": round(s["p50"], 2),
                        "p90 ms": round(s["p90"], 2),
                        "p99 ms": round(s["p99"], 2),
                        "req/s": round(s["rps"], 1),
                    }
                )
            r50, r99 = d["p50"] / e["p50"], d["p99"] / e["p99"]
            ratios.append(
                {
                    "request": kind,
                    "concurrency": c,
                    "p50 decision/echo": round(r50, 2),
                    f"p50 <= {TARGET_P50}x": "yes" if r50 <= TARGET_P50 else "no",
                    "p99 decision/echo": round(r99, 2),
                    f"p99 <= {TARGET_P99}x": "yes" if r99 <= TARGET_P99 else "no",
                    "req/s decision/echo": round(d["rps"] / e["rps"], 2),
                }
            )
    shown = run.relative_to(ROOT) if run.is_relative_to(ROOT) else run
    body = (
        f"Trained run `{shown}` (its promoted snapshot); 1-minute load average {load_in:.1f} "
        f"before the in-process part, {load_serve:.1f} before and {load_end:.1f} after the Serve "
        "part (other work shares the machine).\n\n"
        f"### One decision in process (target: a new applicant within {TARGET_MS:g} ms)\n\n"
        f"Median over {CALLS:,} decisions of each kind, one thread: a new applicant (a random "
        f"user's features and limit, {LINKS_PER_APPLICANT} links drawn from the last 60 days' "
        "links) through `for_applicants` + `encode` + `tower` + `decide`; a known user through "
        "`read_known` and the same three.\n\n"
        + markdown_table(prof)
        + "\n\n### Through Ray Serve vs the echo floor\n\n"
        "Local Ray runtime, Ray Serve's HTTP proxy on 127.0.0.1, both applications side by side "
        f"with **1 replica per deployment** (0.25 CPU each, no autoscaling), bearer-token auth "
        f"on the decision API. Load: a separate process, N closed-loop clients, {WARMUP:.0f}s "
        f"warm-up + {SECONDS:.0f}s measured per round, {ROUNDS} rounds per app, request kind and "
        "concurrency, the apps alternating. The echo app has the decision API's composition "
        "(FastAPI ingress -> a plain deployment -> a `@serve.batch` deployment with "
        f"max_batch_size={_BATCH_SIZE}, batch_wait_timeout_s={_BATCH_WAIT}), the same path and "
        "JSON bodies, and answers a tiny JSON; the decision API answers with the whole curve, "
        "the reasons and the entities used, and appends to the decision log.\n\n"
        + markdown_table(rows)
        + "\n\n"
        + markdown_table(ratios)
        + f"\n\nWhole benchmark: {time.perf_counter() - t_all:.0f}s. Latency is measured by the "
        "client (its own overhead included, equal for both apps); the machine's cores are "
        "shared by the proxy, the six replicas and the load process."
    )
    write_section(
        "Online decision API vs Ray Serve echo floor", body, "benchmarks/bench_serving.py"
    )
    print(body)


if __name__ == "__main__":
    main()
