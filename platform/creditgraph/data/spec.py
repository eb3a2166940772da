"""The data contract: ``dataset.yaml`` as a typed, validated object."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from creditgraph.data.errors import DataValidationError

LINK_COLUMNS = ("user_id", "entity_type", "entity_id", "ts")


def _date_is_midnight(v: object) -> object:
    # YAML turns 2025-06-30 into a date: take it as that day's midnight
    if isinstance(v, date) and not isinstance(v, datetime):
        return datetime(v.year, v.month, v.day)
    return v


def _to_naive_utc(v: datetime | None) -> datetime | None:
    if v is not None and v.tzinfo is not None:
        v = v.astimezone(UTC).replace(tzinfo=None)
    return v


#: a dataset's "now" for historical data: a YAML date is its midnight, an aware time is UTC
ReferenceTime = Annotated[
    datetime | None, BeforeValidator(_date_is_midnight), AfterValidator(_to_naive_utc)
]

TRUTH_COLUMNS = ("user_id", "limit", "p_default")


class EntityType(BaseModel):
    """How one kind of shared entity (device, IP, address, phone...) becomes user-user edges."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(1.0, gt=0, description="edge weight contributed by one shared entity")
    max_degree: int = Field(
        100,
        ge=2,
        description="an entity seen with more distinct users than this by a user's as_of is a "
        "super-node for that user: cut, not turned into a clique",
    )
    high_confidence: bool = Field(
        True, description="whether sharing it ties users into one credit cluster (policy caps)"
    )


class TimeFormats(BaseModel):
    """Declared formats of time strings (``strftime`` codes such as ``"%d/%m/%Y"``, or
    ``"ISO8601"``). A column left undeclared gets ONE format inferred from its values."""

    model_config = ConfigDict(extra="forbid")

    users: str | None = Field(None, description="format of the users table's time column")
    links: str | None = Field(None, description="format of the links table's ts column")

    @field_validator("users", "links")
    @classmethod
    def _is_format(cls, v: str | None) -> str | None:
        if v is not None and v != "ISO8601" and "%" not in v:
            raise ValueError(f"not a time format: {v!r} (use strftime codes or 'ISO8601')")
        return v


class OrdersSpec(BaseModel):
    """``orders:`` in dataset.yaml: which columns of the order tables mean what."""

    model_config = ConfigDict(extra="forbid")

    table: str = Field("orders.parquet", description="one row per order (file or folder of parts)")
    links: str | None = Field(
        "order_links.parquet", description="order id, entity_type, entity_id[, ts]"
    )
    id: str = "order_id"
    time: str = "ts"
    buyer: str = "buyer_id"
    amount: str = "amount"
    label: str | None = Field("is_fraud", description="0/1, null = unknown; None: no labels")
    label_time: str | None = Field(
        "label_known_at", description="when the label became known; required where labeled"
    )
    features: list[str] | Literal["all"] = Field(
        "all", description="feature columns, or 'all' for every other numeric column"
    )
    exclude: list[str] = Field(
        default_factory=list, description="numeric columns that are never features"
    )
    truth: str | None = Field(
        "order_truth.parquet", description="simulated data only: order id, p_fraud"
    )
    segments: str | None = Field(
        None, description="simulated data only: order id -> segment, for reports"
    )
    reference_time: ReferenceTime = Field(
        None,
        description="the 'now' of historical data: labels and links known after it are "
        "unknown (left out), orders after it are refused (default: the dataset's "
        "reference_time; with neither, anything after the current time + 1 day is refused); "
        "naive = UTC",
    )

    @model_validator(mode="after")
    def _consistent(self) -> OrdersSpec:
        if (self.label is None) != (self.label_time is None):
            raise ValueError("label and label_time must both be set or both be null")
        roles = self.roles
        if len(set(roles)) != len(roles):
            raise ValueError(f"id/time/buyer/amount/label/label_time must be distinct, got {roles}")
        if isinstance(self.features, list):
            clash = sorted(set(self.features) & set(roles))
            if clash:
                raise ValueError(f"features may not include the canonical columns: {clash}")
            if len(set(self.features)) != len(self.features):
                raise ValueError("features lists a column twice")
        return self

    @property
    def roles(self) -> list[str]:
        """The canonical columns (never features)."""
        cols = [self.id, self.time, self.buyer, self.amount]
        return cols + ([self.label, self.label_time] if self.label and self.label_time else [])


