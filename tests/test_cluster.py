"""Training and scoring on a real two-node Ray cluster (head + worker node on loopback).

The cluster lives in a subprocess (``tests/_two_node.py``): a pytest process holds one Ray
runtime, the session's, and this test must not touch it. Each node has one CPU, so the two 1-CPU
Ray Train workers and the two 1-CPU scoring actors can only run if they spread over both nodes;
the test checks that they did, from the Ray node ids the workers and actors report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("_two_node.py")
TIMEOUT_S = 420


def _run_two_node(work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another runtime
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script shuts its cluster down on SIGTERM
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"two-node run timed out after {TIMEOUT_S}s:\n{err[-4000:]}") from None
    assert proc.returncode == 0, f"two-node run failed ({proc.returncode}):\n{err[-6000:]}"
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"no report on stdout:\n{out[-2000:]}\n{err[-4000:]}"
    return json.loads(lines[-1])


def test_training_and_scoring_use_both_nodes(tmp_path):
    report = _run_two_node(tmp_path)
    nodes = set(report["cluster"])
    assert len(nodes) == 2, report["cluster"]

    # one Ray Train worker (DDP rank) per node, and training ran to the end
    assert len(report["train"]) == 2
    assert set(report["train"]) == nodes
    assert report["train_epochs"] == 2
    assert (tmp_path / "run" / "model" / "model.json").exists()

    # scoring actors on both nodes each scored users; together every user, once
    scored_on = report["score"]
    assert set(scored_on) == nodes
    assert all(n > 0 for n in scored_on.values())
    assert sum(scored_on.values()) == report["users_scored"] == report["n_users"]
    assert {"decisions.parquet", "curves.parquet", "summary.json"} <= set(report["outputs"])
    summary = json.loads((tmp_path / "scores" / "summary.json").read_text())
    assert summary["nodes"] == scored_on
