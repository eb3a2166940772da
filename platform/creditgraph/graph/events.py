"""The order-risk family's graph: one directed graph across time slices (seed 001, §3.1 and §3.3).

Time is cut into slices (``slice_days``, a day by default; slice ``s`` covers
``[s * slice_days, (s + 1) * slice_days)`` in days since 1970). Three kinds of node:

* **orders**, the real ones: the nodes that are scored and, when labeled, in the loss;
* **shadow orders**: one unlabeled copy per order, in its slice; never in the loss;
* **entity slices** ``(e, s)``: an entity (device, card, address, IP...: the dataset's
  ``entities``) in a slice where something happened to it: an order was linked to it, a link to
  it was observed, or the label of an order linked to it became known.

and four kinds of directed edge (``REL_*``), all pointing forward in time:

* ``shadow -> entity(e, s)`` for every link observed in slice ``s`` (a link observed after its
  order's slice goes from the older shadow to the newer entity slice);
* ``entity(e, s) -> shadow`` for links observed in the order's own slice: shadows exchange
  messages with their entities inside a slice, so an entity's state carries what the slice's
  orders and their other entities did (the order hub);
* ``entity(e, s') -> entity(e, s)`` for ``s - W <= s' < s`` (history over the window ``W``,
  the ``max_history`` most recent);
* ``entity(e, s*) -> order`` from the entity's latest slice ``s*`` before the order's slice and
  within the window, for the links observed at the order's own time. This is the one hop run
  online; everything behind it is computed in batch.

Every edge goes from a slice to the same or a later one, edges into real orders come from
strictly earlier slices, and real orders have no outgoing edges. So an order at time ``t`` is
reached only by what was observed before the start of its slice: earlier orders (through their
shadows), links seen by then, labels known by then; never a later order, a later link, its own
label or any label not yet known. Entities that had more distinct buyers than their type's
``max_degree`` by a slice (public IPs, forwarding warehouses) are *cut* in that slice: they keep
their node, counts and history, and still feed orders, but exchange no messages with shadows.

The graph is written to ``RUN/events`` (:func:`run_build_events`) and cut into ClusterGCN shards
with shadow (halo) nodes by :func:`partition_events`, reusing the credit family's METIS and halo
expansion (:mod:`creditgraph.graph.partition`).
"""

from __future__ import annotations

import hashlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from creditgraph.data.errors import DataValidationError
from creditgraph.data.orders import OrderDataset, labels_known_at, load_orders
from creditgraph.graph.entities import entity_key, load_salt, new_salt
from creditgraph.layout import RunLayout, ShardFiles, as_layout
from creditgraph.utils.io import atomic_dir, read_json, write_json
from creditgraph.utils.logs import get_logger
from creditgraph.utils.runtime import require_ray

log = get_logger(__name__)

KIND_ORDER, KIND_SHADOW, KIND_ENTITY = 0, 1, 2
REL_SHADOW_TO_ENTITY, REL_ENTITY_TO_SHADOW, REL_HISTORY, REL_ENTITY_TO_ORDER = 0, 1, 2, 3
RELATIONS = ("shadow_to_entity", "entity_to_shadow", "entity_history", "entity_to_order")
ENTITY_FEATURES = (
    "log_links",  # links observed in the slice
    "log_buyers",  # distinct buyers linked in the slice
    "log_buyers_cumulative",  # distinct buyers linked by the end of the slice
    "cut",  # super-node in this slice
    "log_age_days",  # since the entity was first seen in the data
    "log_fraud_revealed",  # labels that became known in the slice: frauds among its orders
    "log_clean_revealed",  # ... and clean ones
    "log_late_links",  # links observed in the slice for orders of earlier slices
)
LABEL_FEATURES = (5, 6)
# split codes of orders (RUN/events/orders.parquet, column "split")
SPLIT_NONE, SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST, SPLIT_EARLY = -1, 0, 1, 2, 3
SPLIT_NAMES = {SPLIT_NONE: "none", SPLIT_TRAIN: "train", SPLIT_VAL: "val", SPLIT_TEST: "test",
               SPLIT_EARLY: "early"}  # fmt: skip
_SLICE_BITS = 24  # entity-slice keys: entity << 24 | slice offset


class EventGraphConfig(BaseModel):
    """How orders, shadow orders and entity slices become one directed graph."""

    model_config = ConfigDict(extra="forbid")

    slice_days: float = Field(
        1.0, gt=0, le=30, description="length of a time slice (the batch refresh period online)"
    )
    window_days: float | None = Field(
        None, gt=0, description="entity history window; default: dataset.yaml history_days"
    )
    max_history: int = Field(
        10, ge=1, description="history edges into an entity slice (the most recent), at most"
    )
    supernode_cut: bool = Field(
        True, description="entities over their type's max_degree exchange nothing with shadows"
    )
    late_links: bool = Field(
        True, description="links observed after their order feed the entity slice they were seen in"
    )
    label_feedback: bool = Field(
        True,
        description="entity slices count the labels of their orders that became known in the "
        "slice, so later orders see known fraud on their entities (a fraud becoming known "
        "makes an entity slice; clean labels are counted where one exists)",
    )


