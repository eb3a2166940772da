"""``creditgraph embed``: the batch stage of the lambda architecture (seed 001, section 3.4).

Runs the trained model over every ClusterGCN shard (a Ray Data pipeline with an autoscaling
actor pool, each actor holding the model once) and writes the embedding store:

=============  =====================  ==========================================================
namespace      key                    value
=============  =====================  ==========================================================
``node``       user id                int64 [1]: the user's node index
``state``      node                   float32 [2 * L * d]: interference tokens of hops 0..L-1
``nbr``        node                   int64 [k]: in-neighbours (information flows to the user)
``nbrw``       node                   float32 [k]: their edge weights
``user``       node                   float32 [F + 1 + S]: raw features, observed limit, struct
``unc``        node                   float32 [1]: MC-dropout std of the curve (DSL part)
=============  =====================  ==========================================================

plus JSON ``meta`` (model fingerprint, feature and struct names, dimensions). Batch scoring adds
``cap`` (per-user cluster cap and cluster id) after deciding. The store appears atomically.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.graph.partition import shard_paths
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

STORE_FILE = "store.sqlite"


def default_store_uri(run_dir: str | Path) -> str:
    return str(Path(run_dir).resolve() / STORE_FILE)


class _EmbedActor:
    """Ray Data actor: loads the model once, turns batches of shard paths into stored columns."""

    def __init__(self, model_dir: str, prior_ref, leaves_ref, seed: int):
        import ray
        import torch

        from creditgraph.model.artifact import load_model
        from creditgraph.model.predict import DSLStats, Predictor

        torch.set_num_threads(1)
        model, _ = load_model(model_dir)
        stats = DSLStats.load(model_dir)
        grid = stats.unc_grid if stats is not None else np.array([0.0])
        self.predictor = Predictor(model, grid, unc_grid=grid, seed=seed)
        self.prior = None if prior_ref is None else ray.get(prior_ref)
        self.leaves = None if leaves_ref is None else ray.get(leaves_ref)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from creditgraph.graph.partition import load_shard
        from creditgraph.model.batch import collate_shards

        shards = [load_shard(p) for p in batch["path"]]
        out = self.predictor.predict(
            collate_shards(shards, self.leaves, self.prior), hop_states=True
        )
        states = out.get("hop_states", np.zeros((len(out["node"]), 0), np.float32))
        return {
            "node": out["node"],
            "state": states.astype(np.float32),
            "unc": out["mc_std"].astype(np.float32),
        }


def _in_neighbours(art: GraphArtifacts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(art.dst, kind="stable")
    bounds = np.searchsorted(art.dst[order], np.arange(art.n_users + 1))
    return order, bounds, art.src[order]


def build_embeddings(
    run_dir: str | Path,
    store_uri: str | None = None,
    *,
    min_actors: int = 1,
    max_actors: int = 2,
    shards_per_call: int = 4,
) -> dict:
    """Compute and store every user's batch-side context; returns a summary."""
    import ray
    import ray.data

    from creditgraph.causal.pretrain import PretrainArtifacts
    from creditgraph.model.artifact import load_model
    from creditgraph.serving.online import teacher_prior
    from creditgraph.serving.store import build_store
    from creditgraph.utils.runtime import init_ray

    init_ray()
    t0 = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    uri = store_uri or default_store_uri(run_dir)
    model_dir = run_dir / "model"
    model, meta = load_model(model_dir)
    art = GraphArtifacts.load(run_dir)
    pre = PretrainArtifacts.load(run_dir)
    teacher = pre.teacher()
    prior_ref = (
        ray.put(teacher_prior(teacher, art.raw.astype(np.float64))) if model.prior_dim else None
    )
    leaves_ref = (
        ray.put(teacher.leaves(art.raw.astype(np.float64)))
        if model.spec.leaf_vocab and model.cfg.use_leaves
        else None
    )

    paths = [str(p.resolve()) for p in shard_paths(run_dir)]
    ds = ray.data.from_items(
        [{"path": p} for p in paths], override_num_blocks=max(1, len(paths) // shards_per_call)
    )
    emb = ds.map_batches(
        _EmbedActor,
        fn_constructor_kwargs={
            "model_dir": str(model_dir),
            "prior_ref": prior_ref,
            "leaves_ref": leaves_ref,
            "seed": 0,
        },
        batch_size=shards_per_call,
        compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors),
        num_cpus=1,
    )
    order, bounds, srcs = _in_neighbours(art)
    ids = art.users[art.id_column].to_numpy()
    user_rec = np.concatenate(
        [
            art.raw.astype(np.float32),
            art.users["treatment"].to_numpy(np.float32)[:, None],
            art.struct,
        ],
        axis=1,
    )
    nodes_seen = 0
    with build_store(uri) as store:
        store.put_json(
            "meta",
            {
                "model_fingerprint": meta["summary"]["fingerprint"],
                "graph_fingerprint": art.manifest["fingerprint"],
                "id_column": art.id_column,
                "feature_names": art.feature_names,
                "struct_names": art.manifest["struct_names"],
                "hops": model.cfg.hops,
                "hidden": model.cfg.hidden,
                "n_users": art.n_users,
                "created": time.time(),
            },
        )
        store.bulk_load("node", ids, np.arange(art.n_users, dtype=np.int64)[:, None])
        store.bulk_load("user", np.arange(art.n_users), user_rec)
        store.bulk_load(
            "nbr",
            np.arange(art.n_users),
            [srcs[bounds[i] : bounds[i + 1]] for i in range(art.n_users)],
        )
        w = art.weight[order].astype(np.float32)
        store.bulk_load(
            "nbrw",
            np.arange(art.n_users),
            [w[bounds[i] : bounds[i + 1]] for i in range(art.n_users)],
        )
        for batch in emb.iter_batches(batch_size=None, batch_format="numpy"):
            store.bulk_load("state", batch["node"], batch["state"], progress=False)
            store.bulk_load("unc", batch["node"], batch["unc"][:, None], progress=False)
            nodes_seen += len(batch["node"])
        if nodes_seen != art.n_users:  # inside the build: a failed store is never published
            raise RuntimeError(f"embedding covered {nodes_seen} of {art.n_users} users")
    seconds = time.perf_counter() - t0
    log.info("embedding store %s: %s users in %.0fs", uri, f"{art.n_users:,}", seconds)
    return {"store": uri, "users": art.n_users, "seconds": seconds}
