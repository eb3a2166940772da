"""A semi-synthetic dataset on real covariates: real rows, real limits, a known simulated truth.

The covariates of a CSV (for the UCI credit-default file: X2..X23 of 30,000 real card holders) and
each row's real historical limit are kept, so the feature distribution and the assignment
mechanism are nobody's design; the outcome, the missingness, the links and the time are
simulated around them so that the true risk curve of every row is known:

    p(default | x, do(L)) = sigmoid(base_logit + risk(x) + ring + dose(L / capacity(x)))

``risk(x)`` is a seeded random sparse nonlinear function of the standardized real covariates,
``capacity(x)`` a positive function of them calibrated on the real limits, ``dose`` the main
simulator's :func:`~creditgraph.data.simulate.dose_response`. See docs/simulation.md, section 9.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from creditgraph.data.convert import (
    UCI_FEATURES,
    UCI_ID,
    UCI_OUTCOME,
    UCI_TREATMENT,
    file_sha256,
    is_uci_layout,
    read_csv,
)
from creditgraph.data.errors import DataValidationError
from creditgraph.data.simulate import (
    ENTITY_TYPES,
    _groups,
    _sigmoid,
    dose_response,
    links_frame,
    simulate_links,
)
from creditgraph.data.spec import DatasetSpec, LimitTests
from creditgraph.utils.io import atomic_dir, write_json
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)

OUTPUT_COLUMNS = ("user_id", "as_of", "credit_limit", "default")
# UCI defaults: capacity from the bill and payment amounts; MNAR on fields a risky holder (or a
# patchy statement feed) leaves empty
UCI_CAPACITY = [f"X{i}" for i in range(12, 24)]
UCI_MNAR = {"X3": (-2.5, 0.8), "X12": (-2.2, 0.7), "X18": (-2.0, 0.9)}
DEFAULT_MNAR = (-2.2, 0.8)
SKEWED = 2.0  # |skewness| above which a covariate is standardized on a signed-log scale


class SemiSyntheticConfig(BaseModel):
    """Parameters of the semi-synthetic world (columns by their names in the input CSV; in
    ``capacity_columns`` and ``mnar`` their output names are accepted too).

    ``None`` defaults are resolved from the file: for the UCI layout id ``ID``, treatment ``X1``,
    drop ``Y``, readable feature names, capacity from the amounts, MNAR on education and the
    latest bill and payment; for another CSV ``treatment`` is required.
    """

    model_config = ConfigDict(extra="forbid")

    n_users: int | None = Field(None, ge=100, description="subsample this many rows; None = all")
    seed: int = 0
    # columns
    id_column: str | None = Field(
        None, description="the row id; None = a unique 'ID'/'id'/'user_id' column or row number"
    )
    treatment: str | None = Field(None, description="the real limit column (UCI: X1)")
    drop: list[str] | None = Field(
        None, description="columns left out (UCI: the real outcome Y is always left out)"
    )
    exclude: list[str] = Field(
        default_factory=list, description="columns kept in users.parquet but never features"
    )
    rename: dict[str, str] | None = Field(
        None, description="output names of covariates; None = readable UCI names or unchanged"
    )
    # the truth
    capacity_columns: list[str] | None = Field(
        None, description="covariates capacity is built from; None = UCI amounts or all"
    )
    utilisation_range: tuple[float, float] = Field(
        (0.2, 3.0), description="real limit / capacity spans this between its 5th and 95th pct"
    )
    target_default_rate: float = Field(
        0.2, gt=0.01, lt=0.9, description="default rate at the real limits (sets base_logit)"
    )
    risk_coef: float = Field(1.0, ge=0, description="logit sd of the covariate risk risk(x)")
    n_linear: int = Field(6, ge=1, description="covariates entering risk(x) linearly")
    n_interactions: int = Field(2, ge=0, description="pairwise products in risk(x)")
    n_thresholds: int = Field(2, ge=0, description="step functions in risk(x)")
    shape_split: bool = Field(
        True, description="half the rows (by a seeded covariate index) get a late-rising dose"
    )
    # treatment: the real limit, plus randomized limit tests
    limit_test_share: float = Field(0.1, ge=0, le=1)
    limit_test_zero_share: float = Field(0.1, ge=0, le=1)
    # missingness (MNAR): P(missing) = sigmoid(a + b * latent risk)
    missingness: bool = True
    mnar: dict[str, tuple[float, float]] | None = Field(
        None, description="column -> (a, b); None = UCI defaults or mnar_columns random columns"
    )
    mnar_columns: int = Field(3, ge=0)
    # graph
    links: bool = Field(True, description="False: a tabular dataset (no groups, no links)")
    ring_share: float = Field(0.05, ge=0, le=0.5)
    ring_size: tuple[int, int] = (3, 8)
    ring_selection: float = Field(1.0, ge=0, description="rings recruit rows ~ exp(this * risk)")
    ring_effect: float = Field(0.8, description="logit added to ring members' risk")
    ring_shock_sd: float = Field(0.5, ge=0, description="shared per-ring shock (correlated)")
    household_share: float = Field(0.2, ge=0, le=1)
    household_size: tuple[int, int] = (2, 4)
    office_share: float = Field(0.0, ge=0, le=1)
    office_size: tuple[int, int] = (5, 40)
    public_ips: int = Field(20, ge=1)
    public_ip_share: float = Field(0.3, ge=0, le=1)
    warehouses: int = Field(10, ge=1)
    warehouse_share: float = Field(0.08, ge=0, le=1)
    future_link_share: float = Field(0.1, ge=0, lt=1)
    resight_share: float = Field(0.3, ge=0, le=1)
    collection_group: int = Field(8, ge=2)
    # time
    start: str = Field("2005-04-01", description="as_of dates start here (UCI: April 2005)")
    span_days: float = Field(180.0, gt=0)
    label_window_days: float = Field(90.0, gt=0)
    snapshot_lag_days: float = Field(30.0, ge=0)
    history_days: float = Field(90.0, gt=0)
    # truth grid: None = 0 .. the 99th percentile of the real limits in ~truth_steps round steps
    truth_grid: list[float] | None = None
    truth_steps: int = Field(40, ge=2)

    @model_validator(mode="after")
    def _check(self) -> SemiSyntheticConfig:
        lo, hi = self.utilisation_range
        if not 0 < lo < hi:
            raise ValueError(f"utilisation_range must be 0 < low < high, got {(lo, hi)}")
        for name in ("ring_size", "household_size", "office_size"):
            a, b = getattr(self, name)
            if not 2 <= a <= b:
                raise ValueError(f"{name} must be (min, max) with 2 <= min <= max, got {(a, b)}")
        if self.truth_grid is not None:
            g = np.asarray(self.truth_grid, dtype=float)
            if len(g) < 2 or np.any(g < 0) or np.any(np.diff(g) <= 0):
                raise ValueError("truth_grid must be >= 2 increasing limits >= 0")
        pd.Timestamp(self.start)
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> SemiSyntheticConfig:
        return cls.model_validate(yaml.safe_load(Path(path).read_text()) or {})


@dataclass
class Covariates:
    """The input CSV resolved: ids, real limits, covariates (input names) and kept columns."""

    source: Path
    rows_in_file: int
    uci: bool
    id_column: str | None
    treatment: str
    dropped: list[str]
    ids: np.ndarray
    real_limit: np.ndarray
    X: pd.DataFrame
    kept: pd.DataFrame
    names: dict[str, str]


def read_covariates(path: str | Path, cfg: SemiSyntheticConfig) -> Covariates:
    """Read the CSV and split it into id, real limit and numeric covariates (clear errors)."""
    path = Path(path)
    file = str(path)
    df = read_csv(path)
    uci = is_uci_layout(df.columns)
    if uci and "LIMIT_BAL" in df.columns:
        from creditgraph.data.convert import UCI_ALIASES

        df = df.rename(columns=UCI_ALIASES)
    id_col = cfg.id_column or (UCI_ID if uci else _id_like(df))
    treatment = cfg.treatment or (UCI_TREATMENT if uci else None)
    if treatment is None:
        raise DataValidationError(
            file, message="which column is the real limit? name it with --treatment COL"
        )
    drop = list(cfg.drop or [])
    if uci and UCI_OUTCOME not in drop and UCI_OUTCOME not in cfg.exclude:
        drop.append(UCI_OUTCOME)  # the real outcome is never a covariate
    for col in [c for c in (id_col, treatment) if c] + drop + list(cfg.exclude):
        if col not in df.columns:
            raise DataValidationError(
                file, col, f"column not found; present: {list(df.columns)[:30]}"
            )
    if id_col is not None:
        ids = df[id_col]
        _bad(file, id_col, "missing id", ids.isna().to_numpy(), ids)
        _bad(file, id_col, "duplicate ids", ids.duplicated(keep=False).to_numpy(), ids)
        ids = ids.to_numpy()
    else:
        ids = np.arange(1, len(df) + 1)  # row number in the file
    t = pd.to_numeric(df[treatment], errors="coerce").to_numpy(dtype=float)
    _bad(file, treatment, "limits must be finite numbers", ~np.isfinite(t), df[treatment])
    _bad(file, treatment, "limits must be >= 0", t < 0, df[treatment])
    if (t > 0).sum() < 20:
        raise DataValidationError(
            file, treatment, "fewer than 20 positive limits: nothing to calibrate capacity on"
        )
    reserved = {c for c in (id_col, treatment) if c} | set(drop) | set(cfg.exclude)
    rest = [c for c in df.columns if c not in reserved]
    numeric = [
        c for c in rest if pd.api.types.is_numeric_dtype(df[c]) or pd.api.types.is_bool_dtype(df[c])
    ]
    skipped = [c for c in rest if c not in numeric]
    if skipped:
        log.warning("%s: non-numeric column(s) %s are not covariates", path.name, skipped)
    empty = [c for c in numeric if df[c].isna().all()]
    if empty:
        log.warning("%s: column(s) %s have no value in any row: not covariates", path.name, empty)
        numeric = [c for c in numeric if c not in empty]
    if len(numeric) < 2:
        raise DataValidationError(file, message=f"needs >= 2 numeric covariates, found {numeric}")
    X = df[numeric].astype(float)
    for c in numeric:
        _bad(file, c, "infinite values", np.isinf(X[c].to_numpy()), df[c])
    nan_cols = [c for c in numeric if X[c].isna().any()]
    if nan_cols:
        log.warning(
            "%s: column(s) %s have missing values: kept missing; the truth sees their median",
            path.name,
            nan_cols,
        )
    const = [c for c in numeric if X[c].nunique(dropna=True) <= 1]
    if const:
        log.warning("%s: constant column(s) %s carry no information", path.name, const)
    if (t == 0).mean() > 0.5:
        log.warning(
            "%s, column '%s': %.0f%% of the limits are 0; is it the limit column?",
            path.name,
            treatment,
            100 * (t == 0).mean(),
        )
    if cfg.rename is not None:
        names = {c: cfg.rename.get(c, c) for c in numeric}
    else:
        names = {c: UCI_FEATURES.get(c, c) if uci else c for c in numeric}
    out_names = list(names.values()) + list(cfg.exclude)
    clash = sorted(set(out_names) & set(OUTPUT_COLUMNS)) or sorted(
        {n for n in out_names if out_names.count(n) > 1}
    )
    if clash:
        raise DataValidationError(
            file, clash[0], f"output column name clashes with {OUTPUT_COLUMNS} or repeats"
        )
    return Covariates(
        source=path,
        rows_in_file=len(df),
        uci=uci,
        id_column=id_col,
        treatment=treatment,
        dropped=drop,
        ids=ids,
        real_limit=t,
        X=X,
        kept=df[list(cfg.exclude)],
        names=names,
    )


def _id_like(df: pd.DataFrame) -> str | None:
    """A column that is evidently the row id (named id/user_id, unique), else None."""
    for col in df.columns:
        if col.lower() in ("id", "user_id") and df[col].notna().all() and df[col].is_unique:
            return col
    return None


def _bad(file: str, col: str, message: str, mask: np.ndarray, s: pd.Series) -> None:
    if mask.any():
        rows = np.flatnonzero(mask)[:5]
        raise DataValidationError(
            file,
            col,
            message,
            rows=rows.tolist(),
            examples=[repr(s.iloc[r]) for r in rows],
            count=int(mask.sum()),
        )


def standardize(X: pd.DataFrame) -> np.ndarray:
    """Covariates on a common scale: signed log for heavy tails, median-filled, z-scored, clipped."""
    Z = np.empty(X.shape)
    for j, c in enumerate(X.columns):
        x = X[c].to_numpy(dtype=float)
        x = np.where(np.isnan(x), np.nanmedian(x), x)
        if abs(pd.Series(x).skew()) > SKEWED:
            x = np.sign(x) * np.log1p(np.abs(x))
        sd = x.std()
        Z[:, j] = np.clip((x - x.mean()) / (sd if sd > 0 else 1.0), -4.0, 4.0)
    return Z


def _risk_function(rng: np.random.Generator, Z: np.ndarray, cfg: SemiSyntheticConfig) -> tuple:
    """A seeded sparse nonlinear score of the covariates, scaled to sd 1, and its terms."""
    p = Z.shape[1]
    terms: list[dict] = []
    g = np.zeros(len(Z))
    for j, w in zip(
        rng.choice(p, min(cfg.n_linear, p), replace=False),
        rng.normal(0, 1, min(cfg.n_linear, p)),
        strict=True,
    ):
        g += w * Z[:, j]
        terms.append({"kind": "linear", "columns": [int(j)], "weight": float(w)})
    for _ in range(cfg.n_interactions):
        a, b = rng.choice(p, 2, replace=False)
        w = rng.normal(0, 0.7)
        g += w * Z[:, a] * Z[:, b]
        terms.append({"kind": "product", "columns": [int(a), int(b)], "weight": float(w)})
    for _ in range(cfg.n_thresholds):
        j = int(rng.integers(p))
        q = rng.uniform(0.2, 0.8)
        cut = float(np.quantile(Z[:, j], q))
        w = rng.normal(0, 1.2)
        g += w * (Z[:, j] > cut)
        terms.append({"kind": "step", "columns": [j], "weight": float(w), "above_z": cut})
    mean, sd = g.mean(), g.std()
    risk = (g - mean) / (sd if sd > 0 else 1.0)
    return risk, terms


def _capacity(
    Z: np.ndarray, cols: list[int], limit: np.ndarray, lo_hi: tuple[float, float]
) -> tuple[np.ndarray, dict]:
    """capacity(x) = exp(a + b * f(x)), f the least-squares fit of log real limit on ``cols``.

    (a, b) put the 5th..95th percentiles of real limit / capacity as close to ``lo_hi`` as the
    data allow (b in [0, 1]: 1 is the tightest utilisation spread, smaller widens it).
    """
    pos = limit > 0
    F = Z[:, cols]
    A = np.c_[np.ones(pos.sum()), F[pos]]
    ridge = 1e-3 * np.eye(A.shape[1])
    ridge[0, 0] = 0.0
    beta = np.linalg.solve(A.T @ A + ridge, A.T @ np.log(limit[pos]))
    f = F @ beta[1:]
    log_l = np.log(limit[pos])
    want = np.log(lo_hi[1]) - np.log(lo_hi[0])
    best = None
    for b in np.linspace(0.0, 1.0, 101):
        q05, q95 = np.quantile(log_l - b * f[pos], [0.05, 0.95])
        err = abs((q95 - q05) - want)
        if best is None or err < best[0] - 1e-12:
            best = (err, b, q05, q95)
    _, b, q05, q95 = best
    a = (q05 + q95) / 2 - (np.log(lo_hi[0]) + np.log(lo_hi[1])) / 2
    cap = np.exp(a + b * f)
    rho = limit[pos] / cap[pos]
    info = {
        "intercept": float(a),
        "scale": float(b),
        "fit_coef": [float(c) for c in beta[1:]],
        "utilisation_quantiles": {
            k: float(v)
            for k, v in zip(("q05", "q50", "q95"), np.quantile(rho, [0.05, 0.5, 0.95]), strict=True)
        },
    }
    return cap, info


def _solve_base_logit(offset: np.ndarray, target: float) -> float:
    """base_logit such that mean(sigmoid(base_logit + offset)) = target (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _sigmoid(mid + offset).mean() < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def nice_grid(top: float, steps: int) -> np.ndarray:
    """0..>= ``top`` in about ``steps`` round steps (1, 1.25, 2, 2.5, 5 times a power of ten)."""
    raw = max(top, 1e-9) / steps
    power = 10.0 ** np.floor(np.log10(raw))
    step = next(m * power for m in (1, 1.25, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    stop = np.ceil(top / step - 1e-9) * step
    return np.arange(0.0, stop + step / 2, step)


def _round_unit(limit: np.ndarray) -> float:
    """The rounding unit of randomized limits: 1 % of the median positive limit's power of ten."""
    med = float(np.median(limit[limit > 0]))
    return 10.0 ** np.floor(np.log10(med)) / 100


def simulate_semisynthetic(
    path: str | Path, cfg: SemiSyntheticConfig
) -> dict[str, pd.DataFrame | dict]:
    """Simulate the tables (users, links or None, truth, segments) and the resolved parameters."""
    cov = read_covariates(path, cfg)
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(8)]
    rng_sample, rng_fun, rng_group, rng_time, rng_test, rng_y, rng_miss, rng_link = streams

    # --- rows ---------------------------------------------------------------------------
    n_all = len(cov.ids)
    if cfg.n_users is not None and cfg.n_users > n_all:
        raise ValueError(f"{cov.source}: n_users={cfg.n_users} but the file has {n_all} rows")
    rows = (
        np.sort(rng_sample.choice(n_all, cfg.n_users, replace=False))
        if cfg.n_users is not None
        else np.arange(n_all)
    )
    n = len(rows)
    ids = cov.ids[rows]
    real = cov.real_limit[rows]
    X = cov.X.iloc[rows].reset_index(drop=True)
    columns = list(X.columns)
    if (real > 0).sum() < 20:
        raise ValueError(f"{cov.source}: fewer than 20 positive limits among the sampled rows")
    Z = standardize(X)

    # --- covariate risk and capacity ------------------------------------------------------
    risk, terms = _risk_function(rng_fun, Z, cfg)
    for term in terms:
        term["columns"] = [columns[j] for j in term["columns"]]
    a, b = rng_fun.choice(len(columns), 2, replace=False)
    wa, wb = rng_fun.normal(0, 1, 2)
    split = wa * Z[:, a] + wb * Z[:, b]
    late = (split > np.median(split)) if cfg.shape_split else np.zeros(n, dtype=bool)
    by_output = {out_name: c for c, out_name in cov.names.items()}

    def input_names(given: list[str]) -> list[str]:  # config may use input or output names
        return [c if c in columns else by_output.get(c, c) for c in given]

    if cfg.capacity_columns is not None:
        cap_cols = input_names(list(cfg.capacity_columns))
    else:
        cap_cols = [c for c in UCI_CAPACITY if c in columns] if cov.uci else columns
    unknown = [c for c in cap_cols if c not in columns]
    if unknown or not cap_cols:
        raise ValueError(
            f"{cov.source}: capacity_columns {unknown or cap_cols} are not covariates; "
            f"covariates: {columns}"
        )
    capacity, cap_info = _capacity(
        Z, [columns.index(c) for c in cap_cols], real, cfg.utilisation_range
    )
    cap_info["columns"] = cap_cols

    # --- rings, households, offices (only with links: a tabular world has no groups) ----------
    idx = np.arange(n)
    none = np.full(n, -1, dtype=np.int64)
    ring, household, office = none.copy(), none.copy(), none.copy()
    if cfg.links:
        ring = _groups(
            rng_group, idx, cfg.ring_share, cfg.ring_size, weights=np.exp(cfg.ring_selection * risk)
        )
        household = _groups(rng_group, idx, cfg.household_share, cfg.household_size)
        office = _groups(rng_group, idx, cfg.office_share, cfg.office_size)
        for g in (ring, household, office):  # a group of one shares nothing
            ids_, counts = np.unique(g[g >= 0], return_counts=True)
            g[np.isin(g, ids_[counts < 2])] = -1
        household[ring >= 0] = -1
    is_ring = ring >= 0
    n_rings = int(ring.max()) + 1 if is_ring.any() else 0
    shock = rng_group.normal(0, cfg.ring_shock_sd, max(n_rings, 1))
    ring_term = np.where(is_ring, cfg.ring_effect + shock[np.maximum(ring, 0)], 0.0)

    # --- time -----------------------------------------------------------------------------
    t0 = pd.Timestamp(cfg.start)
    as_of = rng_time.uniform(0, cfg.span_days, n)
    window = min(30.0, cfg.span_days)
    ring_start = rng_time.uniform(0, cfg.span_days - window, max(n_rings, 1))
    as_of[is_ring] = ring_start[ring[is_ring]] + rng_time.uniform(0, window, is_ring.sum())
    snapshot = cfg.span_days + cfg.snapshot_lag_days
    matured = as_of + cfg.label_window_days <= snapshot

    # --- the truth ----------------------------------------------------------------------
    latent = cfg.risk_coef * risk + ring_term
    shape = np.where(is_ring, 2, np.where(late, 1, 0))

    def offset(lim: np.ndarray) -> np.ndarray:
        return latent + dose_response(lim / capacity, shape)

    base_logit = _solve_base_logit(offset(real), cfg.target_default_rate)
    pos_real = real[real > 0]
    grid = (
        np.asarray(cfg.truth_grid, dtype=float)
        if cfg.truth_grid is not None
        else nice_grid(float(np.quantile(pos_real, 0.99)), cfg.truth_steps)
    )
    truth_p = _sigmoid(
        base_logit
        + latent[:, None]
        + dose_response(grid[None, :] / capacity[:, None], shape[:, None])
    )

    # --- logged limit: the real one, except for randomized limit tests ---------------------
    test = rng_test.random(n) < cfg.limit_test_share
    lo, hi = np.quantile(pos_real, [0.01, 0.99])
    unit = _round_unit(real)
    draw = np.exp(rng_test.uniform(np.log(lo), np.log(hi), n))
    test_limit = np.where(
        rng_test.random(n) < cfg.limit_test_zero_share,
        0.0,
        np.maximum(np.round(draw / unit), 1) * unit,
    )
    limit = np.where(test, test_limit, real)

    # --- outcome, drawn at the logged limit ------------------------------------------------
    p_obs = _sigmoid(base_logit + offset(limit))
    y = (rng_y.random(n) < p_obs).astype(float)
    outcome = np.where(matured, y, np.nan)

    # --- missing not at random -------------------------------------------------------------
    observed = X.copy()
    mnar: dict[str, tuple[float, float]] = {}
    if cfg.missingness:
        if cfg.mnar is not None:
            mnar = dict(zip(input_names(list(cfg.mnar)), cfg.mnar.values(), strict=True))
        elif cov.uci:
            mnar = {c: ab for c, ab in UCI_MNAR.items() if c in columns}
        else:
            k = min(cfg.mnar_columns, len(columns))
            mnar = {
                columns[j]: DEFAULT_MNAR
                for j in sorted(rng_miss.choice(len(columns), k, replace=False))
            }
        bad = [c for c in mnar if c not in columns]
        if bad:
            raise ValueError(f"{cov.source}: mnar names non-covariate column(s) {bad}")
    n_missing = observed.isna().sum(axis=1).to_numpy()
    for col, (a_, b_) in mnar.items():
        miss = rng_miss.random(n) < _sigmoid(a_ + b_ * latent)
        observed.loc[miss, col] = np.nan
        n_missing = n_missing + miss

    # --- links ----------------------------------------------------------------------------
    link_df = None
    supernode = np.zeros(n, dtype=bool)
    if cfg.links:
        links = simulate_links(
            rng_link, cfg, n, as_of, ring, household, office, defaulted=(y == 1) & matured
        )
        supernode[links["user_idx"][links["public"]]] = True
        link_df = links_frame(links, ids, t0)

    segment = np.select(
        [is_ring, supernode, n_missing >= 2],
        ["ring", "supernode_neighbour", "high_missing"],
        "ordinary",
    )
    users = pd.DataFrame({"user_id": ids})
    users["as_of"] = (t0 + pd.to_timedelta(as_of, unit="D")).astype("datetime64[ms]")
    for c in columns:
        users[cov.names[c]] = observed[c].to_numpy()
    for c in cov.kept.columns:
        users[c] = cov.kept[c].to_numpy()[rows]
    users["credit_limit"] = limit
    users["default"] = outcome
    truth = {
        "user_id": np.repeat(ids, len(grid)),
        "limit": np.tile(grid, n),
        "p_default": truth_p.astype(np.float32).ravel(),
    }
    segments = pd.DataFrame(
        {
            "user_id": ids,
            "segment": segment,
            "limit_test": test,
            "real_limit": real,
            "capacity": capacity,
            "latent_risk": latent,
            "p_default_observed": p_obs,
            "dose_shape": np.array(["ordinary", "late", "ring"])[shape],
            "ring_id": ring,
            "household_id": household,
            "office_id": office,
        }
    )
    resolved = {
        "source": cov.source.name,
        "rows_in_file": cov.rows_in_file,
        "uci_layout": cov.uci,
        "id_column": cov.id_column,
        "treatment": cov.treatment,
        "dropped": cov.dropped,
        "covariates": cov.names,
        "base_logit": base_logit,
        "risk_terms": terms,
        "shape_split": {"columns": [columns[a], columns[b]], "weights": [float(wa), float(wb)]}
        if cfg.shape_split
        else None,
        "capacity": cap_info,
        "mnar": {k: list(v) for k, v in mnar.items()},
        "limit_test_range": [float(lo), float(hi)],
        "limit_test_unit": unit,
        "truth_grid": grid.tolist(),
        "default_rate_at_real_limits": float(_sigmoid(base_logit + offset(real)).mean()),
    }
    return {
        "users": users,
        "links": link_df,
        "truth": truth,
        "segments": segments,
        "resolved": resolved,
    }


def semisynthetic_to_dir(path: str | Path, cfg: SemiSyntheticConfig, out: str | Path) -> dict:
    """Simulate on the covariates of the CSV ``path`` and write a dataset directory (atomically)."""
    path, out = Path(path), Path(out)
    tables = simulate_semisynthetic(path, cfg)
    users, links = tables["users"], tables["links"]
    spec = DatasetSpec(
        name=f"semi-{path.stem}-{len(users)}-s{cfg.seed}",
        id="user_id",
        time="as_of",
        treatment="credit_limit",
        outcome="default",
        features="all",
        exclude=list(cfg.exclude),
        entities=ENTITY_TYPES if links is not None else {},
        history_days=cfg.history_days,
        links="links.parquet" if links is not None else None,
        segments="segments.parquet",
        limit_tests=LimitTests(
            low=tables["resolved"]["limit_test_range"][0],
            high=tables["resolved"]["limit_test_range"][1],
            zero_share=cfg.limit_test_zero_share,
        )
        if cfg.limit_test_share > 0
        else None,
    )
    with atomic_dir(out) as tmp:
        pq.write_table(pa.Table.from_pandas(users, preserve_index=False), tmp / "users.parquet")
        if links is not None:
            pq.write_table(pa.Table.from_pandas(links, preserve_index=False), tmp / "links.parquet")
        pq.write_table(pa.table(tables["truth"]), tmp / "truth.parquet")
        pq.write_table(
            pa.Table.from_pandas(tables["segments"], preserve_index=False), tmp / "segments.parquet"
        )
        spec.dump(tmp)
        write_json(
            tmp / "simulation.json",
            {
                "kind": "semisynthetic",
                "sha256": file_sha256(path),
                "config": cfg.model_dump(mode="json"),
                "resolved": tables["resolved"],
            },
        )
    seg = tables["segments"]
    feats = [c for c in users.columns if c not in OUTPUT_COLUMNS and c not in cfg.exclude]
    summary = {
        "out": str(out),
        "users": len(users),
        "features": len(feats),
        "links": 0 if links is None else len(links),
        "default_rate": float(users["default"].mean()),
        "labeled_share": float(users["default"].notna().mean()),
        "limit_test_share": float(seg["limit_test"].mean()),
        "missing_share": float(users[feats].isna().mean().mean()),
        "base_logit": tables["resolved"]["base_logit"],
        "utilisation_quantiles": tables["resolved"]["capacity"]["utilisation_quantiles"],
        "segments": seg["segment"].value_counts().to_dict(),
    }
    log.info(
        "semi-synthetic: %s rows of %s into %s (default rate %.3f)",
        f"{len(users):,}",
        path.name,
        out,
        summary["default_rate"],
    )
    return summary
