"""A minimal single-process driver of the step functions (plain torch, one device).

The DeepSpeed driver (`dd2_train.trainer`) runs the same step functions at scale; this loop is for small teachers
(the enumerable toy of the proof, tests, quick experiments). Every loop takes a step budget and an optional time
budget, so that methods can be compared at equal compute. The time is read from `clock` (default wall time;
`time.process_time` counts this process's CPU seconds, which on one thread is the same compute whatever else the
machine is doing).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dd2_core.diffusion import ARDiffusion
from dd2_core.generator import OneStepGenerator
from dd2_core.sampling import teacher_flow_map
from dd2_core.teacher import Teacher
from dd2_train.steps import (
    CSDConfig,
    GTSConfig,
    RegressConfig,
    TorchUpdater,
    csd_round,
    ema_update,
    gts_step,
    guidance_step,
    onpolicy_regression_step,
    regression_step,
    start_residual_guidance,
)

logger = logging.getLogger(__name__)


@dataclass
class LoopResult:
    """What a loop did: steps run, seconds spent, and the last metrics (floats)."""

    steps: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def adam(params, lr: float, betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.Optimizer:
    """Adam with the paper's betas (Tab. 10/11), no weight decay."""
    return torch.optim.Adam([p for p in params if p.requires_grad], lr=lr, betas=betas)


def warmup(optimizer: torch.optim.Optimizer, steps: int, start_factor: float = 1e-2):
    """Linear LR warm-up over `steps` optimizer steps (the paper warms up from 1e-6; we scale from start_factor)."""
    return torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=start_factor, total_iters=max(1, steps))


def _labels_fn(num_classes: int, batch: int, rng: torch.Generator | None, device) -> Callable[[], Tensor]:
    return lambda: torch.randint(0, num_classes, (batch,), generator=rng).to(device)


Clock = Callable[[], float]


def _budget_left(t0: float, step: int, steps: int, seconds: float | None, clock: Clock) -> bool:
    return step < steps and (seconds is None or clock() - t0 < seconds)


def train_gts(
    model: ARDiffusion,
    teacher: Teacher,
    cfg: GTSConfig,
    *,
    steps: int,
    batch: int,
    lr: float,
    rng: torch.Generator | None = None,
    device="cpu",
) -> LoopResult:
    """Stage `gts`: tune the AR-diffusion model on fresh teacher samples."""
    updater = TorchUpdater(adam(model.parameters(), lr), clip=1.0)
    next_labels = _labels_fn(teacher.num_classes, batch, rng, device)
    t0, metrics = time.perf_counter(), {}
    model.train()
    for _ in range(steps):
        labels = next_labels()
        with torch.no_grad():
            tokens = teacher.embed(teacher.sample(labels, generator=rng))
        metrics = gts_step(model, updater, teacher, tokens, labels, cfg, rng=rng)
    model.eval()
    return LoopResult(steps, time.perf_counter() - t0, {k: v.item() for k, v in metrics.items()})


def flow_map_pairs(
    teacher: Teacher,
    count: int,
    *,
    batch: int = 4096,
    steps: int = 64,
    rng: torch.Generator | None = None,
    device="cpu",
) -> tuple[Tensor, Tensor, Tensor]:
    """(noise, labels, F(noise)) pairs of the teacher's deterministic flow map (DD1's dataset)."""
    noises, labels_all, tokens = [], [], []
    c = teacher.codebook.shape[1]
    for i in range(0, count, batch):
        b = min(batch, count - i)
        noise = torch.randn(b, teacher.num_tokens, c, generator=rng).to(device)
        labels = torch.randint(0, teacher.num_classes, (b,), generator=rng).to(device)
        noises.append(noise)
        labels_all.append(labels)
        tokens.append(teacher_flow_map(teacher, noise, labels, steps=steps))
    return torch.cat(noises), torch.cat(labels_all), torch.cat(tokens)


def train_regression(
    generator: OneStepGenerator,
    pairs: tuple[Tensor, Tensor, Tensor],
    *,
    steps: int,
    batch: int,
    lr: float,
    seconds: float | None = None,
    rng: torch.Generator | None = None,
    clock: Clock = time.perf_counter,
    ema: OneStepGenerator | None = None,
    ema_max_decay: float = 0.9999,
) -> LoopResult:
    """DD1-style training: regress the generator onto flow-map pairs (minibatches drawn with replacement);
    `ema` (a copy of the generator) is updated after every step with the progressive rule."""
    noise, labels, tokens = pairs
    updater = TorchUpdater(adam(generator.parameters(), lr), clip=1.0)
    t0, step, metrics = clock(), 0, {}
    generator.train()
    while _budget_left(t0, step, steps, seconds, clock):
        idx = torch.randint(0, noise.shape[0], (batch,), generator=rng).to(noise.device)
        metrics = regression_step(generator, updater, noise[idx], tokens[idx], labels[idx])
        if ema is not None:
            ema_update(ema, generator, step, ema_max_decay)
        step += 1
    generator.eval()
    return LoopResult(step, clock() - t0, {k: v.item() for k, v in metrics.items()})


