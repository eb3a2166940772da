"""``./run demo``: the whole product on the embedded default marketplace, end to end.

A pipeline configuration: simulate -> build -> partition -> pretrain -> train (Ray Train) ->
evaluate (against the truth, with baselines) -> learn guardrail rules (CRSL) -> batch scoring
(Ray Data) with a promoted snapshot -> one decision for a new applicant through the online service
(Ray Serve). Every stage is reused on a second run when its inputs and config did not change
(the pipeline's fingerprints; nothing here caches on its own).
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from rich.console import Console

from creditgraph.config import PipelineConfig, override
from creditgraph.data.simulate import SimulationConfig, simulate_to_dir
from creditgraph.layout import RunLayout, ScoreFiles, StageFolder
from creditgraph.pipeline import Pipeline, Stage, StageContext, credit_stages, score_stage
from creditgraph.utils.io import read_json
from creditgraph.utils.tables import markdown_table

console = Console()
DEMO_RULE_CONFIDENCE = 0.3


def _simulate_stage(sim: SimulationConfig, data: Path) -> Stage:
    """Simulating the data is the demo's first stage (reused while its config is unchanged)."""

    def run(ctx: StageContext) -> dict:
        return simulate_to_dir(sim, data)

    stage = Stage("simulate", (), (), lambda c: _DataFolder(data), run, needs_ray=False)
    stage.identity = sim.model_dump(mode="json")
    return stage


class _DataFolder(StageFolder):
    @property
    def manifest(self) -> Path:
        return self.dir / "simulation.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("demo_runs"))
    parser.add_argument("--config", type=Path, default=None, help="pipeline.yaml")
    parser.add_argument("--no-serve", action="store_true", help="skip the online service step")
    parser.add_argument(
        "family_arg", nargs="?", choices=("credit", "orders"), help="same as --family"
    )
    parser.add_argument(
        "--family",
        choices=("credit", "orders"),
        default=None,
        help="credit limits (default) or real-time order risk (seed 001)",
    )
    parser.add_argument("--orders", type=int, default=60_000, help="orders (--family orders)")
    args = parser.parse_args(argv)
    if (args.family or args.family_arg) == "orders":
        _orders_demo(args)
        return

    t0 = time.perf_counter()
    out = args.out.resolve()
    data, run, scores = out / "data", RunLayout(out / "run"), out / "scores"
    registry = out / "snapshots"
    cfg = PipelineConfig.load(args.config)
    # guardrails flag users at about 3x the base default rate: few feature regions of the
    # simulated market reach a higher confidence without the limit itself
    cfg = override(cfg, "rules.min_confidence", DEMO_RULE_CONFIDENCE)
    stages = [
        _simulate_stage(SimulationConfig(n_users=args.users, seed=args.seed), data),
        *credit_stages(cfg, with_rules=True),
        score_stage(ScoreFiles(scores), registry, promote=True, rules=True),
    ]
    for s in stages[1:]:
        if s.reads_data:
            s.inputs = ("simulate", *s.inputs)
    report = Pipeline(stages).run(StageContext(data, run), cfg)
    rows = [
        {"stage": k, "status": "reused" if v.reused else "ran", "seconds": round(v.seconds, 1)}
        for k, v in report.items()
    ]
    console.print(markdown_table(rows), highlight=False)
    _print_graph(run)
    _print_pretrain(run)
    _print_evaluation(run)
    _print_rules(run)
    summary = read_json(ScoreFiles(scores).manifest)
    console.print(
        f"\n[bold]batch scoring[/] of {summary['users_scored']:,} users as of "
        f"{summary['decision_time'][:10]} (grid 0..{summary['grid']['stop']:,.0f}, "
        f"r_max {summary['r_max']}): granted {summary['granted_share']:.1%}, mean limit "
        f"{summary['mean_limit']:,.0f}; binding constraints {summary['binding_constraints']}; "
        f"snapshot {summary['snapshot']} promoted"
    )
    if not args.no_serve:
        _serve_one_applicant(run, registry, data)
    console.print(f"\n[bold]results[/]\n  data        {data}\n  run         {run.root}")
    console.print(f"  evaluation  {run.eval.dir} (headline.md, figures/*.png)")
    console.print(f"  rules       {run.rules.dir} (rules.txt, rules.sql, rules.json)")
    console.print(f"  decisions   {scores} (decisions.parquet, curves.parquet, summary.json)")
    console.print(f"  snapshots   {registry} (the promoted one is served)")
    console.print(
        "\n[bold]online service[/]: CREDITGRAPH_API_TOKEN=<token> ./run cg serve --run "
        f"{run.root} --snapshots {registry}\n  then curl -s -X POST localhost:8000/v1/decisions "
        "-H 'authorization: Bearer <token>' -H 'content-type: application/json' "
        "-d '{\"user_id\": 10000000}'"
    )
    console.print(f"[dim]demo finished in {time.perf_counter() - t0:.0f}s[/]")


