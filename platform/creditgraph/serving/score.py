"""``creditgraph score``: batch scoring with Ray Data, and the snapshot the online service reads.

Whatever users and links the scoring dataset holds are scored on the dataset's own graph: users
the model never saw, and today's links for known users (the curves move when the links move). The
run's standardization, teacher, entity types, salt and history window are used; nothing is
re-fitted on the batch, and nothing is written into the run folder.

1. validate the dataset; each user is decided at its ``as_of`` (``--as-of T`` decides everyone at
   T: a rescoring); the batch's decision time ``T`` is the latest one, stated in the outputs;
2. build the time-directed user graph of the dataset with the run's entity types (a link after a
   user's decision time never reaches it) and its structural features;
3. Ray Data, an autoscaling actor pool holding the model once per actor: each user's ``h0`` and
   hop-0 tokens; the driver then propagates the hops with sparse weighted means (O(edges));
4. Ray Data again: curves, uncertainty, DSL scores and guardrail hits from each user's context
   (``serving/context.evaluate``, the function the service calls);
5. on the driver: credit clusters at T, the cluster caps, and the decisions (``policy.decide``);
6. write ``OUT/decisions.parquet``, ``OUT/curves.parquet``, ``OUT/summary.json`` atomically, and
   publish a snapshot (user, entity and cluster records at T, with the caps) in the registry; it is
   served only once promoted (``--promote``, or ``creditgraph snapshot promote``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.data
import scipy.sparse as sp

from creditgraph.data.errors import DataValidationError
from creditgraph.data.load import Dataset, load_dataset, to_days
from creditgraph.graph.entities import entity_state
from creditgraph.graph.temporal import structural_features, temporal_user_edges
from creditgraph.layout import RunLayout, ScoreFiles, as_layout
from creditgraph.policy.clusters import build_clusters
from creditgraph.policy.config import PolicyConfig
from creditgraph.serving import records
from creditgraph.serving.context import Context, Evaluated, ScoringBundle, evaluate
from creditgraph.serving.decision_log import DecisionLog
from creditgraph.serving.snapshot import Registry, new_snapshot_id
from creditgraph.utils.io import atomic_dir, fingerprint, path_signature, write_json
from creditgraph.utils.logs import get_logger
from creditgraph.utils.runtime import require_ray

log = get_logger(__name__)

EPOCH = pd.Timestamp("1970-01-01")


@dataclass
class BatchGraph:
    """A scoring dataset as the model sees it: inputs per user and the user graph."""

    ids: np.ndarray
    raw: np.ndarray  # float64 [n, F]
    limit: np.ndarray  # float64 [n]
    as_of: np.ndarray  # float64 [n] days
    struct: np.ndarray  # float32 [n, S]
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    time: float  # the batch's decision time T (days)
    edge_stats: dict


def batch_graph(bundle: ScoringBundle, ds: Dataset, as_of: float | None = None) -> BatchGraph:
    """The dataset's users and time-directed graph, on the run's feature order and entity types."""
    names = bundle.feature_names
    missing = [f for f in names if f not in ds.feature_names]
    if missing:
        # a column that is there but was dropped (all null, not numeric): say why
        why = [w.split(": ", 1)[-1] for w in ds.warnings if f"column {missing[0]!r}:" in w]
        raise DataValidationError(
            str(ds.root / ds.spec.users),
            missing[0],
            f"feature columns of the model are absent: {missing}" + (f" ({why[0]})" if why else ""),
        )
    t = ds.t_days.copy()
    if as_of is not None:
        t[:] = as_of
    edges = temporal_user_edges(
        ds.links, t, bundle.entities, bundle.history_days, type_names=bundle.entity_types
    )
    struct, _ = structural_features(edges, ds.n_users)
    raw = ds.features[names].to_numpy(dtype=np.float64)
    return BatchGraph(
        ids=np.asarray(ds.ids, dtype=object),
        raw=raw,
        limit=ds.treatment.astype(np.float64),
        as_of=t,
        struct=struct,
        src=edges.src,
        dst=edges.dst,
        weight=edges.weight,
        time=float(t.max()) if len(t) else float("nan"),
        edge_stats=edges.stats,
    )


class _FirstActor:
    """Ray Data actor, step 1: ``h0`` and hop-0 tokens for a block of users."""

    def __init__(self, run: str, dtype: list):
        import torch

        torch.set_num_threads(1)
        self.bundle = ScoringBundle.load(run)
        self.dtype = records.dtype_from_json(dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = _unpack(batch["data"], self.dtype)
        first = self.bundle.inference.first(x["raw"], x["limit"], x["struct"])
        return {"idx": x["idx"], "h0": first.h0, "c0": first.c0, "s0": first.s0}


class _FinishActor:
    """Ray Data actor, step 4: evaluate a block of contexts on the decision grid."""

    def __init__(
        self, run: str, policy: dict, rules_dir: str | None, grid: list[float], dtype: list
    ):
        import torch

        torch.set_num_threads(1)
        self.bundle = ScoringBundle.load(run, PolicyConfig(**policy), rules_dir)
        self.grid = np.asarray(grid)
        self.dtype = records.dtype_from_json(dtype)
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = _unpack(batch["data"], self.dtype)
        n = len(x["idx"])
        ctx = Context(
            user_id=x["idx"],
            raw=x["raw"],
            limit=x["limit"],
            as_of=np.zeros(n),
            struct=x["struct"],
            tokens=x["tokens"],
            user_cap=np.full(n, np.inf),
            cluster_id=np.full(n, -1, np.int64),
            known=np.ones(n, bool),
        )
        ev = evaluate(self.bundle, ctx, self.grid, h0=x["h0"])
        return {
            "idx": x["idx"],
            "curves": ev.curves.astype(np.float32),
            "logit_std": ev.logit_std.astype(np.float32),
            "p_factual": ev.p_factual,
            "dsl": ev.dsl,
            "prob_std": ev.prob_std,
            "rule": np.array(["" if r is None else r for r in ev.rule], dtype=object),
            "node": np.full(n, self.node_id, dtype=object),
        }


def _block_dtype(fields: dict[str, np.ndarray]) -> np.dtype:
    return np.dtype([(k, v.dtype, v.shape[1:]) for k, v in fields.items()])


def _unpack(data: np.ndarray, dtype: np.dtype) -> dict[str, np.ndarray]:
    """The fields of a block's rows (see :func:`_dataset`), each a contiguous array."""
    rec = np.ascontiguousarray(data).view(dtype).reshape(len(data))
    return {name: np.ascontiguousarray(rec[name]) for name in dtype.names}


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    k = max(1, -(-n // size))
    edges = np.linspace(0, n, k + 1).astype(int)
    return list(pairwise(edges))


def _dataset(fields: dict[str, np.ndarray], batch_size: int) -> tuple[ray.data.Dataset, list]:
    """The users' fields as Ray Data blocks of ``batch_size`` rows, and the blocks' record type.

    A block is one ``uint8 [rows, record bytes]`` matrix whose rows are records of one
    structured dtype (each field in its own type: raw features stay float64, tokens float32), so
    the rows of all fields travel together and nothing is widened to a common type."""
    n = len(next(iter(fields.values())))
    dtype = _block_dtype(fields)
    refs = []
    for a, b in _blocks(n, batch_size):
        rec = np.empty(b - a, dtype)
        for name, values in fields.items():
            rec[name] = values[a:b]
        refs.append(ray.put(rec.view(np.uint8).reshape(b - a, dtype.itemsize)))
    return ray.data.from_numpy_refs(refs), records.dtype_to_json(dtype)


def _run_first(
    g: BatchGraph, run: RunLayout, batch_size: int, min_actors: int, max_actors: int
) -> tuple:
    n = len(g.raw)
    data, dtype = _dataset(
        {"idx": np.arange(n), "raw": g.raw, "limit": g.limit, "struct": g.struct}, batch_size
    )
    out = data.map_batches(
        _FirstActor,
        fn_constructor_kwargs={"run": str(run.root), "dtype": dtype},
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        num_cpus=1,
    )
    h0 = c0 = s0 = None
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        if h0 is None:
            h0 = np.zeros((n, batch["h0"].shape[1]), np.float32)
            c0 = np.zeros((n, batch["c0"].shape[1]), np.float32)
            s0 = np.zeros((n, batch["s0"].shape[1]), np.float32)
        idx = batch["idx"]
        h0[idx], c0[idx], s0[idx] = batch["h0"], batch["c0"], batch["s0"]
    return h0, c0, s0


def _run_finish(
    g: BatchGraph,
    tokens: np.ndarray,
    h0: np.ndarray,
    bundle: ScoringBundle,
    rules_dir: str | None,
    grid: np.ndarray,
    batch_size: int,
    min_actors: int,
    max_actors: int,
) -> tuple[Evaluated, dict]:
    n = len(g.raw)
    fields = {
        "idx": np.arange(n),
        "raw": g.raw,
        "limit": g.limit,
        "struct": g.struct,
        "tokens": tokens[:, :, 1:],
        "h0": h0,
    }
    data, dtype = _dataset(fields, batch_size)
    out = data.map_batches(
        _FinishActor,
        fn_constructor_kwargs={
            "run": str(bundle.run.root),
            "policy": bundle.policy.model_dump(),
            "rules_dir": rules_dir,
            "grid": grid.tolist(),
            "dtype": dtype,
        },
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        num_cpus=1,
    )
    gsize = len(grid)
    curves = np.zeros((n, gsize), np.float32)
    logit_std = np.zeros((n, gsize), np.float32)
    p_factual, dsl, prob_std = np.zeros(n), np.zeros(n), np.zeros(n)
    rule = np.full(n, None, dtype=object)
    nodes: dict[str, int] = {}
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        idx = batch["idx"]
        curves[idx], logit_std[idx] = batch["curves"], batch["logit_std"]
        p_factual[idx], dsl[idx], prob_std[idx] = (
            batch["p_factual"],
            batch["dsl"],
            batch["prob_std"],
        )
        hits = batch["rule"] != ""
        rule[idx[hits]] = batch["rule"][hits]
        names, counts = np.unique(batch["node"], return_counts=True)
        for node, k in zip(names.tolist(), counts.tolist(), strict=True):
            nodes[node] = nodes.get(node, 0) + k
    ev = Evaluated(curves, logit_std, p_factual, dsl, prob_std, rule, np.zeros((n, 0)))
    return ev, nodes


def score_users(
    run: RunLayout | str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    policy: PolicyConfig | None = None,
    *,
    as_of: str | pd.Timestamp | None = None,
    rules_dir: str | Path | None = None,
    registry: str | Path | None = None,
    store_uri: str | None = None,
    promote: bool = False,
    decide: bool = True,
    batch_size: int = 16_384,
    min_actors: int = 1,
    max_actors: int = 2,
) -> dict:
    """Score every user of ``data_dir`` with the model of ``run``; write ``out_dir`` and publish
    a snapshot in ``registry`` (default: the run's, beside it). ``decide=False`` makes only the
    snapshot (no decisions, so no cluster caps: the snapshot says so)."""
    require_ray("batch scoring")
    t0 = time.perf_counter()
    run = as_layout(run)
    rules = None if rules_dir is None else str(Path(rules_dir).resolve())
    bundle = ScoringBundle.load(run, policy, rules)
    grid = bundle.policy.grid_values()
    ds = load_dataset(data_dir, with_truth=False)
    t_override = (
        None if as_of is None else float(to_days(pd.DatetimeIndex([pd.Timestamp(as_of)]))[0])
    )
    g = batch_graph(bundle, ds, t_override)
    timings = {"load_and_graph": time.perf_counter() - t0}

    t1 = time.perf_counter()
    h0, c0, s0 = _run_first(g, run, batch_size, min_actors, max_actors)
    from creditgraph.model.infer import FirstHop

    tokens = bundle.inference.propagate(FirstHop(h0, c0, s0), g.src, g.dst, g.weight)
    timings["embed"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    ev, nodes = _run_finish(g, tokens, h0, bundle, rules, grid, batch_size, min_actors, max_actors)
    timings["curves"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    clusters = build_clusters(
        ds.links,
        ds.n_users,
        bundle.entities,
        g.time,
        history_days=bundle.policy.clusters.history_days or bundle.history_days,
        min_size=bundle.policy.clusters.min_size,
        split_above=bundle.policy.clusters.split_above,
    )
    deployed = bundle.deployed
    upper = deployed.bound(ev.curves, ev.logit_std)
    table = deployed.decide(
        ev.curves,
        ev.logit_std,
        dsl_score=ev.dsl,
        guardrail_hits=ev.rule,
        cluster_id=clusters.cluster_id,
        current=g.limit,
        ids=g.ids,
        decision_time=g.time,
    )
    timings["decide"] = time.perf_counter() - t3

    t4 = time.perf_counter()
    decision_time = (EPOCH + pd.Timedelta(days=g.time)).isoformat()
    snapshot_id = new_snapshot_id(decision_time)
    reg = Registry.for_run(run, registry)
    decisions = table.to_frame(g.ids)
    decisions.insert(1, "p_factual", ev.p_factual)
    decisions["decision_time"] = decision_time
    decisions["snapshot"] = snapshot_id
    decisions["model_version"] = bundle.model_version
    counts = table.counts()
    declined_by_cap = int(((table.binding_code == 5) & (table.limit == grid[0])).sum())
    summary = {
        "users_scored": len(decisions),
        "decision_time": decision_time,
        "snapshot": snapshot_id,
        "model_version": bundle.model_version,
        "grid": {"start": float(grid[0]), "stop": float(grid[-1]), "points": len(grid)},
        "r_max": bundle.policy.r_max,
        "mean_limit": float(table.limit.mean()) if len(table) else 0.0,
        "granted_share": float((table.limit > grid[0]).mean()) if len(table) else 0.0,
        "binding_constraints": counts,
        "explored": int(np.isfinite(table.explore_factor).sum()),
        "guarantee": bundle.deployed.guarantee(),
        "declined_by_cluster_cap": declined_by_cap,
        "clusters": int(clusters.n_clusters),
        "edges": g.edge_stats,
        "nodes": nodes,
        "decided": decide,
        "data_fingerprint": fingerprint(path_signature(data_dir)),
    }
    out = ScoreFiles(Path(out_dir))
    with atomic_dir(out.dir) as tmp_dir:
        tmp = ScoreFiles(tmp_dir)
        if decide:
            decisions.to_parquet(tmp.decisions, index=False)
            _write_curves(tmp.curves, g.ids, grid, ev.curves, upper)
        _publish(
            reg, snapshot_id, bundle, ds, g, tokens, table, clusters, decide, store_uri, summary
        )
        summary["timings_s"] = {**timings, "write": time.perf_counter() - t4}
        summary["seconds"] = time.perf_counter() - t0
        write_json(tmp.manifest, summary)
    if decide:
        DecisionLog(reg.layout.root / "decision_log").append_batch(decisions, caller="batch")
    if promote:
        reg.promote(snapshot_id, by="score --promote")
    log.info(
        "scored %s users as of %s in %.0fs -> %s (snapshot %s%s)",
        f"{len(decisions):,}",
        decision_time[:10],
        summary["seconds"],
        out.dir,
        snapshot_id,
        ", promoted" if promote else "",
    )
    return summary


def _write_curves(
    path: Path, ids: np.ndarray, grid: np.ndarray, curves: np.ndarray, upper: np.ndarray | None
) -> None:
    """Long format: one row per user and grid limit, the calibrated risk and its upper bound."""
    n, gsize = curves.shape
    rep = np.repeat(ids, gsize)
    columns = {
        "user_id": pa.array(rep.tolist() if ids.dtype == object else rep),
        "limit": np.tile(grid, n),
        "p_default": np.asarray(curves, np.float32).reshape(-1),
    }
    if upper is not None:
        columns["p_upper"] = np.asarray(upper, np.float32).reshape(-1)
    pq.write_table(pa.table(columns), path)


def _publish(
    reg: Registry,
    snapshot_id: str,
    bundle: ScoringBundle,
    ds: Dataset,
    g: BatchGraph,
    tokens: np.ndarray,
    table,
    clusters,
    decided: bool,
    store_uri: str | None,
    summary: dict,
) -> None:
    """The snapshot: user records, entity records at T and cluster records, with metadata."""
    dims = bundle.dims
    schemas = records.schemas(dims)
    n = len(g.ids)
    users = np.zeros(n, dtype=schemas["user"])
    users["raw"], users["limit"], users["as_of"] = g.raw, g.limit, g.as_of
    users["struct"] = g.struct
    users["tokens"] = tokens[:, :, 1:]
    users["user_cap"] = table.user_cap if decided else np.inf
    users["cluster_id"] = clusters.cluster_id if decided else -1

    state = entity_state(
        ds.links, g.as_of, bundle.entities, bundle.history_days, g.time, bundle.salt,
        bundle.entity_types,
    )  # fmt: skip
    ents = np.zeros(state.n_entities, dtype=schemas["entity"])
    ents["type"], ents["n_window"], ents["n_cumulative"] = (
        state.type_code, state.n_window, state.n_cumulative,
    )  # fmt: skip
    if state.n_entities and dims.hops:
        incidence = sp.csr_matrix(
            (np.ones(len(state.member_user), np.float32), (state.member_entity, state.member_user)),
            shape=(state.n_entities, n),
        )
        flat = tokens[:, :, : dims.hops].reshape(n, -1)
        ents["sums"] = np.asarray(incidence @ flat).reshape(
            state.n_entities, 2, dims.hops, dims.hidden
        )
    ents["cluster_id"] = -1
    if decided and len(state.member_user):
        member_cluster = clusters.cluster_id[state.member_user]
        frame = pd.DataFrame({"e": state.member_entity, "c": member_cluster})
        frame = frame[frame["c"] >= 0]
        if len(frame):
            mode = frame.groupby("e")["c"].agg(lambda c: c.value_counts().index[0])
            ents["cluster_id"][mode.index.to_numpy()] = mode.to_numpy()

    meta = {
        "id": snapshot_id,
        "schema_version": records.SCHEMA_VERSION,
        "created": time.time(),
        "decision_time": summary["decision_time"],
        "decision_time_days": g.time,
        "model_version": bundle.model_version,
        "graph_version": bundle.graph_version,
        "run": str(bundle.run.root),
        "dataset": {"root": str(ds.root), "fingerprint": summary["data_fingerprint"], "users": n},
        "entity_types": bundle.entity_types,
        "history_days": bundle.history_days,
        "policy": bundle.policy.model_dump(mode="json"),
        "caps": {
            "present": decided,
            "clusters": int(clusters.n_clusters) if decided else 0,
            "capped_users": int(np.isfinite(table.user_cap).sum()) if decided else 0,
        },
        "counts": {"users": n, "entities": state.n_entities, "supernodes": int(state.cut.sum())},
        "store": {"uri": store_uri},
    }
    with reg.publish(snapshot_id, store_uri) as (files, store):
        for ns, dtype in schemas.items():
            store.put_schema(ns, dtype)
        store.put_json("meta", {"id": snapshot_id, "schema_version": records.SCHEMA_VERSION})
        store.bulk_load("user", g.ids, users)
        if state.n_entities:
            store.bulk_load("entity", state.key, ents)
        if decided and clusters.n_clusters:
            cids = np.arange(clusters.n_clusters)
            crec = np.zeros(len(cids), dtype=schemas["cluster"])
            crec["size"] = clusters.sizes
            crec["cap"] = bundle.policy.clusters.cap_for_size(clusters.sizes)
            inside = clusters.cluster_id >= 0
            crec["granted"] = np.bincount(
                clusters.cluster_id[inside], weights=table.limit[inside], minlength=len(cids)
            )
            store.bulk_load("cluster", cids, crec)
        write_json(files.manifest, meta)
