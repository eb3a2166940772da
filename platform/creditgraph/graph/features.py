"""User-feature edge attributes: the observed mask omega and the standardized value z."""

from __future__ import annotations

import numpy as np
from scipy.stats import skew


class FeatureStandardizer:
    """Per-feature transform + standardization, fitted once and reused at scoring time.

    Non-negative features whose skewness exceeds ``skew_threshold`` are ``log1p``-transformed first
    (amounts and counts are heavy-tailed). Statistics use observed values only; a missing value
    becomes ``omega = 0, z = 0`` (its edge is kept, see seed 000), never an imputed number.
    """

    def __init__(self, log_skewed: bool = True, skew_threshold: float = 2.0, clip_z: float = 8.0):
        self.log_skewed = log_skewed
        self.skew_threshold = skew_threshold
        self.clip_z = clip_z

    def fit(self, raw: np.ndarray, names: list[str]) -> FeatureStandardizer:
        self.names_ = list(names)
        self.log_ = np.zeros(raw.shape[1], dtype=bool)
        self.mean_ = np.zeros(raw.shape[1])
        self.std_ = np.ones(raw.shape[1])
        self.missing_share_ = np.isnan(raw).mean(axis=0)
        for j in range(raw.shape[1]):
            col = raw[:, j]
            obs = col[~np.isnan(col)]
            if len(obs) == 0:
                continue
            if (
                self.log_skewed
                and obs.min() >= 0
                and len(obs) > 2
                and skew(obs) > self.skew_threshold
            ):
                self.log_[j] = True
                obs = np.log1p(obs)
            self.mean_[j] = obs.mean()
            sd = obs.std()
            self.std_[j] = sd if sd > 1e-12 else 1.0
        return self

    def transform(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(z float32, omega uint8)`` for a raw matrix (NaN = missing)."""
        raw = np.asarray(raw, dtype=np.float64)
        omega = ~np.isnan(raw)
        x = np.where(self.log_, np.log1p(np.clip(raw, 0, None)), raw)
        z = np.clip((x - self.mean_) / self.std_, -self.clip_z, self.clip_z)
        z = np.where(omega, z, 0.0)
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
