"""Reading a dataset directory through Ray Data and checking it against the contract.

Every command that reads a dataset calls :func:`load_dataset`; it raises
:class:`~creditgraph.data.errors.DataValidationError` on the first broken rule, before anything
is written anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from creditgraph.data.errors import DataValidationError
from creditgraph.data.spec import LINK_COLUMNS, TRUTH_COLUMNS, DatasetSpec
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

EPOCH = pd.Timestamp("1970-01-01")
MAX_EXAMPLES = 5


@dataclass
class Dataset:
    """A validated dataset in canonical form.

    ``users`` has the id column, ``as_of`` (naive UTC datetime), ``treatment`` and ``outcome``
    (float, NaN = unlabeled) and the feature columns (float64, NaN = missing), in file order.
    ``links`` has ``user_idx`` (row position in ``users``), ``entity_type``, ``entity_id`` and
    ``ts_days``. Times are also given as float days since 1970 (``t_days``) for arithmetic.
    """

    spec: DatasetSpec
    root: Path
    users: pd.DataFrame
    feature_names: list[str]
    links: pd.DataFrame | None = None
    truth: pd.DataFrame | None = None
    segments: pd.DataFrame | None = None
    stats: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def ids(self) -> np.ndarray:
        return self.users[self.spec.id].to_numpy()

    @property
    def t_days(self) -> np.ndarray:
        return to_days(self.users["as_of"])

    @property
    def treatment(self) -> np.ndarray:
        return self.users["treatment"].to_numpy(dtype=np.float64)

    @property
    def outcome(self) -> np.ndarray:
        return self.users["outcome"].to_numpy(dtype=np.float64)

    def feature_matrix(self) -> np.ndarray:
        """Raw feature values, ``float64[n_users, n_features]``, NaN where missing."""
        return self.users[self.feature_names].to_numpy(dtype=np.float64)


def to_days(times: pd.Series | pd.DatetimeIndex) -> np.ndarray:
    """Datetimes (any resolution) to float days since 1970."""
    return np.asarray((pd.DatetimeIndex(times) - EPOCH) / pd.Timedelta(days=1), dtype=np.float64)


def read_table(path: Path) -> pd.DataFrame:
    """Read one parquet file or a directory of parquet files through Ray Data."""
    import ray.data

    from creditgraph.utils.runtime import init_ray

    init_ray()
    try:
        ds = ray.data.read_parquet(str(path))
        return ds.to_pandas()
    except Exception as exc:
        raise DataValidationError(str(path), message=f"cannot be read as parquet: {exc}") from exc


def _resolve(root: Path, name: str) -> Path | None:
    p = root / name
    if p.exists():
        return p
    stem = root / Path(name).stem  # users.parquet -> users/ (a directory of parts)
    return stem if stem.is_dir() else None


def _rows(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask)[:MAX_EXAMPLES]


def _fail(file: str, column: str | None, message: str, mask: np.ndarray, show: pd.Series) -> None:
    rows = _rows(mask)
    raise DataValidationError(
        file,
        column,
        message,
        rows=rows.tolist(),
        examples=[repr(show.iloc[r]) for r in rows],
        count=int(mask.sum()),
    )


def _require_columns(df: pd.DataFrame, file: str, cols: list[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataValidationError(
            file,
            missing[0],
            f"{what} column(s) {missing} not found; present: {sorted(map(str, df.columns))[:20]}",
        )


def _numeric(df: pd.DataFrame, file: str, col: str, allow_bool: bool = True) -> pd.Series:
    """The column as float64 (NaN for null), or a clear error if it holds non-numbers."""
    s = df[col]
    kind = pd.api.types.infer_dtype(s, skipna=True)
    if pd.api.types.is_bool_dtype(s) or kind == "boolean":
        if not allow_bool:
            _fail(file, col, "must be numeric, found booleans", s.notna().to_numpy(), s)
    elif not (
        pd.api.types.is_numeric_dtype(s)
        or kind in ("integer", "floating", "mixed-integer-float", "decimal", "empty")
    ):
        is_num = s.map(lambda v: v is None or isinstance(v, int | float | np.number)).to_numpy()
        bad = ~is_num if (~is_num).any() else s.notna().to_numpy()
        _fail(file, col, f"must be numeric, found {kind} values (dtype {s.dtype})", bad, s)
    return pd.Series(s.to_numpy(dtype="float64", na_value=np.nan), index=s.index, name=col)


def _times(df: pd.DataFrame, file: str, col: str) -> pd.Series:
    s = df[col]
    if pd.api.types.is_datetime64_any_dtype(s):
        t = s
    else:
        if pd.api.types.is_numeric_dtype(s):
            _fail(
                file,
                col,
                "must be a timestamp or a date string, found numbers",
                s.notna().to_numpy(),
                s,
            )
        t = pd.to_datetime(s, errors="coerce", utc=True, format="mixed")
    if getattr(t.dt, "tz", None) is not None:
        t = t.dt.tz_convert("UTC").dt.tz_localize(None)
    bad = t.isna().to_numpy()
    if bad.any():
        _fail(file, col, "unparseable or missing time", bad, s)
    return t


def _id_key(s: pd.Series) -> pd.Series:
    """Ids compared as int64 when integral, else as strings (so 7 and '7' in two files agree)."""
    if pd.api.types.is_integer_dtype(s):
        return s.astype("int64")
    if pd.api.types.is_float_dtype(s):
        f = s.to_numpy()
        if np.all(np.isfinite(f)) and np.all(f == np.round(f)):
            return s.astype("int64")
    return s.astype(str)


def load_dataset(root: str | Path, *, with_truth: bool = True) -> Dataset:
    """Load and validate a dataset directory (see MISSION.md, "The data contract").

    ``with_truth=False`` skips the evaluation-only tables (truth, segments) that building and
    scoring never read.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(str(root), message="dataset directory not found")
    spec = DatasetSpec.load(root)

    users_path = _resolve(root, spec.users)
    if users_path is None:
        raise DataValidationError(str(root / spec.users), message="users table not found")
    uf = str(users_path.name)
    raw = read_table(users_path)
    users = _validate_users(raw, spec, uf)
    feature_names = _feature_columns(raw, spec, uf)
    for col in feature_names:
        vals = _numeric(raw, uf, col)
        arr = vals.to_numpy()
        inf = np.isinf(arr)
        if inf.any():
            _fail(uf, col, "infinite values (use null/NaN for missing)", inf, raw[spec.id])
        users[col] = arr
    if not feature_names:
        raise DataValidationError(uf, message="no numeric feature columns")

    index = pd.Index(_id_key(users[spec.id]))
    links = None
    if spec.links:
        links_path = _resolve(root, spec.links)
        if links_path is not None:
            links = _validate_links(read_table(links_path), spec, links_path.name, index)
    truth = segments = None
    if with_truth and spec.truth:
        truth_path = _resolve(root, spec.truth)
        if truth_path is not None:
            truth = _validate_truth(read_table(truth_path), truth_path.name, index)
    if with_truth and spec.segments:
        seg_path = _resolve(root, spec.segments)
        if seg_path is not None:
            segments = read_table(seg_path)

    ds = Dataset(spec, root, users, feature_names, links, truth, segments)
    ds.stats = {
        "users": ds.n_users,
        "features": len(feature_names),
        "labeled": int(np.isfinite(ds.outcome).sum()),
        "default_rate": float(np.nanmean(ds.outcome)) if np.isfinite(ds.outcome).any() else None,
        "zero_limit_share": float((ds.treatment == 0).mean()),
        "missing_share": float(np.isnan(ds.feature_matrix()).mean()),
        "links": 0 if links is None else len(links),
        "truth_rows": 0 if truth is None else len(truth),
    }
    log.info(
        "dataset %s: %d users, %d features, %d links%s",
        spec.name,
        ds.n_users,
        len(feature_names),
        ds.stats["links"],
        ", with truth" if truth is not None else "",
    )
    return ds


