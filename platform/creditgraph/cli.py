"""The ``creditgraph`` command line (typer). Each command is a thin shell over a library call."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from creditgraph.data.errors import DataValidationError


class _Typer(typer.Typer):
    """A typer app whose commands all report user errors the same way (see ``_user_errors``)."""

    def command(self, *args, **kwargs) -> Callable:
        register = super().command(*args, **kwargs)
        return lambda fn: register(_user_errors(fn))


_app = _Typer(
    name="creditgraph",
    help="Causal credit-limit decisions on heterogeneous user graphs, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


#: Exceptions a user can fix, by module and name: matching by name keeps this module from
#: importing the config (lightgbm, sklearn) or the runtime (Ray) just to declare them.
_USER_ERRORS = {
    ("creditgraph.config", "ConfigError"),
    ("creditgraph.utils.runtime", "RayNotRunning"),
    ("creditgraph.utils.runtime", "RayStartError"),
}


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, DataValidationError | FileNotFoundError):
        return True
    return any((k.__module__, k.__name__) in _USER_ERRORS for k in type(exc).__mro__)


def _user_errors(fn: Callable) -> Callable:
    """Errors a user can fix (bad data, bad config, missing stage output, Ray that cannot start)
    become one line on stderr and exit code 2; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not _is_user_error(exc):
                raise
            _forget_new_run()
            _fail(exc)
        finally:
            _NEW_RUN.clear()

    return wrapper


app = _app

Address = Annotated[
    str | None,
    typer.Option("--address", envvar="RAY_ADDRESS", help="Ray cluster address; default: local"),
]


def _fail(exc: Exception, code: int = 2) -> None:
    # one line however long (no wrapping at the console width); brackets in it are not markup
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _ray(address: str | None) -> None:
    from creditgraph.utils.runtime import init_ray

    init_ray(address)


#: a run folder this command created only to hold its log (see ``_forget_new_run``)
_NEW_RUN: list[Path] = []


def _log_to(run: Path) -> None:
    """Details (ours and Ray's own logs) go to RUN/logs/creditgraph.log; the console keeps the
    stages, progress and results."""
    from creditgraph.layout import RunLayout
    from creditgraph.utils.logs import set_log_file

    if not Path(run).exists():
        _NEW_RUN.append(Path(run))
    set_log_file(RunLayout(run).logs / "creditgraph.log")


def _forget_new_run() -> None:
    """A command refused for bad input leaves no run folder behind: when it created the folder
    and wrote nothing but its log there, the folder goes (the error is on the console)."""
    from creditgraph.utils.logs import close_log_file

    for run in _NEW_RUN:
        if run.is_dir() and {p.name for p in run.iterdir()} <= {"logs"}:
            close_log_file()
            shutil.rmtree(run, ignore_errors=True)


def _config(path: Path | None, updates: dict | None = None):
    """The pipeline configuration from ``--config``, with CLI options applied (re-validated)."""
    from creditgraph.config import PipelineConfig, override_many

    return override_many(PipelineConfig.load(path), updates or {})


def _stages(
    names: list[str],
    run: Path,
    cfg,
    data: Path | None = None,
    address: str | None = None,
    force: bool = False,
) -> dict:
    """Run (or reuse) some pipeline stages on a run folder; print what happened."""
    from creditgraph.layout import RunLayout
    from creditgraph.pipeline import Pipeline, StageContext, credit_stages

    _log_to(run)
    ctx = StageContext(None if data is None else data.resolve(), RunLayout(run), address)
    report = Pipeline(credit_stages(cfg, with_rules="rules" in names)).run(
        ctx, cfg, only=names, force=force
    )
    for name, r in report.items():
        state = "reused (inputs and config unchanged)" if r.reused else f"ran in {r.seconds:.1f}s"
        console.print(f"stage {name}: {state}", highlight=False)
    return {k: v.as_dict() for k, v in report.items()}


