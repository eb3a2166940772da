"""The corpus of bad inputs: every defect of the data contract and of the data-integrity work,
through ``creditgraph validate`` and through batch scoring on the session's tiny trained run.

One table, ``DEFECTS``: each entry corrupts a copy of a small simulated dataset and says what each
stage must do with it: refuse it (one-line error naming file and column, exit 2, nothing written,
the trained run untouched) or accept it with a warning that names the column. A few entries are
legal look-alikes of defects (unusual column names) that must be accepted as they are. The module
ends by printing the tally ("N defects tried: ..."); ``benchmarks/bench_corpus.py`` runs it and
writes that tally into BENCHMARKS.md (it sets ``CREDITGRAPH_CORPUS_TALLY`` to a JSON path).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from creditgraph.cli import app
from creditgraph.data.errors import DataValidationError
from creditgraph.data.load import load_dataset
from creditgraph.data.simulate import SimulationConfig, simulate_to_dir
from test_contract import _edit, _edit_yaml
from test_integrity import UNUSUAL, _users, _write_users

TALLY_ENV = "CREDITGRAPH_CORPUS_TALLY"
runner = CliRunner()


# ------------------------------------------------------------------------- what a stage must do


@dataclass(frozen=True)
class Refused:
    """A one-line ``DataValidationError`` (a ``ValueError`` for a model/data mismatch) whose file
    ends with ``file``, whose column is ``column`` and whose message says ``phrase``."""

    file: str
    column: str | None
    phrase: str


@dataclass(frozen=True)
class Warned:
    """Accepted, with a warning naming ``name`` (a column, quoted; or a file) saying ``phrase``."""

    name: str
    phrase: str
    is_column: bool = True

    @property
    def token(self) -> str:
        return repr(self.name) if self.is_column else self.name


@dataclass(frozen=True)
class Accepted:
    """Valid as it is: no error, no warning; the dataset has ``features_delta`` more features
    than the clean one."""

    features_delta: int = 0


UNREAD = "unread"  # scoring never reads that table (truth, segments: evaluation only)

Expect = Refused | Warned | Accepted


@dataclass(frozen=True)
class Defect:
    """One bad input: how to make it, and what ``validate`` and scoring must do with it."""

    name: str
    corrupt: Callable[[Path], None]
    validate: Expect
    score: Expect | str | None = None  # None: the same as ``validate``
    full_score: bool = False  # a warning case scored end to end (each costs ~30 s)

    @property
    def at_score(self) -> Expect | str:
        return self.validate if self.score is None else self.score


# ------------------------------------------------------------------------------- corruptions


def users(fn: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    return lambda d: _edit(d, "users", fn)


def links(fn: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    return lambda d: _edit(d, "links", fn)


def truth(fn: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    return lambda d: _edit(d, "truth", fn)


def first(col: str, value) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """Row 0 of ``col`` set to ``value``."""

    def fn(df: pd.DataFrame) -> pd.DataFrame:
        s = df[col]
        if isinstance(value, str):
            s = s.astype(str)
        elif isinstance(value, float) and pd.api.types.is_integer_dtype(s):
            s = s.astype(np.float64)
        s = s.copy()
        s.iloc[0] = value
        return df.assign(**{col: s})

    return fn


def yaml_set(**changes) -> Callable[[Path], None]:
    return lambda d: _edit_yaml(d, **changes)


def write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def fn(d: Path) -> None:
        path = d / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)

    return fn


def remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def users_folder_without_parts(d: Path) -> None:
    (d / "users.parquet").unlink()
    (d / "users").mkdir()
    (d / "users" / "_SUCCESS").write_text("")


def append_column(name: str, column: Callable[[pa.Table], pa.Array]) -> Callable[[Path], None]:
    """A column appended with pyarrow (so its name may repeat, its type may be null)."""

    def fn(d: Path) -> None:
        table = pq.read_table(d / "users.parquet")
        pq.write_table(table.append_column(name, column(table)), d / "users.parquet")

    return fn


def time_text(table: str, col: str, fmt: str, rows=None, value: str | None = None, fix=None):
    """The time column ``col`` as strings in ``fmt``; ``rows`` of it replaced by ``value`` (or by
    ``fix(times, text)``)."""

    def fn(d: Path) -> None:
        df = pd.read_parquet(d / f"{table}.parquet")
        t = pd.Series(df[col]).dt.floor("s")
        text = t.dt.strftime(fmt)
        if fix is not None:
            text = fix(t, text)
        elif rows is not None:
            text.iloc[rows] = value
        df[col] = text
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), d / f"{table}.parquet")

    return fn


def day_first_rows(t: pd.Series, text: pd.Series) -> pd.Series:
    odd = np.flatnonzero((t.dt.day > 12).to_numpy())[:10]
    text.iloc[odd] = t.iloc[odd].dt.strftime("%d/%m/%Y %H:%M:%S")
    return text


def aware_rows(t: pd.Series, text: pd.Series) -> pd.Series:
    text.iloc[[4, 9, 20]] = text.iloc[[4, 9, 20]] + "+08:00"
    return text


def ambiguous_day_month(d: Path) -> None:
    df = _users(d)
    t = pd.Series(df["as_of"]).dt.floor("D")
    t = pd.to_datetime(
        pd.DataFrame({"year": t.dt.year, "month": t.dt.month, "day": (t.dt.day - 1) % 12 + 1})
    )
    df["as_of"] = t.dt.strftime("%d/%m/%Y")
    _write_users(d, df)


def declared_format_mismatch(d: Path) -> None:
    time_text("users", "as_of", "%Y-%m-%d %H:%M:%S")(d)
    _edit_yaml(d, time_format={"users": "%d/%m/%Y %H:%M:%S"})


def timestamps(table: str, col: str, value: pd.Timestamp) -> Callable[[Path], None]:
    """Rows 20..29 of a timestamp column set to ``value`` (millisecond unit: 9999 fits)."""

    def fn(d: Path) -> None:
        df = pd.read_parquet(d / f"{table}.parquet")
        t = pd.Series(df[col]).astype("datetime64[ms]")
        t.iloc[20:30] = value.as_unit("ms")
        df[col] = t
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), d / f"{table}.parquet")

    return fn


def huge(col: str, n: int) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def fn(df: pd.DataFrame) -> pd.DataFrame:
        arr = df[col].to_numpy(dtype=np.float64).copy()
        arr[:n] = 1e308
        return df.assign(**{col: arr})

    return fn


def role_named_feature(name: str) -> Callable[[Path], None]:
    """A feature column named like a role; where the name is the dataset's own time column, the
    time column is renamed first (as a user whose times are called ``event_time`` would have)."""

    def fn(d: Path) -> None:
        if name == "as_of":
            _edit(d, "users", lambda df: df.rename(columns={"as_of": "event_time"}))
            _edit_yaml(d, time="event_time")
        _edit(d, "users", lambda df: df.assign(**{name: np.full(len(df), 7.0)}))

    return fn


def listed_without_values(d: Path) -> None:
    _edit(d, "users", lambda df: df.assign(never_filled=np.nan))
    _edit_yaml(d, features=["gmv_90d", "never_filled"])


def text_column(d: Path) -> None:
    _edit(d, "users", lambda df: df.assign(region=np.where(np.arange(len(df)) % 2, "n", "s")))


def unusual_names(d: Path) -> None:
    _edit(
        d,
        "users",
        lambda df: df.assign(**{n: np.arange(len(df)) * (i + 1.0) for i, n in enumerate(UNUSUAL)}),
    )


U, L, T, Y = "users.parquet", "links.parquet", "truth.parquet", "dataset.yaml"
HORIZON = "after the horizon"
ABSENT = "feature columns of the model are absent"

DEFECTS: list[Defect] = [
    # --- files and dataset.yaml
    Defect("missing_dataset_yaml", remove(Y), Refused(Y, None, "not found")),
    Defect("missing_users_file", remove(U), Refused(U, None, "not found")),
    Defect("users_folder_without_parts", users_folder_without_parts, Refused("users", None, "no parquet files")),
    Defect("missing_links_file_named_in_yaml", remove(L), Refused(L, None, "not found")),
    Defect("missing_truth_file_named_in_yaml", remove(T), Warned(T, "not found", is_column=False), score=UNREAD),
    Defect("unreadable_users_file", write(U, b"not parquet at all" * 10), Refused(U, None, "cannot be read as parquet")),
    Defect("unreadable_links_file", write(L, b"PAR1 garbage" * 10), Refused(L, None, "cannot be read as parquet")),
    Defect("bad_yaml_syntax", write(Y, "features: [gmv_90d\nid: : :\n"), Refused(Y, None, "not valid YAML")),
    Defect("yaml_not_a_mapping", write(Y, "- users.parquet\n- links.parquet\n"), Refused(Y, None, "mapping")),
    Defect("yaml_unknown_key", yaml_set(treatmnet="credit_limit"), Refused(Y, "treatmnet", "not permitted")),
    Defect("yaml_bad_type", yaml_set(history_days="ninety"), Refused(Y, "history_days", "number")),
    Defect("yaml_feature_is_a_role", yaml_set(features=["gmv_90d", "default"]), Refused(Y, None, "may not include")),
    Defect("yaml_lists_absent_feature", yaml_set(features=["gmv_90d", "no_such_feature"]), Refused(U, "no_such_feature", "not found")),
    Defect("yaml_excludes_absent_column", yaml_set(exclude=["no_such_column"]), Refused(U, "no_such_column", "exclude")),
    Defect("empty_dataset_yaml", write(Y, ""), Warned("entity_type", "not declared"), full_score=True),
    # --- the users table: columns, ids, roles
    Defect("zero_row_users", users(lambda df: df.iloc[:0]), Refused(U, None, "users table has 0 rows")),
    Defect("missing_limit_column", users(lambda df: df.drop(columns=["credit_limit"])), Refused(U, "credit_limit", "not found")),
    Defect("missing_outcome_column", users(lambda df: df.drop(columns=["default"])), Refused(U, "default", "not found")),
    Defect("duplicate_column_names", append_column("gmv_90d", lambda t: t.column("gmv_90d")), Refused(U, "gmv_90d", "duplicate column names")),
    Defect("duplicate_user_ids", users(lambda df: df.assign(user_id=np.r_[df["user_id"].iloc[:-1], df["user_id"].iloc[0]])), Refused(U, "user_id", "duplicate user ids")),
    Defect("null_user_id", users(first("user_id", np.nan)), Refused(U, "user_id", "integers or strings")),
    Defect("limits_as_text", users(lambda df: df.assign(credit_limit=df["credit_limit"].astype(str))), Refused(U, "credit_limit", "numeric")),
    Defect("negative_limit", users(first("credit_limit", -5.0)), Refused(U, "credit_limit", ">= 0")),
    Defect("infinite_limit", users(first("credit_limit", np.inf)), Refused(U, "credit_limit", "finite")),
    Defect("null_limit", users(first("credit_limit", np.nan)), Refused(U, "credit_limit", "finite")),
    Defect("limit_1e308", users(first("credit_limit", 1e308)), Refused(U, "credit_limit", "max_abs_value")),
    Defect("outcome_outside_0_1", users(first("default", 2.0)), Refused(U, "default", "0, 1 or null")),
    # --- times
    Defect("unparseable_as_of", users(first("as_of", "not a date")), Refused(U, "as_of", "unparseable")),
    Defect("null_as_of", users(first("as_of", pd.NaT)), Refused(U, "as_of", "missing time")),
    Defect("as_of_as_numbers", users(lambda df: df.assign(as_of=df["as_of"].astype("int64"))), Refused(U, "as_of", "found numbers")),
    Defect("as_of_in_2099", time_text("users", "as_of", "%Y-%m-%d %H:%M:%S", range(20, 30), "2099-01-01 00:00:00"), Refused(U, "as_of", HORIZON)),
    Defect("as_of_in_9999", timestamps("users", "as_of", pd.Timestamp("9999-12-31")), Refused(U, "as_of", HORIZON)),
    Defect("day_first_rows_among_iso", time_text("users", "as_of", "%Y-%m-%d %H:%M:%S", fix=day_first_rows), Refused(U, "as_of", "mixed date formats")),
    Defect("ambiguous_day_month", ambiguous_day_month, Refused(U, "as_of", "ambiguous day/month")),
    Defect("declared_format_does_not_fit", declared_format_mismatch, Refused(U, "as_of", "declared time_format")),
    Defect("aware_times_among_naive", time_text("users", "as_of", "%Y-%m-%dT%H:%M:%S", fix=aware_rows), Refused(U, "as_of", "time-zone-aware and naive")),
    Defect("reference_time_before_data", yaml_set(reference_time="2025-06-01T00:00:00"), Refused(U, "as_of", "reference_time")),
    Defect("link_ts_after_horizon", timestamps("links", "ts", pd.Timestamp("2099-06-30")), Refused(L, "ts", HORIZON)),
    Defect("unparseable_link_ts", links(first("ts", "yesterday-ish")), Refused(L, "ts", "unparseable")),
    # --- features
    Defect("feature_named_outcome", role_named_feature("outcome"), Warned("outcome", "named like a role"), full_score=True),
    Defect("feature_named_treatment", role_named_feature("treatment"), Warned("treatment", "named like a role")),
    Defect("feature_named_as_of", role_named_feature("as_of"), Warned("as_of", "named like a role")),
    Defect("feature_named_p_default", role_named_feature("p_default"), Warned("p_default", "named like a role")),
    Defect("text_column_under_features_all", text_column, Warned("region", "not numeric"), full_score=True),
    Defect("all_null_float_column", users(lambda df: df.assign(never_filled=np.nan)), Warned("never_filled", "every value is null")),
    Defect("null_typed_column", append_column("untyped", lambda t: pa.nulls(len(t))), Warned("untyped", "every value is null")),
    Defect("listed_feature_without_values", listed_without_values, Refused(U, "never_filled", "no value in any row")),
    Defect("feature_minus_inf", users(first("gmv_90d", -np.inf)), Refused(U, "gmv_90d", "infinite")),
    Defect("feature_100_values_1e308", users(huge("gmv_90d", 100)), Refused(U, "gmv_90d", "max_abs_value")),
    Defect("model_feature_all_nan", users(lambda df: df.assign(gmv_90d=np.nan)), Warned("gmv_90d", "every value is null"), score=Refused(U, "gmv_90d", ABSENT)),
    Defect("model_feature_as_text", users(lambda df: df.assign(gmv_90d=df["gmv_90d"].astype(str))), Warned("gmv_90d", "not numeric"), score=Refused(U, "gmv_90d", ABSENT)),
    Defect("model_feature_column_dropped", users(lambda df: df.drop(columns=["refund_rate"])), Accepted(features_delta=-1), score=Refused(U, "refund_rate", ABSENT)),
    Defect("unusual_column_names_legal", unusual_names, Accepted(features_delta=len(UNUSUAL)), score=UNREAD),
    # --- links and truth
    Defect("missing_link_ts_column", links(lambda df: df.drop(columns=["ts"])), Refused(L, "ts", "not found")),
    Defect("links_to_unknown_user", links(first("user_id", 999_999)), Refused(L, "user_id", "not in the users table")),
    Defect("link_user_ids_as_strings", links(lambda df: df.assign(user_id=df["user_id"].astype(str))), Refused(L, "user_id", "same type")),
    Defect("null_entity_id", links(first("entity_id", np.nan)), Refused(L, "entity_id", "missing entity_id")),
    Defect("undeclared_entity_type", links(first("entity_type", "satellite")), Refused(L, "entity_type", "not declared")),
    Defect("truth_probability_above_1", truth(first("p_default", 1.5)), Refused(T, "p_default", "[0, 1]"), score=UNREAD),
]  # fmt: skip

SCORED = [
    d
    for d in DEFECTS
    if isinstance(d.at_score, Refused) or (isinstance(d.at_score, Warned) and d.full_score)
]


def _is_legal(d: Defect) -> bool:
    return isinstance(d.validate, Accepted) and d.at_score in (UNREAD, d.validate)


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "data"
    simulate_to_dir(SimulationConfig(n_users=400, seed=11), out)
    return out


@pytest.fixture(scope="module")
def clean_features(base) -> int:
    return len(load_dataset(base).feature_names)


@pytest.fixture(scope="module")
def tally(request):
    """What each stage did with each defect; the module's last words are the count."""
    seen: dict[str, dict[str, str]] = {}
    t0 = time.perf_counter()
    yield seen
    line, counts = summarize(seen)
    counts["seconds"] = round(time.perf_counter() - t0, 1)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\ncorpus: {line}")
    path = os.environ.get(TALLY_ENV)
    if path:
        Path(path).write_text(json.dumps({"line": line, **counts, "seen": seen}, indent=2))


