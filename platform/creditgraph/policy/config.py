"""Settings of the limit decision (the ``policy`` section of ``pipeline.yaml``)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_GRID_POINTS = 1001
MAX_LIMIT = 1e15  # no credit limit is this large: the data contract's magnitude bound

#: Defaults of a policy's value ``margin * L * (1 - p) - lgd * L * p``: revenue per unit of limit
#: that is repaid over the horizon, and the share of the limit lost when the user defaults (the
#: value assumes the limit is drawn in full).
DEFAULT_MARGIN = 0.05
DEFAULT_LGD = 0.5


class GridConfig(BaseModel):
    """The limits a decision chooses from: ``start, start + step, ..., <= stop``."""

    model_config = ConfigDict(extra="forbid")

    start: float = Field(0.0, ge=0, le=MAX_LIMIT, description="smallest limit (0 = no credit)")
    stop: float = Field(
        50_000.0, ge=0, le=MAX_LIMIT, description="largest limit (included when on the grid)"
    )
    step: float = Field(1_000.0, gt=0, le=MAX_LIMIT)

    @model_validator(mode="after")
    def _check(self) -> GridConfig:
        if self.stop < self.start:
            raise ValueError(f"grid stop ({self.stop}) must be >= start ({self.start})")
        if self.size > MAX_GRID_POINTS:
            raise ValueError(
                f"grid has {self.size} points; at most {MAX_GRID_POINTS} (raise step or lower stop)"
            )
        values = self.values()
        if values.size > 1 and not np.all(np.diff(values) > 0):
            raise ValueError("grid step is too small for its start to give distinct limits")
        return self

    @property
    def size(self) -> int:
        # the small tolerance keeps 0..50,000 step 1,000 at 51 points despite float division
        return math.floor((self.stop - self.start) / self.step + 1e-9) + 1

    def values(self) -> np.ndarray:
        """The grid as a strictly increasing ``float64`` array."""
        return self.start + self.step * np.arange(self.size, dtype=np.float64)


def nice_step(x: float) -> float:
    """The smallest step of the form {1, 2, 2.5, 5} x 10^k that is >= ``x`` (a step people use)."""
    if not x > 0 or not math.isfinite(x):
        raise ValueError(f"step must be a positive finite number, got {x}")
    k = math.floor(math.log10(x))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * 10**k >= x * (1 - 1e-12):
            return m * 10**k
    return 10.0 ** (k + 1)


def grid_up_to(top: float, points: int = 40) -> GridConfig:
    """0 to ``top`` (rounded up to a step) in about ``points`` steps of a round size."""
    step = nice_step(top / points)
    return GridConfig(start=0.0, stop=math.ceil(top / step - 1e-9) * step, step=step)


def data_grid(limits: np.ndarray, quantile: float = 0.99, points: int = 40) -> GridConfig:
    """A grid on the data's own limit scale: 0 to the ``quantile`` of the positive historical
    limits, in about ``points`` round steps."""
    limits = np.asarray(limits, dtype=np.float64)
    pos = limits[np.isfinite(limits) & (limits > 0)]
    if pos.size == 0:
        raise ValueError("no positive historical limit to scale the grid from")
    return grid_up_to(float(np.quantile(pos, quantile)), points)


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
        None,
        ge=0,
        description="absolute caps: cluster cap = this x cluster size (with cap_total; when "
        "either absolute cap is set the *_median multiples do not apply)",
    )
    cap_total: float | None = Field(
        None, ge=0, description="absolute caps: the cap never exceeds this, whatever the size"
    )
    cap_per_member_median: float | None = Field(
        2.5,
        gt=0,
        description="default caps on the data's own scale: per member, this many times the "
        "median positive training limit (stored with the run)",
    )
    cap_total_median: float | None = Field(
        25.0, gt=0, description="... and at most this many times it for the whole cluster"
    )

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        terms = (
            self.cap_per_member,
            self.cap_total,
            self.cap_per_member_median,
            self.cap_total_median,
        )
        if self.enabled and all(t is None for t in terms):
            raise ValueError(
                "enabled cluster caps need an absolute cap or a multiple of the median"
            )
        if self.split_above is not None and self.split_above < self.min_size:
            raise ValueError("split_above must be >= min_size")
        return self

    @property
    def absolute(self) -> bool:
        """Whether the caps are absolute amounts (else multiples of the typical limit)."""
        return self.cap_per_member is not None or self.cap_total is not None

    def resolve(self, median_limit: float | None) -> ClusterConfig:
        """Absolute caps: the multiples times the run's median positive training limit."""
        if self.absolute or not self.enabled:
            return self
        if median_limit is None or not median_limit > 0:
            raise ValueError("cluster caps are multiples of the median limit, which is unknown")
        per = self.cap_per_member_median
        tot = self.cap_total_median
        return self.model_copy(
            update={
                "cap_per_member": None if per is None else per * median_limit,
                "cap_total": None if tot is None else tot * median_limit,
            }
        )

    def cap_for_size(self, size: np.ndarray) -> np.ndarray:
        """The cap of clusters of these sizes (``inf`` when uncapped or below ``min_size``)."""
        size = np.asarray(size, dtype=np.float64)
        cap = np.full(size.shape, np.inf)
        if not self.enabled:
            return cap
        if not self.absolute:
            raise ValueError(
                "cluster caps are multiples of the typical limit: resolve the policy with the "
                "run's limit scale first (PolicyConfig.resolve)"
            )
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


