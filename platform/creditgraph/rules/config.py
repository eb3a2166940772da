"""The ``rules:`` section of ``pipeline.yaml``: how ``creditgraph rules`` and the demo learn."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class RulesConfig(BaseModel):
    """Settings of rule learning; estimator knobs left ``None`` take the estimator's default."""

    model_config = ConfigDict(extra="forbid")

    target: str | None = Field(None, description="label column; default: the dataset's outcome")
    min_confidence: float = Field(0.7, gt=0, lt=1, description="the confidence constraint c")
    validation_fraction: float = Field(
        0.3, gt=0, lt=1, description="rows held out to report each rule's support/confidence"
    )
    seed: int = 0
    include_treatment: bool = Field(
        False,
        description="also use the historical limit (treatment) as a feature; off by default so "
        "that rules need only the features the scoring path has",
    )
    exclude: list[str] = Field(default_factory=list, description="columns never used as features")
    estimator: dict[str, Any] = Field(
        default_factory=dict,
        description="extra ConstrainedRuleSet parameters (max_rules, max_depth, confidence_z...)",
    )
