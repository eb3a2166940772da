"""Batch rescoring on Ray Data and the two-stage (lambda) inference it is built on."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from creditgraph.config import PipelineConfig
from creditgraph.data.errors import DataValidationError
from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.graph.features import FeatureStandardizer
from creditgraph.graph.partition import shard_paths
from creditgraph.model.artifact import load_model
from creditgraph.model.predict import DSLStats, Predictor, predict_shards
from creditgraph.policy.decide import BINDINGS
from creditgraph.serving.embed import default_store_uri
from creditgraph.serving.online import LastHopScorer, Neighbourhood, teacher_prior
from creditgraph.serving.score import score_users
from creditgraph.serving.store import open_store


@pytest.fixture(scope="module")
def scored(trained_run, sim_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "out"
    summary = score_users(trained_run, sim_data, out, PipelineConfig())
    return out, summary


def test_outputs_cover_every_user_on_the_grid(scored, trained_run):
    out, summary = scored
    grid = PipelineConfig().policy.grid.values()
    dec = pd.read_parquet(out / "decisions.parquet")
    cur = pd.read_parquet(out / "curves.parquet")
    n = GraphArtifacts.load(trained_run).n_users
    assert summary["users_scored"] == n == len(dec) and dec["user_id"].is_unique
    assert len(cur) == n * len(grid)
    assert set(dec.columns) >= {
        "user_id",
        "limit",
        "p_default_at_limit",
        "dsl_score",
        "binding_constraint",
        "cluster_id",
    }
    assert np.isin(dec["limit"], grid).all()
    assert set(dec["binding_constraint"]) <= set(BINDINGS)
    assert dec["dsl_score"].between(0, 1).all()
    assert cur["p_default"].between(0, 1).all()
    # the decided limit's risk is the curve's value there
    merged = dec.merge(cur, left_on=["user_id", "limit"], right_on=["user_id", "limit"])
    np.testing.assert_allclose(merged["p_default_at_limit"], merged["p_default"], atol=1e-6)
    # cluster totals never exceed the cap
    caps = PipelineConfig().policy.clusters
    sizes = dec[dec.cluster_id >= 0].groupby("cluster_id")["limit"].agg(["sum", "size"])
    allowed = np.minimum(caps.cap_per_member * sizes["size"], caps.cap_total)
    assert (sizes["sum"] <= allowed + 1e-6).all()


def test_two_stage_inference_equals_the_full_graph(trained_run):
    """Stored hop states + one online hop give the full-graph model's curves (to 1e-5)."""
    from creditgraph.causal.pretrain import PretrainArtifacts
    from creditgraph.utils.io import read_json

    art = GraphArtifacts.load(trained_run)
    model, _ = load_model(trained_run / "model")
    teacher = PretrainArtifacts.load(trained_run).teacher()
    grid = np.arange(0, 50_001, 5_000.0)
    prior = teacher_prior(teacher, art.raw.astype(np.float64))
    full = predict_shards(
        Predictor(model, grid, mc_samples=1), shard_paths(trained_run), prior=prior
    )
    scorer = LastHopScorer(
        model,
        FeatureStandardizer.from_records(read_json(trained_run / "graph" / "feature_stats.json")),
        teacher,
        DSLStats.load(trained_run / "model"),
    )
    store = open_store(default_store_uri(trained_run))
    users = np.argsort(-np.bincount(art.dst, minlength=art.n_users))[:40]  # well-connected users
    nbrs = store.get_arrays("nbr", users)
    flat = np.concatenate(nbrs)
    hood = Neighbourhood(
        counts=np.array([len(a) for a in nbrs]),
        weights=np.concatenate(store.get_arrays("nbrw", users)),
        states=np.stack(store.get_arrays("state", flat)),
    )
    assert hood.counts.min() > 0
    treatment = art.users["treatment"].to_numpy()[users]
    enc = scorer.encode(art.raw[users].astype(np.float64), treatment, art.struct[users], hood)
    np.testing.assert_allclose(
        scorer.curves(enc["x"], grid), full["curve"][users], rtol=1e-5, atol=1e-5
    )


def test_unknown_users_are_named(trained_run, sim_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sim_data, data)
    users = pd.read_parquet(data / "users.parquet")
    users.loc[0, "user_id"] = 999_999_999
    users.to_parquet(data / "users.parquet", index=False)
    links = pd.read_parquet(data / "links.parquet")
    links = links[links.user_id.isin(users.user_id)]
    links.to_parquet(data / "links.parquet", index=False)
    out = tmp_path / "out"
    with pytest.raises(DataValidationError) as exc:
        score_users(trained_run, data, out)
    assert "999999999" in str(exc.value) and "unknown" in str(exc.value)
    assert not out.exists()
    summary = score_users(trained_run, data, out, skip_unknown=True)
    assert summary["users_unknown"] == 1 and summary["users_scored"] == len(users) - 1


def test_a_crashed_run_leaves_nothing_and_a_rerun_completes(trained_run, sim_data, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Exception, match="simulated crash"):
        score_users(trained_run, sim_data, out, _fail_after=0)  # every actor dies at once
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left
    summary = score_users(trained_run, sim_data, out)
    assert (out / "decisions.parquet").exists() and summary["users_scored"] > 0
