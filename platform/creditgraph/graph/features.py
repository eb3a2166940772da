"""User-feature edge attributes: the observed mask omega and the standardized value z."""

from __future__ import annotations

import numpy as np
from scipy.stats import skew

from creditgraph.data.errors import DataValidationError


def _pow2_scale(values: np.ndarray) -> float:
    """A power of two near ``max|values|``: dividing by it is exact and keeps squares finite."""
    top = float(np.max(np.abs(values))) if len(values) else 0.0
    if top == 0.0 or not np.isfinite(top):
        return 1.0
    return float(np.ldexp(1.0, int(np.frexp(top)[1]) - 1))  # <= top, so it cannot overflow


class FeatureStandardizer:
    """Per-feature transform + standardization, fitted once and reused at scoring time.

    Non-negative features whose skewness exceeds ``skew_threshold`` are ``log1p``-transformed first
    (amounts and counts are heavy-tailed). Statistics use observed values only; a missing value
    becomes ``omega = 0, z = 0`` (its edge is kept, see seed 000), never an imputed number.

    Statistics are computed on values scaled by a power of two, so they are exact for ordinary
    values and cannot overflow for extreme ones. A feature with no observed value in the fitting
    rows is refused (a ``DataValidationError`` naming it): it could only be standardized by a
    made-up mean.
    """

    def __init__(self, log_skewed: bool = True, skew_threshold: float = 2.0, clip_z: float = 8.0):
        self.log_skewed = log_skewed
        self.skew_threshold = skew_threshold
        self.clip_z = clip_z

    def fit(self, raw: np.ndarray, names: list[str]) -> FeatureStandardizer:
        """Learn each feature's transform, mean and std from the observed values of ``raw``."""
        raw = np.asarray(raw, dtype=np.float64)
        observed = (~np.isnan(raw)).any(axis=0) if len(raw) else np.zeros(raw.shape[1], bool)
        if not observed.all():
            unseen = [n for n, o in zip(names, observed, strict=True) if not o]
            raise DataValidationError(
                "features (fitting rows)",
                unseen[0],
                f"no observed value in the {len(raw)} rows the standardization is fitted on "
                f"(features {unseen}): drop them or add them to 'exclude' in dataset.yaml",
            )
        self.names_ = list(names)
        self.log_ = np.zeros(raw.shape[1], dtype=bool)
        self.mean_ = np.zeros(raw.shape[1])
        self.std_ = np.ones(raw.shape[1])
        self.missing_share_ = np.isnan(raw).mean(axis=0)
        for j in range(raw.shape[1]):
            col = raw[:, j]
            obs = col[~np.isnan(col)]
            if not np.isfinite(obs).all():
                raise DataValidationError(
                    "features (fitting rows)", self.names_[j], "infinite values"
                )
            # a constant column has no skew (scipy would warn and return NaN)
            if self.log_skewed and obs.min() >= 0 and len(obs) > 2 and obs.max() > obs.min():
                scale = _pow2_scale(obs)
                if skew(obs / scale) > self.skew_threshold:
                    self.log_[j] = True
                    obs = np.log1p(obs)
            scale = _pow2_scale(obs)
            s = obs / scale
            self.mean_[j] = s.mean() * scale
            sd = s.std() * scale
            self.std_[j] = sd if sd > 1e-12 else 1.0
        return self

    def transform(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(z float32, omega uint8)`` for a raw matrix (NaN = missing)."""
        raw = np.asarray(raw, dtype=np.float64)
        omega = ~np.isnan(raw)
        with np.errstate(over="ignore", invalid="ignore"):
            x = np.where(self.log_, np.log1p(np.clip(raw, 0, None)), raw)
            # far-out values saturate at +-clip_z instead of overflowing
            z = np.clip((x - self.mean_) / self.std_, -self.clip_z, self.clip_z)
        z = np.where(omega, np.nan_to_num(z, nan=0.0), 0.0)
        return z.astype(np.float32), omega.astype(np.uint8)

    def to_records(self) -> list[dict]:
        return [
            {
                "name": n,
                "transform": "log1p" if lg else "identity",
                "mean": float(m),
                "std": float(s),
                "missing_share": float(ms),
            }
            for n, lg, m, s, ms in zip(
                self.names_, self.log_, self.mean_, self.std_, self.missing_share_, strict=True
            )
        ]

    @classmethod
    def from_records(cls, records: list[dict], clip_z: float = 8.0) -> FeatureStandardizer:
        self = cls(clip_z=clip_z)
        self.names_ = [r["name"] for r in records]
        self.log_ = np.array([r["transform"] == "log1p" for r in records])
        self.mean_ = np.array([r["mean"] for r in records])
        self.std_ = np.array([r["std"] for r in records])
        self.missing_share_ = np.array([r["missing_share"] for r in records])
        return self