class LimitTests(BaseModel):
    """Randomized limit tests in the data: which users got a limit drawn at random, and the known
    distribution it was drawn from (log-uniform on ``[low, high]``, 0 with probability
    ``zero_share``). Off-policy evaluation and calibration use them as an unconfounded check."""

    model_config = ConfigDict(extra="forbid")

    column: str = Field("limit_test", description="boolean column of the segments table")
    low: float = Field(..., gt=0)
    high: float = Field(..., gt=0)
    zero_share: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _range(self) -> LimitTests:
        if self.high <= self.low:
            raise ValueError("limit_tests.high must be > low")
        return self

    def log_density(self, limits) -> np.ndarray:
        """log density of each limit in the variable log L (a point mass at 0)."""
        limits = np.asarray(limits, dtype=np.float64)
        pos = np.log(1.0 - self.zero_share) - np.log(np.log(self.high) - np.log(self.low))
        inside = (limits >= self.low * (1 - 1e-9)) & (limits <= self.high * (1 + 1e-9))
        out = np.where(inside, pos, -np.inf)
        zero = np.log(self.zero_share) if self.zero_share > 0 else -np.inf
        return np.where(limits == 0, zero, out)


class DatasetSpec(BaseModel):
    """``dataset.yaml``: which columns mean what, and how links become edges."""

    model_config = ConfigDict(extra="forbid")

    name: str = "dataset"
    id: str = "user_id"
    time: str = "as_of"
    treatment: str = "credit_limit"
    outcome: str = "default"
    features: list[str] | Literal["all"] = Field(
        "all", description="feature columns, or 'all' for every other numeric column"
    )
    exclude: list[str] = Field(
        default_factory=list, description="numeric columns that are never features"
    )
    entities: dict[str, EntityType] = Field(default_factory=dict)
    history_days: float = Field(90.0, gt=0, description="links older than this are ignored")
    time_format: TimeFormats = Field(
        default_factory=TimeFormats,
        description="formats of time strings: one for both tables, or {users: ..., links: ...}; "
        "time-zone-aware values are converted to UTC, naive values are taken as UTC",
    )
    reference_time: ReferenceTime = Field(
        None,
        description="the 'now' of historical data: an as_of or link ts after it is refused "
        "(default: the current time + 1 day); naive = UTC",
    )
    max_abs_value: float = Field(
        1e15, gt=0, description="feature values and limits beyond +-this are refused"
    )
    users: str = "users.parquet"
    links: str | None = "links.parquet"
    truth: str | None = "truth.parquet"
    segments: str | None = Field(
        None, description="optional user_id->segment table (simulated data) for reports"
    )
    limit_tests: LimitTests | None = Field(
        None, description="randomized limit tests and their known distribution (if any)"
    )
    family: Literal["credit", "orders"] = Field(
        "credit", description="model family: credit limits (users) or order risk (orders)"
    )
    orders: OrdersSpec | None = Field(None, description="the order tables (family: orders)")

    @model_validator(mode="after")
    def _family_has_tables(self) -> DatasetSpec:
        if self.family == "orders" and self.orders is None:
            raise ValueError("family 'orders' needs an 'orders' section (the order tables)")
        return self

    @field_validator("time_format", mode="before")
    @classmethod
    def _one_format_for_both(cls, v: object) -> object:
        return {"users": v, "links": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _distinct_roles(self) -> DatasetSpec:
        roles = [self.id, self.time, self.treatment, self.outcome]
        if len(set(roles)) != len(roles):
            raise ValueError(f"id/time/treatment/outcome must be distinct columns, got {roles}")
        if isinstance(self.features, list):
            clash = sorted(set(self.features) & set(roles))
            if clash:
                raise ValueError(f"features may not include id/time/treatment/outcome: {clash}")
            if len(set(self.features)) != len(self.features):
                raise ValueError("features lists a column twice")
        return self

    @property
    def reserved(self) -> set[str]:
        return {self.id, self.time, self.treatment, self.outcome, *self.exclude}

    @classmethod
    def load(cls, root: str | Path) -> DatasetSpec:
        """Read and validate ``root/dataset.yaml``."""
        path = Path(root) / "dataset.yaml"
        if not path.exists():
            raise DataValidationError(str(path), message="dataset.yaml not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise DataValidationError(str(path), message=f"not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise DataValidationError(str(path), message="must be a mapping of settings")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or None
            raise DataValidationError(
                str(path), column=field, message=f"{first['msg']} ({len(exc.errors())} error(s))"
            ) from exc

    def dump(self, root: str | Path) -> None:
        from creditgraph.utils.io import atomic_file

        with atomic_file(Path(root) / "dataset.yaml") as fh:
            yaml.safe_dump(self.model_dump(mode="json"), fh, sort_keys=False)
