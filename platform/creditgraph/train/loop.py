"""The per-worker training loop run by Ray Train's ``TorchTrainer`` (DDP; gloo on CPU).

Each worker streams its equal share of the shard dataset (Ray Data ``streaming_split``), glues
``shards_per_step`` shards into one ClusterGCN step and trains on its owned, labeled, training
users only (shadow users give context, never loss). After every epoch a validation pass over the
same shards is all-reduced, rank 0 reports a checkpoint, and every rank reports the metrics. A
restarted worker group resumes from the latest checkpoint; early stopping is decided from the
all-reduced validation loss, so all ranks stop together.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from creditgraph.model.batch import collate_shards
from creditgraph.model.config import ModelConfig
from creditgraph.model.losses import TRAIN, VAL, LossWeights, joint_loss
from creditgraph.model.net import CreditGraphNet, ModelSpec
from creditgraph.train.config import TrainConfig

STATE_FILE = "state.pt"


class EMA:
    """Exponential moving average of the weights; validation, checkpoints and the result use it."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point and self.decay > 0:
                self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)
            else:
                self.shadow[k].copy_(v)


SUMMED = ("loss", "den", "out", "bce", "dsl", "adv")


def _steps(it, per_step: int):
    """Group a worker's stream of shard rows into lists of ``per_step`` shards."""
    buf: list[dict] = []
    for row in it.iter_rows():
        buf.append(row)
        if len(buf) == per_step:
            yield buf
            buf = []
    if buf:
        yield buf


def _worker_nodes(world: int) -> list[str]:
    """The Ray node of every rank, in rank order (where the training actually ran)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return [node]
    import torch.distributed as dist

    nodes: list = [None] * world
    dist.all_gather_object(nodes, node)
    return [str(n) for n in nodes]


def _allreduce(values: dict[str, float], weights: dict[str, float], world: int) -> dict[str, float]:
    """Sample-weighted means of per-worker metrics across the worker group."""
    keys = sorted(values)
    t = torch.tensor(
        [values[k] * weights[k] for k in keys] + [weights[k] for k in keys], dtype=torch.float64
    )
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    n = len(keys)
    return {k: float(t[i] / t[n + i]) if t[n + i] > 0 else float("nan") for i, k in enumerate(keys)}


def resume(raw: torch.nn.Module, ema: EMA, opt: torch.optim.Optimizer, device) -> tuple:
    """Load the latest checkpoint of a restarted worker group into ``raw``, ``ema`` and ``opt``.

    Returns ``(start_epoch, best_val, bad_epochs, history, best_state, restored_from)``: a fresh
    start when there is no checkpoint (``restored_from`` None)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, float("inf"), 0, [], None, None
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
    raw.load_state_dict(state["model"])
    ema.shadow = state["ema"]
    opt.load_state_dict(state["optimizer"])
    epoch = int(state["epoch"])
    history = json.loads(state["history"])
    return (
        epoch + 1,
        float(state["best_val"]),
        int(state["bad_epochs"]),
        history,
        state["best_model"],
        epoch,
    )


