"""The data contract: every bad input gets one clear error naming file, column and rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from creditgraph.cli import app
from creditgraph.data.errors import DataValidationError
from creditgraph.data.load import load_dataset
from creditgraph.data.simulate import SimulationConfig, simulate_to_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("contract") / "data"
    simulate_to_dir(SimulationConfig(n_users=300, seed=3), out)
    return out


def _copy(base: Path, tmp_path: Path) -> Path:
    d = tmp_path / "data"
    shutil.copytree(base, d)
    return d


def _edit(d: Path, table: str, fn) -> None:
    df = pd.read_parquet(d / f"{table}.parquet")
    df = fn(df)
    df.to_parquet(d / f"{table}.parquet", index=False)


def _edit_yaml(d: Path, **changes) -> None:
    raw = yaml.safe_load((d / "dataset.yaml").read_text())
    raw.update(changes)
    (d / "dataset.yaml").write_text(yaml.safe_dump(raw))


def _error(d: Path, **kwargs) -> DataValidationError:
    """The error loading ``d`` raises: one line, no traceback text."""
    with pytest.raises(DataValidationError) as exc:
        load_dataset(d, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return exc.value


def test_valid_dataset_loads(base):
    ds = load_dataset(base)
    assert ds.n_users == 300
    assert "credit_limit" not in ds.feature_names and "default" not in ds.feature_names
    assert ds.truth is not None and len(ds.truth) == 300 * 61
    # NaN features stay missing (never imputed)
    assert np.isnan(ds.feature_matrix()).any()


def test_multi_file_users_read_the_same(base, tmp_path):
    d = _copy(base, tmp_path)
    users = pd.read_parquet(d / "users.parquet")
    (d / "users.parquet").unlink()
    (d / "users").mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(users)), 3)):
        users.iloc[part].to_parquet(d / "users" / f"part-{i}.parquet", index=False)
    ds, ref = load_dataset(d), load_dataset(base)
    assert ds.feature_names == ref.feature_names
    got, want = (
        pd.DataFrame(
            {"id": x.ids, "as_of": x.as_of, "t": x.treatment, "y": x.outcome, **x.features}
        )
        .sort_values("id")
        .reset_index(drop=True)
        for x in (ds, ref)
    )
    pd.testing.assert_frame_equal(got, want)


@pytest.mark.parametrize(
    ("table", "mutate", "column", "phrase"),
    [
        ("users", lambda df: df.drop(columns=["credit_limit"]), "credit_limit", "not found"),
        (
            "users",
            lambda df: df.assign(credit_limit=df["credit_limit"].astype(str)),
            "credit_limit",
            "numeric",
        ),
        (
            "users",
            lambda df: df.assign(user_id=np.r_[df["user_id"].iloc[:-1], df["user_id"].iloc[0]]),
            "user_id",
            "duplicate",
        ),
        (
            "users",
            lambda df: df.assign(credit_limit=np.r_[-5.0, df["credit_limit"].iloc[1:]]),
            "credit_limit",
            ">= 0",
        ),
        (
            "users",
            lambda df: df.assign(credit_limit=np.r_[np.inf, df["credit_limit"].iloc[1:]]),
            "credit_limit",
            "finite",
        ),
        (
            "users",
            lambda df: df.assign(credit_limit=np.r_[np.nan, df["credit_limit"].iloc[1:]]),
            "credit_limit",
            "finite",
        ),
        (
            "users",
            lambda df: df.assign(default=np.r_[2.0, df["default"].iloc[1:]]),
            "default",
            "0, 1 or null",
        ),
        (
            "users",
            lambda df: df.assign(gmv_90d=np.r_[-np.inf, df["gmv_90d"].iloc[1:]]),
            "gmv_90d",
            "infinite",
        ),
        (
            "users",
            lambda df: df.assign(as_of=["not a date"] + [str(t) for t in df["as_of"].iloc[1:]]),
            "as_of",
            "unparseable",
        ),
        (
            "links",
            lambda df: df.assign(user_id=np.r_[999, df["user_id"].iloc[1:]]),
            "user_id",
            "not in the users table",
        ),
        (
            "links",
            lambda df: df.assign(ts=["yesterday-ish"] + [str(t) for t in df["ts"].iloc[1:]]),
            "ts",
            "unparseable",
        ),
        (
            "links",
            lambda df: df.assign(entity_type=["satellite", *df["entity_type"].iloc[1:]]),
            "entity_type",
            "not declared",
        ),
        (
            "truth",
            lambda df: df.assign(p_default=np.r_[1.5, df["p_default"].iloc[1:]]),
            "p_default",
            "[0, 1]",
        ),
    ],
)
def test_bad_input_is_named(base, tmp_path, table, mutate, column, phrase):
    d = _copy(base, tmp_path)
    _edit(d, table, mutate)
    err = _error(d)
    msg = str(err)
    assert err.column == column, msg
    assert phrase in msg, msg
    assert table in err.file, msg
    if err.count is not None and err.rows:
        assert err.rows[0] == 0, msg  # the example row is the one we broke


def test_yaml_naming_absent_columns(base, tmp_path):
    d = _copy(base, tmp_path)
    _edit_yaml(d, features=["gmv_90d", "no_such_feature"])
    err = _error(d)
    assert err.column == "no_such_feature" and "not found" in str(err)


def test_yaml_unknown_key_and_bad_type(base, tmp_path):
    d = _copy(base, tmp_path)
    _edit_yaml(d, treatmnet="credit_limit")
    assert "dataset.yaml" in _error(d).file
    d2 = _copy(base, tmp_path / "b")
    _edit_yaml(d2, history_days="ninety")
    err = _error(d2)
    assert err.column == "history_days"


def test_nan_is_missing_not_an_error(base, tmp_path):
    d = _copy(base, tmp_path)
    _edit(d, "users", lambda df: df.assign(gmv_90d=np.r_[np.nan, df["gmv_90d"].iloc[1:]]))
    ds = load_dataset(d)
    assert np.isnan(ds.features["gmv_90d"].iloc[0])


def test_cli_validate_exit_codes(base, tmp_path, ray_session):  # the CLI starts Ray
    ok = runner.invoke(app, ["validate", str(base)])
    assert ok.exit_code == 0, ok.output
    d = _copy(base, tmp_path)
    _edit(d, "users", lambda df: df.assign(credit_limit=np.r_[-1.0, df["credit_limit"].iloc[1:]]))
    bad = runner.invoke(app, ["validate", str(d)])
    assert bad.exit_code == 2
    assert "credit_limit" in bad.output and "row 0" in bad.output


def test_failed_build_writes_nothing(base, tmp_path, ray_session):
    d = _copy(base, tmp_path)
    _edit(d, "users", lambda df: df.assign(default=np.r_[7.0, df["default"].iloc[1:]]))
    run = tmp_path / "run"
    res = runner.invoke(app, ["build", "--data", str(d), "--out", str(run)])
    assert res.exit_code == 2, res.output
    assert not run.exists() or not any(run.iterdir())
