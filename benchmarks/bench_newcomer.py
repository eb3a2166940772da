"""The newcomer's path: how long `creditgraph validate` takes as a whole process, and what
`creditgraph run` reports on real data without truth (the UCI credit-default file).

1. ``creditgraph validate`` on the 20,000-user demo dataset (``./run demo``'s data), timed as a
   whole process (Python start and imports included): the first run and the median of the next
   ones, read with pyarrow (the default below 256 MiB) and forced through Ray Data
   (``CREDITGRAPH_RAY_READ_MIN_BYTES=0``: a local Ray runtime starts), and forced through Ray
   Data while joined to a ``creditgraph up`` head (no runtime to start);
2. the same at 1,000,000 users on both sides of the switch (one run each): pyarrow forced, and
   Ray Data, the default at that size;
3. ``creditgraph convert uci`` + ``creditgraph run`` on the UCI file with a small model, and the
   held-out predictive table it writes (no truth: AUC, AP, Brier, ECE).

Every command runs as a user runs it, in its own process, with ``CREDITGRAPH_HOME`` in a scratch
folder (so no head of the user's is joined unless the row says so). Parts 1-2 and part 3 write
their own sections of BENCHMARKS.md; ``BENCH_NEWCOMER_PARTS=validate`` (or ``uci``) runs one.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._measure import PeakRSS
from benchmarks._report import ROOT, markdown_table, write_section

WARM_RUNS = int(os.environ.get("BENCH_NEWCOMER_WARM", "5"))
BIG = int(os.environ.get("BENCH_NEWCOMER_BIG", "1000000"))
UCI = Path(
    os.environ.get("BENCH_NEWCOMER_UCI", ROOT.parent / "shared/data/uci_taiwan_credit_default.csv")
)
UCI_CONFIG = "model: {hidden: 16, heads: 2}\ntrain: {epochs: 8, num_workers: 1}\n"
SECTION_VALIDATE = "Newcomer: creditgraph validate as a whole process"
SECTION_UCI = "Newcomer: UCI credit data end to end, no truth"
SCRIPT = "benchmarks/bench_newcomer.py"


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("creditgraph")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "creditgraph.cli"]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cg(args: list, env: dict, check: bool = True) -> tuple[float, float, str, float]:
    """Run ``creditgraph ARGS`` as its own process: (wall seconds, peak RSS GiB of its process
    tree, output, CPU seconds of the process and the children it waited for)."""
    with PeakRSS() as mem:
        cpu0, t0 = _children_cpu(), time.perf_counter()
        res = subprocess.run(
            [*_cli(), *map(str, args)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if check and res.returncode != 0:
        raise RuntimeError(f"creditgraph {' '.join(map(str, args))} failed:\n{res.stdout[-3000:]}")
    return seconds, mem.peak / 2**30, res.stdout, cpu


def _env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(CREDITGRAPH_HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    env.update(extra)
    return env


def _size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*.parquet")) / 2**20


def validate_times(data: Path, env: dict, warm: int) -> dict:
    first, peak, _, first_cpu = cg(["validate", data], env)
    rest = [cg(["validate", data], env) for _ in range(warm)]
    return {
        "first s": round(first, 2),
        "median of later runs s": round(statistics.median(r[0] for r in rest), 2) if rest else None,
        "later runs": warm,
        "CPU s (first)": round(first_cpu, 2),
        "peak RSS GiB": round(peak, 2),
    }


def bench_validate(root: Path) -> list[dict]:
    home = root / "home"
    data = root / "demo20k"
    cg(["simulate", "--users", 20_000, "--seed", 0, "--out", data], _env(home))
    rows = []
    arrow = _env(home)
    ray = _env(home, CREDITGRAPH_RAY_READ_MIN_BYTES="0")
    size = f"{_size_mib(data):.0f} MiB"
    rows.append(
        {
            "users": "20,000",
            "files": size,
            "reading": "pyarrow (default)",
            "Ray": "none",
            **validate_times(data, arrow, WARM_RUNS),
        }
    )
    rows.append(
        {
            "users": "20,000",
            "files": size,
            "reading": "Ray Data (forced)",
            "Ray": "starts a local runtime",
            **validate_times(data, ray, max(2, WARM_RUNS // 2)),
        }
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="cgb-", dir="/tmp"))
    try:
        cg(["up", "--temp-dir", ray_tmp], ray)
        rows.append(
            {
                "users": "20,000",
                "files": size,
                "reading": "Ray Data (forced)",
                "Ray": "joins `creditgraph up`",
                **validate_times(data, ray, max(2, WARM_RUNS // 2)),
            }
        )
    finally:
        cg(["down"], ray, check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    big = root / f"sim{BIG}"
    cg(["simulate", "--users", BIG, "--seed", 0, "--out", big], _env(home))
    size = f"{_size_mib(big):.0f} MiB"
    big_arrow = _env(home, CREDITGRAPH_RAY_READ_MIN_BYTES=str(2**50))
    for reading, env, ray_note in (
        ("pyarrow (forced)", big_arrow, "none"),
        ("Ray Data (the default from 256 MiB)", arrow, "starts a local runtime"),
    ):
        rows.append(
            {
                "users": f"{BIG:,}",
                "files": size,
                "reading": reading,
                "Ray": ray_note,
                **validate_times(big, env, 0),
            }
        )
    return rows


def bench_uci(root: Path) -> tuple[list[dict], dict]:
    home = root / "home"
    env = _env(home)
    data, run, cfg = root / "uci", root / "run_uci", root / "small.yaml"
    cfg.write_text(UCI_CONFIG)
    cg(["convert", "uci", UCI, "--out", data], env)
    seconds, peak, out, _ = cg(["run", "--data", data, "--out", run, "--config", cfg], env)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    rows = [
        {k: r.get(k) for k in ("name", "kind", "auc", "ap", "brier", "ece")}
        for r in metrics["rows"]
    ]
    stages = {}
    for line in out.splitlines():
        if line.startswith("stage ") and ": ran in " in line:
            name, rest = line[len("stage ") :].split(": ran in ")
            stages[name] = rest.rstrip("s")
    info = {
        "seconds": round(seconds, 1),
        "peak_gib": round(peak, 2),
        "n_test": metrics.get("n_test"),
        "has_truth": metrics.get("has_truth"),
        "stages": stages,
    }
    return rows, info


def main() -> None:
    parts = os.environ.get("BENCH_NEWCOMER_PARTS", "validate,uci").split(",")
    with tempfile.TemporaryDirectory(prefix="bench_newcomer_") as tmp:
        root = Path(tmp)
        if "validate" in parts:
            load = os.getloadavg()[0]
            rows = bench_validate(root)
            for r in rows:
                print(r)
            load = f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
            write_section(SECTION_VALIDATE, _validate_body(rows, load), SCRIPT)
        if "uci" in parts:
            load = os.getloadavg()[0]
            uci_rows, info = bench_uci(root)
            print(markdown_table(uci_rows))
            load = f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
            write_section(SECTION_UCI, _uci_body(uci_rows, info, load), SCRIPT)


def _validate_body(rows: list[dict], load: str) -> str:
    return f"""
