"""Serving the order-risk network: batch scoring on Ray Data, snapshots, and online scoring on
Ray Serve (seed 001's two-stage inference, §3.4).

* **Batch** (:func:`score_orders`, :func:`embed_and_score`): Ray Data runs the network over the
  run's ClusterGCN shards on an actor pool (the model loaded once per actor); every shard gives
  its owned orders' fraud logits and its owned entity slices' final embeddings, exactly the
  full-graph values. Scores are written as a backfill (``OUT/scores.parquet``).
* **Snapshot** (:func:`publish_order_snapshot`): for a decision time ``T``, every entity's
  embedding at its latest slice before ``T``'s slice (within the history window), keyed by the
  keyed hash of (type, id), in a :class:`~creditgraph.serving.snapshot.Registry` snapshot
  (namespace ``order_entity``). The entity stack's work is done here, in batch.
* **Online** (:class:`OrderScorer`): an order's raw features and the entities it names; the
  GBDT leaves and the order encoding are computed in process, the entities' embeddings are read
  from the snapshot by key, and only the last hop runs (:meth:`OrderNet.hop`, the function batch
  scoring runs too, so an order of ``T``'s slice gets the batch score to 1e-5, tested). Each
  entity's contribution is the drop in the fraud score without it; responses and logs name
  entities by their keyed hash only.
* **Ray Serve** (:func:`build_orders_app`): one ingress deployment, ``POST /v1/orders/score``,
  ``GET /v1/orders/model``, ``GET /healthz``, with the decision API's bearer-token auth and body
  limit; it follows the registry's promoted snapshot without a restart. ``serving/app.py``'s
  ``build_app`` builds it when the run is an orders run.
"""

# No `from __future__ import annotations`: FastAPI must see the request model classes themselves.
import logging
import math
import os
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import ray
import ray.data
import torch
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr
from ray import serve

from creditgraph.causal.leaves import LeafEncoder
from creditgraph.graph.entities import entity_key, normalize_id
from creditgraph.graph.events import event_salt, event_shard_paths, load_orders_table, slice_of
from creditgraph.graph.features import FeatureStandardizer
from creditgraph.layout import ModelFiles, RunLayout, as_layout
from creditgraph.model.orders import (
    OrderNet,
    infer_rows,
    inputs_for,
    load_order_model,
    shard_arrays,
)
from creditgraph.serving import records
from creditgraph.serving.app import (
    ADMIN_TOKEN_ENV,
    MAX_BODY_BYTES,
    TOKEN_ENV,
    BodyLimit,
    Caller,
    ServeArgs,
    _invalid,
    _unprocessable,
)
from creditgraph.serving.decision_log import DecisionLog
from creditgraph.serving.snapshot import Registry, Snapshot, SnapshotError, new_snapshot_id
from creditgraph.utils.io import atomic_dir, read_json, write_json
from creditgraph.utils.runtime import require_ray

log = logging.getLogger("creditgraph.serving.orders")

NAMESPACE = "order_entity"
EPOCH = pd.Timestamp("1970-01-01")
MAX_ENTITIES = 64
TOP_K = 5


def order_entity_dtype(hidden: int) -> np.dtype:
    """A stored entity: its type, the slice its embedding is from, the embedding."""
    return np.dtype([("type", "<i2"), ("slice", "<i8"), ("emb", "<f4", (hidden,))])


def _iso(days: float) -> str:
    return (EPOCH + pd.Timedelta(days=float(days))).isoformat()


def _to_days(text: str | None) -> float:
    if text is None:
        return (pd.Timestamp.now(tz="UTC").tz_localize(None) - EPOCH) / pd.Timedelta(days=1)
    t = pd.Timestamp(text)
    if t.tzinfo is not None:
        t = t.tz_convert("UTC").tz_localize(None)
    return (t - EPOCH) / pd.Timedelta(days=1)


# --- what scoring needs from a run ----------------------------------------------------------------


