"""The order-risk network: leaves out of fold, the time direction of its inputs, shadow orders
outside the loss, exact shards, training on Ray Train through `creditgraph run`, evaluation."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from creditgraph.causal.leaves import LeafConfig, LeafEncoder, run_leaves
from creditgraph.cli import app
from creditgraph.data.orders import OrderDataset, load_orders
from creditgraph.data.simulate_orders import OrderSimConfig, simulate_orders_to_dir
from creditgraph.evaluate.orders import recall_at_alert_rate
from creditgraph.graph.events import (
    SPLIT_EARLY,
    SPLIT_TEST,
    SPLIT_TRAIN,
    SPLIT_VAL,
    EventGraph,
    EventGraphConfig,
    build_event_graph,
    event_shard_paths,
    load_event_shard,
    load_orders_table,
)
from creditgraph.graph.features import FeatureStandardizer
from creditgraph.layout import RunLayout
from creditgraph.model.orders import (
    KIND_ORDER,
    NodeInputs,
    OrderNet,
    OrderNetConfig,
    OrderNetSpec,
    collate,
    infer_rows,
    infer_run,
    inputs_for,
    load_order_model,
    order_loss,
    shard_arrays,
)

SALT = bytes(range(32))
CONFIG = {
    "train": {"epochs": 2, "num_workers": 1, "seed": 1},
    "orders": {
        "split": {"min_positives": 5},
        "partition": {"part_size": 3000},
        "leaves": {"n_estimators": 20},
        "model": {"hidden": 16},
        "evaluate": {"ablations": ["no_shadow"], "lightgbm_trees": 50},
    },
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("orders_model") / "data"
    simulate_orders_to_dir(OrderSimConfig(n_orders=6000, n_buyers=900, seed=5), out)
    return out


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory, ray_session) -> tuple[RunLayout, str]:
    """``creditgraph run`` on the orders dataset (dispatch on dataset.yaml's family)."""
    root = tmp_path_factory.mktemp("orders_run")
    cfg = root / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    run = RunLayout(root / "run")
    res = CliRunner().invoke(
        app, ["run", "--data", str(data), "--out", str(run.root), "--config", str(cfg)]
    )
    assert res.exit_code == 0, res.output
    return run, str(cfg)


def _full_graph_logits(g: EventGraph, inp: NodeInputs, model: OrderNet) -> np.ndarray:
    """Every order's logit from one batch holding the whole graph (no shards)."""
    full = {"nodes": np.arange(g.n_nodes), "n_owned": np.int64(g.n_nodes), "src": g.src,
            "dst": g.dst, "rel": g.rel, "recency": g.recency}  # fmt: skip
    res = infer_rows(model, [shard_arrays(full, inp)])
    out = np.full(g.n_orders, np.nan, np.float32)
    out[res["order_row"]] = res["logit"]
    return out


def _inputs(g: EventGraph, X: np.ndarray, enc: LeafEncoder, std) -> NodeInputs:
    leaves, fold = enc.transform(X)
    n = len(X)
    return NodeInputs(
        n_orders=n, raw=X, std=std, leaves=leaves, fold=fold,
        gbdt=enc.margin(leaves, fold).astype(np.float32),
        es_type=g.entity_type[g.es_entity], es_feat=g.es_feat,
        y=np.full(n, np.nan, np.float32), split=np.zeros(n, np.int8), train_codes=(0,),
    )  # fmt: skip


def _cut(ds: OrderDataset, t_cut: float) -> OrderDataset:
    """The dataset as it was at ``t_cut``: later orders, links and labels do not exist yet."""
    keep = ds.t_days <= t_cut
    assert keep[: keep.sum()].all(), "orders must come in time order"
    k = int(keep.sum())
    links = ds.links[(ds.links["order_idx"] < k) & (ds.links["ts_days"] <= t_cut)]
    late = ~(ds.label_t_days[:k] <= t_cut)
    return dataclasses.replace(
        ds,
        orders=ds.orders.iloc[:k],
        ids=ds.ids[:k], ts=ds.ts[:k], t_days=ds.t_days[:k], buyer=ds.buyer[:k],
        amount=ds.amount[:k],
        label=np.where(late, np.nan, ds.label[:k]),
        label_time=np.where(late, np.datetime64("NaT", "us"), ds.label_time[:k]),
        label_t_days=np.where(late, np.nan, ds.label_t_days[:k]),
        links=links.reset_index(drop=True), truth=None, segments=None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def world(data) -> dict:
    """The full dataset, a fixed leaf encoder and standardization, a random network."""
    ds = load_orders(data)
    X = ds.feature_matrix()
    early = ds.t_days < ds.t_days.min() + 30
    y = np.nan_to_num(ds.label[early])
    enc = LeafEncoder(n_estimators=10, num_leaves=7, early_stopping=None).fit(X[early], y)
    std = FeatureStandardizer().fit(X[early], ds.feature_names)
    g = build_event_graph(ds, EventGraphConfig(), salt=SALT)
    spec = OrderNetSpec(
        feature_names=ds.feature_names, entity_types=g.types, n_trees=enc.n_trees_,
        num_leaves=7, n_leaf_models=1, slice_days=g.slice_days, window_slices=g.window_slices,
    )  # fmt: skip
    torch.manual_seed(0)
    nets = {c: OrderNet(OrderNetConfig(hidden=16, conv=c), spec).eval() for c in ("gcn", "gat")}
    return {"ds": ds, "X": X, "enc": enc, "std": std, "g": g, "nets": nets}


@pytest.mark.parametrize("conv", ["gcn", "gat"])
def test_scores_never_depend_on_anything_later(world, conv):
    """Orders placed by t* score the same whether or not the later orders, links and labels
    (chargebacks, devices seen later) exist."""
    ds, X, net = world["ds"], world["X"], world["nets"][conv]
    t_cut = ds.t_days.min() + 45.37
    full = _full_graph_logits(world["g"], _inputs(world["g"], X, world["enc"], world["std"]), net)
    cut_ds = _cut(ds, t_cut)
    g_cut = build_event_graph(cut_ds, EventGraphConfig(), salt=SALT)
    k = cut_ds.n_orders
    cut = _full_graph_logits(g_cut, _inputs(g_cut, X[:k], world["enc"], world["std"]), net)
    # the later data is there and would matter: links seen after t* of earlier orders, labels
    # known after t*, later orders on the same entities
    assert (ds.links["ts_days"][ds.links["order_idx"] < k] > t_cut).any()
    assert (ds.label_t_days[:k] > t_cut).any()
    assert world["g"].n_entity_slices > g_cut.n_entity_slices
    np.testing.assert_allclose(full[:k], cut, atol=1e-5)


def test_information_flows_only_forward(world):
    """Changing one order's features changes its own score and scores of later slices only."""
    ds, g, X, net = world["ds"], world["g"], world["X"].copy(), world["nets"]["gcn"]
    base = _full_graph_logits(g, _inputs(g, X, world["enc"], world["std"]), net)
    o = int(np.argmin(np.abs(ds.t_days - (ds.t_days.min() + 40))))
    X[o] = X[o] * 3 + 1
    moved = _full_graph_logits(g, _inputs(g, X, world["enc"], world["std"]), net)
    changed = np.flatnonzero(np.abs(moved - base) > 1e-6)
    others = changed[changed != o]
    assert o in changed
    assert len(others) > 0, "the order's entities reach no later order: pick another"
    assert (g.order_slice[others] > g.order_slice[o]).all()


def test_leaf_encoder_out_of_fold_never_saw_its_rows_labels(world):
    ds, X = world["ds"], world["X"]
    rows = np.flatnonzero(np.isfinite(ds.label))[:3000]
    y = ds.label[rows]
    kw = {"mode": "out_of_fold", "n_folds": 3, "n_estimators": 15, "early_stopping": None}
    enc = LeafEncoder(**kw).fit(X[rows], y)
    leaves, _fold = enc.transform(X[rows], enc.fold_)
    # flip every label of fold 0: its rows' leaves stay, rows of other folds move
    flipped = np.where(enc.fold_ == 0, 1 - y, y)
    enc2 = LeafEncoder(**kw).fit(X[rows], flipped)
    np.testing.assert_array_equal(enc2.fold_, enc.fold_)
    leaves2, _ = enc2.transform(X[rows], enc2.fold_)
    f0 = enc.fold_ == 0
    np.testing.assert_array_equal(leaves2[f0], leaves[f0])
    assert (leaves2[~f0] != leaves[~f0]).any()
    # rows no model was fitted on use model 0; the margin is the booster's raw score
    _, f_new = enc.transform(X[:5])
    assert (f_new == 0).all()
    raw = enc.boosters_[0].predict(X[:50], raw_score=True, num_iteration=enc.n_trees_)
    lv, fo = enc.transform(X[:50])
    np.testing.assert_allclose(enc.margin(lv, fo), raw, atol=1e-9)


def test_leaf_stage_fits_on_the_earlier_period_only(trained, tmp_path):
    run, _ = trained
    orders = load_orders_table(run)
    base = np.load(run.leaves.leaves)
    # other labels changed: the leaves do not move; early labels changed: they do
    for codes, moves in (((SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST), False), ((SPLIT_EARLY,), True)):
        alt = orders.copy()
        m = alt["split"].isin(codes) & alt["y_train"].notna()
        # half the labels set at random: flipping every label would leave a logistic GBDT's
        # splits (and so its leaves) exactly where they were (gradients only change sign)
        noise = np.random.default_rng(0).random(len(alt)) < 0.5
        alt["y_train"] = alt["y_train"].where(~m, noise.astype(float))
        copy = RunLayout(tmp_path / f"run_{moves}")
        shutil.copytree(run.events.dir, copy.events.dir)
        alt.to_parquet(copy.events.orders, index=False)
        run_leaves(copy, LeafConfig(**CONFIG["orders"]["leaves"]))
        assert (np.load(copy.leaves.leaves) != base).any() == moves
    meta = json.loads(run.leaves.manifest.read_text())
    assert meta["mode"] == "earlier_period" and meta["network_train_codes"] == [0]


def test_shadow_orders_never_in_the_loss(trained):
    run, _ = trained
    model, _meta = load_order_model(run.model)
    inp = inputs_for(run)
    codes = tuple(json.loads(run.leaves.manifest.read_text())["network_train_codes"])
    path = event_shard_paths(run, train_only=True)[0]
    row = shard_arrays(load_event_shard(path), inp)
    b = collate([row])
    train, val = b.masks(codes)
    assert train.any()
    assert (b.kind[train] == KIND_ORDER).all() and b.owned[train].all()
    assert not (train & val).any()
    model.train(False)
    out = model(b)
    loss, n = order_loss(out, b, train)
    assert n == int(train.sum())
    # labels outside the loss (shadows, halo and other-period orders) change nothing, and no
    # output depends on any label
    row2 = dict(row)
    y = row["y"].copy()
    y[~train.numpy()] = np.random.default_rng(0).integers(0, 2, int((~train).sum()))
    row2["y"] = y
    b2 = collate([row2])
    out2 = model(b2)
    loss2, _ = order_loss(out2, b2, train)
    assert float(loss2) == pytest.approx(float(loss), abs=1e-7)
    torch.testing.assert_close(out2["logits"], out["logits"])
    # a label inside the loss does count
    y3 = row["y"].copy()
    first = int(torch.nonzero(train)[0])
    y3[first] = 1 - y3[first]
    b3 = collate([{**row, "y": y3}])
    assert abs(float(order_loss(model(b3), b3, train)[0]) - float(loss)) > 1e-6


def test_shards_reproduce_the_full_graph(trained):
    run, _ = trained
    model, _ = load_order_model(run.model)
    logit, _z = infer_run(model, run)
    g = EventGraph.load(run)
    inp = inputs_for(run)
    full = _full_graph_logits(g, inp, model)
    assert np.isfinite(logit).all()
    np.testing.assert_allclose(logit, full, atol=1e-5)
    gat = OrderNet(OrderNetConfig(**{**model.cfg.model_dump(), "conv": "gat"}), model.spec).eval()
    np.testing.assert_allclose(infer_run(gat, run)[0], _full_graph_logits(g, inp, gat), atol=1e-5)


def test_run_trains_on_ray_train_evaluates_and_reuses(trained, data):
    run, cfg = trained
    model, meta = load_order_model(run.model)
    assert meta["family"] == "orders"
    assert [h["epoch"] for h in meta["history"]] == [0, 1]
    assert all(np.isfinite(h["val_loss"]) for h in meta["history"])
    assert any(run.checkpoints.glob("model-*/checkpoint_*")), "no Ray Train checkpoint"
    abl, _ = load_order_model(run.ablation("no_shadow"))
    assert not abl.cfg.use_shadow and len(abl.relations) < len(model.relations)
    metrics = json.loads(run.eval.metrics.read_text())
    names = {r["name"] for r in metrics["rows"]}
    assert {"gnn", "gnn:no_shadow", "lightgbm", "gbdt+lr", "truth"} <= names
    for r in metrics["rows"]:
        assert 0 < r["ap"] <= 1 and 0.5 <= r["auc"] <= 1
        rec = [r[f"recall@{a:g}"] for a in metrics["alert_rates"]]
        assert rec == sorted(rec)
    orders = load_orders_table(run)
    test_t = orders.loc[orders["split"] == SPLIT_TEST, "t_days"]
    train_t = orders.loc[orders["y_train"].notna(), "t_days"]
    assert train_t.max() < test_t.min()
    assert (run.eval.dir / "headline.md").read_text().startswith("# Order risk")
    # a second run reuses every stage
    res = CliRunner().invoke(
        app, ["run", "--data", str(data), "--out", str(run.root), "--config", cfg]
    )
    assert res.exit_code == 0, res.output
    assert "ran in" not in res.output and res.output.count("reused") >= 6


def test_recall_at_alert_rate():
    y = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1], float)
    s = np.array([0.9, 0.8, 0.7, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.05])
    assert recall_at_alert_rate(y, s, 0.1) == pytest.approx(1 / 3)
    assert recall_at_alert_rate(y, s, 0.3) == pytest.approx(2 / 3)
    assert recall_at_alert_rate(y, s, 1.0) == pytest.approx(1.0)
    assert np.isnan(recall_at_alert_rate(np.zeros(4), s[:4], 0.5))