def _print_graph(run: RunLayout) -> None:
    graph = read_json(run.graph.manifest)
    shards = read_json(run.shards.manifest)
    console.print(
        f"graph: {graph['n_users']:,} users, {graph['n_features']} features, "
        f"{graph['edges']['edges']:,} time-directed user-user edges, "
        f"{graph['edges'].get('supernodes_cut', 0)} super-nodes cut, "
        f"{graph['edges'].get('sightings_after_as_of', 0):,} sightings after as_of ignored; "
        f"{shards['num_parts']} ClusterGCN shards (edge cut {shards['edge_cut']:.3f}, "
        f"shadow ratio {shards['shadow_ratio']:.2f})"
    )


def _print_pretrain(run: RunLayout) -> None:
    manifest = read_json(run.pretrain.manifest)
    alpha = pd.read_parquet(run.pretrain.alpha)
    top = alpha.reindex(alpha["alpha"].abs().sort_values(ascending=False).index).head(5)
    dag = read_json(run.pretrain.dag)
    console.print(
        f"pretrain: teacher out-of-fold AUC {manifest['teacher_oof_auc']:.3f}, "
        f"feature DAG with {len(dag['edges'])} edges; top causal weights alpha_j: "
        + ", ".join(f"{r.feature} {r.alpha:+.3f}" for r in top.itertuples())
    )


def _print_evaluation(run: RunLayout) -> None:
    evaluation = read_json(run.eval.metrics)
    console.print(
        f"\n[bold]held-out evaluation[/] ({evaluation['n_test']:,} test users, policy at "
        f"r_max = {evaluation['r_max']}):"
    )
    cols = ["name", "kind", "mise", "mise_gang", "auc", "ap", "ece"]
    if not evaluation.get("has_truth", True):
        cols = ["name", "kind", "auc", "ap", "brier", "ece"]
    console.print(markdown_table(evaluation["rows"], cols), highlight=False, soft_wrap=True)
    policies = [p for p in evaluation.get("policies", []) if p["name"] == "creditgraph"]
    if policies:
        console.print(
            "\n[bold]the decisions, stage by stage[/] (test users; over-ceiling: share of granted "
            "users whose true risk exceeds r_max):"
        )
        keys = [
            "policy",
            "over_ceiling_rate",
            "portfolio_default_rate",
            "granted_ratio",
            "limit_satisfaction",
            "value_mean",
        ]
        console.print(markdown_table(policies, keys), highlight=False, soft_wrap=True)
    g = evaluation.get("guarantee") or {}
    if g.get("lambda") is not None:
        console.print(
            f"guarantee: decisions on the upper bound with lambda = {g['lambda']} "
            f"(certified for r_max {g['for_r_max']}, delta {g.get('delta')}): "
            + g.get("statement", "").split("\n")[0]
        )
    elif g:
        console.print(f"guarantee: {g.get('reason') or 'nothing certified: the policy declines'}")
    ope = evaluation.get("ope") or []
    if ope:
        console.print("off-policy estimate of the deployed policy's portfolio default rate:")
        for r in ope:
            truth = r.get("true_default_rate")
            console.print(
                f"  {r['method']:>5}: {r['default_rate']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
                + ("" if truth is None else f"   (truth {truth:.4f})"),
                highlight=False,
            )


def _print_rules(run: RunLayout) -> None:
    summary = read_json(run.rules.manifest)
    text = run.rules.dir.joinpath("rules.txt").read_text().strip().splitlines()
    console.print(
        f"\n[bold]guardrail rules[/] (CRSL, confidence >= {summary.get('min_confidence')}):"
    )
    for line in text[:10]:
        console.print(f"  {line}", highlight=False, soft_wrap=True)


