"""``creditgraph train``: Ray Train's TorchTrainer over the ClusterGCN shards -> ``RUN/model``."""

from __future__ import annotations

import threading
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
import ray
import ray.data
import ray.train
import torch
from ray.train.torch import TorchTrainer

from creditgraph.causal.artifacts import PretrainArtifacts
from creditgraph.graph.artifacts import GraphArtifacts
from creditgraph.graph.features import FeatureStandardizer
from creditgraph.graph.partition import load_shard, shard_paths
from creditgraph.layout import ModelFiles, RunLayout, as_layout
from creditgraph.model.artifact import save_model
from creditgraph.model.config import ModelConfig
from creditgraph.model.infer import Inference
from creditgraph.model.net import CreditGraphNet, ModelSpec
from creditgraph.model.predict import DSLStats
from creditgraph.train.config import TrainConfig
from creditgraph.train.loop import train_loop_per_worker, trained_state
from creditgraph.utils.io import atomic_dir, fingerprint, read_json
from creditgraph.utils.logs import get_logger
from creditgraph.utils.runtime import require_ray

log = get_logger(__name__)


#: graphs smaller than this train in seconds: no progress bar (and no reporting actor)
PROGRESS_MIN_USERS = 10_000


@ray.remote(num_cpus=0)
class _EpochInbox:
    """Holds the epochs reported by the Ray Train controller until the driver collects them."""

    def __init__(self) -> None:
        self.reports: list[dict] = []

    def add(self, report: dict) -> None:
        self.reports.append(report)

    def take(self) -> list[dict]:
        out, self.reports = self.reports, []
        return out


class EpochReports(ray.train.UserCallback):
    """Runs on the Ray Train controller after every ``ray.train.report``: forwards the epoch and
    its validation loss to the driver (fire and forget; the controller never waits on it)."""

    def __init__(self, inbox) -> None:
        self.inbox = inbox

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        first = metrics[0] if metrics else {}
        self.inbox.add.remote({"epoch": first.get("epoch"), "val_loss": first.get("val_loss")})


