"""The corpus of bad inputs: how many defects ``tests/test_corpus.py`` tries and how each is handled.

Runs the corpus module with pytest in a child process (one Ray runtime, one tiny trained run; a
few minutes on two cores) and writes its tally into BENCHMARKS.md: "N defects tried: E refused
with a clear error, W accepted with a named warning, 0 silent", and what ``creditgraph validate``
and batch scoring did with each defect. Nothing is written if a corpus test fails.

``BENCH_CORPUS_TALLY=path``: report the tally a finished run of the module left there
(``CREDITGRAPH_CORPUS_TALLY=path pytest tests/test_corpus.py``) instead of running it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._report import ROOT, markdown_table, write_section

MODULE = "tests/test_corpus.py"


def _run_corpus(tally: Path) -> float:
    """Run the corpus module; its wall time in seconds (raises if a test failed)."""
    env = {**os.environ, "CREDITGRAPH_CORPUS_TALLY": str(tally)}
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", MODULE, "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    print(res.stdout[-3000:])
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{MODULE} failed (exit {res.returncode}): nothing written")
    return seconds


def main() -> None:
    given = os.environ.get("BENCH_CORPUS_TALLY")
    seconds: float | None = None
    if given:
        tally = json.loads(Path(given).read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tally.json"
            seconds = _run_corpus(path)
            tally = json.loads(path.read_text())
    if tally.get("partial") or tally.get("silent"):
        raise SystemExit(f"the corpus run is incomplete or has silent defects: {tally['line']}")
    rows = [
        {"defect": name, "validate": stages["validate"], "scoring": stages.get("score", "-")}
        for name, stages in tally["seen"].items()
    ]
    took = f", {seconds:.0f} s in all" if seconds is not None else ""
    if tally.get("seconds") is not None:
        took = f" ({tally['seconds']:.0f} s, training the tiny run included{took})"
    body = "\n".join(
        [
            f"**{tally['line']}.**",
            "",
            f"`{MODULE}`{took}: each defect corrupts a copy of a 400-user simulated dataset and "
            "goes through `creditgraph validate` (exit 2 with a one-line error naming file and "
            "column, or exit 0 with a warning naming the column) and batch scoring on a tiny "
            "trained run (refused before anything is written, the run folder unchanged; three "
            "warning cases scored end to end). `-`: not scored, where scoring does not read "
            "the table (truth) or where a warning case is not scored end to end.",
            "",
            markdown_table(rows),
        ]
    )
    path = write_section("Corpus of bad inputs", body, "benchmarks/bench_corpus.py")
    print(f"{tally['line']} -> {path}")


if __name__ == "__main__":
    main()
