"""The three-head model against the truth: MISE, policy and AUC for the full model, its ablations and
the baselines on the default simulated benchmark (several seeds, mean ± sd), and Ray Train
throughput with 1 and 2 workers.

Environment overrides: BENCH_MODEL_USERS (default 50000), BENCH_MODEL_SEEDS (default "0,1,2"),
BENCH_MODEL_EPOCHS (default: the pipeline default), BENCH_MODEL_ABLATIONS (comma-separated names from
``creditgraph.evaluate.run.ABLATIONS``), BENCH_MODEL_THROUGHPUT_EPOCHS (epochs of each Ray Train
throughput run, default 3). A tiny run to check the script: ``BENCH_MODEL_USERS=3000
BENCH_MODEL_SEEDS=0 BENCH_MODEL_EPOCHS=1 BENCH_MODEL_ABLATIONS=towers_no_graph
BENCH_MODEL_THROUGHPUT_EPOCHS=1``.

The throughput runs train into ``RUN/ablations/throughput_w{1,2}`` of the first seed's run (a
temporary folder), never over its model.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks._report import markdown_table, write_section
from creditgraph.config import PipelineConfig
from creditgraph.data.simulate import SimulationConfig, simulate_to_dir
from creditgraph.evaluate.run import HEADLINE
from creditgraph.layout import RunLayout
from creditgraph.pipeline import run_pipeline
from creditgraph.train.trainer import run_training
from creditgraph.utils.runtime import init_ray

USERS = int(os.environ.get("BENCH_MODEL_USERS", "50000"))
SEEDS = [int(s) for s in os.environ.get("BENCH_MODEL_SEEDS", "0,1,2").split(",")]
EPOCHS = os.environ.get("BENCH_MODEL_EPOCHS")
THROUGHPUT_EPOCHS = int(os.environ.get("BENCH_MODEL_THROUGHPUT_EPOCHS", "3"))
# the ablations by default; any of creditgraph.evaluate.run.ABLATIONS can be named
ABLATIONS = os.environ.get(
    "BENCH_MODEL_ABLATIONS", "towers_no_graph,no_interference,no_ipw,no_dsl,no_alpha"
).split(",")
METRICS = [m for m in HEADLINE if m not in ("name", "kind", "fit_seconds")]


def _config() -> PipelineConfig:
    cfg = PipelineConfig()
    cfg.evaluate.ablations = ABLATIONS
    if EPOCHS:
        cfg.train.epochs = int(EPOCHS)
    return cfg


def _throughput(run: Path, cfg: PipelineConfig) -> list[dict]:
    rows = []
    for workers in (1, 2):
        tc = cfg.train.model_copy(
            update={"num_workers": workers, "epochs": THROUGHPUT_EPOCHS, "patience": 10}
        )
        out = RunLayout(run).ablation(f"throughput_w{workers}")
        summary = run_training(run, cfg.model, tc, out)
        rows.append(
            {
                "workers": workers,
                "owned nodes/s (median epoch)": round(summary["owned_nodes_per_s"]),
                f"wall s ({THROUGHPUT_EPOCHS} epochs, incl. start-up)": round(
                    summary["seconds"], 1
                ),
            }
        )
    return rows


def main() -> None:
    init_ray()
    cfg = _config()
    per_seed: list[pd.DataFrame] = []
    throughput: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        for seed in SEEDS:
            t0 = time.perf_counter()
            data, run = Path(tmp) / f"data{seed}", Path(tmp) / f"run{seed}"
            simulate_to_dir(SimulationConfig(n_users=USERS, seed=seed), data)
            cfg_seed = cfg.model_copy(deep=True)
            cfg_seed.train.seed = seed
            report = run_pipeline(data, run, cfg_seed)
            df = pd.DataFrame(report["evaluate"]["rows"])
            df["seed"] = seed
            per_seed.append(df)
            print(f"seed {seed}: {time.perf_counter() - t0:.0f}s")
            print(df[["name", "mise", "mise_gang", "auc"]].to_string(index=False))
            if seed == SEEDS[0]:
                throughput = _throughput(run, cfg_seed)
    all_rows = pd.concat(per_seed)
    agg = all_rows.groupby(["name", "kind"], sort=False)[METRICS].agg(["mean", "std"])
    rows = []
    for (name, kind), r in agg.iterrows():
        row = {"model": name, "kind": kind}
        for m in METRICS:
            mean, sd = r[(m, "mean")], r[(m, "std")]
            row[m] = f"{mean:.4g} ± {0.0 if np.isnan(sd) else sd:.2g}"
        rows.append(row)
    best = agg[("mise", "mean")].idxmin()[0]
    body = (
        f"{USERS:,} simulated users per seed, seeds {SEEDS}; held-out test users (20 %) scored "
        "against `truth.parquet`. MISE: mean integrated squared error of p(default | do(L)) over the "
        "grid 0-50,000; policy at r_max = 0.10 (violation rate: share of users whose true risk at the "
        "decided limit exceeds the ceiling; granted ratio: total granted / oracle; value: mean "
        "margin·L·(1-p) - LGD·L·p); AUC/AP/ECE of the factual prediction. mean ± sd over seeds.\n\n"
        + markdown_table(rows)
        + f"\n\nLowest mean MISE: **{best}**.\n\n### Ray Train throughput (seed {SEEDS[0]})\n\n"
        + markdown_table(throughput)
    )
    write_section("Three-head model vs baselines and ablations", body, "benchmarks/bench_model.py")
    print(body)


if __name__ == "__main__":
    main()
