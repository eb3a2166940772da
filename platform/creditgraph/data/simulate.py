"""A simulated marketplace whose true risk curves are known (see docs/simulation.md).

Everything is vectorized numpy so that a million users take minutes. The generating process:
latent risk and capacity per user; gangs (shared devices/phones/addresses, inflated volumes,
correlated defaults), households and offices (benign sharing), public super-nodes (public IPs,
warehouse addresses); observed features with realistic shapes and missing-not-at-random values;
a confounded, zero-inflated historical limit chosen from the observed features only; a peer
effect of peers' limits; a segment-specific nonlinear dose-response in limit / capacity; labels
that mature 90 days after ``as_of``; links before and after ``as_of`` (including post-default
collection links that would leak the label if time were ignored); and ``truth.parquet`` with
p(default | do(limit = L)) on a grid, peers' limits held at their observed values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field

from creditgraph.data.spec import DatasetSpec, EntityType, LimitTests
from creditgraph.utils.io import atomic_dir, write_json
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

ENTITY_TYPES = {
    "device": EntityType(weight=1.0, max_degree=30),
    "phone": EntityType(weight=1.0, max_degree=30),
    "address": EntityType(weight=0.6, max_degree=60),
    "ip": EntityType(weight=0.3, max_degree=100, high_confidence=False),
}
SEGMENTS = ("gang", "supernode_neighbour", "high_missing", "ordinary")


class SimulationConfig(BaseModel):
    """Parameters of the generating process (defaults give the benchmark's standard world)."""

    model_config = ConfigDict(extra="forbid")

    n_users: int = Field(20_000, ge=100)
    seed: int = 0
    start: str = "2025-01-01"
    span_days: float = Field(365.0, gt=0, description="as_of dates are spread over this span")
    label_window_days: float = Field(90.0, gt=0, description="a default is observed this late")
    snapshot_lag_days: float = Field(
        30.0, ge=0, description="the data snapshot is taken this long after the last as_of"
    )
    # groups
    gang_share: float = Field(0.06, ge=0, le=0.5)
    gang_size: tuple[int, int] = (4, 20)
    household_share: float = Field(0.25, ge=0, le=1)
    household_size: tuple[int, int] = (2, 4)
    office_share: float = Field(0.15, ge=0, le=1)
    office_size: tuple[int, int] = (5, 40)
    public_ips: int = Field(20, ge=1)
    public_ip_share: float = Field(0.3, ge=0, le=1)
    warehouses: int = Field(10, ge=1)
    warehouse_share: float = Field(0.08, ge=0, le=1)
    # risk
    base_logit: float = -3.3
    risk_coef: float = 0.9
    gang_risk_mean: float = 0.8
    gang_shock_sd: float = 0.7
    gang_fake_volume: float = Field(2.5, ge=1, description="gangs inflate GMV by this factor")
    exploration_share: float = Field(
        0.15, ge=0, le=1, description="share of users in randomized limit tests (overlap)"
    )
    peer_coef: dict[str, float] = Field(
        default_factory=lambda: {"gang": 0.8, "household": 0.3, "office": 0.1}
    )
    peer_scale: float = Field(5000.0, gt=0, description="peer limits enter as log1p(L / scale)")
    # missingness (MNAR): P(missing) = sigmoid(a + b * latent_risk)
    mnar: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: {
            "external_score": (-2.0, 1.0),
            "debt_to_revenue": (-1.8, 0.8),
            "registered_capital": (-1.5, 0.6),
            "employees": (-1.2, 0.5),
            "late_payment_ratio": (-2.5, 0.7),
        }
    )
    mcar_noise: float = Field(0.05, ge=0, lt=1, description="MCAR missing share of noise features")
    # links
    future_link_share: float = Field(0.1, ge=0, lt=1, description="links first seen after as_of")
    resight_share: float = Field(0.3, ge=0, le=1, description="links seen a second time")
    collection_group: int = Field(
        8, ge=2, description="defaulters per post-default collection phone"
    )
    # truth grid
    # up to the simulated limits' 99th percentile (~120,000) and beyond, so every decision a
    # policy on the data's own scale can make is judged against the truth
    truth_grid: list[float] = Field(
        default_factory=lambda: [float(x) for x in np.arange(0, 150_001, 2_500)]
    )

    @classmethod
    def from_yaml(cls, path: str | Path) -> SimulationConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _groups(
    rng: np.random.Generator,
    pool: np.ndarray,
    share: float,
    size: tuple[int, int],
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Assign a share of ``pool`` users to groups of random size; -1 = no group.

    ``weights`` (optional, >= 0) makes heavier users likelier members (drawn without replacement).
    """
    n = len(pool)
    group = np.full(n, -1, dtype=np.int64)
    k = int(share * n)
    if k < size[0]:
        return group
    sizes = rng.integers(size[0], size[1] + 1, size=k // size[0] + 1)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), k) + 1]
    labels = np.repeat(np.arange(len(sizes)), sizes)[:k]
    if weights is None:
        chosen = rng.permutation(n)[:k]
    else:
        chosen = rng.choice(n, size=k, replace=False, p=weights / weights.sum())
    group[chosen] = labels
    return group


def _std(x: np.ndarray) -> np.ndarray:
    m, s = np.nanmean(x), np.nanstd(x)
    return (x - m) / (s if s > 0 else 1.0)


def dose_response(rho: np.ndarray, segment_code: np.ndarray) -> np.ndarray:
    """Logit increment of default risk at utilisation ``rho = limit / capacity``.

    segment_code: 0 ordinary, 1 manufacturer (risk rises late, sigmoidal), 2 gang (rises early and
    steeply: money is extracted as soon as it is granted).
    """
    ordinary = 2.2 * (1.0 - np.exp(-rho / 1.2))
    manufacturer = 2.5 * rho**2 / (0.8**2 + rho**2)
    gang = 3.0 * (1.0 - np.exp(-rho / 0.4))
    return np.where(segment_code == 2, gang, np.where(segment_code == 1, manufacturer, ordinary))


def _peer_mean(group: np.ndarray, t: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Mean ``value`` over the other members of the same group whose ``t`` is earlier (0 if none)."""
    out = np.zeros(len(group))
    members = np.flatnonzero(group >= 0)
    if len(members) == 0:
        return out
    order = members[np.lexsort((t[members], group[members]))]
    g = group[order]
    v = value[order]
    csum = np.cumsum(v)
    first = np.r_[True, g[1:] != g[:-1]]
    start_idx = np.flatnonzero(first)
    run_start = start_idx[np.cumsum(first) - 1]
    before_sum = csum - v - np.where(run_start > 0, csum[run_start - 1], 0.0)
    before_cnt = np.arange(len(order)) - run_start
    out[order] = np.where(before_cnt > 0, before_sum / np.maximum(before_cnt, 1), 0.0)
    return out


def simulate(cfg: SimulationConfig) -> dict[str, pd.DataFrame]:
    """Generate the tables of a simulated dataset (users, links, truth, segments)."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_users
    idx = np.arange(n)
    user_id = 10_000_000 + idx

    # --- groups -------------------------------------------------------------------------
    gang = _groups(rng, idx, cfg.gang_share, cfg.gang_size)
    is_gang = gang >= 0
    household = _groups(rng, idx, cfg.household_share, cfg.household_size)
    household[is_gang] = -1
    office = _groups(rng, idx, cfg.office_share, cfg.office_size)

    # --- time ---------------------------------------------------------------------------
    t0 = pd.Timestamp(cfg.start)
    as_of = rng.uniform(0, cfg.span_days, n)
    n_gangs = int(gang.max()) + 1 if is_gang.any() else 0
    gang_start = rng.uniform(0, cfg.span_days - 30, max(n_gangs, 1))
    as_of[is_gang] = gang_start[gang[is_gang]] + rng.uniform(0, 30, is_gang.sum())
    snapshot = cfg.span_days + cfg.snapshot_lag_days

    # --- latent risk and capacity -----------------------------------------------------------
    risk = rng.normal(0, 1, n)
    gang_level = rng.normal(0, 0.6, max(n_gangs, 1))
    gang_shock = rng.normal(0, cfg.gang_shock_sd, max(n_gangs, 1))
    risk[is_gang] = (
        cfg.gang_risk_mean + gang_level[gang[is_gang]] + rng.normal(0, 0.5, is_gang.sum())
    )
    # what the risk features reveal: gangs look clean on paper
    risk_seen = np.where(is_gang, 0.3 * risk + rng.normal(0, 0.5, n), risk)
    log_cap = rng.normal(np.log(20_000), 0.7, n)
    capacity = np.exp(log_cap)
    manufacturer = rng.random(n) < 0.3

    # --- observed features --------------------------------------------------------------
    gmv = capacity * 3 * rng.lognormal(0, 0.4, n) * np.where(is_gang, cfg.gang_fake_volume, 1.0)
    order_value = rng.lognormal(np.log(800), 0.5, n)
    orders = rng.poisson(gmv / order_value).astype(float)
    avg_order_value = gmv / np.maximum(orders, 1)
    account_age = np.where(is_gang, rng.gamma(2, 60, n) + 10, rng.gamma(2, 400, n) + 30)
    registered_capital = capacity * rng.lognormal(1.0, 1.2, n)
    employees = rng.poisson(capacity / 5000).astype(float) + 1
    late_ratio = rng.beta(*_beta_ab(_sigmoid(-2.5 + 0.9 * risk_seen), 20))
    refund_rate = rng.beta(*_beta_ab(_sigmoid(-3.0 + 0.5 * risk_seen), 30))
    inquiries = rng.poisson(np.exp(-0.5 + 0.4 * risk_seen)).astype(float)
    external_score = np.clip(650 - 60 * risk_seen + rng.normal(0, 40, n), 300, 850).round()
    debt_to_revenue = rng.lognormal(-1 + 0.5 * risk_seen - 0.3 * (log_cap - np.log(20_000)), 0.6)
    night_share = rng.beta(*_beta_ab(_sigmoid(-2.0 + 0.8 * is_gang), 15))
    n_devices = 1 + rng.poisson(np.where(is_gang, 1.5, 0.5)).astype(float)
    features = {
        "gmv_90d": gmv.round(2),
        "orders_90d": orders,
        "avg_order_value": avg_order_value.round(2),
        "account_age_days": account_age.round(),
        "registered_capital": registered_capital.round(),
        "employees": employees,
        "late_payment_ratio": late_ratio,
        "refund_rate": refund_rate,
        "credit_inquiries_30d": inquiries,
        "external_score": external_score,
        "debt_to_revenue": debt_to_revenue,
        "night_order_share": night_share,
        "linked_devices": n_devices,
        "is_manufacturer": manufacturer.astype(float),
        "noise_normal": rng.normal(0, 1, n),
        "noise_lognormal": rng.lognormal(0, 1, n),
        "noise_uniform": rng.uniform(0, 1, n),
    }
    missing = np.zeros(n)
    for name, (a, b) in cfg.mnar.items():
        miss = rng.random(n) < _sigmoid(a + b * risk)
        features[name] = np.where(miss, np.nan, features[name])
        missing += miss
    for name in ("noise_normal", "noise_lognormal", "noise_uniform"):
        features[name] = np.where(rng.random(n) < cfg.mcar_noise, np.nan, features[name])

    # --- historical limit: the old underwriting policy saw only the features --------------
    f = features
    impute = {k: np.nan_to_num(v, nan=np.nanmedian(v)) for k, v in f.items()}
    grant_score = (
        0.6
        + 0.8 * _std(np.log1p(impute["gmv_90d"]))
        - 0.7 * _std(impute["late_payment_ratio"])
        - 0.5 * _std(impute["credit_inquiries_30d"])
        + 0.4 * _std(impute["external_score"])
        + 0.3 * _std(np.log1p(impute["account_age_days"]))
        - 0.35 * missing
        + rng.normal(0, 0.5, n)
    )
    granted = rng.random(n) < _sigmoid(grant_score)
    log_limit = (
        np.log(0.5 * impute["gmv_90d"] / 3)
        - 0.3 * _std(impute["late_payment_ratio"])
        + 0.2 * _std(impute["external_score"])
        - 0.1 * missing
        + rng.normal(0, 0.45, n)
    )
    limit = np.where(granted, np.clip(np.round(np.exp(log_limit), -2), 500, 150_000), 0.0)
    # limit tests: a randomized share got a log-uniform limit regardless of the features
    explore = rng.random(n) < cfg.exploration_share
    test_limit = np.round(np.exp(rng.uniform(np.log(500), np.log(80_000), n)), -2)
    limit = np.where(explore, np.where(rng.random(n) < 0.9, test_limit, 0.0), limit)

    # --- peer effect: limits already granted to peers when u is decided -------------------
    phi = np.log1p(limit / cfg.peer_scale)
    peer = (
        cfg.peer_coef.get("gang", 0) * _peer_mean(gang, as_of, phi)
        + cfg.peer_coef.get("household", 0) * _peer_mean(household, as_of, phi)
        + cfg.peer_coef.get("office", 0) * _peer_mean(office, as_of, phi)
    )
    seg_code = np.where(is_gang, 2, np.where(manufacturer, 1, 0))
    base = cfg.base_logit + cfg.risk_coef * risk + peer
    base = base + np.where(is_gang, gang_shock[np.maximum(gang, 0)], 0.0)

    def true_p(lim: np.ndarray) -> np.ndarray:
        return _sigmoid(base + dose_response(lim / capacity, seg_code))

    p_obs = true_p(limit)
    y = (rng.random(n) < p_obs).astype(float)
    matured = as_of + cfg.label_window_days <= snapshot
    outcome = np.where(matured, y, np.nan)

    grid = np.asarray(cfg.truth_grid, dtype=float)
    truth_p = _sigmoid(
        base[:, None] + dose_response(grid[None, :] / capacity[:, None], seg_code[:, None])
    )

    # --- links --------------------------------------------------------------------------
    links = simulate_links(
        rng, cfg, n, as_of, gang, household, office, defaulted=(y == 1) & matured
    )

    # --- segments for reports -------------------------------------------------------------
    supernode = np.zeros(n, dtype=bool)
    supernode[links["user_idx"][links["public"]]] = True
    high_missing = missing >= 2
    segment = np.select(
        [is_gang, supernode, high_missing],
        ["gang", "supernode_neighbour", "high_missing"],
        "ordinary",
    )

    as_of_ts = t0 + pd.to_timedelta(as_of, unit="D")
    users = pd.DataFrame({"user_id": user_id, "as_of": as_of_ts.astype("datetime64[ms]")})
    for k, v in features.items():
        users[k] = v
    users["credit_limit"] = limit
    users["default"] = outcome
    link_df = links_frame(links, user_id, t0)
    truth = {
        "user_id": np.repeat(user_id, len(grid)),
        "limit": np.tile(grid, n),
        "p_default": truth_p.astype(np.float32).ravel(),
    }
    segments = pd.DataFrame(
        {
            "user_id": user_id,
            "segment": segment,
            "gang_id": gang,
            "household_id": household,
            "office_id": office,
            "capacity": capacity,
            "latent_risk": risk,
            "p_default_observed": p_obs,
            "limit_test": explore,
        }
    )
    return {"users": users, "links": link_df, "truth": truth, "segments": segments}


def _beta_ab(mean: np.ndarray, concentration: float) -> tuple[np.ndarray, np.ndarray]:
    mean = np.clip(mean, 1e-3, 1 - 1e-3)
    return mean * concentration, (1 - mean) * concentration


class LinkParams(Protocol):
    """What :func:`simulate_links` reads from a config (both simulators' configs have these)."""

    public_ips: int
    public_ip_share: float
    warehouses: int
    warehouse_share: float
    future_link_share: float
    resight_share: float
    collection_group: int
    label_window_days: float


def simulate_links(
    rng: np.random.Generator,
    cfg: LinkParams,
    n: int,
    as_of: np.ndarray,
    gang: np.ndarray,
    household: np.ndarray,
    office: np.ndarray,
    defaulted: np.ndarray,
) -> dict[str, np.ndarray]:
    """Link rows (user_idx, type code, entity id, ts in days, public flag), vectorized.

    ``gang``, ``household`` and ``office`` are group ids per user (-1 = none); ``as_of`` and the
    returned ``ts`` are days since the simulation start. Gangs share three devices, two phones and
    an address; households an address (and sometimes a device); offices an address and an IP;
    everyone has personal entities and some public super-nodes; a share of links is first seen
    after ``as_of``; ``defaulted`` users are linked to collection phones after their default.
    """
    type_code = {t: i for i, t in enumerate(ENTITY_TYPES)}
    users, types, ents, public = [], [], [], []
    next_id = [0]

    def add(u: np.ndarray, etype: str, ent_local: np.ndarray, is_public: bool = False) -> None:
        base = next_id[0]
        users.append(u)
        types.append(np.full(len(u), type_code[etype], dtype=np.int8))
        ents.append(base + ent_local)
        public.append(np.full(len(u), is_public))
        next_id[0] = base + (int(ent_local.max()) + 1 if len(ent_local) else 0)

    idx = np.arange(n)
    # personal entities: singletons (no edges), but volume a real graph has
    for etype, p in (("device", 0.9), ("phone", 0.9), ("address", 0.7), ("ip", 0.6)):
        u = idx[rng.random(n) < p]
        add(u, etype, u)
    # households: shared address, sometimes a shared device
    u = idx[household >= 0]
    add(u, "address", household[u])
    u2 = u[rng.random(len(u)) < 0.4]
    add(u2, "device", household[u2])
    # offices: shared address and IP
    u = idx[office >= 0]
    ua = u[rng.random(len(u)) < 0.8]
    add(ua, "address", office[ua])
    ui = u[rng.random(len(u)) < 0.9]
    add(ui, "ip", office[ui])
    # gangs: several shared devices and phones, one address
    u = idx[gang >= 0]
    if len(u):
        for etype, k, p in (("device", 3, 0.6), ("phone", 2, 0.5), ("address", 1, 0.7)):
            for j in range(k):
                uj = (
                    u[(rng.random(len(u)) < p) | (j == 0)]
                    if etype == "device"
                    else u[rng.random(len(u)) < p]
                )
                add(uj, etype, gang[uj] * k + j)
    # public super-nodes
    u = idx[rng.random(n) < cfg.public_ip_share]
    add(u, "ip", rng.integers(0, cfg.public_ips, len(u)), is_public=True)
    u = idx[rng.random(n) < cfg.warehouse_share]
    add(u, "address", rng.integers(0, cfg.warehouses, len(u)), is_public=True)

    user_idx = np.concatenate(users)
    etype = np.concatenate(types)
    entity = np.concatenate(ents)
    is_public = np.concatenate(public)
    m = len(user_idx)
    # first sighting: mostly before as_of, some only after it
    before = as_of[user_idx] - rng.exponential(60.0, m)
    after = as_of[user_idx] + rng.uniform(1.0, 120.0, m)
    ts = np.where(rng.random(m) < cfg.future_link_share, after, before)
    # resightings
    again = rng.random(m) < cfg.resight_share
    user_idx = np.concatenate([user_idx, user_idx[again]])
    etype = np.concatenate([etype, etype[again]])
    entity = np.concatenate([entity, entity[again]])
    is_public = np.concatenate([is_public, is_public[again]])
    ts = np.concatenate([ts, ts[again] + rng.exponential(20.0, again.sum())])
    # collection phones after a default: a label leak if anyone ignored time
    d = idx[defaulted]
    if len(d):
        k = max(1, len(d) // cfg.collection_group)
        col_user = d
        col_ent = next_id[0] + rng.integers(0, k, len(d))
        col_ts = as_of[d] + rng.uniform(30.0, cfg.label_window_days, len(d))
        user_idx = np.concatenate([user_idx, col_user])
        etype = np.concatenate([etype, np.full(len(d), type_code["phone"], dtype=np.int8)])
        entity = np.concatenate([entity, col_ent])
        is_public = np.concatenate([is_public, np.zeros(len(d), dtype=bool)])
        ts = np.concatenate([ts, col_ts])
    return {"user_idx": user_idx, "type": etype, "entity": entity, "ts": ts, "public": is_public}


def links_frame(
    links: dict[str, np.ndarray], user_id: np.ndarray, t0: pd.Timestamp
) -> pd.DataFrame:
    """The ``links.parquet`` table of :func:`simulate_links` output (times from day 0 = ``t0``)."""
    return pd.DataFrame(
        {
            "user_id": user_id[links["user_idx"]],
            "entity_type": pd.Categorical.from_codes(links["type"], list(ENTITY_TYPES)).astype(str),
            "entity_id": links["entity"],
            "ts": (t0 + pd.to_timedelta(links["ts"], unit="D")).astype("datetime64[ms]"),
        }
    )


def simulate_to_dir(cfg: SimulationConfig, out: str | Path) -> dict:
    """Simulate and write a dataset directory in the contract (atomically)."""
    from tqdm.auto import tqdm

    out = Path(out)
    steps = tqdm(total=5, desc=f"simulate {cfg.n_users:,} users", disable=cfg.n_users < 200_000)
    tables = simulate(cfg)
    steps.update()
    spec = DatasetSpec(
        name=f"sim-{cfg.n_users}-s{cfg.seed}",
        id="user_id",
        time="as_of",
        treatment="credit_limit",
        outcome="default",
        features="all",
        entities=ENTITY_TYPES,
        history_days=90.0,
        segments="segments.parquet",
        limit_tests=LimitTests(low=500.0, high=80_000.0, zero_share=0.1),
    )
    with atomic_dir(out) as tmp:
        pq.write_table(
            pa.Table.from_pandas(tables["users"], preserve_index=False), tmp / "users.parquet"
        )
        steps.update()
        pq.write_table(
            pa.Table.from_pandas(tables["links"], preserve_index=False), tmp / "links.parquet"
        )
        steps.update()
        pq.write_table(pa.table(tables["truth"]), tmp / "truth.parquet")
        steps.update()
        pq.write_table(
            pa.Table.from_pandas(tables["segments"], preserve_index=False), tmp / "segments.parquet"
        )
        spec.dump(tmp)
        write_json(tmp / "simulation.json", cfg.model_dump())
        steps.update()
    steps.close()
    users = tables["users"]
    seg = tables["segments"]["segment"].value_counts().to_dict()
    summary = {
        "out": str(out),
        "users": len(users),
        "links": len(tables["links"]),
        "default_rate": float(users["default"].mean()),
        "labeled_share": float(users["default"].notna().mean()),
        "zero_limit_share": float((users["credit_limit"] == 0).mean()),
        "missing_share": float(users.drop(columns=["user_id", "as_of"]).isna().mean().mean()),
        "segments": seg,
    }
    log.info(
        "simulated %s users into %s (default rate %.3f)",
        f"{len(users):,}",
        out,
        summary["default_rate"],
    )
    return summary
