"""Scoring's fast paths compute what the model's modules compute (eval mode), and their caches
follow the weights: the re-associated torch arithmetic for large batches, the NumPy layers for a
few users (online requests), LightGBM's single-row interface, the encoder's projection cache."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest
import torch

from creditgraph.graph.features import FeatureStandardizer
from creditgraph.model.config import ModelConfig
from creditgraph.model.encoder import FeatureEncoder
from creditgraph.model.infer import SMALL_BATCH, Inference, _RowPredictor
from creditgraph.model.net import CreditGraphNet, ModelSpec

F, S = 9, 6


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(size=(n, F)) * rng.choice([1.0, 10.0, 1000.0], size=F)
    raw[rng.random((n, F)) < 0.2] = np.nan
    limit = np.where(rng.random(n) < 0.3, 0.0, rng.lognormal(8, 1, n))
    struct = rng.random((n, S)).astype(np.float32)
    return raw, limit, struct


def _inference(seed: int = 0, **cfg) -> Inference:
    """An untrained model with random weights (and non-trivial buffers), in eval mode."""
    torch.manual_seed(seed)
    spec = ModelSpec(
        n_features=F,
        n_struct=S,
        feature_names=[f"f{i}" for i in range(F)],
        struct_names=[f"s{i}" for i in range(S)],
    )
    model = CreditGraphNet(ModelConfig(hidden=16, heads=2, use_teacher_score=False, **cfg), spec)
    raw, limit, _ = _data(500, seed)
    model.fit_buffers(torch.from_numpy(limit.astype(np.float32)))
    dag = torch.tensor([[0, 1, 2, 4], [3, 3, 5, 6]])
    model.set_causal(torch.linspace(-1.0, 2.0, F), dag)
    with torch.no_grad():  # the zero-initialised alpha projection would hide alpha entirely
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    std = FeatureStandardizer().fit(raw, spec.feature_names)
    return Inference(model, std)


def _reference(inf: Inference, raw, limit, struct, tokens, grid) -> dict[str, np.ndarray]:
    """The modules' own forward passes."""
    m = inf.model
    with torch.no_grad():
        inp = inf._inputs(raw)
        h0 = m.encoder(inp["z"], inp["omega"], torch.from_numpy(struct), None)
        t_enc = m.limits(torch.from_numpy(limit.astype(np.float32)))
        c0, s0 = m.interference.first_tokens(h0, t_enc)
        tok = torch.from_numpy(tokens)
        hops = tokens.shape[2]
        cs = [c0] + [tok[:, 0, k] for k in range(hops)]
        ss = [s0] + [tok[:, 1, k] for k in range(hops)]
        h, g = m.interference.attend(h0, cs, ss)
        delta = (1 - inp["omega"]) * m.alpha
        x = torch.cat([h, g, m.dsl(delta)], dim=-1)
        params = m.outcome.params(x)
        g_t = torch.as_tensor(grid, dtype=torch.float32)
        thinned = m.outcome.thinned_params(x, inf.masks)
        logits = torch.stack([m.curve_logits(p, g_t) for p in thinned])
        s_lim = m.limits.log_scaled(torch.from_numpy(limit.astype(np.float32)))
        return {
            "h0": h0.numpy(),
            "c0": c0.numpy(),
            "x": x.numpy(),
            "completeness": m.completeness(inp["omega"]).numpy(),
            "curves": torch.sigmoid(m.curve_logits(params, g_t)).numpy(),
            "factual": torch.sigmoid(m.outcome.logit_at(params, s_lim)).numpy(),
            "logit_std": logits.std(0).numpy(),
            "prob_std": torch.sigmoid(logits).std(0).mean(-1).numpy(),
        }


@pytest.mark.parametrize("n", [1, 7, SMALL_BATCH + 1, 3000])
def test_scoring_paths_equal_the_modules(n):
    """NumPy layers (n <= SMALL_BATCH) and chunked torch (larger n) agree with the modules."""
    inf = _inference()
    inf.chunk = 1024  # several chunks at n = 3000
    raw, limit, struct = _data(n, seed=1)
    tokens = np.random.default_rng(2).normal(size=(n, 2, inf.hops, inf.hidden)).astype(np.float32)
    grid = np.linspace(0, 40_000, 21)
    ref = _reference(inf, raw, limit, struct, tokens, grid)
    first = inf.first(raw, limit, struct)
    fin = inf.finish(raw, limit, struct, tokens)
    out = inf.tower_outputs(fin.x, grid, limit)
    got = {
        "h0": first.h0,
        "c0": first.c0,
        "x": fin.x,
        "completeness": fin.completeness,
        "curves": out.curves,
        "factual": out.factual,
        "logit_std": out.logit_std,
        "prob_std": out.prob_std,
    }
    for name, value in got.items():
        np.testing.assert_allclose(value, ref[name], atol=2e-5, rtol=1e-4, err_msg=name)
    # the parts of the tower, one by one, are the same numbers as all at once
    np.testing.assert_allclose(inf.curves(fin.x, grid), out.curves, atol=1e-6)
    np.testing.assert_allclose(inf.factual(fin.x, limit), out.factual, atol=1e-6)
    prob_std, _logit_std = inf.uncertainty(fin.x, grid)
    np.testing.assert_allclose(prob_std, out.prob_std, atol=1e-6)