def _validate_users(raw: pd.DataFrame, spec: DatasetSpec, uf: str) -> pd.DataFrame:
    _require_columns(raw, uf, [spec.id, spec.time, spec.treatment, spec.outcome], "required")
    if isinstance(spec.features, list):
        _require_columns(raw, uf, list(spec.features), "dataset.yaml feature")
    absent = [c for c in spec.exclude if c not in raw.columns]
    if absent:
        raise DataValidationError(uf, absent[0], "dataset.yaml 'exclude' names an absent column")

    ids = raw[spec.id]
    if pd.api.types.is_float_dtype(ids) or pd.api.types.is_bool_dtype(ids):
        bad = ~np.isfinite(ids.to_numpy(dtype=float)) | (ids.to_numpy(dtype=float) % 1 != 0)
        if bad.any():
            _fail(uf, spec.id, "ids must be integers or strings", bad, ids)
    null = ids.isna().to_numpy()
    if null.any():
        _fail(uf, spec.id, "missing id", null, ids)
    key = _id_key(ids)
    dup = key.duplicated(keep=False).to_numpy()
    if dup.any():
        _fail(uf, spec.id, "duplicate user ids", dup, ids)

    as_of = _times(raw, uf, spec.time)
    t = _numeric(raw, uf, spec.treatment, allow_bool=False).to_numpy()
    bad = ~np.isfinite(t)
    if bad.any():
        _fail(
            uf,
            spec.treatment,
            "limits must be finite numbers (no null, NaN or inf)",
            bad,
            raw[spec.treatment],
        )
    neg = t < 0
    if neg.any():
        _fail(uf, spec.treatment, "limits must be >= 0", neg, raw[spec.treatment])

    y = _numeric(raw, uf, spec.outcome).to_numpy()
    bad = ~(np.isnan(y) | (y == 0) | (y == 1))
    if bad.any():
        _fail(uf, spec.outcome, "outcome must be 0, 1 or null", bad, raw[spec.outcome])

    return pd.DataFrame(
        {spec.id: key.to_numpy(), "as_of": as_of.to_numpy(), "treatment": t, "outcome": y}
    )