class OrderSplitConfig(BaseModel):
    """The time protocol: train on earlier orders with the labels known at the cut-off, test later.

    ``test`` orders are those of the last ``test_days`` of the data. The cut-off is when the
    model is trained: its labels are ``labels_known_at(cutoff, mature_days)``; ``test_start``
    trains at the start of the test period (strict: nothing known after a test order's time
    reaches the model), ``reference`` at the data's reference time (training orders still end
    before the test period, but some of their labels became known during it), ``auto`` the
    strict one when it leaves ``min_positives`` known frauds and as many cleans, else
    ``reference`` with a warning; a number is days after the first order. Labeled training
    orders are split by time: the first ``leaf_share`` fit the GBDT leaf encoder (the earlier
    period), the last ``val_share`` of the rest validate, the others train the network.
    """

    model_config = ConfigDict(extra="forbid")

    cutoff: Literal["auto", "test_start", "reference"] | float = "auto"
    test_days: float = Field(30.0, gt=0)
    mature_days: float | None = Field(
        60.0, ge=0, description="only orders at least this old at the cut-off are labeled"
    )
    leaf_share: float = Field(0.4, ge=0, lt=1)
    val_share: float = Field(0.2, gt=0, lt=1)
    min_positives: int = Field(30, ge=1)

    @model_validator(mode="after")
    def _shares(self) -> OrderSplitConfig:
        if self.leaf_share + self.val_share >= 0.95:
            raise ValueError("leaf_share + val_share must leave orders to train the network")
        return self


class EventPartitionConfig(BaseModel):
    """ClusterGCN shards of the event graph (halo depth = the network's hops)."""

    model_config = ConfigDict(extra="forbid")

    part_size: int = Field(20_000, ge=100, description="target owned nodes per part")
    num_parts: int | None = Field(None, ge=1, description="overrides part_size when set")
    seed: int = 0

    def parts_for(self, n_nodes: int) -> int:
        if self.num_parts is not None:
            return max(1, min(self.num_parts, n_nodes))
        return max(1, round(n_nodes / self.part_size))


@dataclass
class EventGraph:
    """The directed event graph in memory. Node ids: orders ``0..n-1`` (row order of the
    dataset), shadows ``n..2n-1``, entity slices ``2n..`` sorted by (entity, slice)."""

    n_orders: int
    slice_days: float
    window_slices: int
    types: list[str]
    order_slice: np.ndarray  # int64[n]
    es_entity: np.ndarray  # int64[S]: entity index of each entity slice
    es_slice: np.ndarray  # int64[S]
    es_feat: np.ndarray  # float32[S, len(ENTITY_FEATURES)]
    entity_key: np.ndarray  # object[E]: keyed hash of (type, id)
    entity_type: np.ndarray  # int16[E]
    src: np.ndarray  # int64[M]
    dst: np.ndarray  # int64[M]
    rel: np.ndarray  # int8[M]
    recency: np.ndarray  # float32[M]: days from the source's slice to the order's (REL 3)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_entity_slices(self) -> int:
        return len(self.es_entity)

    @property
    def n_nodes(self) -> int:
        return 2 * self.n_orders + self.n_entity_slices

    def node_kind(self) -> np.ndarray:
        n = self.n_orders
        kind = np.full(self.n_nodes, KIND_ENTITY, dtype=np.int8)
        kind[:n], kind[n : 2 * n] = KIND_ORDER, KIND_SHADOW
        return kind

    def node_slice(self) -> np.ndarray:
        return np.concatenate([self.order_slice, self.order_slice, self.es_slice])

    def save(self, folder: Path) -> None:
        """Arrays as ``.npy`` (memory-mappable by shard loaders), keys as parquet."""
        for name in ("order_slice", "es_entity", "es_slice", "es_feat", "src", "dst", "rel",
                     "recency", "entity_type"):  # fmt: skip
            np.save(folder / f"{name}.npy", getattr(self, name))
        pd.DataFrame({"key": self.entity_key, "type": self.entity_type}).to_parquet(
            folder / "entities.parquet", index=False
        )

    @classmethod
    def load(cls, run: RunLayout | str | Path, *, mmap: bool = False) -> EventGraph:
        files = as_layout(run).events
        if not files.exists():
            raise FileNotFoundError(
                f"no event graph in {files.dir}: run `creditgraph run` on an orders dataset"
            )
        meta = read_json(files.manifest)
        mode = "r" if mmap else None

        def arr(name: str) -> np.ndarray:
            return np.load(files.dir / f"{name}.npy", mmap_mode=mode)

        ents = pd.read_parquet(files.dir / "entities.parquet")
        return cls(
            n_orders=meta["n_orders"],
            slice_days=meta["config"]["slice_days"],
            window_slices=meta["window_slices"],
            types=meta["entity_types"],
            order_slice=arr("order_slice"),
            es_entity=arr("es_entity"),
            es_slice=arr("es_slice"),
            es_feat=arr("es_feat"),
            entity_key=ents["key"].to_numpy(dtype=object),
            entity_type=ents["type"].to_numpy(np.int16),
            src=arr("src"),
            dst=arr("dst"),
            rel=arr("rel"),
            recency=arr("recency"),
            stats=meta.get("stats", {}),
        )


