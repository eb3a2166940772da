"""Ray Job entry point: the whole pipeline (build, partition, pretrain, train, evaluate).

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/pipeline.py --data /shared/data/d1 --run /shared/runs/r1 [--config pipeline.yaml]
"""

from __future__ import annotations

import argparse
import json

from creditgraph.config import PipelineConfig
from creditgraph.pipeline import run_pipeline
from creditgraph.utils.runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="dataset directory (shared storage)")
    parser.add_argument("--run", required=True, help="run directory (shared storage)")
    parser.add_argument("--config", default=None, help="pipeline.yaml")
    parser.add_argument("--stop-after", default=None, help="last stage to run")
    args = parser.parse_args()
    init_ray()  # inside `ray job submit` this joins the job's cluster
    report = run_pipeline(
        args.data, args.run, PipelineConfig.load(args.config), stop_after=args.stop_after
    )
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