class OrderBundle:
    """A trained order run loaded for scoring: network, leaf encoder, standardization, salt."""

    def __init__(self, run: RunLayout | str | Path, model_files: ModelFiles | None = None):
        self.run = as_layout(run)
        self.model, self.meta = load_order_model(model_files or self.run.model)
        self.model_version: str = self.meta["version"]
        events = read_json(self.run.events.manifest)
        self.feature_names: list[str] = events["feature_names"]
        self.entity_types: list[str] = events["entity_types"]
        self.slice_days: float = events["config"]["slice_days"]
        self.window_slices: int = events["window_slices"]
        self.leaves = LeafEncoder.load(self.run.leaves.dir)
        self.std = FeatureStandardizer.from_records(read_json(self.run.leaves.feature_stats))
        self.salt = event_salt(self.run)
        self.index = {f: i for i, f in enumerate(self.feature_names)}

    @torch.no_grad()
    def encode(self, raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Orders' encodings and GBDT logits from raw features (``float64[B, F]``, NaN = missing);
        the same transforms as the batch inputs (``RUN/leaves``)."""
        raw = np.asarray(raw, dtype=np.float64)
        leaves, fold = self.leaves.transform(raw)
        gbdt = self.leaves.margin(leaves, fold).astype(np.float32)
        z, omega = self.std.transform(raw)
        g = torch.from_numpy(gbdt)
        x = self.model.encode_orders(
            torch.from_numpy(z),
            torch.from_numpy(omega.astype(np.float32)),
            torch.from_numpy(leaves.astype(np.int64)),
            torch.from_numpy(fold.astype(np.int64)),
            g,
        )
        return x, g


# --- batch: Ray Data over the shards --------------------------------------------------------------


class _ShardScorer:
    """Ray Data actor: the network once per actor; one shard in, its owned outputs out (long
    format: one row per order or entity slice)."""

    def __init__(self, run: str, model_dir: str):
        torch.set_num_threads(1)
        self.run = run
        self.model, _ = load_order_model(ModelFiles(Path(model_dir)))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from creditgraph.graph.events import load_event_shard

        inp = inputs_for(self.run)
        rows = [shard_arrays(load_event_shard(p), inp) for p in batch["path"]]
        res = infer_rows(self.model, rows)
        n_o, n_e = len(res["order_row"]), len(res["es_index"])
        h = self.model.cfg.hidden
        return {
            "is_order": np.r_[np.ones(n_o, bool), np.zeros(n_e, bool)],
            "index": np.r_[res["order_row"], res["es_index"]].astype(np.int64),
            "logit": np.r_[res["logit"], np.full(n_e, np.nan, np.float32)].astype(np.float32),
            "z": np.concatenate([np.zeros((n_o, h), np.float32), res["z"].reshape(n_e, h)]),
        }


def embed_and_score(
    run: RunLayout | str | Path,
    model_files: ModelFiles | None = None,
    *,
    max_actors: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every order's fraud logit and every entity slice's embedding, with Ray Data over the run's
    shards: ``(logit float32[n_orders], z float32[S, hidden])``."""
    require_ray("batch scoring of orders")
    run = as_layout(run)
    model_files = model_files or run.model
    model, _ = load_order_model(model_files)
    inp = inputs_for(run)
    paths = [str(p.resolve()) for p in event_shard_paths(run)]
    cpus = int(ray.cluster_resources().get("CPU", 1))
    size = max(1, min(len(paths), max_actors or cpus))
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    out = ds.map_batches(
        _ShardScorer,
        fn_constructor_kwargs={"run": str(run.root), "model_dir": str(model_files.dir)},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=size),
        num_cpus=1,
    )
    logit = np.full(inp.n_orders, np.nan, np.float32)
    z = np.zeros((len(inp.es_type), model.cfg.hidden), np.float32)
    for b in out.iter_batches(batch_size=None, batch_format="numpy"):
        o = b["is_order"]
        logit[b["index"][o]] = b["logit"][o]
        z[b["index"][~o]] = np.asarray(b["z"])[~o]
    if np.isnan(logit).any():
        raise AssertionError(f"{int(np.isnan(logit).sum())} orders left unscored by the shards")
    return logit, z


