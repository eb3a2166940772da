"""The whole pipeline: evaluation against the truth, stage reuse, and guardrails in scoring."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from creditgraph.config import PipelineConfig
from creditgraph.evaluate.run import run_evaluation
from creditgraph.pipeline import RECORD, run_pipeline


def _small_config() -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.model.hidden, cfg.model.heads, cfg.model.mc_dropout_samples = 16, 2, 2
    cfg.train.epochs, cfg.train.num_workers = 2, 1
    cfg.partition.num_parts = 6
    cfg.evaluate.baselines = ["lgbm_slearner", "constant"]
    return cfg


def test_pipeline_runs_then_reuses_unchanged_stages(sim_data, tmp_path):
    cfg = _small_config()
    run = tmp_path / "run"
    first = run_pipeline(sim_data, run, cfg)
    assert list(first) == ["build", "partition", "pretrain", "train", "evaluate"]
    assert not any(r["reused"] for r in first.values())
    rows = {r["name"]: r for r in first["evaluate"]["rows"]}
    assert {"creditgraph", "lgbm_slearner", "constant"} <= set(rows)
    # a learned model must beat the constant-rate curve against the truth
    assert rows["creditgraph"]["mise"] < rows["constant"]["mise"]
    assert 0.5 < rows["creditgraph"]["auc"] <= 1
    figures = {p.name for p in (run / "eval" / "figures").iterdir()}
    assert {"curves_by_segment.png", "calibration.png", "mise.png", "policy.png"} <= figures
    assert all((run / "eval" / "figures" / f).stat().st_size > 10_000 for f in figures)

    again = run_pipeline(sim_data, run, cfg)
    assert all(r["reused"] for r in again.values())

    # a changed training setting re-runs training and everything after it, nothing before
    cfg.train.epochs = 3
    third = run_pipeline(sim_data, run, cfg)
    assert [k for k, r in third.items() if not r["reused"]] == ["train", "evaluate"]
    assert set(json.loads((run / RECORD).read_text())) == set(third)


def test_ablations_are_trained_and_scored_in_the_same_run(trained_run):
    cfg = _small_config()
    cfg.evaluate.ablations = ["no_interference"]
    cfg.evaluate.baselines = ["constant"]
    report = run_evaluation(trained_run, cfg)
    names = [r["name"] for r in report["rows"]]
    assert names == ["creditgraph", "no_interference", "constant"]
    assert (trained_run / "ablations" / "no_interference" / "model.json").exists()
    assert all(np.isfinite(r["mise"]) for r in report["rows"])


def test_guardrail_rules_cap_the_users_they_flag(trained_run, sim_data, tmp_path):
    from creditgraph.rules.config import RulesConfig
    from creditgraph.rules.learn import learn_rules
    from creditgraph.serving.score import score_users

    rules_dir = tmp_path / "rules"
    learn_rules(sim_data, rules_dir, RulesConfig(min_confidence=0.15), show=False)
    cfg = PipelineConfig()
    # a loose ceiling, so the small test model grants credit that the guardrail must take back
    cfg.policy.r_max = 0.5
    summary = score_users(trained_run, sim_data, tmp_path / "out", cfg, rules_dir=str(rules_dir))
    dec = pd.read_parquet(tmp_path / "out" / "decisions.parquet")
    flagged = dec[dec["rule"].notna() & (dec["rule"] != "")]
    assert len(flagged) > 0, "the rule set flagged nobody"
    assert (flagged["limit"] <= cfg.policy.guardrail.cap).all()
    capped = flagged[flagged["risk_limit"] > cfg.policy.guardrail.cap]
    assert len(capped) > 0, "no flagged user would have had credit without the guardrail"
    assert (capped["binding_constraint"] == "guardrail").all()
    assert summary["binding_constraints"].get("guardrail", 0) == len(capped)
    assert (
        dec.loc[dec["rule"].isna() | (dec["rule"] == ""), "binding_constraint"] != "guardrail"
    ).all()
    assert set(flagged["rule"]) <= {f"R{i}" for i in range(1, 100)}
