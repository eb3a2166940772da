"""A stated guarantee: how much to tighten the risk ceiling, chosen by Learn-then-Test.

The model gives each user an estimated curve ``p_hat[n, G]`` and an uncertainty ``sigma[n, G]``
on the logit scale (e.g. the MC-dropout standard deviation of the logit). A tightening
``lambda >= 0`` decides on the upper bound ``U_lambda = sigmoid(logit(p_hat) + lambda * sigma)``:
each user gets the largest grid limit with ``U_lambda(L) <= r_max``
(:func:`~creditgraph.policy.decide.largest_feasible_limit`). Larger ``lambda``: fewer, smaller
limits.

:func:`choose_tightening` picks ``lambda`` on held-out calibration users by Learn-then-Test
(Angelopoulos, Bates et al., 2021) with fixed-sequence testing. For each ``lambda``, from the
most conservative to the least, the null hypothesis "the policy's portfolio default rate (mean
true risk over the users it grants) exceeds ``r_max``" is rejected when an upper confidence
bound at level ``1 - delta`` of that rate, estimated off-policy from the logged limits
(:mod:`creditgraph.policy.ope`), is ``<= r_max``. Testing stops at the first failure; the
least conservative rejected ``lambda`` is returned. Fixed-sequence testing needs no multiplicity
correction: the probability that the returned policy's rate exceeds ``r_max`` is at most
``delta``, given the assumptions in :meth:`GuaranteeResult.statement`.

Two upper bounds (``GuaranteeConfig.bound``):

- ``"bootstrap"``: the ``1 - delta`` percentile of the estimate (``ipw``, ``snipw`` or ``dr``)
  over resamples of the calibration users. Works with any estimator; its level is asymptotic.
- ``"bernstein"`` / ``"hoeffding"``: finite-sample bounds for the ``ipw`` estimator
  (:func:`finite_sample_ucb`), exact for i.i.d. users under a correct behaviour density. By
  default they use ``E[w | x] = 1``: the kernel-smoothed rate is ``1 - E[w (1 - y)]``, and
  ``min(w, M) (1 - y)`` lies in ``[0, M]`` with clipping only lowering its mean, so any weights
  are fine, but the bound carries the noise of ``mean(w)`` and needs many users. With
  ``weights_bounded=True`` (a randomized limit test whose density is bounded below, so no
  weight can exceed ``M = weight_clip``) the bound is on ``E[w y]`` directly and much tighter.

A ``lambda`` whose policy grants no labeled calibration user is certified trivially (an empty
book has no defaults). When none is certified the policy declines everyone and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd

from creditgraph.policy.config import GuaranteeConfig
from creditgraph.policy.decide import check_grid, curve_at, largest_feasible_limit
from creditgraph.policy.ope import (
    LoggedData,
    bootstrap_counts,
    bootstrap_sums,
    estimate_terms,
    kernel_weights,
    silverman_bandwidth,
)

_EPS = 1e-9
_MAX_CACHED_CELLS = 5_000_000
_NAMES = {
    "ipw": "inverse-probability weighted",
    "snipw": "self-normalized IPW",
    "dr": "doubly robust",
}


def _logit_curves(p_hat: np.ndarray, eps: float = _EPS) -> np.ndarray:
    p = np.asarray(p_hat, dtype=np.float64)
    if not np.all(np.isnan(p) | ((p >= 0) & (p <= 1))):
        raise ValueError("p_hat must be probabilities in [0, 1] (NaN = infeasible)")
    pc = np.clip(p, eps, 1.0 - eps)
    return np.log(pc) - np.log1p(-pc)


def _check_sigma(sigma: np.ndarray | float, shape: tuple[int, ...]) -> np.ndarray:
    s = np.asarray(sigma, dtype=np.float64)
    if not (np.isfinite(s).all() and (s >= 0).all()):
        raise ValueError("sigma must be finite and >= 0")
    try:
        return np.broadcast_to(s, shape)
    except ValueError:
        raise ValueError(f"sigma of shape {s.shape} does not broadcast to {shape}") from None


def _check_lambda(lambda_: float) -> None:
    if not (lambda_ >= 0 and not math.isnan(lambda_)):
        raise ValueError(f"lambda_ must be >= 0 (inf = decline everyone), got {lambda_}")


def upper_bound(
    p_hat: np.ndarray, sigma: np.ndarray | float, lambda_: float, eps: float = _EPS
) -> np.ndarray:
    """``sigmoid(logit(p_hat) + lambda_ * sigma)``, elementwise (``p_hat`` clipped to
    ``[eps, 1 - eps]`` first; NaN stays NaN). ``sigma >= 0`` broadcasts against ``p_hat``."""
    _check_lambda(lambda_)
    if math.isinf(lambda_):
        raise ValueError("upper_bound needs a finite lambda_")
    z = _logit_curves(p_hat, eps)
    return 1.0 / (1.0 + np.exp(-(z + lambda_ * _check_sigma(sigma, z.shape))))


def _limits_on_logits(
    z: np.ndarray,
    sigma: np.ndarray,
    grid: np.ndarray,
    r_max: float,
    lambda_: float,
    contiguous: bool,
) -> tuple[np.ndarray, np.ndarray]:
    if math.isinf(lambda_):
        n = z.shape[0]
        return np.zeros(n), np.zeros(n, dtype=np.int64)
    # U <= r_max  <=>  logit(p_hat) + lambda * sigma <= logit(r_max): no sigmoid needed
    thr = math.inf if r_max >= 1 else math.log(r_max) - math.log1p(-r_max)
    return largest_feasible_limit(z + lambda_ * sigma, grid, thr, contiguous=contiguous)


def tightened_limits(
    p_hat: np.ndarray,
    sigma: np.ndarray | float,
    grid: np.ndarray,
    r_max: float,
    lambda_: float,
    *,
    contiguous: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Limits and grid indices of the policy tightened by ``lambda_``: the largest grid limit
    with ``upper_bound(p_hat, sigma, lambda_) <= r_max``; ``lambda_ = inf`` declines everyone."""
    _check_lambda(lambda_)
    grid = check_grid(grid)
    z = _logit_curves(p_hat)
    if z.ndim != 2 or z.shape[1] != grid.size:
        raise ValueError(f"p_hat must have shape (n, {grid.size}), got {z.shape}")
    return _limits_on_logits(z, _check_sigma(sigma, z.shape), grid, r_max, lambda_, contiguous)


