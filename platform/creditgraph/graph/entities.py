"""The entity side of the graph: keyed entity ids and the state of every entity at a decision time.

Entities (devices, phones, addresses, IPs...: the ``entities`` of ``dataset.yaml``) are the nodes
users are linked to. Their raw identifiers never leave the batch job: everything stored or logged
names an entity by a *key*, a keyed BLAKE2b hash of ``(type, id)`` with a per-run secret salt
(``RUN/graph/salt.key``), so a phone number or an address is never written in clear and the same
entity gets the same key in training, batch scoring and online requests.

:func:`entity_state` is what seed 001's batch stage computes for the key-value store: for a
decision time ``T``, each entity's users seen with it in the history window ``[T - W, T]`` (its
*members*), how many distinct users had been seen with it by ``T`` (the super-node count), and
whether it is cut. An applicant linked to an entity receives the members' stored states; a
member's own states come from the user-user view (:mod:`creditgraph.graph.temporal`), whose
weighted means over (entity, co-user) pairs are the same numbers.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from creditgraph.data.spec import EntityType

SALT_BYTES = 32


def new_salt(path: str | Path) -> bytes:
    """Create a secret salt file (owner read/write only) and return the salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(salt)
    return salt


def load_salt(path: str | Path) -> bytes:
    salt = Path(path).read_bytes()
    if len(salt) != SALT_BYTES:
        raise ValueError(f"{path}: not an entity salt ({len(salt)} bytes)")
    return salt


def normalize_id(value: Any) -> str:
    """An entity id as text: integral numbers without a decimal point, so 7, 7.0 and "7" agree."""
    if isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, Integral):
        return str(int(value))
    if isinstance(value, float | np.floating) and np.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


def entity_key(salt: bytes, entity_type: str, entity_id: Any) -> str:
    """The stored name of one entity: 32 hex characters, not reversible without the salt."""
    msg = f"{entity_type}\x1f{normalize_id(entity_id)}".encode()
    return hashlib.blake2b(msg, digest_size=16, key=salt).hexdigest()


def entity_keys(salt: bytes, types: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Keys of many (type, id) pairs; each distinct pair is hashed once."""
    frame = pd.DataFrame({"t": np.asarray(types, dtype=object), "i": np.asarray(ids, dtype=object)})
    codes, uniques = pd.factorize(pd.MultiIndex.from_frame(frame))
    keys = np.array([entity_key(salt, t, i) for t, i in uniques], dtype=object)
    return keys[codes]


@dataclass
class EntityState:
    """Every entity seen by time ``T`` and its members in the window ``[T - W, T]``.

    ``member_user`` / ``member_entity`` are the distinct (user, entity) incidences of the window
    (row index into the users, index into ``key``); members of cut entities are kept (they count)
    but carry nothing (``cut``).
    """

    time: float
    key: np.ndarray  # object[E]
    type_code: np.ndarray  # int16[E], index into ``types``
    types: list[str]
    n_window: np.ndarray  # int32[E]: distinct members in the window
    n_cumulative: np.ndarray  # int32[E]: distinct users seen with it by T
    cut: np.ndarray  # bool[E]: super-node at T
    member_user: np.ndarray  # int64[m]
    member_entity: np.ndarray  # int64[m]

    @property
    def n_entities(self) -> int:
        return len(self.key)


def entity_state(
    links: pd.DataFrame | None,
    as_of: np.ndarray,
    entities: dict[str, EntityType],
    history_days: float,
    time: float,
    salt: bytes,
    types: list[str],
) -> EntityState:
    """The entities at decision time ``time`` (float days), from validated links.

    ``links`` has ``user_idx, entity_type, entity_id, ts_days``; ``as_of`` is each user's decision
    time. A user is a member of an entity when seen with it inside ``[time - W, time]`` and its
    own decision time is not after ``time``; sightings after ``time`` are ignored.
    """
    code = {t: i for i, t in enumerate(types)}
    empty = np.zeros(0, np.int64)
    if links is None or len(links) == 0:
        return EntityState(
            time, np.zeros(0, object), np.zeros(0, np.int16), list(types),
            np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, bool), empty, empty,
        )  # fmt: skip
    unknown = sorted(set(links["entity_type"].unique()) - set(types))
    if unknown:
        raise ValueError(f"entity types {unknown} unknown to this graph")
    ts = links["ts_days"].to_numpy(np.float64)
    past = ts <= time
    sub = links.loc[past]
    keys = entity_keys(salt, sub["entity_type"].to_numpy(), sub["entity_id"].to_numpy())
    ent, uniq = pd.factorize(keys)
    user = sub["user_idx"].to_numpy(np.int64)
    etype = sub["entity_type"].map(code).to_numpy(np.int16)
    n_ent = len(uniq)
    type_code = np.zeros(n_ent, np.int16)
    type_code[ent] = etype
    # cumulative distinct users by T (the super-node count of graph/temporal.py)
    pair = np.unique(ent.astype(np.int64) * (len(as_of) + 1) + user)
    n_cum = np.bincount(pair // (len(as_of) + 1), minlength=n_ent).astype(np.int32)
    max_degree = np.array([entities.get(t, EntityType()).max_degree for t in types])
    cut = n_cum > max_degree[type_code]
    # members: seen inside the window, decision time not after T
    window = (sub["ts_days"].to_numpy(np.float64) >= time - history_days) & (as_of[user] <= time)
    m = np.unique(ent[window].astype(np.int64) * (len(as_of) + 1) + user[window])
    member_entity, member_user = m // (len(as_of) + 1), m % (len(as_of) + 1)
    n_window = np.bincount(member_entity, minlength=n_ent).astype(np.int32)
    return EntityState(
        time=time,
        key=np.asarray(uniq, dtype=object),
        type_code=type_code,
        types=list(types),
        n_window=n_window,
        n_cumulative=n_cum,
        cut=cut,
        member_user=member_user.astype(np.int64),
        member_entity=member_entity.astype(np.int64),
    )
