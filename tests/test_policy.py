"""The limit decision: binding constraints, cluster caps, the DSL rule, guardrails, clusters."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from creditgraph.config import PipelineConfig
from creditgraph.data.spec import EntityType
from creditgraph.policy.clusters import build_clusters, clusters_for_dataset
from creditgraph.policy.config import ClusterConfig, GridConfig, PolicyConfig, nice_step
from creditgraph.policy.decide import (
    BINDINGS,
    allocate_cluster_caps,
    decide,
    decide_with_caps,
    effective_ceiling,
    exploration_draws,
    largest_feasible_limit,
    online_decision,
)

GRID = np.arange(0, 50_001, 5_000, dtype=np.float64)  # 11 points


def _linear(p0: float, p_max: float, grid: np.ndarray = GRID) -> np.ndarray:
    return p0 + (p_max - p0) * grid / grid[-1]


def _random_curves(rng: np.random.Generator, n: int, grid: np.ndarray = GRID) -> np.ndarray:
    """Mostly increasing curves crossing 0.10 anywhere, some bumpy, some all above/below."""
    base = rng.uniform(0.0, 0.12, n)[:, None]
    slope = rng.uniform(0.0, 0.15, n)[:, None]
    bump = rng.normal(0, 0.01, (n, grid.size)) * (rng.random(n) < 0.3)[:, None]
    return np.clip(base + slope * grid / grid[-1] + bump, 0, 1)


def test_each_binding_constraint_triggers_and_is_reported():
    cfg = PolicyConfig(
        r_max=0.10,
        dsl={"threshold": 0.5, "strength": 0.5},
        clusters={"cap_per_member": 20_000, "cap_total": None},
        guardrail={"cap": 0},
        exploration={"share": 0.2, "low": 0.5, "high": 1.5, "max_risk": 0.25},
        stability={"max_cut": 0.3, "hard_ceiling": 0.25},
    )
    crossing = _linear(0.015, 0.175)  # p <= 0.10 up to 25,000, p <= 0.05 up to 10,000
    # name: (curve, dsl, cluster, rule, current limit, exploration draw u)
    rows = {
        "risk_ceiling": (crossing, 0.0, -1, None, 0.0, 0.9),
        "grid_max": (_linear(0.01, 0.05), 0.0, -1, None, 0.0, 0.9),
        "no_feasible_limit": (_linear(0.15, 0.30), 0.0, -1, None, 0.0, 0.9),
        "dsl": (crossing, 1.0, -1, None, 0.0, 0.9),  # r_eff = 0.05
        "guardrail": (_linear(0.01, 0.05), 0.0, -1, "stacked_devices_and_new_account", 0.0, 0.1),
        "cluster_cap": (_linear(0.01, 0.05), 0.0, 7, None, 0.0, 0.9),
        "cluster_mate": (_linear(0.01, 0.05), 0.0, 7, None, 0.0, 0.9),
        # holds 50,000 today; risk allows 25,000; the cut is limited to 30 %: 35,000
        "stability": (crossing, 0.0, -1, None, 50_000.0, 0.9),
        # decided 25,000, then a randomized factor ~1.34: 30,000 (snapped down to the grid)
        "exploration": (crossing, 0.0, -1, None, 0.0, 0.1),
    }
    curves = np.stack([r[0] for r in rows.values()])
    draws = np.column_stack([[r[5] for r in rows.values()], np.full(len(rows), 0.9)])
    table = decide(
        curves,
        GRID,
        dsl_score=np.array([r[1] for r in rows.values()]),
        cluster_id=np.array([r[2] for r in rows.values()]),
        guardrail_hits=[r[3] for r in rows.values()],
        config=cfg,
        current=np.array([r[4] for r in rows.values()]),
        draws=draws,
    )
    got = dict(zip(rows, table.binding_constraint, strict=True))
    for name in BINDINGS:
        assert got[name] == name, (name, got[name])
    limit = dict(zip(rows, table.limit, strict=True))
    assert limit["risk_ceiling"] == 25_000 and limit["grid_max"] == 50_000
    assert limit["no_feasible_limit"] == 0 and limit["dsl"] == 10_000
    assert limit["guardrail"] == 0 and table.rule[4] == "stacked_devices_and_new_account"
    assert limit["cluster_cap"] + limit["cluster_mate"] <= 2 * 20_000
    assert limit["cluster_cap"] == 20_000  # two equal demands of 50,000 share 40,000
    assert np.isclose(table.r_max_effective[3], 0.05)
    assert table.counts()["cluster_cap"] == 2
    assert limit["stability"] == 35_000 and limit["exploration"] == 30_000
    factor = dict(zip(rows, table.explore_factor, strict=True))
    assert np.isnan(factor["guardrail"])  # a user hit by a rule is never explored
    assert factor["exploration"] == pytest.approx(np.exp(np.log(0.5) + 0.9 * np.log(3.0)))
    frame = table.to_frame(user_ids=np.arange(len(rows)) + 100)
    assert list(frame.columns[:3]) == ["user_id", "limit", "p_default_at_limit"]
    assert frame["binding_constraint"].tolist() == list(table.binding_constraint)
    assert frame["rule"].isna().sum() == len(rows) - 1


def test_cluster_totals_never_exceed_caps_and_limits_stay_feasible():
    rng = np.random.default_rng(3)
    n = 6_000
    curves = _random_curves(rng, n)
    cluster_id = np.where(rng.random(n) < 0.6, rng.integers(0, 400, n), -1)
    dsl = rng.random(n)
    rules = np.where(rng.random(n) < 0.05, "rule_a", None)
    cfg = PolicyConfig(clusters={"cap_per_member": 12_000, "cap_total": 60_000, "min_size": 3})
    t = decide(curves, GRID, dsl_score=dsl, cluster_id=cluster_id, guardrail_hits=rules, config=cfg)
    assert np.isin(t.limit, GRID).all(), "a limit off the grid"
    assert np.all(t.limit <= t.risk_limit)
    idx = np.searchsorted(GRID, t.limit)
    ok = curves[np.arange(n), idx] <= t.r_max_effective
    assert np.all(ok | (t.limit == GRID[0])), "a limit above the (DSL-lowered) ceiling"
    frame = pd.DataFrame({"c": cluster_id, "limit": t.limit})
    per = frame[frame.c >= 0].groupby("c")["limit"].agg(["sum", "size"])
    big = per[per["size"] >= 3]
    cap = np.minimum(12_000 * big["size"], 60_000)
    assert (big["sum"] <= cap).all(), "a cluster got more than its cap"
    assert (t.binding_constraint == "cluster_cap").sum() > 100  # the caps really bound
    small = np.isin(cluster_id, per.index[per["size"] < 3]) | (cluster_id < 0)
    assert np.isinf(t.user_cap[small]).all()
    assert (t.binding_constraint[small] != "cluster_cap").all()
    assert np.all(t.limit[rules == "rule_a"] == 0)


def test_cluster_caps_within_budget_add_up_to_the_cap():
    cfg = ClusterConfig(cap_per_member=10_000, cap_total=None)
    demand = np.array([5_000.0, 0.0, 10_000.0, 0.0, 0.0, 20_000.0, 40_000.0])
    cid = np.array([0, 0, 0, 1, 1, 2, 2])
    caps = allocate_cluster_caps(demand, cid, cfg)
    assert np.isclose(caps[:3].sum(), 30_000) and np.all(caps[:3] >= demand[:3])
    assert caps[1] == 0  # no demand, no share of the slack when others have demand
    assert np.allclose(caps[3:5], 10_000)  # nobody asks: equal shares
    assert np.allclose(caps[5:], [20_000 / 3, 40_000 / 3])  # over the cap: proportional
    # a share that is a grid point up to float error stays on it: 11,000 x 9,100 / 13,000 is
    # 7,700 exactly but 7,699.999... in floating point (a grid of step 100)
    demand = np.array([1_000.0, 1_000.0, 11_000.0])
    tight = ClusterConfig(cap_per_member=None, cap_total=9_100)
    caps = allocate_cluster_caps(demand, np.zeros(3, int), tight)
    snapped = np.floor(caps / 100) * 100
    assert snapped.tolist() == [700, 700, 7_700] and snapped.sum() <= 9_100


def test_dsl_rule_is_monotone():
    rng = np.random.default_rng(5)
    n = 500
    curves = _random_curves(rng, n)
    scores = np.linspace(0, 1, 21)
    for contiguous in (False, True):
        cfg = PolicyConfig(contiguous=contiguous, dsl={"threshold": 0.3, "strength": 0.9})
        limits = np.stack([decide(curves, GRID, dsl_score=s, config=cfg).limit for s in scores])
        assert np.all(np.diff(limits, axis=0) <= 0), "a higher DSL score gave a higher limit"
        assert (limits[-1] < limits[0]).any()
    r = effective_ceiling(0.1, scores, threshold=0.3, strength=0.9)
    assert np.all(np.diff(r) <= 0) and r[0] == 0.1 and np.isclose(r[-1], 0.01)
    assert np.all(r[scores <= 0.3] == 0.1)


def test_guardrail_caps_names_rule_and_snaps_down():
    curves = np.stack([_linear(0.01, 0.05)] * 4)
    cfg = PolicyConfig(guardrail={"cap": 12_345})
    hits = pd.array(["r1", None, None, ""], dtype="string")  # pandas' string dtype: pd.NA
    for h in (hits, ["r1", None, np.nan, ""]):
        t = decide(curves, GRID, guardrail_hits=h, config=cfg)
        assert t.limit.tolist() == [10_000, 50_000, 50_000, 50_000]
        assert t.rule.tolist() == ["r1", None, None, None]
        assert t.binding_constraint.tolist()[0] == "guardrail"
    off = decide(curves, GRID, guardrail_hits=hits, config=PolicyConfig(guardrail={"enabled": 0}))
    assert off.limit[0] == 50_000 and off.rule[0] == "r1"  # named, not applied
    # a rule whose cap does not lower the limit leaves the other constraint binding
    t = decide(np.stack([_linear(0.2, 0.3)]), GRID, guardrail_hits=["r2"])
    assert t.binding_constraint[0] == "no_feasible_limit" and t.rule[0] == "r2"


def _same(a, b) -> bool:
    """Decisions equal field by field (NaN equals NaN)."""
    da, db = a.as_dict(), b.as_dict()
    return da.keys() == db.keys() and all(
        (isinstance(x, float) and isinstance(y, float) and np.isnan(x) and np.isnan(y)) or x == y
        for x, y in zip(da.values(), db.values(), strict=True)
    )


def test_online_decision_equals_batch():
    rng = np.random.default_rng(11)
    n = 1_500
    curves = _random_curves(rng, n)
    curves[rng.random(n) < 0.02, 3] = np.nan
    cid = np.where(rng.random(n) < 0.7, rng.integers(0, 150, n), -1)
    dsl = rng.random(n)
    r_max = rng.uniform(0.05, 0.12, n)
    rules = np.where(rng.random(n) < 0.05, "r_x", None)
    current = np.where(rng.random(n) < 0.3, rng.choice(GRID, n), 0.0)
    draws = exploration_draws(np.arange(n), "2026-01-01/0")
    bound = np.minimum(curves * 1.2, 1.0)
    for contiguous in (False, True):
        cfg = PolicyConfig(
            contiguous=contiguous,
            clusters={"cap_per_member": 15_000, "cap_total": 90_000},
            guardrail={"cap": 5_000},
            exploration={"share": 0.1},
        )
        extras = {"bound": bound, "current": current, "draws": draws}
        t = decide(
            curves,
            GRID,
            r_max,
            dsl_score=dsl,
            cluster_id=cid,
            guardrail_hits=rules,
            config=cfg,
            **extras,
        )
        assert set(t.binding_constraint) == set(BINDINGS)
        assert (t.p_upper_at_limit >= t.p_default_at_limit - 1e-12)[
            np.isfinite(t.p_upper_at_limit)
        ].all()
        # the distributed form: demands per chunk, one allocation, final decisions per chunk
        demand = np.concatenate(
            [
                decide(
                    curves[c],
                    GRID,
                    r_max[c],
                    dsl_score=dsl[c],
                    guardrail_hits=rules[c],
                    config=cfg,
                    **{k: v[c] for k, v in extras.items()},
                ).demand
                for c in np.array_split(np.arange(n), 3)
            ]
        )
        caps = allocate_cluster_caps(demand, cid, cfg.clusters)
        assert np.array_equal(caps, t.user_cap)
        for c in np.array_split(np.arange(n), 4):
            part = decide_with_caps(
                curves[c],
                GRID,
                r_max[c],
                user_cap=np.where(np.isinf(caps[c]), np.nan, caps[c]),  # as read back from parquet
                dsl_score=dsl[c],
                cluster_id=cid[c],
                guardrail_hits=rules[c],
                config=cfg,
                **{k: v[c] for k, v in extras.items()},
            )
            assert part.to_frame().equals(t.to_frame().iloc[c].reset_index(drop=True))
        for i in range(n):
            one = online_decision(
                curves[i],
                GRID,
                r_max[i],
                dsl[i],
                t.user_cap[i],
                rules[i],
                cluster_id=int(cid[i]),
                config=cfg,
                bound=bound[i],
                current=float(current[i]),
                draws=draws[i],
            )
            assert _same(one, t.row(i)), i


def test_decide_uses_largest_feasible_limit_without_extras():
    rng = np.random.default_rng(2)
    curves = _random_curves(rng, 300)
    cfg = PolicyConfig(dsl={"strength": 0.0})
    t = decide(curves, GRID, 0.08, config=cfg)
    limits, idx = largest_feasible_limit(curves, GRID, 0.08)
    assert np.array_equal(t.limit, limits) and np.array_equal(t.index, idx)
    assert set(t.binding_constraint) <= {"risk_ceiling", "grid_max", "no_feasible_limit"}


def test_decide_input_validation():
    curves = np.stack([_linear(0.01, 0.05)] * 2)
    with pytest.raises(ValueError, match="dsl_score"):
        decide(curves, GRID, dsl_score=np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="shape"):
        decide(curves[:, :5], GRID)
    with pytest.raises(ValueError, match="cluster_id"):
        decide(curves, GRID, cluster_id=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="guardrail_hits"):
        decide(curves, GRID, guardrail_hits=["a"])
    cfg = PolicyConfig(grid=GridConfig(start=0, stop=50_000, step=1_000))
    t = decide(np.stack([_linear(0.01, 0.2, cfg.grid_values())]), config=cfg)  # config's grid
    assert len(t) == 1 and t.limit[0] in cfg.grid_values()
    with pytest.raises(ValueError, match="resolve"):  # no grid until the run's scale is known
        decide(np.stack([_linear(0.01, 0.2, cfg.grid_values())]))


def test_policy_config():
    cfg = PipelineConfig.model_validate(
        {"policy": {"grid": {"start": 0, "stop": 20_000, "step": 2_500}, "r_max": 0.05}}
    )
    assert cfg.policy.grid.values().tolist() == [i * 2_500.0 for i in range(9)]
    assert GridConfig().size == 51 and GridConfig(start=0, stop=1, step=0.1).size == 11
    for bad in ({"step": 0}, {"start": 10, "stop": 5}, {"stop": 1e7, "step": 1}):
        with pytest.raises(ValidationError):
            GridConfig(**bad)
    with pytest.raises(ValidationError):
        PolicyConfig(r_max=0)
    with pytest.raises(ValidationError):
        PolicyConfig(
            clusters={"cap_per_member_median": None, "cap_total_median": None}
        )  # enabled caps need some cap
    with pytest.raises(ValidationError):
        PolicyConfig(unknown=1)
    cap = ClusterConfig(cap_per_member=1_000, cap_total=5_000, min_size=3).cap_for_size(
        np.array([1, 2, 3, 4, 10])
    )
    assert cap.tolist() == [np.inf, np.inf, 3_000, 4_000, 5_000]


def test_policy_resolves_to_the_runs_own_limit_scale():
    scale = {"median_positive": 8_000.0, "q99_positive": 97_300.0}
    policy = PolicyConfig().resolve(scale)
    grid = policy.grid_values()
    assert grid[0] == 0 and 97_300 <= grid[-1] < 97_300 + policy.grid.step
    assert policy.grid.step == 2_500 and 30 <= len(grid) <= 50  # round steps a person would use
    assert policy.clusters.cap_per_member == 2.5 * 8_000 and policy.clusters.cap_total == 25 * 8_000
    # an explicit grid and absolute caps stay as given
    fixed = PolicyConfig(
        grid=GridConfig(start=0, stop=10_000, step=500),
        clusters={"cap_per_member": 1_000.0, "cap_total": None},
    ).resolve(scale)
    assert fixed.grid.stop == 10_000 and fixed.clusters.cap_per_member == 1_000
    assert np.isinf(fixed.clusters.cap_for_size(np.array([100]))[0]) == False  # noqa: E712
    with pytest.raises(ValueError, match="resolve"):
        PolicyConfig().clusters.cap_for_size(np.array([3]))
    assert [nice_step(x) for x in (0.7, 3, 2_400, 2_600, 51_000)] == [1, 5, 2_500, 5_000, 100_000]


# ------------------------------------------------------------------------------------ clusters
ENTITIES = {
    "device": EntityType(max_degree=5),
    "ip": EntityType(max_degree=100, high_confidence=False),
    "address": EntityType(max_degree=5),
}


def _links(rows: list[tuple[int, str, object, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_idx", "entity_type", "entity_id", "ts_days"])


def _groups(cl) -> set[frozenset[int]]:
    return {frozenset(cl.members(k).tolist()) for k in range(cl.n_clusters)}


def test_clusters_follow_high_confidence_links_only():
    rows = [(0, "device", "d1", 10.0), (1, "device", "d1", 11.0), (2, "device", "d2", 10.0)]
    rows += [(1, "address", 77, 5.0), (3, "address", 77, 9.0)]  # 0-1-3 through d1 and 77
    rows += [(4, "ip", "1.2.3.4", 10.0), (5, "ip", "1.2.3.4", 10.0)]  # low confidence
    rows += [(6, "device", "d9", 10.0), (7, "device", "d9", 30.0)]  # 7 only after t = 20
    cl = build_clusters(_links(rows), 9, ENTITIES, decision_time=20.0)
    assert _groups(cl) == {frozenset({0, 1, 3})}
    assert cl.cluster_id[[2, 4, 5, 6, 7, 8]].tolist() == [-1] * 6
    with pytest.raises(TypeError, match="clusters_for_dataset"):
        build_clusters(_links(rows), 9, ENTITIES)
    assert cl.size_of_user()[[0, 2]].tolist() == [3, 1]
    later = build_clusters(_links(rows), 9, ENTITIES, decision_time=30.0)
    assert _groups(later) == {frozenset({0, 1, 3}), frozenset({6, 7})}
    windowed = build_clusters(_links(rows), 9, ENTITIES, decision_time=30.0, history_days=22.0)
    assert _groups(windowed) == {frozenset({0, 1}), frozenset({6, 7})}  # 77 seen too long ago
    g = cl.subgraph(0)
    assert nx.is_connected(g) and {
        d["entity_type"] for _, d in g.nodes(data=True) if d["bipartite"]
    } == {"device", "address"}
    frame = cl.to_frame(user_ids=np.arange(9) + 1000)
    assert frame.loc[frame.user_id == 1003, "cluster_size"].item() == 3


def test_super_nodes_do_not_merge_everyone():
    hub = [(u, "address", "warehouse", 1.0) for u in range(12)]  # 12 users > max_degree 5
    pairs = [(0, "device", "a", 2.0), (1, "device", "a", 2.0)]
    pairs += [(2, "device", "b", 2.0), (3, "device", "b", 2.0)]
    cl = build_clusters(_links(hub + pairs), 12, ENTITIES, decision_time=5.0)
    assert _groups(cl) == {frozenset({0, 1}), frozenset({2, 3})}
    assert cl.stats["supernodes"] == {"address": 1}
    # the cut counts distinct users seen by the decision time: before the crowd it still ties
    early = [(u, "address", "x", float(u)) for u in range(8)]
    cl = build_clusters(_links(early), 8, ENTITIES, decision_time=2.5)
    assert _groups(cl) == {frozenset({0, 1, 2})}
    cl = build_clusters(_links(early), 8, ENTITIES, decision_time=7.0)
    assert cl.n_clusters == 0


def test_large_components_are_split_into_communities():
    rows = []
    for g, base in enumerate((0, 12)):  # two dense groups of 12 users bridged by one device
        for u in range(base, base + 12):
            rows += [(u, "device", f"g{g}-{k}", 1.0) for k in range(3)]
    rows += [(11, "device", "bridge", 1.0), (12, "device", "bridge", 1.0)]
    ents = {"device": EntityType(max_degree=20)}
    whole = build_clusters(_links(rows), 24, ents, 2.0, split_above=None)
    assert _groups(whole) == {frozenset(range(24))}
    split = build_clusters(_links(rows), 24, ents, 2.0, split_above=15)
    assert _groups(split) == {frozenset(range(12)), frozenset(range(12, 24))}
    assert split.stats["split_components"] == 1


def test_clusters_on_simulated_data(sim_data):
    from creditgraph.data.load import load_dataset

    ds = load_dataset(sim_data, with_truth=False)
    cfg = ClusterConfig(history_days=10_000)  # the whole past: big, percolating components
    a = clusters_for_dataset(ds, config=cfg)
    b = clusters_for_dataset(ds, config=cfg, method="scipy")
    assert np.array_equal(a.cluster_id, b.cluster_id) and a.n_clusters > 20
    assert a.stats["largest_component"] > 200 and a.sizes.max() < a.stats["largest_component"]
    big = int(np.argmax(a.sizes))
    g = a.subgraph(big)
    types = {d["entity_type"] for _, d in g.nodes(data=True) if d["bipartite"] == 1}
    assert "ip" not in types  # low confidence in the simulated spec
    assert sum(1 for _, d in g.nodes(data=True) if d["bipartite"] == 0) == a.sizes[big]
    now = clusters_for_dataset(ds)  # default: as of the batch's latest as_of, 90-day window
    assert now.decision_time == pytest.approx(ds.t_days.max())
    assert now.stats["users_in_clusters"] < a.stats["users_in_clusters"]
    rng = np.random.default_rng(0)
    policy = PolicyConfig().resolve({"median_positive": 10_000, "q99_positive": 50_000})
    curves = _random_curves(rng, ds.n_users, policy.grid_values())
    t = decide(curves, cluster_id=a.cluster_id, config=policy)
    per = pd.Series(t.limit).groupby(a.cluster_id).sum().drop(-1, errors="ignore")
    caps = policy.clusters.cap_for_size(a.sizes[per.index])
    assert np.all(per.to_numpy() <= caps)
