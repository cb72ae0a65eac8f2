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

from dd2_train.config import ConfigError, check_config, load_config


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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.dry_run:
            print(json.dumps(cfg.model_dump(mode="json"), indent=2))
            return 0
        check_config(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # before any work (launchers set WORLD_SIZE)
        from dd2_train.trainer import train

        train(cfg, local_rank=args.local_rank)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
