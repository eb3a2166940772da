"""The key-value store of the lambda architecture (seed 001, section 3.4).

A batch job writes a snapshot's records here; the online path reads only what one request needs
by key. One small interface, :class:`RecordStore`, with two backends:

- :class:`FileStore`: an embedded SQLite file (stdlib ``sqlite3``), no server. One table per
  namespace (``key TEXT PRIMARY KEY, value BLOB``). Built atomically by :meth:`FileStore.build`
  (written to a temporary sibling, renamed on success), then opened read-only and *immutable* by
  any number of processes: a published snapshot never changes, so SQLite takes no locks and
  leaves no ``-wal``/``-shm`` files next to it.
- :class:`RedisStore`: a Redis server. Keys ``{prefix}:{version}:{namespace}:{key}``; writes are
  pipelined in chunks, reads are one ``MGET``. :meth:`RedisStore.build` writes a new version and
  marks it published only after every write succeeded; a snapshot is one version.

Keys are user ids, entity keys or cluster ids, ``int`` or ``str``, stored as text, so ``7`` and
``"7"`` name the same entry (the data loader's rule for ids). Values are typed records: numpy
structured arrays of one dtype per namespace (``serving/records.py``), stored as their raw bytes;
the dtype is kept in the store's metadata (``schema``), never pickled. :func:`open_store` and
:func:`build_store` pick the backend from a URI: ``file:///path``, a plain path, or
``redis://host:port/db``.
"""

from __future__ import annotations

import abc
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from numbers import Integral
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import numpy as np
from tqdm.auto import tqdm

from creditgraph.serving import records
from creditgraph.utils.io import atomic_file
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

Key = int | str
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,62}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # Redis prefix / version: no ':' or glob characters
DEFAULT_CHUNK = 10_000
PROGRESS_FROM = 100_000  # bulk loads at least this big show a progress bar


# --------------------------------------------------------------------------- keys, names
def normalize_key(key: Any) -> str:
    """A key as stored: integers (Python or numpy) as decimal text, strings unchanged."""
    if isinstance(key, bool | np.bool_):
        raise TypeError("keys must be int or str, got bool")
    if isinstance(key, Integral):
        return str(int(key))
    if isinstance(key, str):
        return key
    raise TypeError(f"keys must be int or str, got {type(key).__name__}")


def _keys(keys: Sequence[Key] | np.ndarray) -> list[str]:
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":
        return [str(k) for k in keys.tolist()]
    return [normalize_key(k) for k in keys]


