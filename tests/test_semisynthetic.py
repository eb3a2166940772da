"""Semi-synthetic data on the real UCI covariates, and the converters from CSV to a dataset."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from creditgraph.cli import app
from creditgraph.data.convert import UCI_ALIASES, UCI_FEATURES, convert_csv, convert_uci
from creditgraph.data.errors import DataValidationError
from creditgraph.data.load import load_dataset
from creditgraph.data.semisynthetic import (
    SemiSyntheticConfig,
    nice_grid,
    semisynthetic_to_dir,
    simulate_semisynthetic,
)

UCI = Path(__file__).resolve().parents[2] / "shared" / "data" / "uci_taiwan_credit_default.csv"
N = 3000


@pytest.fixture(scope="module")
def uci_sample(tmp_path_factory) -> Path:
    """A 3,000-row sample of the real UCI file, as a CSV."""
    raw = pd.read_csv(UCI).sample(N, random_state=0).sort_values("ID")
    path = tmp_path_factory.mktemp("uci") / "uci_sample.csv"
    raw.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def semi(uci_sample, tmp_path_factory):
    """The semi-synthetic dataset on the sample: (directory, config, raw CSV)."""
    cfg = SemiSyntheticConfig(seed=5)
    out = tmp_path_factory.mktemp("semi") / "data"
    semisynthetic_to_dir(uci_sample, cfg, out)
    return out, cfg, pd.read_csv(uci_sample)


def _tables(root: Path) -> dict[str, pd.DataFrame]:
    return {
        name: pd.read_parquet(root / f"{name}.parquet")
        for name in ("users", "truth", "segments", "links")
        if (root / f"{name}.parquet").exists()
    }


def _curves(truth: pd.DataFrame, n: int) -> tuple[np.ndarray, np.ndarray]:
    grid = np.sort(truth["limit"].unique())
    return grid, truth["p_default"].to_numpy().reshape(n, len(grid))


def test_dataset_validates_in_the_contract(semi):
    root, _, raw = semi
    ds = load_dataset(root)
    assert ds.n_users == N
    assert ds.feature_names == list(UCI_FEATURES.values())  # readable names, Y never a feature
    assert ds.links is not None and len(ds.links) > N
    assert ds.truth is not None and ds.segments is not None
    assert set(ds.ids) == set(raw["ID"])
    meta = json.loads((root / "simulation.json").read_text())
    assert meta["kind"] == "semisynthetic" and meta["resolved"]["treatment"] == "X1"
    assert "Y" in meta["resolved"]["dropped"]


def test_truth_is_non_decreasing_on_the_datas_own_scale(semi):
    root, _, raw = semi
    t = _tables(root)
    grid, p = _curves(t["truth"], N)
    assert np.all(np.diff(p, axis=1) >= -1e-6)
    assert np.all(p[:, -1] > p[:, 0])  # the limit matters for everyone
    # 0 .. the 99th percentile of real limits (NT$), in ~40 round steps
    assert grid[0] == 0 and grid[-1] >= np.quantile(raw["X1"], 0.99)
    assert 30 <= len(grid) <= 60 and len(np.unique(np.diff(grid))) == 1
    # the outcome was drawn from the truth at the logged limit (checked where it is on the grid)
    u = t["users"].set_index("user_id")
    seg = t["segments"].set_index("user_id")
    lim = u["credit_limit"].to_numpy()
    col = np.searchsorted(grid, lim)
    on_grid = (col < len(grid)) & (grid[np.minimum(col, len(grid) - 1)] == lim)
    assert on_grid.sum() > 100
    rows = np.flatnonzero(on_grid)
    np.testing.assert_allclose(
        p[rows, col[rows]], seg["p_default_observed"].to_numpy()[rows], rtol=1e-5
    )


def test_logged_limits_are_the_real_ones_except_limit_tests(semi):
    root, _, raw = semi
    t = _tables(root)
    x1 = raw.set_index("ID")["X1"]
    u = t["users"].set_index("user_id")
    test = t["segments"].set_index("user_id")["limit_test"].reindex(u.index).to_numpy()
    lim = u["credit_limit"].to_numpy()
    real = x1.reindex(u.index).to_numpy(dtype=float)
    np.testing.assert_array_equal(lim[~test], real[~test])
    assert 0.07 < test.mean() < 0.13  # the default 10 %
    lo, hi = np.quantile(raw["X1"], [0.01, 0.99])
    tested = lim[test]
    assert 0.03 < (tested == 0).mean() < 0.2
    pos = tested[tested > 0]
    assert pos.min() >= lo * 0.99 and pos.max() <= hi * 1.01
    assert (tested != real[test]).mean() > 0.8  # they really were re-randomized


def test_simulated_default_rate_is_in_range(semi):
    root, _, _ = semi
    t = _tables(root)
    y = t["users"]["default"]
    assert 0.12 < y.mean() < 0.28
    assert 0.15 < t["segments"]["p_default_observed"].mean() < 0.25
    meta = json.loads((root / "simulation.json").read_text())["resolved"]
    assert meta["default_rate_at_real_limits"] == pytest.approx(0.2, abs=1e-3)
    q = meta["capacity"]["utilisation_quantiles"]
    assert 0.1 < q["q05"] < 0.4 and 2.0 < q["q95"] < 4.5  # real limits span utilisation ~0.2..3


def test_limit_tests_ignore_the_covariates(uci_sample):
    # half the rows in limit tests, so that a correlation of ~0 is measured tightly
    cfg = SemiSyntheticConfig(seed=5, limit_test_share=0.5, links=False)
    t = simulate_semisynthetic(uci_sample, cfg)
    u, seg = t["users"], t["segments"]
    test = seg["limit_test"].to_numpy()
    lim = np.log1p(u["credit_limit"].to_numpy())
    real = np.log(seg["real_limit"].to_numpy())
    cap = np.log(seg["capacity"].to_numpy())
    assert 0.45 < test.mean() < 0.55
    assert abs(np.corrcoef(lim[test], real[test])[0, 1]) < 0.1
    assert abs(np.corrcoef(lim[test], cap[test])[0, 1]) < 0.1
    assert np.corrcoef(lim[~test], real[~test])[0, 1] > 0.99
    assert np.corrcoef(lim[~test], cap[~test])[0, 1] > 0.3  # the real policy tracks capacity


def test_missing_not_at_random(semi):
    root, _, _ = semi
    t = _tables(root)
    risk = t["segments"]["latent_risk"].to_numpy()
    for col in ("education", "bill_amt_sep", "pay_amt_sep"):
        miss = t["users"][col].isna().to_numpy()
        assert 0.03 < miss.mean() < 0.35, col
        assert risk[miss].mean() > risk[~miss].mean() + 0.3, col
    assert t["users"]["age"].notna().all()  # the real covariates have no gaps of their own


def test_rings_share_devices_before_as_of_and_are_riskier(semi):
    root, _, _ = semi
    t = _tables(root)
    seg, links = t["segments"], t["links"]
    ring = seg.set_index("user_id")["ring_id"]
    as_of = t["users"].set_index("user_id")["as_of"]
    lk = links.assign(ring=ring.reindex(links["user_id"]).to_numpy())
    lk = lk[(lk["ring"] >= 0) & lk["entity_type"].isin(["device", "phone"])]
    lk = lk[lk["ts"] <= as_of.reindex(lk["user_id"]).to_numpy()]  # seen by the decision
    shared = lk.groupby(["entity_type", "entity_id"])["user_id"].transform("nunique") >= 2
    members = seg.loc[seg["ring_id"] >= 0, "user_id"]
    assert len(members) > 0.03 * N
    assert lk.loc[shared, "user_id"].nunique() > 0.8 * len(members)
    p = seg["p_default_observed"].to_numpy()
    assert p[seg["ring_id"] >= 0].mean() > 1.5 * p[seg["ring_id"] < 0].mean()
    # public super-nodes and links first seen after as_of exist
    deg = links.groupby(["entity_type", "entity_id"])["user_id"].nunique()
    assert deg.max() > 30
    after = links["ts"].to_numpy() > as_of.reindex(links["user_id"]).to_numpy()
    assert 0.05 < after.mean() < 0.5


def test_truth_does_not_depend_on_links_after_as_of(uci_sample):
    a = simulate_semisynthetic(uci_sample, SemiSyntheticConfig(seed=2, future_link_share=0.0))
    b = simulate_semisynthetic(uci_sample, SemiSyntheticConfig(seed=2, future_link_share=0.4))

    def late(tables) -> int:
        as_of = tables["users"].set_index("user_id")["as_of"]
        lk = tables["links"]
        return int((lk["ts"].to_numpy() > as_of.reindex(lk["user_id"]).to_numpy()).sum())

    assert late(b) > late(a) + 1000
    for key in ("user_id", "limit", "p_default"):
        np.testing.assert_array_equal(a["truth"][key], b["truth"][key])
    pd.testing.assert_frame_equal(a["users"], b["users"])
    pd.testing.assert_frame_equal(a["segments"], b["segments"])


def test_outcome_is_unlabeled_until_it_matures(semi):
    root, cfg, _ = semi
    u = _tables(root)["users"]
    start = pd.Timestamp(cfg.start)
    snapshot = start + pd.Timedelta(days=cfg.span_days + cfg.snapshot_lag_days)
    immature = (u["as_of"] + pd.Timedelta(days=cfg.label_window_days) > snapshot).to_numpy()
    assert 0.1 < immature.mean() < 0.6
    assert u.loc[immature, "default"].isna().all()
    assert u.loc[~immature, "default"].notna().all()
    assert u["as_of"].min() >= start
    assert u["as_of"].max() <= start + pd.Timedelta(days=cfg.span_days)


def test_same_seed_same_files_other_seed_differs(uci_sample, tmp_path):
    cfg = SemiSyntheticConfig(n_users=800, seed=9)
    for name in ("a", "b"):
        semisynthetic_to_dir(uci_sample, cfg, tmp_path / name)
    semisynthetic_to_dir(uci_sample, cfg.model_copy(update={"seed": 10}), tmp_path / "c")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "links.parquet" in files and "truth.parquet" in files
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    a, c = _tables(tmp_path / "a"), _tables(tmp_path / "c")
    assert not a["users"]["credit_limit"].equals(c["users"]["credit_limit"])
    assert not np.array_equal(a["truth"]["p_default"], c["truth"]["p_default"])


def test_no_links_gives_a_tabular_dataset(uci_sample, tmp_path):
    summary = semisynthetic_to_dir(
        uci_sample, SemiSyntheticConfig(n_users=500, seed=1, links=False), tmp_path / "d"
    )
    assert not (tmp_path / "d" / "links.parquet").exists()
    ds = load_dataset(tmp_path / "d")
    assert ds.links is None and ds.spec.links is None and ds.n_users == 500
    assert summary["links"] == 0 and "ring" not in summary["segments"]


def test_generic_csv_needs_a_treatment_and_skips_text(uci_sample, tmp_path, caplog):
    raw = pd.read_csv(uci_sample).rename(columns={"ID": "id", "X1": "granted"})
    raw = raw.drop(columns=["Y"]).assign(city="Taipei", blank=np.nan)
    path = tmp_path / "generic.csv"
    raw.to_csv(path, index=False)
    with pytest.raises(DataValidationError, match="--treatment") as err:
        simulate_semisynthetic(path, SemiSyntheticConfig())
    assert err.value.file == str(path)
    with caplog.at_level(logging.WARNING):
        t = simulate_semisynthetic(path, SemiSyntheticConfig(treatment="granted", seed=3))
    assert "city" in caplog.text and "blank" in caplog.text
    u = t["users"]
    assert "city" not in u.columns and "blank" not in u.columns
    assert "id" not in u.columns  # the id column is recognised
    np.testing.assert_array_equal(u["user_id"], raw["id"])
    assert "X2" in u.columns  # no UCI renaming for an unknown layout
    assert len(t["resolved"]["mnar"]) == 3
    assert 0.12 < t["segments"]["p_default_observed"].mean() < 0.28


def test_bad_covariate_files_name_file_column_and_rows(uci_sample, tmp_path):
    raw = pd.read_csv(uci_sample)
    raw.loc[[4, 7], "X1"] = -10
    path = tmp_path / "neg.csv"
    raw.to_csv(path, index=False)
    with pytest.raises(DataValidationError) as err:
        simulate_semisynthetic(path, SemiSyntheticConfig())
    assert err.value.column == "X1" and err.value.rows == [4, 7] and "neg.csv" in str(err.value)
    with pytest.raises(DataValidationError, match="not found") as err:
        simulate_semisynthetic(uci_sample, SemiSyntheticConfig(drop=["nope"]))
    assert err.value.column == "nope"
    with pytest.raises(ValueError, match="rows"):
        simulate_semisynthetic(uci_sample, SemiSyntheticConfig(n_users=N + 1))


def test_nice_grid_takes_round_steps():
    g = nice_grid(500_000, 40)
    assert g[0] == 0 and g[-1] == 500_000 and np.diff(g)[0] == 12_500
    g = nice_grid(83_000, 40)
    assert g[-1] >= 83_000 and 35 <= len(g) <= 45


def test_cli_simulate_with_covariates(uci_sample, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(
        app,
        [
            "simulate",
            "--covariates",
            str(uci_sample),
            "--out",
            str(out),
            "--users",
            "400",
            "--seed",
            "4",
            "--no-links",
            "--limit-test-share",
            "0.5",
        ],
    )
    assert res.exit_code == 0, res.output
    seg = pd.read_parquet(out / "segments.parquet")
    assert len(seg) == 400 and 0.4 < seg["limit_test"].mean() < 0.6
    assert not (out / "links.parquet").exists()
    res = runner.invoke(app, ["simulate", "--out", str(tmp_path / "x"), "--no-links"])
    assert res.exit_code == 2 and not (tmp_path / "x").exists()


# --- converters -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "uci"
    convert_uci(UCI, out)
    return out


def test_converted_uci_validates(converted):
    raw = pd.read_csv(UCI)
    ds = load_dataset(converted)
    assert ds.n_users == 30_000 and len(ds.feature_names) == 22
    assert ds.feature_names[:5] == ["sex", "education", "marriage", "age", "pay_status_sep"]
    np.testing.assert_array_equal(ds.ids, raw["ID"])
    np.testing.assert_array_equal(ds.treatment, raw["X1"].to_numpy(dtype=float))
    np.testing.assert_array_equal(ds.outcome, raw["Y"].to_numpy(dtype=float))
    np.testing.assert_array_equal(ds.feature_matrix()[:, 3], raw["X5"].to_numpy(dtype=float))
    assert ds.links is None and ds.truth is None
    assert (pd.DatetimeIndex(ds.as_of) == pd.Timestamp("2005-10-01")).all()
    meta = json.loads((converted / "conversion.json").read_text())
    assert meta["columns"]["X1"] == "credit_limit" and any("no links" in n for n in meta["notes"])


def test_convert_uci_accepts_the_descriptive_header(tmp_path, converted):
    raw = pd.read_csv(UCI).head(200)
    named = {v: k for k, v in UCI_ALIASES.items() if k != "default.payment.next.month"}
    path = tmp_path / "named.csv"
    raw.rename(columns=named).to_csv(path, index=False)
    convert_uci(path, tmp_path / "out")
    a = pd.read_parquet(tmp_path / "out" / "users.parquet")
    b = pd.read_parquet(converted / "users.parquet").head(200)
    pd.testing.assert_frame_equal(a, b)


def test_convert_refuses_a_csv_that_is_not_the_uci_layout(tmp_path):
    path = tmp_path / "other.csv"
    pd.read_csv(UCI).head(50).drop(columns=["X5"]).to_csv(path, index=False)
    with pytest.raises(DataValidationError, match="UCI") as err:
        convert_uci(path, tmp_path / "out")
    assert err.value.file == str(path) and err.value.column == "X5"
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(app, ["convert", "uci", str(path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "X5" in res.output


def test_convert_csv_generic(tmp_path):
    raw = pd.read_csv(UCI).head(300)
    path = tmp_path / "mine.csv"
    raw.to_csv(path, index=False)
    res = CliRunner().invoke(
        app,
        [
            *("convert", "csv", str(path), "--id", "ID", "--treatment", "X1", "--outcome", "Y"),
            *("--as-of", "2005-10-01", "--out", str(tmp_path / "ds")),
        ],
    )
    assert res.exit_code == 0, res.output
    ds = load_dataset(tmp_path / "ds")
    assert ds.n_users == 300 and len(ds.feature_names) == 22 and ds.spec.id == "ID"
    raw.loc[[3, 9], "Y"] = 2
    raw.to_csv(path, index=False)
    with pytest.raises(DataValidationError) as err:
        convert_csv(
            path, tmp_path / "bad", id="ID", treatment="X1", outcome="Y", as_of="2005-10-01"
        )
    assert err.value.file == str(path) and err.value.column == "Y" and err.value.rows == [3, 9]
    assert not (tmp_path / "bad").exists()


def test_config_may_name_columns_by_their_output_names(uci_sample):
    cfg = SemiSyntheticConfig(n_users=500, mnar={"age": (0.0, 1.0)}, capacity_columns=["X18"])
    t = simulate_semisynthetic(uci_sample, cfg)
    assert t["resolved"]["mnar"] == {"X5": [0.0, 1.0]}
    assert t["resolved"]["capacity"]["columns"] == ["X18"]
    assert 0.3 < t["users"]["age"].isna().mean() < 0.7
    assert t["users"]["education"].notna().all()  # the UCI default MNAR columns are replaced
