"""Reading a dataset directory and checking it against the contract.

Every command that reads a dataset calls :func:`load_dataset`; it raises
:class:`~creditgraph.data.errors.DataValidationError` on the first broken rule, before anything
is written anywhere. Suspicious but legal input (a text column skipped under ``features: all``,
undeclared entity types...) is kept in ``Dataset.warnings`` and logged.

Reading picks its engine per table (:func:`choose_engine`): small local tables are read with
pyarrow in this process (no Ray); large ones (``CREDITGRAPH_RAY_READ_MIN_BYTES``, default
256 MiB), remote URIs and reads while connected to a multi-node Ray cluster go through Ray Data.

Times: a timestamp column is used as it is; a column of strings is parsed with ONE format, the
declared ``time_format`` or one inferred from all its values (ISO 8601 counts as one format;
day/month order is decided for the whole column, never row by row, and refused when the values
cannot tell). A column is all time-zone-aware (converted to UTC) or all naive (taken as UTC);
times later than the horizon (``reference_time``, else the current time + 1 day) are refused.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd

from creditgraph.data.errors import DataValidationError, describe
from creditgraph.data.spec import LINK_COLUMNS, TRUTH_COLUMNS, DatasetSpec, EntityType
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

EPOCH = pd.Timestamp("1970-01-01")
MAX_EXAMPLES = 5
TIME_UNIT = "datetime64[us]"
HORIZON_TOLERANCE = pd.Timedelta(days=1)
RAY_READ_MIN_BYTES_ENV = "CREDITGRAPH_RAY_READ_MIN_BYTES"
DEFAULT_RAY_READ_MIN_BYTES = 256 * 2**20
PROGRESS_MIN_ROWS = 50_000

Engine = Literal["auto", "arrow", "ray"]
ENGINES = ("auto", "arrow", "ray")

# names that stand for a role elsewhere (the contract's default role columns, the columns of
# truth and links, the canonical columns of the graph files): a feature so named is kept apart
# from the role, but it may be a second copy of a label, a limit or a time
ROLE_LIKE_NAMES = frozenset(
    {"user_id", "user_idx", "as_of", "t_days", "ts", "ts_days", "credit_limit", "treatment"}
    | {"limit", "default", "outcome", "p_default"}
)

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# a clock time followed by a zone: Z, UTC/GMT or a +hh[:mm] offset
_AWARE = r"\d:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:[Zz]|UTC|GMT|[+-]\d{2}(?::?\d{2})?)$"


@dataclass
class Dataset:
    """A validated dataset in canonical form.

    ``features`` holds only the feature columns (float64, NaN = missing) under their dataset
    names, in file order; the roles live apart from it so a feature can never stand in for one:
    ``ids`` (int64 or str), ``as_of`` (naive UTC ``datetime64``), ``treatment`` and ``outcome``
    (float64, NaN = unlabeled), one entry per user in the same order. ``links`` has ``user_idx``
    (user position), ``entity_type``, ``entity_id`` and ``ts_days`` (float days since 1970, as
    ``t_days`` is for ``as_of``).
    """

    spec: DatasetSpec
    root: Path
    ids: np.ndarray
    as_of: np.ndarray
    treatment: np.ndarray
    outcome: np.ndarray
    features: pd.DataFrame
    links: pd.DataFrame | None = None
    truth: pd.DataFrame | None = None
    segments: pd.DataFrame | None = None
    stats: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def n_users(self) -> int:
        return len(self.ids)

    @property
    def feature_names(self) -> list[str]:
        return [str(c) for c in self.features.columns]

    @property
    def t_days(self) -> np.ndarray:
        return to_days(self.as_of)

    def feature_matrix(self) -> np.ndarray:
        """Raw feature values, ``float64[n_users, n_features]``, NaN where missing."""
        return self.features.to_numpy(dtype=np.float64)


def to_days(times: pd.Series | pd.DatetimeIndex | np.ndarray) -> np.ndarray:
    """Datetimes (any resolution) to float days since 1970."""
    return np.asarray((pd.DatetimeIndex(times) - EPOCH) / pd.Timedelta(days=1), dtype=np.float64)


# --------------------------------------------------------------------------------------- reading


def is_uri(path: str | Path) -> bool:
    """Whether ``path`` names a remote location (``s3://``, ``gs://``...)."""
    return bool(_URI.match(str(path)))


def ray_read_min_bytes() -> int:
    """Size from which a local table is read through Ray Data (env ``CREDITGRAPH_RAY_READ_MIN_BYTES``)."""
    raw = os.environ.get(RAY_READ_MIN_BYTES_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_RAY_READ_MIN_BYTES
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"{RAY_READ_MIN_BYTES_ENV}={raw!r}: expected a number of bytes >= 0")
    return int(value)


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    # the names pyarrow and Ray skip too: hidden files and markers such as _SUCCESS
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part[:1] in "._" for part in p.relative_to(path).parts)
    )


