"""Settings of the graph stage: standardization, the user split, and ClusterGCN partitioning."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GraphConfig(BaseModel):
    """How the heterograph is built from a validated dataset."""

    model_config = ConfigDict(extra="forbid")

    log_skewed: bool = Field(
        True, description="log1p-transform non-negative features with skewness above 2 before z"
    )
    clip_z: float = Field(8.0, gt=0, description="standardized values are clipped to +-clip_z")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    split_seed: int = 17

    @model_validator(mode="after")
    def _fractions(self) -> GraphConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be < 1")
        return self


class PartitionConfig(BaseModel):
    """ClusterGCN shards: METIS parts of the user-user graph plus K-hop shadow nodes."""

    model_config = ConfigDict(extra="forbid")

    part_size: int = Field(1000, ge=10, description="target owned users per part")
    num_parts: int | None = Field(None, ge=1, description="overrides part_size when set")
    hops: int = Field(2, ge=0, description="shadow-node depth; must be >= the model's hops")
    seed: int = 0

    def parts_for(self, n_users: int) -> int:
        if self.num_parts is not None:
            return max(1, min(self.num_parts, n_users))
        return max(1, round(n_users / self.part_size))
