"""Where everything lives: the one home of every run-folder and snapshot path.

A *run folder* holds what training produced; it is written stage by stage and is read-only after
training (scoring and serving never write into it)::

    RUN/graph/        build: users.parquet, features.npz, uu_edges.npz, links.parquet,
                      feature_stats.json, salt.key
    RUN/shards/       partition: shard_00000.npz ..., membership.npy
    RUN/pretrain/     pretrain: teacher.txt, teacher.json, soft_labels.parquet, leaves.npy,
                      alpha.parquet, dag.json
    RUN/model/        train: model.pt, model.json, dsl_stats.npz, calibration.json
    RUN/calibration/  calibrate: calibrator.json, guarantee.json (tightening per ceiling),
                      reliability.json
    RUN/ablations/N/  one folder per ablation model (same files as model/)
    RUN/eval/         evaluate: metrics.json, headline.md/csv, figures/*.png
    RUN/rules/        rules: rules.json, rules.sql, rules.txt, summary.json
    RUN/events/       order family, build: the event graph (graph/events.py), orders.parquet,
                      features.npy, entities.parquet (keyed hashes), salt.key
    RUN/leaves/       order family: GBDT leaf encoder, leaves.npy, feature_stats.json
    RUN/checkpoints/  Ray Train checkpoints (storage path of the trainer)
    RUN/logs/         Ray's own logs and the console log of commands run on this folder

Every stage folder carries ``manifest.json`` (what it is) and ``stage.json`` (the pipeline's record:
the stage's fingerprint, chained over its inputs). A *snapshot* is what online scoring reads at a
decision time T, made by batch scoring; snapshots live in a registry beside the run, never inside
it (``RUN.snapshots/`` by default)::

    REGISTRY/snapshots/<id>/snapshot.json   metadata: T, model and graph versions, schema, caps
    REGISTRY/snapshots/<id>/store.sqlite    user and entity records (file backend)
    REGISTRY/CURRENT                        the promoted snapshot and the promotion history

Classes here only name paths; each typed loader lives with its type and takes a layout
(``GraphArtifacts.load``, ``PretrainArtifacts.load``, ``load_model``, ``ScoringBundle.load``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
STAGE_RECORD = "stage.json"


@dataclass(frozen=True)
class StageFolder:
    """A stage's output folder: its manifest and its pipeline record."""

    dir: Path

    @property
    def manifest(self) -> Path:
        return self.dir / MANIFEST

    @property
    def record(self) -> Path:
        return self.dir / STAGE_RECORD

    def exists(self) -> bool:
        return self.manifest.exists()


@dataclass(frozen=True)
class GraphFiles(StageFolder):
    """``RUN/graph``: the leak-free heterograph (see ``graph/artifacts.py``)."""

    @property
    def users(self) -> Path:
        return self.dir / "users.parquet"

    @property
    def features(self) -> Path:
        return self.dir / "features.npz"

    @property
    def edges(self) -> Path:
        return self.dir / "uu_edges.npz"

    @property
    def feature_stats(self) -> Path:
        return self.dir / "feature_stats.json"

    @property
    def links(self) -> Path:
        return self.dir / "links.parquet"

    @property
    def salt(self) -> Path:
        return self.dir / "salt.key"


@dataclass(frozen=True)
class ShardFiles(StageFolder):
    """``RUN/shards``: ClusterGCN shards with shadow nodes."""

    @property
    def membership(self) -> Path:
        return self.dir / "membership.npy"

    def shard(self, part: int) -> Path:
        return self.dir / f"shard_{part:05d}.npz"


@dataclass(frozen=True)
class PretrainFiles(StageFolder):
    """``RUN/pretrain``: teacher, soft labels, GBDT leaves, alpha_j, the feature DAG."""

    @property
    def teacher(self) -> Path:
        return self.dir / "teacher.txt"

    @property
    def teacher_params(self) -> Path:
        return self.dir / "teacher.json"

    @property
    def soft_labels(self) -> Path:
        return self.dir / "soft_labels.parquet"

    @property
    def leaves(self) -> Path:
        return self.dir / "leaves.npy"

    @property
    def alpha(self) -> Path:
        return self.dir / "alpha.parquet"

    @property
    def dag(self) -> Path:
        return self.dir / "dag.json"


@dataclass(frozen=True)
class ModelFiles(StageFolder):
    """``RUN/model`` (or ``RUN/ablations/<name>``): weights, metadata, DSL and calibration stats."""

    @property
    def manifest(self) -> Path:  # the model's metadata doubles as its manifest
        return self.dir / "model.json"

    @property
    def weights(self) -> Path:
        return self.dir / "model.pt"

    @property
    def dsl_stats(self) -> Path:
        return self.dir / "dsl_stats.npz"

    @property
    def calibration(self) -> Path:
        return self.dir / "calibration.json"


