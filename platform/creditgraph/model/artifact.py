"""Saving and loading a trained model safely (state dict + JSON; ``torch.load(weights_only=True)``)."""

from __future__ import annotations

from pathlib import Path

import torch

from creditgraph.model.config import ModelConfig
from creditgraph.model.net import CreditGraphNet, ModelSpec
from creditgraph.utils.io import read_json, write_json

WEIGHTS = "model.pt"
META = "model.json"


def save_model(folder: str | Path, model: CreditGraphNet, extra: dict | None = None) -> None:
    """Write ``model.pt`` (tensors only) and ``model.json`` (config, spec, extra) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, folder / WEIGHTS)
    write_json(
        folder / META,
        {"config": model.cfg.model_dump(), "spec": model.spec.model_dump(), **(extra or {})},
    )


def load_model(folder: str | Path, map_location: str = "cpu") -> tuple[CreditGraphNet, dict]:
    """Rebuild the model from ``model.json`` and load ``model.pt`` without unpickling code."""
    folder = Path(folder)
    meta = read_json(folder / META)
    model = CreditGraphNet(ModelConfig(**meta["config"]), ModelSpec(**meta["spec"]))
    model.load_full_state(
        torch.load(folder / WEIGHTS, map_location=map_location, weights_only=True)
    )
    model.eval()
    return model, meta
