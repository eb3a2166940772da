"""The three-head model: shapes, gradients, IPW weights, shard/full-graph equivalence, semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.graph.partition import SPLIT_CODE, load_shard, shard_paths
from creditgraph.model.artifact import load_model, save_model
from creditgraph.model.batch import GraphBatch, collate_shards
from creditgraph.model.config import ModelConfig
from creditgraph.model.dsl import dsl_delta
from creditgraph.model.layers import grad_reverse
from creditgraph.model.losses import TRAIN, LossWeights, joint_loss
from creditgraph.model.net import CreditGraphNet, ModelSpec
from creditgraph.model.towers import effective_sample_size, ipw_weights

GRID = torch.arange(0, 50_001, 5_000, dtype=torch.float32)


def _spec(art: GraphArtifacts, leaves: np.ndarray | None = None) -> ModelSpec:
    return ModelSpec(
        n_features=art.z.shape[1],
        n_struct=art.struct.shape[1],
        feature_names=art.feature_names,
        struct_names=art.manifest["struct_names"],
        leaf_vocab=None if leaves is None else (leaves.max(0) + 1).tolist(),
    )


def _model(art: GraphArtifacts, seed: int = 0, **overrides) -> CreditGraphNet:
    torch.manual_seed(seed)
    model = CreditGraphNet(ModelConfig(**overrides), _spec(art, overrides.get("_leaves")))
    train = art.split_mask("train")
    model.fit_buffers(
        torch.tensor(art.users["treatment"].to_numpy()[train], dtype=torch.float32),
        torch.tensor(art.users["outcome"].to_numpy()[train], dtype=torch.float32),
    )
    f = art.z.shape[1]
    model.set_causal(torch.linspace(-1, 1, f), torch.tensor([[0, 1], [1, 2]]))
    return model


def _prior(art: GraphArtifacts) -> np.ndarray:
    return np.random.default_rng(0).normal(-2, 1, art.n_users).astype(np.float32)


def _full_batch(art: GraphArtifacts, prior: np.ndarray) -> GraphBatch:
    """The whole graph as one batch: every user owned, every edge present."""
    n = art.n_users
    return GraphBatch(
        nodes=torch.arange(n),
        owned=torch.ones(n, dtype=torch.bool),
        z=torch.from_numpy(art.z),
        omega=torch.from_numpy(art.omega.astype(np.float32)),
        struct=torch.from_numpy(art.struct),
        treatment=torch.from_numpy(art.users["treatment"].to_numpy(np.float32)),
        outcome=torch.from_numpy(art.users["outcome"].to_numpy(np.float32)),
        split=torch.from_numpy(np.array(art.users["split"].map(SPLIT_CODE), dtype=np.int64)),
        edge_index=torch.from_numpy(np.stack([art.src, art.dst])),
        edge_weight=torch.from_numpy(art.weight),
        prior=torch.from_numpy(prior),
    )


@pytest.fixture(scope="module")
def art(built_run) -> GraphArtifacts:
    return GraphArtifacts.load(built_run)


@pytest.fixture(scope="module")
def shards(built_run) -> list[dict]:
    return [load_shard(p) for p in shard_paths(built_run)]


def test_collate_is_the_disjoint_union_of_its_shards(art, shards):
    prior = _prior(art)
    two = shards[:2]
    batch = collate_shards(two, prior=prior)
    n0 = len(two[0]["nodes"])
    assert batch.num_nodes == n0 + len(two[1]["nodes"])
    e0 = len(two[0]["src"])
    # edges of the second shard are offset by the first shard's node count, never cross over
    assert batch.edge_index[:, :e0].tolist() == [two[0]["src"].tolist(), two[0]["dst"].tolist()]
    assert batch.edge_index[:, e0:].tolist() == [
        (two[1]["src"] + n0).tolist(),
        (two[1]["dst"] + n0).tolist(),
    ]
    assert int(batch.owned.sum()) == sum(int(s["n_owned"]) for s in two)
    # extras: gathered by global id from a table, or carried by the shard rows (same numbers)
    np.testing.assert_array_equal(batch.prior.numpy(), prior[batch.nodes.numpy()])
    rows = [{**s, "prior": prior[s["nodes"]]} for s in two]
    torch.testing.assert_close(collate_shards(rows).prior, batch.prior)
    assert collate_shards(two).prior is None and batch.leaves is None


def test_output_shapes(art, shards):
    model = _model(art)
    batch = collate_shards(shards[:2], prior=_prior(art))
    out = model(batch)
    n = batch.num_nodes
    assert out["logit"].shape == (n,)
    assert out["rep"].shape == (n, 2 * model.cfg.hidden)
    assert set(out["density"]) == {"logit_p", "mu", "log_sigma"}
    curves = torch.sigmoid(model.curve_logits(out["coef"], GRID))
    assert curves.shape == (n, len(GRID))
    assert torch.all((curves >= 0) & (curves <= 1))


def test_gradients_reach_every_head(art, shards):
    model = _model(art, balance_weight=0.1)
    batch = collate_shards(shards[:3], prior=_prior(art))
    out = model(batch)
    loss, parts = joint_loss(model, out, batch, TRAIN, LossWeights(beta=1.0, lam=0.5, ipw=True))
    loss.backward()
    assert parts["n_labeled"] > 0 and all(
        np.isfinite(parts[k]) for k in ("den", "out", "dsl", "adv")
    )
    heads = {
        "feature encoder": model.encoder,
        "interference": model.interference,
        "dsl conv": model.dsl,
        "outcome tower": model.outcome,
        "treatment tower": model.treatment,
        "adversary": model.adversary,
    }
    for name, module in heads.items():
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_density_loss_does_not_train_the_encoder(art, shards):
    """The treatment tower reads the covariates (h0 detached): L_den shapes only the tower."""
    model = _model(art, balance_weight=0.0)
    batch = collate_shards(shards[:2], prior=_prior(art))
    out = model(batch)
    loss, _ = joint_loss(model, out, batch, TRAIN, LossWeights(beta=0.0, lam=0.0, ipw=False))
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.treatment.parameters())


def test_ipw_weights_finite_clipped_and_stabilized():
    rng = np.random.default_rng(0)
    log_num = torch.tensor(rng.normal(0, 1, 5000), dtype=torch.float32)
    log_den = torch.tensor(rng.normal(0, 8, 5000), dtype=torch.float32)  # extreme propensities
    log_den[:10] = float("-inf")
    w = ipw_weights(log_num, log_den, (0.1, 10.0))
    assert torch.isfinite(w).all()
    assert w.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert (w.max() / w.min()).item() <= 100.0 + 1e-3  # the clip range, whatever the scale
    ess = effective_sample_size(w)
    assert 0 < ess <= 1
    assert effective_sample_size(torch.ones(100)) == pytest.approx(1.0)


def test_gradient_reversal_flips_the_sign():
    x = torch.ones(3, requires_grad=True)
    (grad_reverse(x, 0.5) * 2).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), -1.0))


def test_owned_outputs_on_shards_equal_the_full_graph(art, shards):
    model = _model(art).eval()
    prior = _prior(art)
    with torch.no_grad():
        full = model(_full_batch(art, prior))
        full_curves = model.curve_logits(full["coef"], GRID)
        seen = 0
        for shard in shards:
            b = collate_shards([shard], prior=prior)
            out = model(b)
            own = b.owned
            nodes = b.nodes[own]
            torch.testing.assert_close(out["rep"][own], full["rep"][nodes], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                model.curve_logits(out["coef"], GRID)[own], full_curves[nodes], rtol=1e-4, atol=1e-5
            )
            seen += int(own.sum())
    assert seen == art.n_users


def test_curves_are_monotone_in_the_limit(art, shards):
    model = _model(art, monotone=True)
    with torch.no_grad():
        out = model(collate_shards(shards[:2], prior=_prior(art)))
        curves = torch.sigmoid(model.curve_logits(out["coef"], torch.linspace(0, 100_000, 41)))
    assert torch.all(curves[:, 1:] - curves[:, :-1] >= -1e-6)


def test_interference_sees_neighbours_limits_not_its_own(art):
    model = _model(art).eval()
    prior = _prior(art)
    batch = _full_batch(art, prior)
    # a user with an in-neighbour and no 2-cycle back to itself
    src, dst = art.src, art.dst
    pairs = set(zip(src.tolist(), dst.tolist(), strict=True))
    u = next(d for s, d in zip(src.tolist(), dst.tolist(), strict=True) if (d, s) not in pairs)
    v = int(src[dst == u][0])
    with torch.no_grad():
        base = model.represent(batch)["rep"][u].clone()
        own = _full_batch(art, prior)
        own.treatment[u] += 25_000.0
        assert torch.allclose(model.represent(own)["rep"][u], base, atol=1e-6)
        peer = _full_batch(art, prior)
        peer.treatment[v] += 25_000.0
        assert not torch.allclose(model.represent(peer)["rep"][u], base, atol=1e-6)


def test_save_and_load_roundtrip(art, shards, tmp_path):
    model = _model(art).eval()
    save_model(tmp_path, model, {"note": "test"})
    loaded, meta = load_model(tmp_path)
    assert meta["note"] == "test"
    batch = collate_shards(shards[:1], prior=_prior(art))
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch)["logit"], model(batch)["logit"])
    assert loaded.encoder.nodes.dag.shape == (2, 2)


def test_completeness_orders_users_by_missing_weight(art):
    model = _model(art)
    omega = torch.ones(3, art.z.shape[1])
    omega[1, 0] = 0
    omega[2, :] = 0
    s = model.completeness(omega)
    assert s[0] == 0 and 0 < s[1] < s[2] and s[2] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_graph": False},
        {"use_interference": False},
        {"use_dsl": False},
        {"use_alpha": False},
        {"dsl_alpha": "abs"},
        {"dsl_alpha": "none"},
        {"use_teacher_score": False},
    ],
)
def test_ablated_models_run(art, shards, overrides):
    model = _model(art, **overrides)
    batch = collate_shards(shards[:1], prior=_prior(art))
    out = model(batch)
    loss, _ = joint_loss(model, out, batch, TRAIN, LossWeights(lam=0.5))
    loss.backward()
    assert torch.isfinite(loss)


def test_dsl_delta_weighs_missing_features_by_alpha():
    omega = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    alpha = torch.tensor([0.5, -1.0, 0.25])
    signed = dsl_delta(omega, alpha, use_alpha=True)
    assert torch.equal(signed, torch.tensor([[0.0, -1.0, 0.25], [0.5, 0.0, 0.0]]))
    # |alpha|: a missing risk-lowering feature counts like a missing risk-raising one
    assert torch.equal(dsl_delta(omega, alpha, True, "abs"), signed.abs())
    assert torch.equal(dsl_delta(omega, alpha, use_alpha=False), 1 - omega)
    assert torch.equal(dsl_delta(omega, alpha, True, "none"), 1 - omega)
