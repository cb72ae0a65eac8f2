"""Benchmark of the VAR teacher (not a test): KV-cached next-scale sampler and one teacher-forced pass.

Random weights at a released size (timing does not depend on the values). Prints one JSON object per measurement
(device, dtype, batch, torch version, median seconds after warm-up, CUDA synchronised around every timed call).

    python packages/dd2-teachers/bench/teacher_var.py --depth 16 --batches 1 64          # bf16 on GPU
    python packages/dd2-teachers/bench/teacher_var.py --tiny --iters 2                  # seconds on CPU (fp32)

Modes: eager; compiled (torch.compile of the scale step and of the teacher-forced pass).

Measured:
    sample      AR sampler with the policy (CFG on 2B rows, top-k, top-p), ids only
    decode      VQVAE decode of f_hat to images (float32)
    forward     one teacher-forced pass over 2B rows (cond + null) -> logits
    log_probs   the same pass plus the policy (CFG ramp, top-k, top-p, log-softmax)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from dd2_core.models.var import VAR, VARConfig
from dd2_core.models.var_vqvae import VARVQVAE, VARVQVAEConfig
from dd2_teachers.var import VAR_POLICY, VARTeacher

logger = logging.getLogger("bench.teacher_var")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # CPU-GPU sync point: time the work, not the launch


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """(median seconds over `iters` calls, seconds of the first warm-up call)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[VAR, VARVQVAE]:
    if args.tiny:
        pn = (1, 2, 3, 4)
        var_cfg = VARConfig(
            depth=2, embed_dim=128, num_heads=2, num_classes=10, vocab_size=64, token_dim=8, patch_nums=pn
        )
        vq_cfg = VARVQVAEConfig(vocab_size=64, token_dim=8, ch=32, patch_nums=pn)
    else:
        var_cfg, vq_cfg = VARConfig(depth=args.depth), VARVQVAEConfig()
    with torch.device(device):
        var, vqvae = VAR(var_cfg), VARVQVAE(vq_cfg)
    return var.to(dtype).eval(), vqvae.eval()


def workloads(teacher: VARTeacher, labels: Tensor) -> dict[str, Callable[[], object]]:
    """The timed calls at one batch size (inputs prepared once, outside the timing)."""
    gen = torch.Generator(device=labels.device).manual_seed(0)
    with torch.no_grad():
        tokens = teacher.embed(teacher.sample(labels, generator=gen))  # (B, N, Cvae)
        f_hat = teacher.vqvae.f_hat(tokens)  # (B, Cvae, H, H)
    return {
        "sample": lambda: teacher.sample(labels, generator=gen),
        "decode": lambda: teacher.vqvae.decode_fhat(f_hat),
        "forward": lambda: teacher.logits(tokens, labels),
        "log_probs": lambda: teacher.log_probs(tokens, labels),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=16, help="VAR depth (16, 20, 24, 30); ignored with --tiny")
    p.add_argument("--tiny", action="store_true", help="depth-2 model, 4 scales, small VQVAE (CPU smoke run)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="batch sizes (images, before CFG doubling)")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 on GPU, float32 on CPU"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compiled mode: at least 3)")
    p.add_argument("--iters", type=int, default=5, help="timed calls; the median is reported")
    p.add_argument("--skip", nargs="*", default=[], choices=["sample", "decode", "forward", "log_probs"])
    p.add_argument("--out", default=None, help="also write all records as a JSON list to this file")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    device = torch.device(args.device)
    dtype = (
        torch.bfloat16
        if (args.dtype or ("bfloat16" if device.type == "cuda" else "float32")) == "bfloat16"
        else torch.float32
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    var, vqvae = build(args, device, dtype)
    base = {
        "model": f"VAR-d{var.cfg.depth}" + (" tiny" if args.tiny else ""),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "tokens": var.cfg.num_tokens,
        "policy": VAR_POLICY.model_dump(),
    }
    records = []

    def report(**fields) -> None:
        rec = base | fields
        records.append(rec)
        print(json.dumps(rec), flush=True)

    for mode in args.modes:
        teacher = VARTeacher(var, vqvae, policy=VAR_POLICY, compile=mode == "compiled")
        warmup = max(args.warmup, 3) if mode != "eager" else args.warmup
        for b in args.batches:
            labels = torch.randint(0, var.cfg.num_classes, (b,), device=device)
            for what, fn in workloads(teacher, labels).items():
                if what in args.skip or (what == "decode" and mode != "eager"):
                    continue
                with torch.no_grad():
                    med, first = timed(fn, device, warmup, args.iters)
                report(what=what, mode=mode, batch=b, median_s=med, first_call_s=first, iters=args.iters)
    if device.type == "cuda":
        report(what="peak_memory", peak_gib=torch.cuda.max_memory_allocated(device) / 2**30)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
