"""``./run demo``: the whole product on the embedded default marketplace, end to end.

simulate -> build -> partition -> pretrain -> train (Ray Train) -> evaluate (against the truth,
with baselines) -> learn guardrail rules (CRSL) -> batch rescoring (Ray Data) -> how to start the
online service. Stages whose inputs and config did not change are reused on a second run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console

from creditgraph.config import PipelineConfig
from creditgraph.data.simulate import SimulationConfig, simulate_to_dir
from creditgraph.utils.io import read_json
from creditgraph.utils.tables import markdown_table

console = Console()
DEMO_RULE_CONFIDENCE = 0.3


def _ensure_data(cfg: SimulationConfig, data: Path) -> None:
    marker = data / "simulation.json"
    if marker.exists() and read_json(marker) == cfg.model_dump(mode="json"):
        console.print(f"[dim]reusing simulated data at {data}[/]")
        return
    simulate_to_dir(cfg, data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("demo_runs"))
    parser.add_argument("--config", type=Path, default=None, help="pipeline.yaml")
    args = parser.parse_args(argv)

    from creditgraph.pipeline import run_pipeline
    from creditgraph.rules.learn import learn_rules
    from creditgraph.serving.score import score_users
    from creditgraph.utils.runtime import init_ray

    t0 = time.perf_counter()
    out = args.out.resolve()
    data, run, scores = out / "data", out / "run", out / "scores"
    cfg = PipelineConfig.load(args.config)
    _ensure_data(SimulationConfig(n_users=args.users, seed=args.seed), data)
    init_ray()
    report = run_pipeline(data, run, cfg)

    stages = [
        {
            "stage": k,
            "status": "reused" if v["reused"] else "ran",
            "seconds": round(v["seconds"], 1),
        }
        for k, v in report.items()
    ]
    console.print(markdown_table(stages), highlight=False)
    graph = read_json(run / "graph" / "manifest.json")
    shards = read_json(run / "shards" / "manifest.json")
    pre = read_json(run / "pretrain" / "manifest.json")
    console.print(
        f"graph: {graph['n_users']:,} users, {graph['n_features']} features, "
        f"{graph['edges']['edges']:,} time-directed user-user edges, "
        f"{graph['edges']['supernodes_cut']} super-nodes cut, "
        f"{graph['edges']['sightings_after_as_of']:,} sightings after as_of ignored; "
        f"{shards['num_parts']} ClusterGCN shards (edge cut {shards['edge_cut']:.3f}, "
        f"shadow ratio {shards['shadow_ratio']:.2f})"
    )
    _print_pretrain(run, pre)
    evaluation = read_json(run / "eval" / "metrics.json")
    console.print(
        f"\n[bold]held-out evaluation against the true curves[/] ({evaluation['n_test']:,} test users, "
        f"policy at r_max = {evaluation['r_max']}):"
    )
    cols = [
        "name",
        "kind",
        "mise",
        "mise_gang",
        "violation_rate",
        "granted_ratio",
        "auc",
        "ap",
        "ece",
    ]
    console.print(markdown_table(evaluation["rows"], cols), highlight=False, soft_wrap=True)

    # A guardrail flags users at 3x the base default rate (~10 %): few feature regions of the
    # simulated market reach higher confidence without the limit itself.
    rules_cfg = cfg.rules.model_copy(update={"min_confidence": DEMO_RULE_CONFIDENCE})
    rules = learn_rules(data, run / "rules", rules_cfg, show=False)
    _print_rules(run / "rules", rules)

    summary = score_users(run, data, scores, cfg, rules_dir=str(run / "rules"))
    console.print(
        f"scored {summary['users_scored']:,} users in {summary['seconds']:.0f}s "
        f"(mean limit {summary['mean_limit']:,.0f}); binding constraints: {summary['binding_constraints']}"
    )
    console.print(f"\n[bold]results[/]\n  data        {data}\n  run         {run}")
    console.print(f"  evaluation  {run / 'eval'} (headline.md, figures/*.png)")
    console.print(f"  rules       {run / 'rules'} (rules.txt, rules.sql, rules.json)")
    console.print(f"  decisions   {scores} (decisions.parquet, curves.parquet)")
    console.print(
        "\n[bold]online service[/]: ./run cg serve --run "
        f"{run}  then\n  curl -s -X POST localhost:8000/v1/decisions -H 'content-type: application/json' "
        "-d '{\"user_id\": 10000000}'"
    )
    console.print(f"[dim]demo finished in {time.perf_counter() - t0:.0f}s[/]")


def _print_pretrain(run: Path, manifest: dict) -> None:
    import pandas as pd

    alpha = pd.read_parquet(run / "pretrain" / "alpha.parquet")
    top = alpha.reindex(alpha["alpha"].abs().sort_values(ascending=False).index).head(5)
    dag = read_json(run / "pretrain" / "dag.json")
    console.print(
        f"pretrain: teacher out-of-fold AUC {manifest['teacher_oof_auc']:.3f}, "
        f"feature DAG with {len(dag['edges'])} edges; top causal weights alpha_j: "
        + ", ".join(f"{r.feature} {r.alpha:+.3f}" for r in top.itertuples())
    )


def _print_rules(folder: Path, summary: dict) -> None:
    text = (folder / "rules.txt").read_text().strip().splitlines()
    console.print(
        f"\n[bold]guardrail rules[/] (CRSL, confidence >= {summary.get('min_confidence')}):"
    )
    for line in text[:10]:
        console.print(f"  {line}", highlight=False, soft_wrap=True)


if __name__ == "__main__":
    main()
