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
