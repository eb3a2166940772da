"""The data contract: ``dataset.yaml`` as a typed, validated object."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from creditgraph.data.errors import DataValidationError

LINK_COLUMNS = ("user_id", "entity_type", "entity_id", "ts")
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
    users: str = "users.parquet"
    links: str | None = "links.parquet"
    truth: str | None = "truth.parquet"
    segments: str | None = Field(
        None, description="optional user_id->segment table (simulated data) for reports"
    )

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
