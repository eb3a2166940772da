"""Foundation scaling: simulate + validate + build + partition at 100k and 1M users.

Each size runs in a fresh process (its own local Ray runtime) so peak memory is per size. The
claim: the cost grows about linearly (10x the users for at most ~12x the time).

Environment: BENCH_GRAPH_SIZES (comma-separated user counts, default "100000,1000000"; e.g.
"2000,20000" for a quick check).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from benchmarks._measure import in_child
from benchmarks._report import markdown_table, write_section

SIZES = [int(s) for s in os.environ.get("BENCH_GRAPH_SIZES", "100000,1000000").split(",")]
STAGES = ("simulate", "validate", "build", "partition")


def _one(n: int, root: Path) -> dict:
    """Run inside a child process: all four stages for ``n`` users; print JSON results."""
    from benchmarks._measure import stage
    from creditgraph.data.load import load_dataset
    from creditgraph.data.simulate import SimulationConfig, simulate_to_dir
    from creditgraph.graph.build import build_graph
    from creditgraph.graph.config import GraphConfig, PartitionConfig
    from creditgraph.graph.partition import partition_graph
    from creditgraph.utils.io import read_json
    from creditgraph.utils.runtime import init_ray

    init_ray()
    res: dict = {}
    data, run = root / "data", root / "run"
    with stage(res, "simulate"):
        simulate_to_dir(SimulationConfig(n_users=n, seed=0), data)
    with stage(res, "validate"):
        load_dataset(data)
    with stage(res, "build"):
        build_graph(data, run, GraphConfig())
    with stage(res, "partition"):
        partition_graph(run, PartitionConfig())
    g = read_json(run / "graph" / "manifest.json")
    s = read_json(run / "shards" / "manifest.json")
    res["graph"] = {
        "edges": g["edges"]["edges"],
        "links": g["dataset_stats"]["links"],
        "supernodes_cut": g["edges"]["supernodes_cut"],
        "parts": s["num_parts"],
        "edge_cut": s["edge_cut"],
        "shadow_ratio": s["shadow_ratio"],
        "balance": s["balance"],
    }
    return res


def main() -> None:
    load_before = os.getloadavg()[0]
    results = {}
    for n in SIZES:
        with tempfile.TemporaryDirectory(prefix=f"bench_graph_{n}_") as tmp:
            results[n] = in_child(
                "from pathlib import Path; from benchmarks.bench_graph import _one",
                f"_one({n}, Path({tmp!r}))",
                f"bench_graph n={n}",
            )
            total = sum(results[n][s]["seconds"] for s in STAGES)
            print(f"n={n:,}: {total:.1f}s")

    rows = []
    for n, r in results.items():
        row = {"users": f"{n:,}"}
        for s in STAGES:
            row[f"{s} s"] = round(r[s]["seconds"], 1)
        row["total s"] = round(sum(r[s]["seconds"] for s in STAGES), 1)
        row["peak RSS GiB"] = round(max(r[s]["peak_rss_gib"] for s in STAGES), 2)
        row["links"] = f"{r['graph']['links']:,}"
        row["edges"] = f"{r['graph']['edges']:,}"
        row["parts"] = r["graph"]["parts"]
        row["edge cut"] = round(r["graph"]["edge_cut"], 4)
        row["shadow ratio"] = round(r["graph"]["shadow_ratio"], 3)
        rows.append(row)
    body = markdown_table(rows)
    if len(SIZES) >= 2:
        a, b = SIZES[0], SIZES[-1]
        ta = sum(results[a][s]["seconds"] for s in STAGES)
        tb = sum(results[b][s]["seconds"] for s in STAGES)
        ratio = tb / ta
        verdict = "meets" if ratio <= 12 * (b / a) / 10 else "misses"
        body += (
            f"\n\nScaling: {b / a:.0f}x the users took {ratio:.1f}x the time "
            f"({verdict} the <= {12 * (b / a) / 10:.0f}x goal). Per-stage peak RSS covers the driver "
            "and its Ray worker processes. Each size runs in a fresh process with a local Ray runtime."
        )
    body += (
        f"\n\n1-minute load average {load_before:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores."
    )
    write_section(
        "Foundation: simulate, validate, build, partition", body, "benchmarks/bench_graph.py"
    )
    print(body)


if __name__ == "__main__":
    main()
