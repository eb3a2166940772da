"""Causal pretraining: teacher cross-fitting, per-feature DML (Ray == sequential), BIC DAG."""

from __future__ import annotations

import warnings

import networkx as nx
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from creditgraph.causal.config import DMLConfig, PretrainConfig
from creditgraph.causal.dag import HillClimbDAG, cpdag, shd, simulate_linear_gaussian
from creditgraph.causal.dml import dml_ray, dml_sequential
from creditgraph.causal.teacher import Teacher

FAST_NUISANCE = {
    "n_estimators": 40,
    "learning_rate": 0.15,
    "num_leaves": 15,
    "min_child_samples": 20,
}


def logistic_world(n: int, d: int, seed: int = 0, rho: float = 0.4):
    """Correlated Gaussian features (AR(1)) and p = sigmoid(X beta).

    For jointly Gaussian features the DML estimand per 1 sd of x_j is, by Stein's lemma,
    E[dp/dx_j] * sd_j = sd_j * beta_j * E[p (1 - p)] exactly: that is the truth we test against.
    """
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, d))
    X = np.empty_like(Z)
    X[:, 0] = Z[:, 0]
    for k in range(1, d):
        X[:, k] = rho * X[:, k - 1] + np.sqrt(1 - rho**2) * Z[:, k]
    X *= rng.uniform(0.5, 3.0, size=d)  # different units: alpha must be per sd
    beta = rng.choice([-1.0, 1.0], size=d) * rng.uniform(0.2, 0.8, size=d) / X.std(0)
    beta[::3] = 0.0
    p = 1 / (1 + np.exp(-(-1.0 + X @ beta)))
    truth = X.std(0) * beta * np.mean(p * (1 - p))
    return X.astype(np.float32), p, truth


# ---------------------------------------------------------------- teacher


def test_teacher_soft_labels_are_out_of_fold():
    rng = np.random.default_rng(1)
    n = 1200
    X = rng.normal(size=(n, 6)).astype(np.float32)
    X[rng.random(n) < 0.2, 2] = np.nan  # missing values stay NaN (native handling)
    y = rng.integers(0, 2, size=n)  # pure noise labels: only memorization can predict them
    t = Teacher(
        n_folds=3,
        params={"n_estimators": 150, "num_leaves": 63, "min_child_samples": 2},
        early_stopping=None,
        random_state=0,
    ).fit(X, y)
    # every row belongs to exactly one fold and its soft label is that fold model's prediction
    assert set(np.unique(t.fold_)) == {0, 1, 2}
    for k, booster in enumerate(t.models_):
        rows = t.fold_ == k
        np.testing.assert_allclose(t.oof_proba_[rows], booster.predict(X[rows]), rtol=1e-6)
    # a model that saw the rows memorizes noise labels; the out-of-fold labels cannot
    assert roc_auc_score(y, t.predict_risk(X)) > 0.9
    assert t.predict_proba(X).shape == (len(X), 2)  # scikit-learn's convention
    assert abs(t.oof_auc_ - 0.5) < 0.08


def test_teacher_save_load_and_leaves(tmp_path):
    X, p, _ = logistic_world(1500, 5, seed=2)
    y = (np.random.default_rng(3).random(len(p)) < p).astype(int)
    t = Teacher(n_folds=3, params={"n_estimators": 60}, early_stopping=10, random_state=4)
    t.fit(X, y)
    assert 0.6 < t.oof_auc_ < 1.0
    leaves = t.leaves(X)
    assert leaves.dtype == np.int32 and leaves.shape == (len(X), t.n_trees_)
    t.save(tmp_path / "teacher.txt", tmp_path / "teacher.json")
    assert (tmp_path / "teacher.txt").read_text().startswith("tree")
    back = Teacher.load(tmp_path / "teacher.txt", tmp_path / "teacher.json")
    np.testing.assert_allclose(back.predict_proba(X), t.predict_proba(X))
    # the saved teacher keeps its parameters, not the defaults
    assert back.get_params() == t.get_params() and back.random_state == 4
    np.testing.assert_array_equal(back.leaves(X), leaves)
    with pytest.raises(ValueError, match="both classes"):
        Teacher().fit(X, np.zeros(len(X)))


