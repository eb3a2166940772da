"""Ray Job entry point: the causal pretraining stage (per-feature DML as Ray tasks on the cluster).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/pretrain.py --run /shared/runs/r1 [--config pipeline.yaml]

The options are those of `creditgraph pretrain` (this script runs that command). Inside a Ray Job
``RAY_ADDRESS`` is set, so the work runs on the job's cluster.
"""

from __future__ import annotations

import sys

from creditgraph.cli import app


def main(argv: list[str] | None = None) -> None:
    app(["pretrain", *(sys.argv[1:] if argv is None else argv)], prog_name="jobs/pretrain.py")


if __name__ == "__main__":
    main()