def finite_sample_ucb(
    weights: np.ndarray,
    outcome: np.ndarray,
    delta: float,
    weight_clip: float,
    kind: Literal["bernstein", "hoeffding"] = "bernstein",
    *,
    bounded: bool = False,
) -> float:
    """Upper bound at level ``1 - delta`` of the kernel-smoothed default rate of granted users.

    ``weights`` (unclipped :func:`~creditgraph.policy.ope.kernel_weights`) and ``outcome``
    (0/1) of the labeled granted users, ``M = weight_clip``. For i.i.d. users and a correct
    behaviour density, a lower bound on the mean of a variable ``Z`` in ``[0, M]`` is
    Hoeffding's ``mean(Z) - M sqrt(log(1/delta) / (2n))`` or the empirical Bernstein bound of
    Maurer & Pontil (2009, Thm 4) ``mean(Z) - sqrt(2 V log(2/delta) / n) - 7 M log(2/delta) /
    (3 (n - 1))`` (``V`` the sample variance); upper bounds are symmetric.

    - ``bounded=False``: ``Z = min(w, M) (1 - y)`` and the rate is ``<= 1 - E[Z]``, because
      ``E[w | x] = 1`` (the kernel's mass lies where logged limits have positive density) and
      clipping only lowers ``Z``. Valid with any weights, but it carries the noise of
      ``mean(w)``: wide unless there are many users.
    - ``bounded=True``: ``Z = w y`` directly; valid only if the weights can never exceed ``M``
      (e.g. a randomized limit test whose density is at least ``f_min`` over the limits the
      policy grants: ``w <= K(0) / (h f_min)``). Much tighter. A sample weight above ``M``
      raises ``ValueError``.
    """
    w = np.asarray(weights, dtype=np.float64)
    y = np.asarray(outcome, dtype=np.float64)
    n = w.size
    if kind not in ("bernstein", "hoeffding"):
        raise ValueError(f"kind must be 'bernstein' or 'hoeffding', got {kind!r}")
    if bounded and n and w.max() > weight_clip:
        raise ValueError(
            f"a kernel weight ({w.max():.3g}) exceeds weight_clip={weight_clip:g} although the "
            "weights were declared bounded by it"
        )
    if n < 2:
        return 1.0
    z = w * y if bounded else np.minimum(w, weight_clip) * (1.0 - y)
    if kind == "hoeffding":
        width = weight_clip * math.sqrt(math.log(1.0 / delta) / (2.0 * n))
    else:
        log_term = math.log(2.0 / delta)
        width = math.sqrt(2.0 * z.var(ddof=1) * log_term / n) + 7.0 * weight_clip * log_term / (
            3.0 * (n - 1)
        )
    ucb = z.mean() + width if bounded else 1.0 - (z.mean() - width)
    return float(min(1.0, ucb))


