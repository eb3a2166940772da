"""ClusterGCN shards with shadow nodes (seed 001, section 3.3), written in parallel by Ray tasks.

The user-user graph is partitioned by METIS (``pymetis``) into K parts. A shard holds its part's
*owned* users plus *shadow* copies of every user within ``hops`` incoming hops of an owned user, so
that a message-passing model with at most ``hops`` layers computes, for owned users, exactly what
it computes on the whole graph. Shadow users carry features and treatments but never a loss: the
shard marks them with ``owned = False``. Only edges into users closer than ``hops`` are kept (the
outermost ring is input only), and per-user structural features are precomputed on the full graph
so that a truncated ring cannot change them.

Shard file (``RUN/shards/shard_00007.npz``): ``nodes`` (global ids, owned first), ``n_owned``,
``hop`` (distance to the nearest owned user), local ``src``/``dst``/``weight``/``etypes`` and the
node arrays ``z``, ``omega``, ``struct``, ``treatment``, ``outcome``, ``split`` (0 train, 1 val,
2 test) for every shard node.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pymetis
import ray
import scipy.sparse as sp
from tqdm.auto import tqdm

from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.graph.config import PartitionConfig
from creditgraph.layout import RunLayout, ShardFiles, as_layout
from creditgraph.utils.io import atomic_dir, read_json, write_json
from creditgraph.utils.logs import get_logger
from creditgraph.utils.runtime import require_ray

log = get_logger(__name__)

SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


def metis_parts(
    n: int, src: np.ndarray, dst: np.ndarray, weight: np.ndarray, k: int, seed: int
) -> np.ndarray:
    """METIS k-way partition of the symmetrized user graph (edge weights favour strong ties)."""
    if k <= 1 or n <= k:
        return np.zeros(n, dtype=np.int64) if k <= 1 else np.arange(n) % k

    w = np.maximum(1, np.round(weight * 10)).astype(np.int64)
    a = sp.coo_matrix((np.r_[w, w], (np.r_[src, dst], np.r_[dst, src])), shape=(n, n)).tocsr()
    a.setdiag(0)
    a.eliminate_zeros()
    a.sum_duplicates()
    opts = pymetis.Options(seed=int(seed))
    adjacency = pymetis.CSRAdjacency(a.indptr.astype(np.int64), a.indices.astype(np.int64))
    _, membership = pymetis.part_graph(k, adjacency, eweights=a.data.astype(np.int64), options=opts)
    return np.asarray(membership, dtype=np.int64)


def shard_members(n: int, src: np.ndarray, dst: np.ndarray, parts: np.ndarray, k: int, hops: int):
    """For every part: (owned+shadow node ids, hop distance), via sparse frontier expansion."""
    a_in_t = sp.csr_matrix((np.ones(len(src), dtype=np.float32), (src, dst)), shape=(n, n))
    # reach[v, p] > 0 iff v lies within `h` incoming hops of part p; track the first hop seen
    reach = sp.csr_matrix((np.ones(n, dtype=np.float32), (np.arange(n), parts)), shape=(n, k))
    dist = reach.copy()
    dist.data[:] = 1.0  # store hop + 1 so that zero means "not reached"
    for h in range(1, hops + 1):
        nxt = (a_in_t @ reach).tocsr()
        nxt.data[:] = 1.0
        new = nxt - nxt.multiply(reach)
        new.eliminate_zeros()
        if new.nnz == 0:
            break
        new.data[:] = h + 1.0
        dist = dist + new
        reach = reach + nxt
        reach.data[:] = 1.0
    dist = dist.tocsc()
    for p in range(k):
        lo, hi = dist.indptr[p], dist.indptr[p + 1]
        nodes, hop = dist.indices[lo:hi], dist.data[lo:hi].astype(np.int64) - 1
        order = np.lexsort((nodes, hop))  # owned (hop 0) first, ascending ids within a ring
        yield p, nodes[order].astype(np.int64), hop[order].astype(np.int8)


def _in_csr(n: int, src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(dst, kind="stable")
    indptr = np.r_[0, np.cumsum(np.bincount(dst, minlength=n))]
    return indptr, order


def inner_edges(
    nodes: np.ndarray,
    hop: np.ndarray,
    hops: int,
    n: int,
    indptr: np.ndarray,
    order: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edges into a shard's inner rings (nodes with ``hop < hops``), from in-edge CSR
    (``indptr``, ``order``: edge ids sorted by destination): ``(edge ids, local src, local dst)``
    with local ids the positions in ``nodes``."""
    local = np.full(n, -1, dtype=np.int64)
    local[nodes] = np.arange(len(nodes))
    inner = nodes[hop < hops]
    starts, ends = indptr[inner], indptr[inner + 1]
    lengths = ends - starts
    pos = np.repeat(starts, lengths) + (
        np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    )
    e = order[pos]
    src_l, dst_l = local[src[e]], local[dst[e]]
    if (src_l < 0).any():
        raise AssertionError("shadow expansion missed an in-neighbour")
    return e, src_l, dst_l


