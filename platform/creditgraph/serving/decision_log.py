"""The append-only decision log: why did this customer get this limit, months later.

Every decision, online and in batch, is written here with its time, the snapshot and model version
it used, a hash of the request's inputs (raw feature values, limit and the *keys* of the entities
it named, never their clear identifiers), the decision and its reasons, and the caller's identity.
Files are only ever appended to or added, never rewritten:

* ``online-YYYYMMDD.jsonl`` — one JSON line per online decision (each line written with one
  ``write`` on a file opened in append mode, so concurrent replicas do not interleave lines);
* ``batch-<snapshot>.parquet`` — one row per user of a batch scoring run (written atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from creditgraph.utils.io import atomic_file


def input_hash(payload: Any) -> str:
    """A stable hash of a request's inputs (JSON with sorted keys; NaN as null)."""
    text = json.dumps(payload, sort_keys=True, default=_plain, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.ndarray):
        return [_plain(x) for x in obj.tolist()]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return str(obj)


class DecisionLog:
    """A folder of append-only decision records."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        """One online decision (``time`` is added when absent)."""
        record = {"time": time.time(), **record}
        line = json.dumps(record, sort_keys=True, default=_plain) + "\n"
        day = time.strftime("%Y%m%d", time.gmtime(record["time"]))
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"online-{day}.jsonl"
        with self._lock:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def append_batch(self, decisions: pd.DataFrame, *, caller: str) -> Path:
        """A batch run's decisions as one new file (never replacing an existing one)."""
        snapshot = str(decisions["snapshot"].iloc[0]) if len(decisions) else "empty"
        path = self.root / f"batch-{snapshot}.parquet"
        if path.exists():
            raise FileExistsError(f"{path} exists: the decision log is append-only")
        frame = decisions.copy()
        frame["caller"] = caller
        frame["logged_at"] = time.time()
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as fh:
            frame.to_parquet(fh, index=False)
        return path

    def read_online(self) -> list[dict]:
        """Every online record, oldest first (for audits and tests)."""
        out: list[dict] = []
        for path in sorted(self.root.glob("online-*.jsonl")):
            out.extend(json.loads(line) for line in path.read_text().splitlines() if line)
        return out