@dataclass
class GuaranteeResult:
    """What :func:`choose_tightening` found.

    ``lambda_``: the chosen tightening (``inf`` when none is certified: decline everyone);
    ``certified``: whether any was; ``table``: one row per tested ``lambda`` (most conservative
    first) with ``estimate`` (off-policy portfolio default rate), ``ucb``, ``granted_share``,
    ``n_granted`` (labeled calibration users granted), ``tested`` and ``certified``; ``limits``:
    the calibration users' limits under ``lambda_``.
    """

    lambda_: float
    certified: bool
    table: pd.DataFrame
    r_max: float
    config: GuaranteeConfig
    bandwidth: float
    n_calibration: int
    n_labeled: int
    limits: np.ndarray = field(repr=False)

    def limits_for(
        self, p_hat: np.ndarray, sigma: np.ndarray | float, grid: np.ndarray
    ) -> np.ndarray:
        """The certified policy's limits for (new, exchangeable) users; zeros when uncertified."""
        limits, _ = tightened_limits(
            p_hat, sigma, grid, self.r_max, self.lambda_, contiguous=self.config.contiguous
        )
        return limits

    def statement(self) -> str:
        """The guarantee in plain words, with the assumptions it rests on."""
        c = self.config
        conf = f"{1 - c.delta:.0%}"
        tested = self.table[self.table["tested"]]
        how = (
            f"{len(self.table)} tightenings were tested in a fixed sequence from the most "
            f"conservative (lambda = {self.table['lambda'].iloc[0]:g}) down, each with a "
            f"{conf} upper confidence bound ({self._bound_words()}) of the portfolio default "
            f"rate estimated off-policy on {self.n_labeled:,} labeled calibration users "
            f"({_NAMES[c.estimator]} estimator, {c.kernel} kernel over the log-limit with "
            f"bandwidth {self.bandwidth:.3g})"
        )
        if self.certified:
            row = self.table[self.table["lambda"] == self.lambda_].iloc[0]
            head = (
                f"With probability at least {conf} over the draw of the calibration users, the "
                f"expected default rate of the users granted credit (their portfolio default "
                f"rate) is at most {self.r_max:g} under the tightened policy lambda = "
                f"{self.lambda_:g}: each user gets the largest limit whose upper risk bound "
                f"sigmoid(logit(p) + {self.lambda_:g} * sigma) stays <= {self.r_max:g}. On the "
                f"calibration users it grants {row['granted_share']:.1%} of them; estimated rate "
                f"{row['estimate']:.4f}, upper bound {row['ucb']:.4f}. {how}; "
                f"{int(tested['certified'].sum())} were certified before the first failure."
            )
        else:
            first = tested.iloc[0]
            head = (
                f"No tightening could be certified at {conf} confidence: the most conservative "
                f"one (lambda = {first['lambda']:g}) already has an upper bound of "
                f"{first['ucb']:.4f} on the portfolio default rate, above the ceiling "
                f"{self.r_max:g}. The policy therefore declines everyone (limit 0). {how}. "
                "More calibration users"
                + ("" if c.randomized else ", randomized limit tests")
                + " or a better model are needed."
            )
        assumptions = [
            "the users scored are exchangeable with the calibration users (same population "
            "and period; drift breaks the guarantee)",
            "overlap: every limit the policy grants had a positive probability under the "
            "historical limit policy for similar users",
            "the behaviour density of the logged limits is correct",
            "the risk varies smoothly with the log-limit at the bandwidth's scale (the "
            "estimates are of the kernel-smoothed risk)",
            "unlabeled calibration users are missing at random",
        ]
        if c.randomized:
            density = (
                "The logged limits come from a randomized limit test whose density is known, "
                "so the third assumption holds by design."
            )
        else:
            density = (
                "Without randomized limit tests the third assumption rests on the propensity "
                "(ZILN) model of the historical limits: if that model is wrong, so is the "
                "guarantee."
            )
        level = (
            "The bootstrap bound is approximate: its level holds as the sample grows."
            if c.bound == "bootstrap"
            else f"The {self._bound_words().split(',')[0]} bound holds in finite samples for "
            "independent users"
            + (
                f", given that no kernel weight can exceed {c.weight_clip:g} (the limit-test "
                "density is bounded below where the policy grants)."
                if c.weights_bounded
                else f" (weights clipped at {c.weight_clip:g}, which only makes it more "
                "conservative)."
            )
        )
        scope = (
            "It is a statement about the book of granted users, not about each user: the "
            f"share of granted users whose own risk exceeds the ceiling (target {c.alpha:g}) "
            "is not identified from outcomes and can only be checked on simulated data."
        )
        return "\n".join(
            [
                head,
                "Assumptions: "
                + "; ".join(f"({i}) {a}" for i, a in enumerate(assumptions, 1))
                + ".",
                density,
                level,
                scope,
            ]
        )

    def _bound_words(self) -> str:
        c = self.config
        if c.bound == "bootstrap":
            return f"percentile bootstrap, {c.n_boot} resamples"
        name = "empirical Bernstein" if c.bound == "bernstein" else "Hoeffding"
        return f"{name}, weights clipped at {c.weight_clip:g}"


