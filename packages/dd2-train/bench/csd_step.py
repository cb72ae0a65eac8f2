"""Benchmark one LlamaGen-L-sized CSD step on one GPU: random weights, DeepSpeed ZeRO-2, bf16, largest batch.

The networks are the real ones at LlamaGen-L size (GPT-L teacher with its continuous-input MLP, VQ-16 codebook of
16384 x 8, generator and guidance = LlamaGenBackbone-L + a 3 x 1024 velocity head), driven by the same step functions
and DeepSpeed engine wrapper as training (dd2_train.steps, dd2_train.engine). A CSD round is K guidance updates and one
generator update (DD2 Alg. 1). The micro-batch is the largest of --batches that runs without running out of memory.

    deepspeed --num_gpus 1 packages/dd2-train/bench/csd_step.py --out csd_step.json
    python packages/dd2-train/bench/csd_step.py --batches 192 --compile --profile prof/   # as deepspeed.compile
    python packages/dd2-train/bench/csd_step.py --tiny          # CPU smoke test of the script itself

Prints one JSON object: device, dtype, batch, seconds per guidance/generator step and per round, samples/s (generator
samples per second of full rounds), peak memory, FLOPs per step counted by torch.utils.flop_counter (matmuls and
attention: forward, backward, the teacher's two CFG passes; counted on the eager modules before any compilation), and
MFU = counted FLOP/s over the GPU's dense bf16 peak. `--compile` applies the trainer's regional compilation
(dd2_train.engine.compile_regions) to generator, guidance and teacher and reports the compile time; `--profile DIR`
writes torch.profiler tables (ops by self device time) of one guidance and one generator step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from dd2_core.diffusion import ARDiffusion
from dd2_core.generator import OneStepGenerator
from dd2_core.heads import HeadConfig, VelocityHead
from dd2_core.models.llamagen import LlamaGen, LlamaGenBackbone
from dd2_core.models.llamagen_vq import LlamaGenVQ
from dd2_teachers.llamagen import LlamaGenTeacher, llamagen_teacher_config
from dd2_train import engine as eng
from dd2_train.steps import CSDConfig, generator_step, guidance_step

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A800": 312e12}  # dense, no sparsity


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def build(size: str, head_width: int, head_depth: int, device: torch.device, tiny: bool):
    """Teacher (frozen, bf16 transformer on GPU), generator and guidance (fp32 until DeepSpeed casts them)."""
    overrides = {"gpt": {"n_layer": 2, "dim": 64, "n_head": 4, "vocab_size": 512, "grid": 4}} if tiny else {}
    cfg = llamagen_teacher_config(size)
    if tiny:
        cfg = cfg.model_validate(
            cfg.model_dump()
            | {
                "gpt": cfg.gpt.model_dump() | overrides["gpt"],
                "vq": cfg.vq.model_dump() | {"codebook_size": 512, "ch": 32, "ch_mult": (1, 1), "num_res_blocks": 1},
            }
        )
    with torch.device(device):
        model, vq = LlamaGen(cfg.gpt_config()), LlamaGenVQ(cfg.vq)
        teacher = LlamaGenTeacher(cfg, model, vq)
        backbone = LlamaGenBackbone.from_teacher(model)
        head = VelocityHead(
            HeadConfig(token_dim=backbone.token_dim, cond_dim=backbone.feature_dim, width=head_width, depth=head_depth)
        )
        base = ARDiffusion(backbone, head)
    teacher.requires_grad_(False).eval()
    if device.type == "cuda":
        teacher.model.to(torch.bfloat16)  # the trainer's _place_teacher does the same on bf16 runs
    return teacher, OneStepGenerator.from_ar_diffusion(base), base


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def try_batch(batch: int, args, dist: eng.DistInfo, precision: str) -> dict:
    """Build engines for micro-batch `batch`, warm up, time; raises torch.cuda.OutOfMemoryError when it does not fit."""
    device = dist.device
    teacher, generator, guidance = build(args.size, args.head_width, args.head_depth, device, args.tiny)
    if args.activation_checkpointing:
        eng.enable_activation_checkpointing(generator.model.backbone)
        eng.enable_activation_checkpointing(guidance.backbone)

    def spec(lr: float) -> eng.EngineSpec:
        return eng.EngineSpec(
            lr=lr, warmup_start_lr=1e-6, warmup_steps=0, betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1.0,
            zero_stage=2, precision=precision, micro_batch=batch, grad_accum=1, world_size=dist.world_size,
        )  # fmt: skip

    gen = eng.build_engine(generator, spec(1e-4))
    gui = eng.build_engine(guidance, spec(2e-4))
    cfg = CSDConfig(guidance_updates=args.k)
    rng = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def labels(rows: int):
        return torch.randint(teacher.num_classes, (rows,), generator=rng, device=device)

    def gui_step(rows: int = batch):
        with autocast:
            guidance_step(gui.module, gui, gen.module, labels(rows), cfg, teacher=teacher, rng=rng)

    def gen_step(rows: int = batch):
        with autocast:
            generator_step(gen.module, gen, gui.module, teacher, labels(rows), cfg, rng=rng)

    # FLOPs are counted on the eager modules (the same arithmetic as compiled ones) at a small micro-batch and scaled:
    # every counted op (matmul, attention) is per sample, so the count is exactly linear in the batch, and an eager
    # pass at the full batch would not fit where only the compiled one does
    rows = min(batch, args.flop_batch)
    flops = {}
    for name, fn in (("guidance_step", gui_step), ("generator_step", gen_step)):
        counter = FlopCounterMode(display=False)
        with counter:
            fn(rows)
        flops[name] = counter.get_total_flops() * batch // rows
    t_compile = None
    if args.compile:  # the trainer's deepspeed.compile: regional compilation of blocks and heads
        n = sum(eng.compile_regions(m, backend=args.compile_backend) for m in (gen.module, gui.module, teacher.model))
        t_compile = timed(lambda: (gui_step(), gen_step()), device)  # the first calls compile
        print(f"compiled {n} regions in {t_compile:.1f} s", file=sys.stderr)
    for _ in range(args.warmup):
        gui_step()
        gen_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_gui = min(timed(gui_step, device) for _ in range(args.repeats))
    t_gen = min(timed(gen_step, device) for _ in range(args.repeats))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    if args.profile:
        profile(args.profile, {"guidance_step": gui_step, "generator_step": gen_step}, device)
    n_params = {
        "teacher": sum(p.numel() for p in teacher.model.parameters()),
        "generator": sum(p.numel() for p in gen.module.parameters()),
        "guidance": sum(p.numel() for p in gui.module.parameters()),
    }
    return {"t_gui": t_gui, "t_gen": t_gen, "peak_gib": peak, "flops": flops, "params": n_params,
            "t_compile": t_compile}  # fmt: skip


def profile(folder: str, steps: dict, device: torch.device) -> None:
    """torch.profiler tables of one call of each step: ops by self device time, and by total (CPU) time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    os.makedirs(folder, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, fn in steps.items():
        with torch_profile(activities=activities) as prof:
            timed(fn, device)
        table = prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=70)
        with open(os.path.join(folder, f"{name}.txt"), "w") as f:
            f.write(table + "\n")