# ---------------------------------------------------------------- DML


def test_dml_alpha_recovers_known_effects():
    X, p, truth = logistic_world(3000, 8, seed=0)
    y = p + np.random.default_rng(1).normal(0, 0.05, len(p))  # a smooth soft label
    names = [f"x{j}" for j in range(X.shape[1])]
    cfg = DMLConfig(nuisance_params=FAST_NUISANCE, seed=0)
    df = dml_sequential(X, y, names, cfg)
    assert (df["status"] == "ok").all()
    assert list(df["feature"]) == names
    clear = np.abs(truth) > 0.01
    assert clear.sum() >= 4
    assert (np.sign(df["alpha"][clear]) == np.sign(truth[clear])).all()
    covered = (df["ci_low"] <= truth) & (truth <= df["ci_high"])
    assert covered.mean() >= 0.75, df.assign(truth=truth)
    # alpha is per standard deviation: rescaling a feature leaves it unchanged
    X2 = X.copy()
    X2[:, 1] *= 1000.0
    again = dml_sequential(X2, y, names, cfg)
    assert again["alpha"][1] == pytest.approx(df["alpha"][1], rel=1e-3, abs=1e-4)


def test_dml_ray_equals_sequential_and_reports_failures(ray_session):
    X, p, _ = logistic_world(1500, 5, seed=4)
    X = np.hstack([X, np.full((len(X), 1), np.nan, dtype=np.float32)])  # never observed
    X[np.random.default_rng(5).random(len(X)) < 0.15, 1] = np.nan  # some missing values
    y = p + np.random.default_rng(6).normal(0, 0.05, len(p))
    names = [*(f"x{j}" for j in range(5)), "empty"]
    cfg = DMLConfig(nuisance_params=FAST_NUISANCE, features_per_task=2, max_retries=1, seed=3)
    seq = dml_sequential(X, y, names, cfg)
    par = dml_ray(X, y, names, cfg)
    # the failing feature is reported by name and error; the others (even its batch mate) are not lost
    for df in (seq, par):
        assert list(df["feature"]) == names
        bad = df.set_index("feature").loc["empty"]
        assert bad["status"] == "failed" and "observed" in bad["error"]
        assert (df["status"][:5] == "ok").all()
    assert par["n_rows"][1] < len(X)  # rows with x_1 missing excluded for x_1 only
    assert par["n_rows"][0] == len(X)
    for col in ["alpha", "stderr", "ci_low", "ci_high", "n_rows"]:
        np.testing.assert_allclose(par[col][:5], seq[col][:5], rtol=1e-6, atol=1e-9)


def test_dml_constant_heterogeneity_handles_missing_controls():
    X, p, truth = logistic_world(2000, 4, seed=7)
    X[np.random.default_rng(8).random(len(X)) < 0.1, 3] = np.nan
    cfg = DMLConfig(nuisance_params=FAST_NUISANCE, heterogeneity="constant")
    df = dml_sequential(X, p, [f"x{j}" for j in range(4)], cfg)
    assert (df["status"] == "ok").all()
    clear = np.abs(truth) > 0.01
    assert (np.sign(df["alpha"][clear]) == np.sign(truth[clear])).all()


# ---------------------------------------------------------------- DAG


