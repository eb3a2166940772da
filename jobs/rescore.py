"""Ray Job entry point: batch rescoring of users with a trained run.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/rescore.py --run /shared/runs/r1 --data /shared/data/today --out /shared/scores/today
"""

from __future__ import annotations

import argparse
import json

from creditgraph.config import PipelineConfig
from creditgraph.serving.score import score_users
from creditgraph.utils.runtime import init_ray


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="training run directory (shared storage)")
    parser.add_argument("--data", required=True, help="dataset directory of the users to score")
    parser.add_argument("--out", required=True, help="output directory, written atomically")
    parser.add_argument("--config", default=None, help="pipeline.yaml (policy section)")
    parser.add_argument(
        "--store", default=None, help="embedding store URI (default: RUN/store.sqlite)"
    )
    parser.add_argument("--rules", default=None, help="guardrail rule set directory")
    parser.add_argument("--r-max", type=float, default=None)
    parser.add_argument("--max-actors", type=int, default=4)
    parser.add_argument("--skip-unknown", action="store_true")
    args = parser.parse_args()
    init_ray()
    summary = score_users(
        args.run,
        args.data,
        args.out,
        PipelineConfig.load(args.config),
        r_max=args.r_max,
        store_uri=args.store,
        rules_dir=args.rules,
        skip_unknown=args.skip_unknown,
        max_actors=args.max_actors,
    )
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
