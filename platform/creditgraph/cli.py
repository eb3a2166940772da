"""The ``creditgraph`` command line (typer). Each command is a thin shell over a library call."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from creditgraph.data.errors import DataValidationError

app = typer.Typer(
    name="creditgraph",
    help="Causal credit-limit decisions on heterogeneous user graphs, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)

Address = Annotated[
    str | None,
    typer.Option("--address", envvar="RAY_ADDRESS", help="Ray cluster address; default: local"),
]


def _fail(exc: Exception, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(code)


def _ray(address: str | None) -> None:
    from creditgraph.utils.runtime import init_ray

    init_ray(address)


@app.command()
def validate(
    data: Annotated[
        Path, typer.Argument(help="dataset directory (dataset.yaml, users.parquet...)")
    ],
    address: Address = None,
) -> None:
    """Check a dataset against the contract; print a summary or one clear error."""
    from creditgraph.data.load import load_dataset

    _ray(address)
    try:
        ds = load_dataset(data)
    except DataValidationError as exc:
        _fail(exc)
    console.print_json(data={"ok": True, "dataset": ds.spec.name, **ds.stats})


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", help="dataset directory to write")],
    users: Annotated[int, typer.Option("--users", min=100, help="number of users")] = 20_000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML overriding SimulationConfig fields")
    ] = None,
) -> None:
    """Write a simulated dataset whose true risk curves are known."""
    from creditgraph.data.simulate import SimulationConfig, simulate_to_dir

    cfg = SimulationConfig.from_yaml(config) if config else SimulationConfig()
    cfg = cfg.model_copy(update={"n_users": users, "seed": seed})
    summary = simulate_to_dir(cfg, out)
    console.print_json(data=summary)


@app.command()
def build(
    data: Annotated[Path, typer.Option("--data", help="dataset directory")],
    out: Annotated[Path, typer.Option("--out", help="run directory")],
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml")] = None,
    address: Address = None,
) -> None:
    """Validate, build the leak-free heterograph and write ClusterGCN shards into RUN."""
    from creditgraph.config import PipelineConfig
    from creditgraph.graph.build import build_graph
    from creditgraph.graph.partition import partition_graph

    cfg = PipelineConfig.load(config)
    _ray(address)
    try:
        summary = build_graph(data, out, cfg.graph)
    except DataValidationError as exc:
        _fail(exc)
    summary["partition"] = partition_graph(out, cfg.partition)
    console.print_json(data=summary)


@app.command()
def pretrain(
    run: Annotated[Path, typer.Option("--run", help="run directory with a built graph")],
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml")] = None,
    reuse: Annotated[
        bool, typer.Option(help="keep an existing output built from the same input and config")
    ] = False,
    top: Annotated[int, typer.Option(help="features to list by |alpha|")] = 10,
    address: Address = None,
) -> None:
    """Teacher soft labels, per-feature DML causal weights (Ray tasks) and the feature DAG."""
    from creditgraph.causal.pretrain import PretrainArtifacts, run_pretrain
    from creditgraph.config import PipelineConfig

    cfg = PipelineConfig.load(config)
    try:  # Ray starts only if the DML actually runs
        summary = run_pretrain(run, cfg.pretrain, reuse=reuse, address=address)
    except (DataValidationError, FileNotFoundError) as exc:
        _fail(exc)
    console.print(
        f"teacher OOF AUC {summary['teacher_oof_auc']:.4f} on {summary['n_fit_users']:,} "
        f"labeled train users; feature DAG: {summary['dag_edges']} edges"
    )
    table = PretrainArtifacts.load(run).alpha_table
    table = table[table["status"] == "ok"]
    for row in table.loc[
        table["alpha"].abs().sort_values(ascending=False).index[:top]
    ].itertuples():
        console.print(
            f"  {row.feature:<28} alpha {row.alpha:+.5f}  [{row.ci_low:+.5f}, {row.ci_high:+.5f}]",
            highlight=False,
        )
    if summary["dml_failed"]:
        console.print(f"[yellow]DML failed for:[/] {', '.join(summary['dml_failed'])}")
    console.print_json(data=summary)


@app.command()
def train(
    run: Annotated[
        Path, typer.Option("--run", help="run directory (built, partitioned, pretrained)")
    ],
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Ray Train workers (overrides config)")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="max epochs (overrides config)")] = None,
    address: Address = None,
) -> None:
    """Train the three-head model with Ray Train (DDP) over the ClusterGCN shards."""
    from creditgraph.config import PipelineConfig
    from creditgraph.train.trainer import run_training

    cfg = PipelineConfig.load(config)
    updates = {k: v for k, v in {"num_workers": workers, "epochs": epochs}.items() if v is not None}
    _ray(address)
    try:
        summary = run_training(run, cfg.model, cfg.train.model_copy(update=updates))
    except (FileNotFoundError, ValueError) as exc:
        _fail(exc)
    console.print_json(data=summary)


@app.command()
def evaluate(
    run: Annotated[Path, typer.Option("--run", help="run directory with a trained model")],
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml")] = None,
    ablations: Annotated[
        str | None, typer.Option(help="comma-separated ablations to train and score too")
    ] = None,
    address: Address = None,
) -> None:
    """Score the model, ablations and baselines on held-out users against the true curves."""
    from creditgraph.config import PipelineConfig
    from creditgraph.evaluate.run import run_evaluation

    cfg = PipelineConfig.load(config)
    if ablations:
        names = [a.strip() for a in ablations.split(",") if a.strip()]
        cfg = cfg.model_copy(
            update={"evaluate": cfg.evaluate.model_copy(update={"ablations": names})}
        )
    _ray(address)
    try:
        report = run_evaluation(run, cfg)
    except (FileNotFoundError, ValueError, DataValidationError) as exc:
        _fail(exc)
    from creditgraph.utils.tables import markdown_table

    console.print(markdown_table(report["rows"]), highlight=False)
    console.print(f"figures and metrics: {report['eval_dir']}")


@app.command()
def embed(
    run: Annotated[Path, typer.Option("--run", help="run directory with a trained model")],
    store: Annotated[str | None, typer.Option(help="store URI (file path or redis://...)")] = None,
    address: Address = None,
) -> None:
    """Batch stage of two-stage inference: write every user's graph context to the store."""
    from creditgraph.serving.embed import build_embeddings

    _ray(address)
    try:
        console.print_json(data=build_embeddings(run, store))
    except FileNotFoundError as exc:
        _fail(exc)


