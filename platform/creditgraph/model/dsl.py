"""Data structural loss (DSL): where important information is missing.

``delta_uj = (1 - omega_uj) * alpha_j`` (alpha scaled to max |alpha| = 1) is compressed by a 1-D
convolution over the features, ordered topologically along the feature DAG so that neighbouring
positions are causally related features. ``completeness_score`` is the share of total |alpha|
that is missing for a user: the part of the DSL score the training penalty uses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class DSLEncoder(nn.Module):
    def __init__(self, n_features: int, channels: int, out_dim: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv1d(1, channels, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv1d(channels, channels, kernel_size=3, padding=1),
            nn.GELU(),
        )
        self.out = nn.Linear(2 * channels, out_dim)
        self.register_buffer("order", torch.arange(n_features))

    def set_order(self, order: Tensor) -> None:
        self.order = order.long()

    def forward(self, delta: Tensor) -> Tensor:
        x = self.conv(delta[:, self.order].unsqueeze(1))  # [n, C, F]
        return self.out(torch.cat([x.mean(-1), x.amax(-1)], dim=-1))


def dsl_delta(omega: Tensor, alpha: Tensor, use_alpha: bool, weights: str = "signed") -> Tensor:
    """delta_uj = (1 - omega_uj) * w_j with w = alpha, |alpha| or 1 (``weights``, or no alpha)."""
    missing = 1 - omega
    if not use_alpha or weights == "none":
        return missing
    return missing * (alpha if weights == "signed" else alpha.abs())


def completeness_score(omega: Tensor, alpha_abs: Tensor) -> Tensor:
    """Share of the total causal weight |alpha| whose feature is missing, in [0, 1]."""
    w = alpha_abs if float(alpha_abs.sum()) > 0 else torch.ones_like(alpha_abs)
    return ((1 - omega) * w).sum(-1) / w.sum()


def topological_order(n: int, dag: Tensor) -> Tensor:
    """A topological order of the feature DAG (Kahn; ties by index); identity when empty."""
    indeg = [0] * n
    children: list[list[int]] = [[] for _ in range(n)]
    for p, c in dag.t().tolist():
        children[p].append(c)
        indeg[c] += 1
    ready = sorted(i for i in range(n) if indeg[i] == 0)
    order: list[int] = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for c in children[i]:
            indeg[c] -= 1
            if indeg[c] == 0:
                ready.append(c)
        ready.sort()
    if len(order) != n:  # not a DAG: fall back to column order
        return torch.arange(n)
    return torch.tensor(order)
