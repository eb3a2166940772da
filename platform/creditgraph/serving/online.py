"""The second stage of the lambda architecture (seed 001): the last hop and the towers.

A batch job (``creditgraph.serving.embed``) stores, for every user, the interference tokens of
hops 0..L-1 (everything but the last hop), the user's in-neighbours and their edge weights, the
user's record (raw features, observed limit, structural features) and its MC-dropout uncertainty.
:class:`LastHopScorer` then scores any user from its *own* (possibly fresh) features plus the
stored tokens of its one-hop neighbours only: it recomputes the user's hop-0 tokens, aggregates
each neighbour hop once (hop k+1 of the user from hop k of its neighbours), runs the
cross-attention, the DSL encoder and the outcome tower. On unchanged features this is exactly the
full-graph model's output for that user (the batch states are exact, see ``graph.partition``).

Batch scoring and the online service both call this class, so their decisions agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from creditgraph.graph.features import FeatureStandardizer
from creditgraph.model.dsl import dsl_delta
from creditgraph.model.net import CreditGraphNet
from creditgraph.model.predict import DSLStats


@dataclass
class Neighbourhood:
    """The stored one-hop context of a batch of users (concatenated over users)."""

    counts: np.ndarray  # int [b]: in-neighbours per user
    weights: np.ndarray  # float32 [m]: edge weights, users' neighbours in order
    states: np.ndarray  # float32 [m, 2 * L * d]: neighbours' stored tokens of hops 0..L-1

    @classmethod
    def empty(cls, b: int, width: int) -> Neighbourhood:
        return cls(np.zeros(b, np.int64), np.zeros(0, np.float32), np.zeros((0, width), np.float32))


def teacher_prior(teacher, raw: np.ndarray) -> np.ndarray:
    """The final teacher's logit on raw features (the same prior for batch and online scoring)."""
    p = np.clip(teacher.predict_proba(raw), 1e-5, 1 - 1e-5)
    return np.log(p / (1 - p)).astype(np.float32)


class LastHopScorer:
    """Scores users from their own features and their neighbours' stored tokens."""

    def __init__(
        self,
        model: CreditGraphNet,
        standardizer: FeatureStandardizer,
        teacher=None,
        dsl_stats: DSLStats | None = None,
    ):
        self.model = model.eval()
        self.std = standardizer
        self.teacher = teacher
        self.dsl_stats = dsl_stats
        if model.prior_dim and teacher is None:
            raise ValueError("the model uses the teacher score: a teacher is required")
        itf = model.interference
        self.hops = 0 if itf is None else itf.hops
        self.width = 2 * self.hops * model.cfg.hidden

    def _inputs(self, raw: np.ndarray) -> dict[str, torch.Tensor | None]:
        z, omega = self.std.transform(raw)
        out: dict[str, torch.Tensor | None] = {
            "z": torch.from_numpy(z),
            "omega": torch.from_numpy(omega.astype(np.float32)),
            "prior": None,
            "leaves": None,
        }
        if self.model.prior_dim:
            out["prior"] = torch.from_numpy(teacher_prior(self.teacher, raw))
        if self.model.spec.leaf_vocab is not None and self.model.cfg.use_leaves:
            out["leaves"] = torch.from_numpy(self.teacher.leaves(raw).astype(np.int64))
        return out

    @torch.no_grad()
    def encode(
        self, raw: np.ndarray, treatment: np.ndarray, struct: np.ndarray, nbrs: Neighbourhood
    ) -> dict[str, np.ndarray]:
        """Outcome-tower inputs (``x``), the representation and the completeness of each user."""
        m = self.model
        inp = self._inputs(np.asarray(raw, dtype=np.float64))
        b = inp["z"].shape[0]
        st = torch.from_numpy(np.asarray(struct, np.float32)) if m.uses_struct else None
        h0 = m.encoder(inp["z"], inp["omega"], st, inp["leaves"])
        if m.interference is not None:
            rep = self._interference(h0, torch.from_numpy(np.asarray(treatment, np.float32)), nbrs)
        else:
            rep = h0
        parts = [rep]
        if m.dsl is not None:
            parts.append(m.dsl(dsl_delta(inp["omega"], m.alpha, m.cfg.use_alpha, m.cfg.dsl_alpha)))
        if m.prior_dim:
            parts.append(inp["prior"].unsqueeze(-1))
        x = torch.cat(parts, dim=-1)
        assert x.shape[0] == b
        return {
            "x": x.numpy(),
            "rep": rep.numpy(),
            "completeness": m.completeness(inp["omega"]).numpy(),
        }

    def _interference(
        self, h0: torch.Tensor, treatment: torch.Tensor, nbrs: Neighbourhood
    ) -> torch.Tensor:
        itf = self.model.interference
        b, d, hops = h0.shape[0], self.model.cfg.hidden, self.hops
        mn = len(nbrs.weights)
        states = torch.from_numpy(np.asarray(nbrs.states, np.float32)).reshape(mn, 2, hops, d)
        # neighbours sit after the b users; edges run neighbour slot -> its user
        src = torch.arange(b, b + mn)
        dst = torch.from_numpy(np.repeat(np.arange(b), nbrs.counts))
        edge_index = torch.stack([src, dst])
        weight = torch.from_numpy(np.asarray(nbrs.weights, np.float32))
        c, s = itf.first_tokens(h0, self.model.limits(treatment))
        cs, ss = [c], [s]
        for k in range(hops):
            c_all = torch.cat([cs[-1], states[:, 0, k]])
            s_all = torch.cat([ss[-1], states[:, 1, k]])
            c_next, s_next = itf.hop(k, c_all, s_all, edge_index, weight, b + mn)
            cs.append(c_next[:b])
            ss.append(s_next[:b])
        h, g = itf.attend(h0, cs, ss)
        return torch.cat([h, g], dim=-1)

    @torch.no_grad()
    def curves(self, x: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """p(default | do(L)) on ``grid`` for each row of tower inputs ``x``: ``[b, G]``."""
        m = self.model
        params = m.outcome.params(torch.from_numpy(np.asarray(x, np.float32)))
        return torch.sigmoid(
            m.curve_logits(params, torch.as_tensor(np.asarray(grid, np.float32)))
        ).numpy()

    def dsl(self, completeness: np.ndarray, rep: np.ndarray, mc_std: np.ndarray) -> np.ndarray:
        """The DSL score in [0, 1] (completeness only when no reference statistics exist)."""
        if self.dsl_stats is None:
            return completeness
        return self.dsl_stats.score(completeness, rep, mc_std)["dsl_score"]
