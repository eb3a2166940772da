"""Settings of the causal pretraining stage: teacher, per-feature DML, feature DAG."""

from __future__ import annotations

import inspect
from typing import Any, Literal

from lightgbm import LGBMRegressor
from pydantic import BaseModel, ConfigDict, Field

from creditgraph.causal.dag import HillClimbDAG
from creditgraph.causal.teacher import DEFAULT_PARAMS, Teacher


def _default_nuisance_params() -> dict[str, Any]:
    return {
        "n_estimators": 80,
        "learning_rate": 0.15,
        "num_leaves": 31,
        "min_child_samples": 50,
        "subsample": 0.5,
        "subsample_freq": 1,
        "colsample_bytree": 0.8,
        "max_bin": 63,
    }


_TEACHER = inspect.signature(Teacher).parameters


class TeacherConfig(BaseModel):
    """K-fold cross-fitted LightGBM teacher whose out-of-fold probabilities are the soft labels.

    The estimator's fields are :class:`~creditgraph.causal.teacher.Teacher`'s parameters with its
    defaults; :meth:`build` gives the estimator.
    """

    model_config = ConfigDict(extra="forbid")

    n_folds: int = Field(
        _TEACHER["n_folds"].default, ge=2, description="cross-fitting folds for the soft labels"
    )
    params: dict[str, Any] = Field(
        default_factory=lambda: dict(DEFAULT_PARAMS),
        description="LGBMClassifier keyword arguments (missing values are handled natively)",
    )
    n_jobs: int = Field(_TEACHER["n_jobs"].default, ge=1, description="LightGBM threads")
    early_stopping: int | None = Field(
        _TEACHER["early_stopping"].default,
        ge=1,
        description="rounds without held-out improvement before a fold model stops",
    )
    random_state: int = _TEACHER["random_state"].default
    include_treatment: bool = Field(
        False,
        description=(
            "also feed log1p(limit) to the teacher (and to the DML controls). Off by default: "
            "the teacher's leaves feed the user encoder, whose representation must not encode "
            "the treatment assignment; soft labels are then p(default | x) under the historical "
            "limit policy"
        ),
    )

    def build(self) -> Teacher:
        """The teacher estimator with these settings."""
        return Teacher(**self.model_dump(exclude={"include_treatment"}))


class DMLConfig(BaseModel):
    """Per-feature double machine learning (econml ``LinearDML``), one Ray task per batch."""

    model_config = ConfigDict(extra="forbid")

    cv: int = Field(2, ge=2, description="cross-fitting folds of the nuisance models")
    nuisance_params: dict[str, Any] = Field(
        default_factory=_default_nuisance_params,
        description="LGBMRegressor keyword arguments for both nuisances E[Y|W] and E[T|W]",
    )
    n_jobs: int = Field(1, ge=1, description="LightGBM threads per nuisance fit (= CPUs per task)")
    heterogeneity: Literal["linear", "constant"] = Field(
        "linear",
        description=(
            "'linear': theta_j(X) linear in the other (standardized, mean-imputed) features, "
            "alpha_j = mean of theta_j(X); 'constant': theta_j is one number"
        ),
    )
    features_per_task: int = Field(1, ge=1, description="features handled by one Ray task")
    max_retries: int = Field(2, ge=0, description="Ray retries of a failing task before reporting")
    max_rows: int | None = Field(
        500_000,
        ge=100,
        description=(
            "row cap: above it one seeded random subsample of the training rows (the same for "
            "every feature) is used; DML standard errors shrink as 1/sqrt(n), so beyond a few "
            "hundred thousand rows more data buys little precision for linear cost"
        ),
    )
    min_rows: int = Field(50, ge=10, description="a feature observed on fewer rows fails")
    ci_level: float = Field(0.95, gt=0, lt=1)
    seed: int = 0

    def nuisance(self) -> LGBMRegressor:
        """The nuisance estimator for E[Y|W] and E[T|W] (seeded per feature by the DML)."""
        params = {"verbose": -1, **self.nuisance_params}
        return LGBMRegressor(n_jobs=self.n_jobs, deterministic=True, **params)


_DAG = inspect.signature(HillClimbDAG).parameters


class DAGConfig(BaseModel):
    """Hill-climbing search of the feature DAG under a (Gaussian) BIC score.

    The fields are :class:`~creditgraph.causal.dag.HillClimbDAG`'s parameters with its defaults
    (one set of defaults); :meth:`build` gives the estimator.
    """

    model_config = ConfigDict(extra="forbid")

    max_parents: int = Field(_DAG["max_parents"].default, ge=1)
    tabu_length: int = Field(_DAG["tabu_length"].default, ge=0)
    max_iter: int = Field(_DAG["max_iter"].default, ge=1)
    penalty: float = Field(
        _DAG["penalty"].default,
        gt=0,
        description="multiplier of the BIC penalty (log n)/2 per parameter",
    )
    epsilon: float = Field(
        _DAG["epsilon"].default, ge=0, description="stop when the best move improves less than this"
    )
    restarts: int = Field(
        _DAG["restarts"].default,
        ge=0,
        description="perturb-and-climb-again rounds after the first climb (0 = plain)",
    )
    perturb_moves: int = Field(
        _DAG["perturb_moves"].default, ge=1, description="random moves per restart"
    )
    max_rows: int | None = Field(
        _DAG["max_rows"].default,
        ge=10,
        description="seeded row subsample cap for the covariance statistics",
    )
    random_state: int = _DAG["random_state"].default

    def build(self) -> HillClimbDAG:
        """The Gaussian-BIC estimator with these settings."""
        return HillClimbDAG(score="gaussian", **self.model_dump())


class PretrainConfig(BaseModel):
    """``pretrain`` section of ``pipeline.yaml``."""

    model_config = ConfigDict(extra="forbid")

    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    dml: DMLConfig = Field(default_factory=DMLConfig)
    dag: DAGConfig = Field(default_factory=DAGConfig)
    use_ray: bool = Field(True, description="run the per-feature DML as Ray tasks")
