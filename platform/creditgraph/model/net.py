"""CreditGraphNet: feature encoder -> interference module -> DSL -> treatment and outcome towers."""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from creditgraph.model.batch import GraphBatch
from creditgraph.model.config import ModelConfig
from creditgraph.model.dsl import DSLEncoder, completeness_score, dsl_delta, topological_order
from creditgraph.model.encoder import FeatureEncoder, TabularEncoder
from creditgraph.model.interference import InterferenceModule
from creditgraph.model.layers import MLP, grad_reverse
from creditgraph.model.towers import LimitEncoding, MarginalZILN, OutcomeTower, ZILNTower


class ModelSpec(BaseModel):
    """Input dimensions fixed by the data (saved with the model to rebuild it for scoring)."""

    n_features: int
    n_struct: int
    feature_names: list[str]
    struct_names: list[str]
    leaf_vocab: list[int] | None = None


class CreditGraphNet(nn.Module):
    """The three-head model of seed 000 (density, outcome, DSL) on the user heterograph."""

    def __init__(self, cfg: ModelConfig, spec: ModelSpec):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        d, nf = cfg.hidden, spec.n_features
        leaf_vocab = spec.leaf_vocab if cfg.use_leaves else None
        if cfg.use_graph:
            self.encoder: nn.Module = FeatureEncoder(
                nf, spec.n_struct, d, cfg.heads, cfg.dropout, cfg.use_alpha, cfg.use_dag, leaf_vocab
            )
        else:
            self.encoder = TabularEncoder(nf, d, cfg.dropout, leaf_vocab)
        self.interference = (
            InterferenceModule(d, cfg.heads, cfg.hops, cfg.dropout)
            if cfg.use_graph and cfg.use_interference
            else None
        )
        self.dsl_dim = max(4, d // 4) if cfg.use_dsl else 0
        self.dsl = DSLEncoder(nf, cfg.dsl_channels, self.dsl_dim) if cfg.use_dsl else None
        self.rep_dim = d + (d if self.interference is not None else 0)
        self.prior_dim = 1 if cfg.use_teacher_score else 0
        self.outcome = OutcomeTower(
            self.rep_dim + self.dsl_dim + self.prior_dim,
            d,
            cfg.dropout,
            cfg.n_basis,
            cfg.monotone,
            cfg.capacity_shift,
        )
        self.uses_struct = cfg.use_graph
        dens_in = 2 * nf + (spec.n_struct if self.uses_struct else 0) + d
        self.treatment = ZILNTower(dens_in, d, cfg.dropout)
        self.marginal = MarginalZILN(cfg.limit_scale)
        self.limits = LimitEncoding(cfg.limit_scale)
        self.adversary = MLP([self.rep_dim, d, 2], cfg.dropout) if cfg.balance_weight > 0 else None
        self.register_buffer("alpha", torch.zeros(nf))

    # --- state fitted from data before training ---------------------------------------------
    def fit_buffers(self, train_limits: Tensor, train_outcomes: Tensor | None = None) -> None:
        """Limit encoding, marginal density, curve knots and base rate from the training data."""
        if train_outcomes is not None and torch.isfinite(train_outcomes).any():
            self.outcome.set_base_rate(float(train_outcomes[torch.isfinite(train_outcomes)].mean()))
        self.limits.fit(train_limits)
        self.marginal.fit(train_limits)
        self.outcome.set_knots(self.limits.log_scaled(train_limits))

    def set_causal(self, alpha: Tensor | None, dag: Tensor | None) -> None:
        """Attach frozen pretraining outputs: alpha_j on feature nodes, the feature DAG."""
        if alpha is not None and self.cfg.use_alpha:  # without alpha, DSL weighs features equally
            self.alpha = alpha.float() / alpha.abs().max().clamp_min(1e-12)
            alpha = self.alpha
        else:
            alpha = None
        if isinstance(self.encoder, FeatureEncoder):
            self.encoder.nodes.set_causal(alpha, dag if self.cfg.use_dag else None)
        if self.dsl is not None and dag is not None:
            self.dsl.set_order(topological_order(self.spec.n_features, dag.reshape(2, -1)))

    def load_full_state(self, state: dict[str, Tensor]) -> None:
        """``load_state_dict`` that first adopts buffers whose shape depends on the data (the DAG)."""
        for name, value in state.items():
            module, _, attr = name.rpartition(".")
            owner = self.get_submodule(module) if module else self
            current = owner._buffers.get(attr)
            if current is not None and current.shape != value.shape:
                owner._buffers[attr] = value.clone()
        self.load_state_dict(state)

    # --- forward --------------------------------------------------------------------------
    def encode_h0(self, batch: GraphBatch) -> Tensor:
        struct = batch.struct if self.uses_struct else None
        return self.encoder(batch.z, batch.omega, struct, batch.leaves)

    def represent(self, batch: GraphBatch, h0: Tensor | None = None) -> dict[str, Tensor]:
        """h0, h, g and the DSL embedding of every node of the batch."""
        h0 = self.encode_h0(batch) if h0 is None else h0
        if self.interference is not None:
            h, g = self.interference(
                h0, self.limits(batch.treatment), batch.edge_index, batch.edge_weight
            )
            rep = torch.cat([h, g], dim=-1)
        else:
            rep = h0
        out = {"h0": h0, "rep": rep}
        if self.dsl is not None:
            out["dsl"] = self.dsl(
                dsl_delta(batch.omega, self.alpha, self.cfg.use_alpha, self.cfg.dsl_alpha)
            )
        if self.prior_dim:
            if batch.prior is None:
                raise ValueError("this model uses the teacher score: the batch needs `prior`")
            out["prior"] = batch.prior.unsqueeze(-1)
        return out

    def coefficients(self, reps: dict[str, Tensor]) -> Tensor:
        """Per-user curve parameters of the outcome tower."""
        parts = [reps["rep"]] + [reps[k] for k in ("dsl", "prior") if k in reps]
        return self.outcome.params(torch.cat(parts, dim=-1))

    def density(self, batch: GraphBatch, h0: Tensor) -> dict[str, Tensor]:
        parts = (
            [batch.z, batch.omega] + ([batch.struct] if self.uses_struct else []) + [h0.detach()]
        )
        return self.treatment(torch.cat(parts, dim=-1))

    def forward(self, batch: GraphBatch) -> dict[str, Tensor]:
        reps = self.represent(batch)
        coef = self.coefficients(reps)
        out = {
            "logit": self.outcome.logit_at(coef, self.limits.log_scaled(batch.treatment)),
            "coef": coef,
            "density": self.density(batch, reps["h0"]),
            **reps,
        }
        if self.adversary is not None:
            out["adversary"] = self.adversary(grad_reverse(reps["rep"], self.cfg.balance_weight))
        return out

    def curve_logits(self, coef: Tensor, grid: Tensor) -> Tensor:
        """Logits of p(default | do(L)) for every user and every limit of ``grid``: ``[n, G]``."""
        return self.outcome.logit_grid(coef, self.limits.log_scaled(grid))

    def completeness(self, omega: Tensor) -> Tensor:
        return completeness_score(omega, self.alpha.abs())
