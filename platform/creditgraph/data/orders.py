"""The order-risk family's data contract: the ``orders`` section of dataset.yaml, its tables.

Orders are event nodes; ``order_links.parquet`` ties each order to the entities it used (devices,
cards, addresses, IPs; any type declared in ``entities``). :func:`load_orders` reads the tables
(pyarrow, or Ray Data for large ones), checks them against the contract and returns canonical
arrays; it raises :class:`~creditgraph.data.errors.DataValidationError` on the first broken rule
and writes nothing.

Time rules (seed 001): an order's own label is known only from ``label_time`` on
(:func:`labels_known_at`); a link is observed at its ``ts`` (the order's time when absent), so a
device seen with an order days later is not part of that order's context at scoring time.

This module must not import ``spec.py`` or ``load.py`` at import time: ``spec.py`` imports
:class:`OrdersSpec` from here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from creditgraph.data.errors import DataValidationError
from creditgraph.data.load import read_table
from creditgraph.data.spec import DatasetSpec, OrdersSpec
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

LINK_REQUIRED = ("entity_type", "entity_id")  # plus the order id column; "ts" is optional
TRUTH_COLUMN = "p_fraud"
SEGMENT_COLUMN = "segment"
MAX_EXAMPLES = 5
TIME_UNIT = "datetime64[us]"  # as the credit family's loader
_PER_DAY = 86_400 * 10**6  # microseconds


@dataclass
class OrderDataset:
    """A validated order dataset in canonical form; row i of every array is order i.

    ``orders`` holds the feature columns only (float64, NaN = missing); canonical values live in
    their own arrays, so a feature column can never replace them. Times are naive UTC
    ``datetime64[us]`` and float days since 1970 (``t_days``, ``label_t_days``). ``label`` is
    NaN where unknown (never labeled, or known only after ``reference_time``); ``label_time`` is
    NaT there. ``links`` has ``order_idx``, ``entity_type`` (categorical, declared types),
    ``entity_id`` and ``ts_days`` (when the link was observed, never before its order).
    ``truth`` is the true p_fraud per order (NaN where absent), simulated data only.
    """

    spec: DatasetSpec
    root: Path
    orders: pd.DataFrame
    feature_names: list[str]
    ids: np.ndarray
    ts: np.ndarray
    t_days: np.ndarray
    buyer: np.ndarray
    amount: np.ndarray
    label: np.ndarray
    label_time: np.ndarray
    label_t_days: np.ndarray
    links: pd.DataFrame | None = None
    truth: np.ndarray | None = None
    segments: pd.DataFrame | None = None
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_orders(self) -> int:
        return len(self.ids)

    def feature_matrix(self) -> np.ndarray:
        """Raw feature values, ``float64[n_orders, n_features]``, NaN where missing."""
        return self.orders[self.feature_names].to_numpy(dtype=np.float64)


def labels_known_at(ds: OrderDataset, t: Any, *, mature_days: float | None = None) -> np.ndarray:
    """Each order's label as known at time ``t`` (NaN where ``label_time > t`` or unlabeled).

    ``t`` is a timestamp (anything pandas parses) or float days since 1970, a scalar or one per
    order. Every training split must take its labels through this rule. ``mature_days`` also
    hides labels of orders placed less than that many days before ``t``: frauds are known sooner
    than clean orders, so without it recent orders look fraud-heavy.
    """
    td = _as_days(t)
    known = ds.label_t_days <= td
    if mature_days is not None:
        known &= ds.t_days <= td - float(mature_days)
    return np.where(known, ds.label, np.nan)


def load_orders(root: str | Path, *, with_truth: bool = True, engine: str = "auto") -> OrderDataset:
    """Load and validate an order-risk dataset directory (``family: orders`` in dataset.yaml).

    ``with_truth=False`` skips the evaluation-only tables (truth, segments). Tables are read
    like the credit family's (``engine``: pyarrow for small local tables, Ray Data for large or
    remote ones; see :func:`creditgraph.data.load.choose_engine`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(str(root), message="dataset directory not found")
    spec = DatasetSpec.load(root)
    if spec.family != "orders" or spec.orders is None:
        raise DataValidationError(
            str(root / "dataset.yaml"),
            column="family",
            message=f"family is {spec.family!r}; load_orders reads 'family: orders' datasets",
        )
    o = spec.orders
    horizon = _horizon(spec)
    notes: list[str] = []

    path, name = _locate(root, o.table, "orders table")
    raw = read_table(path, engine)
    canon = _validate_orders(raw, o, name, horizon)
    feats, feature_names = _features(raw, o, name, notes)
    del raw
    ids, index = canon["ids"], pd.Index(canon["ids"])
    t_days = _days(canon["ts"])
    label, label_time = canon["label"], canon["label_time"]
    # known only after a stated reference time: hidden, as they were not known then
    hidden = ~np.isnat(label_time) & (label_time > horizon.time)
    label = np.where(hidden, np.nan, label)
    label_time = np.where(hidden, np.datetime64("NaT", "us"), label_time)
    label_t_days = _days(label_time)

    links, links_hidden = None, 0
    if o.links:
        found = _locate(root, o.links, "links table", required=False)
        if found is not None:
            lraw = read_table(found[0], engine)
            links = _validate_links(lraw, spec, o, found[1], index, t_days, horizon, notes)
            links_hidden = len(lraw) - len(links)
            del lraw
    truth = segments = None
    if with_truth and o.truth:
        found = _locate(root, o.truth, "truth table", required=False)
        if found is not None:
            truth = _validate_truth(read_table(found[0], engine), o, found[1], index)
    if with_truth and o.segments:
        found = _locate(root, o.segments, "segments table", required=False)
        if found is not None:
            segments = _validate_segments(read_table(found[0], engine), o, found[1], index)

    ds = OrderDataset(
        spec=spec,
        root=root,
        orders=feats,
        feature_names=feature_names,
        ids=ids,
        ts=canon["ts"],
        t_days=t_days,
        buyer=canon["buyer"],
        amount=canon["amount"],
        label=label,
        label_time=label_time,
        label_t_days=label_t_days,
        links=links,
        truth=truth,
        segments=segments,
        warnings=notes,
    )
    labeled = np.isfinite(label)
    ds.stats = {
        "orders": ds.n_orders,
        "buyers": int(pd.unique(ds.buyer).size),
        "features": len(feature_names),
        "labeled": int(labeled.sum()),
        "fraud_rate": float(label[labeled].mean()) if labeled.any() else None,
        "links": 0 if links is None else len(links),
        "entities": {}
        if links is None
        else links.groupby("entity_type", observed=True)["entity_id"].nunique().to_dict(),
        "missing_share": float(np.isnan(ds.feature_matrix()).mean()) if feature_names else 0.0,
        "truth_rows": 0 if truth is None else int(np.isfinite(truth).sum()),
        "labels_after_reference": int(hidden.sum()),
        "links_after_reference": links_hidden,
        "warnings": len(notes),
    }
    log.info(
        "order dataset %s: %d orders, %d features, %d links, %d labeled%s",
        spec.name,
        ds.n_orders,
        len(feature_names),
        ds.stats["links"],
        ds.stats["labeled"],
        ", with truth" if truth is not None else "",
    )
    return ds