def _serve_one_applicant(run: RunLayout, registry: Path, data: Path) -> None:
    """Start the service, decide one applicant the model has never seen, stop the service."""
    from ray import serve

    from creditgraph.serving.app import TOKEN_ENV, build_app

    token = secrets.token_urlsafe(16)
    os.environ[TOKEN_ENV] = token
    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    serve.run(
        build_app({"run_dir": str(run.root), "snapshots": str(registry)}),
        name="creditgraph",
        route_prefix="/",
    )
    try:
        users = pd.read_parquet(data / "users.parquet")
        links = pd.read_parquet(data / "links.parquet")
        segments = pd.read_parquet(data / "segments.parquet")
        gang = segments.loc[segments["segment"] == "gang", "user_id"].iloc[0]
        device = links.loc[
            (links["user_id"] == gang) & (links["entity_type"] == "device"), "entity_id"
        ].iloc[0]
        template = users.drop(columns=["user_id", "as_of", "credit_limit", "default"]).median()
        features = {k: (None if np.isnan(v) else float(v)) for k, v in template.items()}
        as_of = str(users["as_of"].max())
        base = {"features": features, "limit": 0.0, "as_of": as_of}
        headers = {"authorization": f"Bearer {token}"}
        url = "http://127.0.0.1:8765/v1/decisions"
        alone = httpx.post(url, json=base, headers=headers, timeout=60).json()
        linked = httpx.post(
            url,
            json={**base, "links": [{"entity_type": "device", "entity_id": int(device)}]},
            headers=headers,
            timeout=60,
        ).json()
        console.print(
            "\n[bold]a new applicant through the online service[/] (median features, never seen "
            f"by the model; snapshot {linked.get('snapshot')}):\n"
            f"  no links:                         limit {alone['limit']:,.0f} "
            f"({alone['binding_constraint']})\n"
            f"  sharing a device with a fraud ring: limit {linked['limit']:,.0f} "
            f"({linked['binding_constraint']}; {linked['entities'][0]['neighbours']} co-users "
            "through that device)"
        )
    finally:
        serve.shutdown()


def _orders_demo(args: argparse.Namespace) -> None:
    """The order-risk family end to end: simulate, train, evaluate, batch-score, serve one order."""
    from creditgraph.data.simulate_orders import OrderSimConfig, simulate_orders_to_dir
    from creditgraph.pipeline import order_score_stage, order_stages

    t0 = time.perf_counter()
    out = args.out.resolve() / "orders"
    data, run, scores, registry = (
        out / "data",
        RunLayout(out / "run"),
        out / "scores",
        out / "snapshots",
    )
    cfg = PipelineConfig.load(args.config)
    sim = OrderSimConfig(n_orders=args.orders, seed=args.seed)
    simulate = Stage(
        "simulate", (), (), lambda c: _DataFolder(data), lambda ctx: simulate_orders_to_dir(sim, data),
        needs_ray=False, identity=sim.model_dump(mode="json"),
    )  # fmt: skip
    stages = [
        simulate,
        *order_stages(cfg),
        order_score_stage(ScoreFiles(scores), registry, promote=True),
    ]
    for s in stages[1:]:
        if s.reads_data:
            s.inputs = ("simulate", *s.inputs)
    report = Pipeline(stages).run(StageContext(data, run), cfg)
    rows = [
        {"stage": k, "status": "reused" if v.reused else "ran", "seconds": round(v.seconds, 1)}
        for k, v in report.items()
    ]
    console.print(markdown_table(rows), highlight=False)
    console.print((run.eval.dir / "headline.md").read_text(), highlight=False, soft_wrap=True)
    summary = read_json(ScoreFiles(scores).manifest)
    console.print(
        f"batch scoring (Ray Data): {summary['orders_scored']:,} orders; snapshot "
        f"{summary['snapshot']} of {summary['entities_stored']:,} entity embeddings as of "
        f"{summary['decision_time'][:10]}, promoted"
    )
    if not args.no_serve:
        from creditgraph.serving.orders import demo_order_through_service

        for line in demo_order_through_service(run, registry, data):
            console.print(line, highlight=False, soft_wrap=True)
    console.print(f"\n[bold]results[/]\n  data  {data}\n  run   {run.root} (eval/headline.md)")
    console.print(f"  scores {scores}\n  snapshots {registry}")
    console.print(f"[dim]orders demo finished in {time.perf_counter() - t0:.0f}s[/]")


if __name__ == "__main__":
    main()
