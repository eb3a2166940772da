"""Shared fixtures: one local Ray runtime per test session (2 cores, dashboard off)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray runtime shared by the whole session."""
    import ray

    from creditgraph.utils.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def sim_data(tmp_path_factory, ray_session):
    """A small simulated dataset directory (3,000 users), shared by the session."""
    from creditgraph.data.simulate import SimulationConfig, simulate_to_dir

    out = tmp_path_factory.mktemp("sim") / "data"
    simulate_to_dir(SimulationConfig(n_users=3000, seed=7), out)
    return out


@pytest.fixture(scope="session")
def built_run(tmp_path_factory, sim_data):
    """``sim_data`` built into a run folder: RUN/graph and RUN/shards (8 parts, 2 hops)."""
    from creditgraph.graph.build import build_graph
    from creditgraph.graph.config import GraphConfig, PartitionConfig
    from creditgraph.graph.partition import partition_graph

    run = tmp_path_factory.mktemp("run")
    build_graph(sim_data, run, GraphConfig())
    partition_graph(run, PartitionConfig(num_parts=8, hops=2))
    return run


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real ``redis-server`` on a free loopback port (no persistence), for the whole session.

    Fails (never skips) when ``redis-server`` is missing: the Redis store is a core path.
    ``.ci/run`` installs it from Debian's packages (``apt-get install redis-server``).
    """
    import shutil

    from creditgraph.serving.redis_local import local_redis

    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not on PATH; apt-get install -y redis-server", pytrace=False)
    with local_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def pretrained_run(built_run):
    """``built_run`` with the causal pretraining stage (teacher, alpha, DAG)."""
    from creditgraph.causal.config import PretrainConfig
    from creditgraph.causal.pretrain import run_pretrain

    if not (built_run / "pretrain" / "manifest.json").exists():
        run_pretrain(built_run, PretrainConfig())
    return built_run


@pytest.fixture(scope="session")
def trained_run(pretrained_run):
    """A small trained model in ``RUN/model`` (1 worker, a few epochs) with its calibration
    (``RUN/calibration``): for scoring and serving."""
    from creditgraph.model.config import ModelConfig
    from creditgraph.policy.calibrate import run_calibration
    from creditgraph.train.config import TrainConfig
    from creditgraph.train.trainer import run_training

    if not (pretrained_run / "model" / "model.json").exists():
        run_training(
            pretrained_run,
            ModelConfig(hidden=16, heads=2, mc_dropout_samples=3),
            TrainConfig(epochs=3, num_workers=1, seed=1),
        )
    if not (pretrained_run / "calibration" / "manifest.json").exists():
        run_calibration(pretrained_run)
    return pretrained_run


@pytest.fixture(scope="session")
def scored(trained_run, sim_data, tmp_path_factory):
    """``sim_data`` scored with the trained model: (out folder, summary, snapshot registry); the
    snapshot is promoted, so a service started on the registry serves it."""
    from creditgraph.serving.score import score_users

    root = tmp_path_factory.mktemp("scored")
    summary = score_users(trained_run, sim_data, root / "out", registry=root / "reg", promote=True)
    return root / "out", summary, root / "reg"
