"""Timing and peak-memory measurement shared by the benchmarks."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil


def tree_rss(proc: psutil.Process | None = None) -> int:
    """Resident memory of a process and all its descendants (Ray workers included), bytes."""
    proc = proc or psutil.Process()
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += p.memory_info().rss
    return total


class PeakRSS:
    """Sample the process tree's RSS in a background thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = tree_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss())


@contextmanager
def stage(results: dict, name: str):
    """Record wall seconds and peak tree RSS (GiB) of a block under ``results[name]``."""
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
    results[name] = {"seconds": seconds, "peak_rss_gib": mem.peak / 2**30}


def in_child(setup: str, expr: str, what: str) -> Any:
    """Evaluate ``expr`` after ``setup`` in a fresh Python process (the repo root as cwd).

    A fresh process has its own Ray runtime and memory, so a measured stage is not disturbed by
    the parent's. The value must be JSON-serializable; a failure raises with the child's stderr.
    """
    code = f"import json; {setup}; print('RESULT ' + json.dumps({expr}))"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-4000:]}")
    return json.loads(line[-1][len("RESULT ") :])