@dataclass(frozen=True)
class CalibrationFiles(StageFolder):
    """``RUN/calibration``: the post-hoc calibrator and the guarantee's tightening per ceiling."""

    @property
    def calibrator(self) -> Path:
        return self.dir / "calibrator.json"

    @property
    def guarantee(self) -> Path:
        return self.dir / "guarantee.json"

    @property
    def reliability(self) -> Path:
        return self.dir / "reliability.json"


@dataclass(frozen=True)
class EvalFiles(StageFolder):
    """``RUN/eval``: metrics, headline tables and figures."""

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def figures(self) -> Path:
        return self.dir / "figures"


@dataclass(frozen=True)
class RulesFiles(StageFolder):
    """A rule-set folder (``RUN/rules`` or any ``creditgraph rules --out``)."""

    @property
    def manifest(self) -> Path:
        return self.dir / "summary.json"

    @property
    def rules(self) -> Path:
        return self.dir / "rules.json"


@dataclass(frozen=True)
class EventFiles(StageFolder):
    """``RUN/events`` (order family): the time-sliced event graph, orders table, raw features,
    entity keys and the entity salt (see ``graph/events.py``)."""

    @property
    def orders(self) -> Path:
        return self.dir / "orders.parquet"

    @property
    def salt(self) -> Path:
        return self.dir / "salt.key"


@dataclass(frozen=True)
class LeafFiles(StageFolder):
    """``RUN/leaves`` (order family): the GBDT leaf encoder, every order's leaves, the raw
    feature standardization (see ``causal/leaves.py``)."""

    @property
    def leaves(self) -> Path:
        return self.dir / "leaves.npy"

    @property
    def folds(self) -> Path:
        return self.dir / "fold.npy"

    @property
    def gbdt_logit(self) -> Path:
        return self.dir / "gbdt_logit.npy"

    @property
    def feature_stats(self) -> Path:
        return self.dir / "feature_stats.json"


@dataclass(frozen=True)
class RunLayout:
    """Every path of a run folder (see the module docstring)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def graph(self) -> GraphFiles:
        return GraphFiles(self.root / "graph")

    @property
    def shards(self) -> ShardFiles:
        return ShardFiles(self.root / "shards")

    @property
    def pretrain(self) -> PretrainFiles:
        return PretrainFiles(self.root / "pretrain")

    @property
    def model(self) -> ModelFiles:
        return ModelFiles(self.root / "model")

    @property
    def calibration(self) -> CalibrationFiles:
        return CalibrationFiles(self.root / "calibration")

    def ablation(self, name: str) -> ModelFiles:
        return ModelFiles(self.root / "ablations" / name)

    @property
    def eval(self) -> EvalFiles:
        return EvalFiles(self.root / "eval")

    @property
    def rules(self) -> RulesFiles:
        return RulesFiles(self.root / "rules")

    @property
    def events(self) -> EventFiles:
        return EventFiles(self.root / "events")

    @property
    def leaves(self) -> LeafFiles:
        return LeafFiles(self.root / "leaves")

    @property
    def is_orders(self) -> bool:
        """Whether this is an order-risk run (its event graph exists)."""
        return self.events.exists()

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def default_snapshots(self) -> Path:
        """The snapshot registry used when none is named: a sibling folder ``RUN.snapshots``."""
        return self.root.parent / f"{self.root.name}.snapshots"


@dataclass(frozen=True)
class SnapshotFiles(StageFolder):
    """One immutable snapshot folder."""

    @property
    def manifest(self) -> Path:
        return self.dir / "snapshot.json"

    @property
    def store(self) -> Path:
        return self.dir / "store.sqlite"

    @property
    def id(self) -> str:
        return self.dir.name


@dataclass(frozen=True)
class RegistryLayout:
    """A snapshot registry: immutable snapshots plus the pointer to the promoted one."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    def snapshot(self, snapshot_id: str) -> SnapshotFiles:
        return SnapshotFiles(self.snapshots / snapshot_id)

    @property
    def current(self) -> Path:
        return self.root / "CURRENT"


@dataclass(frozen=True)
class ScoreFiles(StageFolder):
    """A batch scoring output folder (``creditgraph score --out``)."""

    @property
    def manifest(self) -> Path:
        return self.dir / "summary.json"

    @property
    def decisions(self) -> Path:
        return self.dir / "decisions.parquet"

    @property
    def curves(self) -> Path:
        return self.dir / "curves.parquet"


def as_layout(run: RunLayout | str | Path) -> RunLayout:
    """A run folder given as a layout or a path, as a :class:`RunLayout`."""
    return run if isinstance(run, RunLayout) else RunLayout(Path(run))
