"""Batching ClusterGCN shards: numpy concatenation into a dataclass vs PyG ``Data`` + ``Batch``.

On the shards of a simulated run (default 50,000 users, default partitioning: ~1,000 owned users
per part, 2 shadow hops) this times, per step of ``k`` shards:

* (a) ``creditgraph.model.batch.collate_shards``: numpy concatenation into the ``GraphBatch``
  dataclass;
* (b) the PyG candidate: one ``torch_geometric.data.Data`` per shard, glued by
  ``Batch.from_data_list`` (PyG offsets ``edge_index``), :func:`pyg_collate` below;
* (c) a ``Data`` subclass filled by the same numpy concatenation as (a) (PyG's type without its
  collation), :func:`data_from_concat`;
* the full training step on each: collate + forward + ``joint_loss`` + backward of the default
  model, with one torch thread (a Ray Train worker's ``cpus_per_worker = 1``).

The variants (and (a) a second time: the A/A noise floor) run interleaved, in rotating order, on
the same random shard groups; medians over many steps. The forward/backward computation is the
same on the same tensors, so the cost of a variant is its collation difference (measured alone,
precisely) plus whatever the step shows beyond noise. "Costs nothing measurable" = the full step
with PyG batching within 2 % of the step with (a); the verdict reads that off the collation
difference, since the paired full-step differences stay within the noise of a shared machine
(reported next to the A/A difference). A last table sizes ``to_heterodata``.

Environment overrides: BENCH_BATCHING_USERS (default 50000), BENCH_BATCHING_STEPS (timed steps
per variant and group size, default 150), BENCH_BATCHING_RUN (an already built and partitioned run
folder to reuse instead of simulating one).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Batch, Data

from benchmarks._report import markdown_table, write_section
from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.graph.partition import load_shard, shard_paths
from creditgraph.model.batch import collate_shards
from creditgraph.model.config import ModelConfig
from creditgraph.model.losses import TRAIN, LossWeights, joint_loss
from creditgraph.model.net import CreditGraphNet, ModelSpec

USERS = int(os.environ.get("BENCH_BATCHING_USERS", "50000"))
STEPS = int(os.environ.get("BENCH_BATCHING_STEPS", "150"))
RUN = os.environ.get("BENCH_BATCHING_RUN")
GROUPS = (1, 4)  # shards per step: training's default, and predict's
LIMIT = 2.0  # percent of the step: the threshold of "costs nothing measurable"


class PygBatch(Data):
    """The candidate batch type: a PyG ``Data`` with the attributes the model reads."""

    @property
    def leaves(self) -> Tensor | None:  # absent extras read as None, as on GraphBatch
        return self._store.get("leaves")

    @property
    def prior(self) -> Tensor | None:
        return self._store.get("prior")

    def mask(self, split: int, labeled: bool = True) -> Tensor:
        m = self.owned & (self.split == split)
        return m & torch.isfinite(self.outcome) if labeled else m


def _tensor(a: np.ndarray, dtype) -> Tensor:
    # converts (copies) only where needed; the Batch concatenation copies anyway
    return torch.from_numpy(np.require(a, dtype=dtype, requirements="W"))


def shard_data(shard: dict, prior: np.ndarray) -> PygBatch:
    """One shard as a ``Data`` (local ``edge_index``, node arrays, the ``prior`` extra)."""
    nodes = np.asarray(shard["nodes"])
    return PygBatch(
        num_nodes=len(nodes),
        nodes=_tensor(nodes, np.int64),
        owned=torch.from_numpy(np.asarray(shard["hop"]) == 0),
        z=_tensor(shard["z"], np.float32),
        omega=_tensor(shard["omega"], np.float32),
        struct=_tensor(shard["struct"], np.float32),
        treatment=_tensor(shard["treatment"], np.float32),
        outcome=_tensor(shard["outcome"], np.float32),
        split=_tensor(shard["split"], np.int64),
        edge_index=torch.from_numpy(np.stack([shard["src"], shard["dst"]]).astype(np.int64)),
        edge_weight=_tensor(shard["weight"], np.float32),
        prior=torch.from_numpy(np.asarray(prior[nodes], dtype=np.float32)),
    )


def pyg_collate(shards: list[dict], prior: np.ndarray) -> PygBatch:
    """(b): ``Data`` per shard + ``Batch.from_data_list``."""
    return Batch.from_data_list([shard_data(s, prior) for s in shards])


def data_from_concat(shards: list[dict], prior: np.ndarray) -> PygBatch:
    """(c): the numpy concatenation of (a), held by a ``Data``."""
    a = collate_shards(shards, prior=prior)
    return PygBatch(
        num_nodes=a.num_nodes,
        **{f.name: v for f in fields(a) if (v := getattr(a, f.name)) is not None},
    )


def build_run(root: Path, users: int) -> Path:
    """Simulate, build and partition a run with the pipeline's own stages (defaults)."""
    from creditgraph.data.simulate import SimulationConfig, simulate_to_dir
    from creditgraph.graph.build import build_graph
    from creditgraph.graph.config import GraphConfig, PartitionConfig
    from creditgraph.graph.partition import partition_graph
    from creditgraph.utils.runtime import init_ray

    init_ray()
    data, run = root / "data", root / "run"
    simulate_to_dir(SimulationConfig(n_users=users, seed=0), data)
    build_graph(data, run, GraphConfig())
    partition_graph(run, PartitionConfig())
    return run


