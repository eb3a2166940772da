"""Ray Job entry point for the causal pretraining stage.

    ray job submit --working-dir . -- python jobs/pretrain.py --run RUN [--config pipeline.yaml]

Inside a Ray Job ``RAY_ADDRESS`` is set, so the per-feature DML tasks run on the cluster.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory with a built graph")
    parser.add_argument("--config", default=None, help="pipeline.yaml")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS)")
    parser.add_argument("--reuse", action="store_true", help="keep a matching existing output")
    args = parser.parse_args(argv)

    from creditgraph.causal.pretrain import run_pretrain
    from creditgraph.config import PipelineConfig

    cfg = PipelineConfig.load(args.config)
    summary = run_pretrain(args.run, cfg.pretrain, reuse=args.reuse, address=args.address)
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
