"""Inference with a trained model: curves, factual risk, DSL score and the stored hop states.

``Predictor`` runs on shard batches (exact for owned users, see ``graph.partition``) and returns
numpy arrays for the owned users only. The DSL score of a user combines three parts, each mapped
to [0, 1] against the training users (seed 000, section 3.2):

* completeness: the share of the total causal weight |alpha| whose feature is missing;
* out-of-distribution distance: the percentile, among training users, of the Mahalanobis
  distance of the user's representation to the training representations;
* model uncertainty: the percentile, among training users, of the MC-dropout standard deviation
  of the user's risk curve (mean over the grid).

``dsl = (completeness + ood + uncertainty) / 3``. ``DSLStats`` (mean, inverse covariance and the
two reference distributions) is fitted once after training and saved with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from creditgraph.layout import ModelFiles
from creditgraph.model.batch import GraphBatch
from creditgraph.model.net import CreditGraphNet

QUANTILES = np.linspace(0.0, 1.0, 201)


@dataclass
class DSLStats:
    """Reference distributions of the training users for the DSL score."""

    mean: np.ndarray
    inv_cov: np.ndarray
    dist_q: np.ndarray
    unc_q: np.ndarray
    unc_grid: np.ndarray

    @classmethod
    def fit(cls, rep: np.ndarray, mc_std: np.ndarray, unc_grid: np.ndarray) -> DSLStats:
        rep = rep.astype(np.float64)
        mean = rep.mean(0)
        cov = np.cov(rep, rowvar=False) + 1e-3 * np.eye(rep.shape[1])
        inv = np.linalg.inv(cov)
        d = _mahalanobis(rep, mean, inv)
        return cls(
            mean,
            inv,
            np.quantile(d, QUANTILES),
            np.quantile(mc_std, QUANTILES),
            np.asarray(unc_grid),
        )

    def save(self, folder: str | Path | ModelFiles) -> None:
        np.savez(
            _files(folder).dsl_stats,
            mean=self.mean,
            inv_cov=self.inv_cov,
            dist_q=self.dist_q,
            unc_q=self.unc_q,
            unc_grid=self.unc_grid,
        )

    @classmethod
    def load(cls, folder: str | Path | ModelFiles) -> DSLStats | None:
        path = _files(folder).dsl_stats
        if not path.exists():
            return None
        with np.load(path) as f:
            return cls(f["mean"], f["inv_cov"], f["dist_q"], f["unc_q"], f["unc_grid"])

    def score(
        self, completeness: np.ndarray, rep: np.ndarray, mc_std: np.ndarray
    ) -> dict[str, np.ndarray]:
        ood = _percentile(
            _mahalanobis(rep.astype(np.float64), self.mean, self.inv_cov), self.dist_q
        )
        unc = _percentile(mc_std, self.unc_q)
        return {
            "dsl_ood": ood,
            "dsl_uncertainty": unc,
            "dsl_score": (completeness + ood + unc) / 3.0,
        }


def _files(folder: str | Path | ModelFiles) -> ModelFiles:
    return folder if isinstance(folder, ModelFiles) else ModelFiles(Path(folder))


def _mahalanobis(x: np.ndarray, mean: np.ndarray, inv: np.ndarray) -> np.ndarray:
    d = x - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, inv, d), 0.0))


def _percentile(x: np.ndarray, ref_q: np.ndarray) -> np.ndarray:
    """Empirical CDF of ``x`` under the reference quantiles (piecewise linear, in [0, 1])."""
    return np.interp(x, ref_q, QUANTILES, left=0.0, right=1.0)


class Predictor:
    """Evaluates a trained model on batches; all outputs are for the batch's owned users."""

    def __init__(
        self,
        model: CreditGraphNet,
        grid: np.ndarray,
        mc_samples: int | None = None,
        seed: int = 0,
        unc_grid: np.ndarray | None = None,
    ):
        self.model = model.eval()
        self.grid = torch.as_tensor(np.asarray(grid, dtype=np.float32))
        self.unc_grid = (
            self.grid
            if unc_grid is None
            else torch.as_tensor(np.asarray(unc_grid, dtype=np.float32))
        )
        self.mc = model.cfg.mc_dropout_samples if mc_samples is None else mc_samples
        self.seed = seed

    @torch.no_grad()
    def predict(self, batch: GraphBatch, hop_states: bool = False) -> dict[str, np.ndarray]:
        m = self.model
        m.eval()
        own = batch.owned
        reps = m.represent(batch)
        params = m.coefficients(reps)
        curves = torch.sigmoid(m.curve_logits(params, self.grid))
        out = {
            "node": batch.nodes[own].numpy(),
            "curve": curves[own].numpy(),
            "p_factual": torch.sigmoid(
                m.outcome.logit_at(params, m.limits.log_scaled(batch.treatment))
            )[own].numpy(),
            "completeness": m.completeness(batch.omega)[own].numpy(),
            "rep": reps["rep"][own].numpy(),
        }
        out["mc_std"] = (
            self._mc_std(batch)[own].numpy() if self.mc > 1 else np.zeros(int(own.sum()))
        )
        if hop_states and m.interference is not None:
            cs, ss = m.interference.hop_states(
                reps["h0"], m.limits(batch.treatment), batch.edge_index, batch.edge_weight
            )
            states = torch.cat(cs[:-1] + ss[:-1], dim=-1)  # hops 0..L-1: what a neighbour needs
            out["hop_states"] = states[own].numpy()
        return out

    def _mc_std(self, batch: GraphBatch) -> torch.Tensor:
        """Std over MC-dropout passes of the curve on ``unc_grid``, averaged over that grid."""
        m = self.model
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        m.train()
        try:
            draws = []
            for _ in range(self.mc):
                reps = m.represent(batch)
                draws.append(torch.sigmoid(m.curve_logits(m.coefficients(reps), self.unc_grid)))
        finally:
            m.eval()
            torch.random.set_rng_state(gen_state)
        return torch.stack(draws).std(0).mean(-1)


def predict_shards(
    predictor: Predictor,
    shard_files: list[Path],
    keep: np.ndarray | None = None,
    leaves: np.ndarray | None = None,
    prior: np.ndarray | None = None,
    hop_states: bool = False,
    shards_per_batch: int = 4,
) -> dict[str, np.ndarray]:
    """Predict every owned user of the given shards (optionally only where ``keep[node]``).

    Returns arrays sorted by global node id. Runs in-process; batch scoring at scale goes through
    Ray Data (``creditgraph.serving.score``).
    """
    from tqdm.auto import tqdm

    from creditgraph.graph.partition import load_shard
    from creditgraph.model.batch import collate_shards

    parts: list[dict[str, np.ndarray]] = []
    files = list(shard_files)
    for i in tqdm(range(0, len(files), shards_per_batch), desc="predict", disable=len(files) < 16):
        shards = [load_shard(f) for f in files[i : i + shards_per_batch]]
        if keep is not None:
            shards = [s for s in shards if keep[s["nodes"][: int(s["n_owned"])]].any()]
            if not shards:
                continue
        out = predictor.predict(collate_shards(shards, leaves, prior), hop_states=hop_states)
        if keep is not None:
            sel = keep[out["node"]]
            out = {k: v[sel] for k, v in out.items()}
        parts.append(out)
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = np.argsort(merged["node"], kind="stable")
    return {k: v[order] for k, v in merged.items()}