def default_model(art: GraphArtifacts, seed: int = 0) -> CreditGraphNet:
    """The default model with its data-fitted buffers, a stand-in alpha and a random DAG."""
    torch.manual_seed(seed)
    f = art.z.shape[1]
    spec = ModelSpec(
        n_features=f,
        n_struct=art.struct.shape[1],
        feature_names=art.feature_names,
        struct_names=art.manifest["struct_names"],
    )
    model = CreditGraphNet(ModelConfig(), spec)
    train = art.split_mask("train")
    model.fit_buffers(
        torch.tensor(art.users["treatment"].to_numpy()[train], dtype=torch.float32),
        torch.tensor(art.users["outcome"].to_numpy()[train], dtype=torch.float32),
    )
    rng = np.random.default_rng(seed)
    pairs = np.array([(i, j) for i in range(f) for j in range(i + 1, f)])
    dag = pairs[rng.choice(len(pairs), size=min(len(pairs), 2 * f), replace=False)].T
    model.set_causal(torch.from_numpy(rng.uniform(-1, 1, f)), torch.from_numpy(dag))
    return model.train()


def _step(model: CreditGraphNet, batch) -> None:
    out = model(batch)
    loss, _ = joint_loss(model, out, batch, TRAIN, LossWeights(beta=1.0, lam=0.5, ipw=True))
    model.zero_grad(set_to_none=True)
    loss.backward()


def _equal_nan(x: Tensor, y: Tensor) -> bool:
    return x.shape == y.shape and bool(((x == y) | (torch.isnan(x) & torch.isnan(y))).all())


def _variants(prior: np.ndarray) -> dict:
    return {
        "a": lambda g: collate_shards(g, prior=prior),
        "b": lambda g: pyg_collate(g, prior),
        "c": lambda g: data_from_concat(g, prior),
        "a2": lambda g: collate_shards(g, prior=prior),
    }


def _rounds(n: int, names: list[str]):
    """Round r runs the variants rotated by r, so none is always first or last."""
    for r in range(n):
        yield r, names[r % len(names) :] + names[: r % len(names)]


def measure_collate(shards: list[dict], prior: np.ndarray, k: int, reps: int, seed: int) -> dict:
    """Median ms of the collation alone, per variant (many interleaved repetitions)."""
    rng = np.random.default_rng(seed)
    variants = _variants(prior)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r, order in _rounds(reps + 20, list(variants)):
        group = [shards[i] for i in rng.choice(len(shards), size=k, replace=False)]
        for v in order:
            t0 = time.perf_counter()
            variants[v](group).to("cpu")
            if r >= 20:
                times[v].append((time.perf_counter() - t0) * 1e3)
    return {v: float(np.median(t)) for v, t in times.items()}


def measure_steps(
    shards: list[dict], prior: np.ndarray, model, k: int, steps: int, seed: int
) -> dict:
    """Per variant, ms per full step (collate + forward + loss + backward), interleaved."""
    rng = np.random.default_rng(seed)
    variants = _variants(prior)
    full: dict[str, list[float]] = {v: [] for v in variants}
    for r, order in _rounds(steps + 4, list(variants)):  # 4 warm-up rounds
        group = [shards[i] for i in rng.choice(len(shards), size=k, replace=False)]
        for v in order:
            t0 = time.perf_counter()
            _step(model, variants[v](group).to("cpu"))
            if r >= 4:
                full[v].append((time.perf_counter() - t0) * 1e3)
    return {v: np.asarray(t) for v, t in full.items()}


def summarize(k: int, coll: dict, full: dict) -> dict:
    """Shares of step (a): the collation difference (the deterministic part of the cost), the
    paired full-step difference and the A/A difference (the noise floor)."""
    step_a = float(np.median(full["a"]))
    out = {"k": k, "step_a": step_a, "collate": coll}
    for v in ("b", "c", "a2"):
        out[f"step_{v}"] = float(np.median(full[v]))
        out[f"paired_{v}_pct"] = 100 * float(np.median(full[v] - full["a"])) / step_a
        out[f"collate_{v}_pct"] = 100 * (coll[v] - coll["a"]) / step_a
    return out