# --- reading -----------------------------------------------------------------------------


def _locate(root: Path, name: str, what: str, *, required: bool = True) -> tuple[Path, str] | None:
    """``root/name``, or the folder ``root/<stem>/`` of parts; with the name errors show."""
    p = root / name
    if not p.exists():
        stem = root / Path(name).stem
        p = stem if stem.is_dir() else p
    if not p.exists():
        if required:
            raise DataValidationError(str(root / name), message=f"{what} not found")
        return None
    return p, p.name


# --- checks ------------------------------------------------------------------------------


def _fail(file: str, column: str | None, message: str, mask: np.ndarray, show: Any) -> None:
    rows = np.flatnonzero(mask)[:MAX_EXAMPLES]
    values = show.iloc[rows] if isinstance(show, pd.Series) else np.asarray(show)[rows]
    raise DataValidationError(
        file,
        column,
        message,
        rows=rows.tolist(),
        examples=[v if isinstance(v, _Shown) else repr(v) for v in list(values)],
        count=int(mask.sum()),
    )


class _Shown(str):
    """An example already written for the error message (not to be quoted again)."""


def _warn(notes: list[str], message: str) -> None:
    notes.append(message)
    log.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def _require(df: pd.DataFrame, file: str, cols: list[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataValidationError(
            file,
            missing[0],
            f"{what} column(s) {missing} not found; present: {sorted(map(str, df.columns))[:20]}",
        )


class _Horizon(NamedTuple):
    """The data's "now": no order is placed after it; what is observed after it is unknown."""

    time: np.datetime64
    source: str
    given: bool


def _horizon(spec: DatasetSpec) -> _Horizon:
    """``reference_time`` (the orders section's, else the dataset's) or, when neither is set,
    the current time + 1 day (then anything later is refused as future-dated)."""
    ref = spec.orders.reference_time if spec.orders is not None else None
    ref = ref or spec.reference_time
    if ref is not None:
        t = _naive_utc(pd.Timestamp(ref)).to_datetime64().astype(TIME_UNIT)
        return _Horizon(t, f"the reference time {t}", True)
    now = pd.Timestamp.now(tz="UTC").tz_localize(None) + pd.Timedelta(days=1)
    t = now.to_datetime64().astype(TIME_UNIT)
    return _Horizon(t, f"the current time + 1 day ({t}); set reference_time for other data", False)


def _id_key(s: pd.Series) -> np.ndarray:
    """Ids as int64 when integral, else as strings (the rule of the credit family's loader)."""
    if pd.api.types.is_integer_dtype(s):
        return s.to_numpy(dtype=np.int64)
    if pd.api.types.is_float_dtype(s):
        f = s.to_numpy(dtype=np.float64)
        if np.all(np.isfinite(f)) and np.all(f == np.round(f)):
            return f.astype(np.int64)
    return s.astype(str).to_numpy(dtype=object)


def _ids(df: pd.DataFrame, file: str, col: str, what: str) -> np.ndarray:
    s = df[col]
    null = s.isna().to_numpy()
    if null.any():
        _fail(file, col, f"missing {what}", null, s)
    if pd.api.types.is_bool_dtype(s):
        _fail(file, col, f"{what}s must be integers or strings, found booleans", ~null, s)
    if pd.api.types.is_float_dtype(s):
        f = s.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(f) | (f != np.round(f))
        if bad.any():
            _fail(file, col, f"{what}s must be integers or strings", bad, s)
    return _id_key(s)


def _numeric(df: pd.DataFrame, file: str, col: str) -> np.ndarray:
    """The column as float64 (NaN for null), or a clear error if it holds non-numbers."""
    s = df[col]
    if not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)):
        kind = pd.api.types.infer_dtype(s, skipna=True)
        if kind not in ("integer", "floating", "mixed-integer-float", "decimal", "empty"):
            is_num = s.map(lambda v: v is None or isinstance(v, int | float | np.number))
            bad = ~is_num.to_numpy(dtype=bool)
            bad = bad if bad.any() else s.notna().to_numpy()
            _fail(file, col, f"must be numeric, found {kind} values (dtype {s.dtype})", bad, s)
    return s.to_numpy(dtype=np.float64, na_value=np.nan)


