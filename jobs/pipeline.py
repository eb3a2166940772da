"""Ray Job entry point: the whole pipeline (build, partition, pretrain, train, ablations, evaluate).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/pipeline.py --data /shared/data/d1 --out /shared/runs/r1 [--config pipeline.yaml]

The options are those of `creditgraph run` (this script runs that command). Inside a Ray Job
``RAY_ADDRESS`` is set, so the work runs on the job's cluster.
"""

from __future__ import annotations

import sys

from creditgraph.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["run", *(sys.argv[1:] if argv is None else argv)], prog_name="jobs/pipeline.py")


if __name__ == "__main__":
    main()
