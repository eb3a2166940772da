"""The pipeline configuration: one YAML file, one typed section per stage."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from creditgraph.causal.config import PretrainConfig
from creditgraph.evaluate.config import EvaluateConfig
from creditgraph.graph.config import GraphConfig, PartitionConfig
from creditgraph.model.config import ModelConfig
from creditgraph.policy.config import PolicyConfig
from creditgraph.rules.config import RulesConfig
from creditgraph.train.config import TrainConfig


class PipelineConfig(BaseModel):
    """``pipeline.yaml``: every stage's settings; absent sections take their defaults."""

    model_config = ConfigDict(extra="forbid")

    graph: GraphConfig = Field(default_factory=GraphConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    rules: RulesConfig = Field(default_factory=RulesConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    @classmethod
    def load(cls, path: str | Path | None) -> PipelineConfig:
        """Read a YAML file (``None`` gives all defaults)."""
        if path is None:
            return cls()
        raw = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(raw)