def _naive_utc(t: pd.Timestamp) -> pd.Timestamp:
    return t.tz_convert("UTC").tz_localize(None) if t.tzinfo is not None else t


def _times(
    df: pd.DataFrame, file: str, col: str, horizon: _Horizon | None, *, allow_null: bool
) -> np.ndarray:
    """Naive-UTC ``datetime64[us]``; unparseable values, nulls (unless allowed) and times after
    ``horizon`` (when given) are errors."""
    s = df[col]
    if pd.api.types.is_datetime64_any_dtype(s):
        t = s
    else:
        if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            given = s.notna().to_numpy()
            if given.any():
                _fail(file, col, "must be a timestamp or a date string, found numbers", given, s)
        t = pd.to_datetime(s, errors="coerce", utc=True, format="mixed")
    if getattr(t.dt, "tz", None) is not None:
        t = t.dt.tz_convert("UTC").dt.tz_localize(None)
    out = t.to_numpy().astype(TIME_UNIT)
    nat = np.isnat(out)
    bad = nat & s.notna().to_numpy() if allow_null else nat
    if bad.any():
        _fail(file, col, "unparseable" + ("" if allow_null else " or missing") + " time", bad, s)
    if horizon is not None:
        late = ~nat & (out > horizon.time)
        if late.any():
            _fail(file, col, f"time after {horizon.source}", late, s)
    return out


def _days(t: np.ndarray) -> np.ndarray:
    """``datetime64`` (NaT allowed) to float days since 1970 (NaN for NaT)."""
    t = np.asarray(t).astype(TIME_UNIT)
    out = t.astype(np.int64) / _PER_DAY
    return np.where(np.isnat(t), np.nan, out)


