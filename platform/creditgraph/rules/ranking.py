"""The rule ranker: performance (WRAcc), redundancy and stability filters on candidate rules.

- performance: WRAcc = coverage share × (confidence − base rate) on the mining rows;
- redundancy: for each positive row, how many candidates cover it; a rule's redundancy is the
  average of that count over the positives it covers (low = it recalls rows few others do);
- stability: |WRAcc(mining rows) − WRAcc(validation rows)| (low = it generalizes).

Rules that do no better than the base rate on the mining rows or on the validation rows, or
whose validation WRAcc falls below the mining WRAcc by more than ``stability_z`` standard
errors of the validation estimate, are dropped; the rest are ranked by the mean of their three
percentile ranks and the best ``max_candidates`` are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def wracc(cov: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Weighted relative accuracy of each rule (rows of ``cov``) on labels ``y``."""
    n = cov.shape[1]
    if n == 0:
        return np.zeros(cov.shape[0])
    yf = y.astype(np.float32)
    n_r = cov.sum(axis=1).astype(np.float64)
    tp = (cov.astype(np.float32) @ yf).astype(np.float64)
    conf = np.divide(tp, n_r, out=np.zeros_like(tp), where=n_r > 0)
    return n_r / n * (conf - float(yf.mean()))


def redundancy(cov: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Average number of candidate rules covering each positive a rule covers."""
    pos = cov[:, y == 1]
    per_row = pos.sum(axis=0).astype(np.float32)
    n_pos = pos.sum(axis=1).astype(np.float64)
    total = (pos.astype(np.float32) @ per_row).astype(np.float64)
    return np.divide(total, n_pos, out=np.full_like(total, np.inf), where=n_pos > 0)


def wracc_se(cov: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Standard error of each rule's WRAcc (a mean over rows of ``covered * (y - base rate)``)."""
    n = cov.shape[1]
    if n == 0:
        return np.full(cov.shape[0], np.inf)
    yf = y.astype(np.float32)
    pi = float(yf.mean())
    d2 = np.where(y == 1, (1 - pi) ** 2, pi**2).astype(np.float32)
    m2 = (cov.astype(np.float32) @ d2).astype(np.float64) / n
    m1 = (cov.astype(np.float32) @ (yf - pi)).astype(np.float64) / n
    return np.sqrt(np.maximum(m2 - m1 * m1, 0.0) / n)


def _pct_rank(score: np.ndarray) -> np.ndarray:
    """Percentile rank in [0, 1], 1 = best (highest); ties share the mean rank."""
    from scipy.stats import rankdata

    if score.size <= 1:
        return np.ones_like(score, dtype=np.float64)
    return (rankdata(score) - 1) / (score.size - 1)


@dataclass
class Ranking:
    """Scores of every candidate and the indices kept, best first."""

    wracc_train: np.ndarray
    wracc_val: np.ndarray
    redundancy: np.ndarray
    stability: np.ndarray
    kept: np.ndarray


def rank_rules(
    cov_train: np.ndarray,
    y_train: np.ndarray,
    cov_val: np.ndarray,
    y_val: np.ndarray,
    max_candidates: int = 800,
    stability_z: float = 2.0,
) -> Ranking:
    """Apply the three filters; ``kept`` indexes the surviving rules, best first."""
    w_tr = wracc(cov_train, y_train)
    red = redundancy(cov_train, y_train)
    if cov_val.shape[1]:
        w_va = wracc(cov_val, y_val)
        # a drop larger than the validation noise explains marks a rule fitted to the noise
        drop_z = (w_tr - w_va) / np.maximum(wracc_se(cov_val, y_val), 1e-12)
        alive_mask = (w_tr > 0) & (w_va > 0) & (drop_z <= stability_z)
    else:
        w_va = w_tr.copy()
        alive_mask = w_tr > 0
    stab = np.abs(w_tr - w_va)
    alive = np.flatnonzero(alive_mask)
    if alive.size == 0:
        return Ranking(w_tr, w_va, red, stab, alive)
    score = (_pct_rank(w_tr[alive]) + _pct_rank(-red[alive]) + _pct_rank(-stab[alive])) / 3.0
    order = np.lexsort((alive, -score))  # best score first, ties by candidate order
    return Ranking(w_tr, w_va, red, stab, alive[order[:max_candidates]])