def _write_shard(path: str, nodes: np.ndarray, hop: np.ndarray, hops: int, g: dict) -> dict:
    """Gather one shard's nodes and the edges into its inner rings, then save it."""
    e, src_l, dst_l = inner_edges(
        nodes, hop, hops, len(g["z"]), g["in_indptr"], g["in_order"], g["src"], g["dst"]
    )
    n_owned = int((hop == 0).sum())
    np.savez(
        path,
        nodes=nodes,
        n_owned=np.int64(n_owned),
        hop=hop,
        src=src_l,
        dst=dst_l,
        weight=g["weight"][e],
        etypes=g["etypes"][e],
        z=g["z"][nodes],
        omega=g["omega"][nodes],
        struct=g["struct"][nodes],
        treatment=g["treatment"][nodes],
        outcome=g["outcome"][nodes],
        split=g["split"][nodes],
    )
    return {"owned": n_owned, "shadow": len(nodes) - n_owned, "edges": len(e)}


def partition_graph(run: RunLayout | str | Path, cfg: PartitionConfig | None = None) -> dict:
    """Partition ``RUN/graph`` and write ``RUN/shards`` (files + manifest.json) with Ray tasks."""
    cfg = cfg or PartitionConfig()
    run = as_layout(run)
    require_ray("partitioning")
    t0 = time.perf_counter()
    art = GraphArtifacts.load(run)
    n = art.n_users
    k = cfg.parts_for(n)
    parts = metis_parts(n, art.src, art.dst, art.weight, k, cfg.seed)
    t_metis = time.perf_counter() - t0

    indptr, order = _in_csr(n, art.src, art.dst)
    shared = {
        "z": art.z,
        "omega": art.omega,
        "struct": art.struct,
        "treatment": art.users["treatment"].to_numpy(np.float32),
        "outcome": art.users["outcome"].to_numpy(np.float32),
        "split": art.users["split"].map(SPLIT_CODE).to_numpy(np.int8),
        "src": art.src,
        "dst": art.dst,
        "weight": art.weight,
        "etypes": art.etypes,
        "in_indptr": indptr,
        "in_order": order,
    }
    g_ref = ray.put(shared)
    writer = ray.remote(num_cpus=0.5)(_write_shard)
    with atomic_dir(run.shards.dir) as tmp_dir:
        tmp = ShardFiles(tmp_dir)
        futures, names = [], []
        for p, nodes, hop in shard_members(n, art.src, art.dst, parts, k, cfg.hops):
            path = tmp.shard(p)
            futures.append(writer.remote(str(path), nodes, hop, cfg.hops, g_ref))
            names.append(path.name)
        stats = []
        with tqdm(total=len(futures), desc="write shards", disable=len(futures) < 8) as bar:
            pending = list(futures)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                bar.update(len(done))
        stats = ray.get(futures)
        cut = parts[art.src] != parts[art.dst]
        owned = np.array([s["owned"] for s in stats])
        manifest = {
            "version": 1,
            "graph_fingerprint": art.manifest["fingerprint"],
            "config": cfg.model_dump(),
            "num_parts": k,
            "hops": cfg.hops,
            "parts": [{"file": f, **s} for f, s in zip(names, stats, strict=True)],
            "edge_cut": float(cut.mean()) if len(cut) else 0.0,
            "shadow_ratio": float(sum(s["shadow"] for s in stats) / max(owned.sum(), 1)),
            "balance": float(owned.max() / owned.mean()) if len(owned) else 1.0,
            "timings_s": {"metis": t_metis, "total": time.perf_counter() - t0},
        }
        np.save(tmp.membership, parts)
        write_json(tmp.manifest, manifest)
    log.info(
        "partition: %d parts, edge cut %.3f, shadow ratio %.2f, balance %.2f",
        k,
        manifest["edge_cut"],
        manifest["shadow_ratio"],
        manifest["balance"],
    )
    return {k_: manifest[k_] for k_ in ("num_parts", "edge_cut", "shadow_ratio", "balance", "hops")}


def load_shard(path: str | Path) -> dict[str, np.ndarray]:
    """Read one shard file into a dict of arrays (no pickle)."""
    with np.load(path, allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def shard_paths(run: RunLayout | str | Path) -> list[Path]:
    """The shard files of a partitioned run, in part order."""
    files = as_layout(run).shards
    return [files.dir / p["file"] for p in read_json(files.manifest)["parts"]]
