"""Decisions a risk officer can sign: calibration, the certified bound, the deployed policy's
report stage by stage, and off-policy evaluation of a candidate policy before deployment."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from creditgraph.config import PipelineConfig, override_many
from creditgraph.evaluate.run import run_evaluation
from creditgraph.layout import RunLayout
from creditgraph.policy.calibrate import Calibration
from creditgraph.serving.context import ScoringBundle
from creditgraph.serving.policy_eval import evaluate_policies


def test_calibration_stage_writes_a_calibrator_and_a_guarantee_per_ceiling(trained_run):
    files = RunLayout(trained_run).calibration
    assert files.exists() and files.calibrator.exists() and files.reliability.exists()
    cal = Calibration.load(trained_run)
    assert {0.05, 0.10, 0.20} <= set(cal.lambdas)
    statement = cal.statements[0.10]
    for word in ("exchangeab", "overlap", "propensity"):
        assert word in statement.lower(), statement
    p = np.linspace(0.001, 0.6, 50)
    out = cal.calibrate(p)
    assert np.all(np.diff(out) >= 0) and out.min() >= 0 and out.max() <= 1  # monotone map
    manifest = json.loads(files.manifest.read_text())["summary"]
    assert manifest["n_calibration_half"] > 0 and manifest["n_guarantee_half"] > 0


def test_scored_decisions_rest_on_the_certified_bound(scored, trained_run):
    out, summary, _ = scored
    dec = pd.read_parquet(out / "decisions.parquet")
    cur = pd.read_parquet(out / "curves.parquet")
    bundle = ScoringBundle.load(trained_run)
    g = summary["guarantee"]
    assert g == bundle.deployed.guarantee() and "statement" in g
    assert (cur["p_upper"] >= cur["p_default"] - 1e-6).all()  # the bound is above the estimate
    plain = dec["binding_constraint"].isin(["risk_ceiling", "grid_max", "dsl", "cluster_cap"])
    granted = plain & (dec["limit"] > 0)
    # where only risk decided, the bound at the granted limit is under the (effective) ceiling
    assert (
        dec.loc[granted, "p_upper_at_limit"] <= dec.loc[granted, "r_max_effective"] + 1e-9
    ).all()


def test_evaluation_reports_each_policy_stage_and_the_frontier(trained_run, sim_data):
    cfg = override_many(PipelineConfig(), {"evaluate.baselines": ["lgbm_slearner", "constant"]})
    report = run_evaluation(trained_run, cfg.evaluate, data_dir=sim_data, policy=cfg.policy)
    stages = {r["policy"] for r in report["policies"] if r["name"] == "creditgraph"}
    assert {"bare", "calibrated", "guaranteed", "deployed"} <= stages
    rows = {(r["name"], r["policy"]): r for r in report["policies"]}
    assert len(rows) == len(report["policies"]), "a (method, policy) row appears twice"
    for row in rows.values():
        assert 0 <= row["over_ceiling_rate"] <= 1 and 0 <= row["limit_satisfaction"] <= 1
    assert ("lgbm_slearner", "bare") in rows
    # the guaranteed policy grants no more than the calibrated one (it decides on the bound)
    assert rows[("creditgraph", "guaranteed")]["granted_ratio"] <= (
        rows[("creditgraph", "calibrated")]["granted_ratio"] + 1e-9
    )
    methods = {r["method"] for r in report["ope"]}
    assert methods == {"dm", "ipw", "snipw", "dr"}
    assert all(r["true_default_rate"] is not None for r in report["ope"])
    figures = {p.name for p in (trained_run / "eval" / "figures").iterdir()}
    assert {"frontier.png", "reliability.png"} <= figures
    metrics = json.loads((trained_run / "eval" / "metrics.json").read_text())
    assert metrics["frontier"] and metrics["guarantee"]["for_r_max"] == pytest.approx(0.1)


def test_off_policy_evaluation_of_candidate_policies(trained_run, sim_data, tmp_path):
    # without the guarantee: the small test model certifies no tightening, so a guaranteed
    # policy would grant nobody and leave nothing to estimate
    base = PipelineConfig().policy.model_copy(update={"guarantee": None})
    candidates = {
        # both above the small model's risk at limit 0 (about 0.1), so both grant
        "strict": base.model_copy(update={"r_max": 0.12}),
        "loose": base.model_copy(update={"r_max": 0.25}),
    }
    result = evaluate_policies(trained_run, sim_data, candidates, tmp_path / "ope")
    strict, loose = result["policies"]["strict"], result["policies"]["loose"]
    assert strict["summary"]["granted_total"] <= loose["summary"]["granted_total"]
    for entry in (strict, loose):
        methods = {r["method"]: r for r in entry["estimates"]}
        assert set(methods) == {"dm", "ipw", "snipw", "dr"}
        for r in methods.values():
            # IPW and DR are unbiased but not range-bound: with the 3-epoch model's density
            # their estimates can leave [0, 1] (the effective sample size warns); finite, though
            assert np.isfinite(r["default_rate"]) and r["ci_low"] <= r["ci_high"], r
        assert 0 <= methods["dm"]["default_rate"] <= 1
        # the direct method's error against the truth is small on the model's own data
        assert abs(methods["dm"]["default_rate"] - entry["truth"]["portfolio_default_rate"]) < 0.1
        assert "truth" in entry and entry["randomized"]  # the limit tests' known density
    assert (tmp_path / "ope" / "report.md").read_text().count("dr") >= 2