def latest_entity_states(
    run: RunLayout | str | Path, z: np.ndarray, decision_slice: int
) -> tuple[np.ndarray, np.ndarray]:
    """Keys and records of every entity at its latest slice before ``decision_slice`` and within
    the history window (older ones could reach no order of that slice)."""
    from creditgraph.graph.events import EventGraph

    g = EventGraph.load(run, mmap=True)
    es_ent, es_slice = np.asarray(g.es_entity), np.asarray(g.es_slice)
    ok = (es_slice < decision_slice) & (es_slice >= decision_slice - g.window_slices)
    idx = np.flatnonzero(ok)
    # entity slices are sorted by (entity, slice): the last row of each entity is its latest
    last = idx[np.r_[es_ent[idx][1:] != es_ent[idx][:-1], True]] if len(idx) else idx
    recs = np.zeros(len(last), dtype=order_entity_dtype(z.shape[1]))
    recs["type"] = g.entity_type[es_ent[last]]
    recs["slice"] = es_slice[last]
    recs["emb"] = z[last]
    return g.entity_key[es_ent[last]], recs


def publish_order_snapshot(
    run: RunLayout | str | Path,
    registry: str | Path | None = None,
    *,
    z: np.ndarray | None = None,
    decision_time: float | None = None,
    promote: bool = False,
    store_uri: str | None = None,
    model_files: ModelFiles | None = None,
) -> dict:
    """Publish the entity embeddings at ``decision_time`` (days since 1970; default: the start
    of the slice after the last order) as an immutable snapshot; returns its metadata."""
    run = as_layout(run)
    bundle_meta = load_order_model(model_files or run.model)[1]
    events = read_json(run.events.manifest)
    sd = events["config"]["slice_days"]
    if z is None:
        _, z = embed_and_score(run, model_files)
    if decision_time is None:
        last = int(load_orders_table(run)["slice"].max())
        decision_time = (last + 1) * sd
    decision_slice = int(slice_of(decision_time, sd))
    keys, recs = latest_entity_states(run, z, decision_slice)
    reg = Registry.for_run(run, registry)
    iso = _iso(decision_slice * sd)
    snapshot_id = new_snapshot_id(iso)
    meta = {
        "id": snapshot_id,
        "family": "orders",
        "schema_version": records.SCHEMA_VERSION,
        "created": time.time(),
        "decision_time": iso,
        "decision_time_days": decision_slice * sd,
        "decision_slice": decision_slice,
        "slice_days": sd,
        "window_slices": events["window_slices"],
        "model_version": bundle_meta["version"],
        "graph_version": events["fingerprint"],
        "run": str(run.root),
        "entity_types": events["entity_types"],
        "hidden": int(z.shape[1]),
        "caps": {"present": False},
        "counts": {"entities": len(keys)},
        "store": {"uri": store_uri},
    }
    with reg.publish(snapshot_id, store_uri) as (files, store):
        store.put_schema(NAMESPACE, recs.dtype)
        store.put_json("meta", {"id": snapshot_id, "schema_version": records.SCHEMA_VERSION})
        if len(keys):
            store.bulk_load(NAMESPACE, keys, recs)
        write_json(files.manifest, meta)
    if promote:
        reg.promote(snapshot_id, by="score")
    log.info("order snapshot %s: %d entities as of %s", snapshot_id, len(keys), iso)
    return meta