def check_namespace(namespace: str) -> str:
    """Namespaces are short identifiers (letters, digits, ``_``; not starting with ``_``)."""
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise ValueError(
            f"invalid namespace {namespace!r}: use 1-63 letters, digits or '_', "
            "starting with a letter or digit"
        )
    return namespace


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# --------------------------------------------------------------------------- interface
class RecordStore(abc.ABC):
    """Typed records by (namespace, key), plus small JSON metadata (schemas, versions...)."""

    chunk_size: int = DEFAULT_CHUNK
    _dtypes: dict[str, np.dtype]  # record dtypes by namespace, read from the schema once

    # backends implement these on already-encoded values
    @abc.abstractmethod
    def _put_encoded(self, namespace: str, keys: list[str], values: list[bytes]) -> None: ...

    @abc.abstractmethod
    def _get_encoded(self, namespace: str, keys: list[str]) -> list[bytes | None]: ...

    @abc.abstractmethod
    def put_json(self, key: str, obj: Any) -> None:
        """Store a small JSON-able object under ``key`` (replacing any previous value)."""

    @abc.abstractmethod
    def get_json(self, key: str) -> Any | None:
        """The object stored under ``key``, or ``None``."""

    @abc.abstractmethod
    def count(self, namespace: str) -> int:
        """Number of keys in ``namespace`` (0 for an unknown namespace)."""

    @abc.abstractmethod
    def namespaces(self) -> list[str]:
        """The namespaces that hold at least one key."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    def refresh(self) -> bool:
        """Pick up a newer build published since opening; ``True`` if the view changed."""
        return False

    # --- schemas ------------------------------------------------------------------------
    def put_schema(self, namespace: str, dtype: np.dtype) -> None:
        """Declare the record dtype of ``namespace`` (before writing its records)."""
        schema = dict(self.get_json("schema") or {})
        schema[check_namespace(namespace)] = records.dtype_to_json(dtype)
        self.put_json("schema", schema)
        self._dtypes[namespace] = np.dtype(dtype)

    def dtype(self, namespace: str) -> np.dtype:
        """The record dtype of ``namespace`` as written by the batch job."""
        if namespace not in self._dtypes:
            schema = self.get_json("schema") or {}
            if namespace not in schema:
                raise KeyError(f"namespace {namespace!r} has no schema in this store")
            self._dtypes[namespace] = records.dtype_from_json(schema[namespace])
        return self._dtypes[namespace]

    # --- records ------------------------------------------------------------------------
    def put_records(
        self, namespace: str, keys: Sequence[Key] | np.ndarray, values: np.ndarray
    ) -> None:
        """Store one record per key (upserted); ``values`` has the namespace's dtype."""
        self.bulk_load(namespace, keys, values, progress=False)

    def get_records(
        self, namespace: str, keys: Sequence[Key] | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(records, found)`` for ``keys``, in order; unknown keys give a zeroed record."""
        check_namespace(namespace)
        dtype = self.dtype(namespace)
        skeys = _keys(keys)
        values: list[bytes | None] = []
        for sl in _chunks(len(skeys), self.chunk_size):
            values.extend(self._get_encoded(namespace, skeys[sl]))
        return records.decode(values, dtype)

    def bulk_load(
        self,
        namespace: str,
        keys: Sequence[Key] | np.ndarray,
        values: np.ndarray,
        *,
        chunk_size: int | None = None,
        progress: bool | None = None,
    ) -> int:
        """Write many records in batched chunks (one transaction / pipeline per chunk).

        A progress bar shows for loads of at least 100,000 keys unless ``progress`` says
        otherwise. Returns the number of keys written.
        """
        check_namespace(namespace)
        dtype = self.dtype(namespace)
        n = len(keys)
        if n != len(values):
            raise ValueError(f"{n} keys but {len(values)} records")
        size = chunk_size or self.chunk_size
        show = n >= PROGRESS_FROM if progress is None else progress
        t0 = time.perf_counter()
        skeys = _keys(keys)
        order = self._insert_order(skeys)
        with tqdm(total=n, desc=f"store {namespace}", unit="key", disable=not show) as bar:
            for sl in _chunks(n, size):
                if order is None:
                    part, rows = skeys[sl], values[sl]
                else:
                    idx = order[sl]
                    part, rows = [skeys[i] for i in idx], values[idx]
                self._put_encoded(namespace, part, records.encode(rows, dtype))
                bar.update(sl.stop - sl.start)
        log.debug("stored %d keys in %s in %.1fs", n, namespace, time.perf_counter() - t0)
        return n

    def _insert_order(self, keys: list[str]) -> np.ndarray | None:
        """The order a bulk load writes its keys in (None: as given)."""
        return None

    def __enter__(self) -> RecordStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- SQLite file
def _table(namespace: str) -> str:
    return f'"ns_{check_namespace(namespace)}"'


class FileStore(RecordStore):
    """An embedded store in one SQLite file.

    Open an existing store read-only (the default; any number of processes may do so at once;
    ``immutable=True``, the default for read-only opens, tells SQLite the file never changes, so
    it takes no locks and writes no ``-wal``/``-shm`` files) or ``writable=True`` to create or
    update it in place (WAL mode, each call one transaction). Batch jobs use :meth:`build`, which
    makes the new store appear atomically. A reader keeps its view until :meth:`refresh`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        writable: bool = False,
        immutable: bool = True,
        chunk_size: int = DEFAULT_CHUNK,
        _building: bool = False,
    ):
        self._dtypes = {}
        self.path = Path(path)
        self._building = _building
        self.writable = writable or _building
        self.immutable = immutable and not self.writable
        self.chunk_size = chunk_size
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._inode: int | None = None
        self._tables: set[str] = set()
        self._open(building=_building)

    def _open(self, building: bool = False) -> None:
        if self.writable:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            if building:
                # a failed build is thrown away whole, so no journal and no per-commit fsync;
                # records of hundreds of bytes fill 16 KiB pages better (a third less time to
                # load a million users than with the default 4 KiB), and a bulk load's B-tree
                # pages stay in a 64 MiB cache
                conn.execute("PRAGMA page_size=16384")
                conn.execute("PRAGMA journal_mode=OFF")
                conn.execute("PRAGMA synchronous=OFF")
                conn.execute("PRAGMA cache_size=-65536")
            else:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("CREATE TABLE IF NOT EXISTS _meta (key TEXT PRIMARY KEY, value TEXT)")
        else:
            if not self.path.is_file():
                raise FileNotFoundError(f"store {self.path} not found")
            uri = f"file:{self.path.resolve()}?mode=ro" + ("&immutable=1" if self.immutable else "")
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
        self._conn = conn
        self._inode = self.path.stat().st_ino
        self._tables = self._list_tables()

    def _list_tables(self) -> set[str]:
        rows = self._db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE 'ns!_%' ESCAPE '!'"
        ).fetchall()
        return {r[0][3:] for r in rows}

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"store {self.path} is closed")
        return self._conn

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"store {self.path} is open read-only")

    def _put_encoded(self, namespace: str, keys: list[str], values: list[bytes]) -> None:
        self._require_writable()
        table = _table(namespace)
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                if namespace not in self._tables:
                    db.execute(
                        f"CREATE TABLE IF NOT EXISTS {table} "
                        "(key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"
                    )
                db.executemany(
                    f"INSERT OR REPLACE INTO {table} (key, value) VALUES (?, ?)",
                    zip(keys, values, strict=True),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._tables.add(namespace)

    def _insert_order(self, keys: list[str]) -> np.ndarray | None:
        # keys in their text order: each insert appends to the table's B-tree (stable, so the
        # last of repeated keys still wins)
        return np.argsort(np.asarray(keys), kind="stable") if self._building else None

    def _get_encoded(self, namespace: str, keys: list[str]) -> list[bytes | None]:
        if namespace not in self._tables:
            return [None] * len(keys)
        table = _table(namespace)
        with self._lock:
            if len(keys) == 1:
                row = self._db.execute(
                    f"SELECT value FROM {table} WHERE key = ?", (keys[0],)
                ).fetchone()
                return [None if row is None else row[0]]
            found: dict[str, bytes] = {}
            uniq = list(dict.fromkeys(keys))
            for sl in _chunks(len(uniq), 500):  # below SQLite's bound-variable limit
                part = uniq[sl]
                marks = ",".join("?" * len(part))
                found.update(
                    self._db.execute(
                        f"SELECT key, value FROM {table} WHERE key IN ({marks})", part
                    ).fetchall()
                )
        return [found.get(k) for k in keys]

    def put_json(self, key: str, obj: Any) -> None:
        self._require_writable()
        text = json.dumps(obj)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO _meta (key, value) VALUES (?, ?)", (str(key), text)
            )

    def get_json(self, key: str) -> Any | None:
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT value FROM _meta WHERE key = ?", (str(key),)
                ).fetchone()
            except sqlite3.OperationalError:  # a store without any metadata table
                return None
        return None if row is None else json.loads(row[0])

    def count(self, namespace: str) -> int:
        if check_namespace(namespace) not in self._tables:
            return 0
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM {_table(namespace)}").fetchone()[0])

    def namespaces(self) -> list[str]:
        return sorted(ns for ns in self._tables if self.count(ns) > 0)

    def refresh(self) -> bool:
        """Reopen if a rebuild has replaced the file since it was opened."""
        try:
            inode = self.path.stat().st_ino
        except FileNotFoundError:
            return False
        if inode == self._inode:
            return False
        with self._lock:
            self.close()
            self._open()
        return True

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @classmethod
    @contextmanager
    def build(cls, path: str | Path, *, chunk_size: int = DEFAULT_CHUNK) -> Iterator[FileStore]:
        """Write a complete new store; it replaces ``path`` only if the block succeeds.

        Writes go to a hidden temporary sibling (no journal, no fsync per transaction: a failed
        build is thrown away, so there is nothing to recover); at the end the file is flushed to
        disk and renamed onto ``path``. On any exception ``path`` is left as it was.
        """
        with atomic_file(path, "wb") as fh:
            # SQLite writes through its own handle to the temporary file atomic_file created
            store = cls(fh.name, chunk_size=chunk_size, _building=True)
            try:
                yield store
                store._db.execute("PRAGMA optimize")
            finally:
                store.close()
            fh.flush()
            os.fsync(fh.fileno())
        log.debug("store written to %s", path)


