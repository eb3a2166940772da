"""Ray Job entry point: batch rescoring with Ray Data and a new snapshot.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/rescore.py --run /shared/runs/r1 --data /shared/data/today --out /shared/scores/today [--promote]

The options are those of `creditgraph score` (this script runs that command). Inside a Ray Job
``RAY_ADDRESS`` is set, so the work runs on the job's cluster.
"""

from __future__ import annotations

import sys

from creditgraph.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["score", *(sys.argv[1:] if argv is None else argv)], prog_name="jobs/rescore.py")


if __name__ == "__main__":
    main()
