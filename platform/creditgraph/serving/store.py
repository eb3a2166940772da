"""The embedding store of the lambda architecture (seed 001, section 3.4).

A batch job computes user and entity embeddings (everything but the last hop) and writes them
here; the online path reads only the requesting user's one-hop neighbourhood by key. One small
interface, :class:`EmbeddingStore`, with two backends:

- :class:`FileStore`: an embedded SQLite file (stdlib ``sqlite3``), no server. One table per
  namespace (``key TEXT PRIMARY KEY, value BLOB``). Built atomically by :meth:`FileStore.build`
  (written to a temporary sibling, renamed on success), then opened read-only by any number of
  processes (Ray Serve replicas).
- :class:`RedisStore`: a Redis server. Keys ``{prefix}:{version}:{namespace}:{key}``; writes are
  pipelined in chunks, reads are one ``MGET``. :meth:`RedisStore.build` writes a new version and
  switches ``{prefix}:current_version`` only after every write succeeded.

Keys are user or entity ids, ``int`` or ``str``; they are stored as text, so ``7`` and ``"7"``
name the same entry (the same rule the data loader applies to ids). Values are numeric numpy
arrays of any shape, encoded by :func:`encode_array` (a small header with dtype and shape, then
the raw bytes; never pickle). :func:`open_store` and :func:`build_store` pick the backend from a
URI: ``file:///path``, a plain path, or ``redis://host:port/db``.
"""

from __future__ import annotations

import abc
import json
import math
import os
import re
import sqlite3
import struct
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

from creditgraph.utils.io import atomic_file
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

Key = int | str
_MAGIC = b"CGA\x01"
_MAX_NDIM = 32
_NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,62}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # Redis prefix / version: no ':' or glob characters
_ALLOWED_KINDS = "biufc"  # bool, signed, unsigned, float, complex: plain numbers only
DEFAULT_CHUNK = 10_000
PROGRESS_FROM = 100_000  # bulk loads at least this big show a progress bar


# --------------------------------------------------------------------------- encoding
def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    d = dtype.str.encode("ascii")
    return (
        _MAGIC + struct.pack("<B", len(d)) + d + struct.pack(f"<B{len(shape)}Q", len(shape), *shape)
    )


def _check_dtype(dtype: np.dtype) -> None:
    if dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f"only plain numeric arrays can be stored, got dtype {dtype}")


def encode_array(arr: np.ndarray) -> bytes:
    """``arr`` as bytes: magic, dtype string, ndim, shape (uint64), then the C-order data."""
    arr = np.asarray(arr)
    _check_dtype(arr.dtype)
    if arr.ndim > _MAX_NDIM:
        raise ValueError(f"at most {_MAX_NDIM} dimensions, got {arr.ndim}")
    return _header(arr.dtype, arr.shape) + np.ascontiguousarray(arr).tobytes()


def decode_array(blob: bytes | memoryview) -> np.ndarray:
    """The inverse of :func:`encode_array`; raises ``ValueError`` on anything malformed."""
    buf = memoryview(blob)
    if len(buf) < 6 or bytes(buf[:4]) != _MAGIC:
        raise ValueError("not an encoded array (bad magic)")
    dlen = buf[4]
    pos = 5 + dlen
    if len(buf) < pos + 1:
        raise ValueError("truncated array header")
    try:
        dtype = np.dtype(bytes(buf[5:pos]).decode("ascii"))
    except (TypeError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"bad dtype in array header: {exc}") from exc
    _check_dtype(dtype)
    ndim = buf[pos]
    pos += 1
    if ndim > _MAX_NDIM or len(buf) < pos + 8 * ndim:
        raise ValueError("truncated or invalid array shape")
    shape = struct.unpack_from(f"<{ndim}Q", buf, pos)
    pos += 8 * ndim
    if math.prod(shape) * dtype.itemsize != len(buf) - pos:
        raise ValueError("array payload does not match its shape and dtype")
    # copy: callers get an ordinary writable array, not a view on the transport buffer
    return np.frombuffer(buf[pos:], dtype=dtype).reshape(shape).copy()


