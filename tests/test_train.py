"""Distributed training on Ray Train: artifacts, early stopping, and recovery from a killed worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch

from creditgraph.model.artifact import load_model
from creditgraph.model.config import ModelConfig
from creditgraph.model.predict import DSLStats
from creditgraph.train.config import TrainConfig
from creditgraph.train.trainer import run_training

SMALL = ModelConfig(hidden=16, heads=2, mc_dropout_samples=2)
FT = "model_ft"


def _killer(
    heartbeats: Path, storage: Path, rank: int, at_epoch: int, killed: dict, stop: threading.Event
) -> None:
    """SIGKILL worker ``rank`` in its first attempt, once it started ``at_epoch`` and Ray Train's
    controller has registered a checkpoint (its snapshot file exists in the storage folder)."""
    path = heartbeats / f"worker{rank}.json"
    while not stop.is_set():
        try:
            beat = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            beat = None
        # only this run's experiment folder: the storage is shared with other trainings
        registered = any(storage.glob(f"{FT}-*/checkpoint_manager_snapshot.json"))
        if beat and registered and beat["restored_from"] is None and beat["epoch"] >= at_epoch:
            os.kill(beat["pid"], signal.SIGKILL)
            killed.update(beat)
            return
        time.sleep(0.02)


def test_killed_worker_resumes_from_checkpoint_and_finishes(pretrained_run, tmp_path):
    heartbeats = tmp_path / "heartbeats"
    cfg = TrainConfig(epochs=4, num_workers=2, max_failures=2, patience=10, seed=3)
    killed: dict = {}
    stop = threading.Event()
    storage = pretrained_run / "checkpoints"
    killer = threading.Thread(
        target=_killer, args=(heartbeats, storage, 1, 1, killed, stop), daemon=True
    )
    killer.start()
    try:
        summary = run_training(pretrained_run, SMALL, cfg, out_name=FT, heartbeat_dir=heartbeats)
    finally:
        stop.set()
    assert killed, "the worker was never killed"
    assert summary["restored_from_epochs"], "training did not resume from a checkpoint"
    assert min(summary["restored_from_epochs"]) >= 0
    folder = pretrained_run / FT
    model, meta = load_model(folder)
    epochs = [h["epoch"] for h in meta["history"]]
    assert epochs == list(range(cfg.epochs)), epochs  # every epoch exactly once, none lost
    after = [h for h in meta["history"] if h["restored_from_epoch"] >= 0]
    assert after and all(h["epoch"] > h["restored_from_epoch"] for h in after)
    assert np.isfinite(summary["best_val_loss"])
    assert summary["owned_nodes_per_s"] > 0
    assert DSLStats.load(folder) is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_early_stopping_on_validation_loss(pretrained_run):
    cfg = TrainConfig(epochs=6, num_workers=1, lr=1e-9, patience=1, ema_decay=0.0)
    summary = run_training(pretrained_run, SMALL, cfg, out_name="model_es")
    # with a learning rate of ~0 the validation loss cannot improve after the first epoch
    assert summary["epochs_run"] == 2