def table_bytes(path: str | Path) -> int:
    """Total size of a local table's files (one parquet file or a folder of parts)."""
    return sum(p.stat().st_size for p in _parquet_files(Path(path)))


def _ray_nodes_alive() -> int:
    ray = sys.modules.get("ray")  # never import (or start) Ray just to ask
    if ray is None or not ray.is_initialized():
        return 0
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def choose_engine(path: str | Path, engine: Engine = "auto") -> Literal["arrow", "ray"]:
    """The engine a table is read with: ``engine`` itself unless it is ``"auto"``.

    ``auto``: Ray Data for remote URIs, while connected to a Ray cluster of more than one node,
    or for local tables of at least :func:`ray_read_min_bytes`; pyarrow otherwise.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine != "auto":
        return engine
    if is_uri(path) or _ray_nodes_alive() > 1:
        return "ray"
    return "ray" if table_bytes(path) >= ray_read_min_bytes() else "arrow"


def _schemas(files: list[Path], name: str) -> list:
    import pyarrow.parquet as pq

    out = []
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception as exc:
            raise DataValidationError(
                str(f), message=f"cannot be read as parquet: {describe(exc)}"
            ) from exc
        seen: dict[str, int] = {}
        for col in schema.names:
            seen[col] = seen.get(col, 0) + 1
        dup = [c for c, k in seen.items() if k > 1]
        if dup:
            where = name if f.name == name else f"{name} ({f.name})"
            raise DataValidationError(
                where, dup[0], f"duplicate column names {dup}: each column name must appear once"
            )
        out.append(schema)
    return out


def _read_arrow(path: str | Path, files: list[Path], schemas: list) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    if is_uri(path):
        return pq.read_table(str(path)).to_pandas()
    try:
        # parts may differ (a column absent from some, int32 in one and int64 in another)
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataValidationError(
            Path(path).name, message=f"parts disagree on column types: {describe(exc)}"
        ) from exc
    table = pads.dataset([str(f) for f in files], schema=schema, format="parquet").to_table()
    return table.to_pandas()


def _ensure_ray() -> None:
    from creditgraph.utils.runtime import require_ray

    require_ray(f"reading tables from {ray_read_min_bytes():,} bytes with Ray Data")


def reads_with_ray(root: str | Path) -> bool:
    """Whether :func:`load_dataset` (engine ``auto``) reads any table of ``root`` with Ray Data:
    an entry point that may run without Ray (``creditgraph validate``) starts it only then."""
    root = Path(root)
    try:
        spec = DatasetSpec.load(root)
    except Exception:
        return False  # load_dataset reports it, without Ray
    names = [spec.users, spec.links, spec.truth, spec.segments]
    if spec.family == "orders" and spec.orders is not None:
        names += [spec.orders.table, spec.orders.links]
    paths = [_resolve(root, n) for n in names if n]
    return any(p is not None and choose_engine(p) == "ray" for p in paths)


def _read_ray(path: str | Path) -> pd.DataFrame:
    import ray.data

    return ray.data.read_parquet(str(path)).to_pandas()


def read_table(path: str | Path, engine: Engine = "auto") -> pd.DataFrame:
    """Read one parquet file or a folder of parquet parts (engine: see :func:`choose_engine`).

    Duplicate column names and unreadable files are one-line ``DataValidationError`` s.
    """
    files: list[Path] = []
    schemas: list = []
    if not is_uri(path):
        files = _parquet_files(Path(path))
        if not files:
            raise DataValidationError(str(path), message="folder holds no parquet files")
        schemas = _schemas(files, Path(path).name)  # before any engine trips over them
    chosen = choose_engine(path, engine)
    if chosen == "ray":
        _ensure_ray()
    try:
        if chosen == "arrow":
            return _read_arrow(path, files, schemas)
        return _read_ray(path)
    except DataValidationError:
        raise
    except Exception as exc:
        raise DataValidationError(
            str(path), message=f"cannot be read as parquet: {describe(exc)}"
        ) from exc


def _count_rows(path: Path) -> int | None:
    import pyarrow.parquet as pq

    if is_uri(path):
        return None
    try:
        return sum(pq.read_metadata(f).num_rows for f in _parquet_files(path))
    except Exception:
        return None  # reading will say what is wrong with the file


def _resolve(root: Path, name: str) -> Path | None:
    p = root / name
    if p.exists():
        return p
    stem = root / Path(name).stem  # users.parquet -> users/ (a directory of parts)
    return stem if stem.is_dir() else None


def _absent_table(root: Path, spec: DatasetSpec, role: str, name: str, notes: list[str]) -> None:
    """A table that is not there. Links shape every user's inputs: one that dataset.yaml names
    must exist, and a default one that is absent is named in a warning. An evaluation table
    (truth, segments) is optional unless dataset.yaml names it; then its absence is a warning."""
    named = role in spec.model_fields_set
    if role == "links" and named:
        raise DataValidationError(
            str(root / name),
            message="links table named in dataset.yaml not found "
            "(write 'links: null' there for a dataset without links)",
        )
    if role == "links":
        notes.append(
            f"{name}: no links table, so the users have no graph edges "
            "(write 'links: null' in dataset.yaml to say so)"
        )
    elif named:
        notes.append(f"{name}: {role} table named in dataset.yaml not found: read without it")


# ------------------------------------------------------------------------------------- checking


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
        if df.shape[1] == 0:
            raise DataValidationError(
                file, message=f"table has {len(df)} rows and no columns (needs {cols})"
            )
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


def _bounded(arr: np.ndarray, file: str, col: str, bound: float, show: pd.Series) -> None:
    with np.errstate(invalid="ignore"):
        big = np.abs(arr) > bound
    if big.any():
        _fail(
            file,
            col,
            f"values beyond +-{bound:g} (dataset.yaml max_abs_value): refused as absurd",
            big,
            show,
        )


class Horizon(NamedTuple):
    """The latest time a dataset may contain, and where that limit comes from."""

    time: pd.Timestamp
    source: str


def horizon_of(spec: DatasetSpec, now: pd.Timestamp | None = None) -> Horizon:
    """``reference_time`` of ``dataset.yaml`` if set, else the current time + 1 day (naive UTC)."""
    if spec.reference_time is not None:
        return Horizon(pd.Timestamp(spec.reference_time), "reference_time in dataset.yaml")
    now = now if now is not None else pd.Timestamp.now(tz="UTC").tz_localize(None)
    return Horizon(
        now + HORIZON_TOLERANCE,
        "the current time + 1 day; set reference_time in dataset.yaml for other data",
    )


def _as_utc(t: pd.Series) -> pd.Series:
    if getattr(t.dt, "tz", None) is not None:
        t = t.dt.tz_convert("UTC").dt.tz_localize(None)
    return t


def _candidate_formats(text: pd.Series, found: list[str] | None = None) -> list[str]:
    """Formats guessed from a sample of the values (both day/month orders), added to ``found``."""
    from pandas.tseries.api import guess_datetime_format

    uniq = pd.unique(text.to_numpy())
    sample = list(uniq[:20]) + list(uniq[:: max(1, len(uniq) // 100)][:100])
    found = list(found or [])
    for value in sample:
        for dayfirst in (False, True):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fmt = guess_datetime_format(str(value), dayfirst=dayfirst)
            if fmt is None:
                continue
            options = [fmt]
            if "%d" in fmt and "%m" in fmt:
                options.append(fmt.replace("%d", "\0").replace("%m", "%d").replace("\0", "%m"))
            for f in options:
                # year first is ISO 8601's order (yyyy-mm-dd), never yyyy-dd-mm
                if f.startswith("%Y-%d-%m"):
                    continue
                f = "ISO8601" if f.startswith("%Y-%m-%d") else f
                if f not in found:
                    found.append(f)
    return found


def _parse(text: pd.Series, fmt: str) -> pd.Series:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = pd.to_datetime(text, format=fmt, errors="coerce", utc=True)
    return t.dt.tz_localize(None)


def _parse_strings(s: pd.Series, file: str, col: str, fmt: str | None) -> pd.Series:
    text = s.astype(str).str.strip()
    aware = text.str.contains(_AWARE, regex=True).to_numpy(dtype=bool)
    if aware.any() and not aware.all():
        n_aware = int(aware.sum())
        minority = aware if n_aware <= len(aware) - n_aware else ~aware
        _fail(
            file,
            col,
            f"mixes time-zone-aware and naive times ({n_aware} aware, {len(aware) - n_aware} "
            "naive): make the column all-naive (taken as UTC) or all-aware",
            minority,
            s,
        )
    candidates = [fmt] if fmt else _candidate_formats(text)
    parsed = {f: _parse(text, f) for f in candidates}
    ok = {f: p.notna().to_numpy() for f, p in parsed.items()}
    full = [f for f in candidates if ok[f].all()]
    if not full:
        if fmt:
            _fail(file, col, f"times do not match the declared time_format {fmt!r}", ~ok[fmt], s)
        any_ok = np.zeros(len(text), dtype=bool)
        for mask in ok.values():
            any_ok |= mask
        if not any_ok.all():  # formats the first sample missed: guess again from those rows
            candidates = _candidate_formats(text[~any_ok], candidates)
            for f in candidates[len(parsed) :]:
                parsed[f] = _parse(text, f)
                ok[f] = parsed[f].notna().to_numpy()
                any_ok |= ok[f]
        if not any_ok.all():
            _fail(file, col, "unparseable time (no date format fits)", ~any_ok, s)
        best = max(candidates, key=lambda f: int(ok[f].sum()))
        _fail(
            file,
            col,
            f"mixed date formats: these rows do not parse as {best!r}, the format of most rows "
            "(one format per column; declare it with time_format in dataset.yaml)",
            ~ok[best],
            s,
        )
    chosen = parsed[full[0]]
    for other in full[1:]:
        differ = (parsed[other] != chosen).to_numpy()
        if differ.any():
            _fail(
                file,
                col,
                f"ambiguous day/month order: every value parses both as {full[0]!r} and as "
                f"{other!r}; declare the format with time_format in dataset.yaml",
                differ,
                s,
            )
    return chosen


def _times(
    df: pd.DataFrame,
    file: str,
    col: str,
    fmt: str | None,
    horizon: Horizon,
    notes: list[str],
) -> np.ndarray:
    """A time column as naive UTC ``datetime64[us]`` (see the module docstring for the rules)."""
    s = df[col]
    null = s.isna().to_numpy()
    if null.any():
        _fail(file, col, "missing time", null, s)
    if pd.api.types.is_datetime64_any_dtype(s):
        if fmt:
            notes.append(
                f"{file}, column {col!r}: holds timestamps, so time_format {fmt!r} is not used"
            )
        t = _as_utc(s)
    elif pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
        _fail(file, col, "must be a timestamp or a date string, found numbers", ~null, s)
    else:
        kind = pd.api.types.infer_dtype(s, skipna=True)
        if kind == "string":
            t = _parse_strings(s, file, col, fmt)
        elif kind == "date":
            t = pd.to_datetime(s)
        elif kind in ("datetime", "datetime64"):
            aware = s.map(lambda v: pd.Timestamp(v).tzinfo is not None).to_numpy(dtype=bool)
            if aware.any() and not aware.all():
                _fail(file, col, "mixes time-zone-aware and naive times", ~aware, s)
            t = pd.to_datetime(s, utc=True).dt.tz_localize(None)
        else:
            _fail(file, col, f"must be a timestamp or a date string, found {kind} values", ~null, s)
    out = t.to_numpy().astype(TIME_UNIT)
    late = out > horizon.time.to_datetime64()
    if late.any():
        _fail(
            file,
            col,
            f"time after the horizon {horizon.time.isoformat()} ({horizon.source})",
            late,
            s,
        )
    return out


def _id_key(s: pd.Series) -> pd.Series:
    """Ids compared as int64 when integral, else as strings."""
    if pd.api.types.is_integer_dtype(s):
        return s.astype("int64")
    if pd.api.types.is_float_dtype(s):
        f = s.to_numpy()
        if np.all(np.isfinite(f)) and np.all(f == np.round(f)):
            return s.astype("int64")
    return s.astype(str)


def _same_id_type(key: pd.Series, raw: pd.Series, file: str, users_id: pd.Series, uf: str) -> None:
    """Integer ids in one table and strings in the other never match: say so, not 'unknown'."""
    if len(key) and pd.api.types.is_integer_dtype(key) != pd.api.types.is_integer_dtype(users_id):
        raise DataValidationError(
            file,
            "user_id",
            f"user ids are stored as {raw.dtype} here but as {users_id.dtype} in {uf}: "
            "store both with the same type",
        )


# ------------------------------------------------------------------------------------ the loader


def load_dataset(root: str | Path, *, with_truth: bool = True, engine: Engine = "auto") -> Dataset:
    """Load and validate a dataset directory (see MISSION.md, "The data contract").

    ``with_truth=False`` skips the evaluation-only tables (truth, segments) that building and
    scoring never read. ``engine`` reads every table with pyarrow (``"arrow"``), Ray Data
    (``"ray"``), or picks per table (``"auto"``, see :func:`choose_engine`).
    """
    from tqdm.auto import tqdm

    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(str(root), message="dataset directory not found")
    spec = DatasetSpec.load(root)
    horizon = horizon_of(spec)
    notes: list[str] = []

    users_path = _resolve(root, spec.users)
    if users_path is None:
        raise DataValidationError(str(root / spec.users), message="users table not found")
    tables: dict[str, Path] = {"users": users_path}
    for role, name in (("links", spec.links),) + (
        (("truth", spec.truth), ("segments", spec.segments)) if with_truth else ()
    ):
        path = _resolve(root, name) if name else None
        if path is not None:
            tables[role] = path
        elif name:
            _absent_table(root, spec, role, name, notes)
    n_rows = _count_rows(users_path)
    bar = tqdm(
        total=2 * len(tables),
        unit="step",
        leave=False,
        disable=n_rows is not None and n_rows < PROGRESS_MIN_ROWS,
    )

    def step(path: Path) -> None:
        bar.set_description(f"validate {path.name}")

    with bar:
        uf = users_path.name
        step(users_path)
        raw = read_table(users_path, engine)
        bar.update()
        ids, as_of, treatment, outcome = _validate_users(raw, spec, uf, horizon, notes)
        features = _features(raw, spec, uf, notes)
        bar.update()
        del raw

        links = truth = segments = None
        index = pd.Index(ids)
        if "links" in tables:
            path = tables["links"]
            step(path)
            raw_links = read_table(path, engine)
            bar.update()
            links = _validate_links(raw_links, spec, path.name, index, uf, horizon, notes)
            bar.update()
        if "truth" in tables:
            path = tables["truth"]
            step(path)
            raw_truth = read_table(path, engine)
            bar.update()
            truth = _validate_truth(raw_truth, path.name, index, uf)
            bar.update()
        if "segments" in tables:
            step(tables["segments"])
            segments = read_table(tables["segments"], engine)
            bar.update(2)

    for note in notes:
        log.warning("%s", note)
    ds = Dataset(
        spec,
        root,
        ids.to_numpy(),
        as_of,
        treatment,
        outcome,
        features,
        links,
        truth,
        segments,
        warnings=notes,
    )
    labeled = np.isfinite(outcome)
    ds.stats = {
        "users": ds.n_users,
        "features": len(ds.feature_names),
        "labeled": int(labeled.sum()),
        "default_rate": float(np.nanmean(outcome)) if labeled.any() else None,
        "zero_limit_share": float((treatment == 0).mean()),
        "missing_share": float(features.isna().to_numpy().mean()) if features.shape[1] else 0.0,
        "decision_time": pd.Timestamp(as_of.max()).isoformat(),
        "links": 0 if links is None else len(links),
        "truth_rows": 0 if truth is None else len(truth),
    }
    log.info(
        "dataset %s: %d users, %d features, %d links%s",
        spec.name,
        ds.n_users,
        len(ds.feature_names),
        ds.stats["links"],
        ", with truth" if truth is not None else "",
    )
    return ds


def _validate_users(
    raw: pd.DataFrame, spec: DatasetSpec, uf: str, horizon: Horizon, notes: list[str]
) -> tuple[pd.Series, np.ndarray, np.ndarray, np.ndarray]:
    """The users' roles: id keys, ``as_of``, treatment and outcome."""
    if len(raw) == 0:
        raise DataValidationError(uf, message="users table has 0 rows")
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
    key = _id_key(ids).reset_index(drop=True)
    dup = key.duplicated(keep=False).to_numpy()
    if dup.any():
        _fail(uf, spec.id, "duplicate user ids", dup, ids)

    as_of = _times(raw, uf, spec.time, spec.time_format.users, horizon, notes)
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
    _bounded(t, uf, spec.treatment, spec.max_abs_value, raw[spec.treatment])

    y = _numeric(raw, uf, spec.outcome).to_numpy()
    bad = ~(np.isnan(y) | (y == 0) | (y == 1))
    if bad.any():
        _fail(uf, spec.outcome, "outcome must be 0, 1 or null", bad, raw[spec.outcome])
    return key, as_of, t, y


