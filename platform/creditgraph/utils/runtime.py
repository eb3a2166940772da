"""Starting or joining a Ray runtime: a local one by default, a cluster when an address is given."""

from __future__ import annotations

import os
from typing import Any

from creditgraph.utils.logs import get_logger

log = get_logger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Initialise Ray once per process.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; otherwise a local runtime starts
    with the dashboard off. Calling it when Ray is already up is a no-op.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True, **kwargs)
    else:
        # address="local" so a stray cluster recorded in /tmp/ray/ray_current_cluster (e.g. one
        # started with `ray start`) is never joined by accident.
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=True,
            logging_level="warning",
            **kwargs,
        )
    _quiet_ray_data()


def _quiet_ray_data() -> None:
    import logging

    import ray.data

    for name in ("ray.data", "ray.data._internal.execution.streaming_executor"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(int(os.environ.get("CREDITGRAPH_RAY_PROGRESS", "0")))
    ctx.print_on_execution_start = False
