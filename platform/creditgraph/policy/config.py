"""Settings of the limit decision (the ``policy`` section of ``pipeline.yaml``)."""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_GRID_POINTS = 1001


class GridConfig(BaseModel):
    """The limits a decision chooses from: ``start, start + step, ..., <= stop``."""

    model_config = ConfigDict(extra="forbid")

    start: float = Field(0.0, ge=0, description="smallest limit (0 = no credit)")
    stop: float = Field(50_000.0, ge=0, description="largest limit (included when on the grid)")
    step: float = Field(1_000.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> GridConfig:
        if self.stop < self.start:
            raise ValueError(f"grid stop ({self.stop}) must be >= start ({self.start})")
        if self.size > MAX_GRID_POINTS:
            raise ValueError(
                f"grid has {self.size} points; at most {MAX_GRID_POINTS} (raise step or lower stop)"
            )
        return self

    @property
    def size(self) -> int:
        # the small tolerance keeps 0..50,000 step 1,000 at 51 points despite float division
        return math.floor((self.stop - self.start) / self.step + 1e-9) + 1

    def values(self) -> np.ndarray:
        """The grid as a strictly increasing ``float64`` array."""
        return self.start + self.step * np.arange(self.size, dtype=np.float64)


class ClusterConfig(BaseModel):
    """How clusters of tied users are formed, and the cap on the TOTAL limit inside each."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="False: no cluster caps at all")
    min_size: int = Field(2, ge=2, description="clusters smaller than this get no cap")
    split_above: int | None = Field(
        200,
        ge=2,
        description="connected components with more users are split into Louvain communities "
        "(None: keep components whole)",
    )
    history_days: float | None = Field(
        None,
        gt=0,
        description="links older than this before the decision time tie nobody; "
        "None: the dataset's history_days",
    )
    cap_per_member: float | None = Field(
        25_000.0, ge=0, description="cluster cap = this x cluster size (None: no per-member term)"
    )
    cap_total: float | None = Field(
        250_000.0, ge=0, description="the cap never exceeds this, whatever the size (None: none)"
    )

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if self.enabled and self.cap_per_member is None and self.cap_total is None:
            raise ValueError("enabled cluster caps need cap_per_member and/or cap_total")
        if self.split_above is not None and self.split_above < self.min_size:
            raise ValueError("split_above must be >= min_size")
        return self

    def cap_for_size(self, size: np.ndarray) -> np.ndarray:
        """The cap of clusters of these sizes (``inf`` when uncapped or below ``min_size``)."""
        size = np.asarray(size, dtype=np.float64)
        cap = np.full(size.shape, np.inf)
        if not self.enabled:
            return cap
        if self.cap_per_member is not None:
            cap = np.minimum(cap, self.cap_per_member * size)
        if self.cap_total is not None:
            cap = np.minimum(cap, self.cap_total)
        return np.where(size >= self.min_size, cap, np.inf)


class DSLRuleConfig(BaseModel):
    """How a high DSL (uncertainty) score lowers the risk ceiling.

    ``r_eff = r_max * (1 - strength * max(0, dsl - threshold) / (1 - threshold))``
    """

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(0.5, ge=0, lt=1, description="DSL scores up to this are not penalised")
    strength: float = Field(
        0.5, ge=0, le=1, description="share of the ceiling removed at DSL = 1 (0 = rule off)"
    )


class GuardrailConfig(BaseModel):
    """Users matched by a high-risk rule get at most ``cap`` (snapped down to the grid)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    cap: float = Field(0.0, ge=0, description="limit for users hit by a guardrail rule")


class PolicyConfig(BaseModel):
    """The decision: grid, risk ceiling, DSL rule, cluster caps and guardrails."""

    model_config = ConfigDict(extra="forbid")

    grid: GridConfig = Field(default_factory=GridConfig)
    r_max: float = Field(0.10, gt=0, le=1, description="ceiling on p(default | do(limit))")
    contiguous: bool = Field(
        False,
        description="True: only the leading run of feasible grid points counts (first crossing)",
    )
    dsl: DSLRuleConfig = Field(default_factory=DSLRuleConfig)
    clusters: ClusterConfig = Field(default_factory=ClusterConfig)
    guardrail: GuardrailConfig = Field(default_factory=GuardrailConfig)
