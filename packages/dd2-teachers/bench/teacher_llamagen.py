"""Benchmark of the LlamaGen teacher: KV-cached AR sampling with CFG, and one teacher-forced pass (not a test).

Random weights at a named size; bf16 on CUDA, fp32 on CPU. Eager and compiled (torch.compile of the decode step,
CUDA graphs on CUDA; torch.compile of the teacher-forced pass). Prints one JSON document on stdout.

    python packages/dd2-teachers/bench/teacher_llamagen.py --size L                  # GPU: the issue's target
    python packages/dd2-teachers/bench/teacher_llamagen.py --size tiny --modes eager  # CPU smoke run, seconds

Target (issue 3): GPT-L, 256 tokens, batch 64, CFG 2.0: <= 0.7 s per batch on one H100/H200.
Timings: median over --repeats after --warmup runs, torch.cuda.synchronize() around each timed call.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from functools import partial

import torch

from dd2_core.logits import SamplingPolicy
from dd2_core.models.llamagen import LLAMAGEN_PRESETS, LlamaGen, LlamaGenConfig
from dd2_core.models.llamagen_vq import LlamaGenVQ, VQConfig
from dd2_teachers.llamagen import LlamaGenTeacher, LlamaGenTeacherConfig

logger = logging.getLogger("bench.teacher_llamagen")

SIZES = {"tiny": "tiny", "B": "GPT-B", "L": "GPT-L", "XL": "GPT-XL", "XXL": "GPT-XXL", "3B": "GPT-3B"}


def gpt_config(size: str, grid: int) -> LlamaGenConfig:
    if size == "tiny":  # 2 layers, width 64, but the real vocabulary so that top-k 8000 costs what it costs
        return LlamaGenConfig(n_layer=2, dim=64, n_head=2, grid=grid, codebook_dim=8)
    return LLAMAGEN_PRESETS[SIZES[size]](grid=grid, codebook_dim=8)


def build_teacher(args, device: torch.device, dtype: torch.dtype, compile: bool) -> LlamaGenTeacher:
    """Random-weight GPT of the chosen size plus a small random VQ (only its 16384 x 8 codebook is used)."""
    gpt = gpt_config(args.size, args.grid)
    vq_cfg = VQConfig(ch=32, z_channels=32, ch_mult=(1, 2))  # decoder not timed; codebook 16384 x 8 as VQ-16
    policy = SamplingPolicy(cfg_scale=args.cfg, top_k=args.top_k, top_p=args.top_p)
    cfg = LlamaGenTeacherConfig(gpt=gpt, vq=vq_cfg, policy=policy, compile=compile)
    torch.manual_seed(0)
    with torch.device(device):
        model, vq = LlamaGen(gpt), LlamaGenVQ(vq_cfg)
    return LlamaGenTeacher(cfg, model.to(dtype), vq.to(dtype))


def timed(fn, *, warmup: int, repeats: int, cuda: bool) -> dict:
    """Median wall time of fn() over `repeats` calls after `warmup` calls (the first warm-up includes compiling)."""
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "times_s": times, "first_call_s": first}


def bench_batch(
    teacher: LlamaGenTeacher, args, batch: int, mode: str, whats: list[str], device: torch.device, cuda: bool
) -> list[dict]:
    """Time sampling and/or the teacher-forced log-probs at one batch size."""
    n = teacher.num_tokens
    labels = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(1)).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    if "sample" in whats:
        logger.info("sample: %s batch %d (%s)", args.size, batch, mode)
        r = timed(partial(teacher.sample, labels, generator=gen), warmup=args.warmup, repeats=args.repeats, cuda=cuda)
        logger.info("  median %.4f s", r["median_s"])
        extra = {"ms_per_token_step": 1e3 * r["median_s"] / n, "images_per_s": batch / r["median_s"]}
        out.append({"what": "sample", "mode": mode, "batch": batch, "tokens": n, **r, **extra})
    if "teacher_forced" in whats:
        ids = torch.randint(0, 16384, (batch, n), generator=torch.Generator().manual_seed(2)).to(device)
        tokens = teacher.embed(ids)  # (B, N, 8) codebook vectors
        logger.info("teacher-forced log_probs: %s batch %d (%s)", args.size, batch, mode)
        r = timed(partial(teacher.log_probs, tokens, labels), warmup=args.warmup, repeats=args.repeats, cuda=cuda)
        logger.info("  median %.4f s", r["median_s"])
        out.append({"what": "teacher_forced_log_probs", "mode": mode, "batch": batch, "tokens": n, **r})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="L", help="GPT size (tiny = 2 x 64, for CPU smoke runs)")
    p.add_argument("--grid", type=int, default=None, help="tokens per side (default 16; 8 for tiny)")
    p.add_argument(
        "--batches", default=None, help="comma-separated batch sizes (CFG doubles the rows); 1,64 (cpu: 1,8)"
    )
    p.add_argument("--modes", default="eager,compiled", help="comma-separated subset of eager,compiled")
    p.add_argument("--what", default="sample,teacher_forced", help="comma-separated subset of sample,teacher_forced")
    p.add_argument("--cfg", type=float, default=2.0, help="CFG scale")
    p.add_argument("--top-k", type=int, default=8000, help="top-k (DD2's LlamaGen setting: 8000)")
    p.add_argument("--top-p", type=float, default=1.0, help="top-p (1.0 = off)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 2; cpu: 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls, the median is reported (default 5; cpu: 3)")
    p.add_argument("--device", default="auto", help="auto = cuda if available, else cpu")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto = bf16 on cuda, fp32 on cpu")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.grid = args.grid or (8 if args.size == "tiny" else 16)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    cuda = device.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype, torch.bfloat16 if cuda else torch.float32)
    args.batches = args.batches or ("1,64" if cuda else "1,8")
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    args.repeats = args.repeats or (5 if cuda else 3)
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    whats = args.what.split(",")

    results, params = [], 0
    for mode in modes:
        teacher = build_teacher(args, device, dtype, compile=mode == "compiled")
        params = sum(p.numel() for p in teacher.model.parameters())
        for batch in batches:
            try:
                results += bench_batch(teacher, args, batch, mode, whats, device, cuda)
            except Exception as e:  # a failing mode (e.g. compile) is a result too; the other modes still run
                logger.exception("%s batch %d failed", mode, batch)
                results.append({"mode": mode, "batch": batch, "error": f"{type(e).__name__}: {e}"})
        teacher.model.clear_cache()
        if cuda:
            torch.cuda.empty_cache()

    report = {
        "bench": "teacher_llamagen",
        "device": torch.cuda.get_device_name(device)
        if cuda
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "size": args.size,
        "params": params,
        "grid": args.grid,
        "policy": {"cfg_scale": args.cfg, "top_k": args.top_k, "top_p": args.top_p},
        "rows_per_image": 2 if args.cfg != 1.0 else 1,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "results": results,
        "target": "GPT-L, 256 tokens, batch 64, CFG 2.0: sample median_s <= 0.7 on one H100/H200",
    }
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
