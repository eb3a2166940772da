"""The treatment (ZILN density) tower and the outcome (dose-response) tower."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from creditgraph.model.layers import MLP

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class LimitEncoding(nn.Module):
    """Limits to model inputs: ``[1(L > 0), standardized log1p(L / scale)]``.

    The scale and the standardization constants are fitted on the training limits and stored as
    buffers, so scoring uses exactly the training encoding.
    """

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.register_buffer("mean", torch.tensor(0.0))
        self.register_buffer("std", torch.tensor(1.0))

    def fit(self, limits: Tensor) -> None:
        s = torch.log1p(limits.float() / self.scale)
        self.mean = s.mean()
        self.std = s.std().clamp_min(1e-6)

    def log_scaled(self, limits: Tensor) -> Tensor:
        return torch.log1p(limits / self.scale)

    def forward(self, limits: Tensor) -> Tensor:
        s = (self.log_scaled(limits) - self.mean) / self.std
        return torch.stack([(limits > 0).float(), s], dim=-1)


class ZILNTower(nn.Module):
    """Zero-inflated lognormal density of the limit given covariates (RERUM-style, seed 000).

    Outputs ``logit_p`` for P(L > 0 | x) and ``(mu, log_sigma)`` of log(L / scale) given L > 0.
    A binary treatment is the special case where only the Bernoulli head is used.
    """

    def __init__(self, in_dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = MLP([in_dim, 2 * hidden, hidden, 3], dropout)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.net(x)
        return {"logit_p": out[:, 0], "mu": out[:, 1], "log_sigma": out[:, 2].clamp(-4.0, 3.0)}


def ziln_log_density(dens: dict[str, Tensor], limits: Tensor, scale: float) -> Tensor:
    """log f(L | x) under the ZILN model (the density of log(L / scale) for L > 0)."""
    pos = limits > 0
    log_p = F.logsigmoid(dens["logit_p"])
    log_1mp = F.logsigmoid(-dens["logit_p"])
    y = torch.log(limits.clamp_min(1e-6) / scale)
    sigma = dens["log_sigma"].exp()
    ln = -0.5 * ((y - dens["mu"]) / sigma) ** 2 - dens["log_sigma"] - LOG_SQRT_2PI
    return torch.where(pos, log_p + ln, log_1mp)


class MarginalZILN(nn.Module):
    """The covariate-free ZILN (numerator of the stabilized weights), fitted in closed form."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.register_buffer("logit_p", torch.tensor(0.0))
        self.register_buffer("mu", torch.tensor(0.0))
        self.register_buffer("log_sigma", torch.tensor(0.0))

    def fit(self, limits: Tensor) -> None:
        pos = limits > 0
        p = pos.float().mean().clamp(1e-4, 1 - 1e-4)
        self.logit_p = torch.log(p / (1 - p))
        if pos.sum() > 1:
            y = torch.log(limits[pos].float() / self.scale)
            self.mu = y.mean()
            self.log_sigma = y.std().clamp_min(1e-3).log()

    def log_density(self, limits: Tensor) -> Tensor:
        n = limits.shape[0]
        dens = {k: getattr(self, k).expand(n) for k in ("logit_p", "mu", "log_sigma")}
        return ziln_log_density(dens, limits, self.scale)


def ipw_weights(log_num: Tensor, log_den: Tensor, clip: tuple[float, float]) -> Tensor:
    """Stabilized inverse-probability weights f(L) / f(L | x), clipped, normalized to mean 1."""
    w = torch.exp((log_num - log_den).clamp(-20, 20)).clamp(clip[0], clip[1])
    return w / w.mean().clamp_min(1e-12)


def effective_sample_size(w: Tensor) -> float:
    """Kish's ESS as a share of the sample: (sum w)^2 / (n sum w^2)."""
    if w.numel() == 0:
        return float("nan")
    return float(w.sum() ** 2 / (w.numel() * (w**2).sum()).clamp_min(1e-12))


