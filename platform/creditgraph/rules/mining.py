"""CARM: candidate rules from constraint-aware decision trees, grown in parallel as Ray tasks.

A split of a node is scored by its (normalized) Gini gain plus ``fitness_weight`` times its
constraint fitness: the better of its two children at meeting the confidence constraint,
``min(1, conf_s / c)``, where ``conf_s`` is the child's confidence shrunk toward the base rate
by ``fitness_prior`` pseudo-samples (so that a handful of rows cannot look like a sure hit).
Splits that meet the constraint are preferred first, and among them the purer ones.

The split search is vectorized: per node, one 2-D argsort of the node's rows over the tree's
features, cumulative weighted counts, and every threshold of every feature scored at once.
Missing values are routed as a learned direction (the child's condition then reads
``... or x is missing``), or split off on their own (``x is missing`` / ``x is not missing``);
a condition never matches a missing value unless it says so.

Every root-to-node path of every tree is a candidate rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray

from creditgraph.rules.rule import Condition, Rule, simplify
from creditgraph.utils.logs import get_logger
from creditgraph.utils.runtime import require_ray

log = get_logger(__name__)

# A path condition inside a tree: (feature index, op, threshold or nan, include_missing).
PathCond = tuple[int, str, float, bool]


@dataclass(frozen=True)
class TreeParams:
    """Settings of one constraint-aware tree."""

    min_confidence: float
    base_rate: float
    max_depth: int = 4
    min_leaf: float = 20.0
    fitness_weight: float = 0.5
    fitness_prior: float = 20.0


def nice_threshold(lo: float, hi: float) -> float:
    """The number with the fewest significant digits in ``[lo, hi)``, near their midpoint.

    ``x <= t`` then splits the training rows exactly as any threshold in the gap would, and
    reads like a human wrote it (``20000`` rather than ``24999.5``).
    """
    mid = 0.5 * (lo + hi)
    for digits in range(1, 18):
        for t in (float(f"{mid:.{digits}g}"), float(f"{lo:.{digits}g}")):
            if lo <= t < hi:
                return t
    return float(lo)


def _gini(w: np.ndarray, p: np.ndarray) -> np.ndarray:
    q = np.divide(p, w, out=np.zeros_like(p), where=w > 0)
    return 2.0 * q * (1.0 - q)


def _score(
    wl: np.ndarray,
    pl: np.ndarray,
    wr: np.ndarray,
    pr: np.ndarray,
    w: float,
    p: float,
    params: TreeParams,
) -> np.ndarray:
    """Normalized Gini gain + fitness_weight * constraint fitness, for arrays of splits."""
    g_parent = 2.0 * (p / w) * (1.0 - p / w)
    gain = (g_parent - (wl * _gini(wl, pl) + wr * _gini(wr, pr)) / w) / g_parent
    s, pi, c = params.fitness_prior, params.base_rate, params.min_confidence
    with np.errstate(divide="ignore", invalid="ignore"):  # masked positions may be degenerate
        fit_l = np.minimum(1.0, (pl + s * pi) / (wl + s) / c)
        fit_r = np.minimum(1.0, (pr + s * pi) / (wr + s) / c)
    score = gain + params.fitness_weight * np.maximum(fit_l, fit_r)
    ok = (wl >= params.min_leaf) & (wr >= params.min_leaf)
    return np.where(ok, score, -np.inf)


def best_split(
    xn: np.ndarray, yn: np.ndarray, wn: np.ndarray, params: TreeParams
) -> tuple[float, int, str, float, str] | None:
    """The best split of one node over all columns of ``xn`` (rows of the node only).

    Returns ``(score, column, kind, threshold, missing_to)`` with kind ``"cmp"`` (``x <= t``
    left, ``x > t`` right, missing rows to ``missing_to`` in {"left", "right", "none"}) or
    ``"missing"`` (missing left, observed right); ``None`` if no split is allowed.
    """
    m, k = xn.shape
    if m < 2:
        return None
    pw = wn * yn
    w_tot, p_tot = float(wn.sum()), float(pw.sum())
    order = np.argsort(xn, axis=0, kind="stable")  # NaN sorts last
    xs = np.take_along_axis(xn, order, axis=0)
    cw = np.cumsum(wn[order], axis=0)
    cp = np.cumsum(pw[order], axis=0)
    n_obs = m - np.isnan(xn).sum(axis=0)
    cols = np.arange(k)
    last = np.maximum(n_obs - 1, 0)
    w_obs = np.where(n_obs > 0, cw[last, cols], 0.0)
    p_obs = np.where(n_obs > 0, cp[last, cols], 0.0)
    w_mis, p_mis = w_tot - w_obs, p_tot - p_obs

    # threshold between sorted rows i and i+1 (both observed, distinct values)
    with np.errstate(invalid="ignore"):
        gap = xs[1:] > xs[:-1]
    wl, pl = cw[:-1], cp[:-1]
    wr, pr = w_obs - wl, p_obs - pl
    # A: missing rows go right (or there are none); B: missing rows go left
    score_a = np.where(gap, _score(wl, pl, wr + w_mis, pr + p_mis, w_tot, p_tot, params), -np.inf)
    has_mis = w_mis > 0
    if has_mis.any():
        score_b = _score(wl + w_mis, pl + p_mis, wr, pr, w_tot, p_tot, params)
        score_b = np.where(gap & has_mis, score_b, -np.inf)
        score_m = _score(w_mis, p_mis, w_obs, p_obs, w_tot, p_tot, params)
        score_m = np.where(has_mis & (n_obs > 0), score_m, -np.inf)
    else:
        score_b = np.full_like(score_a, -np.inf)
        score_m = np.full(k, -np.inf)

    best = (-np.inf, -1, "", np.nan, "none")
    for kind, arr in (("a", score_a), ("b", score_b)):
        if arr.size == 0:
            continue
        flat = int(np.argmax(arr))
        i, j = divmod(flat, k)
        if arr[i, j] > best[0]:
            t = nice_threshold(float(xs[i, j]), float(xs[i + 1, j]))
            to = ("right" if has_mis[j] else "none") if kind == "a" else "left"
            best = (float(arr[i, j]), j, "cmp", t, to)
    j = int(np.argmax(score_m))
    if score_m[j] > best[0]:
        best = (float(score_m[j]), j, "missing", np.nan, "left")
    return None if not np.isfinite(best[0]) else best


def tree_sample(
    seed: int, n: int, d: int, max_features: float, bootstrap: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The feature subset and bootstrap row weights of the tree with this seed."""
    rng = np.random.default_rng(seed)
    k = max(1, round(max_features * d))
    feats = np.sort(rng.choice(d, size=k, replace=False))
    if bootstrap:
        w = np.bincount(rng.integers(0, n, size=n), minlength=n).astype(np.float64)
    else:
        w = np.ones(n)
    return feats, w