@app.command()
def validate(
    data: Annotated[
        Path, typer.Argument(help="dataset directory (dataset.yaml, users.parquet...)")
    ],
    address: Address = None,
) -> None:
    """Check a dataset against the contract; print a summary (with warnings that name what is
    suspicious) or one clear error (exit 2). Small local datasets are read without Ray; large or
    remote ones through Ray Data (the switch: CREDITGRAPH_RAY_READ_MIN_BYTES, default 256 MiB)."""
    from creditgraph.data.load import load_dataset, reads_with_ray
    from creditgraph.data.spec import DatasetSpec

    if address or reads_with_ray(data):  # Ray starts only for data large enough to need it
        _ray(address)
    if DatasetSpec.load(data).family == "orders":
        from creditgraph.data.orders import load_orders

        ds = load_orders(data)
    else:
        ds = load_dataset(data)
    for warning in ds.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    console.print_json(
        data={"ok": True, "dataset": ds.spec.name, **ds.stats, "warnings": ds.warnings}
    )


@app.command()
def simulate(
    out: Annotated[Path, typer.Option("--out", help="dataset directory to write")],
    users: Annotated[
        int | None,
        typer.Option(
            "--users", min=100, help="number of users (default 20,000; with --covariates: all rows)"
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="YAML overriding SimulationConfig (or, with --covariates, SemiSyntheticConfig) "
            "fields",
        ),
    ] = None,
    covariates: Annotated[
        Path | None,
        typer.Option(
            "--covariates",
            help="semi-synthetic: keep this CSV's real covariates and limits, simulate the rest",
        ),
    ] = None,
    no_links: Annotated[
        bool, typer.Option("--no-links", help="with --covariates: a tabular dataset, no graph")
    ] = False,
    treatment: Annotated[
        str | None,
        typer.Option("--treatment", help="with --covariates: the real limit column (UCI: X1)"),
    ] = None,
    drop: Annotated[
        str | None,
        typer.Option("--drop", help="with --covariates: comma-separated columns to leave out"),
    ] = None,
    limit_test_share: Annotated[
        float | None,
        typer.Option(
            "--limit-test-share", help="with --covariates: share of randomized limit tests (0.1)"
        ),
    ] = None,
    family: Annotated[
        str,
        typer.Option(
            "--family", help="credit (users, limits, defaults) or orders (order risk, fraud labels)"
        ),
    ] = "credit",
    orders: Annotated[
        int | None,
        typer.Option(
            "--orders",
            min=1000,
            help="with --family orders: number of orders (200,000); "
            "--users sets the number of buyers",
        ),
    ] = None,
) -> None:
    """Write a simulated dataset whose true risk curves (or fraud probabilities) are known."""
    if family not in ("credit", "orders"):
        _fail(ValueError(f"--family must be credit or orders, got {family!r}"))
    if orders is not None and family != "orders":
        _fail(ValueError("--orders needs --family orders"))
    if family == "orders":
        from pydantic import ValidationError

        from creditgraph.data.simulate_orders import OrderSimConfig, simulate_orders_to_dir

        if covariates is not None:
            _fail(ValueError("--covariates is for --family credit"))
        try:
            base = OrderSimConfig.from_yaml(config) if config else OrderSimConfig()
            update = {"seed": seed, "n_orders": orders, "n_buyers": users}
            fields = {**base.model_dump(), **{k: v for k, v in update.items() if v is not None}}
            summary = simulate_orders_to_dir(OrderSimConfig.model_validate(fields), out)
        except (ValidationError, ValueError) as exc:
            _fail(exc)
        console.print_json(data=summary)
        return
    if covariates is None:
        extra = {
            "--no-links": no_links,
            "--treatment": treatment,
            "--drop": drop,
            "--limit-test-share": limit_test_share,
        }
        given = [k for k, v in extra.items() if v is not None and v is not False]
        if given:
            _fail(ValueError(f"{', '.join(given)} need --covariates FILE.csv"))
        from creditgraph.data.simulate import SimulationConfig, simulate_to_dir

        cfg = SimulationConfig.from_yaml(config) if config else SimulationConfig()
        n_users = 20_000 if users is None else users
        cfg = cfg.model_copy(update={"n_users": n_users, "seed": seed})
        summary = simulate_to_dir(cfg, out)
        console.print_json(data=summary)
        return

    from pydantic import ValidationError

    from creditgraph.data.semisynthetic import SemiSyntheticConfig, semisynthetic_to_dir

    update = {
        "n_users": users,
        "seed": seed,
        "treatment": treatment,
        "drop": None if drop is None else [c.strip() for c in drop.split(",") if c.strip()],
        "limit_test_share": limit_test_share,
    }
    try:
        base = SemiSyntheticConfig.from_yaml(config) if config else SemiSyntheticConfig()
        fields = {**base.model_dump(), **{k: v for k, v in update.items() if v is not None}}
        if no_links:
            fields["links"] = False
        cfg = SemiSyntheticConfig.model_validate(fields)
        summary = semisynthetic_to_dir(covariates, cfg, out)
    except (DataValidationError, ValidationError, ValueError) as exc:
        _fail(exc)
    console.print_json(data=summary)