class OutcomeTower(nn.Module):
    """p(default | L) as a varying-coefficient curve in the limit.

    A trunk over ``[h; g; DSL embedding; teacher score]`` gives each user the parameters of a
    curve in ``s = log1p(L / scale)``: an intercept, a step ``1(L > 0)``, ``n_basis`` smooth ramps
    ``sigmoid((s - shift - knot_k) / width_k)`` with knots at quantiles of the training limits, and
    (with ``shift``) a per-user shift of the ramps, so a user with twice the capacity can take a
    limit twice as large for the same risk (risk depends on the limit *relative* to capacity).
    With ``monotone`` the step and ramp coefficients pass through softplus: risk never falls as
    the limit grows, the shape prior every credit policy assumes. A user's whole curve costs one
    trunk pass, whatever the grid.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        dropout: float,
        n_basis: int,
        monotone: bool,
        shift: bool = True,
    ):
        super().__init__()
        self.trunk = MLP([in_dim, 2 * hidden, hidden], dropout)
        self.act = nn.GELU()
        self.n_coef = n_basis + 2
        self.head = nn.Linear(hidden, self.n_coef + (1 if shift else 0))
        self.monotone = monotone
        self.shift = shift
        with torch.no_grad():  # start near a flat curve: small slopes, intercept set from data
            self.head.weight.mul_(0.1)
            self.head.bias.fill_(-2.0 if monotone else 0.0)
            self.head.bias[0] = -2.0
            if shift:
                self.head.bias[-1] = 0.0
        self.register_buffer("knots", torch.linspace(0.0, 5.0, n_basis))
        self.register_buffer("width", torch.full((n_basis,), 5.0 / n_basis))

    def set_base_rate(self, rate: float) -> None:
        """Intercept bias at the logit of the training default rate."""
        r = min(max(rate, 1e-4), 1 - 1e-4)
        with torch.no_grad():
            self.head.bias[0] = float(torch.logit(torch.tensor(r)))

    def set_knots(self, log_limits: Tensor) -> None:
        """Knots at quantiles of log1p(L / scale) over positive training limits."""
        pos = log_limits[log_limits > 0]
        if pos.numel() < 2:
            return
        n = self.knots.numel()
        q = torch.quantile(pos.float(), torch.linspace(0.02, 0.98, n))
        gaps = torch.diff(q, prepend=q[:1] - (q[1:] - q[:-1]).mean())
        self.knots = q
        self.width = gaps.clamp_min(0.05)

    def params(self, x: Tensor) -> Tensor:
        """Per-user curve parameters ``[n, n_basis + 2 (+1 shift)]``."""
        return self._shape(self.head(self.act(self.trunk(x))))

    def thinned_params(self, x: Tensor, masks: Tensor) -> Tensor:
        """Parameters under ``K`` fixed dropout masks of the trunk's hidden layer: ``[K, n, P]``.

        ``masks`` is ``[K, 2 * hidden]`` (already scaled by ``1 / (1 - p)``). The same K thinned
        towers for every user make MC-dropout deterministic and independent of how users are
        batched, so a user's uncertainty is the same online and in batch.
        """
        first, act, _, second = self.trunk
        hidden = act(first(x))  # [n, 2h]
        thinned = hidden.unsqueeze(0) * masks.unsqueeze(1)  # [K, n, 2h]
        return self._shape(self.head(self.act(second(thinned))))

    def _shape(self, c: Tensor) -> Tensor:
        if self.monotone:
            c = torch.cat(
                [c[..., :1], F.softplus(c[..., 1 : self.n_coef]), c[..., self.n_coef :]], dim=-1
            )
        return c

    def _logit(self, params: Tensor, s: Tensor) -> Tensor:
        """``s`` broadcastable to ``[n, ...]``; returns logits of that shape."""
        shift = params[:, self.n_coef].reshape(-1, *([1] * (s.dim() - 1))) if self.shift else 0.0
        coef = params[:, : self.n_coef].reshape(
            params.shape[0], *([1] * (s.dim() - 1)), self.n_coef
        )
        ramps = torch.sigmoid(((s - shift).unsqueeze(-1) - self.knots) / self.width)
        step = (s > 0).float().unsqueeze(-1)
        return coef[..., 0] + coef[..., 1] * step[..., 0] + (coef[..., 2:] * ramps).sum(-1)

    def logit_at(self, params: Tensor, s: Tensor) -> Tensor:
        """Logit at one (log-scaled) limit per user: ``s [n]`` -> ``[n]``."""
        return self._logit(params, s)

    def logit_grid(self, params: Tensor, s_grid: Tensor) -> Tensor:
        """Logits on a shared grid: ``s_grid [G]`` -> ``[n, G]``."""
        return self._logit(params, s_grid.unsqueeze(0).expand(params.shape[0], -1))
