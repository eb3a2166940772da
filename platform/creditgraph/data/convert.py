"""From a CSV to a dataset directory in the data contract (real data: no truth).

Two converters (see docs/data.md):

* :func:`convert_uci` — the UCI "default of credit card clients" file (Yeh & Lien, 2009): 30,000
  real credit-card holders, their real credit limit and whether they defaulted the next month.
* :func:`convert_csv` — any CSV with one row per user: an id, a limit, a 0/1 outcome and either
  a decision-time column or one decision date for every row.

Both check the input before writing and write the directory atomically; a CSV that breaks the
contract raises :class:`~creditgraph.data.errors.DataValidationError` naming the file, column and
rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from creditgraph.data.errors import DataValidationError
from creditgraph.data.spec import DatasetSpec
from creditgraph.utils.io import atomic_dir, write_json
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

MONTHS = ("sep", "aug", "jul", "jun", "may", "apr")  # X6..X11, X12..X17, X18..X23 run backwards
# readable names of the UCI covariates; the values (codes, NT$ amounts) are kept as they are
UCI_FEATURES: dict[str, str] = {
    "X2": "sex",
    "X3": "education",
    "X4": "marriage",
    "X5": "age",
    **{f"X{6 + i}": f"pay_status_{m}" for i, m in enumerate(MONTHS)},
    **{f"X{12 + i}": f"bill_amt_{m}" for i, m in enumerate(MONTHS)},
    **{f"X{18 + i}": f"pay_amt_{m}" for i, m in enumerate(MONTHS)},
}
UCI_ID, UCI_TREATMENT, UCI_OUTCOME = "ID", "X1", "Y"
UCI_COLUMNS = (UCI_ID, UCI_TREATMENT, *UCI_FEATURES, UCI_OUTCOME)
# the same file as distributed with descriptive headers (the original spreadsheet's second row)
UCI_ALIASES: dict[str, str] = {
    "LIMIT_BAL": "X1",
    "SEX": "X2",
    "EDUCATION": "X3",
    "MARRIAGE": "X4",
    "AGE": "X5",
    **{f"PAY_{k}": f"X{6 + i}" for i, k in enumerate((0, 2, 3, 4, 5, 6))},
    **{f"BILL_AMT{i + 1}": f"X{12 + i}" for i in range(6)},
    **{f"PAY_AMT{i + 1}": f"X{18 + i}" for i in range(6)},
    "default payment next month": "Y",
    "default.payment.next.month": "Y",
}
# the statements cover April..September 2005 and Y is the default in October: decide on Oct 1st
UCI_AS_OF = "2005-10-01"
UCI_CODES = {
    "sex": "1 male, 2 female",
    "education": "1 graduate school, 2 university, 3 high school, 4 others; 0, 5 and 6 are not "
    "documented by the source (kept as their own codes, not treated as missing)",
    "marriage": "1 married, 2 single, 3 others; 0 is not documented (kept as its own code)",
    "pay_status_*": "-2 no consumption, -1 paid in full, 0 revolving credit (minimum paid), "
    "1..9 months late (the source documents only -1 and 1..9; -2 and 0 are the usual reading)",
    "bill_amt_*": "statement balance in NT$ (negative = the holder is in credit)",
    "pay_amt_*": "amount paid in that month in NT$",
}


def is_uci_layout(columns: Sequence[str]) -> bool:
    """Whether a CSV header is the UCI credit-default layout (X-names or descriptive names)."""
    cols = {str(c).strip() for c in columns}
    if set(UCI_COLUMNS) <= cols:
        return True
    named = {k for k, v in UCI_ALIASES.items() if v != UCI_OUTCOME}
    outcome = {k for k, v in UCI_ALIASES.items() if v == UCI_OUTCOME}
    return UCI_ID in cols and named <= cols and bool(outcome & cols)


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a CSV file, or raise a :class:`DataValidationError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(str(path), message="file not found")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataValidationError(str(path), message=f"cannot be read as CSV: {exc}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    dup = df.columns[df.columns.duplicated()].tolist()
    if dup:
        raise DataValidationError(str(path), dup[0], "column name appears twice in the header")
    return df


def read_uci(path: str | Path) -> pd.DataFrame:
    """The UCI file with its X-named columns (``ID, X1..X23, Y``), checked.

    Accepts both published headers (``X1..X23, Y`` and ``LIMIT_BAL, SEX, ... PAY_AMT6``). Raises a
    :class:`DataValidationError` naming the file and the first missing or broken column.
    """
    df = read_csv(path)
    if "LIMIT_BAL" in df.columns:  # the descriptive header
        df = df.rename(columns=UCI_ALIASES)
    missing = [c for c in UCI_COLUMNS if c not in df.columns]
    if missing:
        raise DataValidationError(
            str(path),
            missing[0],
            f"not the UCI credit-default layout: column(s) {missing[:5]} not found (expected "
            f"{UCI_ID}, {UCI_TREATMENT}..X23, {UCI_OUTCOME}); for another CSV use "
            "'creditgraph convert csv'",
        )
    df = df[list(UCI_COLUMNS)]
    for col in UCI_COLUMNS:
        _check_numeric(df, str(path), col)
    _check_ids(df, str(path), UCI_ID)
    _check_limits(df, str(path), UCI_TREATMENT)
    y = df[UCI_OUTCOME].to_numpy(dtype=float)
    _bad(str(path), UCI_OUTCOME, "outcome must be 0 or 1", ~np.isin(y, (0.0, 1.0)), df)
    return df


def _bad(file: str, col: str, message: str, mask: np.ndarray, df: pd.DataFrame) -> None:
    if mask.any():
        rows = np.flatnonzero(mask)[:5]
        raise DataValidationError(
            file,
            col,
            message,
            rows=rows.tolist(),
            examples=[repr(df[col].iloc[r]) for r in rows],
            count=int(mask.sum()),
        )


def _check_numeric(df: pd.DataFrame, file: str, col: str) -> None:
    s = df[col]
    if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
        parsed = pd.to_numeric(s, errors="coerce")
        _bad(
            file,
            col,
            f"must be numeric (dtype {s.dtype})",
            (parsed.isna() & s.notna()).to_numpy(),
            df,
        )
    vals = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float)
    _bad(file, col, "infinite values", np.isinf(vals), df)


def _check_ids(df: pd.DataFrame, file: str, col: str) -> None:
    s = df[col]
    _bad(file, col, "missing id", s.isna().to_numpy(), df)
    _bad(file, col, "duplicate ids", s.duplicated(keep=False).to_numpy(), df)


def _check_limits(df: pd.DataFrame, file: str, col: str) -> None:
    t = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)
    _bad(file, col, "limits must be finite numbers (no null, NaN or inf)", ~np.isfinite(t), df)
    _bad(file, col, "limits must be >= 0", t < 0, df)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write(out: Path, users: pd.DataFrame, spec: DatasetSpec, meta: dict, source: Path) -> dict:
    """Write the directory atomically, once the contract's own loader accepted it; its stats."""
    from creditgraph.data.load import load_dataset

    with atomic_dir(out) as tmp:
        pq.write_table(pa.Table.from_pandas(users, preserve_index=False), tmp / spec.users)
        spec.dump(tmp)
        try:
            stats = load_dataset(tmp, with_truth=False).stats
        except DataValidationError as exc:  # name the CSV the user gave, not our temporary file
            if exc.file != spec.users:
                raise
            raise DataValidationError(
                str(source),
                exc.column,
                exc.message,
                rows=exc.rows,
                examples=exc.examples,
                count=exc.count,
            ) from exc
        write_json(tmp / "conversion.json", meta)
    return stats