convert_app = typer.Typer(
    help="Turn a CSV of real decisions into a dataset directory (no truth).",
    no_args_is_help=True,
)
app.add_typer(convert_app, name="convert")


@convert_app.command("uci")
def convert_uci_cmd(
    csv: Annotated[Path, typer.Argument(help="the UCI credit-default CSV (ID, X1..X23, Y)")],
    out: Annotated[Path, typer.Option("--out", help="dataset directory to write")],
    as_of: Annotated[
        str, typer.Option("--as-of", help="decision date of every row (the file has none)")
    ] = "2005-10-01",
) -> None:
    """The UCI credit-default file: id ID, limit X1, outcome Y, 22 readable features."""
    from creditgraph.data.convert import convert_uci

    try:
        summary = convert_uci(csv, out, as_of=as_of)
    except (DataValidationError, ValueError) as exc:
        _fail(exc)
    console.print_json(data=summary)


@convert_app.command("csv")
def convert_csv_cmd(
    csv: Annotated[Path, typer.Argument(help="a CSV with one row per user")],
    out: Annotated[Path, typer.Option("--out", help="dataset directory to write")],
    id: Annotated[str, typer.Option("--id", help="user id column")],
    treatment: Annotated[str, typer.Option("--treatment", help="historical limit column")],
    outcome: Annotated[str, typer.Option("--outcome", help="0/1 default column (blank = unknown)")],
    time: Annotated[
        str | None, typer.Option("--time", help="decision-time column (or give --as-of)")
    ] = None,
    as_of: Annotated[
        str | None, typer.Option("--as-of", help="one decision date for every row")
    ] = None,
    features: Annotated[
        str | None, typer.Option("--features", help="comma-separated; default: all numeric")
    ] = None,
    exclude: Annotated[
        str | None, typer.Option("--exclude", help="comma-separated numeric non-features")
    ] = None,
) -> None:
    """Any CSV: name the id, limit and outcome columns and the decision time."""
    from creditgraph.data.convert import convert_csv

    def names(v: str | None) -> list[str]:
        return [c.strip() for c in (v or "").split(",") if c.strip()]

    try:
        summary = convert_csv(
            csv,
            out,
            id=id,
            treatment=treatment,
            outcome=outcome,
            time=time,
            as_of=as_of,
            features=names(features) or None,
            exclude=names(exclude),
        )
    except (DataValidationError, ValueError) as exc:
        _fail(exc)
    console.print_json(data=summary)


@app.command()
def build(
    data: Annotated[Path, typer.Option("--data", help="dataset directory")],
    out: Annotated[Path, typer.Option("--out", help="run directory")],
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml")] = None,
    force: Annotated[
        bool, typer.Option(help="rebuild even if inputs and config are unchanged")
    ] = False,
    address: Address = None,
) -> None:
    """Validate, build the leak-free heterograph and write ClusterGCN shards into RUN."""
    report = _stages(["build", "partition"], out, _config(config), data, address, force)
    console.print_json(data=report)


@app.command()
def pretrain(
    run: Annotated[Path, typer.Option("--run", help="run directory with a built graph")],
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml")] = None,
    force: Annotated[
        bool, typer.Option(help="rerun even if inputs and config are unchanged")
    ] = False,
    top: Annotated[int, typer.Option(help="features to list by |alpha|")] = 10,
    address: Address = None,
) -> None:
    """Teacher soft labels, per-feature DML causal weights (Ray tasks) and the feature DAG."""
    from creditgraph.causal.artifacts import PretrainArtifacts

    report = _stages(["pretrain"], run, _config(config), address=address, force=force)
    summary = report["pretrain"]
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