def score_orders(
    run: RunLayout | str | Path,
    out: str | Path,
    *,
    registry: str | Path | None = None,
    promote: bool = False,
    decision_time: float | None = None,
    store_uri: str | None = None,
) -> dict:
    """Backfill: score every order of the run with Ray Data (``OUT/scores.parquet``: order id,
    time, slice, fraud score, logit) and publish the snapshot of entity embeddings. Nothing is
    written into the run folder."""
    run = as_layout(run)
    t0 = time.perf_counter()
    logit, z = embed_and_score(run)
    t_batch = time.perf_counter() - t0
    orders = load_orders_table(run)
    frame = pd.DataFrame(
        {
            "order_id": orders["order_id"],
            "ts": EPOCH + pd.to_timedelta(orders["t_days"].to_numpy(), unit="D"),
            "slice": orders["slice"],
            "score": 1.0 / (1.0 + np.exp(-logit.astype(np.float64))),
            "logit": logit,
        }
    )
    meta = publish_order_snapshot(
        run, registry, z=z, decision_time=decision_time, promote=promote, store_uri=store_uri
    )
    summary = {
        "orders_scored": len(frame),
        "mean_score": float(frame["score"].mean()),
        "snapshot": meta["id"],
        "decision_time": meta["decision_time"],
        "entities_stored": meta["counts"]["entities"],
        "promoted": promote,
        "seconds": {"batch": t_batch, "total": time.perf_counter() - t0},
    }
    with atomic_dir(Path(out)) as tmp:
        frame.to_parquet(tmp / "scores.parquet", index=False)
        write_json(tmp / "summary.json", summary)
    log.info("scored %d orders; snapshot %s", len(frame), meta["id"])
    return summary


# --- online ------------------------------------------------------------------------------------