def _features(raw: pd.DataFrame, spec: DatasetSpec, uf: str, notes: list[str]) -> pd.DataFrame:
    """The feature columns as float64 (NaN = missing), under their dataset names."""
    listed = isinstance(spec.features, list)
    if listed:
        names = list(spec.features)
    else:
        names = []
        for col in raw.columns:
            if col in spec.reserved:
                continue
            s = raw[col]
            kind = pd.api.types.infer_dtype(s, skipna=True)
            if kind == "empty":
                notes.append(f"{uf}, column {col!r}: every value is null: not a feature, dropped")
            elif (
                pd.api.types.is_numeric_dtype(s)
                or pd.api.types.is_bool_dtype(s)
                or kind in ("integer", "floating", "mixed-integer-float", "decimal", "boolean")
            ):
                names.append(col)
            else:
                notes.append(
                    f"{uf}, column {col!r}: {kind} values (dtype {s.dtype}) are not numeric: "
                    "not a feature, dropped (list it in 'exclude' to say so)"
                )
    out: dict[str, np.ndarray] = {}
    for col in names:
        vals = _numeric(raw, uf, col)
        arr = vals.to_numpy()
        if np.isnan(arr).all():
            if listed:
                raise DataValidationError(
                    uf,
                    col,
                    "listed in dataset.yaml 'features' but has no value in any row: "
                    "a feature never observed cannot be learned",
                )
            notes.append(f"{uf}, column {col!r}: every value is null: not a feature, dropped")
            continue
        inf = np.isinf(arr)
        if inf.any():
            _fail(uf, col, "infinite values (use null/NaN for missing)", inf, raw[spec.id])
        _bounded(arr, uf, col, spec.max_abs_value, raw[col])
        out[col] = arr
    if not out:
        raise DataValidationError(uf, message="no numeric feature columns")
    for col in (c for c in out if c in ROLE_LIKE_NAMES):
        notes.append(
            f"{uf}, column {col!r}: a feature named like a role (here the id, time, limit and "
            f"outcome are {spec.id!r}, {spec.time!r}, {spec.treatment!r}, {spec.outcome!r}): "
            "kept as a feature, never as the role; if it holds labels, limits or times, list "
            "it in 'exclude'"
        )
    return pd.DataFrame(out, copy=False)