def convert_uci(path: str | Path, out: str | Path, *, as_of: str = UCI_AS_OF) -> dict:
    """Write the UCI credit-default CSV as a dataset directory (no links, no truth).

    ``user_id`` = ID, ``credit_limit`` = X1 (NT$), ``default`` = Y, 22 features with readable
    names (codes kept), ``as_of`` = ``as_of`` for every row (the file has no dates).
    """
    path, out = Path(path), Path(out)
    df = read_uci(path)
    as_of_ts = _parse_date(as_of, "--as-of")
    users = pd.DataFrame({"user_id": df[UCI_ID].to_numpy(dtype=np.int64)})
    users["as_of"] = np.full(len(df), as_of_ts.to_datetime64()).astype("datetime64[ms]")
    for x, name in UCI_FEATURES.items():
        users[name] = df[x].to_numpy()
    users["credit_limit"] = df[UCI_TREATMENT].to_numpy(dtype=np.float64)
    users["default"] = df[UCI_OUTCOME].to_numpy(dtype=np.float64)
    spec = DatasetSpec(
        name="uci-taiwan-credit-default",
        id="user_id",
        time="as_of",
        treatment="credit_limit",
        outcome="default",
        features=list(UCI_FEATURES.values()),
        links=None,
        truth=None,
    )
    meta = {
        "source": path.name,
        "sha256": file_sha256(path),
        "format": "uci-credit-default",
        "rows": len(users),
        "columns": {
            UCI_ID: "user_id",
            UCI_TREATMENT: "credit_limit",
            UCI_OUTCOME: "default",
            **UCI_FEATURES,
        },
        "codes": UCI_CODES,
        "as_of": str(as_of_ts.date()),
        "notes": [
            "as_of is the same fixed date for every row: the file has no dates; the statements "
            "cover April..September 2005 and the outcome is the October 2005 payment",
            "no links: the file has no devices, phones or addresses, so the graph is empty and "
            "the model runs tabular",
            "no truth: real data, the counterfactual risk curves are unknown",
        ],
    }
    _write(out, users, spec, meta, path)
    summary = {
        "out": str(out),
        "users": len(users),
        "features": len(UCI_FEATURES),
        "default_rate": float(users["default"].mean()),
        "as_of": meta["as_of"],
    }
    log.info("converted %s users of %s into %s", f"{len(users):,}", path.name, out)
    return summary