def _as_days(t: Any) -> Any:
    if isinstance(t, int | float | np.integer | np.floating):
        return float(t)
    arr = np.asarray(t)
    if arr.dtype.kind in "iuf":
        return arr.astype(np.float64)
    if arr.ndim == 0:
        return float(_days(np.array([_naive_utc(pd.Timestamp(t)).to_datetime64()]))[0])
    stamps = pd.to_datetime(pd.Series(arr), utc=True).dt.tz_localize(None)
    return _days(stamps.to_numpy())


def _validate_orders(
    raw: pd.DataFrame, o: OrdersSpec, f: str, horizon: _Horizon
) -> dict[str, np.ndarray]:
    _require(raw, f, o.roles, "required")
    if isinstance(o.features, list):
        _require(raw, f, list(o.features), "dataset.yaml feature")
    absent = [c for c in o.exclude if c not in raw.columns]
    if absent:
        raise DataValidationError(f, absent[0], "dataset.yaml 'exclude' names an absent column")

    ids = _ids(raw, f, o.id, "order id")
    dup = pd.Series(ids).duplicated(keep=False).to_numpy()
    if dup.any():
        _fail(f, o.id, "duplicate order ids", dup, raw[o.id])
    buyer = _ids(raw, f, o.buyer, "buyer id")
    ts = _times(raw, f, o.time, horizon, allow_null=False)

    amount = _numeric(raw, f, o.amount)
    bad = ~np.isfinite(amount)
    if bad.any():
        _fail(
            f, o.amount, "amounts must be finite numbers (no null, NaN or inf)", bad, raw[o.amount]
        )
    if (amount < 0).any():
        _fail(f, o.amount, "amounts must be >= 0", amount < 0, raw[o.amount])

    n = len(raw)
    label = np.full(n, np.nan)
    label_time = np.full(n, np.datetime64("NaT"), dtype=TIME_UNIT)
    if o.label and o.label_time:
        label = _numeric(raw, f, o.label)
        bad = ~(np.isnan(label) | (label == 0) | (label == 1))
        if bad.any():
            _fail(f, o.label, "label must be 0, 1 or null", bad, raw[o.label])
        # labels known after a stated reference time are hidden (by the caller), not refused
        label_time = _times(
            raw, f, o.label_time, None if horizon.given else horizon, allow_null=True
        )
        labeled = ~np.isnan(label)
        bad = labeled & np.isnat(label_time)
        if bad.any():
            _fail(f, o.label_time, "a label without the time it became known", bad, raw[o.id])
        bad = labeled & (label_time < ts)
        if bad.any():
            show = _describe(bad, **{o.id: ids, o.time: ts, o.label_time: label_time})
            _fail(f, o.label_time, "label known before the order was placed", bad, show)
        label_time = np.where(labeled, label_time, np.datetime64("NaT", "us"))
    return {
        "ids": ids,
        "buyer": buyer,
        "ts": ts,
        "amount": amount,
        "label": label,
        "label_time": label_time,
    }


def _describe(mask: np.ndarray, **columns: np.ndarray) -> np.ndarray:
    """Readable examples for the first offending rows only (the table may be large)."""
    out = np.empty(len(mask), dtype=object)
    for r in np.flatnonzero(mask)[:MAX_EXAMPLES]:
        out[r] = _Shown(", ".join(f"{k}={v[r]!s}" for k, v in columns.items()))
    return out


def _features(
    raw: pd.DataFrame, o: OrdersSpec, f: str, notes: list[str]
) -> tuple[pd.DataFrame, list[str]]:
    reserved = set(o.roles) | set(o.exclude)
    if isinstance(o.features, list):
        names = list(o.features)
    else:
        names, dropped = [], []
        for c in raw.columns:
            if c in reserved:
                continue
            s = raw[c]
            numeric = pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)
            (names if numeric else dropped).append(c)
        if dropped:
            _warn(
                notes,
                f"{f}: non-numeric column(s) {dropped} are not features (features: all); "
                "encode them as numbers or list them in 'exclude'",
            )
    out = {}
    for c in names:
        vals = _numeric(raw, f, c)
        inf = np.isinf(vals)
        if inf.any():
            _fail(f, c, "infinite values (use null/NaN for missing)", inf, raw[o.id])
        out[c] = vals
    if not names:
        _warn(notes, f"{f}: no numeric feature columns")
    return pd.DataFrame(out, index=pd.RangeIndex(len(raw))), names


