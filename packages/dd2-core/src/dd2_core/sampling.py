"""Samplers around a teacher: the exact per-token flow, DD1's deterministic flow map, teacher-refined multi-step
sampling, and snapping continuous tokens to codes.

The teacher's velocity is exact (scores.teacher_velocity), so integrating it from t = 1 to 0 transports N(0, I) onto
the categorical p over codes (DD1's AR flow matching). Euler steps are placed on a grid that is denser near t = 0,
where the posterior sharpens; the last step from t_1 to 0 lands exactly on x0_hat (x - t v = x0_hat).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dd2_core.errors import DD2ValueError, expect_shape
from dd2_core.scores import DEFAULT_CHUNK_ROWS, teacher_velocity
from dd2_core.teacher import Teacher, group_slices


def time_grid(steps: int, *, power: float = 2.0, device=None) -> Tensor:
    """t_k = (1 - k / steps)^power, k = 0..steps: from 1 to 0, denser near 0 for power > 1.  -> (steps + 1,)."""
    if steps < 1:
        raise DD2ValueError(f"steps: expected >= 1, got {steps}")
    return (1 - torch.arange(steps + 1, device=device, dtype=torch.float64) / steps).pow(power)


def integrate_teacher_flow(
    noise: Tensor,
    log_probs: Tensor,
    codebook: Tensor,
    *,
    steps: int = 64,
    power: float = 2.0,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
) -> Tensor:
    """Euler-integrate dx/dt = v_teacher(x, t | p) from t = 1 (x = noise) to t = 0, independently per token.

    Shapes: noise (B, N, C), log_probs (B, N, V), codebook (V, C) -> (B, N, C).
    """
    grid = time_grid(steps, power=power, device=noise.device)
    x = noise.float() if noise.dtype != torch.float64 else noise
    for k in range(steps):
        t_now, t_next = grid[k].item(), grid[k + 1].item()
        t = torch.full((*x.shape[:2], 1), t_now, device=x.device, dtype=x.dtype)
        x = x + (t_next - t_now) * teacher_velocity(x, t, log_probs, codebook, chunk_rows=chunk_rows)
    return x.to(noise.dtype)


@torch.no_grad()
def teacher_flow_map(
    teacher: Teacher, noise: Tensor, labels: Tensor, *, steps: int = 64, power: float = 2.0, cached: bool = True
) -> Tensor:
    """DD1's deterministic noise -> token map F(eps): group by group, integrate the exact teacher flow conditioned
    on the tokens produced so far. One teacher-forced pass per group, or, with `cached` and a teacher that has a
    KV-cached `flow_map(noise, labels, steps=, power=)` (LlamaGen: one token per step, like AR sampling, so about N
    times cheaper at N tokens), the teacher's own.

    Shapes: noise (B, N, C), labels (B,) -> tokens (B, N, C) (on codes up to the integration error).
    """
    expect_shape("noise", noise, (None, teacher.num_tokens, teacher.codebook.shape[1]))
    fast = getattr(teacher, "flow_map", None) if cached else None
    if fast is not None:
        return fast(noise, labels, steps=steps, power=power)
    tokens = torch.zeros_like(noise)
    codebook = teacher.codebook.to(noise.device)
    for sl in group_slices(teacher.token_groups):
        log_probs = teacher.log_probs(tokens, labels)[:, sl]  # (B, n_g, V): sees only earlier groups
        tokens[:, sl] = integrate_teacher_flow(noise[:, sl], log_probs, codebook, steps=steps, power=power)
    return tokens


def nearest_code(tokens: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest code (Euclidean) of every token.  Shapes: (B, N, C), (V, C) -> (B, N) int64."""
    expect_shape("tokens", tokens, (None, None, codebook.shape[1]))
    x = tokens.float()
    cb = codebook.float().to(x.device)
    sq = x.pow(2).sum(-1, keepdim=True) - 2 * x @ cb.T + cb.pow(2).sum(-1)  # (B, N, V)
    return sq.argmin(-1)


@torch.no_grad()
def refine_with_teacher(
    teacher: Teacher,
    tokens: Tensor,
    labels: Tensor,
    *,
    resample_groups: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Teacher-refined multi-step sampling (DD2 3.3, Alg. 4): keep the one-step tokens of the first G - k groups and
    let the teacher resample the last k groups by ordinary AR sampling on the continuous prefix (k + 1 steps total).

    Shapes: tokens (B, N, C), labels (B,) -> tokens (B, N, C) (resampled groups are exact code vectors).
    """
    slices = group_slices(teacher.token_groups)
    if not 0 <= resample_groups <= len(slices):
        raise DD2ValueError(f"resample_groups: expected 0..{len(slices)}, got {resample_groups}")
    out = tokens.clone()
    codebook = teacher.codebook.to(tokens.device)
    for sl in slices[len(slices) - resample_groups :]:
        probs = teacher.log_probs(out, labels)[:, sl].exp()  # (B, n_g, V)
        ids = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:2])  # (B, n_g)
        out[:, sl] = codebook[ids].to(out.dtype)
    return out