@app.command()
def score(
    run: Annotated[Path, typer.Option("--run", help="run directory with a trained model")],
    data: Annotated[Path, typer.Option("--data", help="dataset directory of the users to score")],
    out: Annotated[Path, typer.Option("--out", help="output directory (written atomically)")],
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml")] = None,
    grid: Annotated[
        str | None, typer.Option(help="limits grid as start:stop:step, e.g. 0:50000:1000")
    ] = None,
    r_max: Annotated[float | None, typer.Option("--r-max", min=0.0, max=1.0)] = None,
    store: Annotated[str | None, typer.Option(help="embedding store URI")] = None,
    rules: Annotated[Path | None, typer.Option(help="rule set directory (guardrails)")] = None,
    skip_unknown: Annotated[bool, typer.Option(help="skip users unknown to the graph")] = False,
    max_actors: Annotated[int, typer.Option(min=1, help="autoscaling actor pool max size")] = 2,
    address: Address = None,
) -> None:
    """Rescore users in batch (Ray Data): risk curves and decided limits."""
    import numpy as np

    from creditgraph.config import PipelineConfig
    from creditgraph.serving.score import score_users

    cfg = PipelineConfig.load(config)
    grid_values = None
    if grid:
        try:
            start, stop, step = (float(x) for x in grid.split(":"))
            from creditgraph.policy.config import GridConfig

            grid_values = GridConfig(start=start, stop=stop, step=step).values()
        except Exception as exc:  # bad syntax or a grid the policy refuses
            _fail(ValueError(f"--grid {grid!r}: {exc}"))
    _ray(address)
    try:
        summary = score_users(
            run,
            data,
            out,
            cfg,
            grid=None if grid_values is None else np.asarray(grid_values),
            r_max=r_max,
            store_uri=store,
            rules_dir=str(rules) if rules else None,
            skip_unknown=skip_unknown,
            max_actors=max_actors,
        )
    except (DataValidationError, FileNotFoundError, ValueError) as exc:
        _fail(exc)
    console.print_json(data=summary)


