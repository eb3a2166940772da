"""CRSL rule sets: the constraint, exports that select the same rows, seeds, missing values, CLI."""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from creditgraph.rules import Condition, ConstrainedRuleSet, Rule, RuleSet
from creditgraph.rules.export import pandas_query, ruleset_text, sql_where
from creditgraph.rules.mining import TreeParams, _score, best_split, mine_rules
from creditgraph.rules.rule import simplify

UCI = Path(__file__).resolve().parents[2] / "shared" / "data" / "uci_taiwan_credit_default.csv"
FAST = {"n_estimators": 12, "max_depth": 3, "n_iterations": 600, "n_chains": 2}


@pytest.fixture(scope="module")
def uci() -> tuple[pd.DataFrame, np.ndarray]:
    df = pd.read_csv(UCI).sample(n=6000, random_state=0).reset_index(drop=True)
    return df.drop(columns=["ID", "Y"]), df["Y"].to_numpy()


@pytest.fixture(scope="module")
def uci_fit(uci, ray_session) -> ConstrainedRuleSet:
    X, y = uci
    return ConstrainedRuleSet(0.6, random_state=0, **FAST).fit(X, y, target_name="Y")


def _with_missing(n: int = 4000, seed: int = 1) -> tuple[pd.DataFrame, np.ndarray]:
    """Default is likely when 'income' is missing or 'late' is high; NaN sprinkled elsewhere."""
    rng = np.random.default_rng(seed)
    income = rng.lognormal(10, 0.5, n)
    late = rng.poisson(1.0, n).astype(float)
    noise = rng.normal(size=n)
    miss = rng.random(n) < 0.2
    p = 0.05 + 0.8 * miss + 0.5 * (late >= 3)
    y = (rng.random(n) < np.clip(p, 0, 0.95)).astype(int)
    income[miss] = np.nan
    late[rng.random(n) < 0.1] = np.nan
    noise[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame({"income": income, "late payments": late, "noise": noise}), y


def _sqlite_rows(df: pd.DataFrame, where: str) -> np.ndarray:
    con = sqlite3.connect(":memory:")
    try:
        df.assign(row_id=np.arange(len(df))).to_sql("users", con, index=False)
        got = con.execute(f"SELECT row_id FROM users WHERE {where}").fetchall()
    finally:
        con.close()
    return np.sort(np.array([r[0] for r in got], dtype=np.int64))


def _all_forms(rs: RuleSet, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows flagged by predict, by the pandas query export and by the SQL export."""
    by_predict = np.flatnonzero(rs.predict(df))
    by_query = np.sort(df.reset_index(drop=True).query(pandas_query(rs)).index.to_numpy())
    return by_predict, by_query, _sqlite_rows(df, sql_where(rs))


# --- the constraint ------------------------------------------------------------------------
def test_selected_set_meets_the_constraint_on_training_data(uci, uci_fit):
    X, y = uci
    flagged = uci_fit.predict(X).astype(bool)
    assert len(uci_fit.rules_) >= 1 and flagged.any()
    assert y[flagged].mean() >= 0.6
    assert uci_fit.fit_stats_["train_confidence"] == pytest.approx(y[flagged].mean())
    # the constraint binds: coverage was pushed well beyond the single best rule
    assert flagged.sum() > max(r.stats["support"] for r in uci_fit.rules_)
    for r in uci_fit.rules_:  # stats attached to each rule are its training numbers
        m = r.covers(X)
        assert r.stats["support"] == m.sum()
        assert r.stats["confidence"] == pytest.approx(y[m].mean())


def test_infeasible_constraint_gives_an_empty_rule_set(uci, ray_session, caplog):
    X, y = uci
    with caplog.at_level(logging.WARNING, logger="creditgraph"):
        m = ConstrainedRuleSet(0.99, random_state=0, **FAST).fit(X, y)
    assert len(m.rules_) == 0
    assert not m.predict(X).any()
    assert "no rule set meets confidence" in caplog.text
    by_predict, by_query, by_sql = _all_forms(m.rules_, X)
    assert by_predict.size == by_query.size == by_sql.size == 0


# --- exports -------------------------------------------------------------------------------
def test_exports_select_exactly_the_predicted_rows(uci, uci_fit):
    X, _ = uci
    by_predict, by_query, by_sql = _all_forms(uci_fit.rules_, X)
    assert by_predict.size > 0
    np.testing.assert_array_equal(by_predict, by_query)
    np.testing.assert_array_equal(by_predict, by_sql)


def test_exports_agree_on_every_kind_of_condition_with_missing_values():
    rng = np.random.default_rng(3)
    n = 3000
    df = pd.DataFrame(
        {
            "a": rng.integers(0, 10, n).astype(float),
            "b col": rng.normal(size=n),
            'c"q': rng.exponential(size=n),
        }
    )
    for col in df.columns:
        df.loc[rng.random(n) < 0.25, col] = np.nan
    rs = RuleSet(
        [
            Rule((Condition("a", "<=", 3), Condition("b col", ">", 0.25, include_missing=True))),
            Rule((Condition('c"q', "is missing"), Condition("a", ">", 7))),
            Rule((Condition("b col", "is not missing"), Condition('c"q', "<=", 0.1))),
            Rule((Condition("a", "<=", 5, include_missing=True), Condition("a", ">", 4))),
        ]
    )
    by_predict, by_query, by_sql = _all_forms(rs, df)
    assert 0 < by_predict.size < n
    np.testing.assert_array_equal(by_predict, by_query)
    np.testing.assert_array_equal(by_predict, by_sql)


def test_learned_exports_agree_on_data_with_missing_values(ray_session):
    X, y = _with_missing()
    m = ConstrainedRuleSet(0.7, random_state=0, **FAST).fit(X, y)
    assert len(m.rules_) >= 1
    by_predict, by_query, by_sql = _all_forms(m.rules_, X)
    np.testing.assert_array_equal(by_predict, by_query)
    np.testing.assert_array_equal(by_predict, by_sql)


# --- missing values ------------------------------------------------------------------------
def test_conditions_never_match_missing_unless_they_say_so():
    v = np.array([1.0, 5.0, np.nan, 9.0])
    assert Condition("x", "<=", 5).mask(v).tolist() == [True, True, False, False]
    assert Condition("x", ">", 5).mask(v).tolist() == [False, False, False, True]
    assert Condition("x", ">", 5, include_missing=True).mask(v).tolist() == [
        False,
        False,
        True,
        True,
    ]
    assert Condition("x", "is missing").mask(v).tolist() == [False, False, True, False]
    assert Condition("x", "is not missing").mask(v).tolist() == [True, True, False, True]
    assert "is missing" in Condition("x", "<=", 5, include_missing=True).text


def test_learner_uses_informative_missingness(ray_session):
    X, y = _with_missing()
    m = ConstrainedRuleSet(0.7, random_state=0, **FAST).fit(X, y)
    conds = [c for r in m.rules_ for c in r.conditions if c.feature == "income"]
    assert any(c.op == "is missing" or c.include_missing for c in conds), ruleset_text(m.rules_)
    missing = X["income"].isna().to_numpy()
    flagged = m.predict(X).astype(bool)
    assert flagged[missing].mean() > 0.5  # the rows whose missing income signals default
    # a row matched only through a comparison never has that feature missing
    for r in m.rules_:
        hit = r.covers(X)
        for c in r.conditions:
            if c.op in ("<=", ">") and not c.include_missing:
                assert not X[c.feature].isna().to_numpy()[hit].any()


# --- reproducibility -----------------------------------------------------------------------
def test_same_seed_same_rules_and_ray_matches_in_process(uci, uci_fit, ray_session):
    X, y = uci
    again = ConstrainedRuleSet(0.6, random_state=0, **FAST).fit(X, y, target_name="Y")
    local = ConstrainedRuleSet(0.6, random_state=0, use_ray=False, **FAST).fit(
        X, y, target_name="Y"
    )
    texts = [r.text for r in uci_fit.rules_]
    assert [r.text for r in again.rules_] == texts
    assert [r.text for r in local.rules_] == texts


def test_different_seeds_mine_different_candidates(uci):
    X, y = uci
    params = TreeParams(min_confidence=0.6, base_rate=float(y.mean()), max_depth=3, min_leaf=30)
    Xa = X.to_numpy(dtype=float)
    names = list(X.columns)
    a = mine_rules(Xa, y.astype(float), names, params, n_estimators=4, seed=1, use_ray=False)
    b = mine_rules(Xa, y.astype(float), names, params, n_estimators=4, seed=2, use_ray=False)
    c = mine_rules(Xa, y.astype(float), names, params, n_estimators=4, seed=1, use_ray=False)
    assert [r.key for r in a] == [r.key for r in c]
    assert {r.key for r in a} != {r.key for r in b}


# --- internals checked against slow reference versions --------------------------------------
def test_vectorized_split_search_matches_brute_force():
    rng = np.random.default_rng(7)
    n, k = 300, 4
    X = rng.integers(0, 12, size=(n, k)).astype(float)
    X[rng.random((n, k)) < 0.15] = np.nan
    y = (rng.random(n) < 0.3 + 0.04 * np.nan_to_num(X[:, 0])).astype(float)
    w = rng.integers(1, 3, n).astype(float)
    params = TreeParams(min_confidence=0.6, base_rate=0.35, min_leaf=15, fitness_weight=0.5)
    score, j, kind, t, to = best_split(X, y, w, params)
    W, P = w.sum(), (w * y).sum()
    best = -np.inf
    for f in range(k):
        col = X[:, f]
        miss = np.isnan(col)
        vals = np.unique(col[~miss])
        lefts = [("missing", miss)]
        for a, b in itertools.pairwise(vals):
            le = ~miss & (col <= (a + b) / 2)
            lefts += [("cmp", le), ("cmp", le | miss)]
        for _, left in lefts:
            wl, pl = w[left].sum(), (w * y)[left].sum()
            s = _score(*map(np.atleast_1d, (wl, pl, W - wl, P - pl)), W, P, params)[0]
            best = max(best, s)
    assert score == pytest.approx(best)
    # the returned split is real: recompute its score from its description
    col = X[:, j]
    miss = np.isnan(col)
    left = miss if kind == "missing" else (~miss & (col <= t)) | (miss & (to == "left"))
    wl, pl = w[left].sum(), (w * y)[left].sum()
    s = _score(*map(np.atleast_1d, (wl, pl, W - wl, P - pl)), W, P, params)[0]
    assert s == pytest.approx(score)


def test_simplify_keeps_the_matched_rows():
    rng = np.random.default_rng(11)
    df = pd.DataFrame({"x": rng.integers(0, 10, 500).astype(float)})
    df.loc[rng.random(500) < 0.2, "x"] = np.nan
    ops = ["<=", ">", "is missing", "is not missing"]
    for _ in range(200):
        conds = []
        for _ in range(rng.integers(1, 4)):
            op = ops[rng.integers(4)]
            if op in ("<=", ">"):
                conds.append(
                    Condition("x", op, float(rng.integers(0, 10)), bool(rng.random() < 0.5))
                )
            else:
                conds.append(Condition("x", op))
        want = Rule(tuple(conds)).covers(df)
        simple = simplify(conds)
        if simple is None:
            assert not want.any()
        else:
            assert len(simple) <= 2
            np.testing.assert_array_equal(Rule(simple).covers(df), want)


# --- text / JSON ---------------------------------------------------------------------------
def test_text_and_json_roundtrip(uci, uci_fit, tmp_path):
    X, _ = uci
    rs = uci_fit.rules_
    back = RuleSet.from_json(rs.to_json())
    assert back.rules == rs.rules
    assert [r.name for r in back] == [r.name for r in rs] == [f"R{i + 1}" for i in range(len(rs))]
    assert [r.stats for r in back] == [r.stats for r in rs]
    assert back.target == "Y" and back.min_confidence == 0.6
    uci_fit.save(tmp_path / "rules.json")
    est = ConstrainedRuleSet.load(tmp_path / "rules.json")
    np.testing.assert_array_equal(est.predict(X), uci_fit.predict(X))
    np.testing.assert_array_equal(est.predict(X.to_numpy()), uci_fit.predict(X))
    text = ruleset_text(rs)
    for r in rs:
        assert f"{r.name}: IF {r.text}" in text
    # match names the first firing rule, None where nothing fires
    names = rs.match(X)
    cov = rs.coverage(X)
    for i in np.flatnonzero(cov.any(axis=1))[:50]:
        assert names[i] == rs.rules[int(np.argmax(cov[i]))].name
    assert all(v is None for v in names[~cov.any(axis=1)])
    assert set(rs.match(X, what="text")) - {None} <= {r.text for r in rs}


def test_rule_json_rejects_bad_documents():
    with pytest.raises(ValueError, match="unknown operator"):
        Condition.from_dict({"feature": "x", "op": "<>", "threshold": 1})
    with pytest.raises(ValueError, match="finite threshold"):
        Condition("x", "<=", float("nan"))
    with pytest.raises(ValueError, match="not a rule set"):
        RuleSet.from_dict({"kind": "something else", "rules": []})
    doc = json.loads(RuleSet([Rule((Condition("x", ">", 1),), name="R1")]).to_json())
    assert doc["rules"][0]["conditions"][0] == {
        "feature": "x",
        "op": ">",
        "threshold": 1.0,
        "include_missing": False,
    }


# --- CLI -----------------------------------------------------------------------------------
def test_cli_rules_on_the_uci_csv(tmp_path, ray_session):
    from creditgraph.cli import app

    csv = tmp_path / "uci.csv"
    pd.read_csv(UCI).sample(n=5000, random_state=1).to_csv(csv, index=False)
    out = tmp_path / "rules"
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text("rules:\n  estimator:\n    n_estimators: 10\n    n_iterations: 500\n")
    args = ["rules", "--data", str(csv), "--target", "Y", "--min-confidence", "0.6"]
    res = CliRunner().invoke(app, [*args, "--out", str(out), "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {
        "rules.json",
        "rules.sql",
        "rules.txt",
        "summary.json",
    }
    summary = json.loads((out / "summary.json").read_text())
    rs = RuleSet.load(out)
    assert summary["n_rules"] == len(rs) >= 1
    assert "ID" not in summary["features"] and "Y" not in summary["features"]
    assert summary["train"]["confidence"] >= 0.6
    for row in summary["rules"]:  # validation support/confidence of each rule is printed
        assert row["name"] in res.output
    assert "validation" in res.output
    sql = (out / "rules.sql").read_text()
    where = sql.split("WHERE", 1)[1]
    df = pd.read_csv(csv)
    np.testing.assert_array_equal(_sqlite_rows(df, where), np.flatnonzero(rs.predict(df)))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--target", "no_such_column"], "no_such_column"),
        (["--target", "X3"], "target must be 0, 1 or missing"),
        (["--target", "Y", "--min-confidence", "1.5"], "min_confidence"),
    ],
)
def test_cli_rules_bad_input(tmp_path, extra, needle):
    from creditgraph.cli import app

    csv = tmp_path / "small.csv"
    pd.read_csv(UCI, nrows=300).to_csv(csv, index=False)
    res = CliRunner().invoke(
        app, ["rules", "--data", str(csv), "--out", str(tmp_path / "o"), *extra]
    )
    assert res.exit_code == 2
    assert needle in res.output
    assert not (tmp_path / "o").exists()


def test_cli_rules_on_a_dataset_directory(tmp_path, ray_session):
    from creditgraph.cli import app
    from creditgraph.data.simulate import SimulationConfig, simulate_to_dir

    data = tmp_path / "sim"
    simulate_to_dir(SimulationConfig(n_users=3000, seed=0), data)
    out = tmp_path / "rules"
    res = CliRunner().invoke(
        app, ["rules", "--data", str(data), "--min-confidence", "0.3", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"] == "default"  # the dataset's outcome column
    assert "credit_limit" not in summary["features"]  # the treatment only on request
    assert summary["rows"]["unlabeled_dropped"] > 0
    assert summary["train"]["confidence"] is None or summary["train"]["confidence"] >= 0.3
    # the guardrail path: a stored rule set applied to a dataset's users
    from creditgraph.data.load import load_dataset
    from creditgraph.rules.learn import dataset_features

    ds = load_dataset(data)
    frame = dataset_features(ds)
    rs = RuleSet.load(out / "rules.json")
    hit = rs.match(frame)
    assert len(hit) == ds.n_users
    np.testing.assert_array_equal(hit != None, rs.predict(frame).astype(bool))  # noqa: E711
    assert set(hit[hit != None]) <= {r.name for r in rs}  # noqa: E711
