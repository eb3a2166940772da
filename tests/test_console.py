"""What a user sees on the console: stages, progress and results, never Ray's noise.

A small pipeline runs through the CLI in subprocesses, as a user runs it: ``creditgraph up`` (a
persistent local Ray head), ``run`` on a 2,000-user simulated dataset with a small model (hidden
16, 2 epochs, 1 worker) and ``score``, both joining that head, then ``down``. Their console
output must hold no traceback and none of the messages that alarmed users before; the details
are in the run's log file instead.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

#: messages that reached users' consoles before (Ray's internals), never to be seen again
NOISE = [
    "Traceback (most recent call last)",
    "UnlockSlow",
    "mutex.cc",
    "SIGABRT",
    "Fatal Python error",
    "Failed to query Ray Train Controller",
    "maximum expected startup concurrency",
    "does not have any available CPUs",
    "ReferenceCountingAssertionError",
    "constructor arguments in the object store",
    "Token authentication is enabled",
    "Progress bars disabled",
]
HEAVY = ("torch", "ray", "econml", "lightgbm", "sklearn")


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("creditgraph")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "creditgraph.cli"]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(CREDITGRAPH_HOME=str(home), RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def cg(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``creditgraph ARGS``; stdout and stderr together, as a terminal shows them."""
    return subprocess.run(
        [*_cli(), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def assert_clean(out: str, what: str) -> None:
    found = [n for n in NOISE if n in out]
    assert not found, f"{what} printed {found}:\n{out[-4000:]}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    env = _env(root / "home")
    data = root / "data"
    res = cg("simulate", "--users", 2000, "--seed", 3, "--out", data, env=env)
    assert res.returncode == 0, res.stdout
    assert_clean(res.stdout, "simulate")
    return data


@pytest.fixture(scope="module")
def pipeline(dataset, tmp_path_factory):
    """up -> run -> score -> down through the CLI: {step: CompletedProcess} and the folders."""
    root = dataset.parent
    home = root / "home"
    # Ray's session folder holds unix sockets: keep its path short
    ray_tmp = Path(tempfile.mkdtemp(prefix="cg-", dir="/tmp"))
    env = _env(home)
    cfg = root / "small.yaml"
    cfg.write_text(
        "model: {hidden: 16, heads: 2, mc_dropout_samples: 3}\ntrain: {epochs: 2, num_workers: 1}\n"
    )
    run, scores = root / "run", root / "scores"
    steps: dict[str, subprocess.CompletedProcess] = {}
    try:
        steps["up"] = cg("up", "--temp-dir", ray_tmp, env=env)
        head = json.loads((home / "ray.json").read_text()) if steps["up"].returncode == 0 else {}
        steps["run"] = cg("run", "--data", dataset, "--out", run, "--config", cfg, env=env)
        steps["score"] = cg("score", "--run", run, "--data", dataset, "--out", scores, env=env)
    finally:
        steps["down"] = cg("down", env=env, timeout=120)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"steps": steps, "run": run, "scores": scores, "home": home, "head": head}


@pytest.mark.slow
def test_pipeline_console_is_clean(pipeline):
    for name, res in pipeline["steps"].items():
        assert res.returncode == 0, f"creditgraph {name} failed:\n{res.stdout[-4000:]}"
        assert_clean(res.stdout, f"creditgraph {name}")
    run_out = pipeline["steps"]["run"].stdout
    # the console shows the stages and the results
    for stage in ("build", "partition", "pretrain", "train", "evaluate"):
        assert f"stage {stage}: ran in" in run_out, run_out[-3000:]
    assert "held-out evaluation" in run_out and "| creditgraph" in run_out
    summary = json.loads(
        pipeline["steps"]["score"].stdout[pipeline["steps"]["score"].stdout.index("{") :]
    )
    assert summary["users_scored"] == 2000


@pytest.mark.slow
def test_pipeline_details_go_to_the_run_log(pipeline):
    log = pipeline["run"] / "logs" / "creditgraph.log"
    text = log.read_text()
    assert "stage train: running" in text
    # the commands joined the head `creditgraph up` started instead of starting their own
    assert f"joining the head of `creditgraph up` at {pipeline['head']['address']}" in text
    # Ray's own logs: a link into the head's session folder (removed with the head since)
    link = pipeline["run"] / "logs" / "ray-session"
    assert link.is_symlink() and Path(os.readlink(link)).parent.name.startswith("session_")
    # Ray's own Python log lines are in the file, not on the console
    assert "Connecting to existing Ray cluster" in text
    assert "Connecting to existing Ray cluster" not in pipeline["steps"]["run"].stdout


@pytest.mark.slow
def test_down_stops_the_head(pipeline):
    import psutil

    head = pipeline["head"]
    assert head.get("address") and head.get("gcs_pid")
    assert "stopped the Ray head" in pipeline["steps"]["down"].stdout
    assert not (pipeline["home"] / "ray.json").exists()
    assert not psutil.pid_exists(head["gcs_pid"]) or psutil.Process(head["gcs_pid"]).status() in (
        psutil.STATUS_ZOMBIE,
        psutil.STATUS_DEAD,
    )


def test_validate_starts_no_ray_and_imports_no_heavy_modules(dataset, tmp_path):
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from creditgraph.cli import app\n"
        f"res = CliRunner().invoke(app, ['validate', {str(dataset)!r}])\n"
        f"print(json.dumps([res.exit_code, [m for m in {HEAVY!r} if m in sys.modules]]))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    exit_code, loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert exit_code == 0, res.stderr
    assert loaded == []


def test_ray_that_cannot_start_in_time_is_one_line_and_exit_2(tmp_path):
    res = cg(
        "score",
        "--run",
        tmp_path / "run",
        "--data",
        tmp_path / "data",
        "--out",
        tmp_path / "out",
        env=_env(tmp_path / "home", CREDITGRAPH_RAY_START_TIMEOUT="0.01"),
        timeout=300,
    )
    assert res.returncode == 2, res.stdout
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, res.stdout
    assert "did not start within 0.01 s" in lines[0] and "creditgraph up" in lines[0]
    assert_clean(res.stdout, "a Ray start that timed out")


def test_a_stale_head_record_is_ignored_with_one_note(tmp_path, monkeypatch):
    from creditgraph.utils import runtime

    monkeypatch.setenv(runtime.HOME_ENV, str(tmp_path))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runtime.head_file().write_text(json.dumps({"address": f"127.0.0.1:{port}", "gcs_pid": None}))
    notes: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: notes.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("creditgraph")
    logger.addHandler(handler)
    try:
        assert runtime.local_head() is None
    finally:
        logger.removeHandler(handler)
    assert not runtime.head_file().exists()
    assert len(notes) == 1 and "ignoring" in notes[0] and str(port) in notes[0]
    assert runtime.local_head() is None  # and nothing more to say


def test_messages_ray_pushes_to_the_driver_go_to_the_log_file(tmp_path, capsys):
    import ray._private.worker as ray_worker

    from creditgraph.utils import logs

    logs.set_log_file(tmp_path / "creditgraph.log")
    logs.route_ray_logs()
    pool = (
        "WARNING: 9 PYTHON worker processes have been started on node: x with address: y, "
        "which is 4x the maximum expected startup concurrency (2)."
    )
    ray_worker.print_to_stdstream({"lines": [pool], "pid": "raylet", "is_err": False}, False)
    console = capsys.readouterr()
    assert "startup concurrency" not in console.out + console.err
    other = "A worker died or was killed while executing a task by an unexpected system error."
    ray_worker.print_to_stdstream({"lines": [other], "pid": "raylet", "is_err": False}, False)
    console = capsys.readouterr()
    shown = console.out + console.err
    assert shown.count("ray: A worker died") == 1 and "details in" in shown
    text = (tmp_path / "creditgraph.log").read_text()
    assert "startup concurrency" in text and "worker died" in text


def test_ray_native_log_lines_leave_the_console_for_the_log_file(tmp_path):
    code = (
        "import os, sys\n"
        "from creditgraph.utils import logs\n"
        f"logs.set_log_file({str(tmp_path / 'c.log')!r})\n"
        "logs.filter_native_stderr()\n"
        'os.write(2, b"[2026-01-02 03:04:05,678 E 1 2] core_worker.cc:2465: Actor with class '
        "name: 'X' has constructor arguments in the object store\\n\")\n"
        "sys.stderr.write('\\rbar 1/2'); sys.stderr.flush()\n"
        "sys.stderr.write('\\rbar 2/2\\n')\n"
        "os.write(2, b'[2026-01-02 03:04:05,678 F 1 2] logging.cc:1: a fatal error\\n')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    err = res.stderr.decode()  # bytes: universal newlines would turn \r into \n
    assert res.returncode == 0, err
    assert "constructor arguments" not in err
    assert "\rbar 1/2\rbar 2/2\n" in err  # progress bars pass unchanged
    assert "a fatal error" in err  # a fatal line still shows
    assert "constructor arguments in the object store" in (tmp_path / "c.log").read_text()


def test_ray_that_fails_to_start_is_one_line_and_exit_2(tmp_path):
    # what Ray raises on a loaded machine: a bare Exception from its node start-up
    code = (
        "import ray\n"
        "def init(*a, **k):\n"
        "    raise Exception('The current node timed out during startup. This could happen "
        "because some of the raylet failed to startup or the GCS has become overloaded.')\n"
        "ray.init = init\n"
        "from typer.testing import CliRunner\n"
        "from creditgraph.cli import app\n"
        f"res = CliRunner().invoke(app, ['score', '--run', {str(tmp_path)!r}, '--data', "
        f"{str(tmp_path)!r}, '--out', {str(tmp_path / 'o')!r}])\n"
        "print(res.exit_code)\n"
        "print(res.output)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    code_line, *output = res.stdout.strip().splitlines()
    assert code_line == "2", res.stdout + res.stderr
    text = " ".join(line.strip() for line in output)
    assert "could not start or join Ray" in text and "creditgraph up" in text
    assert "Traceback" not in res.stdout + res.stderr