def _pgmpy_dag(X: np.ndarray, max_parents: int, score: str = "bic-g") -> np.ndarray:
    from pgmpy.causal_discovery import HillClimbSearch

    d = X.shape[1]
    df = pd.DataFrame(X, columns=[f"x{i}" for i in range(d)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hc = HillClimbSearch(
            scoring_method=score, max_indegree=max_parents, return_type="dag", show_progress=False
        ).fit(df)
    A = np.zeros((d, d), dtype=bool)
    for a, b in hc.causal_graph_.edges():
        A[int(a[1:]), int(b[1:])] = True
    return A


def test_dag_structure_no_worse_than_pgmpy():
    X, true = simulate_linear_gaussian(7, 2000, expected_parents=1.5, seed=3)
    ours = HillClimbDAG(max_parents=3, restarts=10, random_state=0).fit(X)
    theirs = _pgmpy_dag(X, 3)
    ours_shd = shd(cpdag(ours.adjacency_), cpdag(true))
    assert ours_shd <= shd(cpdag(theirs), cpdag(true))
    assert ours_shd <= 2
    assert nx.is_directed_acyclic_graph(nx.DiGraph(ours.adjacency_.astype(int)))
    # edges carry the score each one is worth; the DAG's score is the sum of local scores
    assert len(ours.edges_) == ours.adjacency_.sum()
    assert all(delta > 0 for _, _, delta in ours.edges_)


def test_dag_scores_match_pgmpy_and_cpdag_matches():
    from pgmpy.base import DAG
    from pgmpy.structure_score import get_scoring_method

    from creditgraph.causal.dag import _DiscreteScore, _GaussianScore

    X, _ = simulate_linear_gaussian(5, 500, seed=1)
    df = pd.DataFrame(X, columns=[f"x{i}" for i in range(5)])
    ref = get_scoring_method("bic-g", df)
    ours = _GaussianScore(X, 1.0)
    base_ref, base = ref.local_score("x0", ()), ours.local(0, [])
    for parents in ([1], [1, 2], [2, 3, 4]):
        delta_ref = ref.local_score("x0", tuple(f"x{p}" for p in parents)) - base_ref
        # pgmpy's GLM uses the unbiased residual scale: equal up to O(1/n) per parameter
        assert ours.local(0, parents) - base == pytest.approx(delta_ref, abs=0.05 * len(parents))

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(400, 4))
    codes[:, 3] = (codes[:, 0] + rng.integers(0, 2, 400)) % 3
    dref = get_scoring_method("bic-d", pd.DataFrame(codes, columns=list("abcd")))
    dours = _DiscreteScore(codes.astype(float), 1.0)
    for v, parents in ((3, []), (3, [0]), (3, [0, 1]), (2, [0, 3])):
        expect = dref.local_score("abcd"[v], tuple("abcd"[p] for p in parents))
        assert dours.local(v, parents) == pytest.approx(expect, rel=1e-9)

    for seed in range(5):
        _, A = simulate_linear_gaussian(12, 5, expected_parents=2.0, seed=seed)
        g = DAG()
        g.add_nodes_from(range(12))
        g.add_edges_from(zip(*np.nonzero(A), strict=True))
        p = g.to_pdag()
        M = np.zeros_like(A)
        for a, b in p.directed_edges:
            M[a, b] = True
        for a, b in p.undirected_edges:
            M[a, b] = M[b, a] = True
        np.testing.assert_array_equal(cpdag(A), M)


def test_dag_handles_missing_values_and_many_features():
    X, true = simulate_linear_gaussian(8, 4000, seed=5)
    Xm = X.copy()
    Xm[np.random.default_rng(0).random(X.shape) < 0.1] = np.nan  # MCAR, 10% of cells
    full = HillClimbDAG(max_parents=3, restarts=5).fit(X)
    miss = HillClimbDAG(max_parents=3, restarts=5).fit(Xm)
    assert shd(cpdag(miss.adjacency_), cpdag(true)) <= shd(cpdag(full.adjacency_), cpdag(true)) + 2

    big, _ = simulate_linear_gaussian(120, 1500, seed=6)
    model = HillClimbDAG(max_parents=2, restarts=0).fit(big)
    assert model.adjacency_.sum(0).max() <= 2
    assert nx.is_directed_acyclic_graph(nx.DiGraph(model.adjacency_.astype(int)))
    assert model.adjacency_.sum() > 60


# ---------------------------------------------------------------- the stage


def _small_config() -> PretrainConfig:
    return PretrainConfig.model_validate(
        {
            "teacher": {"n_folds": 3, "params": {"n_estimators": 80, "num_leaves": 15}},
            "dml": {"nuisance_params": FAST_NUISANCE, "features_per_task": 3},
            "dag": {"restarts": 3},
        }
    )


@pytest.fixture(scope="module")
def built_run(tmp_path_factory):
    from creditgraph.data.simulate import SimulationConfig, simulate_to_dir
    from creditgraph.graph.build import build_graph
    from creditgraph.graph.config import GraphConfig

    root = tmp_path_factory.mktemp("pretrain")
    simulate_to_dir(SimulationConfig(n_users=3000, seed=0), root / "data")
    build_graph(root / "data", root / "run", GraphConfig())
    return root / "run"


def test_pretrain_writes_artifacts(ray_session, built_run, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from creditgraph.causal.artifacts import PretrainArtifacts
    from creditgraph.causal.pretrain import run_pretrain
    from creditgraph.cli import app
    from creditgraph.graph.artifacts import GraphArtifacts

    cfg = _small_config()
    summary = run_pretrain(built_run, cfg)
    out = built_run / "pretrain"
    for name in [
        "manifest.json",
        "teacher.txt",
        "soft_labels.parquet",
        "leaves.npy",
        "alpha.parquet",
        "dag.json",
    ]:
        assert (out / name).is_file(), name
    assert not [p for p in built_run.iterdir() if p.name.startswith(".pretrain")]  # no temp dirs

    g = GraphArtifacts.load(built_run)
    art = PretrainArtifacts.load(built_run)
    assert art.feature_names == g.feature_names
    assert art.alpha.shape == (len(g.feature_names),) and np.isfinite(art.alpha).all()
    assert art.leaves.shape[0] == g.n_users and art.leaves.dtype == np.int32
    assert (
        art.soft_label.shape == (g.n_users,) and ((art.soft_label > 0) & (art.soft_label < 1)).all()
    )
    # soft labels are out-of-fold exactly for the labeled train users; nobody else was fitted on
    labeled_train = g.split_mask("train") & g.users["outcome"].notna().to_numpy()
    np.testing.assert_array_equal(art.is_oof, labeled_train)
    assert summary["n_fit_users"] == labeled_train.sum()
    assert 0.5 < art.manifest["teacher_oof_auc"] < 1.0
    assert len(art.dag_src) == summary["dag_edges"] > 0
    assert art.dag_src.max() < len(g.feature_names) and (art.dag_delta > 0).all()
    np.testing.assert_allclose(art.teacher().leaves(g.raw[:50]), art.leaves[:50])

    # the CLI runs the stage through the pipeline (recording its fingerprint), then reuses the
    # identical output, and prints the top features and the DAG size each time
    pipeline_yaml = tmp_path / "pipeline.yaml"
    pipeline_yaml.write_text(yaml.safe_dump({"pretrain": cfg.model_dump(mode="json")}))
    args = ["pretrain", "--run", str(built_run), "--config", str(pipeline_yaml)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "edges" in res.output and summary["top_alpha"][0]["feature"] in res.output
    before = (out / "manifest.json").stat().st_mtime_ns
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "reused" in res.output and summary["top_alpha"][0]["feature"] in res.output
    assert (out / "manifest.json").stat().st_mtime_ns == before

    # a run dir without a graph is one clear error (exit 2), nothing written
    res = CliRunner().invoke(app, ["pretrain", "--run", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "creditgraph build" in res.output
    assert not (tmp_path / "nothing" / "pretrain").exists()


def test_configs_build_their_estimators_with_one_set_of_defaults():
    from creditgraph.causal.config import DAGConfig, TeacherConfig
    from creditgraph.causal.teacher import DEFAULT_PARAMS

    dag = DAGConfig().build()
    assert dag.get_params() == {**HillClimbDAG().get_params(), "score": "gaussian"}
    assert dag.restarts == 20  # the pipeline's iterated local search, not pgmpy's plain climb
    assert DAGConfig(restarts=0, random_state=5).build().get_params()["random_state"] == 5
    teacher = TeacherConfig().build()
    assert {k: v for k, v in teacher.get_params().items() if k != "params"} == {
        k: v for k, v in Teacher().get_params().items() if k != "params"
    }
    assert teacher.params == DEFAULT_PARAMS
