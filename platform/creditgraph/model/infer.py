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

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from creditgraph.causal.artifacts import PretrainArtifacts
from creditgraph.causal.teacher import Teacher
from creditgraph.graph.features import FeatureStandardizer
from creditgraph.layout import ModelFiles, RunLayout, as_layout
from creditgraph.model.artifact import load_model
from creditgraph.model.dsl import dsl_delta
from creditgraph.model.encoder import FeatureEncoder, RelationalFeatureAttention
from creditgraph.model.layers import weighted_mean
from creditgraph.model.net import CreditGraphNet
from creditgraph.model.predict import DSLStats
from creditgraph.model.towers import ziln_log_density
from creditgraph.utils.io import read_json

# users per chunk: the widest intermediate ([K + 1 towers, chunk, grid, basis] float32) stays
# within a few MiB of cache; larger chunks were slower per user, smaller ones pay Python overhead
CHUNK = 2048
TOWER_ROWS = 2048  # (towers x users) per chunk of the curve logits: [rows, grid] stays in L2
SMALL_BATCH = 32  # up to this many users, the NumPy layers (_SmallBatch) score them
SMALL_LOGITS = 65_536  # up to this many ramp values, the curve logits take one broadcast
ROW_PREDICT_MAX = 16  # up to this many rows, the teacher predicts row by row (online requests)


def teacher_logit(
    teacher: Teacher, raw: np.ndarray, rows: _RowPredictor | None = None
) -> np.ndarray:
    """The final teacher's logit on raw features (the prior of every user scored after training).

    ``rows`` predicts a few rows through LightGBM's single-row interface (the same trees and
    numbers, without the per-call set-up of ``Booster.predict``)."""
    if rows is not None and len(raw) <= ROW_PREDICT_MAX:
        risk = rows.predict(raw)
    else:
        risk = teacher.predict_risk(raw)
    p = np.clip(risk, 1e-5, 1 - 1e-5)
    return np.log(p / (1 - p)).astype(np.float32)