def hetero_size(run: Path) -> list[dict]:
    """Time and size of the graph layer's HeteroData view of the run."""
    from creditgraph.graph.hetero import to_heterodata

    art = GraphArtifacts.load(run)
    rows = []
    for with_uf in (False, True):
        seconds = []
        for _ in range(3):  # the best of three: the first call also pays cold caches
            t0 = time.perf_counter()
            data = to_heterodata(art, materialize_user_feature_edges=with_uf)
            seconds.append(time.perf_counter() - t0)
        nbytes = sum(
            v.numel() * v.element_size()
            for store in data.stores
            for v in store.values()
            if isinstance(v, Tensor)
        )
        rows.append(
            {
                "user-feature edges": "materialized" if with_uf else "dense z/omega only",
                "node types": len(data.node_types),
                "edge types": len(data.edge_types),
                "edges": f"{sum(data[e].num_edges for e in data.edge_types):,}",
                "seconds (best of 3)": round(min(seconds), 2),
                "tensor MiB": round(nbytes / 2**20, 1),
            }
        )
    return rows


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_batching_") as tmp:
        run = Path(RUN) if RUN else build_run(Path(tmp), USERS)
        art = GraphArtifacts.load(run)
        shards = [load_shard(p) for p in shard_paths(run)]
        prior = np.random.default_rng(0).normal(-2, 1, art.n_users).astype(np.float32)
        model = default_model(art)
        for k in GROUPS:  # all variants give the same tensors
            g = shards[:k]
            a = collate_shards(g, prior=prior)
            for other in (pyg_collate(g, prior), data_from_concat(g, prior)):
                keys = [f.name for f in fields(a) if getattr(a, f.name) is not None]
                assert other.num_nodes == a.num_nodes and other.leaves is None
                assert all(_equal_nan(getattr(a, key), getattr(other, key)) for key in keys)
        load0 = os.getloadavg()[0]
        results = []
        for k in GROUPS:
            coll = measure_collate(shards, prior, k, reps=600, seed=k)
            steps = STEPS if k == 1 else max(20, STEPS // 3)
            full = measure_steps(shards, prior, model, k, steps, seed=100 + k)
            results.append({**summarize(k, coll, full), "steps": steps})
        load1 = os.getloadavg()[0]
        hetero = hetero_size(run)
    sizes = np.array([len(s["nodes"]) for s in shards])
    owned = np.array([int(s["n_owned"]) for s in shards])
    rows = [
        {
            "shards / step": r["k"],
            "steps": r["steps"],
            "collate (a) ms": round(r["collate"]["a"], 2),
            "collate (b) ms": round(r["collate"]["b"], 2),
            "collate (c) ms": round(r["collate"]["c"], 2),
            "step (a) ms": round(r["step_a"], 1),
            "step (b) ms": round(r["step_b"], 1),
            "(b) collate cost": f"{r['collate_b_pct']:+.2f} %",
            "(b) paired step diff": f"{r['paired_b_pct']:+.2f} %",
            "(c) collate cost": f"{r['collate_c_pct']:+.2f} %",
            "(c) paired step diff": f"{r['paired_c_pct']:+.2f} %",
            "A/A paired step diff": f"{r['paired_a2_pct']:+.2f} %",
        }
        for r in results
    ]
    worst = max(r["collate_b_pct"] for r in results)
    verdict = (
        f"below {LIMIT:g} %: PyG Data/Batch costs nothing measurable"
        if worst < LIMIT
        else f"at or above {LIMIT:g} %: PyG Data/Batch costs something measurable"
    )
    body = (
        f"{art.n_users:,} simulated users, {len(shards)} shards (owned users per shard: median "
        f"{int(np.median(owned))}; nodes with shadows: median {int(np.median(sizes))}, max "
        f"{sizes.max()}), {art.z.shape[1]} features; default `ModelConfig` (hidden 32, 4 heads, "
        "2 hops), one torch thread. (a) numpy concatenation into the `GraphBatch` dataclass "
        "(`collate_shards`); (b) PyG `Data` per shard + `Batch.from_data_list`; (c) a `Data` "
        "filled by the concatenation of (a). Collation alone: median of 600 interleaved "
        "repetitions per variant. Step = collate + forward + `joint_loss` + backward, median over "
        "the steps given, variants interleaved in rotating order on the same random shard "
        "groups. *collate cost*: the variant's collation minus (a)'s, as a share of step (a) "
        "(the forward/backward work is the same on the same tensors); *paired step diff*: "
        "median over steps of the per-step difference to (a), as a share of step (a); *A/A*: "
        "(a) against itself, the noise floor of the step timings.\n\n"
        + markdown_table(rows)
        + f"\n\nVerdict: the collation cost of (b) reaches {worst:.2f} % of the step, {verdict}. "
        f"1-minute load average {load0:.1f} before and {load1:.1f} after the timings (2 cores "
        "shared).\n\n### The HeteroData view of the same run (`graph/hetero.py`)\n\n"
        + markdown_table(hetero)
    )
    write_section("Batching: numpy concat vs PyG Data/Batch", body, "benchmarks/bench_batching.py")
    print(body)


if __name__ == "__main__":
    main()