class OrderScorer:
    """In-process online scoring of one order against a snapshot (see the module docstring)."""

    def __init__(
        self,
        run: RunLayout | str | Path,
        registry: str | Path | None = None,
        *,
        snapshot_id: str | None = None,
    ):
        torch.set_num_threads(1)
        self.bundle = OrderBundle(run)
        self.registry = Registry.for_run(self.bundle.run, registry)
        self.pinned = snapshot_id
        self.snapshot: Snapshot | None = None
        self._pointer_seen: tuple[float, int] | None = None
        self._checked = 0.0
        self.follow(force=True)

    def follow(self, force: bool = False) -> None:
        """Switch to the promoted snapshot when the registry's pointer changed (at most every
        0.5 s, one ``stat``); a pinned snapshot never changes."""
        now = time.monotonic()
        if not force and (self.pinned or now - self._checked < 0.5):
            return
        self._checked = now
        try:
            st = self.registry.layout.current.stat()
            seen = (st.st_mtime, st.st_ino)
        except FileNotFoundError:
            seen = None
        if not force and seen == self._pointer_seen:
            return
        wanted = self.pinned or self.registry.current()
        if wanted is not None and (self.snapshot is None or self.snapshot.id != wanted):
            snap = self.registry.open(wanted)
            if snap.meta.get("family") != "orders":
                snap.close()
                raise SnapshotError(f"snapshot {wanted} is not an order-risk snapshot")
            if snap.meta["model_version"] != self.bundle.model_version:
                snap.close()
                raise SnapshotError(
                    f"snapshot {wanted} was made with model {snap.meta['model_version']}, the "
                    f"service runs {self.bundle.model_version}"
                )
            old, self.snapshot = self.snapshot, snap
            if old is not None:
                old.close()
        self._pointer_seen = seen

    def raw_vector(self, features: dict[str, float | None]) -> np.ndarray:
        """Raw features in the model's order (absent or null = missing); unknown names refused."""
        unknown = sorted(set(features) - set(self.bundle.index))
        if unknown:
            raise KeyError(f"unknown feature(s) {unknown}")
        raw = np.full(len(self.bundle.feature_names), np.nan)
        for name, value in features.items():
            raw[self.bundle.index[name]] = np.nan if value is None else float(value)
        return raw

    @torch.no_grad()
    def score(
        self,
        raw: np.ndarray,
        entities: list[tuple[str, Any]],
        t_days: float,
        *,
        top_k: int = TOP_K,
    ) -> dict[str, Any]:
        """Fraud score of one order placed at ``t_days`` (days since 1970) with raw features
        ``raw`` and linked to ``entities`` ((type, id) pairs), and each entity's contribution."""
        self.follow()
        snap = self.snapshot
        if snap is None:
            raise SnapshotError("no order snapshot promoted")
        b = self.bundle
        s = int(slice_of(t_days, b.slice_days))
        if s < snap.meta["decision_slice"]:
            raise ValueError(
                f"the order's time {_iso(t_days)} is before the served snapshot's decision time "
                f"{snap.meta['decision_time']}: its entities' states would come from its future"
            )
        bad = sorted({t for t, _ in entities if t not in b.entity_types})
        if bad:
            raise KeyError(f"unknown entity type(s) {bad}; known: {b.entity_types}")
        pairs = list(dict.fromkeys((t, normalize_id(i)) for t, i in entities))
        keys = [entity_key(b.salt, t, i) for t, i in pairs]
        recs, found = snap.store.get_records(NAMESPACE, keys) if keys else (None, np.zeros(0, bool))
        used = np.zeros(len(keys), bool)
        if keys:
            used = found & (recs["slice"] < s) & (recs["slice"] >= s - b.window_slices)
        x, g = b.encode(raw[None, :])
        k = int(used.sum())
        ent = torch.from_numpy(np.ascontiguousarray(recs["emb"][used])) if k else None
        etype = torch.from_numpy(recs["type"][used].astype(np.int64)) if k else None
        rec = (
            torch.from_numpy(((s - recs["slice"][used]) * b.slice_days).astype(np.float32))
            if k
            else None
        )
        logits = self._hop_with_leave_one_out(x, g, ent, etype, rec, k)
        p = 1.0 / (1.0 + math.exp(-float(logits[0])))
        contrib = [p - 1.0 / (1.0 + math.exp(-float(v))) for v in logits[1:]]
        rows, j = [], 0
        for (t, _), key, f, u in zip(pairs, keys, found, used, strict=True):
            row = {"key": key, "entity_type": t, "found": bool(f), "used": bool(u)}
            if u:
                sl = int(recs["slice"][np.flatnonzero(used)[j]])
                row |= {"state_of": _iso(sl * b.slice_days), "contribution": contrib[j]}
                j += 1
            rows.append(row)
        top = sorted((r for r in rows if r["used"]), key=lambda r: -r["contribution"])[:top_k]
        return {
            "score": p,
            "logit": float(logits[0]),
            "gbdt_logit": float(g[0]),
            "entities": rows,
            "top_entities": top,
            "snapshot": snap.id,
            "model_version": b.model_version,
        }

    def _hop_with_leave_one_out(self, x, g, ent, etype, rec, k: int) -> np.ndarray:
        """Logits with all ``k`` entities (first) and without each one in turn: one batch."""
        model: OrderNet = self.bundle.model
        if k == 0:
            empty = torch.zeros((0, x.shape[1]))
            z0 = torch.zeros(0, dtype=torch.long)
            return model.hop(x, empty, z0, torch.zeros(0), z0, g).numpy()
        # order 0 sees every entity; order j (1..k) all but entity j - 1
        owner = [0] * k
        pick = list(range(k))
        for j in range(k):
            others = [i for i in range(k) if i != j]
            owner += [j + 1] * len(others)
            pick += others
        idx = torch.tensor(pick)
        xs = x.expand(k + 1, -1)
        gs = g.expand(k + 1)
        return model.hop(xs, ent[idx], etype[idx], rec[idx], torch.tensor(owner), gs).numpy()

    def close(self) -> None:
        if self.snapshot is not None:
            self.snapshot.close()
            self.snapshot = None


# --- Ray Serve -----------------------------------------------------------------------------------

Finite = Annotated[float, Field(allow_inf_nan=False)]
Id = StrictStr | StrictInt


