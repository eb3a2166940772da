"""A simulated order stream whose true fraud probabilities are known (docs/simulation.md, Orders).

Vectorized numpy, seeded. Legit buyers (with offices sharing addresses, IPs and PCs) order from
their own mostly stable devices, cards, addresses and IPs; fraudsters take over old accounts and
order from their own devices and IPs, shipping to drop addresses (ATO); fraud rings of young
accounts reuse a pool of devices, cards, addresses and IPs in bursts; public IPs and forwarding
warehouses are super-nodes. Each order gets raw features (velocity over the buyer's own past
orders only), a true fraud probability driven by the raw features and by its graph context, a
fraud draw, and a label that becomes known later (chargebacks after weeks, clean orders after a
fixed window). Links observed after an order (a device seen with it later, the dispute gateway
of a chargeback) are written with their own time: a model that ignores time would see them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from creditgraph.data.spec import DatasetSpec, EntityType, OrdersSpec
from creditgraph.utils.io import atomic_dir, write_json
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

ENTITY_TYPES = {
    "device": EntityType(weight=1.0, max_degree=50),
    "card": EntityType(weight=1.0, max_degree=50),
    "address": EntityType(weight=0.6, max_degree=100),
    "ip": EntityType(weight=0.3, max_degree=200, high_confidence=False),
}
_DEVICE, _CARD, _ADDRESS, _IP = range(4)
SEGMENTS = ("legit", "ato", "ring", "supernode")
_LEGIT, _ATO, _RING, _SUPERNODE = range(4)
# name, risk score (the category_risk feature), typical unit price, weight for legit / fraud
CATEGORIES = (
    ("office_supplies", 0.05, 25.0, 0.20, 0.02),
    ("packaging", 0.03, 8.0, 0.15, 0.01),
    ("raw_materials", 0.05, 60.0, 0.15, 0.02),
    ("apparel", 0.12, 18.0, 0.12, 0.05),
    ("home_goods", 0.10, 30.0, 0.10, 0.04),
    ("tools", 0.12, 45.0, 0.08, 0.06),
    ("auto_parts", 0.15, 70.0, 0.06, 0.05),
    ("cosmetics", 0.30, 15.0, 0.05, 0.10),
    ("phones", 0.70, 280.0, 0.04, 0.22),
    ("computers", 0.60, 550.0, 0.03, 0.18),
    ("gift_cards", 0.90, 100.0, 0.01, 0.15),
    ("luxury", 0.80, 400.0, 0.01, 0.10),
)
MS_PER_DAY = 86_400_000


class OrderSimConfig(BaseModel):
    """Parameters of the order generating process (defaults: 200k orders over 90 days)."""

    model_config = ConfigDict(extra="forbid")

    n_orders: int = Field(200_000, ge=1000)
    n_buyers: int | None = Field(None, ge=100, description="default: 15 % of n_orders")
    seed: int = 0
    start: str = "2025-01-01"
    span_days: float = Field(90.0, ge=14, description="orders are placed over this span")
    snapshot_lag_days: float = Field(
        30.0, ge=0, description="the reference time (snapshot) is this long after the span"
    )
    history_days: float = Field(30.0, gt=0, description="entity history window (dataset.yaml)")
    # legit buyers
    new_account_share: float = Field(0.1, ge=0, le=1, description="accounts opened in the span")
    extra_devices: float = Field(0.4, ge=0, description="Poisson mean of devices beyond the first")
    new_device_share: float = Field(
        0.5, ge=0, le=1, description="share of extra devices first used inside the span"
    )
    office_share: float = Field(0.1, ge=0, le=1)
    office_size: tuple[int, int] = (2, 10)
    office_pc_share: float = Field(0.3, ge=0, le=1, description="offices sharing one PC")
    public_ips: int = Field(30, ge=1)
    public_ip_share: float = Field(0.3, ge=0, le=1, description="buyers who use public IPs")
    public_ip_use: float = Field(0.4, ge=0, le=1, description="their orders over a public IP")
    warehouses: int = Field(12, ge=1)
    warehouse_share: float = Field(0.08, ge=0, le=1, description="buyers shipping to warehouses")
    warehouse_use: float = Field(0.6, ge=0, le=1)
    # account takeover
    ato_order_share: float = Field(0.01, ge=0, le=0.3)
    ato_accounts: tuple[int, int] = (2, 8)
    ato_orders: tuple[int, int] = (1, 5)
    # fraud rings
    ring_order_share: float = Field(0.02, ge=0, le=0.3)
    ring_size: tuple[int, int] = (4, 15)
    ring_bursts: tuple[int, int] = (1, 3)
    burst_days: tuple[float, float] = (1.0, 4.0)
    burst_orders: float = Field(2.5, ge=1, description="mean orders per account per burst")
    warmup_orders: float = Field(1.5, ge=0, description="mean quiet orders per ring account")
    # truth
    base_logit: float = -6.0
    ato_logit: float = 3.5
    fraudster_sd: float = Field(0.5, ge=0)
    ring_logit: float = 3.0
    ring_shock_sd: float = Field(0.7, ge=0)
    warmup_logit: float = 1.0
    # labels
    fraud_delay_median_days: float = Field(35.0, gt=0)
    fraud_delay_sigma: float = Field(0.3, ge=0)
    clean_after_days: float = Field(60.0, gt=0, description="a clean order's label is known then")
    never_labeled_share: float = Field(0.05, ge=0, lt=1)
    # missing values
    device_missing: float = Field(0.03, ge=0, lt=1, description="device fingerprint not captured")
    age_missing: float = Field(0.02, ge=0, lt=1)
    category_missing: float = Field(0.03, ge=0, lt=1)
    # links observed after the order
    late_device_share: float = Field(0.08, ge=0, le=1)
    frauds_per_dispute_ip: int = Field(10, ge=2)

    @model_validator(mode="after")
    def _ranges(self) -> OrderSimConfig:
        for name in ("office_size", "ato_accounts", "ato_orders", "ring_size", "ring_bursts"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 1 <= low <= high")
        if not 0 < self.burst_days[0] <= self.burst_days[1]:
            raise ValueError("burst_days must be (low, high) with 0 < low <= high")
        return self

    @property
    def buyers(self) -> int:
        return self.n_buyers or max(100, round(0.15 * self.n_orders))

    @classmethod
    def from_yaml(cls, path: str | Path) -> OrderSimConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})


def _mid(r: tuple[float, float]) -> float:
    return (r[0] + r[1]) / 2


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _ranges(counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(c) for c in counts])`` without the loop."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def _starts(counts: np.ndarray) -> np.ndarray:
    return np.cumsum(counts) - counts


def _pick(rng: np.random.Generator, start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """One uniformly chosen member of each block ``[start, start + count)``."""
    return start + np.minimum((rng.random(len(start)) * count).astype(np.int64), count - 1)


def _zipf(rng: np.random.Generator, k: int, size: int) -> np.ndarray:
    """Indices 0..k-1 with popularity proportional to 1 / (rank + 1)."""
    w = 1.0 / np.arange(1, k + 1)
    return rng.choice(k, size=size, p=w / w.sum())


def _groups(rng: np.random.Generator, n: int, share: float, size: tuple[int, int]) -> np.ndarray:
    """Put a share of ``n`` members into groups of random size; -1 = no group."""
    group = np.full(n, -1, dtype=np.int64)
    k = int(share * n)
    if k < size[0]:
        return group
    sizes = rng.integers(size[0], size[1] + 1, size=k // size[0] + 1)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), k) + 1]
    group[rng.permutation(n)[:k]] = np.repeat(np.arange(len(sizes)), sizes)[:k]
    return group


class _Ids:
    """Entity ids handed out in blocks; shuffled at the end so an id says nothing of its role."""

    def __init__(self) -> None:
        self.n = 0

    def take(self, k: int) -> np.ndarray:
        out = np.arange(self.n, self.n + k, dtype=np.int64)
        self.n += k
        return out


def _orders_part(n: int, **cols: Any) -> dict[str, np.ndarray]:
    """One block of orders; columns not given get their neutral value."""
    neutral = {
        "dev_known": False,
        "card_known": False,
        "ring": -1,
        "fraudster": -1,
        "warmup": False,
        "amount_scale": 1.0,
    }
    out = {}
    for key, default in neutral.items():
        out[key] = np.broadcast_to(np.asarray(cols.pop(key, default)), (n,)).copy()
    for key, val in cols.items():
        out[key] = np.broadcast_to(np.asarray(val), (n,)).copy()
    return out


def simulate_orders(cfg: OrderSimConfig) -> dict[str, pd.DataFrame]:
    """Generate the tables of a simulated order dataset.

    Returns ``orders``, ``links``, ``truth``, ``segments`` (frames) and ``meta`` (a dict with
    the reference time and counts).
    """
    rng = np.random.default_rng(cfg.seed)
    span = float(cfg.span_days)
    end = np.nextafter(span, 0.0)
    ids = _Ids()
    n_buyers = cfg.buyers
    fraud_p = np.array([c[4] for c in CATEGORIES])
    legit_p = np.array([c[3] for c in CATEGORIES])

    # --- fraud volumes ----------------------------------------------------------------------
    n_fraudsters = round(
        cfg.ato_order_share * cfg.n_orders / (_mid(cfg.ato_accounts) * _mid(cfg.ato_orders))
    )
    per_ring_account = cfg.warmup_orders + _mid(cfg.ring_bursts) * cfg.burst_orders
    n_rings = round(cfg.ring_order_share * cfg.n_orders / (per_ring_account * _mid(cfg.ring_size)))
    ring_size = rng.integers(cfg.ring_size[0], cfg.ring_size[1] + 1, n_rings)
    keep = np.cumsum(ring_size) <= n_buyers // 5  # ring accounts stay a minority of buyers
    ring_size = ring_size[keep]
    n_rings = len(ring_size)
    n_ring_acc = int(ring_size.sum())
    nl = n_buyers - n_ring_acc  # legit buyers: 0..nl-1; ring accounts: nl..n_buyers-1

    # --- legit buyers and their entities ---------------------------------------------------
    new_acc = rng.random(nl) < cfg.new_account_share
    created = np.where(new_acc, rng.uniform(0, 0.9 * span, nl), -(rng.gamma(2.0, 300.0, nl) + 14))
    opened = np.maximum(created, 0.0)
    risk = rng.normal(0.0, 1.0, nl)
    activity = rng.lognormal(0.0, 1.0, nl)
    office = _groups(rng, nl, cfg.office_share, cfg.office_size)
    n_office = int(office.max()) + 1
    in_office = office >= 0

    k_dev = 1 + rng.poisson(cfg.extra_devices, nl)
    dev_start = _starts(k_dev)
    dev_owner = np.repeat(np.arange(nl), k_dev)
    dev_slot = _ranges(k_dev)
    dev_id = ids.take(len(dev_owner))
    later = (dev_slot > 0) & (
        (rng.random(len(dev_owner)) < cfg.new_device_share) | new_acc[dev_owner]
    )
    first_use = np.where(
        later,
        rng.uniform(opened[dev_owner], span),
        np.where(new_acc[dev_owner], created[dev_owner], -1.0),
    )  # < 0: the buyer used it before the span (known, not new)
    office_pc = rng.random(max(n_office, 1)) < cfg.office_pc_share
    pc_id = ids.take(max(n_office, 1))
    shared_pc = (dev_slot == 0) & in_office[dev_owner]
    shared_pc &= office_pc[np.maximum(office[dev_owner], 0)]
    dev_id[shared_pc] = pc_id[office[dev_owner[shared_pc]]]

    k_card = 1 + rng.poisson(0.3, nl)
    card_start = _starts(k_card)
    card_id = ids.take(int(k_card.sum()))
    office_addr, office_ip = ids.take(max(n_office, 1)), ids.take(max(n_office, 1))
    billing = ids.take(nl)
    m = in_office & (rng.random(nl) < 0.8)
    billing[m] = office_addr[office[m]]
    alt_addr = np.where(rng.random(nl) < 0.3, ids.take(nl), -1)
    home_ip = ids.take(nl)
    m = in_office & (rng.random(nl) < 0.9)
    home_ip[m] = office_ip[office[m]]
    public_ip = ids.take(cfg.public_ips)
    warehouse = ids.take(cfg.warehouses)
    uses_public = rng.random(nl) < cfg.public_ip_share
    uses_wh = rng.random(nl) < cfg.warehouse_share
    fav_wh = _zipf(rng, cfg.warehouses, nl)

    parts: list[dict[str, np.ndarray]] = []

    # --- account takeover ------------------------------------------------------------------
    old = np.flatnonzero(created < 0)
    k_vic = rng.integers(cfg.ato_accounts[0], cfg.ato_accounts[1] + 1, n_fraudsters)
    victims = rng.choice(old, size=int(k_vic.sum()), replace=int(k_vic.sum()) > len(old))
    vic_f = np.repeat(np.arange(n_fraudsters), k_vic)
    f_start = rng.uniform(0, span - 3, n_fraudsters)
    f_stop = np.minimum(f_start + 25, span - 0.5)  # a fraudster's takeovers: 25 days at most
    take_t = rng.uniform(f_start[vic_f], f_stop[vic_f])
    m_ord = rng.integers(cfg.ato_orders[0], cfg.ato_orders[1] + 1, len(victims))
    rep = np.repeat(np.arange(len(victims)), m_ord)
    n_ato = len(rep)
    f = vic_f[rep]
    victim = victims[rep]
    f_eff = rng.normal(0.0, cfg.fraudster_sd, n_fraudsters)
    pools = {}
    for kind in ("device", "ip", "drop"):
        cnt = rng.integers(1, 4, n_fraudsters)
        pools[kind] = (ids.take(int(cnt.sum())), _starts(cnt), cnt)
    dev_ids, st, cnt = pools["device"]
    ato_dev = dev_ids[_pick(rng, st[f], cnt[f])]
    ip_ids, st, cnt = pools["ip"]
    ato_ip = np.where(
        rng.random(n_ato) < 0.2,
        public_ip[_zipf(rng, cfg.public_ips, n_ato)],
        ip_ids[_pick(rng, st[f], cnt[f])],
    )
    drop_ids, st, cnt = pools["drop"]
    ato_ship = np.where(
        rng.random(n_ato) < 0.85, drop_ids[_pick(rng, st[f], cnt[f])], billing[victim]
    )
    after = rng.exponential(0.3, n_ato)
    room = span - take_t[rep]
    after = np.where(after < room, after, rng.uniform(0, room))  # no pile-up at the span's end
    parts.append(
        _orders_part(
            n_ato,
            buyer=victim,
            t=take_t[rep] + after,
            device=ato_dev,
            card=card_id[card_start[victim]],  # the stored card of the account
            card_known=True,
            ship=ato_ship,
            bill=billing[victim],
            ip=ato_ip,
            category=rng.choice(len(CATEGORIES), n_ato, p=fraud_p / fraud_p.sum()),
            amount_scale=1.3,
            seg=_ATO,
            seg_logit=cfg.ato_logit + f_eff[f],
            fraudster=f,
        )
    )

    # --- fraud rings -----------------------------------------------------------------------
    acc_ring = np.repeat(np.arange(n_rings), ring_size)
    acc_start = _starts(ring_size)
    ring_start = rng.uniform(3, span - 5, n_rings)
    acc_created = ring_start[acc_ring] - rng.uniform(0, 20, n_ring_acc)
    ring_level = rng.normal(cfg.ring_logit, cfg.ring_shock_sd, n_rings)
    ring_pool = {}
    for kind, cnt in (
        ("device", np.maximum(2, np.round(ring_size / 3)).astype(np.int64)),
        ("card", np.maximum(2, np.round(ring_size / 2)).astype(np.int64)),
        ("address", rng.integers(1, 4, n_rings)),
        ("ip", rng.integers(1, 4, n_rings)),
    ):
        ring_pool[kind] = (ids.take(int(cnt.sum())), _starts(cnt), cnt)
    addr_ids, addr_st, _ = ring_pool["address"]
    acc_billing = np.where(
        rng.random(n_ring_acc) < 0.5, addr_ids[addr_st[acc_ring]], ids.take(n_ring_acc)
    )
    nb = rng.integers(cfg.ring_bursts[0], cfg.ring_bursts[1] + 1, n_rings)
    b_ring = np.repeat(np.arange(n_rings), nb)
    b_start = rng.uniform(ring_start[b_ring], span - 1)
    b_end = np.minimum(b_start + rng.uniform(*cfg.burst_days, len(b_ring)), end)
    first_burst = np.full(n_rings, span)
    np.minimum.at(first_burst, b_ring, b_start)
    # every account of the ring orders in every burst
    pair_burst = np.repeat(np.arange(len(b_ring)), ring_size[b_ring])
    pair_acc = acc_start[b_ring[pair_burst]] + _ranges(ring_size[b_ring])
    k = 1 + rng.poisson(cfg.burst_orders - 1, len(pair_acc))
    burst_acc = np.repeat(pair_acc, k)
    burst_b = np.repeat(pair_burst, k)
    burst_t = rng.uniform(b_start[burst_b], b_end[burst_b])
    # quiet orders before the first burst, already from the pool's devices and IPs
    k = rng.poisson(cfg.warmup_orders, n_ring_acc)
    warm_acc = np.repeat(np.arange(n_ring_acc), k)
    lo = np.maximum(acc_created[warm_acc], 0)
    hi = first_burst[acc_ring[warm_acc]]
    ok = hi > lo
    warm_acc, warm_t = warm_acc[ok], rng.uniform(lo[ok], hi[ok])
    for acc, t, warm in ((burst_acc, burst_t, False), (warm_acc, warm_t, True)):
        n = len(acc)
        g = acc_ring[acc]
        pick = {}
        for kind in ("device", "card", "address", "ip"):
            pid, st, cnt = ring_pool[kind]
            pick[kind] = pid[_pick(rng, st[g], cnt[g])]
        ip = pick["ip"]
        if not warm:
            ip = np.where(rng.random(n) < 0.25, public_ip[_zipf(rng, cfg.public_ips, n)], ip)
        probs = legit_p if warm else fraud_p
        parts.append(
            _orders_part(
                n,
                buyer=nl + acc,
                t=t,
                device=pick["device"],
                card=pick["card"],
                ship=acc_billing[acc] if warm else pick["address"],
                bill=acc_billing[acc],
                ip=ip,
                category=rng.choice(len(CATEGORIES), n, p=probs / probs.sum()),
                amount_scale=0.4 if warm else 1.0,
                seg=_RING,
                seg_logit=cfg.warmup_logit if warm else ring_level[g],
                ring=g,
                warmup=warm,
            )
        )

    # --- legit orders ----------------------------------------------------------------------
    n_fraud_orders = sum(len(p["t"]) for p in parts)
    n_lo = cfg.n_orders - n_fraud_orders
    if n_lo < cfg.n_orders // 2:
        raise ValueError(
            f"fraud shares leave only {n_lo} legit orders of {cfg.n_orders}; lower them"
        )
    b = rng.choice(nl, n_lo, p=activity / activity.sum())
    day = rng.uniform(opened[b], span)
    business = rng.random(n_lo) < 0.85
    hour = np.where(business, np.mod(rng.normal(13.5, 3.5, n_lo), 24.0), rng.uniform(0, 24, n_lo))
    t = np.floor(day) + hour / 24.0
    t = np.minimum(np.where(t < opened[b], day, t), end)
    slot = _pick(rng, dev_start[b], k_dev[b])
    slot = np.where(first_use[slot] > t, dev_start[b], slot)  # not yet acquired: the main one
    ship = billing[b].copy()
    alt = (alt_addr[b] >= 0) & (rng.random(n_lo) < 0.15)
    ship[alt] = alt_addr[b[alt]]
    wh = uses_wh[b] & (rng.random(n_lo) < cfg.warehouse_use)
    ship[wh] = warehouse[fav_wh[b[wh]]]
    pub = uses_public[b] & (rng.random(n_lo) < cfg.public_ip_use)
    ip = np.where(pub, public_ip[_zipf(rng, cfg.public_ips, n_lo)], home_ip[b])
    parts.append(
        _orders_part(
            n_lo,
            buyer=b,
            t=t,
            device=dev_id[slot],
            dev_known=first_use[slot] < 0,
            card=card_id[_pick(rng, card_start[b], k_card[b])],
            card_known=created[b] < 0,
            ship=ship,
            bill=billing[b],
            ip=ip,
            category=rng.choice(len(CATEGORIES), n_lo, p=legit_p / legit_p.sum()),
            seg=np.where(pub | wh, _SUPERNODE, _LEGIT),
            seg_logit=0.0,
        )
    )

    # --- one time-ordered table ------------------------------------------------------------
    o = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    # integer milliseconds: the features below and the written timestamps agree exactly
    t_ms = np.round(o["t"] * MS_PER_DAY).astype(np.int64)
    order = np.argsort(t_ms, kind="stable")
    o = {key: v[order] for key, v in o.items()}
    t_ms = t_ms[order]
    t = t_ms / MS_PER_DAY
    n = len(t)
    buyer = o["buyer"]
    all_created = np.concatenate([created, acc_created])
    all_risk = np.concatenate([risk, rng.normal(0.5, 1.0, n_ring_acc)])

    # --- raw features (each uses only the order itself and the buyer's earlier orders) ------
    cat = o["category"]
    cat_risk = np.array([c[1] for c in CATEGORIES])[cat]
    price = np.array([c[2] for c in CATEGORIES])[cat]
    fraud_like = o["seg"] == _ATO
    fraud_like |= (o["seg"] == _RING) & ~o["warmup"]
    items = 1 + rng.poisson(
        np.exp(np.where(fraud_like, rng.normal(0.8, 0.7, n), rng.normal(1.2, 0.9, n)))
    )
    amount = np.round(items * price * rng.lognormal(0.0, 0.5, n) * o["amount_scale"], 2)
    new_device = _first_use(buyer, o["device"]) & ~o["dev_known"]
    new_card = _first_use(buyer, o["card"]) & ~o["card_known"]
    ship_ne_bill = o["ship"] != o["bill"]
    hour_of_day = (t_ms % MS_PER_DAY) // 3_600_000
    night = hour_of_day < 6
    age = t - all_created[buyer]
    vel = _velocity(buyer, t_ms, amount)

    # --- the truth ---------------------------------------------------------------------------
    logit = (
        cfg.base_logit
        + 0.35 * all_risk[buyer]
        + 2.0 * (cat_risk - 0.2)
        + 0.3 * np.log(np.maximum(amount, 1.0) / 100.0)
        + 0.7 * new_device
        + 0.5 * new_card
        + 0.4 * ship_ne_bill
        + 0.5 * night
        + 0.3 * np.log1p(vel["orders_24h"])
        + 0.6 * np.exp(-age / 30.0)
        + o["seg_logit"]
    )
    p_fraud = _sigmoid(logit)
    fraud = rng.random(n) < p_fraud

    # --- labels: known later, or never -------------------------------------------------------
    ref = span + cfg.snapshot_lag_days
    delay = np.clip(
        rng.lognormal(np.log(cfg.fraud_delay_median_days), cfg.fraud_delay_sigma, n), 7.0, 180.0
    )
    label_t = t + np.where(fraud, delay, cfg.clean_after_days)
    known = (rng.random(n) >= cfg.never_labeled_share) & (label_t <= ref)
    label_ms = np.round(label_t * MS_PER_DAY).astype(np.int64)

    # --- missing values (fingerprint not captured, unknown account age or category) ----------
    no_device = rng.random(n) < cfg.device_missing
    device = np.where(no_device, -1, o["device"])

    # --- links ------------------------------------------------------------------------------
    idx = np.arange(n)
    rows = [
        (idx[~no_device], _DEVICE, device[~no_device], t_ms[~no_device]),
        (idx, _CARD, o["card"], t_ms),
        (idx, _ADDRESS, o["ship"], t_ms),
        (idx[ship_ne_bill], _ADDRESS, o["bill"][ship_ne_bill], t_ms[ship_ne_bill]),
        (idx, _IP, o["ip"], t_ms),
    ]
    # a device seen with the order later: the account owner checks it (the victim, for ATO)
    late = np.flatnonzero(rng.random(n) < cfg.late_device_share)
    late_t = t[late] + rng.exponential(3.0, len(late))
    owner = buyer[late] < nl
    lb = np.minimum(buyer[late], nl - 1)
    slot = _pick(rng, dev_start[lb], k_dev[lb])
    ring_dev = np.zeros(len(late), dtype=np.int64)  # stays unused when there are no rings
    if n_rings:
        pid, st, cnt = ring_pool["device"]
        g = np.maximum(o["ring"][late], 0)
        ring_dev = pid[_pick(rng, st[g], cnt[g])]
    late_dev = np.where(owner, dev_id[slot], ring_dev)
    late_t = np.where(owner, np.maximum(late_t, first_use[slot]), late_t)
    ok = late_t <= ref
    rows.append(
        (late[ok], _DEVICE, late_dev[ok], np.round(late_t[ok] * MS_PER_DAY).astype(np.int64))
    )
    # chargebacks arrive through a few dispute gateways: links that tie frauds together only
    # once their labels are known
    cb = np.flatnonzero(fraud & known)
    gateways = ids.take(max(1, len(cb) // cfg.frauds_per_dispute_ip))
    rows.append((cb, _IP, gateways[rng.integers(0, len(gateways), len(cb))], label_ms[cb]))

    perm = rng.permutation(ids.n)  # entity ids say nothing of who made them
    buyer_perm = rng.permutation(n_buyers)
    order_id = 700_000_000 + idx
    buyer_id = 30_000_000 + buyer_perm[buyer]
    link_order = np.concatenate([r[0] for r in rows])
    link_type = np.concatenate([np.full(len(r[0]), r[1], dtype=np.int8) for r in rows])
    link_entity = 1_000_000 + perm[np.concatenate([r[2] for r in rows])]
    link_ms = np.concatenate([r[3] for r in rows])
    srt = np.lexsort((link_type, link_ms, link_order))
    start = np.datetime64(pd.Timestamp(cfg.start).to_datetime64(), "ms")

    def stamp(ms: np.ndarray) -> np.ndarray:
        return start + ms.astype("timedelta64[ms]")

    orders = pd.DataFrame(
        {
            "order_id": order_id,
            "ts": stamp(t_ms),
            "buyer_id": buyer_id,
            "amount": amount,
            "item_count": items.astype(np.int64),
            "category_risk": np.where(rng.random(n) < cfg.category_missing, np.nan, cat_risk),
            "account_age_days": np.where(
                rng.random(n) < cfg.age_missing, np.nan, np.floor(age).clip(0)
            ),
            "hour_of_day": hour_of_day.astype(np.int64),
            "is_new_device": np.where(no_device, np.nan, new_device.astype(float)),
            "is_new_card": new_card.astype(float),
            "ship_ne_bill": ship_ne_bill.astype(float),
            "buyer_orders_24h": vel["orders_24h"],
            "buyer_orders_7d": vel["orders_7d"],
            "buyer_amount_7d": np.round(vel["amount_7d"], 2),
            "days_since_last_order": vel["days_since_last"],
            "is_fraud": pd.arrays.IntegerArray(fraud.astype(np.int8), mask=~known),
            "label_known_at": np.where(known, stamp(label_ms), np.datetime64("NaT", "ms")),
        }
    )
    links = pd.DataFrame(
        {
            "order_id": order_id[link_order[srt]],
            "entity_type": pd.Categorical.from_codes(link_type[srt], list(ENTITY_TYPES)),
            "entity_id": link_entity[srt],
            "ts": stamp(link_ms[srt]),
        }
    )
    truth = pd.DataFrame({"order_id": order_id, "p_fraud": p_fraud})
    segments = pd.DataFrame(
        {
            "order_id": order_id,
            "segment": pd.Categorical.from_codes(o["seg"].astype(np.int8), list(SEGMENTS)),
            "ring_id": o["ring"],
            "fraudster_id": o["fraudster"],
            "ring_warmup": o["warmup"],
            "fraud": fraud,
        }
    )
    meta = {
        "reference_time": pd.Timestamp(stamp(np.array([round(ref * MS_PER_DAY)]))[0]),
        "buyers": n_buyers,
        "ring_accounts": n_ring_acc,
        "rings": n_rings,
        "fraudsters": n_fraudsters,
    }
    return {"orders": orders, "links": links, "truth": truth, "segments": segments, "meta": meta}


def _first_use(buyer: np.ndarray, entity: np.ndarray) -> np.ndarray:
    """Whether each order (rows in time order) is the buyer's first with this entity."""
    order = np.lexsort((np.arange(len(buyer)), entity, buyer))
    b, e = buyer[order], entity[order]
    first = np.r_[True, (b[1:] != b[:-1]) | (e[1:] != e[:-1])]
    out = np.empty(len(buyer), dtype=bool)
    out[order] = first
    return out


