"""The embedding store: one test suite, both backends (an SQLite file and a real redis-server)."""

from __future__ import annotations

import multiprocessing as mp
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis

from creditgraph.serving.store import (
    FileStore,
    RedisStore,
    build_store,
    decode_array,
    encode_array,
    open_store,
)


@pytest.fixture(params=["file", "redis"])
def new_uri(request, tmp_path):
    """A factory of fresh store URIs for one backend (Redis: a fresh key prefix per store)."""
    if request.param == "file":
        return lambda: f"file://{tmp_path / f'{uuid.uuid4().hex[:8]}.db'}"
    url = request.getfixturevalue("redis_url")
    return lambda: f"{url}?prefix=t{uuid.uuid4().hex[:10]}"


ARRAYS = {
    1: np.arange(12, dtype=np.float32).reshape(3, 4),
    "device:ab": np.array([-(2**62), 0, 2**62], dtype=np.int64),
    3: np.array(2.5, dtype=np.float64),  # 0-d
    4: np.zeros((0,), dtype=np.float32),  # empty
    5: np.arange(24, dtype=np.int32).reshape(2, 3, 4)[:, ::2],  # non-contiguous view
    6: np.array([True, False]),
    7: np.array([1.5, -2.25], dtype=">f8"),  # big-endian stays big-endian
}


def _same(a: np.ndarray | None, b: np.ndarray) -> bool:
    return a is not None and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_roundtrip_shapes_dtypes_and_unknown_keys(new_uri):
    uri = new_uri()
    with build_store(uri) as st:
        st.put_arrays("user", list(ARRAYS), list(ARRAYS.values()))
        st.put_arrays("entity", [1], [np.ones(2, np.float16)])
        st.put_arrays("user", [np.int64(1)], [np.full((2,), 9.0, np.float32)])  # upsert
    with open_store(uri) as st:
        got = st.get_arrays("user", [*list(ARRAYS), "nope", 99])
        expect = {**ARRAYS, 1: np.full((2,), 9.0, np.float32)}
        for (k, want), have in zip(expect.items(), got[: len(expect)], strict=True):
            assert _same(have, want), k
        assert got[-2:] == [None, None]
        assert _same(st.get_array("user", "1"), expect[1])  # 1 and "1" are one key
        assert _same(st.get_array("entity", 1), np.ones(2, np.float16))  # namespaces separate
        assert st.get_arrays("never_written", [1, 2]) == [None, None]
        assert st.count("user") == len(ARRAYS) and st.count("entity") == 1
        assert st.count("never_written") == 0
        assert st.namespaces() == ["entity", "user"]
        writable = np.asarray(st.get_array("user", 3))
        writable += 1  # decoded arrays are ordinary writable arrays


def test_json_metadata(new_uri):
    uri = new_uri()
    meta = {"model_version": "run-42", "dims": [64, 32], "nested": {"r_max": 0.1}}
    with build_store(uri) as st:
        st.put_json("model", meta)
        st.put_json("model", {**meta, "model_version": "run-43"})
    with open_store(uri) as st:
        assert st.get_json("model") == {**meta, "model_version": "run-43"}
        assert st.get_json("absent") is None


def test_bulk_load_50k_keys(new_uri):
    n, d = 50_000, 16
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, d)).astype(np.float32)
    keys = np.arange(n, dtype=np.int64) * 7 + 3
    uri = new_uri()
    with build_store(uri) as st:
        assert st.bulk_load("user", keys, emb, chunk_size=4096, progress=False) == n
    with open_store(uri) as st:
        assert st.count("user") == n
        pick = rng.choice(n, 500, replace=False)
        got = st.get_arrays("user", keys[pick])
        assert all(_same(g, emb[i]) for g, i in zip(got, pick, strict=True))
        many = st.get_arrays("user", keys[:12_345])  # more keys than one read chunk
        assert all(_same(g, emb[i]) for i, g in enumerate(many))


def test_failed_build_leaves_nothing(new_uri):
    uri = new_uri()
    with pytest.raises(RuntimeError, match="crash"), build_store(uri) as st:
        st.bulk_load("user", np.arange(1000), np.ones((1000, 4), np.float32))
        st.put_json("model", {"v": 1})
        raise RuntimeError("crash in the middle of a batch job")
    if uri.startswith("file://"):
        path = Path(uri[len("file://") :])
        assert not path.exists()
        assert list(path.parent.iterdir()) == [], "a temporary file was left behind"
        with pytest.raises(FileNotFoundError):
            open_store(uri)
    else:
        with open_store(uri) as st:
            assert isinstance(st, RedisStore)
            assert st.published_version() is None and st.versions() == []
            assert st.count("user") == 0 and st.get_json("model") is None
            assert not list(st._r.scan_iter(match=f"{st.prefix}:*")), "keys left behind"


def test_failed_rebuild_keeps_previous_store(new_uri):
    uri = new_uri()
    with build_store(uri) as st:
        st.put_arrays("user", [1, 2], [np.ones(3), np.zeros(3)])
        st.put_json("model", {"v": 1})
    with pytest.raises(KeyError), build_store(uri) as st:
        st.put_arrays("user", [1, 2, 3], [np.full(3, 5.0)] * 3)
        st.put_json("model", {"v": 2})
        raise KeyError("boom")
    with open_store(uri) as st:
        assert st.get_json("model") == {"v": 1}
        assert st.count("user") == 2
        assert _same(st.get_array("user", 1), np.ones(3)) and st.get_array("user", 3) is None


