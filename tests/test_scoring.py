"""Batch scoring on Ray Data, snapshots, and the inductive (entity-centric) last layer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from creditgraph.data.load import load_dataset
from creditgraph.layout import RunLayout
from creditgraph.model.infer import Inference
from creditgraph.policy.decide import BINDINGS
from creditgraph.serving.context import (
    Applicant,
    ScoringBundle,
    decide,
    evaluate,
    for_applicants,
    read_known,
)
from creditgraph.serving.score import batch_graph, score_users
from creditgraph.serving.snapshot import Registry

EPOCH = pd.Timestamp("1970-01-01")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file() and "checkpoints" not in p.parts
    }


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _days(t) -> float:
    return (pd.Timestamp(t) - EPOCH) / pd.Timedelta(days=1)


def test_outputs_cover_every_user_on_the_run_grid(scored, trained_run, sim_data):
    out, summary, registry = scored
    bundle = ScoringBundle.load(trained_run)
    grid = bundle.policy.grid_values()
    dec = pd.read_parquet(out / "decisions.parquet")
    cur = pd.read_parquet(out / "curves.parquet")
    n = len(pd.read_parquet(sim_data / "users.parquet"))
    assert summary["users_scored"] == n
    assert len(dec) == n and dec["user_id"].is_unique and len(cur) == n * len(grid)
    # the grid is the run's own scale: 0 to about the 99th percentile of the training limits
    q99 = bundle.limit_scale["q99_positive"]
    assert grid[0] == 0 and q99 <= grid[-1] < 1.2 * q99 and 20 <= len(grid) <= 60
    assert np.isin(dec["limit"], grid).all() and set(dec["binding_constraint"]) <= set(BINDINGS)
    assert dec["dsl_score"].between(0, 1).all() and cur["p_default"].between(0, 1).all()
    merged = dec.merge(cur, on=["user_id", "limit"])
    np.testing.assert_allclose(merged["p_default_at_limit"], merged["p_default"], atol=1e-6)
    # cluster totals never exceed the caps, which are multiples of the run's median limit
    caps = bundle.policy.clusters
    median = bundle.limit_scale["median_positive"]
    assert caps.cap_per_member == pytest.approx(2.5 * median)
    sizes = dec[dec.cluster_id >= 0].groupby("cluster_id")["limit"].agg(["sum", "size"])
    allowed = np.minimum(caps.cap_per_member * sizes["size"], caps.cap_total)
    assert len(sizes) > 0 and (sizes["sum"] <= allowed + 1e-6).all()
    # the decisions name the snapshot they were made for, which is promoted and immutable
    assert (dec["snapshot"] == summary["snapshot"]).all()
    assert Registry(registry).current() == summary["snapshot"]


def test_scoring_never_writes_into_the_run_folder(trained_run, sim_data, tmp_path, scored):
    before = _tree(trained_run)
    score_users(trained_run, sim_data, tmp_path / "out", registry=tmp_path / "reg")
    assert _tree(trained_run) == before
    # a read-only server-side open leaves no SQLite side files in the snapshot either
    reg = Registry(tmp_path / "reg")
    snap = reg.open(reg.ids()[0])
    snap.users([10000000])
    snap.close()
    names = {p.name for p in reg.layout.snapshot(reg.ids()[0]).dir.iterdir()}
    assert names == {"snapshot.json", "store.sqlite"}


def test_batch_scoring_equals_the_in_process_graph_pass(scored, trained_run, sim_data):
    """The Ray Data pipeline and one in-process pass over the same graph give the same curves."""
    out, _, _ = scored
    bundle = ScoringBundle.load(trained_run)
    grid = bundle.policy.grid_values()
    g = batch_graph(bundle, load_dataset(sim_data, with_truth=False))
    full = bundle.inference.score_graph(g.raw, g.limit, g.struct, g.src, g.dst, g.weight, grid)
    cur = pd.read_parquet(out / "curves.parquet")
    mine = cur.pivot(index="user_id", columns="limit", values="p_default").loc[g.ids]
    np.testing.assert_allclose(mine.to_numpy(), full["curve"], atol=1e-5)
    dec = pd.read_parquet(out / "decisions.parquet").set_index("user_id").loc[g.ids]
    np.testing.assert_allclose(dec["dsl_score"], full["dsl"], atol=1e-5)


def test_known_users_from_the_snapshot_equal_the_batch(scored, trained_run):
    out, _, registry = scored
    bundle = ScoringBundle.load(trained_run)
    grid = bundle.policy.grid_values()
    dec = pd.read_parquet(out / "decisions.parquet").set_index("user_id")
    cur = pd.read_parquet(out / "curves.parquet")
    snap = Registry(registry).open()
    ids = dec.index.to_numpy()[:: max(1, len(dec) // 60)]
    ctx = read_known(snap, ids)
    assert ctx.known.all()
    ev = evaluate(bundle, ctx, grid)
    mine = cur.pivot(index="user_id", columns="limit", values="p_default").loc[ids]
    np.testing.assert_allclose(ev.curves, mine.to_numpy(), atol=1e-5)
    table = decide(bundle, ev, ctx, grid)
    np.testing.assert_allclose(table.limit, dec.loc[ids, "limit"], atol=1e-5)
    assert list(table.binding_constraint) == list(dec.loc[ids, "binding_constraint"].astype(str))
    unknown = read_known(snap, [123456789])
    assert not unknown.known[0]
    snap.close()


def _applicant_setup(sim_data: Path, tmp_path: Path):
    """D without one ring member u, and D + u arriving one second after D's last decision.

    u is a ring member whose device/phone is shared with others seen in the last history window
    (so the applicant has co-users to receive); its links are dated the day before it applies.
    """
    users = pd.read_parquet(sim_data / "users.parquet")
    links = pd.read_parquet(sim_data / "links.parquet")
    seg = pd.read_parquet(sim_data / "segments.parquet")
    t_last = users["as_of"].max()
    recent = links[(links.ts > t_last - pd.Timedelta(days=80)) & (links.ts <= t_last)]
    shared = recent[recent.entity_type.isin(["device", "phone"])]
    size = shared.groupby(["entity_type", "entity_id"])["user_id"].nunique()
    busy = size[size >= 3].index
    ring = set(seg.loc[seg["segment"] == "gang", "user_id"])
    cand = shared.set_index(["entity_type", "entity_id"]).loc[busy].reset_index()
    cand = cand[cand.user_id.isin(ring)]
    u = int(cand["user_id"].value_counts().index[0])
    minus = _copy(sim_data, tmp_path / "minus")
    keep = users[users.user_id != u]
    keep.to_parquet(minus / "users.parquet", index=False)
    links[links.user_id != u].to_parquet(minus / "links.parquet", index=False)
    t_last = keep["as_of"].max()
    t_app = t_last + pd.Timedelta(seconds=1)
    plus = _copy(sim_data, tmp_path / "plus")
    mine = users[users.user_id == u].copy()
    mine["as_of"] = t_app
    pd.concat([keep, mine]).to_parquet(plus / "users.parquet", index=False)
    own = links[links.user_id == u].drop_duplicates(["entity_type", "entity_id"]).copy()
    own["ts"] = t_app - pd.Timedelta(days=1)  # the applicant's devices, seen the day before
    pd.concat([links[links.user_id != u], own]).to_parquet(plus / "links.parquet", index=False)
    for d in (minus, plus):
        for name in ("truth.parquet", "segments.parquet"):
            (d / name).unlink()
    return u, mine.iloc[0], own, t_app


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_applicant_online_equals_batch_with_the_user_added(
    backend, trained_run, sim_data, tmp_path, request
):
    """Seed 001's consistency: a user the snapshot never saw, scored from its own data and its
    entities' stored sums, gets what a batch run with the user added gives it (to 1e-5), with
    the served snapshot's records in the SQLite file store or in a real Redis."""
    u, row, own, t_app = _applicant_setup(sim_data, tmp_path)
    reg = tmp_path / "reg"
    uri = request.getfixturevalue("redis_url") if backend == "redis" else None
    score_users(
        trained_run,
        tmp_path / "minus",
        tmp_path / "s_minus",
        registry=reg,
        promote=True,
        store_uri=uri,
    )
    score_users(trained_run, tmp_path / "plus", tmp_path / "s_plus", registry=tmp_path / "reg2")
    bundle = ScoringBundle.load(trained_run)
    grid = bundle.policy.grid_values()
    snap = Registry(reg).open()
    app = Applicant(
        user_id=u,
        raw=row[bundle.feature_names].to_numpy(dtype=np.float64),
        limit=float(row["credit_limit"]),
        as_of=_days(t_app),
        links=[(r.entity_type, r.entity_id, _days(r.ts)) for r in own.itertuples()],
    )
    ctx = for_applicants(bundle, snap, [app])
    used = ctx.entities[0]
    assert any(e["known"] and e["neighbours"] > 0 for e in used), "no shared entity reached"
    ev = evaluate(bundle, ctx, grid)
    cur = pd.read_parquet(tmp_path / "s_plus" / "curves.parquet")
    batch = cur[cur.user_id == u].sort_values("limit")["p_default"].to_numpy()
    np.testing.assert_allclose(ev.curves[0], batch, atol=1e-5)
    dec = pd.read_parquet(tmp_path / "s_plus" / "decisions.parquet").set_index("user_id").loc[u]
    assert ev.dsl[0] == pytest.approx(dec["dsl_score"], abs=1e-5)
    no_caps = decide(bundle, ev, ctx, grid, user_cap=np.array([np.inf]))
    assert no_caps.risk_limit[0] == pytest.approx(dec["risk_limit"], abs=1e-5)
    snap.close()