`creditgraph validate DATA` as a whole process (Python start, imports, reading and checking
every table, the JSON summary), on `./run demo`'s dataset (20,000 users) and at {BIG:,} users,
on both sides of the reading switch (`CREDITGRAPH_RAY_READ_MIN_BYTES`, 256 MiB). "first" is the
first run after the data was written (files in the OS cache); Ray Data rows start, or join, a
runtime first. Wall clock on a machine shared with other work ({load}); "CPU s" is the CPU time
of the command's own process (not of Ray's worker processes), which the other work does not
inflate.

{markdown_table(rows)}
"""


def _uci_body(rows: list[dict], info: dict, load: str) -> str:
    stages = ", ".join(f"{k} {v} s" for k, v in info["stages"].items())
    settings = UCI_CONFIG.strip().replace(chr(10), "; ")
    return f"""
`creditgraph convert uci` + `creditgraph run` on the UCI credit-default file (30,000 real card
holders; no links, so no graph; no truth) with a small model, `{settings}`; every other setting
is the default (baselines included). The run took {info["seconds"]} s end to end ({stages}),
peak RSS {info["peak_gib"]} GiB, on a machine shared with other work ({load}). Held-out
predictive metrics of the default at the historical limit ({info["n_test"]:,} test users;
has_truth = {info["has_truth"]}):

{markdown_table(rows)}
"""


if __name__ == "__main__":
    main()