@app.command()
def serve(
    run: Annotated[Path, typer.Option("--run", help="run directory with a trained model")],
    store: Annotated[str | None, typer.Option(help="embedding store URI")] = None,
    rules: Annotated[Path | None, typer.Option(help="rule set directory (guardrails)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml (policy)")] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: Address = None,
) -> None:
    """Start the online decision API (Ray Serve) and block; Ctrl-C stops it."""
    import time

    from ray import serve as ray_serve

    from creditgraph.serving.app import build_app

    _ray(address)
    ray_serve.start(http_options={"host": host, "port": port})
    args = {
        "run_dir": str(run.resolve()),
        "store_uri": store,
        "rules_dir": str(rules) if rules else None,
        "policy_config": str(config) if config else None,
    }
    ray_serve.run(build_app(args), name="creditgraph", route_prefix="/")
    console.print(
        f"decision API on http://{host}:{port}/v1/decisions (docs: /docs); Ctrl-C to stop"
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray_serve.shutdown()


@app.command("run")
def run_all(
    data: Annotated[Path, typer.Option("--data", help="dataset directory")],
    out: Annotated[Path, typer.Option("--out", help="run directory")],
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml")] = None,
    stop_after: Annotated[str | None, typer.Option(help="last stage to run")] = None,
    force: Annotated[bool, typer.Option(help="rerun stages even if reusable")] = False,
    address: Address = None,
) -> None:
    """Run every stage (build, partition, pretrain, train, evaluate), reusing unchanged ones."""
    from creditgraph.config import PipelineConfig
    from creditgraph.pipeline import run_pipeline

    cfg = PipelineConfig.load(config)
    _ray(address)
    try:
        report = run_pipeline(data, out, cfg, stop_after=stop_after, force=force)
    except DataValidationError as exc:
        _fail(exc)
    console.print_json(data=report)


@app.command()
def rules(
    data: Annotated[
        Path, typer.Option("--data", help="dataset directory, or a .csv/.parquet table")
    ],
    out: Annotated[Path, typer.Option("--out", help="directory for rules.json/.sql/.txt")],
    target: Annotated[
        str | None, typer.Option("--target", help="0/1 label column; default: the outcome")
    ] = None,
    min_confidence: Annotated[
        float | None, typer.Option("--min-confidence", help="confidence constraint c in (0, 1)")
    ] = None,
    max_rules: Annotated[int | None, typer.Option("--max-rules", help="at most this many")] = None,
    exclude: Annotated[
        str | None, typer.Option("--exclude", help="comma-separated columns never used")
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml (rules:)")] = None,
    address: Address = None,
) -> None:
    """Learn readable rules whose confidence meets --min-confidence, with maximal coverage."""
    from creditgraph.config import PipelineConfig
    from creditgraph.rules.learn import learn_rules

    try:
        cfg = PipelineConfig.load(config).rules
        update = {"target": target, "min_confidence": min_confidence, "seed": seed}
        cfg = cfg.model_validate(
            {**cfg.model_dump(), **{k: v for k, v in update.items() if v is not None}}
        )
        if max_rules is not None:
            cfg.estimator["max_rules"] = max_rules
        if exclude:
            cfg.exclude = [c.strip() for c in exclude.split(",") if c.strip()]
        if address:  # otherwise a local runtime starts when (and only if) it is needed
            _ray(address)
        learn_rules(data, out, cfg)
    except (DataValidationError, ValueError) as exc:
        _fail(exc)
    console.print(f"wrote {out}/rules.json, rules.sql, rules.txt, summary.json")


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except DataValidationError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