def report_epoch(
    rank: int,
    metrics: dict,
    raw: torch.nn.Module,
    ema: EMA,
    opt: torch.optim.Optimizer,
    epoch: int,
    best_val: float,
    bad_epochs: int,
    history: list,
    best_state: dict | None,
) -> None:
    """Report an epoch's metrics to Ray Train; rank 0 attaches the checkpoint :func:`resume`
    reads."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(
            {
                "model": raw.state_dict(),
                "ema": ema.shadow,
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "best_val": best_val,
                "bad_epochs": bad_epochs,
                "history": json.dumps(history),
                "best_model": best_state,
            },
            Path(d) / STATE_FILE,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def trained_state(result) -> tuple[dict, list[dict], float, list[int]]:
    """What a finished ``TorchTrainer`` run left in its last checkpoint: the best EMA weights
    (the last ones when no epoch improved), the epoch history, the best validation loss and the
    epochs a restarted worker group resumed from. A failed run raises."""
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    history = json.loads(state["history"])
    weights = state["best_model"] if state["best_model"] is not None else state["ema"]
    restored = sorted({h["restored_from_epoch"] for h in history if h["restored_from_epoch"] >= 0})
    return weights, history, float(state["best_val"]), restored


def _epoch_pass(
    model,
    raw,
    it,
    cfg: TrainConfig,
    split: int,
    w: LossWeights,
    opt,
    device,
    ema: EMA | None = None,
) -> tuple[dict, dict, int]:
    """One pass over the worker's shards: train (``opt`` given) or evaluate. Returns sums."""
    sums = dict.fromkeys(SUMMED, 0.0)
    counts = dict.fromkeys(SUMMED, 0.0)
    ess, owned = [], 0
    for rows in _steps(it, cfg.shards_per_step):
        batch = collate_shards(rows).to(device)
        if opt is not None:
            out = model(batch)
            loss, parts = joint_loss(raw, out, batch, split, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema.update(raw)
        else:
            with torch.no_grad():
                out = model(batch)
                _, parts = joint_loss(raw, out, batch, split, w)
        n = max(parts["n_labeled"], 1)
        for k in SUMMED:
            if np.isfinite(parts[k]):
                sums[k] += parts[k] * n
                counts[k] += n
        if np.isfinite(parts["ess"]):
            ess.append(parts["ess"])
        owned += int(batch.owned.sum())
    means = {k: sums[k] / counts[k] if counts[k] else float("nan") for k in SUMMED}
    means["ess"] = float(np.mean(ess)) if ess else float("nan")
    return means, {**counts, "ess": float(len(ess))}, owned


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is built by :func:`creditgraph.train.trainer.run_training`."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig(**config["train"])
    torch.manual_seed(cfg.seed + rank)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()

    raw = CreditGraphNet(ModelConfig(**config["model"]), ModelSpec(**config["spec"]))
    raw.load_full_state(config["init_state"])
    model = ray.train.torch.prepare_model(
        raw, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    raw = model.module if hasattr(model, "module") else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(raw, cfg.ema_decay)
    evaluator = copy.deepcopy(raw)  # holds the EMA weights for validation

    start, best_val, bad_epochs, history, best_state, restored_from = resume(raw, ema, opt, device)

    it = ray.train.get_dataset_shard("shards")
    nodes = _worker_nodes(world)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        beta, lam, ipw = cfg.weights(epoch)
        w = LossWeights(beta=beta, lam=lam, ipw=ipw)
        model.train()
        tr, tr_n, owned = _epoch_pass(model, raw, it, cfg, TRAIN, w, opt, device, ema)
        evaluator.load_state_dict(ema.shadow)
        evaluator.eval()
        val_w = LossWeights(beta=1.0, lam=0.0, ipw=False)
        va, va_n, _ = _epoch_pass(evaluator, evaluator, it, cfg, VAL, val_w, None, device)
        seconds = time.perf_counter() - t0
        train = _allreduce(tr, tr_n, world)
        val = _allreduce(va, va_n, world)
        totals = _allreduce(
            {"owned": owned, "seconds": seconds}, {"owned": 1.0, "seconds": 1.0}, world
        )
        val_loss = val["bce"]
        improved = val_loss < best_val - 1e-5
        if improved:
            best_val, bad_epochs = val_loss, 0
            best_state = {k: v.detach().cpu().clone() for k, v in ema.shadow.items()}
        else:
            bad_epochs += 1
        metrics = {
            "epoch": epoch,
            "beta": beta,
            "lambda": lam,
            "ipw": ipw,
            **{f"train_{k}": v for k, v in train.items()},
            "val_loss": val_loss,
            "val_den": val["den"],
            "best_val_loss": best_val,
            "owned_nodes_per_s": totals["owned"] * world / max(totals["seconds"], 1e-9),
            "epoch_seconds": totals["seconds"],
            "restored_from_epoch": -1 if restored_from is None else restored_from,
            "world_size": world,
            "worker_nodes": nodes,
        }
        history.append(metrics)
        stop = bad_epochs >= cfg.patience or epoch == cfg.epochs - 1
        report_epoch(rank, metrics, raw, ema, opt, epoch, best_val, bad_epochs, history, best_state)
        if stop:
            break
