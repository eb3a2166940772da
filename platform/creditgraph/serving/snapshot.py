"""Snapshots: what online scoring reads, made by batch scoring at a decision time T.

The contract (``docs/architecture.md``):

* a trained run folder is read-only after training; nothing here writes into it;
* a snapshot is an immutable, atomically published unit in a *registry* beside the run
  (``RUN.snapshots/`` by default): ``snapshots/<id>/snapshot.json`` (metadata: T, model and graph
  versions, schema version, record dtypes, whether cluster caps are present and how many) and its
  records (``store.sqlite``, or a version of a Redis store named in the metadata);
* which snapshot is served is a pointer, ``CURRENT``, changed only by :meth:`Registry.promote` /
  :meth:`Registry.rollback` (an atomic file replace that keeps the history); a running service
  follows it without a restart, and every response names the snapshot it used;
* a snapshot made without batch decisions (``creditgraph embed``) says ``caps.present: false`` and
  the service reports that it decides without cluster caps.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from creditgraph.layout import RegistryLayout, RunLayout, SnapshotFiles
from creditgraph.serving import records
from creditgraph.serving.store import RecordStore, build_store, open_store
from creditgraph.utils.io import atomic_dir, read_json, write_json
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)


class SnapshotError(LookupError):
    """A snapshot that does not exist, does not fit the model, or no promoted snapshot."""


def new_snapshot_id(decision_time_iso: str) -> str:
    """``<decision date>-<created time>-<random>``: sortable, unique, readable in logs."""
    day = decision_time_iso[:10].replace("-", "")
    return f"{day}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


class Registry:
    """A folder of immutable snapshots and the pointer to the promoted one."""

    def __init__(self, root: str | Path):
        self.layout = RegistryLayout(Path(root))

    @classmethod
    def for_run(cls, run: RunLayout, root: str | Path | None = None) -> Registry:
        """The registry named, or the run's default one beside it."""
        return cls(root if root is not None else run.default_snapshots)

    # --- publishing ----------------------------------------------------------------------
    @contextmanager
    def publish(
        self, snapshot_id: str, store_uri: str | None = None
    ) -> Iterator[tuple[SnapshotFiles, RecordStore]]:
        """Write a new snapshot: yields its (temporary) folder and a store being built; both
        appear only if the block succeeds. ``store_uri`` (``redis://...``) puts the records in
        Redis under a version named after the snapshot instead of the snapshot's SQLite file."""
        final = self.layout.snapshot(snapshot_id)
        if final.dir.exists():
            raise SnapshotError(f"snapshot {snapshot_id} already exists in {self.layout.root}")
        with atomic_dir(final.dir, overwrite=False) as tmp_dir:
            tmp = SnapshotFiles(tmp_dir)
            uri = str(tmp.store) if store_uri is None else _versioned(store_uri, snapshot_id)
            with build_store(uri) as store:
                yield tmp, store
        log.info("snapshot %s published in %s", snapshot_id, self.layout.root)

    # --- the pointer ---------------------------------------------------------------------
    def _pointer(self) -> dict:
        if not self.layout.current.exists():
            return {"current": None, "history": []}
        return read_json(self.layout.current)

    def current(self) -> str | None:
        """The promoted snapshot's id (None: nothing promoted yet)."""
        return self._pointer()["current"]

    def promote(self, snapshot_id: str, *, by: str = "cli") -> dict:
        """Serve ``snapshot_id`` from now on (it must exist); returns the new pointer."""
        self.meta(snapshot_id)  # exists and readable
        pointer = self._pointer()
        history = list(pointer["history"])
        if pointer["current"] == snapshot_id:
            return pointer
        history.append({"id": snapshot_id, "at": time.time(), "by": by})
        new = {"current": snapshot_id, "history": history}
        write_json(self.layout.current, new)
        log.info("snapshot %s promoted (was %s)", snapshot_id, pointer["current"])
        return new

    def rollback(self, *, by: str = "cli") -> dict:
        """Serve the snapshot promoted before the current one again."""
        pointer = self._pointer()
        ids = [h["id"] for h in pointer["history"]]
        if len(ids) < 2:
            raise SnapshotError("nothing to roll back to: fewer than two promotions")
        previous = next(i for i in reversed(ids[:-1]) if i != pointer["current"])
        history = [
            *pointer["history"],
            {"id": previous, "at": time.time(), "by": by, "rollback": True},
        ]
        new = {"current": previous, "history": history}
        write_json(self.layout.current, new)
        log.info("rolled back from snapshot %s to %s", pointer["current"], previous)
        return new

    # --- reading -------------------------------------------------------------------------
    def ids(self) -> list[str]:
        """Published snapshots, oldest first."""
        if not self.layout.snapshots.is_dir():
            return []
        return sorted(
            p.name
            for p in self.layout.snapshots.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / "snapshot.json").exists()
        )

    def meta(self, snapshot_id: str) -> dict:
        files = self.layout.snapshot(snapshot_id)
        if not files.manifest.exists():
            known = ", ".join(self.ids()[-5:]) or "none"
            raise SnapshotError(
                f"no snapshot {snapshot_id!r} in {self.layout.root} (latest: {known})"
            )
        return read_json(files.manifest)

    def list(self) -> list[dict]:
        current = self.current()
        return [
            {
                "id": i,
                "current": i == current,
                **{k: self.meta(i).get(k) for k in ("decision_time", "created", "model_version")},
                "caps": self.meta(i).get("caps", {}).get("present"),
            }
            for i in self.ids()
        ]

    def open(self, snapshot_id: str | None = None) -> Snapshot:
        """Open a snapshot (default: the promoted one) for reading."""
        snapshot_id = snapshot_id or self.current()
        if snapshot_id is None:
            raise SnapshotError(
                f"no snapshot promoted in {self.layout.root}: score a dataset with "
                "`creditgraph score ... --promote` (or `creditgraph snapshot promote ID`)"
            )
        return Snapshot(self.layout.snapshot(snapshot_id), self.meta(snapshot_id))


def _versioned(uri: str, snapshot_id: str) -> str:
    sep = "&" if "?" in uri else "?"
    return f"{uri}{sep}version={snapshot_id}"


@dataclass
class Snapshot:
    """One opened snapshot: its metadata and typed record reads."""

    files: SnapshotFiles
    meta: dict

    def __post_init__(self) -> None:
        uri = self.meta["store"].get("uri")
        if uri is None:
            self.store = open_store(self.files.store)
        else:
            self.store = open_store(_versioned(uri, self.id))
        if self.meta.get("schema_version") != records.SCHEMA_VERSION:
            raise SnapshotError(
                f"snapshot {self.id} has schema {self.meta.get('schema_version')}, this library "
                f"reads schema {records.SCHEMA_VERSION}: score the data again"
            )

    @property
    def id(self) -> str:
        return self.meta["id"]

    @property
    def caps_present(self) -> bool:
        return bool(self.meta.get("caps", {}).get("present"))

    def users(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        return self.store.get_records("user", ids)

    def entities(self, keys: Any) -> tuple[np.ndarray, np.ndarray]:
        return self.store.get_records("entity", keys)

    def clusters(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
        return self.store.get_records("cluster", ids)

    def close(self) -> None:
        self.store.close()