def grow_tree(
    X: np.ndarray,
    y: np.ndarray,
    seed: int,
    params: TreeParams,
    max_features: float = 0.7,
    bootstrap: bool = True,
) -> list[tuple[PathCond, ...]]:
    """Grow one constraint-aware tree on a bootstrap and a feature subset; return its paths.

    Each returned path (one per non-root node) is a tuple of conditions on column indices.
    """
    feats, w = tree_sample(seed, *X.shape, max_features, bootstrap)
    root = np.flatnonzero(w > 0)
    Xf = X[:, feats]
    paths: list[tuple[PathCond, ...]] = []
    stack: list[tuple[np.ndarray, int, tuple[PathCond, ...]]] = [(root, 0, ())]
    while stack:
        idx, depth, path = stack.pop()
        if path:
            paths.append(path)
        if depth >= params.max_depth:
            continue
        wn, yn = w[idx], y[idx]
        w_node, p_node = wn.sum(), (wn * yn).sum()
        if w_node < 2 * params.min_leaf or p_node <= 0 or p_node >= w_node:
            continue
        xn = Xf[idx]
        split = best_split(xn, yn, wn, params)
        if split is None:
            continue
        _, j, kind, t, to = split
        f = int(feats[j])
        col = xn[:, j]
        miss = np.isnan(col)
        if kind == "missing":
            left_mask = miss
            cl: PathCond = (f, "is missing", np.nan, False)
            cr: PathCond = (f, "is not missing", np.nan, False)
        else:
            with np.errstate(invalid="ignore"):
                le = col <= t
            left_mask = le | miss if to == "left" else le & ~miss
            cl = (f, "<=", t, to == "left")
            cr = (f, ">", t, to == "right")
        stack.append((idx[~left_mask], depth + 1, (*path, cr)))
        stack.append((idx[left_mask], depth + 1, (*path, cl)))
    return paths


def paths_to_rules(trees: list[list[tuple[PathCond, ...]]], feature_names: list[str]) -> list[Rule]:
    """Turn the trees' paths into simplified, de-duplicated rules (first occurrence kept)."""
    seen: set[tuple] = set()
    rules: list[Rule] = []
    for path in (p for tree in trees for p in tree):
        conds = [
            Condition(feature_names[f], op, None if np.isnan(t) else t, inc)  # type: ignore[arg-type]
            for f, op, t, inc in path
        ]
        simple = simplify(conds)
        if not simple:
            continue
        rule = Rule(simple)
        if rule.key in seen:
            continue
        seen.add(rule.key)
        rules.append(rule)
    return rules


def mine_rules(
    X: np.ndarray,
    y: np.ndarray,
    feature_names: list[str],
    params: TreeParams,
    n_estimators: int = 40,
    max_features: float = 0.7,
    seed: int = 0,
    use_ray: bool = True,
    bootstrap: bool = True,
) -> list[Rule]:
    """Grow ``n_estimators`` CARM trees (Ray tasks when ``use_ray``) and collect their rules.

    Tree ``i`` gets its own child seed of ``seed``, so the result does not depend on where or
    in which order the trees ran.
    """
    seeds = [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n_estimators)]
    if use_ray:
        require_ray("rule mining (use_ray=True)")
        task = ray.remote(num_cpus=1)(grow_tree)
        x_ref, y_ref = ray.put(X), ray.put(y)
        refs = [task.remote(x_ref, y_ref, s, params, max_features, bootstrap) for s in seeds]
        trees = ray.get(refs)
    else:
        trees = [grow_tree(X, y, s, params, max_features, bootstrap) for s in seeds]
    rules = paths_to_rules(trees, feature_names)
    log.debug("mined %d paths -> %d distinct rules", sum(map(len, trees)), len(rules))
    return rules


def coverage_matrix(rules: list[Rule], X: np.ndarray, feature_names: list[str]) -> np.ndarray:
    """``bool[n_rules, n_rows]``: rule r covers row i (condition masks cached across rules)."""
    col = {f: i for i, f in enumerate(feature_names)}
    cache: dict[Condition, np.ndarray] = {}
    out = np.empty((len(rules), X.shape[0]), dtype=bool)
    for r, rule in enumerate(rules):
        m = np.ones(X.shape[0], dtype=bool)
        for c in rule.conditions:
            cm = cache.get(c)
            if cm is None:
                cm = cache[c] = c.mask(X[:, col[c.feature]])
            m &= cm
        out[r] = m
    return out