def test_reader_keeps_snapshot_until_refresh(new_uri):
    uri = new_uri()
    with build_store(uri) as st:
        st.put_arrays("user", [1], [np.ones(2)])
    reader = open_store(uri)
    assert reader.refresh() is False
    with build_store(uri) as st:
        st.put_arrays("user", [1, 2], [np.full(2, 2.0), np.full(2, 3.0)])
    assert _same(reader.get_array("user", 1), np.ones(2))  # a consistent old snapshot
    assert reader.refresh() is True
    assert _same(reader.get_array("user", 1), np.full(2, 2.0))
    assert reader.count("user") == 2
    reader.close()


def test_redis_version_switch(redis_url):
    prefix = f"v{uuid.uuid4().hex[:8]}"
    with RedisStore.build(redis_url, prefix=prefix, version="a", keep=1) as st:
        st.put_arrays("user", [1], [np.ones(2)])
    with RedisStore.build(redis_url, prefix=prefix, version="b", keep=1) as st:
        st.put_arrays("user", [1], [np.full(2, 2.0)])
        # not published yet: a reader still sees version a
        with RedisStore(redis_url, prefix=prefix) as r:
            assert r.version == "a" and _same(r.get_array("user", 1), np.ones(2))
    with RedisStore(redis_url, prefix=prefix) as r:
        assert r.version == "b" and r.versions() == ["a", "b"]
        assert _same(r.get_array("user", 1), np.full(2, 2.0))
    with RedisStore(redis_url, prefix=prefix, version="a") as pinned:  # kept (keep=1)
        assert _same(pinned.get_array("user", 1), np.ones(2))
        assert pinned.refresh() is False  # pinned readers do not move
    with RedisStore.build(redis_url, prefix=prefix, version="c", keep=1) as st:
        st.put_arrays("user", [1], [np.full(2, 3.0)])
    client = redis.Redis.from_url(redis_url)
    assert not list(client.scan_iter(match=f"{prefix}:a:*")), "version a was not dropped"
    assert client.get(f"{prefix}:current_version") == b"c"
    client.close()
    with pytest.raises(ValueError, match="already exists"):  # noqa: SIM117
        with RedisStore.build(redis_url, prefix=prefix, version="c"):
            pass
    with RedisStore(redis_url, prefix=prefix) as r, pytest.raises(ValueError, match="published"):
        r.drop_version("c")


def _read_all(uri: str, keys: list[int]) -> list[float]:
    with open_store(uri) as st:
        return [float(a.sum()) for a in st.get_arrays("user", keys)]


def test_concurrent_readers_in_processes(new_uri):
    n = 2_000
    emb = np.arange(n * 8, dtype=np.float32).reshape(n, 8)
    uri = new_uri()
    with build_store(uri) as st:
        st.bulk_load("user", np.arange(n), emb)
    parts = [list(range(i, n, 4)) for i in range(4)]
    with ProcessPoolExecutor(4, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(_read_all, [uri] * 4, parts))
    for keys, sums in zip(parts, results, strict=True):
        assert np.allclose(sums, emb[keys].sum(axis=1))


def test_file_store_modes(tmp_path):
    path = tmp_path / "s.db"
    with FileStore(path, writable=True) as st:  # in-place updates (WAL)
        st.put_arrays("user", [1], [np.ones(1)])
        st.put_json("k", [1, 2])
    with open_store(path, writable=True) as st:
        st.put_arrays("user", [3], [np.ones(1)])
    with open_store(path) as st:  # a plain path works like file://
        assert isinstance(st, FileStore) and st.count("user") == 2
        assert _same(st.get_array("user", 1), np.ones(1)) and st.get_json("k") == [1, 2]
        with pytest.raises(PermissionError):
            st.put_arrays("user", [2], [np.ones(1)])
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "missing.db")


def test_uri_and_input_validation(tmp_path, redis_url):
    with pytest.raises(ValueError, match="scheme"):
        open_store("s3://bucket/store")
    with pytest.raises(ValueError, match="local"):
        open_store("file://otherhost/x.db")
    with open_store(f"{redis_url}?prefix=xyz&version=v9", writable=True) as st:
        assert isinstance(st, RedisStore) and st.prefix == "xyz" and st.version == "v9"
    for bad in ({"version": "v*"}, {"prefix": "cg:x"}):
        with pytest.raises(ValueError, match="invalid"):
            RedisStore(redis_url, **bad)
    with build_store(tmp_path / "x.db") as st:
        with pytest.raises(ValueError, match="namespace"):
            st.put_arrays("bad name; drop table", [1], [np.ones(1)])
        with pytest.raises(ValueError, match="namespace"):
            st.put_arrays("_meta", [1], [np.ones(1)])
        with pytest.raises(ValueError, match="keys but"):
            st.put_arrays("user", [1, 2], [np.ones(1)])
        with pytest.raises(TypeError, match="int or str"):
            st.put_arrays("user", [1.5], [np.ones(1)])
        with pytest.raises(TypeError, match="numeric"):
            st.put_arrays("user", [1], [np.array(["a"], dtype=object)])


def test_encoding_is_strict():
    blob = encode_array(np.arange(6, dtype=np.int16).reshape(2, 3))
    assert _same(decode_array(blob), np.arange(6, dtype=np.int16).reshape(2, 3))
    for bad in (b"", b"\x80\x04pickle", blob[:-1], blob + b"\x00", b"XXXX" + blob[4:]):
        with pytest.raises(ValueError):
            decode_array(bad)
    # a header naming the object dtype is refused, so no Python objects are ever built
    forged = blob[:4] + bytes([3]) + b"|O8" + blob[4 + 1 + len(b"<i2") :]
    with pytest.raises((TypeError, ValueError)):
        decode_array(forged)
    with pytest.raises(TypeError):
        encode_array(np.array([{"a": 1}], dtype=object))