class OrderEntity(BaseModel):
    """An entity the order names (its device, card, addresses, IP...)."""

    model_config = ConfigDict(extra="forbid")

    entity_type: StrictStr = Field(..., max_length=64)
    entity_id: Id


class OrderScoreRequest(BaseModel):
    """``POST /v1/orders/score``: one order as it is placed."""

    model_config = ConfigDict(extra="forbid")

    order_id: Id | None = Field(None, description="echoed and logged")
    ts: str | None = Field(None, description="when the order is placed (ISO); default: now")
    features: dict[str, Finite | None] = Field(
        ..., description="raw order features (null or absent = missing)"
    )
    entities: list[OrderEntity] = Field(default_factory=list, max_length=MAX_ENTITIES)


orders_api = FastAPI(
    title="creditgraph order risk",
    description="Real-time fraud scores of orders from their features and their entities' "
    "batch-computed graph embeddings.",
    version="1",
)
orders_api.add_exception_handler(RequestValidationError, _invalid)
orders_api.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(orders_api)
class OrderRiskAPI:
    """Scores orders in process: leaves, order encoding, snapshot reads, last hop."""

    def __init__(self, args: dict):
        self.args = ServeArgs(**args)
        self.scorer = OrderScorer(self.args.run_dir, self.args.snapshots)
        self.log = DecisionLog(
            self.args.decision_log or (self.scorer.registry.layout.root / "decision_log")
        )
        orders_api.state.insecure = self.args.insecure
        if self.args.insecure:
            log.warning("creditgraph order-risk API is running WITHOUT authentication (insecure)")
        elif not os.environ.get(TOKEN_ENV) and not os.environ.get(ADMIN_TOKEN_ENV):
            raise RuntimeError(
                f"no API token: set {TOKEN_ENV} (and {ADMIN_TOKEN_ENV} for admins), or run the "
                "service open for local development with --insecure"
            )

    @orders_api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok"}

    @orders_api.get("/v1/orders/model")
    def model_info(self, who: Caller) -> dict:
        self.scorer.follow()
        snap = self.scorer.snapshot
        b = self.scorer.bundle
        return {
            "family": "orders",
            "model_version": b.model_version,
            "features": b.feature_names,
            "entity_types": b.entity_types,
            "slice_days": b.slice_days,
            "snapshot": None if snap is None else snap.id,
            "decision_time": None if snap is None else snap.meta["decision_time"],
            "auth": "off (insecure)" if self.args.insecure else "bearer token",
            "role": who["role"],
        }

    @orders_api.post("/v1/orders/score")
    async def score(self, req: OrderScoreRequest, who: Caller) -> dict:
        # async: about a millisecond of compute, cheaper on the event loop than a thread hop
        try:
            t_days = _to_days(req.ts)
        except (ValueError, TypeError) as exc:
            raise _unprocessable("ts", f"not an ISO time: {exc}") from exc
        try:
            raw = self.scorer.raw_vector(req.features)
        except KeyError as exc:
            raise _unprocessable("features", str(exc.args[0])) from exc
        try:
            res = self.scorer.score(
                raw, [(e.entity_type, e.entity_id) for e in req.entities], t_days
            )
        except KeyError as exc:
            raise _unprocessable(["entities", "entity_type"], str(exc.args[0])) from exc
        except ValueError as exc:
            raise _unprocessable("ts", str(exc)) from exc
        except SnapshotError as exc:
            raise HTTPException(503, detail=str(exc)) from exc
        self.log.append(
            {
                "kind": "order_score",
                "snapshot": res["snapshot"],
                "model_version": res["model_version"],
                "caller": who["identity"],
                "order_id": req.order_id,
                "score": res["score"],
                "entities": [e["key"] for e in res["entities"]],
                "top_entities": [e["key"] for e in res["top_entities"]],
            }
        )
        return {"order_id": req.order_id, **res}


