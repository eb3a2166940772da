"""Distributed training on Ray Train: artifacts, early stopping, and recovery from a killed worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from creditgraph.layout import RunLayout
from creditgraph.model.artifact import load_model
from creditgraph.model.config import ModelConfig
from creditgraph.model.predict import DSLStats
from creditgraph.train.config import TrainConfig
from creditgraph.train.trainer import run_training

SMALL = ModelConfig(hidden=16, heads=2, mc_dropout_samples=2)
FT = "model_ft"


def _train_workers() -> list[psutil.Process]:
    """Live Ray Train worker processes (their process title names the actor class)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if cmd.startswith("ray::") and "TrainWorker" in cmd:
            found.append(proc)
    return found


def _killer(storage: Path, name: str, killed: dict, stop: threading.Event) -> None:
    """SIGKILL one training worker once Ray Train has registered this run's first checkpoint
    (fault injection from outside, as an operator's `kill -9` would do it)."""
    while not stop.is_set():
        registered = any(storage.glob(f"{name}-*/checkpoint_manager_snapshot.json"))
        workers = _train_workers() if registered else []
        if workers:
            victim = workers[-1]
            killed.update(pid=victim.pid, cmd=" ".join(victim.cmdline()))
            os.kill(victim.pid, signal.SIGKILL)
            return
        time.sleep(0.05)


def test_killed_worker_resumes_from_checkpoint_and_finishes(pretrained_run):
    cfg = TrainConfig(epochs=4, num_workers=2, max_failures=2, patience=10, seed=3)
    killed: dict = {}
    stop = threading.Event()
    out = RunLayout(pretrained_run).ablation(FT)
    storage = pretrained_run / "checkpoints"
    killer = threading.Thread(target=_killer, args=(storage, FT, killed, stop), daemon=True)
    killer.start()
    try:
        summary = run_training(pretrained_run, SMALL, cfg, out)
    finally:
        stop.set()
    assert killed, "no training worker was killed"
    assert summary["restored_from_epochs"], "training did not resume from a checkpoint"
    assert min(summary["restored_from_epochs"]) >= 0
    model, meta = load_model(out)
    epochs = [h["epoch"] for h in meta["history"]]
    assert epochs == list(range(cfg.epochs)), epochs  # every epoch exactly once, none lost
    after = [h for h in meta["history"] if h["restored_from_epoch"] >= 0]
    assert after and all(h["epoch"] > h["restored_from_epoch"] for h in after)
    assert np.isfinite(summary["best_val_loss"])
    assert summary["owned_nodes_per_s"] > 0
    assert DSLStats.load(out) is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert meta["version"] == summary["version"]


def test_early_stopping_on_validation_loss(pretrained_run):
    cfg = TrainConfig(epochs=6, num_workers=1, lr=1e-9, patience=1, ema_decay=0.0)
    summary = run_training(pretrained_run, SMALL, cfg, RunLayout(pretrained_run).ablation("es"))
    # with a learning rate of ~0 the validation loss cannot improve after the first epoch
    assert summary["epochs_run"] == 2
