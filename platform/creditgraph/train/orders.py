"""Training the order-risk network with Ray Train over the event graph's ClusterGCN shards.

The same machinery as the credit family (:mod:`creditgraph.train.loop`): a ``TorchTrainer``
(DDP; gloo on CPU) whose workers each stream their share of the shard dataset (Ray Data), glue
``shards_per_step`` shards into one step and train on the owned, labeled real orders of the
training period only (shadow orders and halo nodes give context, never loss); the EMA of the
weights is validated after every epoch (all-reduced BCE on the validation period), rank 0 reports
a checkpoint, a restarted worker group resumes from the latest one (``FailureConfig``), and early
stopping is decided from the all-reduced validation loss so all ranks stop together.

Labels are those known at the training cut-off (``RUN/events``, from
:func:`creditgraph.data.orders.labels_known_at`); evaluation labels never reach this module.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import ray.train
import torch
from ray.train.torch import TorchTrainer

from creditgraph.graph.events import event_shard_paths, load_event_shard
from creditgraph.layout import ModelFiles, RunLayout, as_layout
from creditgraph.model.orders import (
    OrderNet,
    OrderNetConfig,
    OrderNetSpec,
    collate,
    inputs_for,
    order_loss,
    save_order_model,
    shard_arrays,
    spec_for,
)
from creditgraph.train.config import TrainConfig
from creditgraph.train.loop import (
    EMA,
    _allreduce,
    _steps,
    _worker_nodes,
    report_epoch,
    resume,
    trained_state,
)
from creditgraph.utils.io import atomic_dir, fingerprint, read_json
from creditgraph.utils.logs import get_logger
from creditgraph.utils.runtime import require_ray

log = get_logger(__name__)


def order_shard_dataset(run: RunLayout) -> ray.data.Dataset:
    """Ray Data dataset of shards, one row per shard with its nodes' inputs gathered (loaded once
    into the object store by tasks that ask for no CPU, then re-ordered every epoch)."""
    root = str(run.root)

    def load_row(row: dict) -> dict:
        return shard_arrays(load_event_shard(row["path"]), inputs_for(root))

    paths = [str(p.resolve()) for p in event_shard_paths(run, train_only=True)]
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    # no CPU asked (loading may run beside training workers), but few at a time: every task
    # process imports torch and maps the run's arrays
    loaded = ds.map(load_row, num_cpus=0, concurrency=2).materialize()
    return loaded.randomize_block_order()


def _pass(
    model, raw, it, cfg: TrainConfig, codes, pos_weight, opt, device, world, ema=None, val=False
):
    """One pass over the worker's shards: train (``opt`` given) or validate; returns sums."""
    total, count, owned = 0.0, 0, 0
    for rows in _steps(it, cfg.shards_per_step):
        b = collate(rows).to(device)
        train_mask, val_mask = b.masks(codes)
        mask = val_mask if val else train_mask
        owned += int(b.owned.sum())
        # nothing to learn or measure here (with several workers every rank steps: DDP syncs)
        if not bool(mask.any()) and (opt is None or world == 1):
            continue
        if opt is not None:
            out = model(b)
            loss, n = order_loss(out, b, mask, pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # every rank steps, even on a shard without labels (DDP syncs)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if ema is not None:
                ema.update(raw)
        else:
            with torch.no_grad():
                out = model(b)
                loss, n = order_loss(out, b, mask, 1.0)
        total += float(loss) * n
        count += n
    return total, count, owned


def order_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; ``config`` is built by :func:`run_order_training`."""
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = TrainConfig(**config["train"])
    net_cfg = OrderNetConfig(**config["model"])
    codes = tuple(config["train_codes"])
    torch.manual_seed(cfg.seed + rank)
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    device = ray.train.torch.get_device()
    raw = OrderNet(net_cfg, OrderNetSpec(**config["spec"]))
    raw.load_state_dict(config["init_state"])
    model = ray.train.torch.prepare_model(
        raw, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    raw = model.module if hasattr(model, "module") else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(raw, cfg.ema_decay)
    evaluator = copy.deepcopy(raw)

    start, best_val, bad, history, best_state, restored = resume(raw, ema, opt, device)

    it = ray.train.get_dataset_shard("shards")
    nodes = _worker_nodes(world)
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        tr_sum, tr_n, owned = _pass(
            model, raw, it, cfg, codes, net_cfg.pos_weight, opt, device, world, ema
        )
        evaluator.load_state_dict(ema.shadow)
        evaluator.eval()
        va_sum, va_n, _ = _pass(
            evaluator, evaluator, it, cfg, codes, 1.0, None, device, world, val=True
        )
        seconds = time.perf_counter() - t0
        train = _allreduce({"bce": tr_sum / max(tr_n, 1)}, {"bce": float(tr_n)}, world)
        val = _allreduce({"bce": va_sum / max(va_n, 1)}, {"bce": float(va_n)}, world)
        totals = _allreduce(
            {"owned": owned, "seconds": seconds, "labeled": tr_n},
            {"owned": 1.0, "seconds": 1.0, "labeled": 1.0},
            world,
        )
        val_loss = val["bce"]
        if val_loss < best_val - 1e-5:
            best_val, bad = val_loss, 0
            best_state = {k: v.detach().cpu().clone() for k, v in ema.shadow.items()}
        else:
            bad += 1
        metrics = {
            "epoch": epoch,
            "train_bce": train["bce"],
            "val_loss": val_loss,
            "best_val_loss": best_val,
            "labeled_orders": totals["labeled"] * world,
            "owned_nodes_per_s": totals["owned"] * world / max(totals["seconds"], 1e-9),
            "epoch_seconds": totals["seconds"],
            "restored_from_epoch": -1 if restored is None else restored,
            "world_size": world,
            "worker_nodes": nodes,
        }
        history.append(metrics)
        stop = bad >= cfg.patience or epoch == cfg.epochs - 1
        report_epoch(rank, metrics, raw, ema, opt, epoch, best_val, bad, history, best_state)
        if stop:
            break


def run_order_training(
    run: RunLayout | str | Path,
    model_cfg: OrderNetConfig | None = None,
    train_cfg: TrainConfig | None = None,
    out: ModelFiles | None = None,
) -> dict:
    """Train on ``RUN/shards`` with Ray Train and write ``out`` (default ``RUN/model``): the best
    EMA weights by validation loss, config, spec and history.

    A driver restarted with the same inputs and configs resumes from the latest checkpoint of
    its previous attempt (same storage path and run name), as the credit family does.
    """
    model_cfg = model_cfg or OrderNetConfig()
    train_cfg = train_cfg or TrainConfig()
    run = as_layout(run)
    out = out or run.model
    require_ray("training the order model")
    shards = read_json(run.shards.manifest)
    t0 = time.perf_counter()
    torch.manual_seed(train_cfg.seed)
    model = OrderNet(model_cfg, spec_for(run))
    if shards["hops"] < model.hops:
        raise ValueError(
            f"shards have {shards['hops']} halo hops but the network needs {model.hops}: "
            "re-partition with a deeper halo (orders.model.layers + 1)"
        )
    leaf_meta = read_json(run.leaves.manifest)
    use_gpu = train_cfg.use_gpu
    if use_gpu is None:
        use_gpu = bool(ray.cluster_resources().get("GPU", 0) >= train_cfg.num_workers)
    resume_key = fingerprint(
        read_json(run.events.manifest)["fingerprint"],
        leaf_meta.get("config"),
        shards.get("config"),
        model_cfg.model_dump(),
        train_cfg.model_dump(),
    )
    trainer = TorchTrainer(
        order_loop_per_worker,
        train_loop_config={
            "model": model_cfg.model_dump(),
            "train": train_cfg.model_dump(),
            "spec": model.spec.model_dump(),
            "init_state": model.state_dict(),
            "train_codes": leaf_meta["network_train_codes"],
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=train_cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": train_cfg.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=f"{out.dir.name}-{resume_key}",
            storage_path=train_cfg.storage_path or str(run.checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={"shards": order_shard_dataset(run)},
    )
    log.info(
        "training order model %s on %d Ray Train worker(s), %d epochs max",
        out.dir.name, train_cfg.num_workers, train_cfg.epochs,
    )  # fmt: skip
    result = trainer.fit()
    weights, history, best_val, restored = trained_state(result)
    model.load_state_dict(weights)
    summary = {
        "epochs_run": len(history),
        "best_val_loss": best_val,
        "restored_from_epochs": restored,
        "workers": train_cfg.num_workers,
        "seconds": time.perf_counter() - t0,
        "owned_nodes_per_s": float(np.median([h["owned_nodes_per_s"] for h in history])),
        "checkpoint_run": f"{out.dir.name}-{resume_key}",
        "worker_nodes": history[-1].get("worker_nodes", []),
    }
    with atomic_dir(out.dir) as tmp_dir:
        summary["version"] = save_order_model(
            ModelFiles(tmp_dir),
            model,
            {"train": train_cfg.model_dump(), "history": history, "summary": summary},
        )
    log.info(
        "trained %s: %d epochs, best validation BCE %.4f, %.0fs",
        out.dir.name, summary["epochs_run"], summary["best_val_loss"], summary["seconds"],
    )  # fmt: skip
    return summary