def slice_of(t_days: Any, slice_days: float) -> np.ndarray:
    """The slice index of times in float days since 1970 (also for one scalar)."""
    return np.floor(np.asarray(t_days, dtype=np.float64) / slice_days).astype(np.int64)


def window_slices(window_days: float, slice_days: float) -> int:
    """Slices an entity's history reaches back (and how stale a stored entity may be)."""
    return max(1, int(np.ceil(window_days / slice_days - 1e-9)))


def _codes(values: np.ndarray) -> np.ndarray:
    return pd.factorize(values)[0].astype(np.int64)


def _unique(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an int array (sorting beats numpy's hash path here)."""
    a = np.sort(a)
    return a[np.r_[True, a[1:] != a[:-1]]] if len(a) else a


def _first_of_each(key: np.ndarray) -> np.ndarray:
    """Index of the first occurrence of every distinct value of ``key``."""
    order = np.argsort(key, kind="stable")
    k = key[order]
    return order[np.r_[True, k[1:] != k[:-1]]] if len(k) else order


def entity_keys_fast(salt: bytes, types: list[str], type_code: np.ndarray, ids: np.ndarray):
    """:func:`~creditgraph.graph.entities.entity_key` of many distinct entities (integer ids
    skip the generic normalization; the result is the same)."""
    if ids.dtype.kind in "iu":
        return np.array(
            [
                hashlib.blake2b(f"{types[t]}\x1f{i}".encode(), digest_size=16, key=salt).hexdigest()
                for t, i in zip(type_code.tolist(), ids.tolist(), strict=True)
            ],
            dtype=object,
        )
    return np.array(
        [entity_key(salt, types[t], i) for t, i in zip(type_code, ids, strict=True)], dtype=object
    )


def build_event_graph(
    ds: OrderDataset, cfg: EventGraphConfig | None = None, *, salt: bytes
) -> EventGraph:
    """The directed event graph of a validated order dataset (see the module docstring).

    Entity identifiers are replaced by their keyed hashes (``salt``); only their integer index
    and key are kept. Labels enter only as counts of labels that became known in a slice
    (``label_feedback``), at the slice their ``label_time`` falls in.
    """
    cfg = cfg or EventGraphConfig()
    t_start = time.perf_counter()
    n = ds.n_orders
    sd = cfg.slice_days
    types = list(ds.spec.entities)
    ws = window_slices(cfg.window_days or ds.spec.history_days, sd)
    o_slice = slice_of(ds.t_days, sd)
    links = ds.links if ds.links is not None else pd.DataFrame(
        {"order_idx": np.zeros(0, np.int64), "entity_type": pd.Categorical([], categories=types),
         "entity_id": np.zeros(0, np.int64), "ts_days": np.zeros(0)}
    )  # fmt: skip
    l_order = links["order_idx"].to_numpy(np.int64)
    l_ts = links["ts_days"].to_numpy(np.float64)
    l_type = pd.Categorical(links["entity_type"], categories=types).codes.astype(np.int64)
    context = l_ts <= ds.t_days[l_order]  # observed at the order's own time
    if not cfg.late_links:
        keep = context
        l_order, l_ts, l_type, context = l_order[keep], l_ts[keep], l_type[keep], context[keep]
        ids = links["entity_id"].to_numpy()[keep]
    else:
        ids = links["entity_id"].to_numpy()
    l_slice = slice_of(l_ts, sd)

    # entities: one index per distinct (type, id); stored under keyed hashes only
    pair = _codes(ids) * len(types) + l_type
    first = _first_of_each(pair)
    l_ent = np.searchsorted(pair[first], pair)
    ent_type = l_type[first].astype(np.int16)
    keys = entity_keys_fast(salt, types, ent_type, ids[first])
    n_ent = len(first)

    # label reveals: each labeled order's label, at its label time, for the entities it was
    # linked to by then
    lab_t = ds.label_t_days[l_order]
    revealed = np.isfinite(ds.label[l_order]) & np.isfinite(lab_t) & (l_ts <= lab_t)
    if not cfg.label_feedback:
        revealed[:] = False
    r_ent = l_ent[revealed]
    r_slice = slice_of(lab_t[revealed], sd)
    r_fraud = ds.label[l_order[revealed]] == 1

    base = min(int(o_slice.min()) if n else 0, int(l_slice.min()) if len(l_slice) else 0)
    top = max(int(o_slice.max()) if n else 0, int(r_slice.max()) if len(r_slice) else 0,
              int(l_slice.max()) if len(l_slice) else 0)  # fmt: skip
    if top - base >= 2**_SLICE_BITS - 2:
        raise ValueError(f"{top - base} slices of {sd} days: use a longer slice_days")

    def node_key(ent: np.ndarray, sl: np.ndarray) -> np.ndarray:
        return (ent.astype(np.int64) << _SLICE_BITS) | (sl - base + 1)

    r_keys = node_key(r_ent, r_slice)
    es_keys = _unique(np.concatenate([node_key(l_ent, l_slice), r_keys[r_fraud]]))
    es_ent = es_keys >> _SLICE_BITS
    es_slice = (es_keys & (2**_SLICE_BITS - 1)) + base - 1
    n_es = len(es_keys)
    l_node = np.searchsorted(es_keys, node_key(l_ent, l_slice))

    # entity-slice features
    buyer = _codes(ds.buyer)
    n_b = int(buyer.max()) + 1 if n else 1
    l_buyer = buyer[l_order]
    feat = np.zeros((n_es, len(ENTITY_FEATURES)), dtype=np.float32)
    feat[:, 0] = np.log1p(np.bincount(l_node, minlength=n_es))
    nb = _unique(l_node * n_b + l_buyer) // n_b
    feat[:, 1] = np.log1p(np.bincount(nb, minlength=n_es))
    # distinct buyers by the end of each slice: (entity, buyer) pairs by the slice first seen
    eb = l_ent * n_b + l_buyer
    order = np.lexsort((l_slice, eb))
    firsts = np.r_[True, eb[order][1:] != eb[order][:-1]]
    pair_key = node_key(l_ent[order][firsts], l_slice[order][firsts])
    pair_key.sort()
    cum = np.searchsorted(pair_key, es_keys, side="right") - np.searchsorted(
        pair_key, es_ent << _SLICE_BITS, side="left"
    )
    feat[:, 2] = np.log1p(cum)
    max_degree = np.array([ds.spec.entities[t].max_degree for t in types])
    cut = (cum > max_degree[ent_type[es_ent]]) & cfg.supernode_cut
    feat[:, 3] = cut
    first_seen = np.full(n_ent, np.iinfo(np.int64).max)
    np.minimum.at(first_seen, l_ent, l_slice)
    feat[:, 4] = np.log1p(np.maximum(es_slice - first_seen[es_ent], 0) * sd)
    r_node = np.minimum(np.searchsorted(es_keys, r_keys), n_es - 1)
    r_node = np.where(es_keys[r_node] == r_keys, r_node, -1) if n_es else r_node
    feat[:, 5] = np.log1p(np.bincount(r_node[r_fraud], minlength=n_es))
    clean = ~r_fraud & (r_node >= 0)
    feat[:, 6] = np.log1p(np.bincount(r_node[clean], minlength=n_es))
    late = l_slice > o_slice[l_order]
    feat[:, 7] = np.log1p(np.bincount(l_node[late], minlength=n_es))

    off = 2 * n
    edges: list[tuple[np.ndarray, np.ndarray, int, np.ndarray | None]] = []
    # shadow -> entity slice (every link, in the slice it was observed in)
    ok = ~cut[l_node]
    edges.append((n + l_order[ok], off + l_node[ok], REL_SHADOW_TO_ENTITY, None))
    # entity slice -> shadow (links of the order's own slice)
    ok = ~cut[l_node] & (l_slice == o_slice[l_order])
    edges.append((off + l_node[ok], n + l_order[ok], REL_ENTITY_TO_SHADOW, None))
    # history: earlier slices of the same entity within the window (cut slices have none:
    # their counts say what there is to say)
    hs, hd = [], []
    for k in range(1, cfg.max_history + 1):
        i = np.arange(k, n_es)
        j = i - k
        ok = (es_ent[i] == es_ent[j]) & (es_slice[i] - es_slice[j] <= ws) & ~cut[i]
        if not ok.any():
            break
        hs.append(j[ok])
        hd.append(i[ok])
    if hs:
        edges.append((off + np.concatenate(hs), off + np.concatenate(hd), REL_HISTORY, None))
    # the online hop: the entity's latest slice before the order's, for its context links
    c_order, c_ent = l_order[context], l_ent[context]
    pos = np.searchsorted(es_keys, node_key(c_ent, o_slice[c_order]), side="left") - 1
    ok = pos >= 0
    ok[ok] &= es_ent[pos[ok]] == c_ent[ok]
    ok[ok] &= es_slice[pos[ok]] >= o_slice[c_order[ok]] - ws
    rec = (o_slice[c_order[ok]] - es_slice[pos[ok]]).astype(np.float32) * sd
    edges.append((off + pos[ok], c_order[ok], REL_ENTITY_TO_ORDER, rec))

    srcs, dsts, rels, recs = [], [], [], []
    for s_, d_, r_, rc in edges:
        # an order linked twice to one entity (or one entity slice) is one edge
        key = _first_of_each(d_ * (2 * n + n_es) + s_)
        srcs.append(s_[key])
        dsts.append(d_[key])
        rels.append(np.full(len(key), r_, dtype=np.int8))
        recs.append(np.zeros(len(key), np.float32) if rc is None else rc[key])
    src, dst = np.concatenate(srcs), np.concatenate(dsts)
    rel, recency = np.concatenate(rels), np.concatenate(recs)
    counts = {RELATIONS[r]: int((rel == r).sum()) for r in range(len(RELATIONS))}
    stats = {
        "orders": n,
        "entities": n_ent,
        "entity_slices": n_es,
        "nodes": 2 * n + n_es,
        "edges": counts,
        "links": len(l_order),
        "late_links": int(late.sum()),
        "label_reveals": int(revealed.sum()),
        "supernode_slices_cut": int(cut.sum()),
        "orders_without_entity_history": int(n - len(np.unique(dst[rel == REL_ENTITY_TO_ORDER]))),
        "seconds": time.perf_counter() - t_start,
    }
    log.info(
        "event graph: %d orders, %d entities in %d entity slices, %d edges (%s), %d cut",
        n, n_ent, n_es, len(src), counts, stats["supernode_slices_cut"],
    )  # fmt: skip
    return EventGraph(
        n_orders=n,
        slice_days=sd,
        window_slices=ws,
        types=types,
        order_slice=o_slice,
        es_entity=es_ent,
        es_slice=es_slice,
        es_feat=feat,
        entity_key=keys,
        entity_type=ent_type,
        src=src,
        dst=dst,
        rel=rel,
        recency=recency,
        stats=stats,
    )


# --- the time protocol --------------------------------------------------------------------------


def reference_days(ds: OrderDataset) -> float:
    """The data's "now" in days since 1970: the stated reference time, else the latest time seen."""
    ref = ds.spec.orders.reference_time if ds.spec.orders is not None else None
    ref = ref or ds.spec.reference_time
    if ref is not None:
        return float((pd.Timestamp(ref) - pd.Timestamp("1970-01-01")) / pd.Timedelta(days=1))
    seen = [np.nanmax(ds.t_days), np.nanmax(ds.label_t_days) if np.isfinite(ds.label_t_days).any()
            else -np.inf]  # fmt: skip
    if ds.links is not None and len(ds.links):
        seen.append(float(ds.links["ts_days"].max()))
    return float(max(seen))


def split_orders(ds: OrderDataset, cfg: OrderSplitConfig | None = None) -> tuple[dict, dict]:
    """Split codes, training labels and evaluation labels of every order, by time.

    Returns ``(arrays, info)``: ``arrays`` has ``split`` (int8, ``SPLIT_*``), ``y_train`` (the
    label as known at the cut-off, NaN outside the training period) and ``y_eval`` (the
    eventual outcome where the data has it: the simulator's drawn outcome, else the label known
    at the reference time; used only to score test orders). ``info`` records the protocol.
    """
    cfg = cfg or OrderSplitConfig()
    t = ds.t_days
    t_first, t_last = float(t.min()), float(t.max())
    test_start = t_last - cfg.test_days
    ref = reference_days(ds)
    table = str(ds.spec.orders.table if ds.spec.orders else "orders")
    label_col = ds.spec.orders.label if ds.spec.orders else None
    if test_start <= t_first:
        raise DataValidationError(
            table, ds.spec.orders.time if ds.spec.orders else None,
            f"the orders span {t_last - t_first:.1f} days, not more than test_days = "
            f"{cfg.test_days}: lower orders.split.test_days",
        )  # fmt: skip

    def labels_at(cutoff: float) -> np.ndarray:
        y = labels_known_at(ds, cutoff, mature_days=cfg.mature_days)
        return np.where(t <= test_start, y, np.nan)

    def enough(y: np.ndarray) -> bool:
        return bool(np.nansum(y) >= cfg.min_positives and np.nansum(1 - y) >= cfg.min_positives)

    mode = cfg.cutoff
    if isinstance(mode, float | int):
        cutoff, used = t_first + float(mode), "days"
    elif mode == "test_start":
        cutoff, used = test_start, "test_start"
    elif mode == "reference":
        cutoff, used = ref, "reference"
    else:
        cutoff, used = test_start, "test_start"
        if not enough(labels_at(cutoff)):
            cutoff, used = ref, "reference"
            msg = (
                f"orders.split.cutoff auto: too few labels known at the start of the test period "
                f"(day {test_start - t_first:.0f}; labels mature after {cfg.mature_days} days), "
                "so the model is trained at the data's reference time: its training orders still "
                "end before the test period, but some of their labels became known during it"
            )
            log.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=2)
    y = labels_at(cutoff)
    if not enough(y):
        raise DataValidationError(
            table, label_col,
            f"{int(np.nansum(y))} frauds and {int(np.nansum(1 - y))} clean orders are labeled at "
            f"the training cut-off (day {cutoff - t_first:.1f}, maturity {cfg.mature_days} "
            f"days); need {cfg.min_positives} of each: give more history, or lower "
            "orders.split.mature_days / test_days",
        )  # fmt: skip
    split = np.full(len(t), SPLIT_NONE, dtype=np.int8)
    split[t > test_start] = SPLIT_TEST
    labeled = np.flatnonzero(np.isfinite(y))
    labeled = labeled[np.argsort(t[labeled], kind="stable")]
    n_lab = len(labeled)
    n_early = round(cfg.leaf_share * n_lab)
    n_val = max(1, round(cfg.val_share * (n_lab - n_early)))
    split[labeled[:n_early]] = SPLIT_EARLY
    split[labeled[n_early : n_lab - n_val]] = SPLIT_TRAIN
    split[labeled[n_lab - n_val :]] = SPLIT_VAL

    y_eval, source = ds.label.copy(), "labels known at the reference time"
    seg = ds.segments
    if seg is not None and "fraud" in seg.columns:
        y_eval = np.full(len(t), np.nan)
        y_eval[seg["order_idx"].to_numpy()] = seg["fraud"].to_numpy(dtype=np.float64)
        source = "the simulator's drawn outcome (segments table)"
    test = split == SPLIT_TEST
    info = {
        "cutoff_mode": used,
        "strict": bool(cutoff <= test_start + 1e-9),
        "cutoff_day": cutoff - t_first,
        "test_start_day": test_start - t_first,
        "span_days": t_last - t_first,
        "reference_day": ref - t_first,
        "mature_days": cfg.mature_days,
        "eval_label_source": source,
        "counts": {SPLIT_NAMES[c]: int((split == c).sum()) for c in SPLIT_NAMES},
        "positives": {
            SPLIT_NAMES[c]: int(np.nansum(y[split == c]))
            for c in (SPLIT_EARLY, SPLIT_TRAIN, SPLIT_VAL)
        },
        "test_labeled": int(np.isfinite(y_eval[test]).sum()),
        "test_positives": int(np.nansum(y_eval[test])),
        "period_days": {
            SPLIT_NAMES[c]: [
                float(t[split == c].min() - t_first),
                float(t[split == c].max() - t_first),
            ]
            for c in (SPLIT_EARLY, SPLIT_TRAIN, SPLIT_VAL, SPLIT_TEST)
            if (split == c).any()
        },
    }
    if info["test_labeled"] == 0 or info["test_positives"] == 0:
        raise DataValidationError(
            table, label_col, "no labeled fraud among the test orders: nothing to evaluate on"
        )
    return {"split": split, "y_train": y, "y_eval": y_eval}, info


# --- the build stage ---------------------------------------------------------------------------


def run_build_events(
    data: str | Path,
    run: RunLayout | str | Path,
    cfg: EventGraphConfig | None = None,
    split_cfg: OrderSplitConfig | None = None,
) -> dict:
    """Validate an order dataset and write ``RUN/events``: the graph, the orders table (split,
    labels), the raw features, entity keys and the run's entity salt."""
    cfg = cfg or EventGraphConfig()
    run = as_layout(run)
    t0 = time.perf_counter()
    ds = load_orders(data)
    files = run.events
    with atomic_dir(files.dir) as tmp:
        salt = new_salt(tmp / "salt.key")
        graph = build_event_graph(ds, cfg, salt=salt)
        arrays, info = split_orders(ds, split_cfg)
        graph.save(tmp)
        o = ds.spec.orders
        orders = pd.DataFrame(
            {
                "order_id": ds.ids,
                "t_days": ds.t_days,
                "slice": graph.order_slice,
                "split": arrays["split"],
                "y_train": arrays["y_train"],
                "y_eval": arrays["y_eval"],
                "p_true": ds.truth if ds.truth is not None else np.full(ds.n_orders, np.nan),
            }
        )
        if ds.segments is not None and "segment" in ds.segments.columns:
            seg = np.full(ds.n_orders, "", dtype=object)
            seg[ds.segments["order_idx"].to_numpy()] = ds.segments["segment"].astype(str)
            orders["segment"] = seg
        orders.to_parquet(tmp / "orders.parquet", index=False)
        # the order's amount is a canonical column, and a model input like the features
        names, X = list(ds.feature_names), ds.feature_matrix()
        if o.amount not in names:
            names.append(o.amount)
            X = np.column_stack([X, ds.amount])
        np.save(tmp / "features.npy", X)
        manifest = {
            "version": 1,
            "family": "orders",
            "dataset": {
                "name": ds.spec.name,
                "root": str(ds.root),
                "id": o.id,
                "time": o.time,
                "amount": o.amount,
            },
            "n_orders": ds.n_orders,
            "feature_names": names,
            "entity_types": graph.types,
            "entity_features": list(ENTITY_FEATURES),
            "window_slices": graph.window_slices,
            "window_days": cfg.window_days or ds.spec.history_days,
            "config": cfg.model_dump(),
            "split": info,
            "stats": graph.stats,
            "warnings": ds.warnings,
            "fingerprint": f"{ds.spec.name}-{ds.n_orders}-{time.time_ns()}",
        }
        write_json(tmp / "manifest.json", manifest)
    summary = {
        "orders": ds.n_orders,
        "entity_slices": graph.n_entity_slices,
        "edges": graph.stats["edges"],
        "cutoff": info["cutoff_mode"],
        "strict": info["strict"],
        "split": info["counts"],
        "seconds": time.perf_counter() - t0,
    }
    log.info("events: %s", summary)
    return summary


def event_salt(run: RunLayout | str | Path) -> bytes:
    """The run's entity salt (entity keys of training, batch scoring and online requests agree)."""
    return load_salt(as_layout(run).events.dir / "salt.key")


def load_orders_table(run: RunLayout | str | Path) -> pd.DataFrame:
    """``RUN/events/orders.parquet``: order id, time, slice, split, labels (see
    :func:`split_orders`)."""
    return pd.read_parquet(as_layout(run).events.dir / "orders.parquet")


# --- ClusterGCN shards ---------------------------------------------------------------------------


def _write_event_shard(path: str, nodes: np.ndarray, hop: np.ndarray, hops: int, g: dict) -> dict:
    """One shard: owned nodes first, then halo nodes by hop, and the edges into inner rings."""
    from creditgraph.graph.partition import inner_edges

    e, src_l, dst_l = inner_edges(
        nodes, hop, hops, g["n"], g["indptr"], g["order"], g["src"], g["dst"]
    )
    n_owned = int((hop == 0).sum())
    np.savez(
        path,
        nodes=nodes,
        n_owned=np.int64(n_owned),
        hop=hop,
        src=src_l,
        dst=dst_l,
        rel=g["rel"][e],
        recency=g["recency"][e],
    )
    return {"owned": n_owned, "halo": len(nodes) - n_owned, "edges": len(e)}


def _in_reach(n: int, src: np.ndarray, dst: np.ndarray, seeds: np.ndarray, hops: int):
    """Nodes within ``hops`` incoming hops of ``seeds`` (the seeds included)."""
    indptr = np.r_[0, np.cumsum(np.bincount(dst, minlength=n))]
    order = np.argsort(dst, kind="stable")
    seen = np.zeros(n, bool)
    seen[seeds] = True
    frontier = np.asarray(seeds, dtype=np.int64)
    for _ in range(hops):
        starts, ends = indptr[frontier], indptr[frontier + 1]
        lengths = ends - starts
        pos = np.repeat(starts, lengths) + (
            np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        )
        nxt = np.unique(src[order[pos]])
        frontier = nxt[~seen[nxt]]
        if not len(frontier):
            break
        seen[frontier] = True
    return seen


def _induced_parts(metis_parts, n, src, dst, subset: np.ndarray, k: int, seed: int) -> np.ndarray:
    """METIS parts of the subgraph induced by ``subset`` (a node mask)."""
    ids = np.flatnonzero(subset)
    local = np.full(n, -1, dtype=np.int64)
    local[ids] = np.arange(len(ids))
    keep = subset[src] & subset[dst]
    s, d = local[src[keep]], local[dst[keep]]
    return metis_parts(len(ids), s, d, np.ones(len(s)), k, seed)


def partition_events(
    run: RunLayout | str | Path, cfg: EventPartitionConfig | None = None, *, hops: int
) -> dict:
    """Cut ``RUN/events`` into METIS parts with ``hops``-deep halos; write ``RUN/shards`` with
    Ray tasks. Owned nodes of a shard get exactly their full-graph outputs from a network of at
    most ``hops`` message-passing steps (tested).

    The graph is cut in two regions first: the nodes within ``hops`` of a labeled training
    order (what training needs) and the rest (the test period, the network's own ancestors of
    nothing labeled). Each region is partitioned by METIS on its own; training streams only the
    first region's shards (``train_parts``), batch scoring all of them.
    """
    import ray

    from creditgraph.graph.partition import metis_parts, shard_members

    cfg = cfg or EventPartitionConfig()
    run = as_layout(run)
    require_ray("partitioning the event graph")
    t0 = time.perf_counter()
    g = EventGraph.load(run)
    n = g.n_nodes
    split = load_orders_table(run)["split"].to_numpy()
    labeled = np.flatnonzero(np.isin(split, (SPLIT_EARLY, SPLIT_TRAIN, SPLIT_VAL)))
    region = _in_reach(n, g.src, g.dst, labeled, hops)
    k_train = cfg.parts_for(int(region.sum())) if region.any() else 0
    k_rest = cfg.parts_for(int((~region).sum())) if (~region).any() else 0
    k = k_train + k_rest
    parts = np.zeros(n, dtype=np.int64)
    if k_train:
        parts[region] = _induced_parts(metis_parts, n, g.src, g.dst, region, k_train, cfg.seed)
    if k_rest:
        rest = _induced_parts(metis_parts, n, g.src, g.dst, ~region, k_rest, cfg.seed)
        parts[~region] = k_train + rest
    t_metis = time.perf_counter() - t0
    order = np.argsort(g.dst, kind="stable")
    indptr = np.r_[0, np.cumsum(np.bincount(g.dst, minlength=n))]
    shared = ray.put(
        {"n": n, "src": g.src, "dst": g.dst, "rel": g.rel, "recency": g.recency,
         "indptr": indptr, "order": order}
    )  # fmt: skip
    writer = ray.remote(num_cpus=0.5)(_write_event_shard)
    with atomic_dir(run.shards.dir) as tmp_dir:
        tmp = ShardFiles(tmp_dir)
        futures, names = [], []
        for p, nodes, hop in shard_members(n, g.src, g.dst, parts, k, hops):
            path = tmp.shard(p)
            futures.append(writer.remote(str(path), nodes, hop, hops, shared))
            names.append(path.name)
        stats = ray.get(futures)
        owned = np.array([s["owned"] for s in stats])
        manifest = {
            "version": 1,
            "family": "orders",
            "config": cfg.model_dump(),
            "num_parts": k,
            "train_parts": k_train,
            "hops": hops,
            "parts": [
                {"file": f, "train": i < k_train, **s}
                for i, (f, s) in enumerate(zip(names, stats, strict=True))
            ],
            "edge_cut": float((parts[g.src] != parts[g.dst]).mean()) if len(g.src) else 0.0,
            "halo_ratio": float(sum(s["halo"] for s in stats) / max(owned.sum(), 1)),
            "balance": float(owned.max() / owned.mean()) if len(owned) else 1.0,
            "timings_s": {"metis": t_metis, "total": time.perf_counter() - t0},
        }
        np.save(tmp.membership, parts)
        write_json(tmp.manifest, manifest)
    log.info(
        "event shards: %d parts, edge cut %.3f, halo ratio %.2f",
        k, manifest["edge_cut"], manifest["halo_ratio"],
    )  # fmt: skip
    return {
        key: manifest[key] for key in ("num_parts", "edge_cut", "halo_ratio", "balance", "hops")
    }


def load_event_shard(path: str | Path) -> dict[str, np.ndarray]:
    """One shard file as a dict of arrays (no pickle)."""
    with np.load(path, allow_pickle=False) as f:
        return {key: f[key] for key in f.files}


def event_shard_paths(run: RunLayout | str | Path, *, train_only: bool = False) -> list[Path]:
    """The shard files (``train_only``: those holding what training needs), in part order."""
    files = as_layout(run).shards
    if not files.exists():
        raise FileNotFoundError(f"no shards in {files.dir}: run the partition stage first")
    parts = read_json(files.manifest)["parts"]
    return [files.dir / p["file"] for p in parts if p.get("train", True) or not train_only]
