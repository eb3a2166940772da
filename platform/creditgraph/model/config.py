"""Settings of the three-head model (architecture and ablation switches)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ModelConfig(BaseModel):
    """Architecture of :class:`creditgraph.model.net.CreditGraphNet`.

    The ``use_*`` switches are the ablations of the evaluation: ``use_graph=False`` replaces the
    feature-node attention and the user-user module by an MLP over ``[z, omega]`` ("the same
    towers with no graph").
    """

    model_config = ConfigDict(extra="forbid")

    hidden: int = Field(32, ge=4)
    heads: int = Field(4, ge=1)
    hops: int = Field(2, ge=1, description="interference hops; shards must have >= this many")
    dropout: float = Field(0.1, ge=0, lt=1)
    use_graph: bool = True
    use_interference: bool = True
    use_ipw: bool = True
    use_dsl: bool = True
    use_alpha: bool = True
    dsl_alpha: Literal["signed", "abs", "none"] = Field(
        "signed",
        description="how alpha weighs the DSL input delta_uj = (1 - omega_uj) * w_j: w = alpha "
        "(seed 000), |alpha| (importance only) or 1 (the bare missing mask; alpha still reaches "
        "the feature nodes when use_alpha)",
    )
    use_dag: bool = True
    use_teacher_score: bool = Field(
        True,
        description="the pretraining teacher's logit as an outcome-tower input (out-of-fold for "
        "training users, so no label leaks in)",
    )
    use_leaves: bool = Field(
        False,
        description="GBDT-leaf embeddings (seed 001). Off by default: the teacher's final trees "
        "saw the training users' labels, so in-sample leaves let the network memorize them",
    )
    balance_weight: float = Field(
        0.0, ge=0, description="gradient-reversal strength of the treatment adversary (min-max)"
    )
    monotone: bool = Field(
        True, description="risk is non-decreasing in the limit (shape constraint of the curve)"
    )
    capacity_shift: bool = Field(
        True, description="a per-user shift of the curve along log(limit): risk vs limit/capacity"
    )
    n_basis: int = Field(8, ge=2, description="smooth ramps of log1p(limit / limit_scale)")
    limit_scale: float = Field(1000.0, gt=0)
    dsl_channels: int = Field(8, ge=1)
    ipw_clip: tuple[float, float] = Field(
        (0.1, 10.0), description="stabilized weights clipped here"
    )
    mc_dropout_samples: int = Field(8, ge=2, description="passes for the uncertainty part of DSL")
