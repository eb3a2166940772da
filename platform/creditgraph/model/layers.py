"""Small building blocks shared by the model's modules."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter


class MLP(nn.Sequential):
    """Linear-GELU-dropout stack ending in a linear layer."""

    def __init__(self, dims: list[int], dropout: float = 0.0):
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers += [nn.GELU(), nn.Dropout(dropout)]
        super().__init__(*layers)


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.scale * grad, None


def grad_reverse(x: Tensor, scale: float) -> Tensor:
    """Identity forward, gradient multiplied by ``-scale`` backward (min-max in one optimizer)."""
    return _Reverse.apply(x, scale)


def weighted_mean(
    x: Tensor, edge_index: Tensor, edge_weight: Tensor, n: int
) -> tuple[Tensor, Tensor]:
    """Weighted mean of source features at each target; returns (mean, total incoming weight).

    Sparse: O(edges) memory. Targets without incoming edges get zeros.
    """
    src, dst = edge_index
    w = edge_weight.unsqueeze(-1)
    total = scatter(edge_weight, dst, dim=0, dim_size=n, reduce="sum")
    s = scatter(x[src] * w, dst, dim=0, dim_size=n, reduce="sum")
    return s / total.clamp_min(1e-12).unsqueeze(-1), total
