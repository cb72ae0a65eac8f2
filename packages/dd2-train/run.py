"""Train DD2 at scale: parse arguments, validate the config, run the stage(s).

    deepspeed --num_gpus 8 packages/dd2-train/run.py --config packages/dd2-train/configs/llamagen_l.yaml \
        --set stage=csd --set csd.guidance_updates=2
    torchrun --nproc_per_node 2 packages/dd2-train/run.py --config configs/toy.yaml
    python packages/dd2-train/run.py --config configs/toy.yaml --dry-run     # print the resolved config, exit

Re-running the same command resumes each stage from its latest complete checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dd2_core.clitools import add_debug_flag, run_main
from dd2_train.config import check_config, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML or JSON TrainConfig file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value (repeatable), e.g. --set csd.guidance_updates=2 --set stage=[gts,csd]",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    add_debug_flag(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit code 2 for bad input (config, files, shards, checkpoints), 1 for failures while running; every rank
    prints its one message (dd2_core.clitools); --debug or DD2_DEBUG=1 adds the traceback."""
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))  # launchers set WORLD_SIZE and RANK
    prefix = f"rank {os.environ.get('RANK', '?')}: " if world > 1 else ""

    def body() -> int:
        cfg = load_config(args.config, args.set)
        if args.dry_run:
            print(json.dumps(cfg.model_dump(mode="json"), indent=2))
            return 0
        check_config(cfg, world)  # before any work
        from dd2_train.trainer import train

        train(cfg, local_rank=args.local_rank)
        return 0

    return run_main("dd2-train", body, debug=args.debug, prefix=prefix)


if __name__ == "__main__":
    sys.exit(main())