def _validate_links(
    raw: pd.DataFrame,
    spec: DatasetSpec,
    lf: str,
    index: pd.Index,
    uf: str,
    horizon: Horizon,
    notes: list[str],
) -> pd.DataFrame:
    _require_columns(raw, lf, list(LINK_COLUMNS), "required")
    uid = raw["user_id"]
    null = uid.isna().to_numpy()
    if null.any():
        _fail(lf, "user_id", "missing user_id", null, uid)
    key = _id_key(uid)
    _same_id_type(key, uid, lf, index.to_series(), uf)
    pos = index.get_indexer(key)
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
    elif len(etype):
        d = EntityType()
        notes.append(
            f"{lf}, column 'entity_type': types {sorted(etype.unique())} are not declared in "
            f"dataset.yaml 'entities'; each gets the defaults weight={d.weight:g}, "
            f"max_degree={d.max_degree}, high_confidence={d.high_confidence}"
        )
    eid = raw["entity_id"]
    null = eid.isna().to_numpy()
    if null.any():
        _fail(lf, "entity_id", "missing entity_id", null, eid)
    ts = _times(raw, lf, "ts", spec.time_format.links, horizon, notes)
    return pd.DataFrame(
        {
            "user_idx": pos.astype(np.int64),
            "entity_type": etype.to_numpy(),
            "entity_id": eid.to_numpy(),
            "ts_days": to_days(ts),
        }
    )


def _validate_truth(raw: pd.DataFrame, tf: str, index: pd.Index, uf: str) -> pd.DataFrame:
    _require_columns(raw, tf, list(TRUTH_COLUMNS), "required")
    key = _id_key(raw["user_id"])
    _same_id_type(key, raw["user_id"], tf, index.to_series(), uf)
    pos = index.get_indexer(key)
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
