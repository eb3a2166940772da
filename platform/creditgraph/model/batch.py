"""Mini-batches of ClusterGCN shards (disjoint unions) as tensors.

A plain dataclass filled by numpy concatenation, not PyG's ``Data`` + ``Batch.from_data_list``:
the same tensors, but PyG's collation costs about 3 % of a training step
(``benchmarks/bench_batching.py``; docs/model.md, "Batches").
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor


@dataclass
class GraphBatch:
    """One training/inference step: several shards glued into one graph (no edges between them).

    ``owned`` marks the nodes whose outputs count (loss, predictions); shadow nodes are context.
    ``split`` is 0 train, 1 val, 2 test; ``outcome`` is NaN where unlabeled.
    """

    nodes: Tensor
    owned: Tensor
    z: Tensor
    omega: Tensor
    struct: Tensor
    treatment: Tensor
    outcome: Tensor
    split: Tensor
    edge_index: Tensor
    edge_weight: Tensor
    leaves: Tensor | None = None
    prior: Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.z.shape[0]

    def to(self, device: torch.device | str) -> GraphBatch:
        return GraphBatch(
            **{
                f.name: (None if (v := getattr(self, f.name)) is None else v.to(device))
                for f in fields(self)
            }
        )

    def mask(self, split: int, labeled: bool = True) -> Tensor:
        m = self.owned & (self.split == split)
        return m & torch.isfinite(self.outcome) if labeled else m


def collate_shards(
    shards: list[dict], leaves: np.ndarray | None = None, prior: np.ndarray | None = None
) -> GraphBatch:
    """Concatenate shard dicts (see ``graph.partition``) into one :class:`GraphBatch`.

    Per-node extras (GBDT ``leaves``, the teacher's ``prior`` logit) come from the given arrays
    (indexed by global node id) or from same-named entries of each shard dict (rows prepared by
    the Ray Data pipeline).
    """
    offs = np.cumsum([0] + [len(s["nodes"]) for s in shards[:-1]])
    cat = lambda key: np.concatenate([s[key] for s in shards])  # noqa: E731
    owned = np.concatenate([np.asarray(s["hop"]) == 0 for s in shards])
    src = np.concatenate([s["src"] + o for s, o in zip(shards, offs, strict=True)])
    dst = np.concatenate([s["dst"] + o for s, o in zip(shards, offs, strict=True)])
    nodes = cat("nodes")
    return GraphBatch(
        nodes=torch.from_numpy(nodes.astype(np.int64)),
        owned=torch.from_numpy(owned),
        z=torch.from_numpy(cat("z").astype(np.float32)),
        omega=torch.from_numpy(cat("omega").astype(np.float32)),
        struct=torch.from_numpy(cat("struct").astype(np.float32)),
        treatment=torch.from_numpy(cat("treatment").astype(np.float32)),
        outcome=torch.from_numpy(cat("outcome").astype(np.float32)),
        split=torch.from_numpy(cat("split").astype(np.int64)),
        edge_index=torch.from_numpy(np.stack([src, dst]).astype(np.int64)),
        edge_weight=torch.from_numpy(cat("weight").astype(np.float32)),
        leaves=_extra("leaves", shards, nodes, leaves, np.int64),
        prior=_extra("prior", shards, nodes, prior, np.float32),
    )


def _extra(
    key: str, shards: list[dict], nodes: np.ndarray, table: np.ndarray | None, dtype
) -> Tensor | None:
    """A per-node extra: gathered by global id from ``table``, or carried by the shard rows."""
    if table is not None:
        return torch.from_numpy(np.asarray(table[nodes], dtype=dtype))
    if key in shards[0]:
        return torch.from_numpy(np.concatenate([s[key] for s in shards]).astype(dtype))
    return None