@app.command()
def train(
    run: Annotated[
        Path, typer.Option("--run", help="run directory (built, partitioned, pretrained)")
    ],
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Ray Train workers (overrides train.num_workers)")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="max epochs (overrides train.epochs)")] = None,
    force: Annotated[
        bool, typer.Option(help="retrain even if inputs and config are unchanged")
    ] = False,
    address: Address = None,
) -> None:
    """Train the three-head model with Ray Train (DDP) over the ClusterGCN shards."""
    cfg = _config(config, {"train.num_workers": workers, "train.epochs": epochs})
    console.print_json(data=_stages(["train"], run, cfg, address=address, force=force))


@app.command()
def calibrate(
    run: Annotated[Path, typer.Option("--run", help="run directory with a trained model")],
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml (policy:)")] = None,
    force: Annotated[
        bool, typer.Option(help="rerun even if inputs and config are unchanged")
    ] = False,
    address: Address = None,
) -> None:
    """Calibrate the curves on held-out users and certify the guarantee's tightening per ceiling."""
    from creditgraph.layout import RunLayout
    from creditgraph.utils.io import read_json

    _stages(["calibrate"], run, _config(config), address=address, force=force)
    summary = read_json(RunLayout(run).calibration.manifest)["summary"]
    console.print(
        f"calibration ({summary['method']}): ECE {summary['ece_before']:.4f} -> "
        f"{summary['ece_after']:.4f} on {summary['n_guarantee_half']:,} held-out users"
    )
    for r, g in summary["guarantee"].items():
        state = f"lambda {g['lambda']}" if g["certified"] else "nothing certified (declines all)"
        console.print(f"  r_max {r}: {state}", highlight=False)


@app.command("evaluate-policy")
def evaluate_policy(
    run: Annotated[Path, typer.Option("--run", help="run directory with a trained model")],
    data: Annotated[Path, typer.Option("--data", help="logged data: historical limits, outcomes")],
    policy: Annotated[
        list[Path],
        typer.Option(
            "--policy",
            help="candidate policy YAML (a pipeline.yaml `policy:` section); repeat to compare",
        ),
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="report folder (report.json/.md)")
    ] = None,
    address: Address = None,
) -> None:
    """Estimate a candidate limit policy's default rate, credit granted and value from logged
    data before it is deployed (direct method, kernel IPW and doubly robust, bootstrap 95 %)."""
    from creditgraph.config import PipelineConfig
    from creditgraph.serving.policy_eval import evaluate_policies
    from creditgraph.utils.tables import markdown_table

    candidates = {p.stem: PipelineConfig.load(p).policy for p in policy}
    _ray(address)
    result = evaluate_policies(run, data, candidates, out)
    rows = []
    for name, entry in result["policies"].items():
        for r in entry["estimates"]:
            rows.append(
                {
                    "policy": name,
                    "method": r["method"],
                    "default_rate": r["default_rate"],
                    "ci_low": r["ci_low"],
                    "ci_high": r["ci_high"],
                    "granted_share": entry["summary"]["granted_share"],
                    "true_rate": r.get("true_default_rate"),
                }
            )
    console.print(markdown_table(rows), highlight=False)
    if out is not None:
        console.print(f"report: {out}/report.md")