@pytest.fixture
def cg_log(caplog):
    """caplog also sees the package logger (it does not propagate to the root logger)."""
    logger = logging.getLogger("creditgraph")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="creditgraph")
    yield caplog
    logger.removeHandler(caplog.handler)


def summarize(seen: dict[str, dict[str, str]]) -> tuple[str, dict]:
    """The tally line: a defect counts as refused if a stage refused it with a clear error,
    warned if the stages accepted it with a named warning, legal if it was a legal look-alike
    accepted as such, silent otherwise (accepted without a word, or a crash)."""
    legal = {d.name for d in DEFECTS if _is_legal(d)}
    scored = {d.name for d in SCORED}
    counts = {"tried": 0, "refused": 0, "warned": 0, "silent": 0, "legal": 0, "partial": 0}
    for name, stages in seen.items():
        got = set(stages.values())
        if set(stages) != ({"validate", "score"} if name in scored else {"validate"}):
            kind = "partial"  # a stage it goes through did not run (a selection of tests)
        elif name in legal:
            kind = "legal" if got == {"accepted"} else "silent"
        elif "refused" in got:
            kind = "refused"
        elif got == {"warned"}:
            kind = "warned"
        else:
            kind = "silent"
        counts[kind] += 1
        counts["tried"] += kind not in ("legal", "partial")
    line = (
        f"{counts['tried']} defects tried: {counts['refused']} refused with a clear error, "
        f"{counts['warned']} accepted with a named warning, {counts['silent']} silent"
        f" (and {counts['legal']} legal look-alike(s) accepted as valid)"
    )
    if counts["partial"]:
        line += f"; {counts['partial']} not through every stage (tests deselected)"
    return line, counts


