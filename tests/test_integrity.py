"""Data integrity: roles kept apart from features, validated times, loud feature handling, one-line
messages, and the engine that reads a table (pyarrow for small local data, Ray Data otherwise)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import creditgraph.data.load as load_mod
from creditgraph.data.errors import DataValidationError
from creditgraph.data.load import choose_engine, load_dataset
from creditgraph.data.simulate import SimulationConfig, simulate_to_dir
from creditgraph.graph.build import build_graph
from creditgraph.graph.config import GraphConfig
from creditgraph.graph.features import FeatureStandardizer
from test_contract import _copy, _edit, _edit_yaml


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "data"
    simulate_to_dir(SimulationConfig(n_users=300, seed=5), out)
    return out


@pytest.fixture(scope="module")
def ref(base):
    return load_dataset(base)


@pytest.fixture
def cg_log(caplog):
    """caplog also sees the package logger (it does not propagate to the root logger)."""
    logger = logging.getLogger("creditgraph")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="creditgraph")
    yield caplog
    logger.removeHandler(caplog.handler)


def _refused(d: Path, tmp_path: Path) -> DataValidationError:
    """The one-line error building a graph from ``d`` raises; nothing may have been written."""
    run = tmp_path / "run"
    with pytest.raises(DataValidationError) as exc:
        build_graph(d, run, GraphConfig())
    assert not run.exists() or not any(run.iterdir()), list(run.iterdir())
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return exc.value


def _write_users(d: Path, df: pd.DataFrame) -> None:
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), d / "users.parquet")


def _users(d: Path) -> pd.DataFrame:
    return pd.read_parquet(d / "users.parquet")


# ---------------------------------------------------------------- 1. roles are not features

CANONICAL = [
    "as_of",
    "treatment",
    "outcome",
    "user_id",
    "user_idx",
    "node",
    "split",
    "t_days",
    "ts_days",
    "limit",
    "p_default",
    "entity_type",
    "known",
    "demand",
]


@pytest.fixture(scope="module")
def renamed(base, tmp_path_factory) -> Path:
    """``base`` with id and time columns under other names, so every canonical name is free."""
    d = _copy(base, tmp_path_factory.mktemp("renamed"))
    _edit(d, "users", lambda df: df.rename(columns={"user_id": "customer", "as_of": "event_time"}))
    _edit_yaml(d, id="customer", time="event_time")
    return d


@pytest.mark.parametrize("name", CANONICAL)
def test_canonical_name_as_feature_never_replaces_a_role(renamed, tmp_path, name):
    want = load_dataset(renamed)
    d = _copy(renamed, tmp_path)
    # values that would be visible if they leaked into a role: all "defaulted", absurd limits
    _edit(d, "users", lambda df: df.assign(**{name: np.ones(len(df)) * 7.0}))
    ds = load_dataset(d)
    assert name in ds.feature_names
    assert np.array_equal(ds.features[name].to_numpy(), np.full(ds.n_users, 7.0))
    assert np.array_equal(ds.ids, want.ids)
    assert np.array_equal(ds.as_of, want.as_of)
    assert np.array_equal(ds.treatment, want.treatment)
    assert np.array_equal(ds.outcome, want.outcome, equal_nan=True)
    assert ds.stats["default_rate"] == want.stats["default_rate"]
    assert ds.feature_names == [*want.feature_names, name]


def test_graph_of_colliding_names_keeps_labels_limits_and_splits(renamed, tmp_path):
    d = _copy(renamed, tmp_path)
    clash = ["treatment", "outcome", "as_of", "node", "split", "t_days", "user_id"]
    _edit(d, "users", lambda df: df.assign(**{c: np.full(len(df), 1.0) for c in clash}))
    build_graph(renamed, tmp_path / "want", GraphConfig())
    build_graph(d, tmp_path / "got", GraphConfig())
    want = pd.read_parquet(tmp_path / "want" / "graph" / "users.parquet")
    got = pd.read_parquet(tmp_path / "got" / "graph" / "users.parquet")
    pd.testing.assert_frame_equal(got, want)
    assert want["outcome"].mean() < 0.5  # the labels are the data's, not the all-ones column


# ------------------------------------------------------------------------------ 2. times


def _as_strings(d: Path, fmt: str, table: str = "users", col: str = "as_of") -> pd.Series:
    """Rewrite a time column as strings in ``fmt``; return the times they stand for."""
    df = pd.read_parquet(d / f"{table}.parquet")
    t = pd.Series(df[col]).dt.floor("s")
    df[col] = t.dt.strftime(fmt)
    df.to_parquet(d / f"{table}.parquet", index=False)
    return t


def test_day_first_strings_are_read_with_one_inferred_format(base, tmp_path):
    d = _copy(base, tmp_path)
    t = _as_strings(d, "%d/%m/%Y %H:%M:%S")
    assert (t.dt.day > 12).mean() > 0.3  # would be misread (or refused) as month-first
    ds = load_dataset(d)
    assert np.array_equal(ds.as_of, t.to_numpy().astype("datetime64[us]"))


def test_ambiguous_day_month_is_refused_until_declared(base, tmp_path):
    d = _copy(base, tmp_path)
    df = _users(d)
    t = pd.Series(df["as_of"]).dt.floor("D")
    t = pd.to_datetime(
        pd.DataFrame({"year": t.dt.year, "month": t.dt.month, "day": (t.dt.day - 1) % 12 + 1})
    )
    df["as_of"] = t.dt.strftime("%d/%m/%Y")
    _write_users(d, df)
    err = _refused(d, tmp_path)
    assert err.file == "users.parquet" and err.column == "as_of"
    assert "ambiguous day/month" in str(err) and "time_format" in str(err)
    assert err.rows and all((t.dt.day != t.dt.month).iloc[err.rows])

    _edit_yaml(d, time_format={"users": "%d/%m/%Y"})
    ds = load_dataset(d)
    assert np.array_equal(ds.as_of, t.to_numpy().astype("datetime64[us]"))
    _edit_yaml(d, time_format="%m/%d/%Y")  # declared the other way: taken at its word
    assert not np.array_equal(load_dataset(d).as_of, ds.as_of)


def test_mixed_date_formats_are_refused_with_rows(base, tmp_path):
    d = _copy(base, tmp_path)
    df = _users(d)
    t = pd.Series(df["as_of"]).dt.floor("s")
    text = t.dt.strftime("%Y-%m-%d %H:%M:%S")
    odd = np.flatnonzero((t.dt.day > 12).to_numpy())[:10]
    text.iloc[odd] = t.iloc[odd].dt.strftime("%d/%m/%Y %H:%M:%S")
    df["as_of"] = text
    _write_users(d, df)
    err = _refused(d, tmp_path)
    assert err.column == "as_of" and "mixed date formats" in str(err)
    assert err.count == 10 and err.rows == odd[:5].tolist()


def test_declared_format_must_fit_every_row(base, tmp_path):
    d = _copy(base, tmp_path)
    _as_strings(d, "%Y-%m-%d %H:%M:%S")
    _edit_yaml(d, time_format={"users": "%d/%m/%Y %H:%M:%S"})
    err = _refused(d, tmp_path)
    assert err.column == "as_of" and "declared time_format" in str(err)
    assert err.count == 300 and err.rows == [0, 1, 2, 3, 4]


def test_mixed_aware_and_naive_times_are_refused(base, tmp_path):
    d = _copy(base, tmp_path)
    df = _users(d)
    text = pd.Series(df["as_of"]).dt.floor("s").dt.strftime("%Y-%m-%dT%H:%M:%S")
    text.iloc[[4, 9, 20]] = text.iloc[[4, 9, 20]] + "+08:00"
    df["as_of"] = text
    _write_users(d, df)
    err = _refused(d, tmp_path)
    assert err.column == "as_of" and "time-zone-aware and naive" in str(err)
    assert err.rows == [4, 9, 20]


def test_aware_times_are_converted_to_utc(base, tmp_path):
    d = _copy(base, tmp_path)
    df = _users(d)
    utc = pd.Series(df["as_of"]).dt.floor("s")
    east = (utc + pd.Timedelta(hours=8)).dt.strftime("%Y-%m-%dT%H:%M:%S") + "+08:00"
    west = (utc - pd.Timedelta(hours=5)).dt.strftime("%Y-%m-%dT%H:%M:%S") + "-05:00"
    df["as_of"] = np.where(np.arange(len(df)) % 2 == 0, east, west)
    _write_users(d, df)
    want = utc.to_numpy().astype("datetime64[us]")
    assert np.array_equal(load_dataset(d).as_of, want)
    # a parquet timestamp column with a zone: the same instants
    df["as_of"] = utc.dt.tz_localize("UTC").dt.tz_convert("Asia/Shanghai")
    _write_users(d, df)
    assert np.array_equal(load_dataset(d).as_of, want)


@pytest.mark.parametrize(
    ("table", "col", "value"),
    [
        ("users", "as_of", "2099-01-01 00:00:00"),
        ("users", "as_of", pd.Timestamp("9999-12-31")),
        ("links", "ts", pd.Timestamp("2099-06-30")),
    ],
)
def test_future_times_are_refused(base, tmp_path, table, col, value):
    d = _copy(base, tmp_path)
    df = pd.read_parquet(d / f"{table}.parquet")
    rows = np.arange(20, 30)
    if isinstance(value, str):
        text = pd.Series(df[col]).dt.strftime("%Y-%m-%d %H:%M:%S")
        text.iloc[rows] = value
        df[col] = text
    else:
        t = pd.Series(df[col]).astype("datetime64[ms]")
        t.iloc[rows] = value.as_unit("ms")
        df[col] = t
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), d / f"{table}.parquet")
    err = _refused(d, tmp_path)
    assert err.file == f"{table}.parquet" and err.column == col
    assert "after the horizon" in str(err)
    assert err.count == 10 and err.rows == rows[:5].tolist()


def test_reference_time_is_the_horizon_for_both_tables(base, tmp_path, ref):
    decision = pd.Timestamp(ref.stats["decision_time"])
    assert decision == pd.Timestamp(ref.as_of.max())
    d = _copy(base, tmp_path)
    _edit_yaml(d, reference_time=str(decision - pd.Timedelta(days=1)))
    err = _refused(d, tmp_path)
    assert err.column == "as_of" and "reference_time" in str(err)
    # users fit, links seen later do not: one rule for both tables
    _edit_yaml(d, reference_time=str(decision))
    err = _refused(d, tmp_path)
    assert err.file == "links.parquet" and err.column == "ts" and "after the horizon" in str(err)
    links = pd.read_parquet(d / "links.parquet")
    assert (links["ts"].iloc[err.rows] > decision).all()
    _edit_yaml(d, reference_time="2026-07-01T00:00:00+02:00")
    assert load_dataset(d).stats["decision_time"] == ref.stats["decision_time"]


# -------------------------------------------------------------------------- 3. features


def test_dropped_columns_are_named_in_a_warning(base, tmp_path, ref, cg_log):
    d = _copy(base, tmp_path)
    df = _users(d).assign(
        region=lambda x: np.where(np.arange(len(x)) % 2 == 0, "north", "south"),
        never_filled=np.nan,
    )
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.append_column("untyped", pa.nulls(len(df)))  # a null-typed column
    pq.write_table(table, d / "users.parquet")
    ds = load_dataset(d)
    assert ds.feature_names == ref.feature_names
    assert np.array_equal(ds.feature_matrix(), ref.feature_matrix(), equal_nan=True)
    logged = [r.getMessage() for r in cg_log.records]
    for col, why in (("region", "not numeric"), ("never_filled", "null"), ("untyped", "null")):
        (note,) = [w for w in ds.warnings if repr(col) in w]
        assert "users.parquet" in note and why in note and "dropped" in note
        assert note in logged


def test_listed_feature_without_any_value_is_refused(base, tmp_path):
    d = _copy(base, tmp_path)
    _edit(d, "users", lambda df: df.assign(never_filled=np.nan))
    _edit_yaml(d, features=["gmv_90d", "never_filled"])
    err = _refused(d, tmp_path)
    assert err.file == "users.parquet" and err.column == "never_filled"
    assert "no value in any row" in str(err)


@pytest.mark.parametrize(
    ("col", "value"), [("gmv_90d", 1e308), ("credit_limit", 1e308), ("refund_rate", None)]
)
def test_absurd_values_are_refused(base, tmp_path, col, value):
    d = _copy(base, tmp_path)
    if value is None:  # a bound of the dataset's own: above every value it has, but one
        bound = 10 * float(_users(d).select_dtypes("number").abs().max().max())
        _edit_yaml(d, max_abs_value=bound)
        value = 2 * bound
    _edit(
        d, "users", lambda df: df.assign(**{col: np.r_[df[col].iloc[:3], value, df[col].iloc[4:]]})
    )
    err = _refused(d, tmp_path)
    assert err.file == "users.parquet" and err.column == col
    assert "max_abs_value" in str(err) and err.rows[0] == 3


def test_values_near_the_bound_are_accepted(base, tmp_path):
    d = _copy(base, tmp_path)
    _edit(d, "users", lambda df: df.assign(gmv_90d=np.r_[-9.9e14, 9.9e14, df["gmv_90d"].iloc[2:]]))
    ds = load_dataset(d)
    assert ds.features["gmv_90d"].iloc[1] == 9.9e14


def test_standardizer_is_exact_on_ordinary_values_and_finite_on_extreme_ones():
    rng = np.random.default_rng(0)
    ordinary = rng.normal(50.0, 7.0, (500, 1))
    std = FeatureStandardizer().fit(ordinary, ["x"])
    assert std.mean_[0] == ordinary.mean() and std.std_[0] == ordinary.std()

    extreme = np.column_stack(
        [
            np.r_[rng.uniform(-9.9e14, 9.9e14, 498), 9.99e14, -9.99e14],  # near the bound
            np.r_[rng.normal(0, 1, 498), 1e300, -1e300],  # far beyond it
            np.r_[rng.uniform(0, 1e307, 499), 1.7e308],  # squares would overflow
        ]
    )
    std = FeatureStandardizer(log_skewed=False).fit(extreme, ["a", "b", "c"])
    assert np.isfinite(std.mean_).all() and np.isfinite(std.std_).all() and (std.std_ > 0).all()
    z, omega = std.transform(extreme)
    assert np.isfinite(z).all() and (np.abs(z) <= std.clip_z).all() and omega.all()
    assert np.isfinite(FeatureStandardizer().fit(extreme, ["a", "b", "c"]).mean_).all()


def test_standardizer_refuses_a_feature_never_observed_in_fitting_rows():
    raw = np.column_stack([np.arange(10.0), np.full(10, np.nan)])
    with pytest.raises(DataValidationError) as exc:
        FeatureStandardizer().fit(raw, ["seen", "unseen"])
    assert exc.value.column == "unseen" and "no observed value" in str(exc.value)


def test_undeclared_entity_types_are_named_with_their_defaults(base, tmp_path, cg_log):
    d = _copy(base, tmp_path)
    _edit_yaml(d, entities={})
    ds = load_dataset(d)
    (note,) = [w for w in ds.warnings if "entity_type" in w]
    for etype in pd.read_parquet(d / "links.parquet")["entity_type"].unique():
        assert repr(etype) in note
    assert "weight=1" in note and "max_degree=100" in note and "links.parquet" in note
    assert note in [r.getMessage() for r in cg_log.records]


UNUSUAL = ["revenue 90d (€)", "营业额", "  padded "]


def test_unusual_column_names_are_kept_exactly(base, tmp_path):
    d = _copy(base, tmp_path)
    _edit(
        d,
        "users",
        lambda df: df.assign(**{n: np.arange(len(df)) * (i + 1.0) for i, n in enumerate(UNUSUAL)}),
    )
    ds = load_dataset(d)
    assert ds.feature_names[-3:] == UNUSUAL
    assert ds.features[UNUSUAL[1]].iloc[7] == 14.0
    build_graph(d, tmp_path / "run", GraphConfig())
    manifest = json.loads((tmp_path / "run" / "graph" / "manifest.json").read_text())
    assert manifest["feature_names"][-3:] == UNUSUAL


# -------------------------------------------------------------------------- 4. messages


def test_duplicate_column_names_are_one_line(base, tmp_path):
    d = _copy(base, tmp_path)
    table = pq.read_table(d / "users.parquet")
    table = table.append_column("gmv_90d", table.column("gmv_90d"))
    pq.write_table(table, d / "users.parquet")
    err = _refused(d, tmp_path)
    assert err.file == "users.parquet" and err.column == "gmv_90d"
    assert "duplicate column names ['gmv_90d']" in str(err)


def test_zero_row_users_table(base, tmp_path):
    d = _copy(base, tmp_path)
    _edit(d, "users", lambda df: df.iloc[:0])
    err = _refused(d, tmp_path)
    assert err.file == "users.parquet" and "users table has 0 rows" in str(err)
    assert "present" not in str(err)


def test_string_user_ids_in_links_name_both_types(base, tmp_path):
    d = _copy(base, tmp_path)
    _edit(d, "links", lambda df: df.assign(user_id=df["user_id"].astype(str)))
    err = _refused(d, tmp_path)
    assert err.file == "links.parquet" and err.column == "user_id"
    assert "int64" in str(err) and "str" in str(err) and "not in the users table" not in str(err)


def test_unreadable_file_is_one_line(base, tmp_path):
    d = _copy(base, tmp_path)
    (d / "links.parquet").write_bytes(b"not parquet at all" * 10)
    err = _refused(d, tmp_path)
    assert "links.parquet" in err.file and "cannot be read as parquet" in str(err)


# ----------------------------------------------------------------------------- 5. engines


def test_engine_choice(base, monkeypatch):
    users = base / "users.parquet"
    assert choose_engine(users) == "arrow"
    assert choose_engine("s3://bucket/data/users.parquet") == "ray"
    assert choose_engine(users, "ray") == "ray"
    monkeypatch.setenv("CREDITGRAPH_RAY_READ_MIN_BYTES", str(users.stat().st_size))
    assert choose_engine(users) == "ray"
    monkeypatch.setenv("CREDITGRAPH_RAY_READ_MIN_BYTES", "lots")
    with pytest.raises(ValueError, match="CREDITGRAPH_RAY_READ_MIN_BYTES"):
        choose_engine(users)
    with pytest.raises(ValueError, match="engine"):
        load_dataset(base, engine="spark")


def test_small_data_is_read_without_ray(base):
    code = (
        "import sys; from creditgraph.data.load import load_dataset; "
        f"ds = load_dataset({str(base)!r}); "
        "assert ds.n_users == 300; assert 'ray' not in sys.modules, 'Ray was imported'"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}
    )
    assert res.returncode == 0, res.stderr[-2000:]


def test_library_code_never_starts_ray_for_large_data(base, monkeypatch):
    """Above the switch the reader needs Ray but does not start it: the entry point does
    (``creditgraph validate`` asks :func:`reads_with_ray` first)."""
    from creditgraph.data.load import reads_with_ray

    assert not reads_with_ray(base)
    code = (
        "from creditgraph.data.load import load_dataset; "
        "from creditgraph.utils.runtime import RayNotRunning\n"
        f"try:\n    load_dataset({str(base)!r})\n"
        "except RayNotRunning as e:\n    print('refused:', e)"
    )
    env = {**os.environ, "CREDITGRAPH_RAY_READ_MIN_BYTES": "0"}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "refused:" in res.stdout and "Ray Data" in res.stdout, (
        res.stdout + res.stderr[-2000:]
    )
    monkeypatch.setenv("CREDITGRAPH_RAY_READ_MIN_BYTES", "0")
    assert reads_with_ray(base)


def test_parts_with_a_missing_column_are_unified(base, tmp_path, ref):
    d = _copy(base, tmp_path)
    users = _users(d)
    (d / "users.parquet").unlink()
    (d / "users").mkdir()
    users.iloc[:150].to_parquet(d / "users" / "part-0.parquet", index=False)
    users.iloc[150:].drop(columns=["noise_uniform"]).to_parquet(
        d / "users" / "part-1.parquet", index=False
    )
    (d / "users" / "_SUCCESS").write_text("")
    ds = load_dataset(d, engine="arrow")
    assert np.array_equal(ds.ids, ref.ids)
    assert ds.features["noise_uniform"].iloc[150:].isna().all()
    assert np.array_equal(
        ds.features["noise_uniform"].iloc[:150],
        ref.features["noise_uniform"].iloc[:150],
        equal_nan=True,
    )


def test_progress_bar_only_for_larger_data(base, capsys, monkeypatch):
    load_dataset(base)
    assert "validate users.parquet" not in capsys.readouterr().err
    monkeypatch.setattr(load_mod, "PROGRESS_MIN_ROWS", 100)
    load_dataset(base)
    assert "validate users.parquet" in capsys.readouterr().err


def test_ray_engine_reads_the_same(base, tmp_path, ray_session):
    d = _copy(base, tmp_path)
    users = _users(d).assign(**{n: 1.5 for n in UNUSUAL})
    (d / "users.parquet").unlink()
    (d / "users").mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(users)), 3)):
        users.iloc[part].to_parquet(d / "users" / f"part-{i}.parquet", index=False)
    by_ray = load_dataset(d, engine="ray")
    by_arrow = load_dataset(d, engine="arrow")
    assert by_ray.feature_names == by_arrow.feature_names and UNUSUAL[0] in by_ray.feature_names

    def frame(ds):
        cols = {"id": ds.ids, "as_of": ds.as_of, "t": ds.treatment, "y": ds.outcome}
        return pd.DataFrame({**cols, **ds.features}).sort_values("id").reset_index(drop=True)

    pd.testing.assert_frame_equal(frame(by_ray), frame(by_arrow))
    assert by_ray.stats == by_arrow.stats
    key = ["user_idx", "entity_id", "ts_days"]
    pd.testing.assert_frame_equal(
        by_ray.links.assign(user_idx=by_ray.ids[by_ray.links["user_idx"]])
        .sort_values(key)
        .reset_index(drop=True),
        by_arrow.links.assign(user_idx=by_arrow.ids[by_arrow.links["user_idx"]])
        .sort_values(key)
        .reset_index(drop=True),
    )
    # a duplicate column is caught before Ray reads anything
    table = pq.read_table(d / "users" / "part-1.parquet")
    pq.write_table(
        table.append_column("refund_rate", table.column("refund_rate")),
        d / "users" / "part-1.parquet",
    )
    with pytest.raises(DataValidationError, match="duplicate column names") as exc:
        load_dataset(d, engine="ray")
    assert "\n" not in str(exc.value) and "part-1.parquet" in exc.value.file
    shutil.rmtree(d)


def test_unusual_column_names_work_end_to_end(sim_data, tmp_path):
    """Names with spaces, symbols, non-ASCII or padding are features like any other through
    training, rules, batch scoring and an online applicant decision (never accepted at validate
    and then failing later)."""
    from creditgraph.config import PipelineConfig, override_many
    from creditgraph.layout import RunLayout
    from creditgraph.pipeline import run_pipeline
    from creditgraph.rules.config import RulesConfig
    from creditgraph.rules.learn import learn_rules
    from creditgraph.serving.context import (
        Applicant,
        ScoringBundle,
        decide,
        encode,
        for_applicants,
        tower,
    )
    from creditgraph.serving.score import score_users
    from creditgraph.serving.snapshot import Registry

    d = _copy(sim_data, tmp_path)
    renamed = dict(
        zip(["late_payment_ratio", "avg_order_value", "refund_rate"], UNUSUAL, strict=True)
    )
    _edit(d, "users", lambda df: df.rename(columns=renamed))
    cfg = override_many(
        PipelineConfig(),
        {"model.hidden": 8, "model.heads": 2, "model.mc_dropout_samples": 2, "train.epochs": 1,
         "train.num_workers": 1, "partition.num_parts": 4},
    )  # fmt: skip
    run = tmp_path / "run"
    run_pipeline(d, run, cfg, stop_after="calibrate")
    learn_rules(d, tmp_path / "rules", RulesConfig(min_confidence=0.15), show=False)
    summary = score_users(run, d, tmp_path / "out", rules_dir=tmp_path / "rules", promote=True)
    dec = pd.read_parquet(tmp_path / "out" / "decisions.parquet")
    assert summary["users_scored"] == len(dec) == 3000 and dec["limit"].notna().all()
    bundle = ScoringBundle.load(run, rules_dir=tmp_path / "rules")
    assert set(UNUSUAL) <= set(bundle.feature_names)
    # the service's path: features by name (JSON keys), an applicant never seen
    users = _users(d)
    raw = np.array([float(users[name].iloc[0]) for name in bundle.feature_names])
    snap = Registry(RunLayout(run).default_snapshots).open()
    ctx = for_applicants(bundle, snap, [Applicant("new", raw, 0.0, 20_000.0, [])])
    grid = bundle.policy.grid_values()
    ev = tower(bundle, encode(bundle, ctx), grid)
    table = decide(bundle, ev, ctx, grid)
    assert np.isfinite(ev.curves).all() and table.row(0).limit >= 0
