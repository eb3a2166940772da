"""A throwaway local ``redis-server`` for development, tests and benchmarks (not for production)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis


@contextmanager
def local_redis(workdir: str | Path, *, timeout: float = 20.0) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port (no persistence); yields its URL.

    For tests, benchmarks and demos. Raises ``FileNotFoundError`` when ``redis-server`` is not
    installed (Debian: ``apt-get install redis-server``), ``RuntimeError`` if it does not answer.
    """

    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError(
            "redis-server is not on PATH; install it (Debian: apt-get install -y redis-server)"
        )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    logfile = workdir / "redis.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    cmd += ["--dir", str(workdir), "--logfile", str(logfile)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = logfile.read_text(errors="replace")[-2000:] if logfile.exists() else ""
                raise RuntimeError(f"redis-server did not start on port {port}:\n{tail}")
            time.sleep(0.05)
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