def _corrupted(base: Path, tmp_path: Path, defect: Defect) -> Path:
    d = tmp_path / "data"
    shutil.copytree(base, d)
    defect.corrupt(d)
    return d


def _one_line(msg: str) -> None:
    assert "\n" not in msg and "Traceback" not in msg, msg


def _timeless(msg: str) -> str:
    return re.sub(r"horizon \S+", "horizon T", msg)


def _check_refusal(err: BaseException, want: Refused) -> None:
    msg = str(err)
    _one_line(msg)
    assert want.phrase in msg, msg
    if isinstance(err, DataValidationError):
        assert err.file.endswith(want.file), msg
        assert err.column == want.column, msg
    else:
        assert want.file in msg and (want.column is None or want.column in msg), msg


# ------------------------------------------------------------------------------------ tests


def test_table_covers_the_issue():
    names = [d.name for d in DEFECTS]
    assert len(names) == len(set(names))
    refused = [d for d in DEFECTS if isinstance(d.validate, Refused)]
    warned = [d for d in DEFECTS if isinstance(d.validate, Warned)]
    assert len(refused) >= 40 and len(warned) >= 8
    # every defect is refused or warned somewhere; only the legal look-alikes pass in silence
    for d in DEFECTS:
        stages = (d.validate, d.at_score)
        assert _is_legal(d) or any(isinstance(s, Refused | Warned) for s in stages), d.name
    assert sum(d.full_score for d in DEFECTS) <= 3


