"""Saving and loading a trained model safely (state dict + JSON; ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from creditgraph.layout import ModelFiles
from creditgraph.model.config import ModelConfig
from creditgraph.model.net import CreditGraphNet, ModelSpec
from creditgraph.utils.io import read_json, write_json


def _files(folder: str | Path | ModelFiles) -> ModelFiles:
    return folder if isinstance(folder, ModelFiles) else ModelFiles(Path(folder))


def save_model(
    folder: str | Path | ModelFiles, model: CreditGraphNet, extra: dict | None = None
) -> str:
    """Write ``model.pt`` (tensors only) and ``model.json`` (config, spec, version, extra).

    Returns the model version: a hash of the saved weights, so two different models never share
    a version (what snapshots, responses and the decision log name).
    """
    files = _files(folder)
    files.dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, files.weights)
    version = hashlib.sha256(files.weights.read_bytes()).hexdigest()[:16]
    write_json(
        files.manifest,
        {
            "version": version,
            "config": model.cfg.model_dump(),
            "spec": model.spec.model_dump(),
            **(extra or {}),
        },
    )
    return version


def load_model(
    folder: str | Path | ModelFiles, map_location: str = "cpu"
) -> tuple[CreditGraphNet, dict]:
    """Rebuild the model from ``model.json`` and load ``model.pt`` without unpickling code."""
    files = _files(folder)
    if not files.exists():
        raise FileNotFoundError(f"no trained model at {files.dir}; run `creditgraph train` first")
    meta = read_json(files.manifest)
    model = CreditGraphNet(ModelConfig(**meta["config"]), ModelSpec(**meta["spec"]))
    model.load_full_state(torch.load(files.weights, map_location=map_location, weights_only=True))
    model.eval()
    return model, meta
