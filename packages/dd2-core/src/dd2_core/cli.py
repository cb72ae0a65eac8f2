"""The `dd2` command (dd2-core only): sample images from an exported pipeline folder.

dd2 sample --pipeline runs/demo/export --classes 0,1,2 --per-class 8 --seed 0 --out grid.png
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import time
from pathlib import Path

import torch

from dd2_core.checkpoint import atomic_write_bytes
from dd2_core.clitools import add_debug_flag, class_ids, device_name, positive_int, run_main, seed_int
from dd2_core.errors import DD2ValueError

logger = logging.getLogger(__name__)


def image_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """Tile uint8 images (B, H, W, 3) into a (rows*H, cols*W, 3) grid, row-major; B must be rows * cols."""
    b, h, w, c = images.shape
    cols = b // rows
    if rows * cols != b:
        raise ValueError(f"image_grid: {b} images do not fill {rows} rows")
    return images.view(rows, cols, h, w, c).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_png(array: torch.Tensor, path: str | Path) -> None:
    """Atomically write a uint8 (H, W, 3) tensor as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array.cpu().numpy()).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _check_classes(classes: tuple[int, ...], num_classes: int) -> list[int]:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise DD2ValueError(f"--classes: expected ids in [0, {num_classes - 1}] (this pipeline's classes), got {bad}")
    return list(classes)


def cmd_sample(args: argparse.Namespace) -> int:
    from dd2_core.fast import FastPathConfig
    from dd2_core.pipeline import OneStepPipeline

    device = args.device if args.device not in (None, "auto") else ("cuda" if torch.cuda.is_available() else "cpu")
    fast = FastPathConfig.for_device(device, backend=args.compile_backend) if args.fast else False
    pipe = OneStepPipeline.from_pretrained(args.pipeline, device=device, fast=fast)
    if pipe.decoder is None:
        raise DD2ValueError(
            f"--pipeline {args.pipeline}: this pipeline has no image decoder (decoder = 'none'); nothing to draw"
        )
    classes = _check_classes(args.classes, pipe.num_classes) if args.classes else list(range(min(pipe.num_classes, 10)))
    labels = torch.tensor(classes, device=device).repeat_interleave(args.per_class)
    tic = time.perf_counter()
    out = pipe(labels, seed=args.seed)
    seconds = time.perf_counter() - tic
    if args.out_dir is not None:  # one grid per class: class_<id>.png, rows of 8 when per_class is a multiple of 8
        rows = args.per_class // 8 if args.per_class % 8 == 0 else 1
        written = []
        for j, c in enumerate(classes):
            images = out.images[j * args.per_class : (j + 1) * args.per_class]
            path = args.out_dir / f"class_{c:04d}.png"
            save_png(image_grid(images, rows=rows), path)
            written.append(str(path))
        target = str(args.out_dir)
    else:
        save_png(image_grid(out.images, rows=len(classes)), args.out)
        written, target = [str(args.out)], str(args.out)
    summary = {"out": target, "files": written, "classes": classes, "images": int(labels.numel()),
               "seconds": seconds, "device": str(device), "fast": bool(args.fast)}  # fmt: skip
    print(json.dumps(summary) if args.json else f"wrote {target}: {labels.numel()} images in {seconds:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dd2", description="Distilled Decoding 2: one-step image generation")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample", help="sample a PNG grid (one row per class) from a pipeline folder",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--pipeline", required=True, type=Path, help="pipeline folder written by export")
    p.add_argument("--classes", type=class_ids, default=(), help="comma-separated class ids (default: the first 10)")
    p.add_argument("--per-class", type=positive_int, default=8, help="images per class (grid columns)")
    p.add_argument("--seed", type=seed_int, default=0, help="noise seed")
    p.add_argument("--out", type=Path, default=Path("grid.png"), help="output PNG (one row per class)")
    p.add_argument("--out-dir", type=Path, default=None, help="instead: one PNG grid per class, DIR/class_<id>.png")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--fast", action="store_true",
                   help="fast path: torch.compile of generator and decoder; on CUDA also bf16 autocast and CUDA graphs "
                   "(dd2_core.fast); the first call compiles")  # fmt: skip
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --fast")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_debug_flag(p)
    p.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return run_main("dd2", lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