class EpochProgress:
    """One tqdm bar over the epochs on the driver, fed by :class:`EpochReports`.

    Pass ``callbacks`` to ``RunConfig`` and run ``trainer.fit()`` inside ``with progress:``;
    disabled (no bar, no callbacks, no actor) when ``enabled`` is False.
    """

    def __init__(self, epochs: int, desc: str, enabled: bool = True) -> None:
        self.epochs, self.desc = epochs, desc
        self.inbox = _EpochInbox.remote() if enabled else None
        self.callbacks = [EpochReports(self.inbox)] if enabled else []
        self._stop = threading.Event()
        self._bar = self._thread = None

    def __enter__(self) -> EpochProgress:
        if self.inbox is None:
            return self
        from tqdm.auto import tqdm

        self._bar = tqdm(total=self.epochs, desc=self.desc, unit="epoch")
        self._thread = threading.Thread(target=self._pump, name="epoch-progress", daemon=True)
        self._thread.start()
        return self

    def _show(self, reports: list[dict]) -> None:
        for r in reports:
            self._bar.update(1)
            if r.get("val_loss") is not None:
                self._bar.set_postfix(val_bce=f"{r['val_loss']:.4f}", refresh=False)
        if reports:
            self._bar.refresh()

    def _pump(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._show(ray.get(self.inbox.take.remote(), timeout=5))
            except Exception:  # the result never depends on the bar
                return

    def __exit__(self, *exc) -> None:
        if self.inbox is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            with suppress(Exception):
                self._show(ray.get(self.inbox.take.remote(), timeout=5))
            self._bar.close()
        ray.kill(self.inbox)


def _pretrain(run: RunLayout) -> PretrainArtifacts | None:
    try:
        return PretrainArtifacts.load(run)
    except FileNotFoundError:
        log.warning("no pretraining artifacts in %s: alpha = 0, no DAG, no GBDT leaves", run.root)
        return None


def initial_model(
    run: RunLayout | str | Path, model_cfg: ModelConfig
) -> tuple[CreditGraphNet, GraphArtifacts, PretrainArtifacts | None]:
    """The untrained model with its data-fitted buffers and frozen pretraining outputs attached."""
    run = as_layout(run)
    art = GraphArtifacts.load(run)
    pre = _pretrain(run)
    leaf_vocab = None
    if pre is not None and model_cfg.use_leaves:
        leaf_vocab = (np.asarray(pre.leaves).max(axis=0) + 1).astype(int).tolist()
    spec = ModelSpec(
        n_features=art.z.shape[1],
        n_struct=art.struct.shape[1],
        feature_names=art.feature_names,
        struct_names=art.manifest["struct_names"],
        leaf_vocab=leaf_vocab,
    )
    if pre is None and model_cfg.use_teacher_score:
        raise FileNotFoundError(
            "model.use_teacher_score needs the pretraining stage (RUN/pretrain)"
        )
    model = CreditGraphNet(model_cfg, spec)
    train = art.split_mask("train")
    model.fit_buffers(
        torch.tensor(art.users["treatment"].to_numpy()[train], dtype=torch.float32),
        torch.tensor(art.users["outcome"].to_numpy()[train], dtype=torch.float32),
    )
    if pre is not None:
        model.set_causal(
            torch.tensor(pre.alpha_filled, dtype=torch.float32),
            torch.tensor(np.stack([pre.dag_src, pre.dag_dst]), dtype=torch.long),
        )
    return model, art, pre


def teacher_logits(pre) -> np.ndarray:
    """The teacher's logit per user: out-of-fold for labeled training users, else the final model."""
    p = np.clip(np.asarray(pre.soft_label, dtype=np.float64), 1e-5, 1 - 1e-5)
    return np.log(p / (1 - p)).astype(np.float32)


def shard_dataset(run: RunLayout, model: CreditGraphNet, pre: PretrainArtifacts | None):
    """Ray Data dataset of shards: one row per shard file, arrays loaded by Ray Data tasks.

    Rows also carry the per-node extras the model needs from pretraining (GBDT leaves, the
    teacher's logit), gathered by global node id inside the Ray Data task.
    """
    leaves_path = str(run.pretrain.leaves) if model.spec.leaf_vocab is not None else None
    prior = teacher_logits(pre) if model.prior_dim and pre is not None else None

    def load_row(row: dict) -> dict:
        shard = load_shard(row["path"])
        if leaves_path:
            shard["leaves"] = np.asarray(np.load(leaves_path, mmap_mode="r")[shard["nodes"]])
        if prior is not None:
            shard["prior"] = prior[shard["nodes"]]
        return shard

    paths = [str(p.resolve()) for p in shard_paths(run)]
    ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=len(paths))
    # Shards are loaded once into the object store (distributed over the cluster's nodes); each
    # epoch then streams every worker its equal share in a fresh random block order, with no task
    # start-up per epoch. Loading asks for no CPU so it can run next to the training workers.
    loaded = ds.map(load_row, num_cpus=0).materialize()
    return loaded.randomize_block_order()


def model_extras(model: CreditGraphNet, pre) -> dict[str, np.ndarray | None]:
    """The per-node tables a batch needs besides the shard: GBDT leaves and the teacher logit."""
    return {
        "leaves": np.asarray(pre.leaves)
        if pre is not None and model.spec.leaf_vocab is not None
        else None,
        "prior": teacher_logits(pre) if pre is not None and model.prior_dim else None,
    }


def fit_dsl_stats(
    run: RunLayout,
    model: CreditGraphNet,
    art: GraphArtifacts,
    pre: PretrainArtifacts | None,
    seed: int,
    max_users: int = 20_000,
) -> DSLStats:
    """Reference distributions of the DSL score from (a sample of) the training users.

    Model uncertainty is measured on a fixed grid (0 to the 99th percentile of the training
    limits) stored with the statistics, so scores on any decision grid stay comparable. The
    users are scored exactly as every later caller scores them (:class:`Inference`).
    """
    rng = np.random.default_rng(seed)
    train = np.flatnonzero(art.split_mask("train"))
    rows = np.sort(rng.choice(train, size=min(max_users, len(train)), replace=False))
    limits = art.users["treatment"].to_numpy()[train]
    top = float(np.quantile(limits[limits > 0], 0.99)) if (limits > 0).any() else 1.0
    unc_grid = np.linspace(0.0, top, 11)
    std = FeatureStandardizer.from_records(
        art.feature_stats, clip_z=art.manifest["config"]["clip_z"]
    )
    inference = Inference(model, std, None if pre is None else pre.teacher(), seed=seed)
    limit = art.users["treatment"].to_numpy(np.float64)
    first = inference.first(art.raw, limit, art.struct)
    tokens = inference.propagate(first, art.src, art.dst, art.weight)
    fin = inference.finish(
        art.raw[rows], limit[rows], art.struct[rows], tokens[rows, :, 1:], h0=first.h0[rows]
    )
    prob_std, _ = inference.uncertainty(fin.x, unc_grid)
    return DSLStats.fit(fin.rep, prob_std, unc_grid)


