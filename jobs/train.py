"""Ray Job entry point: training with Ray Train on the cluster's workers.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/train.py --run /shared/runs/r1 [--config pipeline.yaml] [--workers 4]

The options are those of `creditgraph train` (this script runs that command). Inside a Ray Job
``RAY_ADDRESS`` is set, so the work runs on the job's cluster.
"""

from __future__ import annotations

import sys

from creditgraph.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["train", *(sys.argv[1:] if argv is None else argv)], prog_name="jobs/train.py")


if __name__ == "__main__":
    main()
