"""Constraint-adaptive Bayesian rule-set selection (CBRS), searched by annealed MCMC.

Log posterior of a rule set S over the candidates, up to a constant:

- prior: truncated Poisson(``lambda_rules``) on |S| in 0..max_rules; per rule a truncated
  Poisson(``lambda_length``) on its length in 1..max_length times a uniform choice among the
  candidates of that length (fewer, shorter rules);
- weighted likelihood: covered rows ~ Bernoulli(ρ+), uncovered rows ~ Bernoulli(ρ−), with
  beta priors integrated out (beta-binomial, as in BRS), plus ``tp_weight`` nats per true
  positive. The beta-binomial alone stops covering once the marginal rows are less pure than
  its own trade-off point, long before a loose constraint binds; the weight makes true
  positives dominate so that coverage grows until the constraint stops it;
- constraint penalty: log −inf (posterior zero) unless the Wilson lower bound
  (``confidence_z`` standard errors) of the set's confidence reaches c both
  (1) on all selection rows, which implies confidence >= c on the training data, and
  (2) on the *honest* rows, rows no candidate was mined on (the validation rows). A rule
      looks better on the rows it was mined on than it is, so a set that just meets c there
      tends to miss c on new data; the honest rows and the margin are there so that held-out
      confidence usually meets c as well.

The search starts from the empty set (always feasible) and proposes add / remove / replace
moves with equal probability; which rule is added or removed is drawn from a softmax of the
log posterior each choice leads to (a rule's contribution) at the current annealing
temperature, restricted to choices that keep the constraint, then accepted by the Metropolis
rule at that temperature. Counts are updated incrementally, so a step costs O(candidates)
plus the rows whose coverage changed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import ray
from scipy.special import betaln, gammaln

from creditgraph.utils.logs import get_logger
from creditgraph.utils.runtime import require_ray

log = get_logger(__name__)

# Count vector layout: true / false positives on all rows, then on the honest rows.
TP, FP, TP_H, FP_H = range(4)


@dataclass(frozen=True)
class BayesParams:
    """Hyper-parameters of the posterior and of the search."""

    min_confidence: float
    confidence_z: float = 1.5
    max_rules: int = 10
    lambda_rules: float = 5.0
    max_length: int = 8
    lambda_length: float = 2.0
    tp_weight: float = 1.0
    alpha_pos: float = 1.0
    beta_pos: float = 1.0
    alpha_neg: float = 1.0
    beta_neg: float = 1.0
    n_iterations: int = 2000
    min_rule_gain: float = 0.02
    t_start: float = 0.05
    t_end: float = 0.0005


def wilson_lower(tp: np.ndarray, n: np.ndarray, z: float) -> np.ndarray:
    """Wilson score lower bound of a binomial proportion (``tp / n`` when ``z == 0``; 1 if n=0)."""
    tp = np.asarray(tp, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    safe = np.maximum(n, 1.0)
    p = tp / safe
    if z == 0:
        return np.where(n > 0, p, 1.0)
    z2 = z * z
    centre = p + z2 / (2 * safe)
    half = z * np.sqrt(np.maximum(p * (1 - p) / safe + z2 / (4 * safe * safe), 0.0))
    return np.where(n > 0, (centre - half) / (1 + z2 / safe), 1.0)


def _log_trunc_poisson(k: np.ndarray, lam: float, k_min: int, k_max: int) -> np.ndarray:
    support = np.arange(k_min, k_max + 1)
    log_z = float(np.logaddexp.reduce(support * math.log(lam) - lam - gammaln(support + 1)))
    k = np.asarray(k, dtype=np.float64)
    out = k * math.log(lam) - lam - gammaln(k + 1) - log_z
    return np.where((k >= k_min) & (k <= k_max), out, -np.inf)


class Posterior:
    """The log posterior as a vectorized function of the counts, |S| and the rules' priors."""

    def __init__(self, lengths: np.ndarray, n_pos: int, n_neg: int, params: BayesParams):
        self.p = params
        self.n_pos, self.n_neg = n_pos, n_neg
        lengths = np.clip(np.asarray(lengths, dtype=np.int64), 1, params.max_length)
        counts = np.bincount(lengths, minlength=params.max_length + 1)
        self.rule_prior = _log_trunc_poisson(
            lengths, params.lambda_length, 1, params.max_length
        ) - np.log(counts[lengths])
        self.size_prior = _log_trunc_poisson(
            np.arange(params.max_rules + 2), params.lambda_rules, 0, params.max_rules
        )
        self._c0 = betaln(params.alpha_pos, params.beta_pos) + betaln(
            params.alpha_neg, params.beta_neg
        )

    def loglik(self, tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
        """Weighted beta-binomial log likelihood (without the constraint)."""
        p = self.p
        tp = np.asarray(tp, dtype=np.float64)
        fp = np.asarray(fp, dtype=np.float64)
        fn, tn = self.n_pos - tp, self.n_neg - fp
        return (
            betaln(tp + p.alpha_pos, fp + p.beta_pos)
            + betaln(tn + p.alpha_neg, fn + p.beta_neg)
            - self._c0
            + p.tp_weight * tp
        )

    def feasible(self, counts: np.ndarray) -> np.ndarray:
        """The constraint for count vectors ``counts[..., 4]`` (see the module docstring)."""
        c = self.p.min_confidence
        f = counts.astype(np.float64)
        z = self.p.confidence_z
        plain = wilson_lower(f[..., TP], f[..., TP] + f[..., FP], z) >= c
        honest = wilson_lower(f[..., TP_H], f[..., TP_H] + f[..., FP_H], z) >= c
        return plain & honest

    def value(
        self,
        counts: np.ndarray,
        size: int,
        prior_sum: np.ndarray | float,
        constrained: bool = True,
    ) -> np.ndarray:
        """Log posterior of sets with these counts, ``size`` rules and summed rule priors."""
        out = (
            self.loglik(counts[..., TP], counts[..., FP])
            + self.size_prior[min(size, len(self.size_prior) - 1)]
            + prior_sum
        )
        return np.where(self.feasible(counts), out, -np.inf) if constrained else out


@dataclass
class ChainResult:
    """The best feasible set a chain visited."""

    selected: list[int]
    log_post: float
    counts: list[int]


def _softmax_pick(rng: np.random.Generator, score: np.ndarray, temp: float) -> int | None:
    finite = np.isfinite(score)
    if not finite.any():
        return None
    z = np.where(finite, (score - score[finite].max()) / max(temp, 1e-12), -np.inf)
    prob = np.exp(z)
    prob /= prob.sum()
    return int(rng.choice(score.size, p=prob))


class _Coverage:
    """Incremental coverage counts of the current set over four bool[rules, rows] matrices
    (positives, negatives, honest positives, honest negatives).

    ``marg[k, r]``: rows of matrix k that rule r would newly cover.
    """

    def __init__(self, mats: list[np.ndarray]) -> None:
        self.mats = mats
        self.cnt = [np.zeros(m.shape[1], dtype=np.int32) for m in mats]
        self.marg = np.stack([m.sum(axis=1) for m in mats]).astype(np.int64)

    def unique(self, r: int) -> list[np.ndarray]:
        """Per matrix, the rows only rule r covers (they become uncovered if it leaves)."""
        return [np.flatnonzero(m[r] & (c == 1)) for m, c in zip(self.mats, self.cnt, strict=True)]

    def gain_back(self, rows: list[np.ndarray]) -> np.ndarray:
        """Per matrix and rule, how many of ``rows`` (uncovered again) the rule covers."""
        return np.stack([m[:, i].sum(axis=1) for m, i in zip(self.mats, rows, strict=True)])

    def add(self, r: int) -> None:
        new = [np.flatnonzero(m[r] & (c == 0)) for m, c in zip(self.mats, self.cnt, strict=True)]
        self.marg -= self.gain_back(new)
        for m, c in zip(self.mats, self.cnt, strict=True):
            c[m[r]] += 1

    def remove(self, r: int, uniq: list[np.ndarray]) -> None:
        self.marg += self.gain_back(uniq)
        for m, c in zip(self.mats, self.cnt, strict=True):
            c[m[r]] -= 1


def run_chain(
    mats: list[np.ndarray], lengths: np.ndarray, params: BayesParams, seed: int
) -> ChainResult:
    """One annealed MCMC chain; ``mats`` = [cov_pos, cov_neg, honest_pos, honest_neg]."""
    rng = np.random.default_rng(seed)
    n_rules = mats[0].shape[0]
    post = Posterior(lengths, mats[0].shape[1], mats[1].shape[1], params)
    rule_prior = post.rule_prior
    state = _Coverage(mats)
    selected: list[int] = []
    in_set = np.zeros(n_rules, dtype=bool)
    counts = np.zeros(4, dtype=np.int64)
    cur = float(post.value(counts, 0, 0.0))

    def add_values(marg: np.ndarray, base: np.ndarray, kept: list[int]) -> np.ndarray:
        """Log posterior of ``kept + [r]`` for every candidate r (−inf where pointless)."""
        val = post.value(
            (base[:, None] + marg).T, len(kept) + 1, rule_prior[kept].sum() + rule_prior
        )
        val[in_set | (marg[TP] == 0)] = -np.inf
        return val

    # temperature scale: what the best single rule is worth over the empty set
    gain0 = add_values(state.marg, counts, []) - cur
    scale = max(abs(float(np.max(gain0))), 1.0) if np.isfinite(gain0).any() else 1.0
    t0, t1 = params.t_start * scale, params.t_end * scale
    best = ChainResult([], cur, counts.tolist())

    for it in range(params.n_iterations):
        temp = t0 * (t1 / t0) ** (it / max(params.n_iterations - 1, 1))
        moves = ["add"] if len(selected) < params.max_rules else []
        if selected:
            moves += ["remove", "replace"]
        move = moves[int(rng.integers(len(moves)))]
        r_out: int | None = None
        r_in: int | None = None
        uniq_out: list[np.ndarray] = []
        if move == "add":
            r_in = _softmax_pick(rng, add_values(state.marg, counts, selected), temp)
            if r_in is None:
                continue
            new_counts = counts + state.marg[:, r_in]
        else:
            uniq = [state.unique(r) for r in selected]
            after = np.stack([counts - np.array([u.size for u in us]) for us in uniq])
            kept_prior = rule_prior[selected].sum() - rule_prior[selected]
            # "remove" must stay feasible; "replace" only once the new rule is in
            rm = post.value(after, len(selected) - 1, kept_prior, constrained=move == "remove")
            k = _softmax_pick(rng, rm, temp)
            if k is None:
                continue
            r_out, uniq_out, new_counts = selected[k], uniq[k], after[k]
            if move == "replace":
                kept = [r for r in selected if r != r_out]
                marg2 = state.marg + state.gain_back(uniq_out)
                vals = add_values(marg2, new_counts, kept)
                vals[r_out] = -np.inf
                r_in = _softmax_pick(rng, vals, temp)
                if r_in is None:
                    continue
                new_counts = new_counts + marg2[:, r_in]

        new_sel = [r for r in selected if r != r_out] + ([r_in] if r_in is not None else [])
        new = float(post.value(new_counts, len(new_sel), rule_prior[new_sel].sum()))
        if not np.isfinite(new):
            continue
        if new < cur and rng.random() >= math.exp((new - cur) / max(temp, 1e-12)):
            continue
        if r_out is not None:
            state.remove(r_out, uniq_out)
            in_set[r_out] = False
        if r_in is not None:
            state.add(r_in)
            in_set[r_in] = True
        selected, counts, cur = new_sel, new_counts, new
        if cur > best.log_post:
            best = ChainResult(sorted(selected), cur, counts.tolist())
    return best


def prune(
    mats: list[np.ndarray], lengths: np.ndarray, params: BayesParams, selected: list[int]
) -> list[int]:
    """Drop rules that add fewer than ``min_rule_gain`` of the set's true positives.

    The weakest rule goes first, and only while the set stays feasible: a short list of rules
    that each matter is easier to read, check and deploy than a long tail of tiny ones.
    """
    post = Posterior(lengths, mats[0].shape[1], mats[1].shape[1], params)
    sel = list(selected)
    while len(sel) > 1:
        state = _Coverage(mats)
        for r in sel:
            state.add(r)
        counts = np.array([np.count_nonzero(c) for c in state.cnt], dtype=np.int64)
        uniq = [state.unique(r) for r in sel]
        gains = np.array([u[TP].size for u in uniq])
        for k in np.argsort(gains, kind="stable"):
            if gains[k] >= params.min_rule_gain * counts[TP]:
                return sel
            after = counts - np.array([u.size for u in uniq[k]])
            if post.feasible(after):
                sel.pop(int(k))
                break
        else:
            return sel
    return sel


def select_rules(
    cov: np.ndarray,
    y: np.ndarray,
    lengths: np.ndarray,
    params: BayesParams,
    honest_cov: np.ndarray | None = None,
    honest_y: np.ndarray | None = None,
    n_chains: int = 3,
    seed: int = 0,
    use_ray: bool = True,
) -> ChainResult:
    """Run ``n_chains`` seeded chains (Ray tasks when ``use_ray``); return the best set found.

    ``cov``: bool[rules, rows] coverage of the selection rows with labels ``y``;
    ``honest_cov`` / ``honest_y``: the same for the honest rows, which no rule was mined on
    (default: the selection rows themselves).
    """
    if honest_cov is None:
        honest_cov, honest_y = cov, y
    mats = []
    for m, labels in ((cov, y), (honest_cov, honest_y)):
        pos = np.asarray(labels) == 1
        mats += [np.ascontiguousarray(m[:, pos]), np.ascontiguousarray(m[:, ~pos])]
    seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n_chains)]
    lengths = np.asarray(lengths)
    if use_ray and n_chains > 1:
        require_ray("rule-set selection chains (use_ray=True)")
        task = ray.remote(num_cpus=1)(run_chain)
        mats_ref = ray.put(mats)
        results = ray.get([task.remote(mats_ref, lengths, params, s) for s in seeds])
    else:
        results = [run_chain(mats, lengths, params, s) for s in seeds]
    best = max(results, key=lambda r: r.log_post)  # first chain wins ties: deterministic
    log.debug("chains: %s", [round(r.log_post, 1) for r in results])
    if params.min_rule_gain > 0 and len(best.selected) > 1:
        best.selected = sorted(prune(mats, lengths, params, best.selected))
    return best
