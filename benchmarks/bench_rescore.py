"""Batch rescoring at scale: the embedding stage and ``score_users`` at 1M users.

Needs a model trained on a graph of that size. The benchmark simulates ``BENCH_RESCORE_USERS``
users (default 1,000,000), runs the pipeline up to ``train`` with one training epoch and a cheap
pretraining (DML on a 100k-row subsample, 2 teacher folds): rescoring throughput depends on the
model's shape (width, hops, teacher trees, neighbourhood sizes), not on how well it is trained.
The data and the trained run are kept under ``BENCH_RESCORE_DIR`` (default ``runs/bench_rescore``,
git-ignored) so a re-run reuses them; only the two measured stages are redone:

* ``build_embeddings``: every shard through the model on a Ray Data actor pool, written to the
  embedding store (the batch half of the lambda architecture);
* ``score_users``: read and validate the users, cluster caps, the last hop + towers on an
  autoscaling actor pool, decisions, ``curves.parquet`` / ``decisions.parquet`` (atomic).

Preparation and the measured stages run in separate fresh processes (each with its own local Ray
runtime), so the peak RSS of a stage (driver + raylet + Ray workers) is not inflated by training.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks._measure import in_child
from benchmarks._report import markdown_table, write_section

ROOT = Path(__file__).resolve().parent.parent
USERS = int(os.environ.get("BENCH_RESCORE_USERS", "1000000"))
WORKDIR = Path(os.environ.get("BENCH_RESCORE_DIR", str(ROOT / "runs" / "bench_rescore")))
MAX_ACTORS = int(os.environ.get("BENCH_RESCORE_MAX_ACTORS", "2"))
PIPELINE_OVERRIDES = {
    "train": {"epochs": 1},
    "pretrain": {"dml": {"max_rows": 100_000}, "teacher": {"n_folds": 2}},
}


def _config():
    from creditgraph.config import PipelineConfig

    return PipelineConfig.model_validate(PIPELINE_OVERRIDES)


def _prepare(n: int, root: str) -> dict:
    """Child process: simulate (if needed) and train (if needed); return stage timings."""
    from creditgraph.data.simulate import SimulationConfig, simulate_to_dir
    from creditgraph.pipeline import run_pipeline
    from creditgraph.utils.io import read_json
    from creditgraph.utils.runtime import init_ray

    data, run = Path(root) / "data", Path(root) / "run"
    sim = SimulationConfig(n_users=n, seed=0)
    res: dict = {}
    marker = data / "simulation.json"
    if not (marker.exists() and read_json(marker) == sim.model_dump(mode="json")):
        t0 = time.perf_counter()
        simulate_to_dir(sim, data)
        res["simulate"] = {"reused": False, "seconds": time.perf_counter() - t0}
    else:
        res["simulate"] = {"reused": True, "seconds": 0.0}
    init_ray()
    report = run_pipeline(data, run, _config(), stop_after="train")
    for name, r in report.items():
        res[name] = {"reused": bool(r["reused"]), "seconds": float(r["seconds"])}
    return res


def _measure(root: str, out: str) -> dict:
    """Child process: time the embedding stage and the rescoring, each with its peak RSS."""
    from benchmarks._measure import stage
    from creditgraph.serving.embed import build_embeddings
    from creditgraph.serving.score import score_users
    from creditgraph.utils.io import read_json
    from creditgraph.utils.runtime import init_ray

    data, run = Path(root) / "data", Path(root) / "run"
    init_ray()
    res: dict = {}
    with stage(res, "embed"):
        emb = build_embeddings(run, max_actors=MAX_ACTORS)
    with stage(res, "score"):
        summary = score_users(run, data, out, _config(), max_actors=MAX_ACTORS)
    graph = read_json(run / "graph" / "manifest.json")
    shards = read_json(run / "shards" / "manifest.json")
    res["users_embedded"] = emb["users"]
    res["users_scored"] = summary["users_scored"]
    res["grid_points"] = summary["grid_points"]
    res["clusters"] = summary["clusters"]
    res["edges"] = graph["edges"]["edges"]
    res["parts"] = shards["num_parts"]
    res["store_mib"] = Path(emb["store"]).stat().st_size / 2**20
    res["curves_mib"] = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) / 2**20
    return res


def _child(call: str) -> dict:
    """Run ``call`` (an expression over this module) in a fresh Python process; its JSON result."""
    return in_child("from benchmarks import bench_rescore as b", call, f"bench_rescore `{call}`")


def main() -> None:
    t_all = time.perf_counter()
    root = WORKDIR / str(USERS)
    root.mkdir(parents=True, exist_ok=True)
    print(f"bench_rescore: {USERS:,} users in {root} (preparing: simulate + pipeline to train)")
    prep = _child(f"b._prepare({USERS}, {str(root)!r})")
    print("prepared:", {k: round(v["seconds"], 1) for k, v in prep.items()})
    with tempfile.TemporaryDirectory(prefix="bench_rescore_out_", dir=root) as tmp:
        res = _child(f"b._measure({str(root)!r}, {str(Path(tmp) / 'scores')!r})")
    n = res["users_scored"]
    e, s = res["embed"], res["score"]
    rows = [
        {
            "stage": "build_embeddings (all shards -> store)",
            "seconds": round(e["seconds"], 1),
            "users/s": round(res["users_embedded"] / e["seconds"]),
            "peak RSS GiB": round(e["peak_rss_gib"], 2),
        },
        {
            "stage": "score_users (last hop + towers + policy -> parquet)",
            "seconds": round(s["seconds"], 1),
            "users/s": round(n / s["seconds"]),
            "peak RSS GiB": round(s["peak_rss_gib"], 2),
        },
        {
            "stage": "both (a full rescoring from a trained model)",
            "seconds": round(e["seconds"] + s["seconds"], 1),
            "users/s": round(n / (e["seconds"] + s["seconds"])),
            "peak RSS GiB": round(max(e["peak_rss_gib"], s["peak_rss_gib"]), 2),
        },
    ]
    prep_txt = ", ".join(
        f"{k} " + ("reused" if v["reused"] else f"{v['seconds']:.0f}s") for k, v in prep.items()
    )
    body = (
        f"{n:,} simulated users ({res['edges']:,} time-directed user-user edges, "
        f"{res['parts']} ClusterGCN shards), {res['grid_points']} grid limits per curve, "
        f"{res['clusters']:,} clusters; Ray Data actor pools of 1..{MAX_ACTORS} actors "
        "(1 CPU each), the default SQLite embedding store.\n\n"
        + markdown_table(rows)
        + f"\n\nOutputs: embedding store {res['store_mib']:,.0f} MiB; scores (curves + decisions "
        f"parquet) {res['curves_mib']:,.0f} MiB. Peak RSS is the sampled maximum of the driver "
        "and all its Ray processes (object-store pages touched by several processes count more "
        "than once). The model was trained for one epoch with a cheap pretraining (DML on a 100k "
        "row subsample, 2 teacher folds): throughput depends on the model's shape, not its "
        "quality. `score_users` includes reading and validating the users, the cluster caps "
        "(connected components on the entity graph) and writing back the per-user caps to the "
        f"store. Preparation (not measured): {prep_txt}. Whole benchmark: "
        f"{time.perf_counter() - t_all:.0f}s."
    )
    write_section("Batch rescoring at scale", body, "benchmarks/bench_rescore.py")
    print(body)


if __name__ == "__main__":
    main()