def _velocity(buyer: np.ndarray, t_ms: np.ndarray, amount: np.ndarray) -> dict[str, np.ndarray]:
    """Counts and sums over the same buyer's strictly earlier orders (24 h, 7 days, last gap)."""
    key = (buyer.astype(np.int64) << 40) | t_ms  # t_ms < 2**40: keys never cross buyers
    order = np.argsort(key, kind="stable")
    k = key[order]
    b = buyer[order]
    now = np.searchsorted(k, k, side="left")  # orders at the very same time are not earlier
    csum = np.r_[0.0, np.cumsum(amount[order])]
    out: dict[str, np.ndarray] = {}
    lo1 = np.searchsorted(k, k - MS_PER_DAY, side="left")
    lo7 = np.searchsorted(k, k - 7 * MS_PER_DAY, side="left")
    prev = np.maximum(now - 1, 0)
    gap = np.where((now > 0) & (b[prev] == b), (k - k[prev]) / MS_PER_DAY, np.nan)
    for name, vals in (
        ("orders_24h", (now - lo1).astype(float)),
        ("orders_7d", (now - lo7).astype(float)),
        ("amount_7d", csum[now] - csum[lo7]),
        ("days_since_last", gap),
    ):
        arr = np.empty(len(k))
        arr[order] = vals
        out[name] = arr
    return out