def test_a_ring_device_raises_a_new_users_risk(scored, trained_run, sim_data):
    """The same applicant, once alone and once sharing a fraud ring's device."""
    _, _, registry = scored
    bundle = ScoringBundle.load(trained_run)
    grid = bundle.policy.grid_values()
    snap = Registry(registry).open()
    users = pd.read_parquet(sim_data / "users.parquet")
    links = pd.read_parquet(sim_data / "links.parquet")
    seg = pd.read_parquet(sim_data / "segments.parquet")
    ring = links[links.user_id.isin(seg.loc[seg.segment == "gang", "user_id"])]
    device = ring[ring.entity_type == "device"]["entity_id"].value_counts().index[0]
    t = _days(users["as_of"].max())
    raw = users[bundle.feature_names].median().to_numpy(dtype=np.float64)
    alone = Applicant("a", raw, 0.0, t, [])
    linked = Applicant("b", raw, 0.0, t, [("device", device, t - 1.0)])
    ctx = for_applicants(bundle, snap, [alone, linked])
    assert ctx.entities[1][0]["neighbours"] >= 2 and not ctx.entities[0]
    ev = evaluate(bundle, ctx, grid)
    assert not np.allclose(ev.curves[0], ev.curves[1])
    assert ev.curves[1].mean() > ev.curves[0].mean()
    snap.close()


