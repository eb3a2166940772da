"""Ray Job entry point: train the model on an existing run folder.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/train.py --run /shared/runs/r1 [--config pipeline.yaml] [--workers 4]
"""

from __future__ import annotations

import argparse
import json

from creditgraph.config import PipelineConfig
from creditgraph.train.trainer import run_training
from creditgraph.utils.runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="run directory on shared storage")
    parser.add_argument("--config", default=None, help="pipeline.yaml")
    parser.add_argument("--workers", type=int, default=None, help="Ray Train workers")
    args = parser.parse_args()
    cfg = PipelineConfig.load(args.config)
    train_cfg = (
        cfg.train
        if args.workers is None
        else cfg.train.model_copy(update={"num_workers": args.workers})
    )
    init_ray()  # inside `ray job submit` this joins the job's cluster
    print(json.dumps(run_training(args.run, cfg.model, train_cfg), indent=2))


if __name__ == "__main__":
    main()