# --------------------------------------------------------------------------- Redis
def _new_version() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


class RedisStore(RecordStore):
    """A store on a Redis server, versioned so a new batch can be published atomically.

    Every key lives under a version: ``{prefix}:{version}:{namespace}:{key}``, metadata under
    ``{prefix}:{version}:_meta:{key}``. ``version=None`` reads the published version
    (``{prefix}:current_version``), or ``"0"`` when nothing has been published yet.
    :meth:`build` writes a fresh version and publishes it with one ``SET`` at the end.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "cg",
        version: str | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ):
        import redis

        for what, value in (("key prefix", prefix), ("version", version)):
            if value is not None and not _TOKEN.match(value):
                raise ValueError(f"invalid {what} {value!r}: use letters, digits, '_', '.', '-'")
        self._dtypes = {}
        self.url = url
        self.prefix = prefix
        self.chunk_size = chunk_size
        self._client = redis.Redis.from_url(url)
        self._pinned = version is not None
        self.version = version if version is not None else self.published_version() or "0"

    @property
    def _r(self) -> Any:
        if self._client is None:
            raise RuntimeError("redis store is closed")
        return self._client

    def _k(self, namespace: str, key: str) -> str:
        return f"{self.prefix}:{self.version}:{namespace}:{key}"

    @property
    def _current_key(self) -> str:
        return f"{self.prefix}:current_version"

    @property
    def _versions_key(self) -> str:
        return f"{self.prefix}:versions"

    def published_version(self) -> str | None:
        """The version readers without a pinned version use, or ``None``."""
        v = self._r.get(self._current_key)
        return None if v is None else v.decode()

    def versions(self) -> list[str]:
        """Published versions, oldest first."""
        return [v.decode() for v in self._r.lrange(self._versions_key, 0, -1)]

    def _put_encoded(self, namespace: str, keys: list[str], values: list[bytes]) -> None:
        pipe = self._r.pipeline(transaction=False)
        pipe.mset({self._k(namespace, k): v for k, v in zip(keys, values, strict=True)})
        pipe.sadd(f"{self.prefix}:{self.version}:_namespaces", namespace)
        pipe.execute()

    def _get_encoded(self, namespace: str, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        return self._r.mget([self._k(namespace, k) for k in keys])

    def put_json(self, key: str, obj: Any) -> None:
        self._r.set(self._k("_meta", str(key)), json.dumps(obj))

    def get_json(self, key: str) -> Any | None:
        v = self._r.get(self._k("_meta", str(key)))
        return None if v is None else json.loads(v)

    def _scan(self, pattern: str) -> Iterator[bytes]:
        yield from self._r.scan_iter(match=pattern, count=10_000)

    def count(self, namespace: str) -> int:
        check_namespace(namespace)
        # SCAN walks the whole keyspace: an administrative call, not for the request path
        return sum(1 for _ in self._scan(f"{self.prefix}:{self.version}:{namespace}:*"))

    def namespaces(self) -> list[str]:
        names = self._r.smembers(f"{self.prefix}:{self.version}:_namespaces")
        return sorted(n.decode() for n in names if self.count(n.decode()) > 0)

    def refresh(self) -> bool:
        """Follow ``current_version`` (unless a version was pinned at construction)."""
        if self._pinned:
            return False
        v = self.published_version()
        if v is None or v == self.version:
            return False
        self.version = v
        return True

    def drop_version(self, version: str) -> int:
        """Delete every key of ``version`` (never the published one); returns keys deleted."""
        if version == self.published_version():
            raise ValueError(f"version {version} is published; publish another one first")
        n = 0
        batch: list[bytes] = []
        for key in self._scan(f"{self.prefix}:{version}:*"):
            batch.append(key)
            if len(batch) >= self.chunk_size:
                n += self._r.unlink(*batch)
                batch = []
        if batch:
            n += self._r.unlink(*batch)
        self._r.lrem(self._versions_key, 0, version)
        return n

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @classmethod
    @contextmanager
    def build(
        cls,
        url: str,
        *,
        prefix: str = "cg",
        version: str | None = None,
        keep: int = 1,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> Iterator[RedisStore]:
        """Write a new version; publish it (one ``SET``) only if the block succeeds.

        On an exception the partial version is deleted and the published one is untouched.
        After publishing, all but the ``keep`` most recent earlier versions are deleted (kept ones
        serve readers that have not called :meth:`refresh` yet).
        """
        version = version or _new_version()
        store = cls(url, prefix=prefix, version=version, chunk_size=chunk_size)
        try:
            if version in store.versions() or store._r.exists(f"{prefix}:{version}:_namespaces"):
                raise ValueError(f"version {version} already exists under prefix {prefix}")
            try:
                yield store
            except BaseException:
                store.drop_version(version)
                raise
            pipe = store._r.pipeline(transaction=True)
            pipe.rpush(store._versions_key, version)
            pipe.set(store._current_key, version)
            pipe.execute()
            old = store.versions()[:-1]
            for v in old[: max(0, len(old) - keep)]:
                store.drop_version(v)
            log.debug("store version %s published at %s", version, _redact(url))
        finally:
            store.close()


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


# --------------------------------------------------------------------------- URIs
def _parse(uri: str | Path) -> tuple[str, Any, dict[str, str]]:
    """(backend, target, options) for a store URI."""
    text = str(uri)
    parts = urlsplit(text)
    if parts.scheme in ("redis", "rediss", "unix"):
        query = dict(parse_qsl(parts.query))
        opts = {k: query.pop(k) for k in ("prefix", "version") if k in query}
        url = urlunsplit(parts._replace(query=urlencode(query)))
        return "redis", url, opts
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file URIs must be local (file:///path), got {text!r}")
        return "file", Path(unquote(parts.path)), {}
    if parts.scheme and len(parts.scheme) > 1:  # one letter: a Windows drive
        raise ValueError(f"unsupported store URI scheme {parts.scheme!r} in {text!r}")
    return "file", Path(text), {}


def open_store(uri: str | Path, *, writable: bool = False, **kwargs: Any) -> RecordStore:
    """Open a store: ``file:///path`` or a path -> :class:`FileStore` (read-only unless
    ``writable``), ``redis://host:port/db[?prefix=cg&version=v]`` -> :class:`RedisStore` (always
    writable, under the published or the given version)."""
    backend, target, opts = _parse(uri)
    if backend == "redis":
        return RedisStore(target, **opts, **kwargs)
    return FileStore(target, writable=writable, **kwargs)


@contextmanager
def build_store(uri: str | Path, **kwargs: Any) -> Iterator[RecordStore]:
    """Write a complete new store at ``uri``, visible to readers only if the block succeeds."""
    backend, target, opts = _parse(uri)
    builder = RedisStore.build(target, **opts, **kwargs) if backend == "redis" else None
    if builder is None:
        builder = FileStore.build(target, **kwargs)
    with builder as store:
        yield store
