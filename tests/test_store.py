"""The record store: one test suite, both backends (an SQLite file and a real redis-server)."""

from __future__ import annotations

import multiprocessing as mp
import uuid
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis

from creditgraph.serving import records
from creditgraph.serving.store import FileStore, RedisStore, build_store, open_store

DT = np.dtype([("v", "<f4", (3,)), ("n", "<i8"), ("x", "<f8")])


def recs(values: list[float]) -> np.ndarray:
    """One record per value: v = [value] * 3, n = round(value), x = value / 7."""
    out = np.zeros(len(values), dtype=DT)
    out["v"] = np.asarray(values, np.float32)[:, None]
    out["n"] = np.round(values)
    out["x"] = np.asarray(values) / 7.0
    return out


@contextmanager
def build(uri: str):
    """A store build with the test namespaces declared."""
    with build_store(uri) as st:
        for ns in ("user", "entity"):
            st.put_schema(ns, DT)
        yield st


@pytest.fixture(params=["file", "redis"])
def new_uri(request, tmp_path):
    """A factory of fresh store URIs for one backend (Redis: a fresh key prefix per store)."""
    if request.param == "file":
        return lambda: f"file://{tmp_path / f'{uuid.uuid4().hex[:8]}.db'}"
    url = request.getfixturevalue("redis_url")
    return lambda: f"{url}?prefix=t{uuid.uuid4().hex[:10]}"


def test_roundtrip_records_and_unknown_keys(new_uri):
    uri = new_uri()
    with build(uri) as st:
        st.put_records("user", [1, "device:ab", 3], recs([1.0, 2.0, 3.0]))
        st.put_records("entity", [1], recs([9.0]))
        st.put_records("user", [np.int64(1)], recs([5.0]))  # upsert
    with open_store(uri) as st:
        got, found = st.get_records("user", [1, "device:ab", 3, "nope", 99])
        assert found.tolist() == [True, True, True, False, False]
        np.testing.assert_array_equal(got[:3], recs([5.0, 2.0, 3.0]))
        assert (got[3:]["n"] == 0).all() and (got[3:]["x"] == 0).all()  # zeroed, flagged
        one, f1 = st.get_records("user", ["1"])  # 1 and "1" are one key
        assert f1[0] and one["x"][0] == pytest.approx(5.0 / 7.0)
        assert st.dtype("user") == DT  # the schema travels with the store
        assert st.count("user") == 3 and st.namespaces() == ["entity", "user"]


def test_bulk_load_50k_records(new_uri):
    uri = new_uri()
    n = 50_000
    values = recs(np.arange(n, dtype=float).tolist())
    with build(uri) as st:
        assert st.bulk_load("user", np.arange(n), values) == n
    with open_store(uri) as st:
        keys = np.random.default_rng(0).choice(n, 500, replace=False)
        got, found = st.get_records("user", keys)
        assert found.all()
        np.testing.assert_array_equal(got, values[keys])


def test_failed_build_leaves_nothing(new_uri):
    uri = new_uri()
    with pytest.raises(RuntimeError, match="crash"), build_store(uri) as st:
        st.put_schema("user", DT)
        st.bulk_load("user", np.arange(1000), recs([1.0] * 1000))
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
    with build(uri) as st:
        st.put_records("user", [1, 2], recs([1.0, 0.0]))
        st.put_json("model", {"v": 1})
    with pytest.raises(KeyError), build_store(uri) as st:
        st.put_schema("user", DT)
        st.put_records("user", [1, 2, 3], recs([5.0] * 3))
        st.put_json("model", {"v": 2})
        raise KeyError("boom")
    with open_store(uri) as st:
        assert st.get_json("model") == {"v": 1}
        assert st.count("user") == 2
        got, found = st.get_records("user", [1, 3])
        assert found.tolist() == [True, False] and got["x"][0] == pytest.approx(1 / 7)


def test_reader_keeps_its_view_until_refresh(new_uri):
    uri = new_uri()
    with build(uri) as st:
        st.put_records("user", [1], recs([1.0]))
    reader = open_store(uri, **({} if uri.startswith("redis") else {"immutable": False}))
    assert reader.refresh() is False
    with build(uri) as st:
        st.put_records("user", [1, 2], recs([2.0, 3.0]))
    assert reader.get_records("user", [1])[0]["n"][0] == 1  # a consistent old view
    assert reader.refresh() is True
    assert reader.get_records("user", [1])[0]["n"][0] == 2
    assert reader.count("user") == 2
    reader.close()