@app.command()
def evaluate(
    run: Annotated[Path, typer.Option("--run", help="run directory with a trained model")],
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml")] = None,
    ablations: Annotated[
        str | None,
        typer.Option(help="comma-separated ablations to train and score too, e.g. towers_no_graph"),
    ] = None,
    force: Annotated[
        bool, typer.Option(help="rerun even if inputs and config are unchanged")
    ] = False,
    address: Address = None,
) -> None:
    """Score the model, ablations and baselines on held-out users (against the truth if known)."""
    from creditgraph.layout import RunLayout
    from creditgraph.utils.io import read_json
    from creditgraph.utils.tables import markdown_table

    names = None if ablations is None else [a.strip() for a in ablations.split(",") if a.strip()]
    cfg = _config(config, {"evaluate.ablations": names})
    layout = RunLayout(run)
    data = Path(read_json(layout.graph.manifest)["data_dir"]) if layout.graph.exists() else None
    stages = [f"ablation:{a}" for a in cfg.evaluate.ablations] + ["evaluate"]
    _stages(stages, run, cfg, data, address, force)
    report = read_json(layout.eval.metrics)
    keys = ["name", "kind", "mise", "violation_rate", "granted_ratio", "auc", "ap", "ece"]
    if not report["has_truth"]:
        keys = ["name", "kind", "auc", "ap", "brier", "ece"]
    console.print(
        markdown_table([{k: r.get(k) for k in keys} for r in report["rows"]]), highlight=False
    )
    console.print(f"figures and metrics: {layout.eval.dir}")


Snapshots = Annotated[
    Path | None,
    typer.Option("--snapshots", help="snapshot registry (default: RUN.snapshots beside the run)"),
]


@app.command()
def embed(
    run: Annotated[Path, typer.Option("--run", help="run directory with a trained model")],
    data: Annotated[Path, typer.Option("--data", help="dataset whose users and links to embed")],
    out: Annotated[Path, typer.Option("--out", help="output directory (summary.json)")],
    snapshots: Snapshots = None,
    store: Annotated[str | None, typer.Option(help="redis:// URI for the records")] = None,
    address: Address = None,
) -> None:
    """Publish a snapshot of user and entity records WITHOUT decisions (so without cluster caps;
    the snapshot says so and the service reports it). `score` makes complete snapshots."""
    from creditgraph.serving.score import score_users

    _ray(address)
    summary = score_users(run, data, out, registry=snapshots, store_uri=store, decide=False)
    console.print(
        f"snapshot {summary['snapshot']} (no decisions, no cluster caps) as of "
        f"{summary['decision_time']}; promote it with: creditgraph snapshot promote "
        f"{summary['snapshot']} --run {run}"
    )


@app.command()
def score(
    run: Annotated[Path, typer.Option("--run", help="run directory with a trained model")],
    data: Annotated[Path, typer.Option("--data", help="dataset directory of the users to score")],
    out: Annotated[Path, typer.Option("--out", help="output directory (written atomically)")],
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml (policy:)")] = None,
    r_max: Annotated[float | None, typer.Option("--r-max", min=0.0, max=1.0)] = None,
    as_of: Annotated[
        str | None,
        typer.Option("--as-of", help="decide every user as of this time (a rescoring)"),
    ] = None,
    rules: Annotated[Path | None, typer.Option(help="rule set directory (guardrails)")] = None,
    snapshots: Snapshots = None,
    store: Annotated[
        str | None, typer.Option(help="redis:// URI for the snapshot's records")
    ] = None,
    promote: Annotated[bool, typer.Option(help="serve the new snapshot right away")] = False,
    max_actors: Annotated[int, typer.Option(min=1, help="autoscaling actor pool max size")] = 2,
    address: Address = None,
) -> None:
    """Score every user and link of DATA (Ray Data): curves, decisions and a new snapshot.

    The grid is the run's own (0 to the 99th percentile of its training limits) unless the
    config's `policy.grid` says otherwise. The trained run is never written to."""
    from creditgraph.serving.score import score_users

    cfg = _config(config, {"policy.r_max": r_max})
    _ray(address)
    summary = score_users(
        run,
        data,
        out,
        cfg.policy,
        as_of=as_of,
        rules_dir=rules,
        registry=snapshots,
        store_uri=store,
        promote=promote,
        max_actors=max_actors,
    )
    console.print_json(data={k: v for k, v in summary.items() if k not in ("edges", "nodes")})


snapshot_app = typer.Typer(help="List, promote and roll back the snapshots a service reads.")
_app.add_typer(snapshot_app, name="snapshot")


def _registry(run: Path, snapshots: Path | None):
    from creditgraph.layout import RunLayout
    from creditgraph.serving.snapshot import Registry

    return Registry.for_run(RunLayout(run), snapshots)


