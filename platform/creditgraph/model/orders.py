"""The order-risk network (seed 001, §3.2-3.4); its settings are in ``model/orders_config.py``.

Two halves, as seed 001's lambda architecture splits them:

* the **entity stack** runs over the event graph's shadow orders and entity slices
  (:mod:`creditgraph.graph.events`): inputs are each shadow order's GBDT-leaf embedding plus an
  MLP of its raw features, and each entity slice's type and counts; ``layers`` DeepGCN-style
  residual layers (pre-activation "res+": ``h + conv(GELU(LayerNorm(h)))``) pass messages along
  the shadow -> entity, entity -> shadow and entity history relations, each relation with its own
  weights, aggregated by a mean (``conv: gcn``) or by attention (``conv: gat``). The final entity
  embeddings are what the batch job stores per entity;
* the **last hop** runs per order: the order's own encoding queries the stored embeddings of the
  entities it names (their latest slice before the order's, plus how stale each is), a mean per
  entity type (or attention) and an MLP give the fraud logit. Batch scoring and the online
  service call the same :meth:`OrderNet.hop`, so they agree (tested to 1e-5).

Real orders are sinks of the graph and only the labeled real orders of the training period are
in the loss (:func:`order_loss`); shadow orders never are.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn
from torch_geometric.utils import scatter, softmax

from creditgraph.graph.events import (
    ENTITY_FEATURES,
    KIND_ENTITY,
    KIND_ORDER,
    LABEL_FEATURES,
    REL_ENTITY_TO_ORDER,
    REL_ENTITY_TO_SHADOW,
    REL_HISTORY,
    REL_SHADOW_TO_ENTITY,
    SPLIT_VAL,
    EventGraph,
    load_orders_table,
)
from creditgraph.graph.features import FeatureStandardizer
from creditgraph.layout import ModelFiles, RunLayout, as_layout
from creditgraph.model.layers import MLP
from creditgraph.model.orders_config import (  # noqa: F401  (the config lives with the network)
    ABLATIONS,
    OrderEvalConfig,
    OrderNetConfig,
    OrdersConfig,
)
from creditgraph.utils.io import read_json, write_json

STACK_RELATIONS = (REL_SHADOW_TO_ENTITY, REL_ENTITY_TO_SHADOW, REL_HISTORY)


class OrderNetSpec(BaseModel):
    """The data-dependent sizes of a network (with the config, enough to rebuild it)."""

    model_config = ConfigDict(extra="forbid")

    feature_names: list[str]
    entity_types: list[str]
    n_trees: int
    num_leaves: int
    n_leaf_models: int
    n_entity_features: int = len(ENTITY_FEATURES)
    slice_days: float
    window_slices: int

    @property
    def n_features(self) -> int:
        return len(self.feature_names)


# --- inputs: what a shard needs besides its structure ---------------------------------------


@dataclass
class NodeInputs:
    """Per-order and per-entity-slice inputs of a run, read from ``RUN/events`` and
    ``RUN/leaves`` (memory-mapped where large). ``y`` is the training label (known at the
    cut-off), ``split`` the split code; evaluation labels are never here."""

    n_orders: int
    raw: np.ndarray  # float64[n, F], NaN = missing
    std: FeatureStandardizer
    leaves: np.ndarray  # uint8[n, T]
    fold: np.ndarray  # int8[n]
    gbdt: np.ndarray  # float32[n]: the leaf encoder's logit
    es_type: np.ndarray  # int16[S]
    es_feat: np.ndarray  # float32[S, E]
    y: np.ndarray  # float32[n]
    split: np.ndarray  # int8[n]
    train_codes: tuple[int, ...]

    @classmethod
    def load(cls, run: RunLayout | str | Path, *, mmap: bool = True) -> NodeInputs:
        run = as_layout(run)
        if not run.leaves.exists():
            raise FileNotFoundError(f"no leaf encoder in {run.leaves.dir}: run the leaves stage")
        g = EventGraph.load(run, mmap=mmap)
        mode = "r" if mmap else None
        orders = load_orders_table(run)
        leaf_meta = read_json(run.leaves.manifest)
        return cls(
            n_orders=g.n_orders,
            raw=np.load(run.events.dir / "features.npy", mmap_mode=mode),
            std=FeatureStandardizer.from_records(read_json(run.leaves.feature_stats)),
            leaves=np.load(run.leaves.leaves, mmap_mode=mode),
            fold=np.load(run.leaves.folds),
            gbdt=np.load(run.leaves.gbdt_logit),
            es_type=g.entity_type[np.asarray(g.es_entity)],
            es_feat=np.asarray(g.es_feat) if not mmap else g.es_feat,
            y=orders["y_train"].to_numpy(np.float32),
            split=orders["split"].to_numpy(np.int8),
            train_codes=tuple(leaf_meta["network_train_codes"]),
        )


@functools.lru_cache(maxsize=4)
def cached_inputs(run_dir: str, stamp: float) -> NodeInputs:
    """One :class:`NodeInputs` per process and run (``stamp``: the leaves manifest's mtime)."""
    return NodeInputs.load(run_dir)


def inputs_for(run: RunLayout | str | Path) -> NodeInputs:
    run = as_layout(run)
    return cached_inputs(str(run.root), run.leaves.manifest.stat().st_mtime)


def shard_arrays(shard: dict[str, np.ndarray], inp: NodeInputs) -> dict[str, np.ndarray]:
    """A shard's structure with its nodes' inputs gathered (what one Ray Data row holds)."""
    nodes = shard["nodes"]
    n = inp.n_orders
    kind = np.where(nodes < n, 0, np.where(nodes < 2 * n, 1, 2)).astype(np.int8)
    order_row = np.where(kind == 0, nodes, np.where(kind == 1, nodes - n, -1))
    o_local = np.flatnonzero(kind < KIND_ENTITY)
    rows = order_row[o_local]
    z, omega = inp.std.transform(np.asarray(inp.raw[rows]))
    e_local = np.flatnonzero(kind == KIND_ENTITY)
    es = nodes[e_local] - 2 * n
    owned = np.zeros(len(nodes), bool)
    owned[: int(shard["n_owned"])] = True
    real = kind == KIND_ORDER
    y = np.full(len(nodes), np.nan, np.float32)
    split = np.full(len(nodes), -9, np.int8)
    y[real] = inp.y[order_row[real]]
    split[real] = inp.split[order_row[real]]
    return {
        "nodes": nodes,
        "kind": kind,
        "order_row": order_row,
        "owned": owned,
        "o_local": o_local,
        "leaves": np.asarray(inp.leaves[rows]),
        "fold": inp.fold[rows],
        "gbdt": inp.gbdt[rows],
        "z": z,
        "omega": omega,
        "e_local": e_local,
        "es_index": es,
        "etype": inp.es_type[es].astype(np.int64),
        "efeat": np.asarray(inp.es_feat[es], dtype=np.float32),
        "src": shard["src"],
        "dst": shard["dst"],
        "rel": shard["rel"],
        "recency": shard["recency"],
        "y": y,
        "split": split,
    }


# --- batches -------------------------------------------------------------------------------------


@dataclass
class EventBatch:
    """Tensors of one ClusterGCN step (one or more shards glued together)."""

    n: int
    kind: Tensor
    owned: Tensor
    o_local: Tensor
    leaves: Tensor
    fold: Tensor
    gbdt: Tensor
    z: Tensor
    omega: Tensor
    e_local: Tensor
    etype: Tensor
    efeat: Tensor
    src: Tensor
    dst: Tensor
    rel: Tensor
    recency: Tensor
    y: Tensor
    split: Tensor
    order_row: Tensor
    es_index: Tensor

    def to(self, device: torch.device | str) -> EventBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            if isinstance(getattr(self, f.name), Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return EventBatch(**moved)

    def masks(self, train_codes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """(loss mask, validation mask): owned real orders with a known training label; shadow
        orders and entity slices are in neither."""
        base = (self.kind == KIND_ORDER) & self.owned & torch.isfinite(self.y)
        train = base & torch.isin(self.split, torch.tensor(train_codes, dtype=self.split.dtype))
        return train, base & (self.split == SPLIT_VAL)


_LOCAL = ("o_local", "e_local", "src", "dst")


def collate(rows: list[dict[str, np.ndarray]]) -> EventBatch:
    """Glue shard rows into one batch (local node indices offset per shard)."""
    parts: dict[str, list[np.ndarray]] = {}
    offset = 0
    for r in rows:
        n = len(r["kind"])
        for k, v in r.items():
            if k == "nodes":
                continue
            parts.setdefault(k, []).append(np.asarray(v) + offset if k in _LOCAL else v)
        offset += n
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return EventBatch(
        n=offset,
        kind=torch.from_numpy(cat["kind"].astype(np.int64)),
        owned=torch.from_numpy(cat["owned"].astype(bool)),
        o_local=torch.from_numpy(cat["o_local"].astype(np.int64)),
        leaves=torch.from_numpy(cat["leaves"].astype(np.int64)),
        fold=torch.from_numpy(cat["fold"].astype(np.int64)),
        gbdt=torch.from_numpy(cat["gbdt"].astype(np.float32)),
        z=torch.from_numpy(cat["z"].astype(np.float32)),
        omega=torch.from_numpy(cat["omega"].astype(np.float32)),
        e_local=torch.from_numpy(cat["e_local"].astype(np.int64)),
        etype=torch.from_numpy(cat["etype"].astype(np.int64)),
        efeat=torch.from_numpy(cat["efeat"].astype(np.float32)),
        src=torch.from_numpy(cat["src"].astype(np.int64)),
        dst=torch.from_numpy(cat["dst"].astype(np.int64)),
        rel=torch.from_numpy(cat["rel"].astype(np.int64)),
        recency=torch.from_numpy(cat["recency"].astype(np.float32)),
        y=torch.from_numpy(cat["y"].astype(np.float32)),
        split=torch.from_numpy(cat["split"].astype(np.int64)),
        order_row=torch.from_numpy(cat["order_row"].astype(np.int64)),
        es_index=torch.from_numpy(cat["es_index"].astype(np.int64)),
    )


# --- the network ----------------------------------------------------------------------------------


class OrderEncoder(nn.Module):
    """An order's own input: GBDT-leaf embeddings (mean over trees; each leaf model has its own
    vocabulary) plus an MLP of the standardized raw features, their observed mask and the GBDT's
    logit."""

    def __init__(self, spec: OrderNetSpec, cfg: OrderNetConfig):
        super().__init__()
        h = cfg.hidden
        self.use_leaves = cfg.use_leaves
        self.raw = MLP([2 * spec.n_features + int(cfg.use_leaves), 2 * h, h], cfg.dropout)
        if cfg.use_leaves:
            per_model = spec.n_trees * spec.num_leaves
            self.leaf = nn.EmbeddingBag(spec.n_leaf_models * per_model, h, mode="mean")
            self.register_buffer("tree_offset", torch.arange(spec.n_trees) * spec.num_leaves)
            self.per_model = per_model
        self.norm = nn.LayerNorm(h)

    def forward(
        self, z: Tensor, omega: Tensor, leaves: Tensor, fold: Tensor, gbdt: Tensor
    ) -> Tensor:
        parts = [z, omega, gbdt.unsqueeze(-1)] if self.use_leaves else [z, omega]
        h = self.raw(torch.cat(parts, dim=-1))
        if self.use_leaves:
            idx = leaves.long() + self.tree_offset + (fold.long() * self.per_model).unsqueeze(-1)
            h = h + self.leaf(idx)
        return self.norm(h)


class EntityEncoder(nn.Module):
    """An entity slice's input: its type and its counts (optionally without label feedback)."""

    def __init__(self, spec: OrderNetSpec, cfg: OrderNetConfig):
        super().__init__()
        h = cfg.hidden
        self.type_emb = nn.Embedding(len(spec.entity_types), h)
        self.mlp = MLP([spec.n_entity_features, h, h], cfg.dropout)
        keep = torch.ones(spec.n_entity_features)
        if not cfg.use_label_feedback:
            keep[list(LABEL_FEATURES)] = 0.0
        self.register_buffer("keep", keep)
        self.norm = nn.LayerNorm(h)

    def forward(self, etype: Tensor, feat: Tensor) -> Tensor:
        return self.norm(self.type_emb(etype) + self.mlp(feat * self.keep))


class StackLayer(nn.Module):
    """One DeepGCN res+ layer over the entity stack's relations, each with its own weights."""

    def __init__(self, cfg: OrderNetConfig, relations: tuple[int, ...]):
        super().__init__()
        h = cfg.hidden
        self.relations = relations
        self.conv = cfg.conv
        self.norm = nn.LayerNorm(h)
        self.drop = nn.Dropout(cfg.dropout)
        self.self_lin = nn.Linear(h, h)
        self.lin = nn.ModuleDict({str(r): nn.Linear(h, h, bias=False) for r in relations})
        if cfg.conv == "gat":
            if h % cfg.heads:
                raise ValueError(f"hidden {h} is not a multiple of heads {cfg.heads}")
            self.heads = cfg.heads
            self.att_src = nn.Parameter(
                torch.randn(len(relations), cfg.heads, h // cfg.heads) * 0.1
            )
            self.att_dst = nn.Parameter(
                torch.randn(len(relations), cfg.heads, h // cfg.heads) * 0.1
            )

    def forward(self, h: Tensor, edges: dict[int, tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        n = h.shape[0]
        u = self.drop(F.gelu(self.norm(h)))
        out = self.self_lin(u)
        for i, r in enumerate(self.relations):
            if r not in edges or edges[r][0].numel() == 0:
                continue
            s, d, w = edges[r]
            x = self.lin[str(r)](u)
            if self.conv == "gcn":
                out = out + scatter(x[s] * w.unsqueeze(-1), d, dim=0, dim_size=n, reduce="sum")
            else:
                xh = x.view(n, self.heads, -1)
                a = (xh[s] * self.att_src[i]).sum(-1) + (xh[d] * self.att_dst[i]).sum(-1)
                alpha = softmax(F.leaky_relu(a, 0.2), d, num_nodes=n)
                msg = (xh[s] * alpha.unsqueeze(-1)).reshape(len(s), -1)
                out = out + scatter(msg, d, dim=0, dim_size=n, reduce="sum")
        return h + out


class LastHop(nn.Module):
    """The online hop: an order's encoding and its entities' stored embeddings -> fraud logit."""

    def __init__(self, spec: OrderNetSpec, cfg: OrderNetConfig):
        super().__init__()
        h = cfg.hidden
        self.n_types = len(spec.entity_types)
        self.conv = cfg.conv
        self.typed = nn.Linear(h, h * self.n_types)
        self.recency = nn.Linear(1, h)
        if cfg.conv == "gat":
            self.query = nn.Linear(h, h)
        self.head = MLP([2 * h, h, 1], cfg.dropout)
        self.use_gbdt = cfg.use_leaves
        if self.use_gbdt:
            self.gbdt_scale = nn.Parameter(torch.ones(()))

    def forward(
        self, x: Tensor, ent: Tensor, etype: Tensor, rec: Tensor, owner: Tensor, gbdt: Tensor
    ) -> Tensor:
        """Logits of ``len(x)`` orders; entity ``k`` (embedding ``ent[k]``, type ``etype[k]``,
        ``rec[k]`` days stale) belongs to order ``owner[k]``; ``gbdt`` is each order's GBDT
        logit (ignored without leaves)."""
        b, h = x.shape
        k = ent.shape[0]
        msg = self.typed(ent).view(k, self.n_types, h)[torch.arange(k), etype]
        msg = msg + self.recency(torch.log1p(rec).unsqueeze(-1))
        if self.conv == "gcn":
            key = owner * self.n_types + etype
            cnt = torch.bincount(key, minlength=b * self.n_types).clamp_min(1)
            w = 1.0 / cnt[key].to(msg.dtype)
            agg = scatter(msg * w.unsqueeze(-1), owner, dim=0, dim_size=b, reduce="sum")
        else:
            score = (self.query(x)[owner] * msg).sum(-1) / math.sqrt(h)
            alpha = softmax(score, owner, num_nodes=b)
            agg = scatter(msg * alpha.unsqueeze(-1), owner, dim=0, dim_size=b, reduce="sum")
        out = self.head(torch.cat([x, agg], dim=-1)).squeeze(-1)
        return out + self.gbdt_scale * gbdt if self.use_gbdt else out


class OrderNet(nn.Module):
    """Entity stack + last hop (see the module docstring)."""

    def __init__(self, cfg: OrderNetConfig, spec: OrderNetSpec):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        rels = [REL_SHADOW_TO_ENTITY]
        if cfg.use_shadow:
            rels.append(REL_ENTITY_TO_SHADOW)
        if cfg.use_history:
            rels.append(REL_HISTORY)
        self.relations = tuple(rels)
        self.orders = OrderEncoder(spec, cfg)
        self.entities = EntityEncoder(spec, cfg)
        self.layers = nn.ModuleList(StackLayer(cfg, self.relations) for _ in range(cfg.layers))
        self.final = nn.LayerNorm(cfg.hidden)
        self.hop = LastHop(spec, cfg)

    @property
    def hops(self) -> int:
        """Message-passing depth into an order (the shards' halo must be at least this)."""
        return self.cfg.layers + 1

    def encode_orders(
        self, z: Tensor, omega: Tensor, leaves: Tensor, fold: Tensor, gbdt: Tensor
    ) -> Tensor:
        return self.orders(z, omega, leaves, fold, gbdt)

    def _edges(self, b: EventBatch) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
        out = {}
        for r in self.relations:
            m = b.rel == r
            s, d = b.src[m], b.dst[m]
            deg = torch.bincount(d, minlength=b.n).clamp_min(1).to(torch.float32)
            out[r] = (s, d, 1.0 / deg[d])
        return out

    def forward(self, b: EventBatch) -> dict[str, Tensor]:
        """``logits`` of the batch's real orders (local ids ``real``) and final embeddings
        ``z`` of its entity slices (local ids ``b.e_local``)."""
        h = torch.zeros(b.n, self.cfg.hidden, dtype=torch.float32, device=b.z.device)
        x_o = self.encode_orders(b.z, b.omega, b.leaves, b.fold, b.gbdt)
        h = h.index_copy(0, b.o_local, x_o)
        h = h.index_copy(0, b.e_local, self.entities(b.etype, b.efeat))
        x = h
        edges = self._edges(b)
        for layer in self.layers:
            h = layer(h, edges)
        z = self.final(h)
        real = torch.nonzero(b.kind == KIND_ORDER).squeeze(-1)
        pos = torch.full((b.n,), -1, dtype=torch.long, device=h.device)
        pos[real] = torch.arange(len(real), device=h.device)
        m = b.rel == REL_ENTITY_TO_ORDER
        s, d = b.src[m], b.dst[m]
        etype_node = torch.full((b.n,), 0, dtype=torch.long, device=h.device)
        etype_node[b.e_local] = b.etype
        gbdt = torch.zeros(b.n, dtype=torch.float32, device=h.device)
        gbdt[b.o_local] = b.gbdt
        logits = self.hop(x[real], z[s], etype_node[s], b.recency[m], pos[d], gbdt[real])
        return {"real": real, "logits": logits, "z": z[b.e_local]}


def order_loss(
    out: dict[str, Tensor], b: EventBatch, mask: Tensor, pos_weight: float = 1.0
) -> tuple[Tensor, int]:
    """Mean BCE over the real orders in ``mask`` (a node mask from :meth:`EventBatch.masks`);
    returns (loss, count). Nodes outside the mask, shadow orders among them, add nothing."""
    sel = mask[out["real"]]
    n = int(sel.sum())
    if n == 0:
        return out["logits"].sum() * 0.0, 0
    y = b.y[out["real"]][sel]
    w = torch.where(y > 0.5, pos_weight, 1.0)
    loss = F.binary_cross_entropy_with_logits(out["logits"][sel], y, weight=w)
    return loss, n


# --- building, saving, loading ----------------------------------------------------------------


def spec_for(run: RunLayout | str | Path) -> OrderNetSpec:
    """The network's data-dependent sizes from ``RUN/events`` and ``RUN/leaves``."""
    run = as_layout(run)
    ev = read_json(run.events.manifest)
    leaf = read_json(run.leaves.manifest)
    return OrderNetSpec(
        feature_names=ev["feature_names"],
        entity_types=ev["entity_types"],
        n_trees=leaf["n_trees"],
        num_leaves=leaf["num_leaves"],
        n_leaf_models=leaf["n_models"],
        n_entity_features=len(ev["entity_features"]),
        slice_days=ev["config"]["slice_days"],
        window_slices=ev["window_slices"],
    )


def save_order_model(folder: ModelFiles, model: OrderNet, extra: dict | None = None) -> str:
    """``model.pt`` (tensors only) and ``model.json``; returns the version (hash of the weights)."""
    folder.dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, folder.weights)
    version = hashlib.sha256(folder.weights.read_bytes()).hexdigest()[:16]
    write_json(
        folder.manifest,
        {
            "family": "orders",
            "version": version,
            "config": model.cfg.model_dump(),
            "spec": model.spec.model_dump(),
            **(extra or {}),
        },
    )
    return version


def load_order_model(folder: ModelFiles | str | Path) -> tuple[OrderNet, dict]:
    """Rebuild the network from ``model.json`` and load ``model.pt`` (no pickled code)."""
    files = folder if isinstance(folder, ModelFiles) else ModelFiles(Path(folder))
    if not files.exists():
        raise FileNotFoundError(f"no trained order model at {files.dir}")
    meta = read_json(files.manifest)
    if meta.get("family") != "orders":
        raise ValueError(f"{files.dir} holds a {meta.get('family', 'credit')} model, not orders")
    model = OrderNet(OrderNetConfig(**meta["config"]), OrderNetSpec(**meta["spec"]))
    model.load_state_dict(torch.load(files.weights, map_location="cpu", weights_only=True))
    model.eval()
    return model, meta


@torch.no_grad()
def infer_rows(model: OrderNet, rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Evaluation-mode outputs of owned nodes of shard rows: ``order_row``/``logit`` of real
    orders and ``es_index``/``z`` of entity slices (exact: the halo covers every hop)."""
    model.eval()
    outs: dict[str, list[np.ndarray]] = {"order_row": [], "logit": [], "es_index": [], "z": []}
    for r in rows:
        b = collate([r])
        out = model(b)
        real = out["real"]
        own_r = b.owned[real]
        outs["order_row"].append(b.order_row[real][own_r].numpy())
        outs["logit"].append(out["logits"][own_r].numpy())
        own_e = b.owned[b.e_local]
        outs["es_index"].append(b.es_index[own_e].numpy())
        outs["z"].append(out["z"][own_e].numpy())
    return {
        k: np.concatenate(v) if v else np.zeros((0, model.cfg.hidden) if k == "z" else 0)
        for k, v in outs.items()
    }


def infer_run(
    model: OrderNet, run: RunLayout | str | Path, *, paths: list[Path] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every order's fraud logit and every entity slice's embedding, shard by shard, in this
    process: ``(logit float32[n_orders], z float32[S, hidden])``."""
    from creditgraph.graph.events import event_shard_paths, load_event_shard

    run = as_layout(run)
    inp = inputs_for(run)
    paths = paths if paths is not None else event_shard_paths(run)
    n_es = len(inp.es_type)
    logit = np.full(inp.n_orders, np.nan, np.float32)
    z = np.zeros((n_es, model.cfg.hidden), np.float32)
    for p in paths:
        res = infer_rows(model, [shard_arrays(load_event_shard(p), inp)])
        logit[res["order_row"]] = res["logit"]
        z[res["es_index"]] = res["z"]
    return logit, z