def search(candidates: list[int], argv: list[str], out: str | None) -> int:
    """Largest candidate that fits: start in the middle, go up while it fits, down until it does."""
    base = [a for i, a in enumerate(argv) if not a.startswith(("--batches", "--out")) and not (
        i > 0 and argv[i - 1] in ("--batches", "--out"))]  # fmt: skip
    results: dict[int, dict] = {}

    def run(batch: int) -> dict:
        if batch not in results:
            cmd = [sys.executable, os.path.abspath(__file__), *base, "--batches", str(batch)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.strip()]
            start = next((i for i, line in enumerate(lines) if line.startswith("{")), None)
            try:
                results[batch] = json.loads("\n".join(lines[start:])) if start is not None else {}
            except json.JSONDecodeError:
                results[batch] = {}
            if not results[batch]:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"micro-batch {batch}: the bench failed (exit {proc.returncode})")
            print(f"micro-batch {batch}: {'out of memory' if results[batch].get('oom') else 'fits'}", file=sys.stderr)
        return results[batch]

    i = len(candidates) // 2  # candidates are sorted descending
    if run(candidates[i]).get("oom"):
        while i + 1 < len(candidates) and run(candidates[i + 1]).get("oom"):
            i += 1
        i += 1
        if i >= len(candidates):
            raise SystemExit(f"no micro-batch of {candidates} fits")
    else:
        while i > 0 and not run(candidates[i - 1]).get("oom"):
            i -= 1
    best = results[candidates[i]] | {"did_not_fit": sorted(b for b, r in results.items() if r.get("oom"))}
    text = json.dumps(best, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="GPT-L", help="LlamaGen size (default GPT-L)")
    p.add_argument("--batches", default="256,192,160,128,96,64,48,32,16", help="micro-batches to search")
    p.add_argument("--k", type=int, default=5, help="guidance updates per generator update (LlamaGen-L: 5)")
    p.add_argument("--head-width", type=int, default=1024)
    p.add_argument("--head-depth", type=int, default=3)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="regional torch.compile (the trainer's deepspeed.compile)")
    p.add_argument("--flop-batch", type=int, default=16, help="micro-batch of the eager FLOP count (scaled up)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager: CPU tests)")
    p.add_argument("--profile", default=None, metavar="DIR", help="write torch.profiler tables of one step of each")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU smoke test")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1)
    args = p.parse_args(argv)

    candidates = sorted({int(b) for b in args.batches.split(",")}, reverse=True)
    if len(candidates) > 1:  # search: one process per try, so that an OOM cannot leave memory behind
        return search(candidates, argv if argv is not None else sys.argv[1:], args.out)
    dist = eng.init_distributed(args.local_rank)
    precision = eng.resolve_precision("auto")
    device = dist.device
    try:
        result = try_batch(candidates[0], args, dist, precision) | {"batch": candidates[0]}
    except torch.cuda.OutOfMemoryError:
        print(json.dumps({"micro_batch": candidates[0], "oom": True}))
        return 3
    tried: list[int] = []
    b, k = result["batch"], args.k
    t_round = k * result["t_gui"] + result["t_gen"]
    f_round = k * result["flops"]["guidance_step"] + result["flops"]["generator_step"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_flops(name)
    report = {
        "device": name,
        "torch": torch.__version__,
        "deepspeed": eng.deepspeed_version(),
        "dtype": precision,
        "zero_stage": 2,
        "teacher": args.size + (" (tiny)" if args.tiny else ""),
        "params_m": {k_: v / 1e6 for k_, v in result["params"].items()},
        "micro_batch": b,
        "did_not_fit": tried,
        "guidance_updates_k": k,
        "activation_checkpointing": args.activation_checkpointing,
        "compile": args.compile,
        "compile_seconds": result["t_compile"],
        "seconds": {"guidance_step": result["t_gui"], "generator_step": result["t_gen"], "csd_round": t_round},
        "samples_per_s": {
            "generator_samples_per_round_time": b / t_round,
            "guidance_step": b / result["t_gui"],
            "generator_step": b / result["t_gen"],
        },
        "peak_memory_gib": result["peak_gib"],
        "tflop_per_step": {k_: v / 1e12 for k_, v in result["flops"].items()},
        "achieved_tflop_s": {
            "guidance_step": result["flops"]["guidance_step"] / result["t_gui"] / 1e12,
            "generator_step": result["flops"]["generator_step"] / result["t_gen"] / 1e12,
            "csd_round": f_round / t_round / 1e12,
        },
        "peak_bf16_tflop_s": peak / 1e12 if peak else None,
        "mfu": {
            "guidance_step": result["flops"]["guidance_step"] / result["t_gui"] / peak,
            "generator_step": result["flops"]["generator_step"] / result["t_gen"] / peak,
            "csd_round": f_round / t_round / peak,
        }
        if peak
        else None,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
