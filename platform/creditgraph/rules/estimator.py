"""``ConstrainedRuleSet``: CRSL as a scikit-learn-style estimator.

fit = CARM candidate mining (Ray tasks, bootstraps of the mining rows) -> three-filter ranking
(stability measured on the validation rows) -> constraint-adaptive Bayesian selection by MCMC
on all training rows. The training rows are split (stratified) into mining and validation
rows; no candidate is mined on a validation row, which makes them the honest check of a set.
The constraint is hard: the Wilson lower bound (``confidence_z`` standard errors) of the
selected set's confidence must reach ``min_confidence`` on all training rows (so its training
confidence does) and on the validation rows, so that held-out confidence usually meets the
target too. If no set of candidates meets it the rule set is empty (nothing is flagged) and a
warning says so.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin

from creditgraph.rules.mining import TreeParams, coverage_matrix, mine_rules
from creditgraph.rules.ranking import rank_rules
from creditgraph.rules.rule import Rule, RuleSet
from creditgraph.rules.selection import BayesParams, select_rules
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)


def as_matrix(
    X: pd.DataFrame | np.ndarray, feature_names: list[str] | None = None
) -> tuple[np.ndarray, list[str]]:
    """Features as ``float64[n, d]`` (NaN = missing) and their names; clear error otherwise."""
    if isinstance(X, pd.DataFrame):
        names = [str(c) for c in X.columns]
        cols = []
        for c in X.columns:
            s = X[c]
            if not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s)):
                raise ValueError(f"feature column {c!r} is not numeric (dtype {s.dtype})")
            cols.append(s.to_numpy(dtype=np.float64, na_value=np.nan))
        arr = np.column_stack(cols) if cols else np.empty((len(X), 0))
    else:
        arr = np.asarray(X, dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"X must be 2-D, got shape {arr.shape}")
        names = list(feature_names) if feature_names else [f"x{i}" for i in range(arr.shape[1])]
    if len(names) != arr.shape[1]:
        raise ValueError(f"{len(names)} feature names for {arr.shape[1]} columns")
    if np.isinf(arr).any():
        j = int(np.flatnonzero(np.isinf(arr).any(axis=0))[0])
        raise ValueError(f"feature column {names[j]!r} has infinite values (use NaN for missing)")
    return arr, names


def as_labels(y: Any) -> np.ndarray:
    """Binary labels as ``int8`` in {0, 1}; anything else is an error."""
    arr = np.asarray(y, dtype=np.float64).ravel()
    bad = ~np.isin(arr, (0.0, 1.0))
    if bad.any():
        raise ValueError(
            f"labels must be 0/1 without missing values; found {int(bad.sum())} other value(s), "
            f"e.g. {arr[bad][:3].tolist()}"
        )
    return arr.astype(np.int8)


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (first, second) with ``fraction`` of each class in the second part."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(y == cls))
        k = round(fraction * idx.size)
        second.append(idx[:k])
        first.append(idx[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


class ConstrainedRuleSet(ClassifierMixin, BaseEstimator):
    """A rule set ("or of ands") with confidence >= ``min_confidence`` and maximal coverage.

    Parameters
    ----------
    min_confidence : the constraint c: the share of flagged rows that are positive.
    n_estimators, max_depth, max_features : CARM trees: how many, how deep (= longest rule
        before merging conditions on one feature), share of features per tree.
    min_support, min_samples_leaf : smallest tree node (= rule support), as a share of the
        mining rows and in rows; the larger of the two applies.
    fitness_weight, fitness_prior : weight of the constraint fitness in the split criterion and
        the pseudo-count shrinking a child's confidence toward the base rate.
    max_candidates, stability_z : candidates kept by the ranker for selection; rules whose
        validation WRAcc falls more than ``stability_z`` standard errors below their mining
        WRAcc are dropped as unstable.
    max_rules, lambda_rules, max_length, lambda_length : truncated-Poisson priors on the
        number of rules and on rule length (``max_rules`` is also a hard cap).
    tp_weight : nats of log likelihood per true positive on top of the beta-binomial
        likelihood: coverage grows until the constraint, not the likelihood, stops it.
    min_rule_gain : after the search, rules adding fewer than this share of the set's true
        positives are dropped (weakest first, while the constraint holds).
    confidence_z : margin of the constraint: the Wilson lower bound (z standard errors) of the
        set's confidence must reach c on all training rows and on the validation rows;
        0 = plain confidence >= c on both.
    n_iterations, n_chains : MCMC length and number of seeded chains (Ray tasks).
    validation_fraction : share of training rows held out from mining: the stability filter
        and the honest half of the constraint use them.
    random_state : seed of everything random; same seed, same data -> same rules.
    use_ray : grow trees and run chains as Ray tasks (False: in-process, same result).
    """

    def __init__(
        self,
        min_confidence: float = 0.7,
        *,
        n_estimators: int = 40,
        max_depth: int = 4,
        max_features: float = 0.7,
        min_support: float = 0.002,
        min_samples_leaf: int = 20,
        fitness_weight: float = 0.5,
        fitness_prior: float = 20.0,
        max_candidates: int = 800,
        stability_z: float = 2.0,
        max_rules: int = 10,
        lambda_rules: float = 5.0,
        max_length: int = 8,
        lambda_length: float = 2.0,
        tp_weight: float = 1.0,
        min_rule_gain: float = 0.02,
        confidence_z: float = 1.5,
        n_iterations: int = 2000,
        n_chains: int = 3,
        validation_fraction: float = 0.5,
        random_state: int = 0,
        use_ray: bool = True,
    ) -> None:
        self.min_confidence = min_confidence
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.max_features = max_features
        self.min_support = min_support
        self.min_samples_leaf = min_samples_leaf
        self.fitness_weight = fitness_weight
        self.fitness_prior = fitness_prior
        self.max_candidates = max_candidates
        self.stability_z = stability_z
        self.max_rules = max_rules
        self.lambda_rules = lambda_rules
        self.max_length = max_length
        self.lambda_length = lambda_length
        self.tp_weight = tp_weight
        self.min_rule_gain = min_rule_gain
        self.confidence_z = confidence_z
        self.n_iterations = n_iterations
        self.n_chains = n_chains
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.use_ray = use_ray

    def _check_params(self) -> None:
        c = self.min_confidence
        if not 0 < c < 1:
            raise ValueError(f"min_confidence must be in (0, 1), got {c}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.max_rules < 1 or self.max_depth < 1 or self.n_estimators < 1:
            raise ValueError("max_rules, max_depth and n_estimators must be >= 1")
        if not 0 < self.max_features <= 1:
            raise ValueError(f"max_features must be in (0, 1], got {self.max_features}")

    # ------------------------------------------------------------------------------------
    def fit(
        self,
        X: pd.DataFrame | np.ndarray,
        y: Any,
        *,
        feature_names: list[str] | None = None,
        target_name: str = "target",
    ) -> ConstrainedRuleSet:
        """Learn the rule set from features ``X`` (NaN = missing) and 0/1 labels ``y``."""
        self._check_params()
        t_start = time.perf_counter()
        Xa, names = as_matrix(X, feature_names)
        ya = as_labels(y)
        if len(ya) != Xa.shape[0]:
            raise ValueError(f"X has {Xa.shape[0]} rows but y has {len(ya)}")
        if ya.min() == ya.max():
            raise ValueError("labels have a single class; need both 0 and 1")
        self.feature_names_in_ = np.array(names, dtype=object)
        self.n_features_in_ = len(names)
        self.classes_ = np.array([0, 1])
        c = float(self.min_confidence)

        mine_idx, val_idx = stratified_split(ya, self.validation_fraction, self.random_state)
        X_mine, y_mine = Xa[mine_idx], ya[mine_idx]
        base_rate = float(y_mine.mean())
        params = TreeParams(
            min_confidence=c,
            base_rate=base_rate,
            max_depth=self.max_depth,
            min_leaf=max(float(self.min_samples_leaf), self.min_support * len(mine_idx)),
            fitness_weight=self.fitness_weight,
            fitness_prior=self.fitness_prior,
        )
        t0 = time.perf_counter()
        candidates = mine_rules(
            X_mine,
            y_mine.astype(np.float64),
            names,
            params,
            n_estimators=self.n_estimators,
            max_features=self.max_features,
            seed=self.random_state,
            use_ray=self.use_ray,
        )
        t_mine = time.perf_counter() - t0

        t0 = time.perf_counter()
        cov_all = coverage_matrix(candidates, Xa, names)
        # drop candidates with identical coverage of the training rows (shortest kept)
        order = sorted(range(len(candidates)), key=lambda i: (candidates[i].length, i))
        seen: set[bytes] = set()
        uniq = []
        for i in order:
            sig = np.packbits(cov_all[i]).tobytes()
            if sig not in seen:
                seen.add(sig)
                uniq.append(i)
        uniq.sort()
        candidates, cov_all = [candidates[i] for i in uniq], cov_all[uniq]
        ranking = rank_rules(
            cov_all[:, mine_idx],
            y_mine,
            cov_all[:, val_idx],
            ya[val_idx],
            self.max_candidates,
            self.stability_z,
        )
        kept = ranking.kept
        pool = [candidates[i] for i in kept]
        cov_pool = cov_all[kept]
        t_rank = time.perf_counter() - t0

        t0 = time.perf_counter()
        chosen: list[int] = []
        if pool:
            bayes = BayesParams(
                min_confidence=c,
                confidence_z=self.confidence_z,
                max_rules=self.max_rules,
                lambda_rules=self.lambda_rules,
                max_length=self.max_length,
                lambda_length=self.lambda_length,
                tp_weight=self.tp_weight,
                min_rule_gain=self.min_rule_gain,
                n_iterations=self.n_iterations,
            )
            lengths = np.array([r.length for r in pool], dtype=np.int64)
            chosen = select_rules(
                cov_pool,
                ya,
                lengths,
                bayes,
                honest_cov=cov_pool[:, val_idx],  # no candidate was mined on these rows
                honest_y=ya[val_idx],
                n_chains=self.n_chains,
                seed=self.random_state,
                use_ray=self.use_ray,
            ).selected
        t_select = time.perf_counter() - t0
        v_flag = (
            cov_pool[chosen][:, val_idx].any(axis=0) if chosen else np.zeros(len(val_idx), bool)
        )
        v_tp = int((v_flag & (ya[val_idx] == 1)).sum())

        rules = self._finalize([pool[i] for i in chosen], cov_pool[chosen], ya)
        flagged = cov_pool[chosen].any(axis=0) if chosen else np.zeros(len(ya), dtype=bool)
        tp, n_flag = int((flagged & (ya == 1)).sum()), int(flagged.sum())
        covered = flagged.astype(bool)
        else_rate = float(ya[~covered].mean()) if (~covered).any() else 0.0
        self.fit_stats_ = {
            "rows": len(ya),
            "positives": int(ya.sum()),
            "base_rate": float(ya.mean()),
            "candidates_mined": len(uniq),
            "candidates_kept": len(pool),
            "rules": len(rules),
            "mean_rule_length": float(np.mean([r.length for r in rules])) if rules else 0.0,
            "train_flagged": n_flag,
            "train_confidence": tp / n_flag if n_flag else None,
            "train_recall": tp / int(ya.sum()),
            "validation_flagged": int(v_flag.sum()),
            "validation_confidence": v_tp / int(v_flag.sum()) if v_flag.any() else None,
            "uncovered_positive_rate": else_rate,
            "seconds": {
                "mine": t_mine,
                "rank": t_rank,
                "select": t_select,
                "total": time.perf_counter() - t_start,
            },
        }
        if not rules:
            log.warning(
                "no rule set meets confidence %.3g on the training and validation rows "
                "(z=%.2g): the rule set is empty and flags nothing",
                c,
                self.confidence_z,
            )
        self.rules_ = RuleSet(
            rules=rules,
            target=target_name,
            min_confidence=c,
            meta={
                "feature_names": names,
                "params": self.get_params(),
                "fit": {k: v for k, v in self.fit_stats_.items() if k != "seconds"},
            },
        )
        return self

    @staticmethod
    def _finalize(rules: list[Rule], cov: np.ndarray, y: np.ndarray) -> list[Rule]:
        """Order by training confidence (best first), name R1..Rk, attach training stats."""
        stats = []
        for r, m in zip(rules, cov, strict=True):
            n = int(m.sum())
            tp = int((m & (y == 1)).sum())
            stats.append((tp / max(n, 1), n, tp, r))
        stats.sort(key=lambda s: (-s[0], -s[1], s[3].text))
        return [
            Rule(
                r.conditions,
                name=f"R{i + 1}",
                stats={"support": n, "positives": tp, "confidence": conf},
            )
            for i, (conf, n, tp, r) in enumerate(stats)
        ]

    # ------------------------------------------------------------------------------------
    def _frame(self, X: pd.DataFrame | np.ndarray) -> pd.DataFrame | dict[str, np.ndarray]:
        if isinstance(X, pd.DataFrame):
            return X
        arr = np.asarray(X, dtype=np.float64)
        names = list(self.rules_.meta.get("feature_names") or [])
        if arr.ndim != 2 or arr.shape[1] != len(names):
            raise ValueError(f"X must have the {len(names)} training feature columns")
        return {n: arr[:, i] for i, n in enumerate(names)}

    def predict(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """1 for rows flagged by any rule, else 0."""
        return self.rules_.predict(self._frame(X))

    def predict_proba(self, X: pd.DataFrame | np.ndarray) -> np.ndarray:
        """[P(0), P(1)]: the training confidence of the first firing rule, else the training
        positive rate of the rows no rule covers."""
        cov = self.rules_.coverage(self._frame(X))
        else_rate = float(self.rules_.meta.get("fit", {}).get("uncovered_positive_rate", 0.0))
        p = np.full(cov.shape[0], else_rate)
        if cov.shape[1]:
            conf = np.array([r.stats.get("confidence", 1.0) for r in self.rules_.rules])
            hit = cov.any(axis=1)
            p[hit] = conf[cov.argmax(axis=1)[hit]]
        return np.column_stack([1 - p, p])

    def match(self, X: pd.DataFrame | np.ndarray, what: str = "name") -> np.ndarray:
        """Per row, the name (or text) of the first firing rule, ``None`` where none fires."""
        return self.rules_.match(self._frame(X), what=what)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.rules_.to_json()

    def save(self, path: str | Path) -> None:
        self.rules_.save(path)

    @classmethod
    def from_ruleset(cls, rs: RuleSet) -> ConstrainedRuleSet:
        """A fitted estimator around a stored rule set (for predicting, not refitting)."""
        params = dict(rs.meta.get("params") or {})
        valid = cls().get_params()
        est = cls(**{k: v for k, v in params.items() if k in valid})
        if rs.min_confidence is not None:
            est.min_confidence = rs.min_confidence
        est.rules_ = rs
        names = list(rs.meta.get("feature_names") or rs.features)
        rs.meta.setdefault("feature_names", names)
        est.feature_names_in_ = np.array(names, dtype=object)
        est.n_features_in_ = len(names)
        est.classes_ = np.array([0, 1])
        est.fit_stats_ = dict(rs.meta.get("fit") or {})
        return est

    @classmethod
    def from_json(cls, text: str) -> ConstrainedRuleSet:
        return cls.from_ruleset(RuleSet.from_json(text))

    @classmethod
    def load(cls, path: str | Path) -> ConstrainedRuleSet:
        return cls.from_ruleset(RuleSet.load(path))