def test_curves_follow_todays_links_and_never_a_later_one(trained_run, sim_data, tmp_path, scored):
    out, _, _ = scored
    base = pd.read_parquet(out / "curves.parquet")
    users = pd.read_parquet(sim_data / "users.parquet").set_index("user_id")
    links = pd.read_parquet(sim_data / "links.parquet")
    seg = pd.read_parquet(sim_data / "segments.parquet")
    ordinary = seg.loc[seg.segment == "ordinary", "user_id"].to_numpy()[:40]
    ring = links[links.user_id.isin(seg.loc[seg.segment == "gang", "user_id"])]
    device = ring[ring.entity_type == "device"]["entity_id"].value_counts().index[0]
    when = users.loc[ordinary, "as_of"]
    late, now = ordinary[:20], ordinary[20:]
    new = pd.DataFrame(
        {
            "user_id": np.r_[late, now],
            "entity_type": "device",
            "entity_id": device,
            # seen after every decision time of the batch (must change nothing: no user's
            # as_of is later) or the day before the user's own decision (must matter)
            "ts": np.r_[
                np.full(len(late), users["as_of"].max() + pd.Timedelta(days=1)),
                when.loc[now] - pd.Timedelta(days=1),
            ],
        }
    )
    moved = _copy(sim_data, tmp_path / "moved")
    pd.concat([links, new]).to_parquet(moved / "links.parquet", index=False)
    score_users(trained_run, moved, tmp_path / "s", registry=tmp_path / "reg")
    after = pd.read_parquet(tmp_path / "s" / "curves.parquet")

    def curves(frame, ids):
        sub = frame[frame.user_id.isin(ids)]
        return sub.pivot(index="user_id", columns="limit", values="p_default").loc[ids].to_numpy()

    # only float noise from the changed summation order elsewhere in the graph (< 1e-5)
    np.testing.assert_allclose(curves(after, late), curves(base, late), atol=1e-5)
    changed = np.abs(curves(after, now) - curves(base, now)).max(axis=1) > 1e-4
    assert changed.mean() > 0.5, "today's links did not move the curves"


def test_a_failed_run_leaves_no_output_and_no_snapshot(trained_run, sim_data, tmp_path):
    blocker = tmp_path / "reg"
    blocker.write_text("a file where the registry should be")
    out = tmp_path / "out"
    with pytest.raises(OSError):
        score_users(trained_run, sim_data, out, registry=blocker)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    summary = score_users(trained_run, sim_data, out, registry=tmp_path / "reg_ok")
    assert (out / "decisions.parquet").exists() and summary["users_scored"] > 0


def test_embed_only_snapshot_says_it_has_no_caps(trained_run, sim_data, tmp_path):
    summary = score_users(
        trained_run, sim_data, tmp_path / "e", registry=tmp_path / "r", decide=False
    )
    reg = Registry(tmp_path / "r")
    meta = reg.meta(summary["snapshot"])
    assert meta["caps"]["present"] is False
    assert not (tmp_path / "e" / "decisions.parquet").exists()
    snap = reg.open(summary["snapshot"])
    assert snap.caps_present is False and np.isinf(snap.users([10000000])[0]["user_cap"]).all()
    snap.close()


def test_inference_is_independent_of_batching(trained_run):
    """The thinned towers' masks are fixed per model: a user's uncertainty is the same alone."""
    inf = Inference.load(RunLayout(trained_run))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, inf.model.outcome.trunk[0].in_features)).astype(np.float32)
    grid = np.linspace(0, 20_000, 9)
    all_std, all_logit = inf.uncertainty(x, grid)
    one_std, one_logit = inf.uncertainty(x[5:6], grid)
    assert one_std[0] == pytest.approx(all_std[5], abs=1e-7)
    np.testing.assert_allclose(one_logit[0], all_logit[5], atol=1e-6)
    assert (all_std > 0).all()
