"""Scoring users with a trained model: one code path for evaluation, batch scoring and serving.

A user's result is computed in three steps, and every caller goes through the same functions:

1. :meth:`Inference.first` — from the user's own raw features, limit and structural features:
   the feature encoder's ``h0`` and the interference tokens of hop 0 (``c0``, ``s0``);
2. :meth:`Inference.propagate` (a whole graph, batch) or :meth:`Inference.hop_from_means`
   (one hop from precomputed neighbour means, online) — the tokens of hops ``1..L``;
3. :meth:`Inference.finish` — the cross-attention over the hop tokens, the DSL encoder and the
   teacher prior give the outcome tower's input ``x``; :meth:`Inference.curves` gives
   p(default | do(L)) on any grid and :meth:`Inference.uncertainty` the spread of ``K`` fixed
   thinned towers (MC dropout with masks shared by all users, so a user's uncertainty does not
   depend on how users are batched: the same online and in batch).

Tokens of hops ``>= 1`` depend only on a user's neighbours, never on the user's own features, so
a snapshot stores them per known user and an online request with fresh features recomputes
steps 1 and 3 only; an applicant's hop tokens come from its entities' stored sums
(seed 001's two-stage inference).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from creditgraph.causal.artifacts import PretrainArtifacts
from creditgraph.causal.teacher import Teacher
from creditgraph.graph.features import FeatureStandardizer
from creditgraph.layout import ModelFiles, RunLayout, as_layout
from creditgraph.model.artifact import load_model
from creditgraph.model.dsl import dsl_delta
from creditgraph.model.layers import weighted_mean
from creditgraph.model.net import CreditGraphNet
from creditgraph.model.predict import DSLStats
from creditgraph.model.towers import ziln_log_density
from creditgraph.utils.io import read_json

CHUNK = 16_384


def teacher_logit(teacher: Teacher, raw: np.ndarray) -> np.ndarray:
    """The final teacher's logit on raw features (the prior of every user scored after training)."""
    p = np.clip(teacher.predict_risk(raw), 1e-5, 1 - 1e-5)
    return np.log(p / (1 - p)).astype(np.float32)


@dataclass
class FirstHop:
    """Step 1 for ``n`` users (numpy): ``h0 [n, d]``, hop-0 tokens ``c0``/``s0`` ``[n, d]``."""

    h0: np.ndarray
    c0: np.ndarray
    s0: np.ndarray


@dataclass
class Finished:
    """Step 3 for ``n`` users: tower input ``x``, representation ``rep``, completeness."""

    x: np.ndarray
    rep: np.ndarray
    completeness: np.ndarray