class _RowPredictor:
    """LightGBM's ``LGBM_BoosterPredictForMatSingleRowFast`` for a booster: a prediction
    configuration made once, then one C call per row (tens of microseconds, where
    ``Booster.predict`` sets up a predictor and its thread pool on every call: milliseconds on
    a busy machine, most of an online request's budget). Returns what ``predict`` returns:
    rows go in as float32 (the teacher's input type) and the normal (probability) output."""

    def __init__(self, booster, n_features: int):
        import ctypes
        import threading
        import weakref

        from lightgbm import basic

        self._ct, self._lib, self._call = ctypes, basic._LIB, basic._safe_call
        self.booster = booster  # the configuration reads the booster's trees: keep it alive
        self.n_features = n_features
        handle = ctypes.c_void_p()
        self._call(
            self._lib.LGBM_BoosterPredictForMatSingleRowFastInit(
                booster._handle,
                ctypes.c_int(0),  # C_API_PREDICT_NORMAL
                ctypes.c_int(0),  # start iteration
                ctypes.c_int(booster.best_iteration),  # as Booster.predict's default
                ctypes.c_int(0),  # C_API_DTYPE_FLOAT32
                ctypes.c_int32(n_features),
                basic._c_str("num_threads=1"),
                ctypes.byref(handle),
            )
        )
        self._handle = handle
        self._lock = threading.Lock()  # the configuration's buffers are shared by calls
        weakref.finalize(self, self._lib.LGBM_FastConfigFree, handle)

    @classmethod
    def for_teacher(cls, teacher: Teacher | None) -> _RowPredictor | None:
        """The teacher's row predictor, or None where LightGBM's interface is unavailable."""
        try:
            return cls(teacher.final_model_, int(teacher.n_features_in_))
        except Exception:  # an older LightGBM or another booster: Booster.predict serves
            return None

    def predict(self, raw: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(raw, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} columns, got {x.shape}")
        ct = self._ct
        out = np.zeros(len(x), np.float64)
        one = np.zeros(1, np.float64)
        size = ct.c_int64(0)
        one_ptr = one.ctypes.data_as(ct.POINTER(ct.c_double))
        with self._lock:
            for i in range(len(x)):
                self._call(
                    self._lib.LGBM_BoosterPredictForMatSingleRowFast(
                        self._handle, x[i].ctypes.data_as(ct.c_void_p), ct.byref(size), one_ptr
                    )
                )
                out[i] = one[0]
        return out


@dataclass
class FirstHop:
    """Step 1 for ``n`` users (numpy): ``h0 [n, d]``, hop-0 tokens ``c0``/``s0`` ``[n, d]``."""

    h0: np.ndarray
    c0: np.ndarray
    s0: np.ndarray


@dataclass
class TowerOutputs:
    """The outcome tower for ``n`` users on a grid of ``G`` limits (numpy float32)."""

    curves: np.ndarray  # [n, G]
    factual: np.ndarray | None  # [n], at each user's own limit
    prob_std: np.ndarray  # [n], the DSL uncertainty part
    logit_std: np.ndarray  # [n, G]


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
        self._grids: dict[bytes, tuple] = {}
        self._rounds: tuple[tuple, tuple] | None = None
        self._rows = _RowPredictor.for_teacher(teacher) if model.prior_dim else None
        itf_ok = model.interference is None or all(
            _plain(a) for a in (model.interference.attn_ctx, model.interference.attn_int)
        )
        self._small_ok = (
            isinstance(model.encoder, FeatureEncoder) and model.encoder.leaves is None and itf_ok
        )
        self._small_layers: _SmallBatch | None = None

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
    def _inputs_np(self, raw: np.ndarray) -> dict[str, np.ndarray | None]:
        z, omega = self.std.transform(raw)
        out: dict[str, np.ndarray | None] = {
            "z": z,
            "omega": omega.astype(np.float32),
            "prior": None,
            "leaves": None,
        }
        if self.model.prior_dim:
            out["prior"] = teacher_logit(self.teacher, raw, self._rows)
        if self.model.spec.leaf_vocab is not None and self.model.cfg.use_leaves:
            out["leaves"] = self.teacher.leaves(raw).astype(np.int64)
        return out

    def _inputs(self, raw: np.ndarray) -> dict[str, torch.Tensor | None]:
        return {
            k: None if v is None else torch.from_numpy(v) for k, v in self._inputs_np(raw).items()
        }

    def _small(self, n: int) -> _SmallBatch | None:
        """The NumPy layers for ``n`` users when ``n`` is small and the model has them (made
        from the weights at the first call: an Inference scores a trained, frozen model)."""
        if n > SMALL_BATCH or not self._small_ok:
            return None
        if self._small_layers is None:
            with torch.inference_mode():
                self._small_layers = _SmallBatch(self, self._feature_rounds(self.model.encoder))
        return self._small_layers

    @torch.inference_mode()
    def _h0(self, inp: dict, struct: np.ndarray) -> torch.Tensor:
        m = self.model
        st = torch.from_numpy(np.asarray(struct, np.float32)) if m.uses_struct else None
        if isinstance(m.encoder, FeatureEncoder):
            rounds = self._feature_rounds(m.encoder)
            return _encode_h0(m.encoder, rounds, inp["z"], inp["omega"], st, inp["leaves"])
        return m.encoder(inp["z"], inp["omega"], st, inp["leaves"])

    def _feature_rounds(self, enc: FeatureEncoder) -> tuple:
        """Each attention round's constants (:func:`_round_constants`), derived from the
        encoder's cached feature projections and rebuilt only when those change."""
        proj = enc.feature_projections()
        if self._rounds is None or self._rounds[0] is not proj:
            consts = (
                _round_constants(enc.att1, proj[1]),
                _round_constants(enc.att2, proj[2]),
            )
            self._rounds = (proj, consts)
        return self._rounds[1]

    def _first_tokens(self, h0: Tensor, limit: np.ndarray) -> tuple[Tensor, Tensor]:
        m = self.model
        t = torch.from_numpy(np.asarray(limit, np.float32))
        return m.interference.first_tokens(h0, m.limits(t))

    def first(self, raw: np.ndarray, limit: np.ndarray, struct: np.ndarray) -> FirstHop:
        """Step 1 for every row (chunked)."""
        raw = np.asarray(raw, dtype=np.float64)
        n, d = len(raw), self.hidden
        itf = self.model.interference is not None
        small = self._small(n)
        if small is not None:
            inp = self._inputs_np(raw)
            h0 = small.h0(inp["z"], inp["omega"], np.asarray(struct, np.float32))
            if not itf:
                return FirstHop(h0, np.zeros((n, 0), np.float32), np.zeros((n, 0), np.float32))
            return FirstHop(h0, *small.first_tokens(h0, limit))
        h0 = np.empty((n, d), np.float32)
        c0 = np.empty((n, d if itf else 0), np.float32)
        s0 = np.empty((n, d if itf else 0), np.float32)
        with torch.inference_mode():
            self._first_chunks(raw, limit, struct, h0, c0, s0)
        return FirstHop(h0, c0, s0)

    def _first_chunks(self, raw, limit, struct, h0, c0, s0) -> None:
        n, itf = len(raw), self.model.interference is not None
        for a in range(0, n, self.chunk):
            b = min(a + self.chunk, n)
            h = self._h0(self._inputs(raw[a:b]), struct[a:b])
            h0[a:b] = h.numpy()
            if itf:
                c, s = self._first_tokens(h, limit[a:b])
                c0[a:b], s0[a:b] = c.numpy(), s.numpy()

    # --- step 2 ------------------------------------------------------------------------------
    @torch.inference_mode()
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

    def hop_from_means(
        self, k: int, c_mean: np.ndarray, s_mean: np.ndarray, wdeg: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Hop ``k+1`` tokens from neighbour means of hop ``k`` (an applicant's last layer)."""
        small = self._small(len(c_mean))
        if small is not None:
            return small.hop_from_mean(k, c_mean, s_mean, wdeg)
        with torch.inference_mode():
            c, s = self.model.interference.hop_from_mean(
                k,
                torch.from_numpy(np.asarray(c_mean, np.float32)),
                torch.from_numpy(np.asarray(s_mean, np.float32)),
                torch.from_numpy(np.asarray(wdeg, np.float32)),
            )
        return c.numpy(), s.numpy()

    def tokens_from_means(self, means: np.ndarray, wdeg: np.ndarray) -> np.ndarray:
        """Hop tokens 1..L ``[n, 2, L, d]`` from the weighted means of the in-neighbours' tokens
        of hops 0..L-1 ``[n, 2, L, d]`` and the total incoming weight (:meth:`hop_from_means`
        for every hop)."""
        n = len(means)
        out = np.zeros((n, 2, self.hops, self.hidden), np.float32)
        for k in range(self.hops):
            out[:, 0, k], out[:, 1, k] = self.hop_from_means(
                k, means[:, 0, k], means[:, 1, k], wdeg
            )
        return out

    # --- step 3 ------------------------------------------------------------------------------
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
        n = len(raw)
        rep_dim = m.rep_dim
        x = np.empty((n, rep_dim + m.dsl_dim + m.prior_dim), np.float32)
        comp = np.empty(n, np.float32)
        small = self._small(n)
        if small is not None:
            self._finish_small(small, raw, limit, struct, tokens, h0, x, comp)
        else:
            with torch.inference_mode():
                self._finish_chunks(raw, limit, struct, tokens, h0, x, comp)
        return Finished(x, x[:, :rep_dim], comp)

    def _finish_chunks(self, raw, limit, struct, tokens, h0, x, comp) -> None:
        m, n, rep_dim = self.model, len(raw), self.model.rep_dim
        for a in range(0, n, self.chunk):
            b = min(a + self.chunk, n)
            inp = self._inputs(raw[a:b])
            h = self._h0(inp, struct[a:b]) if h0 is None else torch.from_numpy(h0[a:b])
            if m.interference is not None:
                c0, s0 = self._first_tokens(h, limit[a:b])
                tok = torch.from_numpy(np.asarray(tokens[a:b], np.float32))
                hh, g = _attend(m.interference, h, c0, s0, tok)
                x[a:b, : self.hidden] = hh.numpy()
                x[a:b, self.hidden : rep_dim] = g.numpy()
            else:
                x[a:b, :rep_dim] = h.numpy()
            col = rep_dim
            if m.dsl is not None:
                delta = dsl_delta(inp["omega"], m.alpha, m.cfg.use_alpha, m.cfg.dsl_alpha)
                x[a:b, col : col + m.dsl_dim] = m.dsl(delta).numpy()
                col += m.dsl_dim
            if m.prior_dim:
                x[a:b, col] = inp["prior"].numpy()
            comp[a:b] = m.completeness(inp["omega"]).numpy()

    def _finish_small(self, small, raw, limit, struct, tokens, h0, x, comp) -> None:
        m = self.model
        inp = self._inputs_np(raw)
        if h0 is None:
            h = small.h0(inp["z"], inp["omega"], np.asarray(struct, np.float32))
        else:
            h = np.asarray(h0, np.float32)
        d, rep_dim = self.hidden, m.rep_dim
        if m.interference is not None:
            c0, s0 = small.first_tokens(h, limit)
            x[:, :d], x[:, d:rep_dim] = small.attend(h, c0, s0, np.asarray(tokens, np.float32))
        else:
            x[:, :rep_dim] = h
        col = rep_dim
        if m.dsl is not None:
            x[:, col : col + m.dsl_dim] = small.dsl_embedding(inp["omega"])
            col += m.dsl_dim
        if m.prior_dim:
            x[:, col] = inp["prior"]
        comp[:] = small.completeness(inp["omega"])

    # --- the outcome tower -------------------------------------------------------------------
    def _log_grid(self, *grids: np.ndarray | None) -> tuple:
        """The grids' limits log-scaled and concatenated ``s [G]``, and the ramps' arguments at
        them ``[B, G]`` (:func:`_curve_logits`), computed once per grid: as tensors, then the
        same as arrays."""
        arrays = [np.asarray(g, np.float32) for g in grids if g is not None]
        key = b"|".join(a.tobytes() for a in arrays)
        got = self._grids.get(key)
        if got is None:
            tower = self.model.outcome
            s = self.model.limits.log_scaled(torch.from_numpy(np.concatenate(arrays)))
            arg = ((s.unsqueeze(-1) - tower.knots) / tower.width).T.contiguous()
            if len(self._grids) > 16:
                self._grids.clear()
            self._grids[key] = got = (s, arg, s.numpy(), arg.numpy())
        return got

    def _params(self, x: Tensor, thinned: bool) -> Tensor:
        """Curve parameters ``[1 (+ K), n, P]``: the tower itself, then its K thinned copies
        (the hidden layer is computed once for all of them)."""
        tower = self.model.outcome
        first, act, _, second = tower.trunk
        hidden = act(first(x))  # [n, 2h]
        if thinned:
            hidden = torch.cat([hidden.unsqueeze(0), hidden.unsqueeze(0) * self.masks.unsqueeze(1)])
        else:
            hidden = hidden.unsqueeze(0)
        return tower._shape(tower.head(tower.act(second(hidden))))

    def tower_outputs(
        self,
        x: np.ndarray,
        grid: np.ndarray,
        limit: np.ndarray | None = None,
        unc_grid: np.ndarray | None = None,
    ) -> TowerOutputs:
        """Everything the outcome tower gives, in one pass per chunk: the curves on ``grid``,
        the factual risk at ``limit`` (when given), and the thinned towers' spread: the std of
        the logit on ``grid`` and the std of the curve on ``unc_grid`` (default ``grid``)
        averaged over it. Equal (to float rounding) to :meth:`curves`, :meth:`factual` and
        :meth:`uncertainty` called one by one."""
        x = np.asarray(x, np.float32)
        n = len(x)
        gsize = len(grid)
        s_all = self._log_grid(grid, unc_grid)
        small = self._small(n)
        if small is not None:
            params = small.params(x, thinned=True)  # [1 + K, n, P]
            k1, _, p = params.shape
            logits = small.logits(params.reshape(k1 * n, p), *s_all[2:]).reshape(k1, n, -1)
            spread = logits[1:]
            unc = spread if unc_grid is None else spread[:, :, gsize:]
            factual = None
            if limit is not None:
                s_lim = np.log1p(np.asarray(limit, np.float32) / np.float32(small.limit_scale))
                factual = _expit(small.logit_at(params[0], s_lim))
            return TowerOutputs(
                curves=_expit(logits[0, :, :gsize]),
                factual=factual,
                prob_std=_np_std0(_expit(unc)).mean(-1),
                logit_std=_np_std0(spread[:, :, :gsize]),
            )
        curves = np.empty((n, gsize), np.float32)
        logit_std = np.empty((n, gsize), np.float32)
        prob_std = np.empty(n, np.float32)
        factual = None if limit is None else np.empty(n, np.float32)
        with torch.inference_mode():
            self._tower_chunks(
                x, s_all[:2], gsize, limit, unc_grid is None, curves, factual, prob_std, logit_std
            )
        return TowerOutputs(curves, factual, prob_std, logit_std)

    def _tower_chunks(
        self, x, s_all, gsize, limit, same_grid, curves, factual, prob_std, logit_std
    ) -> None:
        n = len(x)
        step = max(1, TOWER_ROWS // (1 + len(self.masks)))
        for a in range(0, n, step):
            b = min(a + step, n)
            params = self._params(torch.from_numpy(x[a:b]), thinned=True)  # [1 + K, m, P]
            k1, m_, p = params.shape
            logits = _curve_logits(self.model.outcome, params.reshape(k1 * m_, p), *s_all)
            logits = logits.view(k1, m_, -1)
            curves[a:b] = torch.sigmoid(logits[0, :, :gsize]).numpy()
            spread = logits[1:]
            logit_std[a:b] = _std0(spread[..., :gsize]).numpy()
            unc = spread if same_grid else spread[..., gsize:]
            prob_std[a:b] = _std0(torch.sigmoid(unc)).mean(-1).numpy()
            if factual is not None:
                s = self.model.limits.log_scaled(
                    torch.from_numpy(np.asarray(limit[a:b], np.float32))
                )
                factual[a:b] = torch.sigmoid(self.model.outcome.logit_at(params[0], s)).numpy()

    @torch.inference_mode()
    def curves(self, x: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """p(default | do(L)) on ``grid`` for each row of tower inputs ``x``: ``[n, G]``."""
        x = np.asarray(x, np.float32)
        s_grid = self._log_grid(grid)
        out = np.empty((len(x), len(grid)), np.float32)
        for a in range(0, len(x), TOWER_ROWS):
            b = min(a + TOWER_ROWS, len(x))
            params = self._params(torch.from_numpy(x[a:b]), thinned=False)[0]
            out[a:b] = torch.sigmoid(_curve_logits(self.model.outcome, params, *s_grid[:2])).numpy()
        return out

    @torch.inference_mode()
    def factual(self, x: np.ndarray, limit: np.ndarray) -> np.ndarray:
        """p(default) at each user's own (historical) limit."""
        m = self.model
        params = self._params(torch.from_numpy(np.asarray(x, np.float32)), thinned=False)[0]
        s = m.limits.log_scaled(torch.from_numpy(np.asarray(limit, np.float32)))
        return torch.sigmoid(m.outcome.logit_at(params, s)).numpy()

    def uncertainty(
        self, x: np.ndarray, grid: np.ndarray, unc_grid: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Spread over the K thinned towers: ``(prob_std [n], logit_std [n, G])``.

        ``prob_std`` is the std of the curve on ``unc_grid`` (default: ``grid``) averaged over it
        (the DSL part); ``logit_std`` the std of the logit at each point of ``grid`` (the width of
        the risk bound). One pass of the K towers serves both grids.
        """
        out = self.tower_outputs(x, grid, unc_grid=unc_grid)
        return out.prob_std, out.logit_std

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
        out = self.tower_outputs(fin.x, grid, limit[rows], unc_grid=self.unc_grid)
        return {
            "rows": rows,
            "curve": out.curves,
            "p_factual": out.factual,
            "x": fin.x,
            "rep": fin.rep,
            "completeness": fin.completeness,
            "prob_std": out.prob_std,
            "dsl": self.dsl(fin.completeness, fin.rep, out.prob_std),
            "tokens": tokens,
        }


# --- eval-mode arithmetic of the model's modules --------------------------------------------
# The functions below compute what the modules' forward passes compute (dropout off), grouped so
# that one user costs a few small matrix products instead of many passes over [n, F, d] tensors:
# equal to the forward passes up to float rounding (tested against them).


def _round_constants(att: RelationalFeatureAttention, proj: tuple[Tensor, ...]) -> tuple:
    """What one round of feature attention needs besides the users' data: the feature nodes'
    keys ``[h, dh, 3F]`` (scaled by ``1 / sqrt(dh)``) and values ``[h, 3F, dh]`` of the three
    terms (observed, observed times z, missing), and for a round without a user query its
    constant scores ``[h, 1, 3F]``."""
    k1, k2, v1, v2, km, vm = proj
    nf = k1.shape[0]
    h, dh = att.h, att.dh
    keys = torch.cat([k1, k2, km]).view(3 * nf, h, dh).permute(1, 2, 0) / math.sqrt(dh)
    vals = torch.cat([v1, v2, vm]).view(3 * nf, h, dh).transpose(0, 1).contiguous()
    const = None if att.q is not None else torch.bmm(att.q0.unsqueeze(1), keys)
    return keys.contiguous(), vals, const


def _feature_round(
    att: RelationalFeatureAttention,
    consts: tuple,
    z: Tensor,
    observed: Tensor,
    h_user: Tensor | None,
) -> Tensor:
    """One round of relational feature attention for ``n`` users (``z``, ``observed``:
    ``[1, n, F]``).

    The score of feature j is ``q . (k1_j + z_j k2_j)`` when observed and ``q . km_j`` when
    missing, so per head it needs only ``q . k1``, ``q . k2``, ``q . km``: one product of the
    queries with the feature nodes' keys; the output is one product of the attention weights
    (split by relation) with the values.
    """
    keys, vals, const = consts
    nf = z.shape[-1]
    n = z.shape[-2]
    if const is None and h_user is not None:
        q = (att.q(h_user).view(n, att.h, att.dh) + att.q0).transpose(0, 1)  # [h, n, dh]
        a = torch.bmm(q, keys)  # [h, n, 3F]
    else:
        a = const if const is not None else torch.bmm(att.q0.unsqueeze(1), keys)
    a_obs, a_z, a_mis = a.split(nf, dim=-1)
    score = torch.where(observed, a_obs + z * a_z, a_mis)  # [h, n, F]
    w = torch.softmax(score, dim=-1)
    w_obs = torch.where(observed, w, 0.0)
    weights = torch.cat([w_obs, w_obs * z, w - w_obs], dim=-1)  # [h, n, 3F]
    out = torch.bmm(weights, vals)  # [h, n, dh]
    return att.out(out.transpose(0, 1).reshape(n, att.h * att.dh))


def _encode_h0(
    enc: FeatureEncoder,
    rounds: tuple,
    z: Tensor,
    omega: Tensor,
    struct: Tensor | None,
    leaves: Tensor | None,
) -> Tensor:
    """``FeatureEncoder.forward`` in eval mode, from the rounds' constants."""
    observed = (omega > 0).unsqueeze(0)  # [1, n, F]
    zz = z.unsqueeze(0)
    h = _feature_round(enc.att1, rounds[0], zz, observed, None)
    if enc.struct is not None and struct is not None:
        h = h + enc.struct(struct)
    if enc.leaves is not None and leaves is not None:
        h = h + enc.leaves(leaves)
    h = enc.norm0(h)
    h = enc.norm1(h + _feature_round(enc.att2, rounds[1], zz, observed, h))
    return enc.norm2(h + enc.ff(h))


def _cross_attention(mha: nn.MultiheadAttention, q: Tensor, kv: Tensor) -> Tensor:
    """``mha(q[:, None], kv, kv)`` in eval mode for one query per user: ``q [n, d]``,
    ``kv [n, T, d]`` -> ``[n, d]``."""
    n, t, d = kv.shape
    h = mha.num_heads
    dh = d // h
    w, b = mha.in_proj_weight, mha.in_proj_bias
    qp = F.linear(q, w[:d], b[:d]).view(n, h, 1, dh)
    kvp = F.linear(kv, w[d:], b[d:])  # [n, T, 2d]
    kp = kvp[..., :d].reshape(n, t, h, dh).permute(0, 2, 3, 1)  # [n, h, dh, T]
    vp = kvp[..., d:].reshape(n, t, h, dh).transpose(1, 2)  # [n, h, T, dh]
    att = torch.softmax(torch.matmul(qp, kp) / math.sqrt(dh), dim=-1)  # [n, h, 1, T]
    out = torch.matmul(att, vp).reshape(n, d)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


def _plain(mha: nn.MultiheadAttention) -> bool:
    """A packed projection with biases and nothing added to the keys (what the model builds)."""
    return (
        mha._qkv_same_embed_dim
        and mha.in_proj_bias is not None
        and mha.bias_k is None
        and not mha.add_zero_attn
    )


def _attend(itf, h0: Tensor, c0: Tensor, s0: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """``InterferenceModule.attend`` over hop 0 and the hop tokens 1..L ``[n, 2, L, d]``."""
    if not all(_plain(a) for a in (itf.attn_ctx, itf.attn_int)):
        hops = tokens.shape[2]
        cs = [c0] + [tokens[:, 0, k] for k in range(hops)]
        ss = [s0] + [tokens[:, 1, k] for k in range(hops)]
        return itf.attend(h0, cs, ss)
    ctx = torch.cat([c0.unsqueeze(1), tokens[:, 0]], dim=1) + itf.hop_emb
    inter = tokens[:, 1] + itf.hop_emb[1:]
    h = itf.norm(h0 + _cross_attention(itf.attn_ctx, h0, ctx))
    return h, _cross_attention(itf.attn_int, h0, inter)


def _std0(x: Tensor) -> Tensor:
    """``x.std(0)`` (unbiased) in two plain passes: torch's strided reduction over the leading
    dimension was twenty times slower on ``[K, n, G]``."""
    d = x - x.mean(0)
    return (d * d).sum(0).div_(x.shape[0] - 1).sqrt_()


def _curve_logits(tower, params: Tensor, s: Tensor, arg: Tensor) -> Tensor:
    """``OutcomeTower.logit_grid``: logits of ``params [M, P]`` at log-scaled limits ``s [G]``
    -> ``[M, G]``; ``arg [B, G]`` holds the ramps' grid part ``(s - knot_b) / width_b``. Large
    inputs sum the ramps one at a time, so every intermediate is ``[M, G]`` (cache-sized)."""
    nc = tower.n_coef
    step = (s > 0).to(params.dtype)
    out = params[:, :1] + params[:, 1:2] * step
    if not tower.shift:
        return out + params[:, 2:nc] @ torch.sigmoid(arg)
    shift = params[:, nc : nc + 1] / tower.width  # [M, B]
    if params.shape[0] * arg.numel() <= SMALL_LOGITS:
        ramps = torch.sigmoid(arg.T.unsqueeze(0) - shift.unsqueeze(1))  # [M, G, B]
        return out + (ramps * params[:, 2:nc].unsqueeze(1)).sum(-1)
    for b in range(nc - 2):
        out.addcmul_(torch.sigmoid(arg[b] - shift[:, b : b + 1]), params[:, 2 + b : 3 + b])
    return out


# --- a few users at a time: the same layers in NumPy ----------------------------------------
# An online request scores one user; torch spends a few microseconds of dispatch on every op
# whatever its size, and the last layer is a few hundred tiny ops. The same arithmetic on NumPy
# arrays costs a fraction of that. Every function mirrors the module named in its docstring
# (eval mode); tests compare the two paths (online = batch to 1e-5).


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32, copy=True)


def _np_std0(x: np.ndarray) -> np.ndarray:
    """``x.std(0, ddof=1)``."""
    d = x - x.sum(0) * np.float32(1.0 / len(x))
    return np.sqrt((d * d).sum(0) * np.float32(1.0 / (len(x) - 1)))


def _np_linear(layer: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    """``(W^T [in, out], b [out])`` of a linear layer."""
    w = _np(layer.weight).T.copy()
    b = _np(layer.bias) if layer.bias is not None else np.zeros(w.shape[1], np.float32)
    return w, b


def _np_norm(norm: nn.LayerNorm) -> tuple[np.ndarray, np.ndarray, float]:
    return _np(norm.weight), _np(norm.bias), float(norm.eps)


def _gelu(x: np.ndarray) -> np.ndarray:
    """``nn.GELU()`` (the exact, erf form)."""
    return 0.5 * x * (1.0 + _erf(x * np.float32(math.sqrt(0.5))))


def _layer_norm(x: np.ndarray, p: tuple[np.ndarray, np.ndarray, float]) -> np.ndarray:
    """``nn.LayerNorm`` over the last dimension."""
    inv = np.float32(1.0 / x.shape[-1])
    d = x - x.sum(-1, keepdims=True) * inv
    var = (d * d).sum(-1, keepdims=True) * inv
    return d / np.sqrt(var + np.float32(p[2])) * p[0] + p[1]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _softplus(x: np.ndarray) -> np.ndarray:
    """``F.softplus`` (beta 1, linear above 20)."""
    with np.errstate(over="ignore"):
        return np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0))))


def _erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return erf(x)


def _expit(x: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(x)


def _conv_matrix(weight: np.ndarray, n_pos: int) -> np.ndarray:
    """``Conv1d(kernel K, padding K // 2)`` with weight ``[O, C, K]`` over ``n_pos`` positions
    as a matrix ``[n_pos * C, n_pos * O]`` on inputs laid out position-major."""
    o, c, k = weight.shape
    out = np.zeros((n_pos, c, n_pos, o), np.float32)
    for pos in range(n_pos):
        for j in range(k):
            src = pos + j - k // 2
            if 0 <= src < n_pos:
                out[src, :, pos, :] = weight[:, :, j].T
    return out.reshape(n_pos * c, n_pos * o)


class _SmallBatch:
    """The eval-mode layers of a :class:`CreditGraphNet` as NumPy float32 arrays, for a few
    users at a time (see the section comment). Built from the model once; the model is frozen
    for scoring (:class:`Inference` rebuilds it when the encoder's projections change)."""

    def __init__(self, inf: Inference, rounds: tuple):
        m = inf.model
        enc, itf, tower = m.encoder, m.interference, m.outcome
        self.rounds = [tuple(None if t is None else _np(t) for t in consts) for consts in rounds]
        self.heads, self.dh = enc.att1.h, enc.att1.dh
        self.queries = [
            None if a.q is None else (_np_linear(a.q), _np(a.q0)) for a in (enc.att1, enc.att2)
        ]
        self.outs = [_np_linear(enc.att1.out), _np_linear(enc.att2.out)]
        self.struct = _np_linear(enc.struct) if enc.struct is not None else None
        self.norms = [_np_norm(x) for x in (enc.norm0, enc.norm1, enc.norm2)]
        self.ff = (_np_linear(enc.ff[0]), _np_linear(enc.ff[3]))
        self.itf = None
        if itf is not None:
            self.itf = {
                "ctx_in": _np_linear(itf.ctx_in),
                "int_in": _np_linear(itf.int_in),
                "ctx_hop": [_np_linear(x) for x in itf.ctx_hop],
                "int_hop": [_np_linear(x) for x in itf.int_hop],
                "hop_emb": _np(itf.hop_emb),
                "attn": [
                    (
                        _np(a.in_proj_weight).T.copy(),
                        _np(a.in_proj_bias),
                        _np_linear(a.out_proj),
                        a.num_heads,
                    )
                    for a in (itf.attn_ctx, itf.attn_int)
                ],
                "norm": _np_norm(itf.norm),
            }
        lim = m.limits
        self.limit_scale = float(lim.scale)
        self.limit_mean, self.limit_std = float(lim.mean), float(lim.std)
        alpha = _np(m.alpha)
        cfg = m.cfg
        nf = len(alpha)
        if not cfg.use_alpha or cfg.dsl_alpha == "none":
            delta_w = np.ones(nf, np.float32)
        else:
            delta_w = alpha if cfg.dsl_alpha == "signed" else np.abs(alpha)
        self.dsl = None
        if m.dsl is not None:
            # delta_uj = (1 - omega_uj) w_j, put in the DSL order, then two Conv1d(kernel 3,
            # padding 1): all linear maps of the missing mask, so each layer is one product with
            # a banded matrix over (position, channel)
            order = m.dsl.order.numpy()
            place = np.zeros((nf, nf), np.float32)  # place[j, f] = 1: feature j at position f
            place[order, np.arange(nf)] = 1.0
            conv1, conv2 = m.dsl.conv[0], m.dsl.conv[2]
            band1 = _conv_matrix(_np(conv1.weight), nf)
            self.dsl = {
                "in": (delta_w[:, None] * place) @ band1,  # [F, F * C]
                "b1": np.tile(_np(conv1.bias), nf),
                "band2": _conv_matrix(_np(conv2.weight), nf),
                "b2": np.tile(_np(conv2.bias), nf),
                "channels": conv2.out_channels,
                "out": _np_linear(m.dsl.out),
            }
        w = np.abs(alpha)
        self.comp_w = w if float(w.sum()) > 0 else np.ones_like(w)
        first, _, _, second = tower.trunk
        self.trunk = (_np_linear(first), _np_linear(second))
        self.head = _np_linear(tower.head)
        self.masks = _np(inf.masks)
        self.n_coef, self.monotone, self.shift = tower.n_coef, tower.monotone, tower.shift
        self.width = _np(tower.width)
        self.knots = _np(tower.knots)

    # -- the feature encoder (FeatureEncoder) --------------------------------------------------
    def _round(self, i: int, z: np.ndarray, observed: np.ndarray, h_user) -> np.ndarray:
        keys, vals, const = self.rounds[i]
        n, nf = z.shape
        h, dh = self.heads, self.dh
        if const is None:
            (wq, bq), q0 = self.queries[i]
            q = ((h_user @ wq + bq).reshape(n, h, dh) + q0).transpose(1, 0, 2)
            a = np.matmul(q, keys)  # [h, n, 3F]
        else:
            a = const
        score = np.where(observed, a[..., :nf] + z * a[..., nf : 2 * nf], a[..., 2 * nf :])
        w = _softmax(score)
        w_obs = np.where(observed, w, np.float32(0.0))
        weights = np.concatenate([w_obs, w_obs * z, w - w_obs], axis=-1)
        out = np.matmul(weights, vals).transpose(1, 0, 2).reshape(n, h * dh)
        wo, bo = self.outs[i]
        return out @ wo + bo

    def h0(self, z: np.ndarray, omega: np.ndarray, struct: np.ndarray | None) -> np.ndarray:
        observed = omega > 0
        h = self._round(0, z, observed, None)
        if self.struct is not None and struct is not None:
            h = h + (struct @ self.struct[0] + self.struct[1])
        h = _layer_norm(h, self.norms[0])
        h = _layer_norm(h + self._round(1, z, observed, h), self.norms[1])
        (w1, b1), (w2, b2) = self.ff
        return _layer_norm(h + (_gelu(h @ w1 + b1) @ w2 + b2), self.norms[2])

    # -- the interference module (InterferenceModule) --------------------------------------------
    def limit_encoding(self, limit: np.ndarray) -> np.ndarray:
        lim = np.asarray(limit, np.float32)
        s = (np.log1p(lim / np.float32(self.limit_scale)) - np.float32(self.limit_mean)) / (
            np.float32(self.limit_std)
        )
        return np.stack([(lim > 0).astype(np.float32), s], axis=-1)

    def first_tokens(self, h0: np.ndarray, limit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        (wc, bc), (wi, bi) = self.itf["ctx_in"], self.itf["int_in"]
        d = h0.shape[1]
        t_enc = self.limit_encoding(limit)
        return _gelu(h0 @ wc + bc), _gelu(h0 @ wi[:d] + t_enc @ wi[d:] + bi)

    def hop_from_mean(self, k: int, c_mean, s_mean, wdeg) -> tuple[np.ndarray, np.ndarray]:
        deg = np.log1p(np.asarray(wdeg, np.float32))[:, None]
        (wc, bc), (wi, bi) = self.itf["ctx_hop"][k], self.itf["int_hop"][k]
        d = c_mean.shape[1]
        c = _gelu(np.asarray(c_mean, np.float32) @ wc[:d] + deg * wc[d] + bc)
        s = _gelu(np.asarray(s_mean, np.float32) @ wi[:d] + deg * wi[d] + bi)
        return c, s

    @staticmethod
    def _attention(p, q: np.ndarray, kv: np.ndarray) -> np.ndarray:
        w, b, (wo, bo), heads = p
        n, t, d = kv.shape
        dh = d // heads
        qp = (q @ w[:, :d] + b[:d]).reshape(n, heads, 1, dh)
        kvp = kv @ w[:, d:] + b[d:]  # [n, T, 2d]
        kp = kvp[..., :d].reshape(n, t, heads, dh).transpose(0, 2, 3, 1)  # [n, h, dh, T]
        vp = kvp[..., d:].reshape(n, t, heads, dh).transpose(0, 2, 1, 3)  # [n, h, T, dh]
        att = _softmax(np.matmul(qp, kp) / np.float32(math.sqrt(dh)))
        return np.matmul(att, vp).reshape(n, d) @ wo + bo

    def attend(self, h0, c0, s0, tokens) -> tuple[np.ndarray, np.ndarray]:
        emb = self.itf["hop_emb"]
        ctx = np.concatenate([c0[:, None], tokens[:, 0]], axis=1) + emb
        inter = tokens[:, 1] + emb[1:]
        p_ctx, p_int = self.itf["attn"]
        h = _layer_norm(h0 + self._attention(p_ctx, h0, ctx), self.itf["norm"])
        return h, self._attention(p_int, h0, inter)

    # -- DSL encoder and completeness ------------------------------------------------------------
    def dsl_embedding(self, omega: np.ndarray) -> np.ndarray:
        """``DSLEncoder(dsl_delta(omega))``."""
        p = self.dsl
        x = _gelu((1.0 - omega) @ p["in"] + p["b1"])
        x = _gelu(x @ p["band2"] + p["b2"]).reshape(len(omega), -1, p["channels"])
        pooled = np.concatenate([x.mean(1), x.max(1)], axis=-1)
        wo, bo = self.dsl["out"]
        return pooled @ wo + bo

    def completeness(self, omega: np.ndarray) -> np.ndarray:
        w = self.comp_w
        return ((1.0 - omega) * w).sum(-1) / w.sum()

    # -- the outcome tower (OutcomeTower) -------------------------------------------------------
    def params(self, x: np.ndarray, thinned: bool) -> np.ndarray:
        (w1, b1), (w2, b2) = self.trunk
        hidden = _gelu(x @ w1 + b1)[None]
        if thinned:
            hidden = np.concatenate([hidden, hidden * self.masks[:, None]])
        wh, bh = self.head
        c = _gelu(hidden @ w2 + b2) @ wh + bh
        if self.monotone:
            c[..., 1 : self.n_coef] = _softplus(c[..., 1 : self.n_coef])
        return c

    def logits(self, params: np.ndarray, s: np.ndarray, arg: np.ndarray) -> np.ndarray:
        """``[M, P]`` params at log-scaled limits ``s [G]`` (``arg [B, G]``, see
        :func:`_curve_logits`) -> ``[M, G]``."""
        nc = self.n_coef
        out = params[:, :1] + params[:, 1:2] * (s > 0).astype(np.float32)
        if not self.shift:
            return out + params[:, 2:nc] @ _expit(arg)
        shift = params[:, nc : nc + 1] / self.width  # [M, B]
        ramps = _expit(arg.T[None] - shift[:, None])  # [M, G, B]
        return out + (ramps * params[:, None, 2:nc]).sum(-1)

    def logit_at(self, params: np.ndarray, s: np.ndarray) -> np.ndarray:
        """``OutcomeTower.logit_at``: each row's logit at its own log-scaled limit ``s [M]``."""
        nc = self.n_coef
        shift = params[:, nc] if self.shift else 0.0
        ramps = _expit(((s - shift)[:, None] - self.knots) / self.width)
        return params[:, 0] + params[:, 1] * (s > 0) + (params[:, 2:nc] * ramps).sum(-1)
