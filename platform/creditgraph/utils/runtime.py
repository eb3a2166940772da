"""Starting or joining a Ray runtime, in one place.

Only entry points start Ray: the CLI commands, the pipeline runner, the Ray Job scripts in ``jobs/``,
the demo and test fixtures call :func:`init_ray`. Library code that uses Ray calls
:func:`require_ray`, which raises a clear error instead of silently starting (or joining) one.

Where the runtime comes from, in order: an explicit ``address`` or ``RAY_ADDRESS`` (a cluster, or
the job's cluster inside ``ray job submit``); else the persistent local head that ``creditgraph up``
started (recorded in ``~/.creditgraph/ray.json``; a record whose head is gone is ignored with a
one-line note); else a new local runtime with the dashboard off. ``address="local"`` is passed
explicitly so a stray cluster recorded in ``/tmp/ray/ray_current_cluster`` is never joined by
accident.

A start that hangs (a loaded machine) cannot be cancelled from Python: after
``CREDITGRAPH_RAY_START_TIMEOUT`` seconds (default 120) the process prints one line saying what to
do and exits with code 2.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from creditgraph.utils.logs import (
    CONSOLE_FILTER_ENV,
    console_fd,
    filter_native_stderr,
    get_logger,
    route_ray_logs,
    set_ray_session_dir,
)

log = get_logger(__name__)

HOME_ENV = "CREDITGRAPH_HOME"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
START_TIMEOUT_ENV = "CREDITGRAPH_RAY_START_TIMEOUT"
DEFAULT_START_TIMEOUT_S = 120.0
TIMEOUT_EXIT_CODE = 2


class RayNotRunning(RuntimeError):
    """A library function that needs Ray was called before an entry point started it."""


class RayStartError(RuntimeError):
    """Ray could not be started or joined; the message says what to do."""


# ------------------------------------------------------------------------- the persistent local head


def state_dir() -> Path:
    """Where creditgraph keeps its per-user state (``CREDITGRAPH_HOME``, default ~/.creditgraph)."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".creditgraph")


def head_file() -> Path:
    """The record of the local Ray head started by ``creditgraph up``."""
    return state_dir() / "ray.json"


def _read_head() -> dict | None:
    path = head_file()
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"address": None, "broken": True}
    return state if isinstance(state, dict) else {"address": None, "broken": True}


def _pid_alive(pid: int | None, marker: str | None) -> bool:
    import psutil

    if not pid:
        return False
    try:
        proc = psutil.Process(int(pid))
        return proc.is_running() and (not marker or marker in " ".join(proc.cmdline()))
    except (psutil.Error, ValueError):
        return False


