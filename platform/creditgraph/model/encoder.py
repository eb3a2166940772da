"""Feature encoder: relational graph attention over the complete user-feature bipartite graph.

Every user has an edge to every feature node, carrying ``(omega, z)``. Two relations: *observed*
(omega = 1) and *missing* (omega = 0); a missing value still sends a message, a relation-specific
one, so the model sees the "information break" instead of an imputed number. Feature nodes carry
a learned embedding plus their causal weight alpha_j, propagated along the feature DAG (parent ->
child) before attention. Because the bipartite graph is complete, messages are laid out densely as
``[users, features, channels]``: memory is O(|E_uf|) = O(users x features), the sparse optimum.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from creditgraph.model.layers import MLP


class FeatureNodes(nn.Module):
    """Feature-node states f_j: embedding (+ alpha_j projection), one round over the DAG."""

    def __init__(self, n_features: int, hidden: int, use_alpha: bool, use_dag: bool):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(n_features, hidden) * 0.1)
        self.use_alpha = use_alpha
        self.use_dag = use_dag
        self.alpha_proj = nn.Linear(1, hidden) if use_alpha else None
        if self.alpha_proj is not None:
            # zero at the start: the model begins as the no-alpha model and uses alpha only where
            # it helps. The default init (weights and bias ~U(-1, 1)) added a vector shared by all
            # features ten times larger than their 0.1-scale embeddings, which made the features
            # look alike to the attention and cost MISE (docs/model.md).
            nn.init.zeros_(self.alpha_proj.weight)
            nn.init.zeros_(self.alpha_proj.bias)
        self.dag_msg = nn.Linear(hidden, hidden) if use_dag else None
        self.register_buffer("alpha", torch.zeros(n_features))
        self.register_buffer("dag", torch.zeros(2, 0, dtype=torch.long))

    def set_causal(self, alpha: Tensor | None, dag: Tensor | None) -> None:
        """Attach frozen pretraining outputs (alpha scaled to max |alpha| = 1; DAG edges)."""
        if alpha is not None:
            a = alpha.float()
            self.alpha = a / a.abs().max().clamp_min(1e-12)
        if dag is not None:
            self.dag = dag.long().reshape(2, -1)

    def forward(self) -> Tensor:
        f = self.emb
        if self.alpha_proj is not None:
            f = f + self.alpha_proj(self.alpha.unsqueeze(-1))
        if self.dag_msg is not None and self.dag.shape[1] > 0:
            parent, child = self.dag
            msg = scatter(self.dag_msg(f)[parent], child, dim=0, dim_size=f.shape[0], reduce="mean")
            f = f + torch.tanh(msg)
        return f


class RelationalFeatureAttention(nn.Module):
    """One round of multi-head attention from users over their (observed|missing) feature edges."""

    def __init__(self, hidden: int, heads: int, user_query: bool):
        super().__init__()
        assert hidden % heads == 0, "hidden must be divisible by heads"
        self.h, self.dh = heads, hidden // heads
        # observed: W1 f + z * W2 f ; missing: W3 f  (for keys and values)
        self.obs = nn.Linear(hidden, 4 * hidden)
        self.mis = nn.Linear(hidden, 2 * hidden)
        self.user_query = user_query
        self.q = nn.Linear(hidden, hidden) if user_query else None
        self.q0 = nn.Parameter(torch.randn(heads, self.dh) * 0.1)
        self.out = nn.Linear(hidden, hidden)

    def project(self, f: Tensor) -> tuple[Tensor, ...]:
        """The user-independent keys and values of the feature nodes ``f``:
        ``(k1, k2, v1, v2, km, vm)``, each ``[F, d]``."""
        d = self.h * self.dh
        k1, k2, v1, v2 = self.obs(f).split(d, dim=-1)
        km, vm = self.mis(f).split(d, dim=-1)
        return k1, k2, v1, v2, km, vm

    def forward(
        self,
        f: Tensor,
        z: Tensor,
        omega: Tensor,
        h_user: Tensor | None,
        proj: tuple[Tensor, ...] | None = None,
    ) -> Tensor:
        """``proj``: :meth:`project` of ``f`` when already computed."""
        n, nf = z.shape
        d = self.h * self.dh
        k1, k2, v1, v2, km, vm = self.project(f) if proj is None else proj  # [F, d] each
        zz, om = z.unsqueeze(-1), omega.unsqueeze(-1)
        keys = om * (k1 + zz * k2) + (1 - om) * km  # [n, F, d]
        vals = om * (v1 + zz * v2) + (1 - om) * vm
        keys = keys.view(n, nf, self.h, self.dh)
        vals = vals.view(n, nf, self.h, self.dh)
        if self.q is not None and h_user is not None:
            q = self.q(h_user).view(n, 1, self.h, self.dh) + self.q0
        else:
            q = self.q0.view(1, 1, self.h, self.dh)
        att = torch.softmax((keys * q).sum(-1) / math.sqrt(self.dh), dim=1)  # over features
        out = (att.unsqueeze(-1) * vals).sum(1).reshape(n, d)
        return self.out(out)


class FeatureEncoder(nn.Module):
    """h_u(0): two rounds of relational feature attention + GBDT-leaf and structural inputs."""

    def __init__(
        self,
        n_features: int,
        n_struct: int,
        hidden: int,
        heads: int,
        dropout: float,
        use_alpha: bool,
        use_dag: bool,
        leaf_vocab: list[int] | None,
    ):
        super().__init__()
        self.nodes = FeatureNodes(n_features, hidden, use_alpha, use_dag)
        self.att1 = RelationalFeatureAttention(hidden, heads, user_query=False)
        self.att2 = RelationalFeatureAttention(hidden, heads, user_query=True)
        self.struct = nn.Linear(n_struct, hidden) if n_struct else None
        self.leaves = LeafEncoder(leaf_vocab, hidden) if leaf_vocab else None
        self.norm0 = nn.LayerNorm(hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.ff = MLP([hidden, 2 * hidden, hidden], dropout)
        self.drop = nn.Dropout(dropout)
        self._cache: tuple[list[Tensor], list[tuple[int, int]], tuple] | None = None

    def feature_projections(self) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(f, round-1 projections, round-2 projections)``: everything of both attention
        rounds that does not depend on the user (see :meth:`RelationalFeatureAttention.project`).

        In eval mode without autograd the result is computed once and reused until a weight or
        buffer it reads changes (scoring: every user sees the same feature nodes); otherwise it
        is recomputed, so training is untouched.
        """
        if self.training or torch.is_grad_enabled():
            return self._feature_projections()
        nodes = self.nodes
        owners = (nodes, nodes.alpha_proj, nodes.dag_msg, self.att1.obs, self.att1.mis)
        tensors = [  # read from the modules' own dicts: the check costs microseconds per call
            t
            for mod in (*owners, self.att2.obs, self.att2.mis)
            if mod is not None
            for group in (mod._parameters, mod._buffers)
            for t in group.values()
            if t is not None
        ]
        try:  # in-place updates bump the version; .to() / .data swaps move the storage
            versions = [(t._version, t.data_ptr()) for t in tensors]
        except RuntimeError:  # a weight made under inference_mode has no version counter
            return self._feature_projections()
        c = self._cache
        if (
            c is None
            or len(c[0]) != len(tensors)
            or any(a is not b for a, b in zip(c[0], tensors, strict=True))
            or c[1] != versions
        ):
            self._cache = c = (tensors, versions, self._feature_projections())
        return c[2]

    def _feature_projections(self) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        f = self.nodes()
        return f, self.att1.project(f), self.att2.project(f)

    def forward(
        self, z: Tensor, omega: Tensor, struct: Tensor | None, leaves: Tensor | None
    ) -> Tensor:
        f, proj1, proj2 = self.feature_projections()
        h = self.att1(f, z, omega, None, proj1)
        if self.struct is not None and struct is not None:
            h = h + self.struct(struct)
        if self.leaves is not None and leaves is not None:
            h = h + self.leaves(leaves)
        h = self.norm0(h)
        h = self.norm1(h + self.drop(self.att2(f, z, omega, h, proj2)))
        return self.norm2(h + self.drop(self.ff(h)))


