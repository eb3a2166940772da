"""The Ray-native deployment paths as an operator uses them: a Ray Job submitted to a running head,
`serve deploy` of the shipped Serve config, and `creditgraph serve` stopped by SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from creditgraph.utils.runtime import agent_port_flags, stop_session

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TOKEN = "deploy-test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout: float = 120.0, headers: dict | None = None) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(url, headers=headers, timeout=5)
            if r.status_code == 200:
                return r
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout}s")
        time.sleep(1.0)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head started with `ray start` (dashboard on: the Jobs and Serve REST endpoint)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "CREDITGRAPH_API_TOKEN": TOKEN}
    port, dash = _free_port(), _free_port()
    tmp = tmp_path_factory.mktemp("head")
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2"]
    cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
    cmd += [f"--temp-dir={tmp}", "--disable-usage-stats", *agent_port_flags()]
    started = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, cwd=ROOT)
    headers = None
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    on = "Token authentication is enabled" in started.stdout + started.stderr
    if on or env.get("RAY_AUTH_MODE") == "token":
        # `ray start` turns token auth on when a token exists (~/.ray/auth_token): the operator's
        # CLI calls and HTTP requests then carry it
        env["RAY_AUTH_MODE"] = "token"
        headers = {"Authorization": f"Bearer {token.read_text().strip()}"}
    try:
        _wait(f"http://127.0.0.1:{dash}/api/version", timeout=120, headers=headers)
        yield {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        # only this head: `ray stop` would also kill the test session's own runtime
        stop_session({"session_dir": str(tmp), "address": f"127.0.0.1:{port}"})


def test_ray_job_submit_runs_the_pipeline_entry_point(head, sim_data, tmp_path):
    run = tmp_path / "run"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["dashboard"], "--no-wait", "--"]
    cmd += [sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--data", str(sim_data)]
    cmd += ["--out", str(run), "--stop-after", "partition"]
    deadline = time.monotonic() + 180
    while True:  # right after `ray start` the job agent may not be up yet: Ray says to retry
        out = subprocess.run(
            cmd, env=head["env"], capture_output=True, text=True, cwd=ROOT, timeout=300
        )
        if "No available agent" not in out.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert out.returncode == 0, out.stderr[-3000:]
    job = re.search(r"raysubmit_[A-Za-z0-9]+", out.stdout + out.stderr).group(0)  # no colours
    status = [str(BIN / "ray"), "job", "status", "--address", head["dashboard"], job]
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        done = subprocess.run(status, env=head["env"], capture_output=True, text=True)
        text = done.stdout + done.stderr  # Ray's CLI logger writes the status line to stderr
        # "Job '...' succeeded" / "failed" / "was stopped"; "Status for job ...: RUNNING"
        if any(w in text.lower() for w in ("succeeded", "failed", "was stopped")):
            break
        time.sleep(3)
    shown = subprocess.run(
        [str(BIN / "ray"), "job", "logs", "--address", head["dashboard"], job],
        env=head["env"],
        capture_output=True,
        text=True,
    )
    logs = shown.stdout + shown.stderr
    assert "succeeded" in text.lower(), logs[-3000:]
    assert (run / "graph" / "manifest.json").exists() and (
        run / "shards" / "manifest.json"
    ).exists()
    assert not (run / "pretrain").exists()  # --stop-after partition was honoured


def test_serve_deploy_of_the_shipped_config_serves_decisions(head, trained_run, scored, tmp_path):
    _, summary, registry = scored
    shipped = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    app = shipped["applications"][0]
    app["args"]["run_dir"] = str(trained_run)
    app["args"]["snapshots"] = str(registry)
    http = _free_port()
    shipped["http_options"] = {**shipped["http_options"], "host": "127.0.0.1", "port": http}
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(shipped))
    cmd = [str(BIN / "serve"), "deploy", str(config), "--address", head["dashboard"]]
    out = subprocess.run(
        cmd, env=head["env"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    url = f"http://127.0.0.1:{http}"
    _wait(f"{url}/healthz", timeout=300)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (
        httpx.post(f"{url}/v1/decisions", json={"user_id": 10000000}, timeout=30).status_code == 401
    )
    r = httpx.post(f"{url}/v1/decisions", json={"user_id": 10000000}, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["snapshot"] == summary["snapshot"]
    subprocess.run(
        [str(BIN / "serve"), "shutdown", "-y", "--address", head["dashboard"]],
        env=head["env"],
        capture_output=True,
    )


def test_creditgraph_serve_drains_and_exits_0_on_sigterm(trained_run, scored, tmp_path):
    _, _, registry = scored
    port = _free_port()
    env = {**os.environ, "CREDITGRAPH_API_TOKEN": TOKEN, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(BIN / "creditgraph"), "serve", "--run", str(trained_run), "--snapshots",
             str(registry), "--port", str(port)],
            env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(f"{url}/healthz", timeout=300)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = httpx.post(f"{url}/v1/decisions", json={"user_id": 10000000}, headers=auth, timeout=60)
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "Traceback" not in text and "draining" in text


def test_serve_refuses_to_start_without_a_token(trained_run, scored, tmp_path):
    _, _, registry = scored
    env = {k: v for k, v in os.environ.items() if "CREDITGRAPH_" not in k}
    out = subprocess.run(
        [str(BIN / "creditgraph"), "serve", "--run", str(trained_run), "--snapshots", str(registry)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (
        out.returncode == 2 and "CREDITGRAPH_API_TOKEN" in out.stderr and "--insecure" in out.stderr
    )