def order_spec(cfg: OrderSimConfig, reference_time: pd.Timestamp) -> DatasetSpec:
    """The dataset.yaml of a simulated order dataset."""
    return DatasetSpec(
        name=f"orders-sim-{cfg.n_orders}-s{cfg.seed}",
        family="orders",
        entities=ENTITY_TYPES,
        history_days=cfg.history_days,
        orders=OrdersSpec(
            segments="order_segments.parquet", reference_time=reference_time.to_pydatetime()
        ),
    )


def simulate_orders_to_dir(cfg: OrderSimConfig, out: str | Path) -> dict[str, Any]:
    """Simulate and write an order dataset directory in the contract (atomically)."""
    out = Path(out)
    tables = simulate_orders(cfg)
    spec = order_spec(cfg, tables["meta"]["reference_time"])
    # only what the order family reads: the credit-only settings keep their defaults
    keys = {"name", "family", "entities", "history_days", "orders"}
    with atomic_dir(out) as tmp:
        for key, name in (
            ("orders", "orders.parquet"),
            ("links", "order_links.parquet"),
            ("truth", "order_truth.parquet"),
            ("segments", "order_segments.parquet"),
        ):
            table = pa.Table.from_pandas(tables[key], preserve_index=False)
            pq.write_table(table, tmp / name)
        (tmp / "dataset.yaml").write_text(
            yaml.safe_dump(spec.model_dump(mode="json", include=keys), sort_keys=False)
        )
        write_json(tmp / "simulation.json", cfg.model_dump())
    orders, seg = tables["orders"], tables["segments"]
    p = tables["truth"]["p_fraud"].to_numpy()
    summary = {
        "out": str(out),
        "orders": len(orders),
        "buyers": tables["meta"]["buyers"],
        "links": len(tables["links"]),
        "fraud_rate_true": float(seg["fraud"].mean()),
        "labeled_share": float(orders["is_fraud"].notna().mean()),
        "label_fraud_rate": float(orders["is_fraud"].astype(float).mean()),
        "reference_time": str(tables["meta"]["reference_time"]),
        "segments": seg["segment"].value_counts().to_dict(),
        "mean_p_fraud": {
            str(s): float(p[(seg["segment"] == s).to_numpy()].mean())
            for s in SEGMENTS
            if (seg["segment"] == s).any()
        },
    }
    log.info(
        "simulated %s orders into %s (true fraud rate %.4f)",
        f"{len(orders):,}",
        out,
        summary["fraud_rate_true"],
    )
    return summary
