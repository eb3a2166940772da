"""The order-risk family: its data contract, label timing and the simulator's known truth."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from creditgraph.cli import app
from creditgraph.data.errors import DataValidationError
from creditgraph.data.orders import OrdersSpec, labels_known_at, load_orders
from creditgraph.data.simulate_orders import (
    OrderSimConfig,
    simulate_orders,
    simulate_orders_to_dir,
)
from creditgraph.data.spec import DatasetSpec

DAY = pd.Timedelta(days=1)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("orders") / "data"
    simulate_orders_to_dir(OrderSimConfig(n_orders=3000, n_buyers=500, seed=5), out)
    return out


@pytest.fixture(scope="module")
def world() -> dict:
    return simulate_orders(OrderSimConfig(n_orders=60_000, seed=11))


def _copy(base: Path, tmp_path: Path) -> Path:
    d = tmp_path / "data"
    shutil.copytree(base, d)
    return d


def _edit(d: Path, table: str, fn) -> None:
    path = d / f"{table}.parquet"
    fn(pd.read_parquet(path)).to_parquet(path, index=False)


def _edit_orders_yaml(d: Path, **changes) -> None:
    raw = yaml.safe_load((d / "dataset.yaml").read_text())
    raw["orders"].update(changes)
    (d / "dataset.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _listing(d: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(d)), p.stat().st_size) for p in d.rglob("*"))


def _error(d: Path) -> DataValidationError:
    before = _listing(d)
    with pytest.raises(DataValidationError) as exc:
        load_orders(d)
    assert _listing(d) == before  # a failed load writes nothing
    return exc.value


def _set(df: pd.DataFrame, col: str, rows: list[int], value) -> pd.DataFrame:
    df = df.copy()
    if df[col].dtype.kind in "iub" and not isinstance(value, int | bool):
        df[col] = df[col].astype(object)
    df.loc[rows, col] = value
    return df


# --- the contract ------------------------------------------------------------------------


def test_valid_simulated_dataset_loads(base):
    ds = load_orders(base)
    orders = pd.read_parquet(base / "orders.parquet")
    assert ds.n_orders == 3000 and ds.spec.family == "orders"
    assert ds.warnings == []
    canonical = {"order_id", "ts", "buyer_id", "amount", "is_fraud", "label_known_at"}
    assert not canonical & set(ds.feature_names)
    assert {"buyer_orders_24h", "is_new_device", "category_risk"} <= set(ds.feature_names)
    assert np.isnan(ds.feature_matrix()).any()  # missing stays missing
    assert ds.ts.dtype == np.dtype("datetime64[us]")
    np.testing.assert_array_equal(ds.ids, orders["order_id"].to_numpy())
    np.testing.assert_allclose(ds.amount, orders["amount"].to_numpy())
    # labels: NaN where null, label time NaT exactly there
    assert np.array_equal(np.isnan(ds.label), orders["is_fraud"].isna().to_numpy())
    assert np.array_equal(np.isnat(ds.label_time), np.isnan(ds.label))
    assert 0.3 < np.isfinite(ds.label).mean() < 0.9
    assert ds.links is not None and set(ds.links["entity_type"].cat.categories) == {
        "device",
        "card",
        "address",
        "ip",
    }
    assert (ds.links["ts_days"] >= ds.t_days[ds.links["order_idx"]]).all()
    assert ds.truth is not None and np.isfinite(ds.truth).all()
    assert ds.segments is not None and len(ds.segments) == 3000
    no_truth = load_orders(base, with_truth=False)
    assert no_truth.truth is None and no_truth.segments is None


def test_folder_of_parts_reads_the_same(base, tmp_path):
    d = _copy(base, tmp_path)
    for name in ("orders", "order_links"):
        df = pd.read_parquet(d / f"{name}.parquet")
        (d / f"{name}.parquet").unlink()
        (d / name).mkdir()
        for i, part in enumerate(np.array_split(np.arange(len(df)), 3)):
            df.iloc[part].to_parquet(d / name / f"part-{i}.parquet", index=False)
    got, want = load_orders(d), load_orders(base)
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_array_equal(got.label, want.label)
    pd.testing.assert_frame_equal(got.orders, want.orders)
    pd.testing.assert_frame_equal(got.links, want.links)


@pytest.mark.parametrize(
    ("table", "mutate", "file", "column", "phrase", "rows"),
    [
        ("orders", lambda df: df.drop(columns=["buyer_id"]), "orders", "buyer_id", "not found", []),
        (
            "orders",
            lambda df: _set(df, "order_id", [7], df["order_id"].iloc[3]),
            "orders",
            "order_id",
            "duplicate order ids",
            [3, 7],
        ),
        (
            "orders",
            lambda df: _set(df.assign(ts=df["ts"].astype(str)), "ts", [5], "yesterday-ish"),
            "orders",
            "ts",
            "unparseable",
            [5],
        ),
        ("orders", lambda df: _set(df, "ts", [9], pd.NaT), "orders", "ts", "missing time", [9]),
        (
            "orders",
            lambda df: _set(df, "is_fraud", [2], 2),
            "orders",
            "is_fraud",
            "0, 1 or null",
            [2],
        ),
        (
            "orders",
            lambda df: _set(df, "label_known_at", [df["is_fraud"].notna().idxmax()], pd.NaT),
            "orders",
            "label_known_at",
            "without the time",
            None,
        ),
        (
            "orders",
            lambda df: _set(df, "label_known_at", [4], df["ts"].iloc[4] - DAY),
            "orders",
            "label_known_at",
            "before the order was placed",
            [4],
        ),
        ("orders", lambda df: _set(df, "amount", [6], -5.0), "orders", "amount", ">= 0", [6]),
        ("orders", lambda df: _set(df, "amount", [8], np.inf), "orders", "amount", "finite", [8]),
        ("orders", lambda df: _set(df, "amount", [1], np.nan), "orders", "amount", "finite", [1]),
        (
            "orders",
            lambda df: _set(df, "buyer_id", [10], None),
            "orders",
            "buyer_id",
            "missing buyer id",
            [10],
        ),
        (
            "orders",
            lambda df: _set(df, "ts", [11], df["ts"].max() + 400 * DAY),
            "orders",
            "ts",
            "after the reference time",
            [11],
        ),
        (
            "order_links",
            lambda df: _set(df, "order_id", [12], 1),
            "order_links",
            "order_id",
            "not in the orders table",
            [12],
        ),
        (
            "order_links",
            lambda df: _set(df.assign(order_id=df["order_id"].astype(str)), "order_id", [0], "x"),
            "order_links",
            "order_id",
            "same type",
            [],
        ),
        (
            "order_links",
            lambda df: _set(
                df.assign(entity_type=df["entity_type"].astype(str)), "entity_type", [3], "email"
            ),
            "order_links",
            "entity_type",
            "not declared",
            [3],
        ),
        (
            "order_links",
            lambda df: _set(df, "entity_id", [14], None),
            "order_links",
            "entity_id",
            "missing entity_id",
            [14],
        ),
        (
            "order_truth",
            lambda df: _set(df, "p_fraud", [2], 1.5),
            "order_truth",
            "p_fraud",
            "[0, 1]",
            [2],
        ),
        (
            "order_truth",
            lambda df: pd.concat([df, df.iloc[[0]]], ignore_index=True),
            "order_truth",
            "order_id",
            "more than one truth row",
            [0, 3000],
        ),
    ],
)
def test_bad_tables_get_one_clear_error(base, tmp_path, table, mutate, file, column, phrase, rows):
    d = _copy(base, tmp_path)
    _edit(d, table, mutate)
    err = _error(d)
    assert err.file.startswith(file), str(err)
    assert err.column == column, str(err)
    assert phrase in str(err), str(err)
    if rows is not None:
        assert err.rows[: len(rows)] == rows, str(err)


def test_duplicate_column_names_are_refused(base, tmp_path):
    d = _copy(base, tmp_path)
    table = pq.read_table(d / "orders.parquet")
    dup = pa.Table.from_arrays(
        [*table.columns, table.column("amount")], names=[*table.column_names, "amount"]
    )
    pq.write_table(dup, d / "orders.parquet")
    err = _error(d)
    assert err.file == "orders.parquet" and err.column == "amount"
    assert "duplicate column" in str(err)


def test_links_known_after_the_reference_time_are_left_out(base, tmp_path):
    d = _copy(base, tmp_path)
    ref = load_orders(base)
    now = pd.Timestamp(ref.ts.max()) + DAY
    late = (ref.links["ts_days"] > (now - pd.Timestamp("1970-01-01")) / DAY).to_numpy()
    assert late.any()
    _edit_orders_yaml(d, reference_time=now.isoformat())
    ds = load_orders(d)
    pd.testing.assert_frame_equal(ds.links, ref.links[~late].reset_index(drop=True))
    assert ds.stats["links_after_reference"] == late.sum()


def test_future_dated_orders_are_refused_without_a_reference_time(base, tmp_path):
    d = _copy(base, tmp_path)
    _edit_orders_yaml(d, reference_time=None)
    assert load_orders(d).n_orders == 3000  # 2025 data is in the past
    _edit(d, "orders", lambda df: _set(df, "ts", [3], pd.Timestamp("2200-01-01")))
    err = _error(d)
    assert (err.column, err.rows) == ("ts", [3]) and "current time" in str(err)


def test_dataset_yaml_family_rules(base, tmp_path):
    # family: orders needs the orders section
    d = _copy(base, tmp_path)
    raw = yaml.safe_load((d / "dataset.yaml").read_text())
    (d / "dataset.yaml").write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "orders"}))
    err = _error(d)
    assert "orders" in str(err) and err.file.endswith("dataset.yaml")
    # a credit dataset is not an order dataset
    raw.pop("family")
    raw.pop("orders")
    (d / "dataset.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    err = _error(d)
    assert err.column == "family" and "'credit'" in str(err)
    # the spec model itself
    assert DatasetSpec().family == "credit" and DatasetSpec().orders is None
    with pytest.raises(ValueError, match="orders"):
        DatasetSpec(family="orders")
    with pytest.raises(ValueError, match="distinct"):
        OrdersSpec(buyer="order_id")
    with pytest.raises(ValueError, match="canonical"):
        OrdersSpec(features=["amount"])


def test_feature_columns_never_replace_canonical_values(base, tmp_path):
    d = _copy(base, tmp_path)

    def rename(df: pd.DataFrame) -> pd.DataFrame:
        df = df.rename(columns={"amount": "order_value"})
        df["amount"] = 1.0  # a feature that happens to be called "amount"
        df["label"] = 3.0  # and one called "label"
        return df

    _edit(d, "orders", rename)
    _edit_orders_yaml(d, amount="order_value")
    ds = load_orders(d)
    ref = load_orders(base)
    np.testing.assert_allclose(ds.amount, ref.amount)  # the canonical amount is order_value
    assert "order_value" not in ds.feature_names
    assert (ds.orders["amount"] == 1.0).all() and (ds.orders["label"] == 3.0).all()
    np.testing.assert_array_equal(ds.label, ref.label)


def test_non_numeric_features_are_dropped_with_a_warning(base, tmp_path):
    d = _copy(base, tmp_path)
    _edit(d, "orders", lambda df: df.assign(currency="CNY", channel=["app", "web"] * 1500))
    with pytest.warns(UserWarning, match="currency"):
        ds = load_orders(d)
    assert "currency" not in ds.feature_names and "channel" not in ds.feature_names
    assert any("currency" in w and "channel" in w for w in ds.warnings)
    # listed explicitly, a non-numeric column is an error
    _edit_orders_yaml(d, features=["amount_7d_missing_on_purpose"])
    err = _error(d)
    assert err.column == "amount_7d_missing_on_purpose" and "not found" in str(err)
    _edit_orders_yaml(d, features=["currency"])
    err = _error(d)
    assert err.column == "currency" and "numeric" in str(err)


# --- what is known when ---------------------------------------------------------------------


def test_labels_known_at_hides_labels_not_yet_known(base):
    ds = load_orders(base)
    t = pd.Timestamp(ds.ts[len(ds.ts) // 2]) + 20 * DAY
    known = labels_known_at(ds, t)
    later = ds.label_time > t.to_datetime64()
    assert later.any() and np.isnan(known[later]).all()
    early = ~np.isnat(ds.label_time) & ~later
    assert early.any()
    np.testing.assert_array_equal(known[early], ds.label[early])
    # a label is never known for an order placed after t
    assert np.isnan(known[ds.ts > t.to_datetime64()]).all()
    # the same rule in float days, and per order
    t_days = (t - pd.Timestamp("1970-01-01")) / DAY
    np.testing.assert_array_equal(labels_known_at(ds, t_days), known)
    np.testing.assert_array_equal(labels_known_at(ds, np.full(ds.n_orders, t_days)), known)
    # matured cohorts only: frauds are known sooner, so young orders would look fraud-heavy
    mature = labels_known_at(ds, t, mature_days=60)
    assert np.isnan(mature[ds.t_days > t_days - 60]).all()
    young = np.isfinite(known) & (ds.t_days > t_days - 60)
    assert np.nanmean(known[young]) > np.nanmean(mature)


def test_reference_time_hides_labels_known_after_it(base, tmp_path):
    d = _copy(base, tmp_path)
    ref = load_orders(base)
    now = pd.Timestamp(ref.ts.max()) + DAY
    _edit_orders_yaml(d, reference_time=now.isoformat())
    ds = load_orders(d)
    np.testing.assert_array_equal(ds.label, labels_known_at(ref, now))
    assert np.isfinite(ref.label).sum() > np.isfinite(ds.label).sum() > 0


def test_labels_arrive_with_a_delay(world):
    o, seg = world["orders"], world["segments"]
    delay = ((o["label_known_at"] - o["ts"]) / DAY).to_numpy()
    fraud = (o["is_fraud"] == 1).fillna(False).to_numpy()
    clean = (o["is_fraud"] == 0).fillna(False).to_numpy()
    assert fraud.sum() > 100
    assert (delay[fraud] >= 7).all() and 20 < np.median(delay[fraud]) < 60
    np.testing.assert_allclose(delay[clean], 60.0, atol=1e-6)
    # recent orders are unlabeled at the reference time, and some orders never are
    ref = world["meta"]["reference_time"]
    recent = (o["ts"] > ref - 60 * DAY).to_numpy()
    assert o["is_fraud"][recent & ~seg["fraud"].to_numpy()].isna().all()
    assert 0.02 < o["is_fraud"][(o["ts"] < ref - 100 * DAY).to_numpy()].isna().mean() < 0.1


def test_links_after_the_order_exist(world):
    o, links = world["orders"], world["links"]
    at = links["order_id"].map(o.set_index("order_id")["ts"])
    late = (links["ts"] > at).to_numpy()
    assert late.mean() > 0.02  # later device sightings and chargeback gateways
    assert (links["ts"] >= at).all()
    # the dispute gateways appear only at label time, and only on frauds
    gate = late & (links["ts"] == links["order_id"].map(o.set_index("order_id")["label_known_at"]))
    fraud = links["order_id"].map(world["segments"].set_index("order_id")["fraud"]).to_numpy()
    assert gate.sum() > 50 and fraud[gate & (links["entity_type"] == "ip").to_numpy()].all()


# --- the simulated world -------------------------------------------------------------------


def _buyers_per_entity(world: dict, etype: str) -> pd.Series:
    links = world["links"]
    links = links[links["entity_type"] == etype]
    buyer = links["order_id"].map(world["orders"].set_index("order_id")["buyer_id"])
    return buyer.groupby(links["entity_id"].to_numpy()).nunique()


def test_rings_share_entities_across_buyers(world):
    seg = world["segments"].set_index("order_id")
    links = world["links"]
    for etype in ("device", "card"):
        per_entity = _buyers_per_entity(world, etype)
        sub = links[links["entity_type"] == etype]
        s = sub["order_id"].map(seg["segment"]).to_numpy()
        ring_ent = sub["entity_id"][(s == "ring")].unique()
        legit_ent = sub["entity_id"][(s == "legit")].unique()
        assert per_entity[ring_ent].median() >= 3, etype
        assert per_entity[legit_ent].median() == 1, etype


def test_ato_orders_use_devices_shared_across_accounts(world):
    seg = world["segments"].set_index("order_id")
    o = world["orders"].set_index("order_id")
    links = world["links"]
    at_order = links["ts"].to_numpy() == links["order_id"].map(o["ts"]).to_numpy()
    dev = links[(links["entity_type"] == "device").to_numpy() & at_order]
    ato = dev["order_id"].map(seg["segment"]).to_numpy() == "ato"
    per_device = dev["order_id"].map(o["buyer_id"]).groupby(dev["entity_id"].to_numpy()).nunique()
    ato_devices = per_device[dev["entity_id"][ato].unique()]
    assert (ato_devices >= 2).mean() > 0.7
    # and the accounts are old: account age does not give them away
    age = o["account_age_days"]
    s = seg["segment"].reindex(o.index).to_numpy()
    assert age[s == "ato"].median() > 180
    assert age[s == "ring"].median() < 60


def test_true_fraud_probability_is_higher_in_rings_and_ato(world):
    seg, p = world["segments"], world["truth"]["p_fraud"].to_numpy()
    s = seg["segment"].to_numpy()
    burst = (s == "ring") & ~seg["ring_warmup"].to_numpy()
    legit = p[s == "legit"].mean()
    assert 0.001 < legit < 0.02
    assert p[s == "ato"].mean() > 10 * legit and p[burst].mean() > 10 * legit
    assert abs(p[s == "supernode"].mean() - legit) < 0.01
    # the drawn outcome follows the truth
    fraud = seg["fraud"].to_numpy()
    assert abs(fraud.mean() - p.mean()) < 0.003
    assert 0.005 < fraud.mean() < 0.04


def test_velocity_features_count_only_the_buyers_past_orders(world):
    o = world["orders"]
    sample = pd.unique(o["buyer_id"])[:200]
    sub = o[o["buyer_id"].isin(sample)].sort_values(["buyer_id", "ts"])
    for _, g in sub.groupby("buyer_id"):
        ts = g["ts"].to_numpy()
        want = [((ts < t) & (ts >= t - np.timedelta64(1, "D"))).sum() for t in ts]
        np.testing.assert_array_equal(g["buyer_orders_24h"].to_numpy(), want)
        want7 = [((ts < t) & (ts >= t - np.timedelta64(7, "D"))).sum() for t in ts]
        np.testing.assert_array_equal(g["buyer_orders_7d"].to_numpy(), want7)
        assert np.isnan(g["days_since_last_order"].iloc[0])
    assert (o["hour_of_day"] == o["ts"].dt.hour).all()


def test_same_seed_same_world(tmp_path):
    cfg = OrderSimConfig(n_orders=2000, seed=4)
    a, b = simulate_orders(cfg), simulate_orders(cfg)
    for key in ("orders", "links", "truth", "segments"):
        pd.testing.assert_frame_equal(a[key], b[key])
    c = simulate_orders(cfg.model_copy(update={"seed": 5}))
    assert not a["truth"]["p_fraud"].equals(c["truth"]["p_fraud"])
    simulate_orders_to_dir(cfg, tmp_path / "x")
    simulate_orders_to_dir(cfg, tmp_path / "y")
    for name in ("orders", "order_links", "order_truth", "order_segments"):
        assert pq.read_table(tmp_path / "x" / f"{name}.parquet").equals(
            pq.read_table(tmp_path / "y" / f"{name}.parquet")
        )


def test_failed_simulation_leaves_the_old_output(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    bad = OrderSimConfig(n_orders=2000, n_buyers=2000, ato_order_share=0.3, ring_order_share=0.3)
    with pytest.raises(ValueError, match="legit orders"):
        simulate_orders_to_dir(bad, out)
    assert [p.name for p in tmp_path.iterdir()] == ["data"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_simulates_an_order_dataset(tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(
        app,
        ["simulate", "--family", "orders", "--orders", "2000", "--users", "300", "--out", str(out)],
    )
    assert res.exit_code == 0, res.output
    ds = load_orders(out)
    assert ds.n_orders == 2000 and ds.stats["buyers"] <= 300
    res = runner.invoke(app, ["simulate", "--orders", "2000", "--out", str(tmp_path / "z")])
    assert res.exit_code == 2 and "--family orders" in res.output
    assert not (tmp_path / "z").exists()