def build_orders_app(args: dict) -> serve.Application:
    """The order-risk application (``serving/app.py: build_app`` builds it for orders runs)."""
    a = ServeArgs(**args)
    ingress = OrderRiskAPI
    opts: dict[str, Any] = {}
    if a.replicas is not None:
        opts["num_replicas"] = a.replicas
    tokens = {k: os.environ[k] for k in (TOKEN_ENV, ADMIN_TOKEN_ENV) if os.environ.get(k)}
    if tokens:
        opts["ray_actor_options"] = {"num_cpus": 0.25, "runtime_env": {"env_vars": tokens}}
    if opts:
        ingress = ingress.options(**opts)
    return ingress.bind(a.model_dump())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_order_through_service(
    run: RunLayout | str | Path, registry: str | Path, data: str | Path
) -> list[str]:
    """Start the order-risk service on the promoted snapshot, score one new order that reuses the
    entities of the latest fraud of the data, and the same order with entities never seen; stop
    the service. Returns the lines to print (entities named by their keyed hash only)."""
    import secrets

    import httpx

    from creditgraph.data.orders import load_orders

    run = as_layout(run)
    token = secrets.token_urlsafe(16)
    os.environ[TOKEN_ENV] = token
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_orders_app({"run_dir": str(run.root), "snapshots": str(registry)}),
        name="creditgraph-orders",
        route_prefix="/",
    )
    try:
        ds = load_orders(data)
        snap = Registry(registry).open()
        when = snap.meta["decision_time"]
        snap.close()
        seg = ds.segments
        fraud = np.zeros(ds.n_orders, bool)
        if seg is not None and "fraud" in seg.columns:
            fraud[seg["order_idx"].to_numpy()] = seg["fraud"].to_numpy(dtype=bool)
        else:
            fraud = ds.label == 1
        links = ds.links
        ctx = links[links["ts_days"].to_numpy() <= ds.t_days[links["order_idx"].to_numpy()]]
        linked = np.zeros(ds.n_orders, bool)
        linked[ctx["order_idx"].to_numpy()] = True
        i = int(np.flatnonzero(fraud & linked)[-1])
        names = read_json(run.events.manifest)["feature_names"]
        values = dict(zip(ds.feature_names, ds.feature_matrix()[i], strict=True))
        values[ds.spec.orders.amount] = float(ds.amount[i])
        features = {n: None if np.isnan(values[n]) else float(values[n]) for n in names}
        mine = ctx[ctx["order_idx"] == i]
        entities = [
            {"entity_type": str(t), "entity_id": v.item() if hasattr(v, "item") else v}
            for t, v in zip(mine["entity_type"], mine["entity_id"], strict=True)
        ]
        fresh = [{"entity_type": e["entity_type"], "entity_id": f"new-{k}"}
                 for k, e in enumerate(entities)]  # fmt: skip
        url = f"http://127.0.0.1:{port}/v1/orders/score"
        headers = {"authorization": f"Bearer {token}"}
        body = {"order_id": "demo-1", "ts": when, "features": features}
        linked_r = httpx.post(url, json={**body, "entities": entities}, headers=headers, timeout=60)
        fresh_r = httpx.post(url, json={**body, "entities": fresh}, headers=headers, timeout=60)
        linked_r.raise_for_status()
        fresh_r.raise_for_status()
        a, b = linked_r.json(), fresh_r.json()
        lines = [
            "",
            f"[bold]a new order through the online service[/] (POST /v1/orders/score at {when}, "
            f"snapshot {a['snapshot']}): the features of the data's latest fraud",
            f"  with that fraud's entities: fraud score {a['score']:.3f}",
        ]
        for e in a["top_entities"][:3]:
            lines.append(
                f"    {e['entity_type']:8s} {e['key'][:12]}...  contribution "
                f"{e['contribution']:+.3f} (state of {e['state_of'][:10]})"
            )
        lines.append(f"  with entities never seen:  fraud score {b['score']:.3f}")
        return lines
    finally:
        serve.shutdown()