def train_onpolicy_regression(
    generator: OneStepGenerator,
    teacher: Teacher,
    cfg: RegressConfig,
    *,
    steps: int,
    batch: int,
    lr: float,
    seconds: float | None = None,
    rng: torch.Generator | None = None,
    device="cpu",
    ema_max_decay: float = 0.9999,
    clock: Clock = time.perf_counter,
    reference: ARDiffusion | None = None,
) -> tuple[OneStepGenerator, LoopResult]:
    """Stage `regress` (onpolicy): regress the generator onto the teacher's per-token flow map given its own prefix;
    returns the EMA generator (progressive rule) like train_csd. `reference`: frozen model A (cfg.align_weight)."""
    updater = TorchUpdater(adam(generator.parameters(), lr), clip=1.0)
    ema = copy.deepcopy(generator).eval().requires_grad_(False)
    next_labels = _labels_fn(teacher.num_classes, batch, rng, device)
    t0, step, metrics = clock(), 0, {}
    generator.train()
    while _budget_left(t0, step, steps, seconds, clock):
        metrics = onpolicy_regression_step(generator, updater, teacher, next_labels(), cfg, rng=rng,
                                           reference=reference)  # fmt: skip
        ema_update(ema, generator, step, ema_max_decay)
        step += 1
    generator.eval()
    return ema, LoopResult(step, clock() - t0, {k: v.item() for k, v in metrics.items()})


def train_csd(
    generator: OneStepGenerator,
    guidance: ARDiffusion,
    teacher: Teacher,
    cfg: CSDConfig,
    *,
    steps: int,
    batch: int,
    lr_generator: float,
    lr_guidance: float,
    warmup_steps: int = 0,
    guidance_prefit: int = 0,
    ema_max_decay: float = 0.9999,
    seconds: float | None = None,
    rng: torch.Generator | None = None,
    device="cpu",
    on_round: Callable[[int, OneStepGenerator, OneStepGenerator], None] | None = None,
    clock: Clock = time.perf_counter,
    reference: ARDiffusion | None = None,
) -> tuple[OneStepGenerator, LoopResult]:
    """Stage `csd`: `steps` rounds of K guidance updates + one generator update; returns the EMA generator.

    `guidance_prefit` FCS updates of the guidance alone come first, with the generator frozen (like the paper's
    performance alignment, App. C.3): psi starts as a copy of A, i.e. near the *teacher*, and CSD has no signal until
    psi describes the generator. `on_round(round, generator, ema)` is called after every round (evaluation hooks).
    """
    if cfg.guidance_residual:  # psi = teacher + residual: the residual starts at zero
        start_residual_guidance(guidance)
    ema = copy.deepcopy(generator).eval().requires_grad_(False)
    gen_opt, gui_opt = adam(generator.parameters(), lr_generator), adam(guidance.parameters(), lr_guidance)
    gen_up = TorchUpdater(gen_opt, clip=1.0, scheduler=warmup(gen_opt, warmup_steps) if warmup_steps else None)
    gui_warm = warmup_steps * cfg.guidance_updates  # the paper counts warm-up in guidance iterations
    gui_up = TorchUpdater(gui_opt, clip=1.0, scheduler=warmup(gui_opt, gui_warm) if warmup_steps else None)
    next_labels = _labels_fn(teacher.num_classes, batch, rng, device)
    t0, step, metrics = clock(), 0, {}
    generator.train()
    guidance.train()
    for _ in range(guidance_prefit):
        guidance_step(guidance, gui_up, generator, next_labels(), cfg, teacher=teacher, rng=rng)
    while _budget_left(t0, step, steps, seconds, clock):
        metrics = csd_round(generator, gen_up, guidance, gui_up, teacher, next_labels, cfg, rng=rng, step=step,
                            reference=reference)  # fmt: skip
        ema_update(ema, generator, step, ema_max_decay)
        step += 1
        if on_round is not None:
            on_round(step, generator, ema)
    generator.eval()
    guidance.eval()
    return ema, LoopResult(step, clock() - t0, {k: v.item() for k, v in metrics.items()})
