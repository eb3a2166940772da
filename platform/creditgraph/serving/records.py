"""The typed records of a snapshot store: one numpy structured dtype per namespace.

A snapshot (see ``serving/snapshot.py``) holds three namespaces, each a fixed-size binary record
per key; the dtype (field names, types, shapes) is the schema and is stored in the snapshot's
metadata through ``numpy.lib.format``'s dtype descriptors, so a reader decodes exactly what the
writer encoded and a schema change is detected, never guessed:

``user`` (key: user id) — what the last layer needs for a known user
    ``raw``            float64[F]  raw features (NaN = missing), in the model's feature order
    ``limit``          float64     the historical (current) limit
    ``as_of``          float64     decision time, days since 1970
    ``struct``         float32[S]  structural features (entity-pair counts, log1p)
    ``tokens``         float32[2, L, d]  interference tokens of hops 1..L (context, interference)
    ``unc``            float32     the thinned towers' spread (the DSL uncertainty part)
    ``user_cap``       float64     per-user cluster cap from the batch decisions (inf = none)
    ``cluster_id``     int64       credit cluster (-1 = none)

``entity`` (key: keyed hash of (type, id)) — what an applicant linked to the entity receives
    ``type``           int16       index into the snapshot's entity types
    ``n_window``       int32       members: distinct users seen with it in [T - W, T]
    ``n_cumulative``   int32       distinct users seen with it by T (the super-node count)
    ``cluster_id``     int64       credit cluster of its members (-1 = none)
    ``sums``           float32[2, L, d]  sums over members of their tokens of hops 0..L-1

``cluster`` (key: cluster id) — the room an applicant joining the cluster may take
    ``cap``            float64     the cluster's cap on its total limit
    ``granted``        float64     total limit granted to its members by the batch
    ``size``           int64       members
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib import format as npformat

SCHEMA_VERSION = 2


@dataclass(frozen=True)
class Dims:
    """The sizes that fix the record layouts of one trained model."""

    n_features: int
    n_struct: int
    hops: int
    hidden: int


def user_dtype(d: Dims) -> np.dtype:
    return np.dtype(
        [
            ("raw", "<f8", (d.n_features,)),
            ("limit", "<f8"),
            ("as_of", "<f8"),
            ("struct", "<f4", (d.n_struct,)),
            ("tokens", "<f4", (2, d.hops, d.hidden)),
            ("unc", "<f4"),
            ("user_cap", "<f8"),
            ("cluster_id", "<i8"),
        ]
    )


def entity_dtype(d: Dims) -> np.dtype:
    return np.dtype(
        [
            ("type", "<i2"),
            ("n_window", "<i4"),
            ("n_cumulative", "<i4"),
            ("cluster_id", "<i8"),
            ("sums", "<f4", (2, d.hops, d.hidden)),
        ]
    )


CLUSTER_DTYPE = np.dtype([("cap", "<f8"), ("granted", "<f8"), ("size", "<i8")])


def schemas(d: Dims) -> dict[str, np.dtype]:
    """Every namespace's record dtype for a model of these dimensions."""
    return {"user": user_dtype(d), "entity": entity_dtype(d), "cluster": CLUSTER_DTYPE}


def dtype_to_json(dtype: np.dtype) -> list:
    """A dtype as JSON-able data (numpy's own ``.npy`` header descriptor)."""
    return _listify(npformat.dtype_to_descr(dtype))


def dtype_from_json(descr: list) -> np.dtype:
    return npformat.descr_to_dtype(_tuplify(descr))


def _listify(descr):
    if isinstance(descr, list | tuple):
        return [_listify(x) for x in descr]
    return descr


def _tuplify(descr):
    # a field is (name, type[, shape]); a shape is a tuple of ints
    if isinstance(descr, list) and descr and all(isinstance(f, list) for f in descr):
        return [_field(f) for f in descr]
    return descr


def _field(f: list) -> tuple:
    name, typ = f[0], _tuplify(f[1]) if isinstance(f[1], list) else f[1]
    return (name, typ, tuple(f[2])) if len(f) == 3 else (name, typ)


def encode(records: np.ndarray, dtype: np.dtype) -> list[bytes]:
    """One ``bytes`` value per record (the raw little-endian layout of ``dtype``)."""
    arr = np.ascontiguousarray(records, dtype=dtype)
    # a record seen as one opaque item: tolist() makes each one bytes object, in C
    return arr.view(np.dtype((np.void, dtype.itemsize))).tolist()


def decode(values: list[bytes | None], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Records and a found mask from stored values (``None`` = unknown key: a zeroed record)."""
    found = np.array([v is not None for v in values], dtype=bool)
    size = dtype.itemsize
    for v in values:
        if v is not None and len(v) != size:
            raise ValueError(f"stored record of {len(v)} bytes, schema says {size}")
    blob = b"".join(v if v is not None else bytes(size) for v in values)
    return np.frombuffer(blob, dtype=dtype).copy(), found
