"""Interference module in the spirit of CauGramer (ICLR 2025), sparse and time-directed.

Two token streams are propagated over the user-user graph for ``hops`` rounds of weighted-mean
message passing (O(edges) memory, never a dense N x N attention):

* context ``c``: neighbours' representations (who you are tied to and what they look like);
* interference ``s``: neighbours' representations *and their limits* (money granted around you).

Each user's own representation then queries its hop-wise tokens by multi-head cross-attention,
so the aggregation over hops is learned rather than fixed to a mean. ``h = h0 + attn(c-tokens)``
is the user embedding; ``g = attn(s-tokens of hops >= 1)`` is the interference representation,
which depends on the neighbours' treatments but not on the user's own (so a counterfactual own
limit leaves ``g`` fixed, as the causal curve requires: peers held at their observed limits).

``hop_states`` exposes the tokens of hops < L for the two-stage (lambda) inference of seed 001:
they are stored per user in batch, and online only the last hop is recomputed from the
requesting user's one-hop neighbours.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from creditgraph.model.layers import weighted_mean


class InterferenceModule(nn.Module):
    def __init__(self, hidden: int, heads: int, hops: int, dropout: float, t_dim: int = 2):
        super().__init__()
        self.hops = hops
        self.ctx_in = nn.Linear(hidden, hidden)
        self.int_in = nn.Linear(hidden + t_dim, hidden)
        self.ctx_hop = nn.ModuleList(nn.Linear(hidden + 1, hidden) for _ in range(hops))
        self.int_hop = nn.ModuleList(nn.Linear(hidden + 1, hidden) for _ in range(hops))
        self.hop_emb = nn.Parameter(torch.randn(hops + 1, hidden) * 0.1)
        self.attn_ctx = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.attn_int = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.act = nn.GELU()

    def first_tokens(self, h0: Tensor, t_enc: Tensor) -> tuple[Tensor, Tensor]:
        return self.act(self.ctx_in(h0)), self.act(self.int_in(torch.cat([h0, t_enc], dim=-1)))

    def hop(
        self, k: int, c: Tensor, s: Tensor, edge_index: Tensor, edge_weight: Tensor, n: int
    ) -> tuple[Tensor, Tensor]:
        """Hop ``k+1`` tokens of every target from hop-``k`` tokens of its in-neighbours."""
        cs, wdeg = weighted_mean(torch.cat([c, s], dim=-1), edge_index, edge_weight, n)
        c_agg, s_agg = cs.split(c.shape[-1], dim=-1)
        return self.hop_from_mean(k, c_agg, s_agg, wdeg)

    def hop_from_mean(
        self, k: int, c_mean: Tensor, s_mean: Tensor, wdeg: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Hop ``k+1`` tokens from the weighted means of the in-neighbours' hop-``k`` tokens and
        the total incoming weight (zeros for a user without neighbours). An applicant's means
        come from its entities' stored sums: the last layer of seed 001's two-stage inference."""
        deg = torch.log1p(wdeg).unsqueeze(-1)
        c_next = self.act(self.ctx_hop[k](torch.cat([c_mean, deg], dim=-1)))
        s_next = self.act(self.int_hop[k](torch.cat([s_mean, deg], dim=-1)))
        return c_next, s_next

    def hop_states(
        self, h0: Tensor, t_enc: Tensor, edge_index: Tensor, edge_weight: Tensor
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Tokens of hops 0..L for every node: ``([c0..cL], [s0..sL])``."""
        n = h0.shape[0]
        c, s = self.first_tokens(h0, t_enc)
        cs, ss = [c], [s]
        for k in range(self.hops):
            c, s = self.hop(k, c, s, edge_index, edge_weight, n)
            cs.append(c)
            ss.append(s)
        return cs, ss

    def attend(self, h0: Tensor, cs: list[Tensor], ss: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Cross-attention of each user's h0 over its hop tokens -> (h, g)."""
        q = h0.unsqueeze(1)
        ctx = torch.stack(cs, dim=1) + self.hop_emb
        itf = torch.stack(ss[1:], dim=1) + self.hop_emb[1:]
        h = self.norm(h0 + self.attn_ctx(q, ctx, ctx, need_weights=False)[0].squeeze(1))
        g = self.attn_int(q, itf, itf, need_weights=False)[0].squeeze(1)
        return h, g

    def forward(
        self, h0: Tensor, t_enc: Tensor, edge_index: Tensor, edge_weight: Tensor
    ) -> tuple[Tensor, Tensor]:
        cs, ss = self.hop_states(h0, t_enc, edge_index, edge_weight)
        return self.attend(h0, cs, ss)
