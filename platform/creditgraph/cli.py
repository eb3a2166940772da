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


def main() -> None:  # pragma: no cover - console entry point
    try:
        app()
    except DataValidationError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
