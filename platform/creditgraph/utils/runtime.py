"""Starting or joining a Ray runtime, in one place.

Only entry points start Ray: the CLI commands, the pipeline runner, the Ray Job scripts in ``jobs/``,
the demo and test fixtures call :func:`init_ray`. Library code that uses Ray calls
:func:`require_ray`, which raises a clear error instead of silently starting (or joining) one.

Where the runtime comes from, in order: an explicit ``address`` or ``RAY_ADDRESS`` (a cluster, or
the job's cluster inside ``ray job submit``); else a new local runtime with the dashboard off.
``address="local"`` is passed explicitly so a stray cluster recorded in
``/tmp/ray/ray_current_cluster`` is never joined by accident.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from creditgraph.utils.logs import get_logger

log = get_logger(__name__)


class RayNotRunning(RuntimeError):
    """A library function that needs Ray was called before an entry point started it."""


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Start or join Ray once per process (a no-op when Ray is already up).

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; otherwise a local runtime starts
    with the dashboard off and Ray's own worker output kept out of the console (it goes to Ray's
    session log folder; ``CREDITGRAPH_RAY_LOG_TO_DRIVER=1`` brings it back for debugging).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    to_driver = bool(int(os.environ.get("CREDITGRAPH_RAY_LOG_TO_DRIVER", "0")))
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=to_driver, logging_level="warning", **kwargs)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=kwargs.pop("include_dashboard", False),
            log_to_driver=to_driver,
            configure_logging=True,
            logging_level="warning",
            **kwargs,
        )
    _quiet_ray()


def require_ray(what: str) -> None:
    """Raise :class:`RayNotRunning` unless a Ray runtime is up (``what`` names the caller)."""
    if not ray.is_initialized():
        raise RayNotRunning(
            f"{what} runs on Ray, and no Ray runtime is running in this process: start one with "
            "creditgraph.utils.runtime.init_ray() (the CLI, the pipeline and jobs/ do this)"
        )


def _quiet_ray() -> None:
    """Ray Data and Ray Train progress and info lines stay out of the console."""
    import ray.data

    for name in ("ray.data", "ray.train", "ray.tune", "ray.serve", "ray.air"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(int(os.environ.get("CREDITGRAPH_RAY_PROGRESS", "0")))
    ctx.print_on_execution_start = False