@pytest.mark.parametrize("defect", DEFECTS, ids=lambda d: d.name)
def test_validate(defect, base, clean_features, tmp_path, tally):
    """``creditgraph validate``: exit 2 and the loader's one-line error, or exit 0 and the
    warning naming the column, each on one line of its own."""
    d = _corrupted(base, tmp_path, defect)
    res = runner.invoke(app, ["validate", str(d)])
    out = res.output
    lines = out.splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    crashed = "Traceback" in out or not isinstance(res.exception, SystemExit | None)
    if crashed:
        kind = "crashed"
    elif res.exit_code == 2 and errors:
        kind = "refused"
    elif res.exit_code == 0 and warnings:
        kind = "warned"
    else:
        kind = "accepted" if res.exit_code == 0 else "crashed"
    tally.setdefault(defect.name, {})["validate"] = kind

    want = defect.validate
    assert not crashed, out
    if isinstance(want, Refused):
        assert res.exit_code == 2, out
        with pytest.raises(DataValidationError) as exc:
            load_dataset(d)
        _check_refusal(exc.value, want)
        # the whole message on one line (but the horizon, "now + 1 day", moved meanwhile)
        assert [_timeless(e) for e in errors] == [f"error: {_timeless(str(exc.value))}"], out
        return
    assert res.exit_code == 0, out
    ds = load_dataset(d)
    assert len(warnings) == len(ds.warnings), out
    if isinstance(want, Warned):
        named = [w for w in ds.warnings if want.token in w]
        assert len(named) == 1 and want.phrase in named[0], ds.warnings
        assert f"warning: {named[0]}" in warnings, out  # one line each
    else:
        assert warnings == [] and ds.warnings == [], out
        n = int(re.search(r'"features": (\d+)', out).group(1))
        assert n == clean_features + want.features_delta, out


