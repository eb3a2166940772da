"""Settings of the evaluation stage: the policy ceiling, the value model, baselines, figures."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from creditgraph.policy.config import DEFAULT_LGD, DEFAULT_MARGIN


class EvaluateConfig(BaseModel):
    """How held-out users are scored against the truth (``creditgraph evaluate``)."""

    model_config = ConfigDict(extra="forbid")

    r_max: float = Field(0.1, gt=0, le=1, description="risk ceiling of the policy metrics")
    contiguous: bool = Field(
        False, description="first-crossing limit rule instead of the largest feasible limit"
    )
    margin: float = Field(
        DEFAULT_MARGIN, ge=0, description="policy value: revenue per unit of limit repaid"
    )
    lgd: float = Field(DEFAULT_LGD, ge=0, description="policy value: loss given default per unit")
    calibration_bins: int = Field(10, ge=2, description="equal-mass bins of the calibration table")
    curves_per_segment: int = Field(3, ge=1, description="sample users per segment in the figure")
    baselines: list[str] = Field(
        default_factory=lambda: [
            "lgbm_slearner",
            "lgbm_slearner_monotone",
            "econml_forest",
            "econml_linear",
            "constant",
        ],
        description="names from creditgraph.evaluate.baselines.BASELINES",
    )
    baseline_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-baseline constructor overrides, by name"
    )
    ablations: list[str] = Field(
        default_factory=list,
        description="model variants trained and scored in the same run (names in "
        "creditgraph.evaluate.run.ABLATIONS), e.g. [towers_no_graph, no_interference, no_ipw, "
        "no_dsl, no_alpha]",
    )
    seed: int = 0

    @field_validator("baselines")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        from creditgraph.evaluate.baselines import BASELINES

        unknown = [n for n in names if n not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; choose from {sorted(BASELINES)}")
        return names

    @model_validator(mode="after")
    def _params_for_chosen(self) -> EvaluateConfig:
        extra = sorted(set(self.baseline_params) - set(self.baselines))
        if extra:
            raise ValueError(f"baseline_params for baselines not in `baselines`: {extra}")
        return self