def test_small_and_large_batches_score_a_user_alike():
    """A user scored alone (NumPy layers) and inside a large batch (torch) gets the same curve:
    online equals batch."""
    inf = _inference(seed=3)
    raw, limit, struct = _data(400, seed=4)
    tokens = np.random.default_rng(5).normal(size=(400, 2, inf.hops, inf.hidden)).astype(np.float32)
    grid = np.linspace(0, 30_000, 13)
    fin = inf.finish(raw, limit, struct, tokens)
    batch = inf.tower_outputs(fin.x, grid, limit, unc_grid=grid[::3])
    for i in (0, 17, 399):
        one = inf.finish(raw[i : i + 1], limit[i : i + 1], struct[i : i + 1], tokens[i : i + 1])
        np.testing.assert_allclose(one.x[0], fin.x[i], atol=2e-6)
        alone = inf.tower_outputs(one.x, grid, limit[i : i + 1], unc_grid=grid[::3])
        np.testing.assert_allclose(alone.curves[0], batch.curves[i], atol=1e-6)
        assert alone.prob_std[0] == pytest.approx(batch.prob_std[i], abs=1e-6)
    means = np.random.default_rng(6).normal(size=(3, 2, inf.hops, inf.hidden))
    wdeg = np.array([0.0, 1.5, 4.0])
    small = inf.tokens_from_means(means, wdeg)
    big = inf.tokens_from_means(np.repeat(means, 20, axis=0), np.repeat(wdeg, 20))
    np.testing.assert_allclose(small, big[::20], atol=1e-6)


def test_models_without_the_numpy_layers_use_torch():
    """Ablations the NumPy layers do not mirror (no graph encoder) still score, through torch."""
    inf = _inference(use_graph=False)
    assert inf._small(1) is None
    raw, limit, struct = _data(3, seed=7)
    fin = inf.finish(raw, limit, struct, np.zeros((3, 2, 0, inf.hidden), np.float32))
    with torch.no_grad():
        inp = inf._inputs(raw)
        h = inf.model.encoder(inp["z"], inp["omega"], None, None)
    np.testing.assert_allclose(fin.x[:, : inf.hidden], h.numpy(), atol=1e-6)


def test_feature_projections_are_cached_in_eval_and_follow_the_weights():
    enc = FeatureEncoder(F, S, 16, 2, 0.1, True, True, None).eval()
    enc.nodes.set_causal(torch.linspace(-1, 1, F), torch.tensor([[0, 1], [2, 3]]))
    with torch.no_grad():
        a = enc.feature_projections()
        assert enc.feature_projections() is a  # computed once
        enc.att2.obs.weight.mul_(2.0)  # an optimizer step: an in-place update
        b = enc.feature_projections()
        assert b is not a and torch.allclose(b[2][0], enc.att2.project(enc.nodes())[0])
        enc.nodes.set_causal(torch.linspace(1, -1, F), None)  # a replaced buffer
        c = enc.feature_projections()
        assert c is not b and torch.allclose(c[0], enc.nodes())
    assert enc.feature_projections() is not c  # with autograd on: always recomputed
    enc.train()
    with torch.no_grad():
        assert enc.feature_projections() is not enc.feature_projections()


def test_training_forward_is_unchanged_by_the_cache():
    """In training mode the encoder computes exactly what it computed without the cache."""
    torch.manual_seed(0)
    enc = FeatureEncoder(F, S, 16, 2, 0.1, True, True, None)
    enc.nodes.set_causal(torch.linspace(-1, 1, F), torch.tensor([[0, 1], [2, 3]]))
    z, om, st = torch.randn(40, F), (torch.rand(40, F) > 0.3).float(), torch.randn(40, S)

    def plain() -> torch.Tensor:  # FeatureEncoder.forward as written before the cache
        f = enc.nodes()
        h = enc.att1(f, z, om, None) + enc.struct(st)
        h = enc.norm0(h)
        h = enc.norm1(h + enc.drop(enc.att2(f, z, om, h)))
        return enc.norm2(h + enc.drop(enc.ff(h)))

    outs, grads = [], []
    for fn in (plain, lambda: enc(z, om, st, None)):
        enc.zero_grad()
        torch.manual_seed(1)
        y = fn()
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in enc.parameters()])
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


def test_row_predictor_equals_booster_predict():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(2000, F))
    X[rng.random(X.shape) < 0.15] = np.nan
    y = (np.nan_to_num(X[:, 0]) + rng.normal(size=2000) > 0).astype(int)
    booster = lgb.train(
        {"objective": "binary", "verbose": -1, "num_leaves": 15}, lgb.Dataset(X, y), 30
    )
    rows = _RowPredictor(booster, F)
    Xq = rng.normal(size=(50, F)) * 2
    Xq[rng.random(Xq.shape) < 0.2] = np.nan
    expected = booster.predict(Xq.astype(np.float32))
    np.testing.assert_array_equal(rows.predict(Xq), expected)
    with pytest.raises(ValueError, match="columns"):
        rows.predict(Xq[:, :3])
