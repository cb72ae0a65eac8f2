"""Inception feature extraction speed: seconds per 1,000 images (pool3 + sFID features), as `dd2-eval metrics` does it.

    python packages/dd2-eval/bench/inception_speed.py --images 1000 --device cuda --out inception_speed.json

Random uint8 256 x 256 images (the ADM sample size; content does not change the cost) go through the same
InceptionExtractor as the metrics: TF1 bilinear resize to 299, fp32, TF32 off. One warm-up batch is not timed; the
device is synchronised before the clock stops. Prints a line and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dd2_core.checkpoint import atomic_write_bytes
from dd2_eval.inception import InceptionExtractor, load_inception


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="images timed (default 1000)")
    p.add_argument("--batch", type=int, default=64, help="extractor batch size (default 64, as the metrics)")
    p.add_argument("--size", type=int, default=256, help="image side (default 256)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-spatial", action="store_true", help="pool3 only (no sFID features)")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = p.parse_args(argv)
    if args.images < 1 or args.batch < 1:
        p.error(f"--images and --batch must be >= 1, got {args.images} and {args.batch}")
    device = torch.device(args.device)
    ext = InceptionExtractor(load_inception(device=device), batch_size=args.batch, spatial=not args.no_spatial)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, args.size, args.size, 3), dtype=torch.uint8, generator=g)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    ext(images[: args.batch])  # warm-up (cuDNN autotuning, allocator)
    sync()
    tic = time.perf_counter()
    n = 0
    for start in range(0, args.images, args.batch):
        out = ext(images[start : start + args.batch])
        n += out.pool3.shape[0]
    sync()
    seconds = time.perf_counter() - tic
    result = {
        "images": n,
        "seconds": seconds,
        "seconds_per_1000": seconds * 1000 / n,
        "images_per_s": n / seconds,
        "batch": args.batch,
        "size": args.size,
        "spatial": not args.no_spatial,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    print(f"inception: {result['seconds_per_1000']:.2f} s per 1,000 images ({result['images_per_s']:.1f} img/s) "
          f"on {result['device']}")  # fmt: skip
    if args.out is not None:
        atomic_write_bytes(args.out, (json.dumps(result, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