@snapshot_app.command("list")
@_user_errors
def snapshot_list(
    run: Annotated[Path, typer.Option("--run", help="run directory")],
    snapshots: Snapshots = None,
) -> None:
    """The registry's snapshots, oldest first; the promoted one is marked."""
    from creditgraph.utils.tables import markdown_table

    rows = _registry(run, snapshots).list()
    console.print(markdown_table(rows) if rows else "no snapshots", highlight=False)


@snapshot_app.command("promote")
@_user_errors
def snapshot_promote(
    snapshot_id: Annotated[str, typer.Argument(help="snapshot id (see `snapshot list`)")],
    run: Annotated[Path, typer.Option("--run", help="run directory")],
    snapshots: Snapshots = None,
) -> None:
    """Serve SNAPSHOT_ID from now on (running services switch without a restart)."""
    from creditgraph.serving.snapshot import SnapshotError

    try:
        pointer = _registry(run, snapshots).promote(snapshot_id)
    except SnapshotError as exc:
        _fail(exc)
    console.print(f"promoted {pointer['current']}")


@snapshot_app.command("rollback")
@_user_errors
def snapshot_rollback(
    run: Annotated[Path, typer.Option("--run", help="run directory")],
    snapshots: Snapshots = None,
) -> None:
    """Serve the previously promoted snapshot again."""
    from creditgraph.serving.snapshot import SnapshotError

    try:
        pointer = _registry(run, snapshots).rollback()
    except SnapshotError as exc:
        _fail(exc)
    console.print(f"rolled back to {pointer['current']}")


@app.command()
def serve(
    run: Annotated[Path, typer.Option("--run", help="run directory with a trained model")],
    snapshots: Snapshots = None,
    rules: Annotated[Path | None, typer.Option(help="rule set directory (guardrails)")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="pipeline.yaml (policy)")] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    insecure: Annotated[
        bool,
        typer.Option(
            help="serve WITHOUT authentication (local development only; logged loudly). "
            "Otherwise CREDITGRAPH_API_TOKEN (role decide) and/or CREDITGRAPH_ADMIN_TOKEN "
            "(role admin) must be set"
        ),
    ] = False,
    address: Address = None,
) -> None:
    """Start the online decision API (Ray Serve) on the promoted snapshot; SIGTERM or Ctrl-C
    drains in-flight requests and exits 0.

    Auth: every endpoint but /healthz needs `Authorization: Bearer <token>`; the `decide` role
    may ask for a lower ceiling than the policy's, the `admin` role may override the policy and
    promote or roll back snapshots."""
    import os
    import signal
    import threading

    from ray import serve as ray_serve

    from creditgraph.serving.app import ADMIN_TOKEN_ENV, TOKEN_ENV, build_app

    if not insecure and not (os.environ.get(TOKEN_ENV) or os.environ.get(ADMIN_TOKEN_ENV)):
        _fail(
            ValueError(
                f"no API token: set {TOKEN_ENV} (and {ADMIN_TOKEN_ENV} for admins), or run "
                "open for local development with --insecure"
            )
        )
    _registry(run, snapshots).open().close()  # a promoted snapshot exists and opens
    _ray(address)
    # right after Ray's start (which installs its own fatal-signal handlers) and before the
    # deployments: a SIGTERM while they start up also drains and exits 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if insecure:
        console.print("[bold yellow]WARNING: serving without authentication (--insecure)[/]")
    ray_serve.start(http_options={"host": host, "port": port})
    args = {
        "run_dir": str(run.resolve()),
        "snapshots": None if snapshots is None else str(snapshots.resolve()),
        "rules_dir": str(rules.resolve()) if rules else None,
        "policy_config": str(config.resolve()) if config else None,
        "insecure": insecure,
    }
    app_ = build_app(args)
    # the replicas read the tokens from the environment they inherit from this local runtime;
    # on a cluster, set them in the Serve config's runtime_env (docs/cluster.md)
    ray_serve.run(app_, name="creditgraph", route_prefix="/")
    console.print(f"decision API on http://{host}:{port}/v1/decisions (docs: /docs)")
    stop.wait()
    console.print("draining in-flight requests and stopping")
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
    """Run every stage (build, partition, pretrain, train, ablations, evaluate), reusing unchanged ones."""
    from creditgraph.pipeline import run_pipeline

    _log_to(out)
    cfg = _config(config)
    report = run_pipeline(data, out, cfg, stop_after=stop_after, force=force, address=address)
    for name, r in report.items():
        state = "reused" if r["reused"] else f"ran in {r['seconds']:.1f}s"
        console.print(f"stage {name}: {state}", highlight=False)
    _print_report(out)
    console.print(f"run folder: {out.resolve()}  (evaluation report: {out.resolve() / 'eval'})")
    console.print(f"log: {out.resolve() / 'logs' / 'creditgraph.log'}", highlight=False)