def _port_open(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def head_alive(state: dict) -> bool:
    """Whether a recorded head still runs: its GCS process and its port answer."""
    address = state.get("address")
    if not address:
        return False
    if state.get("gcs_pid") and not _pid_alive(state["gcs_pid"], state.get("session_dir")):
        return False
    return _port_open(address)


def local_head() -> dict | None:
    """The record of the live head that ``creditgraph up`` started (``address``, ``auth_mode``,
    ...), else None.

    A record whose head is gone (a reboot, ``ray stop``) is removed with a one-line note.
    """
    state = _read_head()
    if state is None:
        return None
    if head_alive(state):
        return state
    log.warning(
        "ignoring %s: no Ray head answers at %s (run `creditgraph up` to start one again)",
        head_file(),
        state.get("address"),
    )
    with suppress(OSError):
        head_file().unlink()
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_executable() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else "ray"


def _find_gcs(port: int) -> tuple[int | None, str | None]:
    """(pid, session dir) of the GCS server listening on ``port``."""
    import psutil

    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not cmd or "gcs_server" not in Path(cmd[0]).name:
            continue
        if f"--gcs_server_port={port}" in cmd:
            session = next(
                (a.split("=", 1)[1] for a in cmd if a.startswith("--session-dir=")), None
            )
            return proc.pid, session
    return None, None


def agent_port_flags() -> list[str]:
    """``ray start`` flags giving the node's agents free ports: the defaults (52365 for the
    dashboard agent, whose job agent ``ray job submit`` needs) are taken when another Ray
    runtime already runs on this machine, and the agent then never comes up."""
    names = (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    )
    return [f"--{name}={_free_port()}" for name in names]


def start_head(
    num_cpus: int | None = None,
    port: int | None = None,
    temp_dir: str | Path | None = None,
    timeout_s: float | None = None,
) -> dict:
    """Start a persistent local Ray head (dashboard off) and record it in :func:`head_file`.

    Later commands on this machine join it instead of starting their own runtime. Returns the
    record; a head that is already alive is returned as it is (``"reused": True``).
    """
    state = _read_head()
    if state is not None and head_alive(state):
        return {**state, "reused": True}
    port = port or _free_port()
    cmd = [
        _ray_executable(),
        "start",
        "--head",
        f"--port={port}",
        "--include-dashboard=false",
        f"--dashboard-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        *agent_port_flags(),
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if temp_dir is not None:
        cmd.append(f"--temp-dir={Path(temp_dir).resolve()}")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    timeout = start_timeout(timeout_s)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RayStartError(_timeout_message(timeout, "a Ray head")) from exc
    out = proc.stdout + proc.stderr
    found = re.search(r"--address='([^']+)'", out)
    if proc.returncode != 0 or not found:
        tail = " | ".join(line.strip() for line in out.strip().splitlines()[-3:])
        raise RayStartError(f"`ray start --head` failed (exit {proc.returncode}): {tail}")
    gcs_pid, session = _find_gcs(port)
    # `ray start` turns token authentication on by itself when a token exists; a driver that
    # joins by address must then be told (RAY_AUTH_MODE=token), so the mode is recorded
    auth = os.environ.get(AUTH_MODE_ENV) or (
        "token" if "Token authentication is enabled" in out else "disabled"
    )
    state = {
        "address": found.group(1),
        "auth_mode": auth.lower(),
        "gcs_pid": gcs_pid,
        "session_dir": session,
        "temp_dir": None if temp_dir is None else str(Path(temp_dir).resolve()),
        "num_cpus": num_cpus,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    head_file().parent.mkdir(parents=True, exist_ok=True)
    tmp = head_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(head_file())
    return {**state, "reused": False}


def _session_processes(state: dict) -> list:
    """Every process of the recorded head: those naming its session folder or its address."""
    import psutil

    markers = [m for m in (state.get("session_dir"), state.get("address")) if m]
    # whole tokens only: 10.0.0.1:6379 must not match 10.0.0.1:63790
    pattern = re.compile("|".join(re.escape(m) + r"(?![\w.])" for m in markers))
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if markers and proc.pid != os.getpid() and pattern.search(cmd):
            found.append(proc)
    return found


def stop_session(state: dict, grace_s: float = 15.0) -> int:
    """SIGTERM (then SIGKILL) the processes of one Ray session, named by its ``session_dir``
    and/or ``address``; unlike ``ray stop`` it leaves every other Ray runtime on the machine
    alone. Returns how many processes it stopped."""
    import psutil

    procs = _session_processes(state)
    for proc in procs:
        with suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def stop_head(grace_s: float = 15.0) -> dict | None:
    """Stop the head recorded by :func:`start_head` (only its processes) and forget it.

    Returns the record, or None when there was none.
    """
    state = _read_head()
    if state is None:
        return None
    stopped = stop_session(state, grace_s) if state.get("address") else 0
    temp_dir = state.get("temp_dir")
    if temp_dir:  # `ray start` records the address of its latest head there
        with suppress(OSError):
            marker = Path(temp_dir) / "ray_current_cluster"
            if marker.read_text().strip() == state.get("address"):
                marker.unlink()
    with suppress(OSError):
        head_file().unlink()
    return {**state, "stopped_processes": stopped}


# ----------------------------------------------------------------------------- joining or starting


def start_timeout(timeout_s: float | None = None) -> float:
    """Seconds Ray may take to start or answer (``CREDITGRAPH_RAY_START_TIMEOUT``, default 120)."""
    if timeout_s is not None:
        return float(timeout_s)
    raw = os.environ.get(START_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_START_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise RayStartError(f"{START_TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return value


def _timeout_message(timeout: float, what: str) -> str:
    return (
        f"{what} did not start within {timeout:g} s (the machine may be busy): retry, start a "
        f"persistent one once with `creditgraph up` (later commands join it), or allow more "
        f"time with {START_TIMEOUT_ENV}=300"
    )


@contextmanager
def _deadline(timeout: float, message: str):
    """Exit the process with one line and code 2 if the block has not finished in time."""

    def give_up() -> None:
        os.write(console_fd(), f"error: {message}\n".encode())
        os._exit(TIMEOUT_EXIT_CODE)

    timer = threading.Timer(timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    timeout_s: float | None = None,
    **kwargs: Any,
) -> None:
    """Start or join Ray once per process (a no-op when Ray is already up).

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; otherwise the head of
    ``creditgraph up`` is joined when it is alive (unless ``num_cpus`` asks for a runtime of a
    given size), else a local runtime starts with the dashboard off. Ray's own worker output stays
    out of the console (it goes to Ray's session log folder; ``CREDITGRAPH_RAY_LOG_TO_DRIVER=1``
    brings it back for debugging) and Ray's Python loggers write to the log file
    (:func:`creditgraph.utils.logs.set_log_file`); only their errors reach the console.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    route_ray_logs()  # before init: Ray logs while it starts
    if os.environ.get(CONSOLE_FILTER_ENV) == "1":
        filter_native_stderr()
    address = address or os.environ.get("RAY_ADDRESS")
    head = None
    if not address and num_cpus is None:
        head = local_head()
        if head is not None:
            address = head["address"]
            if head.get("auth_mode") == "token":
                _use_token_auth()
    to_driver = bool(int(os.environ.get("CREDITGRAPH_RAY_LOG_TO_DRIVER", "0")))
    timeout = start_timeout(timeout_s)
    what = f"the Ray cluster at {address}" if address else "a local Ray runtime"
    try:
        with _deadline(timeout, _timeout_message(timeout, what)):
            if address:
                log.info(
                    "joining %s at %s", "the head of `creditgraph up`" if head else "Ray", address
                )
                ray.init(
                    address=address,
                    log_to_driver=to_driver,
                    logging_level="info",
                    **{k: v for k, v in kwargs.items() if k != "include_dashboard"},
                )
            else:
                ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=kwargs.pop("include_dashboard", False),
                    log_to_driver=to_driver,
                    configure_logging=True,
                    logging_level="info",
                    **kwargs,
                )
    except (ValueError, TypeError):
        raise  # a wrong argument: a bug, not the machine
    except Exception as exc:  # Ray raises bare Exceptions too ("node timed out during startup")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RayStartError(
            f"could not start or join Ray ({what}): {first} -- on a busy machine retry, or start "
            "a persistent runtime once with `creditgraph up` (later commands join it)"
        ) from exc
    _quiet_ray()


def _use_token_auth() -> None:
    """Join with the local token (~/.ray/auth_token), as Ray does for a cluster it finds by
    itself: Ray never sends it to an explicit address unless told to (RAY_AUTH_MODE=token)."""
    if os.environ.get(AUTH_MODE_ENV):
        return  # the user decided
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray: it reads the mode when it starts its client
        os.environ[AUTH_MODE_ENV] = "token"
        return
    # sets RAY_AUTH_MODE=token and refreshes Ray's cached configuration when a token exists
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def ray_session_dir() -> Path | None:
    """The session folder of the Ray runtime this process is connected to (None: not connected)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None) if ray.is_initialized() else None
    return None if node is None else Path(node.get_session_dir_path())


def require_ray(what: str) -> None:
    """Raise :class:`RayNotRunning` unless a Ray runtime is up (``what`` names the caller)."""
    import ray

    if not ray.is_initialized():
        raise RayNotRunning(
            f"{what} runs on Ray, and no Ray runtime is running in this process: start one with "
            "creditgraph.utils.runtime.init_ray() (the CLI, the pipeline and jobs/ do this)"
        )


def _quiet_ray() -> None:
    """Ray Data and Ray Train progress and info lines stay out of the console."""
    import ray.data

    route_ray_logs()
    set_ray_session_dir(ray_session_dir())
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(int(os.environ.get("CREDITGRAPH_RAY_PROGRESS", "0")))
    ctx.print_on_execution_start = False