def _encode_many(arrays: Sequence[np.ndarray] | np.ndarray) -> list[bytes]:
    if isinstance(arrays, np.ndarray):
        if arrays.ndim == 0:
            raise ValueError("arrays must be a sequence of arrays or an array of rows")
        _check_dtype(arrays.dtype)
        rows = np.ascontiguousarray(arrays)
        head = _header(rows.dtype, rows.shape[1:])  # every row has the same header
        return [head + r.tobytes() for r in rows]
    return [encode_array(a) for a in arrays]


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
class EmbeddingStore(abc.ABC):
    """Arrays by (namespace, key), plus small JSON metadata (model version, dimensions...)."""

    chunk_size: int = DEFAULT_CHUNK

    # backends implement these five on already-encoded values
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

    # shared logic
    def put_arrays(
        self,
        namespace: str,
        keys: Sequence[Key] | np.ndarray,
        arrays: Sequence[np.ndarray] | np.ndarray,
    ) -> None:
        """Store one array per key (shapes may differ; dtype is preserved; keys are upserted).

        ``arrays`` is a sequence of arrays, or one array whose rows are the values.
        """
        check_namespace(namespace)
        skeys = _keys(keys)
        if len(skeys) != len(arrays):
            raise ValueError(f"{len(skeys)} keys but {len(arrays)} arrays")
        for sl in _chunks(len(skeys), self.chunk_size):
            self._put_encoded(namespace, skeys[sl], _encode_many(arrays[sl]))

    def get_arrays(
        self, namespace: str, keys: Sequence[Key] | np.ndarray
    ) -> list[np.ndarray | None]:
        """The arrays stored under ``keys``, in order; ``None`` for unknown keys."""
        check_namespace(namespace)
        skeys = _keys(keys)
        out: list[np.ndarray | None] = []
        for sl in _chunks(len(skeys), self.chunk_size):
            out.extend(
                None if b is None else decode_array(b)
                for b in self._get_encoded(namespace, skeys[sl])
            )
        return out

    def get_array(self, namespace: str, key: Key) -> np.ndarray | None:
        """One array, or ``None``."""
        return self.get_arrays(namespace, [key])[0]

    def bulk_load(
        self,
        namespace: str,
        keys: Sequence[Key] | np.ndarray,
        arrays: Sequence[np.ndarray] | np.ndarray,
        *,
        chunk_size: int | None = None,
        progress: bool | None = None,
    ) -> int:
        """Write many keys in batched chunks (one transaction / pipeline per chunk).

        ``arrays`` is typically a ``[n, d]`` matrix (one row per key). A progress bar shows for
        loads of at least 100,000 keys unless ``progress`` says otherwise. Returns the keys written.
        """
        from tqdm.auto import tqdm

        check_namespace(namespace)
        n = len(keys)
        if n != len(arrays):
            raise ValueError(f"{n} keys but {len(arrays)} arrays")
        size = chunk_size or self.chunk_size
        show = n >= PROGRESS_FROM if progress is None else progress
        t0 = time.perf_counter()
        with tqdm(total=n, desc=f"store {namespace}", unit="key", disable=not show) as bar:
            for sl in _chunks(n, size):
                self._put_encoded(namespace, _keys(keys[sl]), _encode_many(arrays[sl]))
                bar.update(sl.stop - sl.start)
        log.debug("stored %d keys in %s in %.1fs", n, namespace, time.perf_counter() - t0)
        return n

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- SQLite file
def _table(namespace: str) -> str:
    return f'"ns_{check_namespace(namespace)}"'


class FileStore(EmbeddingStore):
    """An embedded store in one SQLite file.

    Open an existing store read-only (the default; any number of processes may do so at once),
    or ``writable=True`` to create/update it in place (WAL mode, each call one transaction; for
    small incremental updates). Batch jobs should use :meth:`build`, which makes the new store
    appear atomically. A reader keeps its snapshot until :meth:`refresh` (the old file stays
    readable through its open handle after a rebuild renames a new one over it).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        writable: bool = False,
        chunk_size: int = DEFAULT_CHUNK,
        _building: bool = False,
    ):
        self.path = Path(path)
        self.writable = writable or _building
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
                # a failed build is thrown away whole, so no journal and no per-commit fsync
                conn.execute("PRAGMA journal_mode=OFF")
                conn.execute("PRAGMA synchronous=OFF")
            else:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("CREATE TABLE IF NOT EXISTS _meta (key TEXT PRIMARY KEY, value TEXT)")
        else:
            if not self.path.is_file():
                raise FileNotFoundError(f"embedding store {self.path} not found")
            uri = f"file:{self.path.resolve()}?mode=ro"
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
            raise RuntimeError(f"embedding store {self.path} is closed")
        return self._conn

    def _require_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"embedding store {self.path} is open read-only")

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
        log.info("embedding store written to %s", path)


# --------------------------------------------------------------------------- Redis
def _new_version() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


class RedisStore(EmbeddingStore):
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
            log.info("embedding store version %s published at %s", version, _redact(url))
        finally:
            store.close()


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


@contextmanager
def local_redis(workdir: str | Path, *, timeout: float = 20.0) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port (no persistence); yields its URL.

    For tests, benchmarks and demos. Raises ``FileNotFoundError`` when ``redis-server`` is not
    installed (Debian: ``apt-get install redis-server``), ``RuntimeError`` if it does not answer.
    """
    import shutil
    import socket
    import subprocess

    import redis

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


def open_store(uri: str | Path, *, writable: bool = False, **kwargs: Any) -> EmbeddingStore:
    """Open a store: ``file:///path`` or a path -> :class:`FileStore` (read-only unless
    ``writable``), ``redis://host:port/db[?prefix=cg&version=v]`` -> :class:`RedisStore` (always
    writable, under the published or the given version)."""
    backend, target, opts = _parse(uri)
    if backend == "redis":
        return RedisStore(target, **opts, **kwargs)
    return FileStore(target, writable=writable, **kwargs)


@contextmanager
def build_store(uri: str | Path, **kwargs: Any) -> Iterator[EmbeddingStore]:
    """Write a complete new store at ``uri``, visible to readers only if the block succeeds."""
    backend, target, opts = _parse(uri)
    builder = RedisStore.build(target, **opts, **kwargs) if backend == "redis" else None
    if builder is None:
        builder = FileStore.build(target, **kwargs)
    with builder as store:
        yield store