def run_training(
    run: RunLayout | str | Path,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    out: ModelFiles | None = None,
) -> dict:
    """Train with Ray Train and write ``out`` (default ``RUN/model``): best weights, config, history.

    A driver restarted with the same inputs and configs resumes from the latest Ray Train
    checkpoint of its previous attempt (same storage path and run name). Reuse of a finished
    model is the pipeline's business (``creditgraph.pipeline``), not this function's.
    """
    model_cfg = model_cfg or ModelConfig()
    train_cfg = train_cfg or TrainConfig()
    run = as_layout(run)
    out = out or run.model
    require_ray("training")
    shards_manifest = read_json(run.shards.manifest)
    if shards_manifest["hops"] < model_cfg.hops:
        raise ValueError(
            f"shards have {shards_manifest['hops']} shadow hops but the model needs {model_cfg.hops}: "
            "re-partition with partition.hops >= model.hops"
        )
    t0 = time.perf_counter()
    model, art, pre = initial_model(run, model_cfg)
    use_gpu = train_cfg.use_gpu
    if use_gpu is None:
        use_gpu = bool(ray.cluster_resources().get("GPU", 0) >= train_cfg.num_workers)
    # the checkpoint run name: same inputs and configs resume the same Ray Train run
    resume_key = fingerprint(
        art.manifest["fingerprint"],
        None if pre is None else pre.manifest.get("summary"),
        model_cfg.model_dump(),
        train_cfg.model_dump(),
    )
    storage = train_cfg.storage_path or str(run.checkpoints)
    progress = EpochProgress(
        train_cfg.epochs, f"train {out.dir.name}", art.n_users >= PROGRESS_MIN_USERS
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": model_cfg.model_dump(),
            "train": train_cfg.model_dump(),
            "spec": model.spec.model_dump(),
            "init_state": model.state_dict(),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=train_cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": train_cfg.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=f"{out.dir.name}-{resume_key}",
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=train_cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=progress.callbacks,
        ),
        datasets={"shards": shard_dataset(run, model, pre)},
    )
    log.info(
        "training %s on %d Ray Train worker(s)%s, %d epochs max",
        out.dir.name,
        train_cfg.num_workers,
        " (GPU)" if use_gpu else "",
        train_cfg.epochs,
    )
    with progress:
        result = trainer.fit()
    weights, history, best_val, restored = trained_state(result)
    model.load_full_state(weights)
    dsl_stats = fit_dsl_stats(run, model, art, pre, train_cfg.seed)
    seconds = time.perf_counter() - t0
    summary = {
        "epochs_run": len(history),
        "best_val_loss": best_val,
        "restored_from_epochs": restored,
        "workers": train_cfg.num_workers,
        "seconds": seconds,
        "owned_nodes_per_s": float(np.median([h["owned_nodes_per_s"] for h in history])),
        "checkpoint_run": f"{out.dir.name}-{resume_key}",
        "worker_nodes": history[-1].get("worker_nodes", []),
    }
    with atomic_dir(out.dir) as tmp_dir:
        summary["version"] = save_model(
            tmp_dir,
            model,
            {"train": train_cfg.model_dump(), "history": history, "summary": summary},
        )
        dsl_stats.save(tmp_dir)
    log.info(
        "trained %s: %d epochs, best val BCE %.4f, %.0f owned nodes/s, %.0fs",
        out.dir.name,
        summary["epochs_run"],
        summary["best_val_loss"],
        summary["owned_nodes_per_s"],
        seconds,
    )
    return summary
