"""``creditgraph run``: the stages in order, each reused when its inputs and config are unchanged.

Each stage's fingerprint hashes the upstream fingerprint (the dataset files for the first stage)
and the stage's own config sections. ``RUN/pipeline.json`` records the fingerprint of every stage
that finished; a stage whose output folder exists with a matching record is skipped, otherwise
it (and everything downstream, whose fingerprints then change) runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from creditgraph.config import PipelineConfig
from creditgraph.utils.io import fingerprint, path_signature, read_json, write_json
from creditgraph.utils.logs import get_logger

log = get_logger(__name__)


@dataclass
class Stage:
    name: str
    folder: str
    config_sections: tuple[str, ...]
    run: Callable[[Path, Path, PipelineConfig], dict]


RECORD = "pipeline.json"


def _records(run_dir: Path) -> dict[str, str]:
    path = run_dir / RECORD
    return read_json(path) if path.exists() else {}


def _stages() -> list[Stage]:
    from creditgraph.causal.pretrain import run_pretrain
    from creditgraph.evaluate.run import run_evaluation
    from creditgraph.graph.build import build_graph
    from creditgraph.graph.partition import partition_graph
    from creditgraph.train.trainer import run_training

    return [
        Stage("build", "graph", ("graph",), lambda d, r, c: build_graph(d, r, c.graph)),
        Stage(
            "partition", "shards", ("partition",), lambda d, r, c: partition_graph(r, c.partition)
        ),
        Stage("pretrain", "pretrain", ("pretrain",), lambda d, r, c: run_pretrain(r, c.pretrain)),
        Stage(
            "train", "model", ("model", "train"), lambda d, r, c: run_training(r, c.model, c.train)
        ),
        Stage("evaluate", "eval", ("evaluate",), lambda d, r, c: run_evaluation(r, c)),
    ]


def run_pipeline(
    data_dir: str | Path,
    run_dir: str | Path,
    cfg: PipelineConfig | None = None,
    stop_after: str | None = None,
    force: bool = False,
) -> dict:
    """Run (or reuse) every stage; return ``{stage: {"reused": bool, "seconds": s, ...}}``."""
    cfg = cfg or PipelineConfig()
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    upstream = fingerprint(path_signature(data_dir))
    report: dict[str, dict] = {}
    records = _records(run_dir)
    for stage in _stages():
        section = {s: getattr(cfg, s).model_dump() for s in stage.config_sections}
        fp = fingerprint(stage.name, upstream, section)
        t0 = time.perf_counter()
        done = (run_dir / stage.folder).is_dir()
        if not force and done and records.get(stage.name) == fp:
            log.info(
                "stage %s: reusing %s (inputs and config unchanged)",
                stage.name,
                run_dir / stage.folder,
            )
            report[stage.name] = {"reused": True, "seconds": 0.0}
        else:
            log.info("stage %s: running", stage.name)
            summary = stage.run(data_dir, run_dir, cfg)
            report[stage.name] = {
                "reused": False,
                "seconds": time.perf_counter() - t0,
                **(summary or {}),
            }
            records[stage.name] = fp
            write_json(run_dir / RECORD, records)
        upstream = fp
        if stop_after == stage.name:
            break
    return report
