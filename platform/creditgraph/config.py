"""The pipeline configuration: one YAML file, one typed section per stage."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from creditgraph.causal.config import PretrainConfig
from creditgraph.graph.config import GraphConfig, PartitionConfig


class PipelineConfig(BaseModel):
    """``pipeline.yaml``: every stage's settings; absent sections take their defaults."""

    model_config = ConfigDict(extra="forbid")

    graph: GraphConfig = Field(default_factory=GraphConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)

    @classmethod
    def load(cls, path: str | Path | None) -> PipelineConfig:
        """Read a YAML file (``None`` gives all defaults)."""
        if path is None:
            return cls()
        raw = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(raw)