def _print_report(run: Path) -> None:
    """The held-out table of a run's evaluation (if it has one): against the truth when the data
    has one, else the predictive metrics a real dataset allows."""
    from creditgraph.layout import RunLayout
    from creditgraph.utils.io import read_json
    from creditgraph.utils.tables import markdown_table

    metrics = RunLayout(run).eval.metrics
    if not metrics.exists():
        return
    report = read_json(metrics)
    keys = ["name", "kind", "mise", "violation_rate", "granted_ratio", "auc", "ap", "ece"]
    if not report.get("has_truth", True):
        keys = ["name", "kind", "auc", "ap", "brier", "ece"]
    n_test = report.get("n_test")
    title = "held-out evaluation" + (f" ({n_test:,} test users)" if n_test else "")
    what = "against the truth" if report.get("has_truth", True) else "no truth: predictive metrics"
    console.print(f"{title}, {what}:", highlight=False)
    rows = [{k: r.get(k) for k in keys} for r in report.get("rows", [])]
    console.print(markdown_table(rows), highlight=False, soft_wrap=True)


@app.command()
def up(
    num_cpus: Annotated[
        int | None, typer.Option("--num-cpus", min=1, help="CPUs the head offers (default: all)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="head (GCS) port; default: a free one")] = None,
    temp_dir: Annotated[
        Path | None,
        typer.Option("--temp-dir", help="root of Ray's session and log folders (Ray's default)"),
    ] = None,
) -> None:
    """Start a persistent local Ray head (dashboard off) that later commands join instead of
    starting their own runtime; `creditgraph down` stops it."""
    from creditgraph.utils.runtime import head_file, start_head

    console.print("starting a local Ray head (once; later commands join it)", highlight=False)
    state = start_head(num_cpus, port, temp_dir)
    if state["reused"]:
        console.print(f"a Ray head is already up at {state['address']} ({head_file()})")
        return
    console.print(
        f"Ray head up at {state['address']} (recorded in {head_file()}); commands on this "
        "machine join it; stop it with `creditgraph down`",
        highlight=False,
    )


@app.command()
def down() -> None:
    """Stop the local Ray head that `creditgraph up` started (only its processes)."""
    from creditgraph.utils.runtime import head_file, stop_head

    state = stop_head()
    if state is None:
        console.print(f"no Ray head recorded in {head_file()}: nothing to stop", highlight=False)
        return
    console.print(
        f"stopped the Ray head at {state['address']} ({state['stopped_processes']} processes)",
        highlight=False,
    )


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
    from creditgraph.rules.learn import learn_rules

    cfg = _config(
        config,
        {
            "rules.target": target,
            "rules.min_confidence": min_confidence,
            "rules.seed": seed,
            "rules.estimator.max_rules": max_rules,
            "rules.exclude": [c.strip() for c in exclude.split(",") if c.strip()]
            if exclude
            else None,
        },
    ).rules
    if cfg.estimator.get("use_ray", True):
        _ray(address)
    learn_rules(data, out, cfg)
    console.print(f"wrote {out}/rules.json, rules.sql, rules.txt, summary.json")


def main() -> None:  # pragma: no cover - console entry point
    import os

    from creditgraph.utils.logs import CONSOLE_FILTER_ENV, route_python_warnings

    # a console session: Ray's C++ log lines go to the log file (utils/logs.py)
    os.environ.setdefault(CONSOLE_FILTER_ENV, "1")
    route_python_warnings()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