def _order_positions(raw: pd.DataFrame, f: str, col: str, index: pd.Index, what: str) -> np.ndarray:
    _require(raw, f, [col], "required")
    s = raw[col]
    null = s.isna().to_numpy()
    if null.any():
        _fail(f, col, f"missing {col}", null, s)
    key = _id_key(s)
    if len(key) and (key.dtype == np.int64) != (index.dtype == np.int64):
        raise DataValidationError(
            f,
            col,
            f"order ids are stored as {s.dtype} here but as "
            f"{'integers' if index.dtype == np.int64 else 'strings'} in the orders table: "
            "store both with the same type",
        )
    pos = index.get_indexer(key)
    unknown = pos < 0
    if unknown.any():
        _fail(f, col, f"{what} orders not in the orders table", unknown, s)
    return pos.astype(np.int64)


def _validate_links(
    raw: pd.DataFrame,
    spec: DatasetSpec,
    o: OrdersSpec,
    lf: str,
    index: pd.Index,
    t_days: np.ndarray,
    horizon: _Horizon,
    notes: list[str],
) -> pd.DataFrame:
    """Canonical links; those observed after a stated reference time are left out (unknown
    then), those observed before their order are taken as seen at the order's time."""
    _require(raw, lf, [o.id, *LINK_REQUIRED], "required")
    pos = _order_positions(raw, lf, o.id, index, "links to")
    etype = raw["entity_type"]
    null = etype.isna().to_numpy()
    if null.any():
        _fail(lf, "entity_type", "missing entity_type", null, etype)
    declared = list(spec.entities)
    # through the distinct types, not millions of strings
    seen_types = pd.Categorical(etype)
    remap = pd.Index(declared).get_indexer(seen_types.categories.astype(str))
    codes = remap[seen_types.codes]
    bad = codes < 0
    if bad.any():
        _fail(
            lf,
            "entity_type",
            f"entity type not declared in dataset.yaml 'entities' ({sorted(declared)})",
            bad,
            etype,
        )
    eid = raw["entity_id"]
    null = eid.isna().to_numpy()
    if null.any():
        _fail(lf, "entity_id", "missing entity_id", null, eid)

    order_t = t_days[pos]
    if "ts" in raw.columns:
        seen = _days(_times(raw, lf, "ts", None if horizon.given else horizon, allow_null=True))
        seen = np.where(np.isnan(seen), order_t, seen)
        early = seen < order_t
        if early.any():
            _warn(
                notes,
                f"{lf}: {int(early.sum())} link(s) observed before their order "
                f"(e.g. rows {np.flatnonzero(early)[:MAX_EXAMPLES].tolist()}); "
                "taken as seen at the order's time",
            )
            seen = np.maximum(seen, order_t)
    else:
        seen = order_t
    out = pd.DataFrame(
        {
            "order_idx": pos,
            "entity_type": pd.Categorical.from_codes(codes, categories=declared),
            "entity_id": _id_key(eid),
            "ts_days": seen,
        }
    )
    if horizon.given:
        out = out[seen <= _days(np.array([horizon.time]))[0]].reset_index(drop=True)
    return out


def _validate_truth(raw: pd.DataFrame, o: OrdersSpec, tf: str, index: pd.Index) -> np.ndarray:
    _require(raw, tf, [o.id, TRUTH_COLUMN], "required")
    pos = _order_positions(raw, tf, o.id, index, "truth for")
    dup = pd.Series(pos).duplicated(keep=False).to_numpy()
    if dup.any():
        _fail(tf, o.id, "more than one truth row per order", dup, raw[o.id])
    p = _numeric(raw, tf, TRUTH_COLUMN)
    bad = ~(np.isfinite(p) & (p >= 0) & (p <= 1))
    if bad.any():
        _fail(tf, TRUTH_COLUMN, "probabilities must be in [0, 1]", bad, raw[TRUTH_COLUMN])
    out = np.full(len(index), np.nan)
    out[pos] = p
    return out


def _validate_segments(raw: pd.DataFrame, o: OrdersSpec, sf: str, index: pd.Index) -> pd.DataFrame:
    _require(raw, sf, [o.id, SEGMENT_COLUMN], "required")
    pos = _order_positions(raw, sf, o.id, index, "segments for")
    out = raw.drop(columns=[o.id])
    out.insert(0, "order_idx", pos)
    return out.sort_values("order_idx", kind="stable").reset_index(drop=True)