def _parse_date(value: str, what: str) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what} {value!r} is not a date: {exc}") from exc
    if ts.tzinfo is not None:
        ts = ts.tz_convert("UTC").tz_localize(None)
    return ts


def convert_csv(
    path: str | Path,
    out: str | Path,
    *,
    id: str,
    treatment: str,
    outcome: str,
    time: str | None = None,
    as_of: str | None = None,
    features: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    name: str | None = None,
) -> dict:
    """Write any one-row-per-user CSV as a dataset directory (no links, no truth).

    Columns keep their names; ``time`` names the decision-time column, or ``as_of`` gives one date
    for every row (written as an ``as_of`` column). ``features`` defaults to every other numeric
    column except ``exclude``. The table is validated against the contract before anything is
    written.
    """
    path, out = Path(path), Path(out)
    if (time is None) == (as_of is None):
        raise ValueError("give exactly one of --time COL (a column) or --as-of DATE (every row)")
    df = read_csv(path)
    file = str(path)
    named = [id, treatment, outcome, *(features or []), *exclude] + ([time] if time else [])
    for col in named:
        if col not in df.columns:
            raise DataValidationError(
                file, col, f"column not found; present: {sorted(df.columns)[:20]}"
            )
    if as_of is not None:
        time = "as_of"
        if time in df.columns:
            raise DataValidationError(
                file, time, "--as-of would overwrite this column; use --time as_of instead"
            )
        df[time] = np.full(len(df), _parse_date(as_of, "--as-of").to_datetime64()).astype(
            "datetime64[ms]"
        )
    spec = DatasetSpec(
        name=name or path.stem,
        id=id,
        time=time,
        treatment=treatment,
        outcome=outcome,
        features=list(features) if features else "all",
        exclude=list(exclude),
        links=None,
        truth=None,
    )
    meta = {
        "source": path.name,
        "sha256": file_sha256(path),
        "format": "csv",
        "rows": len(df),
        "notes": ["no links and no truth: a tabular dataset of real decisions"]
        + ([f"as_of = {as_of} for every row (the file has no decision times)"] if as_of else []),
    }
    stats = _write(out, df, spec, meta, path)
    keys = ("users", "features", "labeled", "default_rate", "zero_limit_share", "missing_share")
    return {"out": str(out), **{k: stats.get(k) for k in keys}}
