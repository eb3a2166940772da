"""The ``orders`` section of ``pipeline.yaml``: the order-risk family's settings, stage by stage.

Kept apart from the network (``model/orders.py``) so that reading a configuration never imports
torch; the graph and leaf sections live with their stages (``graph/events.py``,
``causal/leaves.py``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from creditgraph.causal.leaves import LeafConfig
from creditgraph.graph.events import EventGraphConfig, EventPartitionConfig, OrderSplitConfig


class OrderNetConfig(BaseModel):
    """Architecture of :class:`OrderNet`; the ``use_*`` switches and ``conv`` are the ablations."""

    model_config = ConfigDict(extra="forbid")

    hidden: int = Field(32, ge=4)
    layers: int = Field(2, ge=1, description="entity-stack layers (the shards' halo is layers + 1)")
    conv: Literal["gcn", "gat"] = "gcn"
    heads: int = Field(2, ge=1, description="attention heads (gat)")
    dropout: float = Field(0.1, ge=0, lt=1)
    use_leaves: bool = Field(
        True,
        description="GBDT-leaf embeddings and the GBDT's logit in the order input (the logit "
        "also offsets the output: the network learns what the graph adds to the GBDT)",
    )
    use_shadow: bool = Field(
        True,
        description="shadow orders receive from their slice's entities (the order hub); off: "
        "entities only read their orders' own encodings, nothing diffuses through orders",
    )
    use_history: bool = Field(True, description="entity(t - k) -> entity(t) edges")
    use_label_feedback: bool = Field(
        True, description="entity inputs include the labels that became known in the slice"
    )
    pos_weight: float = Field(1.0, gt=0, description="weight of a fraud in the loss")


#: The evaluation's ablations: name -> changes to :class:`OrderNetConfig`.
ABLATIONS: dict[str, dict[str, Any]] = {
    "no_shadow": {"use_shadow": False},
    "no_history": {"use_history": False},
    "no_leaves": {"use_leaves": False},
    "gat": {"conv": "gat"},
    "no_label_feedback": {"use_label_feedback": False},
}


class OrderEvalConfig(BaseModel):
    """The evaluation on the later period: metrics, baselines and ablations."""

    model_config = ConfigDict(extra="forbid")

    alert_rates: list[float] = Field(
        default_factory=lambda: [0.005, 0.01, 0.02],
        description="recall is reported when this share of the test orders is flagged",
    )
    ablations: list[str] = Field(
        default_factory=lambda: ["no_shadow", "no_history", "no_leaves", "gat"]
    )
    baselines: bool = Field(True, description="LightGBM and GBDT+LR on the same raw features")
    lightgbm_trees: int = Field(500, ge=1, description="at most (early stopping on validation)")
    seed: int = 0


class OrdersConfig(BaseModel):
    """``orders:`` in pipeline.yaml: the order-risk family's stages (the ``train`` section of the
    pipeline sets the distributed training, as for the credit family)."""

    model_config = ConfigDict(extra="forbid")

    graph: EventGraphConfig = Field(default_factory=EventGraphConfig)
    split: OrderSplitConfig = Field(default_factory=OrderSplitConfig)
    partition: EventPartitionConfig = Field(default_factory=EventPartitionConfig)
    leaves: LeafConfig = Field(default_factory=LeafConfig)
    model: OrderNetConfig = Field(default_factory=OrderNetConfig)
    evaluate: OrderEvalConfig = Field(default_factory=OrderEvalConfig)