class TabularEncoder(nn.Module):
    """The "no graph" encoder: an MLP over ``[z, omega]`` (+ GBDT leaves), same width."""

    def __init__(self, n_features: int, hidden: int, dropout: float, leaf_vocab: list[int] | None):
        super().__init__()
        self.mlp = MLP([2 * n_features, 2 * hidden, hidden], dropout)
        self.leaves = LeafEncoder(leaf_vocab, hidden) if leaf_vocab else None
        self.norm = nn.LayerNorm(hidden)

    def forward(
        self, z: Tensor, omega: Tensor, struct: Tensor | None, leaves: Tensor | None
    ) -> Tensor:
        h = self.mlp(torch.cat([z, omega], dim=-1))
        if self.leaves is not None and leaves is not None:
            h = h + self.leaves(leaves)
        return self.norm(h)


class LeafEncoder(nn.Module):
    """GBDT-leaf encoding (seed 001): one embedding per (tree, leaf), averaged over trees."""

    def __init__(self, leaves_per_tree: list[int], hidden: int):
        super().__init__()
        offsets = torch.tensor([0, *leaves_per_tree[:-1]]).cumsum(0)
        self.register_buffer("offsets", offsets)
        self.emb = nn.EmbeddingBag(int(sum(leaves_per_tree)), hidden, mode="mean")

    def forward(self, leaves: Tensor) -> Tensor:
        return self.emb(leaves.long() + self.offsets)