def choose_tightening(
    p_hat: np.ndarray,
    sigma: np.ndarray | float,
    grid: np.ndarray,
    r_max: float,
    logged: LoggedData,
    config: GuaranteeConfig | None = None,
) -> GuaranteeResult:
    """Choose the least conservative tightening whose portfolio default rate is certified.

    ``p_hat[n, G]`` and ``sigma[n, G]`` (or ``[n, 1]``/scalar, ``>= 0``, logit scale) of the
    calibration users on ``grid``; ``logged``: their logged limits, outcomes and behaviour
    densities (:class:`~creditgraph.policy.ope.LoggedData`); when its ``p_hat_logged`` is
    missing it is read from ``p_hat`` at the logged limit. See the module docstring.
    """
    config = config or GuaranteeConfig()
    grid = check_grid(grid)
    p_hat = np.asarray(p_hat, dtype=np.float64)
    n = len(logged)
    if p_hat.shape != (n, grid.size):
        raise ValueError(f"p_hat must have shape ({n}, {grid.size}), got {p_hat.shape}")
    if not 0 < r_max <= 1:
        raise ValueError(f"r_max must be in (0, 1], got {r_max}")
    z = _logit_curves(p_hat)
    sigma = _check_sigma(sigma, z.shape)
    lab = logged.labeled
    if not lab.any():
        raise ValueError("LoggedData.outcome: no labeled calibration users")
    if logged.p_hat_logged is None:
        with np.errstate(invalid="ignore"):
            p_log = np.clip(curve_at(np.nan_to_num(p_hat, nan=1.0), grid, logged.limit), 0, 1)
        logged = LoggedData(logged.limit, logged.outcome, logged.log_density, p_log)
    bandwidth = config.bandwidth or silverman_bandwidth(logged.limit[lab])
    rows = np.arange(n)
    m_lab = int(lab.sum())
    # one set of resamples for every lambda; kept in memory when small enough
    counts = None
    if config.bound == "bootstrap" and m_lab * config.n_boot <= _MAX_CACHED_CELLS:
        counts = np.vstack(list(bootstrap_counts(m_lab, config.n_boot, config.random_state)))
    records = []
    failed = False
    chosen = math.inf
    for lam in sorted(config.lambdas, reverse=True):
        limits, idx = _limits_on_logits(z, sigma, grid, r_max, lam, config.contiguous)
        p_t = np.where(limits > 0, np.nan_to_num(p_hat[rows, idx], nan=1.0), 0.0)
        w = kernel_weights(
            logged, limits, bandwidth, kernel=config.kernel, weight_clip=config.weight_clip
        )
        terms = estimate_terms(logged, limits, p_t, config.estimator, w)
        n_granted = int((limits[lab] > 0).sum())
        estimate = terms["a"].sum() / terms["b"].sum() if terms["b"].sum() > 0 else math.nan
        ucb = math.nan
        certified = False
        tested = not failed
        if tested:
            if n_granted == 0:
                ucb = 0.0  # an empty book has no defaults
            elif config.bound == "bootstrap":
                cols = np.column_stack([terms["a"], terms["b"]])
                sums = (
                    counts @ cols
                    if counts is not None
                    else bootstrap_sums(cols, config.n_boot, config.random_state)
                )
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.where(sums[:, 1] > 0, sums[:, 0] / sums[:, 1], 0.0)
                ucb = float(np.quantile(ratio, 1.0 - config.delta))
            else:
                g = lab & (limits > 0)
                w_raw = kernel_weights(logged, limits, bandwidth, kernel=config.kernel)
                ucb = finite_sample_ucb(
                    w_raw[g],
                    logged.outcome[g],
                    config.delta,
                    config.weight_clip,
                    config.bound,
                    bounded=config.weights_bounded,
                )
            certified = ucb <= r_max
            if certified:
                chosen = lam
            else:
                failed = True
        records.append(
            {
                "lambda": lam,
                "estimate": float(estimate),
                "ucb": float(ucb),
                "granted_share": float((limits > 0).mean()),
                "n_granted": n_granted,
                "tested": tested,
                "certified": certified,
            }
        )
    table = pd.DataFrame.from_records(records)
    limits, _ = _limits_on_logits(z, sigma, grid, r_max, chosen, config.contiguous)
    return GuaranteeResult(
        lambda_=float(chosen),
        certified=bool(np.isfinite(chosen)),
        table=table,
        r_max=float(r_max),
        config=config,
        bandwidth=float(bandwidth),
        n_calibration=n,
        n_labeled=int(lab.sum()),
        limits=limits,
    )