class GuaranteeConfig(BaseModel):
    """How the tightening is chosen (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="target share of granted users whose own true risk exceeds r_max; not "
        "identified from outcomes, only checkable on simulated data (evaluate.metrics.check_guarantee)",
    )
    delta: float = Field(
        0.1, gt=0, lt=1, description="allowed probability that the guarantee fails"
    )
    lambdas: list[float] = Field(
        default_factory=lambda: [0.25 * i for i in range(17)],
        description="tightenings to test (any order; tested from the largest down)",
    )
    estimator: Literal["ipw", "snipw", "dr"] = Field("dr", description="off-policy estimator")
    bound: Literal["bootstrap", "bernstein", "hoeffding"] = Field(
        "bootstrap", description="upper confidence bound; finite-sample ones need estimator='ipw'"
    )
    n_boot: int = Field(500, ge=50, description="bootstrap resamples")
    bandwidth: float | None = Field(
        None, gt=0, description="kernel bandwidth in log-limit units; None = Silverman's rule"
    )
    kernel: Literal["gaussian", "epanechnikov"] = "gaussian"
    weight_clip: float | None = Field(
        None, gt=0, description="cap on the kernel weights (required by finite-sample bounds)"
    )
    weights_bounded: bool = Field(
        False,
        description="finite-sample bounds: the kernel weights can never exceed weight_clip "
        "(a randomized limit test with a density bounded below); gives a much tighter bound",
    )
    randomized: bool = Field(
        False,
        description="the logged limits come from a randomized limit test with a known density",
    )
    contiguous: bool = Field(False, description="first-crossing limit rule")
    random_state: int = 0

    @field_validator("lambdas")
    @classmethod
    def _check_lambdas(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("lambdas must not be empty")
        if not all(math.isfinite(x) and x >= 0 for x in v):
            raise ValueError("lambdas must be finite and >= 0")
        if len(set(v)) != len(v):
            raise ValueError("lambdas must be distinct")
        return v

    @model_validator(mode="after")
    def _check_bound(self) -> GuaranteeConfig:
        if self.bound != "bootstrap":
            if self.estimator != "ipw":
                raise ValueError(f"bound '{self.bound}' needs estimator='ipw'")
            if self.weight_clip is None:
                raise ValueError(
                    f"bound '{self.bound}' needs weight_clip (the range of the clipped weights)"
                )
        return self


class ExplorationConfig(BaseModel):
    """Randomized limit tests inside the deployed policy, so calibration and off-policy
    evaluation keep unconfounded data as the policy changes.

    A share of granted users (chosen by a keyed hash of their id and the decision date, so the
    same user gets the same answer online and in batch) get their decided limit times a factor
    drawn log-uniformly from ``[low, high]``, snapped down to the grid, never above the largest
    limit whose upper risk bound stays under ``max_risk``. Decisions mark them (``explored``)
    with the factor's known density, which later off-policy evaluation uses.
    """

    model_config = ConfigDict(extra="forbid")

    share: float = Field(0.02, ge=0, le=0.2, description="share of granted users in tests")
    low: float = Field(0.5, gt=0, le=1, description="smallest factor of the decided limit")
    high: float = Field(1.5, ge=1, le=3, description="largest factor of the decided limit")
    max_risk: float = Field(
        0.25, gt=0, le=1, description="a test never grants where the risk bound exceeds this"
    )
    seed: int = 0


class StabilityConfig(BaseModel):
    """Rescoring does not cut an existing customer's limit by more than ``max_cut`` of it in one
    run, unless the risk bound at the kept limit crosses ``hard_ceiling``; the decision says so
    (binding constraint ``stability``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_cut: float = Field(0.3, ge=0, le=1, description="largest share of a limit cut in one run")
    hard_ceiling: float | None = Field(
        None,
        gt=0,
        le=1,
        description="above this risk bound the cut is not limited (None: 1.5 x r_max)",
    )


class PolicyConfig(BaseModel):
    """The decision: grid, risk ceiling, DSL rule, cluster caps and guardrails."""

    model_config = ConfigDict(extra="forbid")

    grid: GridConfig | None = Field(
        None,
        description="the limits to choose from; None: the run's own scale (0 to the 99th "
        "percentile of the training limits in round steps, stored with the run)",
    )
    r_max: float = Field(0.10, gt=0, le=1, description="ceiling on p(default | do(limit))")
    calibration: Literal["isotonic", "platt", "none"] = Field(
        "isotonic",
        description="post-hoc calibration of the curves on held-out users (the calibrate stage)",
    )
    guarantee: GuaranteeConfig | None = Field(
        default_factory=GuaranteeConfig,
        description="decide on the certified upper bound of the risk (None: on the calibrated "
        "estimate itself, no stated guarantee)",
    )
    exploration: ExplorationConfig = Field(default_factory=lambda: ExplorationConfig())
    stability: StabilityConfig = Field(default_factory=lambda: StabilityConfig())
    caller_r_max_floor: float = Field(
        0.01,
        gt=0,
        le=1,
        description="an API caller may ask for a lower ceiling, down to this; only the admin "
        "role may raise it",
    )
    contiguous: bool = Field(
        False,
        description="True: only the leading run of feasible grid points counts (first crossing)",
    )
    dsl: DSLRuleConfig = Field(default_factory=DSLRuleConfig)
    clusters: ClusterConfig = Field(default_factory=ClusterConfig)
    guardrail: GuardrailConfig = Field(default_factory=GuardrailConfig)

    def grid_values(self) -> np.ndarray:
        """The grid's limits (the policy must have a grid: set one or :meth:`resolve` it)."""
        if self.grid is None:
            raise ValueError(
                "the policy's grid comes from the run's limit scale: resolve the policy first"
            )
        return self.grid.values()

    def resolve(self, scale: dict) -> PolicyConfig:
        """This policy on a run's limit scale (``RUN/graph`` manifest ``limits``): the default
        grid and multiple-of-median cluster caps become concrete amounts."""
        grid = self.grid
        if grid is None:
            top = scale.get("q99_positive")
            if not top:
                raise ValueError("the run has no positive training limit to scale the grid by")
            grid = grid_up_to(float(top))
        return self.model_copy(
            update={"grid": grid, "clusters": self.clusters.resolve(scale.get("median_positive"))}
        )
