"""Train and score on a two-node local Ray cluster; print where the work ran as one JSON line.

Run by ``tests/test_cluster.py`` in its own process (a pytest process holds one Ray runtime, the
session's). ``python tests/_two_node.py WORKDIR``: a head and a worker node on loopback
(``ray.cluster_utils.Cluster``, one CPU each, so two 1-CPU Ray Train workers or two 1-CPU
scoring actors cannot share a node), a small simulated dataset, build/partition/pretrain,
training with two Ray Train workers (DDP, gloo) and batch scoring with two actors. The last
line of stdout is ``{"cluster": [node ids], "train": [node id per rank], "score": {node id:
users}, ...}``. The cluster is shut down however the script ends.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

N_USERS = 2000
OBJECT_STORE = 200 * 1024 * 1024


def run(work: Path, address: str) -> dict:
    import ray.data

    from creditgraph.config import PipelineConfig
    from creditgraph.data.simulate import SimulationConfig, simulate_to_dir
    from creditgraph.graph.config import PartitionConfig
    from creditgraph.model.config import ModelConfig
    from creditgraph.pipeline import run_pipeline
    from creditgraph.serving.score import score_users
    from creditgraph.train.config import TrainConfig
    from creditgraph.train.trainer import run_training
    from creditgraph.utils.runtime import init_ray

    init_ray(address)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    data, run_dir, out = work / "data", work / "run", work / "scores"
    simulate_to_dir(SimulationConfig(n_users=N_USERS, seed=11), data)
    cfg = PipelineConfig(
        partition=PartitionConfig(num_parts=4, hops=2),
        model=ModelConfig(hidden=16, heads=2, mc_dropout_samples=3),
        train=TrainConfig(epochs=2, num_workers=2, cpus_per_worker=1, seed=1),
    )
    run_pipeline(data, run_dir, cfg, stop_after="pretrain")
    times["prepare"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train = run_training(run_dir, cfg.model, cfg.train)
    times["train"] = time.perf_counter() - t0

    # Dispatch only once both scoring actors are up: otherwise the first one may take every batch
    # of this small dataset before the second has loaded the model.
    ray.data.DataContext.get_current().wait_for_min_actors_s = 240
    t0 = time.perf_counter()
    score = score_users(
        run_dir,
        data,
        out,
        cfg.policy,
        registry=work / "snapshots",
        batch_size=100,
        min_actors=2,
        max_actors=2,
    )
    times["score"] = time.perf_counter() - t0
    return {
        "cluster": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
        "train": train["worker_nodes"],
        "train_epochs": train["epochs_run"],
        "score": score["nodes"],
        "n_users": N_USERS,
        "users_scored": score["users_scored"],
        "outputs": sorted(p.name for p in out.iterdir()),
        "seconds": times,
    }


def main() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    import ray
    from ray.cluster_utils import Cluster

    # a SIGTERM (the test's timeout) unwinds through ``finally``: the cluster is shut down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(sys.argv[1])
    node = {"num_cpus": 1, "object_store_memory": OBJECT_STORE}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        report = run(work, cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