def _run_files(run: Path) -> dict[str, tuple[int, int]]:
    """Every entry of the run folder (but Ray Train's checkpoints): size and mtime."""
    return {
        str(p.relative_to(run)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
        for p in sorted(run.rglob("*"))
        if p.relative_to(run).parts[0] != "checkpoints"
    }


_decisions: dict[str, pd.DataFrame] = {}


@pytest.mark.parametrize("defect", SCORED, ids=lambda d: d.name)
def test_score(defect, base, trained_run, tmp_path, tally, cg_log):
    """Batch scoring: refused before anything is written, or scored end to end with the warning;
    never a write into the trained run folder."""
    from creditgraph.serving.score import score_users

    d = _corrupted(base, tmp_path, defect)
    out, reg = tmp_path / "out", tmp_path / "reg"
    before = _run_files(trained_run)
    err: BaseException | None = None
    try:
        summary = score_users(trained_run, d, out, registry=reg)
    except Exception as exc:  # classified below: a clear refusal or a crash
        err = exc
    want = defect.at_score
    if err is None:
        kind = (
            "warned"
            if any(
                isinstance(want, Warned) and want.token in r.getMessage() for r in cg_log.records
            )
            else "accepted"
        )
    else:
        msg = str(err)
        clear = isinstance(err, ValueError) and "\n" not in msg and "Traceback" not in msg
        kind = "refused" if clear else "crashed"
    tally.setdefault(defect.name, {})["score"] = kind

    assert _run_files(trained_run) == before, "scoring changed the trained run folder"
    assert not list(tmp_path.glob(".out.*")), list(tmp_path.iterdir())
    if isinstance(want, Refused):
        assert err is not None, f"{defect.name} was scored"
        _check_refusal(err, want)
        assert not out.exists() and not reg.exists(), list(tmp_path.iterdir())
        return
    assert err is None, repr(err)
    assert kind == "warned", [r.getMessage() for r in cg_log.records]
    for name in ("decisions.parquet", "curves.parquet", "summary.json"):
        assert (out / name).is_file(), name
    assert len(list((reg / "snapshots").iterdir())) == 1
    decisions = pd.read_parquet(out / "decisions.parquet")
    assert summary["users_scored"] == len(decisions) == 400
    # scoring reads the model's features and the run's entity types: what these defects add
    # or drop must not move a single decision (compared with the first one scored)
    _decisions[defect.name] = decisions.drop(columns=["snapshot"])
    pd.testing.assert_frame_equal(_decisions[defect.name], next(iter(_decisions.values())))
