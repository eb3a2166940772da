"""The stages of a run and the one place that fingerprints, reuses them and starts Ray.

A :class:`Stage` names its config sections, the stages it reads from and its output folder.
Its fingerprint hashes its name and version, its own config sections, the fingerprints of its
inputs (chained) and, for a stage that reads a dataset, the dataset's files. A stage whose output
folder holds a ``stage.json`` with the same fingerprint is reused; otherwise it runs (and every
stage downstream, whose fingerprint then changes, runs too). Each stage receives only its own
sections of the configuration. Ray starts (or is joined, with an address) before the first stage
that needs it, and not at all when everything is reused.

``creditgraph run`` runs the training stages, the single-stage commands (``build``, ``pretrain``,
``train``, ``evaluate``, ``rules``) run one or two of them through the same machinery, and
``./run demo`` is a pipeline configuration that adds rule learning and batch scoring.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from creditgraph.causal.leaves import run_leaves
from creditgraph.causal.pretrain import run_pretrain
from creditgraph.config import PipelineConfig, override_many
from creditgraph.data.spec import DatasetSpec
from creditgraph.evaluate.orders import run_order_evaluation
from creditgraph.evaluate.run import ABLATIONS, run_evaluation
from creditgraph.graph.build import build_graph
from creditgraph.graph.events import partition_events, run_build_events
from creditgraph.graph.partition import partition_graph
from creditgraph.layout import RunLayout, ScoreFiles, StageFolder
from creditgraph.model.orders_config import ABLATIONS as ORDER_ABLATIONS
from creditgraph.policy.calibrate import run_calibration
from creditgraph.rules.learn import learn_rules
from creditgraph.serving.orders import score_orders
from creditgraph.serving.score import score_users
from creditgraph.train.orders import run_order_training
from creditgraph.train.trainer import run_training
from creditgraph.utils.io import fingerprint, path_signature, read_json, write_json
from creditgraph.utils.logs import get_logger
from creditgraph.utils.runtime import init_ray

log = get_logger(__name__)


@dataclass(frozen=True)
class StageContext:
    """What stages read and write: the dataset folder and the run folder."""

    data: Path | None
    run: RunLayout
    address: str | None = None


@dataclass
class Stage:
    """One step of the pipeline.

    ``sections`` are the config sections the stage receives (as keyword arguments, by name);
    ``inputs`` the stages whose outputs it reads; ``reads_data`` whether it reads the dataset
    folder; ``version`` is bumped when the stage's code changes what it writes.
    """

    name: str
    sections: tuple[str, ...]
    inputs: tuple[str, ...]
    output: Callable[[StageContext], StageFolder]
    run: Callable[..., dict]
    reads_data: bool = False
    needs_ray: bool = True
    version: int = 1
    identity: Any = None  # anything else that defines the output (e.g. where it is written)


@dataclass
class StageReport:
    reused: bool
    seconds: float
    fingerprint: str
    summary: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"reused": self.reused, "seconds": self.seconds, **self.summary}


def _sections(cfg: PipelineConfig, names: Sequence[str]) -> dict[str, BaseModel]:
    return {name: getattr(cfg, name) for name in names}


def stage_fingerprint(
    stage: Stage, cfg: PipelineConfig, upstream: dict[str, str], data: Path | None
) -> str:
    """The stage's identity: name, version, its config sections, its inputs' fingerprints."""
    parts: list[Any] = [
        stage.name,
        stage.version,
        {k: v.model_dump(mode="json") for k, v in _sections(cfg, stage.sections).items()},
        [upstream[name] for name in stage.inputs],
        stage.identity,
    ]
    if stage.reads_data:
        if data is None:
            raise ValueError(f"stage {stage.name} reads a dataset: give its folder")
        parts.append(path_signature(data))
    return fingerprint(*parts)


def recorded_fingerprint(folder: StageFolder) -> str | None:
    """The fingerprint a finished stage recorded in its output folder (None: not finished)."""
    if not (folder.record.exists() and folder.manifest.exists()):
        return None
    return read_json(folder.record).get("fingerprint")


class Pipeline:
    """An ordered list of stages, run or reused by fingerprint."""

    def __init__(self, stages: Sequence[Stage]):
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stage names in {names}")
        self.stages = list(stages)

    def run(
        self,
        ctx: StageContext,
        cfg: PipelineConfig,
        *,
        only: Sequence[str] | None = None,
        stop_after: str | None = None,
        force: bool | Sequence[str] = False,
    ) -> dict[str, StageReport]:
        """Run or reuse each stage in order (``only``: just these, their inputs taken as they are).

        ``force=True`` reruns every selected stage, a list of names reruns those.
        """
        known = {s.name for s in self.stages}
        for name in [*(only or []), *([stop_after] if stop_after else [])]:
            if name not in known:
                raise ValueError(f"unknown stage {name!r}; stages: {[s.name for s in self.stages]}")
        forced = set(known) if force is True else set(force or [])
        fps: dict[str, str] = {}
        report: dict[str, StageReport] = {}
        for stage in self.stages:
            selected = only is None or stage.name in only
            out = stage.output(ctx)
            if not selected:
                # an input taken as it is: chain whatever it recorded
                fps[stage.name] = recorded_fingerprint(out) or f"unrecorded:{stage.name}"
                continue
            fp = stage_fingerprint(stage, cfg, fps, ctx.data)
            missing = [i for i in stage.inputs if i in fps and not stage_output_ok(self, i, ctx)]
            if missing:
                commands = sorted({f"`creditgraph {COMMAND.get(m, m)}`" for m in missing})
                raise FileNotFoundError(
                    f"stage {stage.name} needs the output of {', '.join(missing)} in "
                    f"{ctx.run.root}: run {' and '.join(commands)} first (`creditgraph run` "
                    "runs every stage)"
                )
            fps[stage.name] = fp
            if stage.name not in forced and recorded_fingerprint(out) == fp:
                log.info("stage %s: reusing %s (inputs and config unchanged)", stage.name, out.dir)
                report[stage.name] = StageReport(True, 0.0, fp, _recorded_summary(out))
            else:
                if stage.needs_ray:
                    init_ray(ctx.address)
                log.info("stage %s: running", stage.name)
                t0 = time.perf_counter()
                summary = stage.run(ctx, **_sections(cfg, stage.sections)) or {}
                seconds = time.perf_counter() - t0
                write_json(
                    out.record,
                    {
                        "stage": stage.name,
                        "fingerprint": fp,
                        "seconds": seconds,
                        "summary": summary,
                    },
                )
                report[stage.name] = StageReport(False, seconds, fp, summary)
                log.info("stage %s: done in %.1fs", stage.name, seconds)
            if stop_after == stage.name:
                break
        return report


#: The CLI command that runs a stage (for messages).
COMMAND = {
    "build": "build",
    "partition": "build",
    "pretrain": "pretrain",
    "train": "train",
    "calibrate": "run --stop-after calibrate",
}


def stage_output_ok(pipeline: Pipeline, name: str, ctx: StageContext) -> bool:
    stage = next(s for s in pipeline.stages if s.name == name)
    return stage.output(ctx).exists()


def _recorded_summary(folder: StageFolder) -> dict:
    return read_json(folder.record).get("summary", {}) if folder.record.exists() else {}


# --- the stages of the credit-limit family -------------------------------------------------------


def _build(ctx: StageContext, graph) -> dict:
    return build_graph(ctx.data, ctx.run, graph)


def _partition(ctx: StageContext, partition) -> dict:
    return partition_graph(ctx.run, partition)


def _pretrain(ctx: StageContext, pretrain) -> dict:
    return run_pretrain(ctx.run, pretrain)


def _train(ctx: StageContext, model, train) -> dict:
    return run_training(ctx.run, model, train, ctx.run.model)


def _calibrate(ctx: StageContext, policy) -> dict:
    return run_calibration(ctx.run, policy)


def _ablation(name: str) -> Stage:
    overrides = ABLATIONS[name][0]

    def run(ctx: StageContext, model, train) -> dict:
        variant = override_many(model, dict(overrides.items()))
        return run_training(ctx.run, variant, train, ctx.run.ablation(name))

    return Stage(
        f"ablation:{name}",
        ("model", "train"),
        ("partition", "pretrain"),
        lambda ctx: ctx.run.ablation(name),
        run,
    )


def _evaluate(names: Sequence[str]) -> Callable[..., dict]:
    def run(ctx: StageContext, evaluate, policy) -> dict:
        models = {"creditgraph": ctx.run.model} | {n: ctx.run.ablation(n) for n in names}
        return run_evaluation(ctx.run, evaluate, models, ctx.data, policy=policy)

    return run


def _rules(ctx: StageContext, rules) -> dict:
    return learn_rules(ctx.data, ctx.run.rules.dir, rules, show=False)


def score_stage(
    out: ScoreFiles,
    registry: str | Path | None = None,
    *,
    promote: bool = False,
    rules: bool = False,
) -> Stage:
    """Batch scoring of the dataset as a stage (decisions in ``out``, a snapshot in ``registry``;
    nothing written into the run)."""

    def run(ctx: StageContext, policy) -> dict:
        return score_users(
            ctx.run,
            ctx.data,
            out.dir,
            policy,
            registry=registry,
            promote=promote,
            rules_dir=ctx.run.rules.dir if rules else None,
        )

    return Stage(
        "score",
        ("policy",),
        ("train", *(["rules"] if rules else [])),
        lambda ctx: out,
        run,
        reads_data=True,
        identity={"out": str(out.dir), "registry": str(registry), "promote": promote},
    )


def credit_stages(cfg: PipelineConfig, *, with_rules: bool = False) -> list[Stage]:
    """build -> partition -> pretrain -> train -> calibrate -> ablations -> evaluate (-> rules)."""
    ablations = list(cfg.evaluate.ablations)
    unknown = [a for a in ablations if a not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; choose from {sorted(ABLATIONS)}")
    stages = [
        Stage("build", ("graph",), (), lambda c: c.run.graph, _build, reads_data=True),
        Stage("partition", ("partition",), ("build",), lambda c: c.run.shards, _partition),
        Stage("pretrain", ("pretrain",), ("build",), lambda c: c.run.pretrain, _pretrain),
        Stage(
            "train", ("model", "train"), ("partition", "pretrain"), lambda c: c.run.model, _train
        ),
        Stage("calibrate", ("policy",), ("train",), lambda c: c.run.calibration, _calibrate),
        *[_ablation(a) for a in ablations],
        Stage(
            "evaluate",
            ("evaluate", "policy"),
            ("calibrate", *[f"ablation:{a}" for a in ablations]),
            lambda c: c.run.eval,
            _evaluate(ablations),
            reads_data=True,
        ),
    ]
    if with_rules:
        stages.append(
            Stage("rules", ("rules",), (), lambda c: c.run.rules, _rules, reads_data=True)
        )
    return stages


# --- the stages of the order-risk family (seed 001) ---------------------------------------------


def order_stages(cfg: PipelineConfig) -> list[Stage]:
    """events -> leaves -> partition -> train -> ablations -> evaluate, for ``family: orders``.

    Every stage's identity is its own part of the ``orders`` section (the ``train`` section for
    training), so changing, say, the evaluation reruns only the evaluation.
    """
    o = cfg.orders
    ablations = list(o.evaluate.ablations)
    unknown = [a for a in ablations if a not in ORDER_ABLATIONS]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; choose from {sorted(ORDER_ABLATIONS)}")
    hops = o.model.layers + 1

    def dump(*models: BaseModel) -> list:
        return [m.model_dump(mode="json") for m in models]

    def ablation(name: str) -> Stage:
        variant = o.model.model_copy(update=ORDER_ABLATIONS[name])
        return Stage(
            f"ablation:{name}",
            ("train",),
            ("partition", "leaves"),
            lambda c: c.run.ablation(name),
            lambda ctx, train: run_order_training(ctx.run, variant, train, ctx.run.ablation(name)),
            identity=dump(variant),
        )

    def evaluate(ctx: StageContext) -> dict:
        models = {"gnn": ctx.run.model} | {f"gnn:{a}": ctx.run.ablation(a) for a in ablations}
        return run_order_evaluation(ctx.run, o.evaluate, models)

    return [
        Stage(
            "events",
            (),
            (),
            lambda c: c.run.events,
            lambda ctx: run_build_events(ctx.data, ctx.run, o.graph, o.split),
            reads_data=True,
            identity=dump(o.graph, o.split),
        ),
        Stage(
            "leaves",
            (),
            ("events",),
            lambda c: c.run.leaves,
            lambda ctx: run_leaves(ctx.run, o.leaves),
            needs_ray=False,
            identity=dump(o.leaves),
        ),
        Stage(
            "partition",
            (),
            ("events",),
            lambda c: c.run.shards,
            lambda ctx: partition_events(ctx.run, o.partition, hops=hops),
            identity=[*dump(o.partition), hops],
        ),
        Stage(
            "train",
            ("train",),
            ("partition", "leaves"),
            lambda c: c.run.model,
            lambda ctx, train: run_order_training(ctx.run, o.model, train, ctx.run.model),
            identity=dump(o.model),
        ),
        *[ablation(a) for a in ablations],
        Stage(
            "evaluate",
            (),
            ("train", *[f"ablation:{a}" for a in ablations]),
            lambda c: c.run.eval,
            evaluate,
            needs_ray=False,
            identity=dump(o.evaluate),
        ),
    ]


def order_score_stage(
    out: ScoreFiles, registry: str | Path | None = None, *, promote: bool = False
) -> Stage:
    """Batch scoring of the run's orders (Ray Data) into ``out`` and a snapshot of the entity
    embeddings in ``registry`` (nothing written into the run)."""

    def run(ctx: StageContext) -> dict:
        return score_orders(ctx.run, out.dir, registry=registry, promote=promote)

    return Stage(
        "score",
        (),
        ("train",),
        lambda ctx: out,
        run,
        identity={"out": str(out.dir), "registry": str(registry), "promote": promote},
    )


def dataset_family(data_dir: str | Path) -> str:
    """``family`` of a dataset folder's dataset.yaml (credit or orders)."""
    return DatasetSpec.load(data_dir).family


def run_pipeline(
    data_dir: str | Path,
    run_dir: str | Path,
    cfg: PipelineConfig | None = None,
    *,
    stop_after: str | None = None,
    force: bool | Sequence[str] = False,
    with_rules: bool = False,
    address: str | None = None,
) -> dict[str, dict]:
    """Run (or reuse) every training stage; return ``{stage: {"reused", "seconds", ...}}``."""
    cfg = cfg or PipelineConfig()
    ctx = StageContext(Path(data_dir).resolve(), RunLayout(Path(run_dir)), address)
    if dataset_family(data_dir) == "orders":
        if with_rules:
            log.warning("rule learning is for the credit family; the orders pipeline skips it")
        pipeline = Pipeline(order_stages(cfg))
    else:
        pipeline = Pipeline(credit_stages(cfg, with_rules=with_rules))
    report = pipeline.run(ctx, cfg, stop_after=stop_after, force=force)
    return {k: v.as_dict() for k, v in report.items()}