class Inference:
    """A trained model ready to score users from raw features."""

    def __init__(
        self,
        model: CreditGraphNet,
        standardizer: FeatureStandardizer,
        teacher: Teacher | None = None,
        dsl_stats: DSLStats | None = None,
        mc_samples: int | None = None,
        seed: int = 0,
        chunk: int = CHUNK,
    ):
        if model.prior_dim and teacher is None:
            raise ValueError("the model uses the teacher score: a teacher is required")
        self.model = model.eval()
        self.std = standardizer
        self.teacher = teacher
        self.dsl_stats = dsl_stats
        self.chunk = chunk
        itf = model.interference
        self.hops = 0 if itf is None else itf.hops
        self.hidden = model.cfg.hidden
        k = model.cfg.mc_dropout_samples if mc_samples is None else mc_samples
        p = model.cfg.dropout
        gen = torch.Generator().manual_seed(seed)
        width = model.outcome.trunk[0].out_features
        keep = (torch.rand((k, width), generator=gen) >= p).float()
        self.masks = keep / max(1.0 - p, 1e-6)

    @classmethod
    def load(
        cls, run: RunLayout | str | Path, model: ModelFiles | None = None, **kwargs
    ) -> Inference:
        """The run's trained model (or ``model``) with the run's standardization and teacher."""
        run = as_layout(run)
        files = model or run.model
        net, _ = load_model(files)
        graph = read_json(run.graph.manifest)
        std = FeatureStandardizer.from_records(
            read_json(run.graph.feature_stats), clip_z=graph["config"]["clip_z"]
        )
        teacher = PretrainArtifacts.load(run).teacher() if net.prior_dim else None
        return cls(net, std, teacher, DSLStats.load(files), **kwargs)

    # --- shapes --------------------------------------------------------------------------
    @property
    def token_shape(self) -> tuple[int, int, int]:
        """``(2, L, d)``: the two token streams of hops 1..L (or 0..L-1 for entity sums)."""
        return (2, self.hops, self.hidden)

    @property
    def feature_names(self) -> list[str]:
        return list(self.std.names_)

    # --- step 1 ------------------------------------------------------------------------------
    def _inputs(self, raw: np.ndarray) -> dict[str, torch.Tensor | None]:
        z, omega = self.std.transform(raw)
        out: dict[str, torch.Tensor | None] = {
            "z": torch.from_numpy(z),
            "omega": torch.from_numpy(omega.astype(np.float32)),
            "prior": None,
            "leaves": None,
        }
        if self.model.prior_dim:
            out["prior"] = torch.from_numpy(teacher_logit(self.teacher, raw))
        if self.model.spec.leaf_vocab is not None and self.model.cfg.use_leaves:
            out["leaves"] = torch.from_numpy(self.teacher.leaves(raw).astype(np.int64))
        return out

    @torch.no_grad()
    def _h0(self, inp: dict, struct: np.ndarray) -> torch.Tensor:
        m = self.model
        st = torch.from_numpy(np.asarray(struct, np.float32)) if m.uses_struct else None
        return m.encoder(inp["z"], inp["omega"], st, inp["leaves"])

    @torch.no_grad()
    def first(self, raw: np.ndarray, limit: np.ndarray, struct: np.ndarray) -> FirstHop:
        """Step 1 for every row (chunked)."""
        parts = []
        for a in range(0, max(len(raw), 1), self.chunk):
            b = a + self.chunk
            inp = self._inputs(np.asarray(raw[a:b], dtype=np.float64))
            h0 = self._h0(inp, struct[a:b])
            t = torch.from_numpy(np.asarray(limit[a:b], np.float32))
            if self.model.interference is not None:
                c0, s0 = self.model.interference.first_tokens(h0, self.model.limits(t))
            else:
                c0 = s0 = torch.zeros((len(h0), 0))
            parts.append((h0.numpy(), c0.numpy(), s0.numpy()))
        h0, c0, s0 = (np.concatenate([p[i] for p in parts]) for i in range(3))
        return FirstHop(h0, c0, s0)

    # --- step 2 ------------------------------------------------------------------------------
    @torch.no_grad()
    def propagate(
        self, first: FirstHop, src: np.ndarray, dst: np.ndarray, weight: np.ndarray
    ) -> np.ndarray:
        """Tokens of hops 0..L of every user of a graph: ``[n, 2, L + 1, d]`` (float32).

        Sparse weighted means over the directed edges (``src -> dst``), O(edges) memory.
        """
        n = len(first.c0)
        itf = self.model.interference
        out = np.zeros((n, 2, self.hops + 1, self.hidden), np.float32)
        if itf is None:
            return out
        c, s = torch.from_numpy(first.c0), torch.from_numpy(first.s0)
        out[:, 0, 0], out[:, 1, 0] = first.c0, first.s0
        edge_index = torch.from_numpy(np.stack([src, dst]).astype(np.int64))
        w = torch.from_numpy(np.asarray(weight, np.float32))
        for k in range(self.hops):
            cs, wdeg = weighted_mean(torch.cat([c, s], dim=-1), edge_index, w, n)
            c, s = itf.hop_from_mean(k, cs[:, : self.hidden], cs[:, self.hidden :], wdeg)
            out[:, 0, k + 1], out[:, 1, k + 1] = c.numpy(), s.numpy()
        return out

    @torch.no_grad()
    def hop_from_means(
        self, k: int, c_mean: np.ndarray, s_mean: np.ndarray, wdeg: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Hop ``k+1`` tokens from neighbour means of hop ``k`` (an applicant's last layer)."""
        c, s = self.model.interference.hop_from_mean(
            k,
            torch.from_numpy(np.asarray(c_mean, np.float32)),
            torch.from_numpy(np.asarray(s_mean, np.float32)),
            torch.from_numpy(np.asarray(wdeg, np.float32)),
        )
        return c.numpy(), s.numpy()

    # --- step 3 ------------------------------------------------------------------------------
    @torch.no_grad()
    def finish(
        self,
        raw: np.ndarray,
        limit: np.ndarray,
        struct: np.ndarray,
        tokens: np.ndarray,
        h0: np.ndarray | None = None,
    ) -> Finished:
        """Tower inputs from a user's own data and its hop tokens 1..L ``[n, 2, L, d]``.

        ``h0`` may be passed when step 1 already computed it for the same raw features.
        """
        m = self.model
        raw = np.asarray(raw, dtype=np.float64)
        xs, reps, comp = [], [], []
        for a in range(0, max(len(raw), 1), self.chunk):
            b = a + self.chunk
            inp = self._inputs(raw[a:b])
            h = self._h0(inp, struct[a:b]) if h0 is None else torch.from_numpy(h0[a:b])
            if m.interference is not None:
                t = torch.from_numpy(np.asarray(limit[a:b], np.float32))
                c0, s0 = m.interference.first_tokens(h, m.limits(t))
                tok = torch.from_numpy(np.asarray(tokens[a:b], np.float32))
                cs = [c0] + [tok[:, 0, k] for k in range(self.hops)]
                ss = [s0] + [tok[:, 1, k] for k in range(self.hops)]
                hh, g = m.interference.attend(h, cs, ss)
                rep = torch.cat([hh, g], dim=-1)
            else:
                rep = h
            parts = [rep]
            if m.dsl is not None:
                parts.append(
                    m.dsl(dsl_delta(inp["omega"], m.alpha, m.cfg.use_alpha, m.cfg.dsl_alpha))
                )
            if m.prior_dim:
                parts.append(inp["prior"].unsqueeze(-1))
            xs.append(torch.cat(parts, dim=-1).numpy())
            reps.append(rep.numpy())
            comp.append(m.completeness(inp["omega"]).numpy())
        return Finished(np.concatenate(xs), np.concatenate(reps), np.concatenate(comp))

    @torch.no_grad()
    def curves(self, x: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """p(default | do(L)) on ``grid`` for each row of tower inputs ``x``: ``[n, G]``."""
        m = self.model
        params = m.outcome.params(torch.from_numpy(np.asarray(x, np.float32)))
        g = torch.as_tensor(np.asarray(grid, np.float32))
        return torch.sigmoid(m.curve_logits(params, g)).numpy()

    @torch.no_grad()
    def factual(self, x: np.ndarray, limit: np.ndarray) -> np.ndarray:
        """p(default) at each user's own (historical) limit."""
        m = self.model
        params = m.outcome.params(torch.from_numpy(np.asarray(x, np.float32)))
        s = m.limits.log_scaled(torch.from_numpy(np.asarray(limit, np.float32)))
        return torch.sigmoid(m.outcome.logit_at(params, s)).numpy()

    @torch.no_grad()
    def uncertainty(self, x: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Spread over the K thinned towers: ``(prob_std [n], logit_std [n, G])``.

        ``prob_std`` is the std of the curve on ``grid`` averaged over it (the DSL part);
        ``logit_std`` the std of the logit at each grid point (the width of the risk bound).
        """
        m = self.model
        xt = torch.from_numpy(np.asarray(x, np.float32))
        params = m.outcome.thinned_params(xt, self.masks)  # [K, n, P]
        g = torch.as_tensor(np.asarray(grid, np.float32))
        logits = torch.stack([m.curve_logits(p, g) for p in params])  # [K, n, G]
        prob_std = torch.sigmoid(logits).std(0).mean(-1)
        return prob_std.numpy(), logits.std(0).numpy()

    @torch.no_grad()
    def log_density(
        self, raw: np.ndarray, struct: np.ndarray, h0: np.ndarray, limit: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The treatment tower's ``log f(L | x)`` of each user's (logged) limit, and the
        covariate-free ``log f(L)``: the behaviour density off-policy evaluation and stabilized
        inverse-probability weights need (ZILN: a point mass at 0, lognormal above)."""
        m = self.model
        inp = self._inputs(np.asarray(raw, dtype=np.float64))
        parts = [inp["z"], inp["omega"]]
        if m.uses_struct:
            parts.append(torch.from_numpy(np.asarray(struct, np.float32)))
        parts.append(torch.from_numpy(np.asarray(h0, np.float32)))
        dens = m.treatment(torch.cat(parts, dim=-1))
        t = torch.from_numpy(np.asarray(limit, np.float32))
        cond = ziln_log_density(dens, t, m.cfg.limit_scale)
        return cond.double().numpy(), m.marginal.log_density(t).double().numpy()

    def dsl(self, completeness: np.ndarray, rep: np.ndarray, prob_std: np.ndarray) -> np.ndarray:
        """The DSL score in [0, 1] (completeness only without reference statistics)."""
        if self.dsl_stats is None:
            return np.asarray(completeness, dtype=np.float64)
        return self.dsl_stats.score(completeness, rep, prob_std)["dsl_score"]

    @property
    def unc_grid(self) -> np.ndarray:
        """The fixed grid the DSL uncertainty is measured on (stored with the DSL statistics)."""
        return np.asarray(self.dsl_stats.unc_grid) if self.dsl_stats is not None else np.zeros(1)

    # --- a whole graph -----------------------------------------------------------------------
    def score_graph(
        self,
        raw: np.ndarray,
        limit: np.ndarray,
        struct: np.ndarray,
        src: np.ndarray,
        dst: np.ndarray,
        weight: np.ndarray,
        grid: np.ndarray,
        rows: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Every step for a whole graph; outputs for ``rows`` (default all): curves on ``grid``,
        the factual prediction, the DSL score and its parts, the representation and tokens."""
        first = self.first(raw, limit, struct)
        tokens = self.propagate(first, src, dst, weight)
        rows = np.arange(len(raw)) if rows is None else np.asarray(rows)
        fin = self.finish(
            raw[rows], limit[rows], struct[rows], tokens[rows, :, 1:], h0=first.h0[rows]
        )
        prob_std, _ = self.uncertainty(fin.x, self.unc_grid)
        return {
            "rows": rows,
            "curve": self.curves(fin.x, grid),
            "p_factual": self.factual(fin.x, limit[rows]),
            "x": fin.x,
            "rep": fin.rep,
            "completeness": fin.completeness,
            "prob_std": prob_std,
            "dsl": self.dsl(fin.completeness, fin.rep, prob_std),
            "tokens": tokens,
        }
