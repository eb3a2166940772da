"""The pipeline configuration: one YAML file, one typed section per stage.

Every change goes through validation: :meth:`PipelineConfig.load` validates the file and
:func:`override` returns a new, re-validated configuration with one dotted field changed (what the
CLI options and the Ray Job scripts use), so no setting reaches a stage unchecked.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from creditgraph.causal.config import PretrainConfig
from creditgraph.evaluate.config import EvaluateConfig
from creditgraph.graph.config import GraphConfig, PartitionConfig
from creditgraph.model.config import ModelConfig
from creditgraph.model.orders_config import OrdersConfig
from creditgraph.policy.config import PolicyConfig
from creditgraph.rules.config import RulesConfig
from creditgraph.train.config import TrainConfig


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the dotted field."""


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
    orders: OrdersConfig = Field(
        default_factory=OrdersConfig, description="the order-risk family (family: orders)"
    )

    @classmethod
    def load(cls, path: str | Path | None) -> PipelineConfig:
        """Read and validate a YAML file (``None`` gives all defaults)."""
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: configuration file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        return _validate(cls, raw, str(path))


def _validate(model: type[BaseModel], raw: Any, where: str) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{where}: {field}: {first['msg']}") from exc


def override(cfg: BaseModel, path: str, value: Any) -> Any:
    """A copy of ``cfg`` with the dotted field ``path`` set to ``value``, re-validated.

    ``override(cfg, "train.epochs", 3)``; works on any pydantic config (a section or the whole
    pipeline). A sub-model's unknown field raises :class:`ConfigError` naming it; a free-form
    mapping setting (e.g. ``rules.estimator``) accepts new keys. The result is validated as a whole.
    """
    keys = path.split(".")
    data = cfg.model_dump(mode="python")
    node: Any = data
    obj: Any = cfg
    for i, key in enumerate(keys):
        if isinstance(obj, BaseModel):
            if key not in type(obj).model_fields:
                raise ConfigError(f"{path}: no such setting ({'.'.join(keys[: i + 1])})")
            obj = getattr(obj, key)
        elif isinstance(obj, Mapping):
            obj = obj.get(key)
        else:
            raise ConfigError(f"{path}: {'.'.join(keys[:i])} is not a section")
        if i < len(keys) - 1:
            node = node.setdefault(key, {}) if isinstance(node, dict) else None
            if node is None:
                raise ConfigError(f"{path}: {'.'.join(keys[: i + 1])} is not a section")
    node[keys[-1]] = value
    return _validate(type(cfg), data, f"override {path}={value!r}")


def override_many(cfg: BaseModel, updates: Mapping[str, Any]) -> Any:
    """:func:`override` for several fields; ``None`` values are skipped (an option not given)."""
    for path, value in updates.items():
        if value is not None:
            cfg = override(cfg, path, value)
    return cfg