def test_immutable_reader_leaves_no_sqlite_side_files(tmp_path):
    path = tmp_path / "snap.db"
    with build(str(path)) as st:
        st.put_records("user", [1], recs([1.0]))
    before = sorted(p.name for p in tmp_path.iterdir())
    with open_store(path) as reader:  # read-only opens are immutable by default
        assert reader.get_records("user", [1])[1][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no -wal / -shm files


def test_redis_version_switch(redis_url):
    prefix = f"v{uuid.uuid4().hex[:8]}"

    def one(r):
        return int(r.get_records("user", [1])[0]["n"][0])

    with RedisStore.build(redis_url, prefix=prefix, version="a", keep=1) as st:
        st.put_schema("user", DT)
        st.put_records("user", [1], recs([1.0]))
    with RedisStore.build(redis_url, prefix=prefix, version="b", keep=1) as st:
        st.put_schema("user", DT)
        st.put_records("user", [1], recs([2.0]))
        # not published yet: a reader still sees version a
        with RedisStore(redis_url, prefix=prefix) as r:
            assert r.version == "a" and one(r) == 1
    with RedisStore(redis_url, prefix=prefix) as r:
        assert r.version == "b" and r.versions() == ["a", "b"] and one(r) == 2
    with RedisStore(redis_url, prefix=prefix, version="a") as pinned:  # kept (keep=1)
        assert one(pinned) == 1
        assert pinned.refresh() is False  # pinned readers do not move
    with RedisStore.build(redis_url, prefix=prefix, version="c", keep=1) as st:
        st.put_schema("user", DT)
        st.put_records("user", [1], recs([3.0]))
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
        return st.get_records("user", keys)[0]["x"].tolist()


def test_concurrent_readers_in_processes(new_uri):
    n = 2_000
    values = recs(np.arange(n, dtype=float).tolist())
    uri = new_uri()
    with build(uri) as st:
        st.bulk_load("user", np.arange(n), values)
    parts = [list(range(i, n, 4)) for i in range(4)]
    with ProcessPoolExecutor(4, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(_read_all, [uri] * 4, parts))
    for keys, xs in zip(parts, results, strict=True):
        assert np.allclose(xs, values["x"][keys])


def test_file_store_modes(tmp_path):
    path = tmp_path / "s.db"
    with FileStore(path, writable=True) as st:  # in-place updates (WAL)
        st.put_schema("user", DT)
        st.put_records("user", [1], recs([1.0]))
        st.put_json("k", [1, 2])
    with open_store(path, writable=True) as st:
        st.put_records("user", [3], recs([3.0]))
    with open_store(path) as st:  # a plain path works like file://
        assert isinstance(st, FileStore) and st.count("user") == 2 and st.get_json("k") == [1, 2]
        with pytest.raises(PermissionError):
            st.put_records("user", [2], recs([2.0]))
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
            st.put_schema("bad name; drop table", DT)
        with pytest.raises(ValueError, match="namespace"):
            st.put_schema("_meta", DT)
        with pytest.raises(KeyError, match="schema"):
            st.put_records("user", [1], recs([1.0]))  # no schema declared
        st.put_schema("user", DT)
        with pytest.raises(ValueError, match="keys but"):
            st.put_records("user", [1, 2], recs([1.0]))
        with pytest.raises(TypeError, match="int or str"):
            st.put_records("user", [1.5], recs([1.0]))


def test_record_schemas_roundtrip_through_json():
    dims = records.Dims(n_features=5, n_struct=3, hops=2, hidden=4)
    for name, dtype in records.schemas(dims).items():
        back = records.dtype_from_json(records.dtype_to_json(dtype))
        assert back == dtype, name
    user = records.user_dtype(dims)
    assert user["tokens"].shape == (2, 2, 4) and user["raw"].shape == (5,)
    rec = np.zeros(2, dtype=user)
    rec["raw"] = np.nan
    rec["user_cap"] = [np.inf, 12_345.678901234]
    got, found = records.decode([*records.encode(rec, user), None], user)
    assert found.tolist() == [True, True, False]
    assert np.isnan(got["raw"][:2]).all() and got["user_cap"][1] == 12_345.678901234
    with pytest.raises(ValueError, match="bytes"):
        records.decode([b"short"], user)