def _feature_columns(raw: pd.DataFrame, spec: DatasetSpec, uf: str) -> list[str]:
    if isinstance(spec.features, list):
        return list(spec.features)
    return [
        c
        for c in raw.columns
        if c not in spec.reserved
        and (pd.api.types.is_numeric_dtype(raw[c]) or pd.api.types.is_bool_dtype(raw[c]))
    ]


def _validate_links(raw: pd.DataFrame, spec: DatasetSpec, lf: str, index: pd.Index) -> pd.DataFrame:
    _require_columns(raw, lf, list(LINK_COLUMNS), "required")
    uid = raw["user_id"]
    null = uid.isna().to_numpy()
    if null.any():
        _fail(lf, "user_id", "missing user_id", null, uid)
    pos = index.get_indexer(_id_key(uid))
    unknown = pos < 0
    if unknown.any():
        _fail(lf, "user_id", "links to users not in the users table", unknown, uid)
    etype = raw["entity_type"].astype(str)
    if spec.entities:
        bad = ~etype.isin(list(spec.entities)).to_numpy()
        if bad.any():
            _fail(
                lf,
                "entity_type",
                f"entity type not declared in dataset.yaml 'entities' ({sorted(spec.entities)})",
                bad,
                etype,
            )
    eid = raw["entity_id"]
    null = eid.isna().to_numpy()
    if null.any():
        _fail(lf, "entity_id", "missing entity_id", null, eid)
    ts = _times(raw, lf, "ts")
    return pd.DataFrame(
        {
            "user_idx": pos.astype(np.int64),
            "entity_type": etype.to_numpy(),
            "entity_id": eid.to_numpy(),
            "ts_days": to_days(ts),
        }
    )


def _validate_truth(raw: pd.DataFrame, tf: str, index: pd.Index) -> pd.DataFrame:
    _require_columns(raw, tf, list(TRUTH_COLUMNS), "required")
    pos = index.get_indexer(_id_key(raw["user_id"]))
    unknown = pos < 0
    if unknown.any():
        _fail(tf, "user_id", "truth for users not in the users table", unknown, raw["user_id"])
    limit = _numeric(raw, tf, "limit").to_numpy()
    bad = ~np.isfinite(limit) | (limit < 0)
    if bad.any():
        _fail(tf, "limit", "grid limits must be finite and >= 0", bad, raw["limit"])
    p = _numeric(raw, tf, "p_default").to_numpy()
    bad = ~(np.isfinite(p) & (p >= 0) & (p <= 1))
    if bad.any():
        _fail(tf, "p_default", "probabilities must be in [0, 1]", bad, raw["p_default"])
    return pd.DataFrame({"user_idx": pos.astype(np.int64), "limit": limit, "p_default": p})
