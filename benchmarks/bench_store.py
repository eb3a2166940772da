"""The snapshot store at 1M users: typed records, bulk load and per-request reads, SQLite and Redis.

What the online path needs from batch scoring: a million ``user`` records of the snapshot schema
(``serving/records.py``: raw features, limit, decision time, structural features, hop tokens,
caps) written once, then one user's record (a known user's decision) or a handful of entity-sized
reads per request. Each backend is built with ``build_store(...)`` (atomic publish) +
``put_schema`` + ``bulk_load``, then opened read-only and read with ``get_records``.

Also: what decoding costs per read, our raw records (one ``np.frombuffer`` of the concatenated
values, the dtype kept once in the store's metadata) against a self-describing ``.npy`` blob per
value (``numpy.lib.format``, a header parsed on every read).

Environment: BENCH_STORE_KEYS (default 1,000,000; e.g. 20000 for a quick check),
BENCH_STORE_READS (random reads per batch size, default 5,000).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._measure import stage
from benchmarks._report import markdown_table, write_section

N_KEYS = int(os.environ.get("BENCH_STORE_KEYS", "1000000"))
READS = int(os.environ.get("BENCH_STORE_READS", "5000"))
# the default model's record layout: 17 features, 6 structural features, 2 hops of width 32
DIMS = (17, 6, 2, 32)


def _records(n: int):
    from creditgraph.serving import records

    dtype = records.user_dtype(records.Dims(*DIMS))
    rng = np.random.default_rng(0)
    rec = np.zeros(n, dtype)
    rec["raw"] = rng.normal(size=(n, DIMS[0]))
    rec["limit"] = rng.uniform(0, 50_000, n)
    rec["struct"] = rng.random((n, DIMS[1]))
    rec["tokens"] = rng.normal(size=(n, 2, DIMS[2], DIMS[3]))
    rec["user_cap"] = np.inf
    rec["cluster_id"] = -1
    return dtype, rec


def _latencies(store, keys: np.ndarray, batch: int, rng: np.random.Generator) -> np.ndarray:
    out = np.empty(READS)
    for i in range(READS):
        pick = keys[rng.integers(0, len(keys), batch)]
        t0 = time.perf_counter()
        rec, found = store.get_records("user", pick)
        out[i] = time.perf_counter() - t0
        assert found.all() and len(rec) == batch
    return out * 1e6


def _one(uri: str, dtype: np.dtype, rec: np.ndarray, keys: np.ndarray) -> dict:
    from creditgraph.serving.store import build_store, open_store

    res: dict = {}
    with stage(res, "load"), build_store(uri) as st:
        st.put_schema("user", dtype)
        st.bulk_load("user", keys, rec, progress=False)
        st.put_json("meta", {"id": "bench"})
    rng = np.random.default_rng(0)
    with open_store(uri) as st:
        one = _latencies(st, keys, 1, rng)
        ten = _latencies(st, keys, 10, rng)
        back, _ = st.get_records("user", keys[:100])
        assert np.array_equal(back["tokens"], rec["tokens"][:100])
    return {
        "load s": round(res["load"]["seconds"], 1),
        "keys/s": round(len(keys) / res["load"]["seconds"]),
        "load peak RSS GiB": round(res["load"]["peak_rss_gib"], 2),
        "get 1 p50 µs": round(float(np.percentile(one, 50)), 1),
        "get 1 p99 µs": round(float(np.percentile(one, 99)), 1),
        "get 10 p50 µs": round(float(np.percentile(ten, 50)), 1),
        "get 10 p99 µs": round(float(np.percentile(ten, 99)), 1),
    }


def _decoding(dtype: np.dtype, rec: np.ndarray, reps: int = 20_000) -> list[dict]:
    """µs to turn 1 and 10 stored values into records: raw bytes vs ``.npy`` blobs."""
    from creditgraph.serving import records

    raw = records.encode(rec[:10], dtype)
    npy = []
    for r in rec[:10]:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.asarray([r]), allow_pickle=False)
        npy.append(buf.getvalue())

    def from_npy(values: list[bytes]) -> np.ndarray:
        return np.concatenate([np.lib.format.read_array(io.BytesIO(v)) for v in values])

    rows = []
    for name, fn, values in (
        ("raw records (`records.decode`)", lambda v: records.decode(v, dtype), raw),
        ("`.npy` blob per value (`numpy.lib.format`)", from_npy, npy),
    ):
        row = {"format": name, "bytes per value": len(values[0])}
        for k in (1, 10):
            t0 = time.perf_counter()
            for _ in range(reps // k):
                fn(values[:k])
            row[f"decode {k} µs"] = round((time.perf_counter() - t0) / (reps // k) * 1e6, 2)
        rows.append(row)
    return rows


def main() -> None:
    from creditgraph.serving.redis_local import local_redis

    t_all = time.perf_counter()
    load_before = os.getloadavg()[0]
    dtype, rec = _records(N_KEYS)
    keys = np.arange(N_KEYS, dtype=np.int64) * 13 + 7
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "store.sqlite"
        r = _one(str(path), dtype, rec, keys)
        rows.append({"backend": "file (SQLite)", **r, "size MiB": path.stat().st_size / 2**20})
        with local_redis(Path(tmp) / "redis") as url:
            import redis

            r = _one(url, dtype, rec, keys)
            used = redis.Redis.from_url(url).info("memory")["used_memory"]
            rows.append({"backend": "Redis (loopback)", **r, "size MiB": used / 2**20})
    for row in rows:
        row["size MiB"] = round(row["size MiB"])
    dec = _decoding(dtype, rec)
    body = (
        f"{N_KEYS:,} `user` records of the snapshot schema ({dtype.itemsize} bytes each: "
        f"{DIMS[0]} raw features, {DIMS[1]} structural features, hop tokens 2 x {DIMS[2]} x "
        f"{DIMS[3]} float32, limit, decision time, caps), written with `build_store(...)` + "
        f"`put_schema` + `bulk_load` (atomic publish), then {READS:,} random `get_records` of "
        "1 and of 10 keys from one client; Redis runs on the same machine. 1-minute load "
        f"average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n\n"
        + markdown_table(rows)
        + "\n\nDecoding stored values into records (one thread, the same 10 records):\n\n"
        + markdown_table(dec)
        + "\n\nRaw records carry no header: the dtype is stored once in the store's metadata "
        "(numpy's own `.npy` descriptor), so a reader decodes exactly what the writer wrote and "
        f"refuses another schema. Whole benchmark: {time.perf_counter() - t_all:.0f}s."
    )
    write_section("store", body, "benchmarks/bench_store.py")
    print(body)


if __name__ == "__main__":
    main()
