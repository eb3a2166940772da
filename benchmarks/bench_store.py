"""The embedding store at 1M keys: bulk load and per-request reads, file (SQLite) and Redis.

What the lambda architecture needs: a batch job writes a million embeddings (64 float32 each),
then the online path reads one user's row or a handful of neighbours' rows per request.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._measure import stage
from benchmarks._report import markdown_table, write_section

N_KEYS = int(os.environ.get("BENCH_STORE_KEYS", "1000000"))
DIM = 64
READS = 5_000


def _latencies(store, keys: np.ndarray, batch: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty(READS)
    for i in range(READS):
        pick = keys[rng.integers(0, len(keys), batch)]
        t0 = time.perf_counter()
        got = store.get_arrays("user", pick)
        out[i] = time.perf_counter() - t0
        assert got[0] is not None
    return out * 1e6


def _one(uri: str, emb: np.ndarray, keys: np.ndarray) -> dict:
    from creditgraph.serving.store import build_store, open_store

    res: dict = {}
    with stage(res, "load"), build_store(uri) as st:
        st.bulk_load("user", keys, emb)
        st.put_json("model", {"version": "bench"})
    rng = np.random.default_rng(0)
    with open_store(uri) as st:
        assert st.count("user") == len(keys)
        one = _latencies(st, keys, 1, rng)
        ten = _latencies(st, keys, 10, rng)
    return {
        "load seconds": res["load"]["seconds"],
        "keys/s": len(keys) / res["load"]["seconds"],
        "get 1 p50 (µs)": float(np.percentile(one, 50)),
        "get 1 p99 (µs)": float(np.percentile(one, 99)),
        "get 10 p50 (µs)": float(np.percentile(ten, 50)),
        "get 10 p99 (µs)": float(np.percentile(ten, 99)),
    }


def main() -> None:
    from creditgraph.serving.store import local_redis

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(N_KEYS, DIM)).astype(np.float32)
    keys = np.arange(N_KEYS, dtype=np.int64) * 13 + 7
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "emb.db"
        r = _one(f"file://{path}", emb, keys)
        rows.append({"backend": "file (SQLite)", **r, "size (MiB)": path.stat().st_size / 2**20})
        with local_redis(Path(tmp) / "redis") as url:
            import redis

            r = _one(url, emb, keys)
            used = redis.Redis.from_url(url).info("memory")["used_memory"]
            rows.append({"backend": "Redis (loopback)", **r, "size (MiB)": used / 2**20})
    body = (
        f"{N_KEYS:,} keys x {DIM} float32 (one user embedding each), written with "
        f"`build_store(...)` + `bulk_load` (atomic publish), then {READS:,} random reads of 1 and "
        "of 10 keys from one client; Redis runs on the same machine.\n\n" + markdown_table(rows)
    )
    write_section("store", body, "benchmarks/bench_store.py")
    print(body)


if __name__ == "__main__":
    main()
