"""The three DD2 losses, written as the equations (velocity parameterisation, DD2 App. E.1).

All return the **per-token loss, unreduced** (B, N) (or (M*B, N) for FCS); the step functions weight and reduce.
Time t and noise eps are arguments, sampled by the caller (t ~ U[t_min, t_max] per token), so every loss is a pure,
testable function of tensors and modules. Maths runs in float32 (the head casts its output to x_t's dtype).
"""

from __future__ import annotations

from typing import Literal

import torch
from einops import repeat
from torch import Tensor

from dd2_core.flow import noisy, velocity, x0_from_v
from dd2_core.heads import VelocityHead
from dd2_core.scores import DEFAULT_CHUNK_ROWS, teacher_velocity, teacher_x0_hat

TINY = 1e-5  # floor of the SiD normaliser mean|q - f_teacher|


def gts_loss(
    head: VelocityHead,
    x0: Tensor,
    f: Tensor,
    log_probs: Tensor,
    codebook: Tensor,
    t: Tensor,
    eps: Tensor,
    *,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
) -> Tensor:
    """Generalised teacher score loss (DD2 Eq. 6), velocity form: regress the exact teacher velocity.

        x_t = (1 - t) x0 + t eps,    v_teacher = (x_t - x0_hat_teacher(x_t, t | p)) / t
        L   = || v_psi(x_t, t | f) - v_teacher ||^2        (mean over C)

    x0 are teacher-sampled tokens, f = backbone(x0) (position i sees x0_<i), log_probs the teacher's p(.|x0_<i).
    Shapes: x0 (B, N, C), f (B, N, D), log_probs (B, N, V), codebook (V, C), t (B, N, 1), eps (B, N, C) -> (B, N).
    """
    x_t = noisy(x0, eps, t)
    with torch.no_grad():
        v_teacher = teacher_velocity(x_t, t, log_probs, codebook, chunk_rows=chunk_rows)
    v = head(x_t, t, f)
    return (v.float() - v_teacher.float()).pow(2).mean(-1)


def fcs_loss(
    head: VelocityHead,
    x0: Tensor,
    f: Tensor,
    t: Tensor,
    eps: Tensor,
    num_draws: int = 1,
    *,
    teacher_log_probs: Tensor | None = None,
    codebook: Tensor | None = None,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
) -> Tensor:
    """Fake conditional score loss (DD2 Eq. 5), velocity form: denoising score matching on generator samples.

        L = || v_psi(x_t, t | f) - (eps - x0) ||^2,   x_t = (1 - t) x0 + t eps   (mean over C)

    x0 are generator tokens, already sg(.)-detached by the caller; f = guidance backbone(sg(x0)). M = num_draws
    (t, eps) pairs per token (DD2 App. C.2, like MAR's diffusion_batch_mul) share one backbone pass.
    Residual guidance (not in the paper; `teacher_log_probs` and `codebook` given, the teacher's p(.|sg(x0)_<i)):
    v_psi = v_teacher(x_t, t | p) + head(x_t, t | f), so the head learns only the generator-minus-teacher residual.
    Shapes: x0 (B, N, C), f (B, N, D), t (M*B, N, 1), eps (M*B, N, C), teacher_log_probs (B, N, V) -> (M*B, N).
    """
    x0 = repeat(x0, "b n c -> (m b) n c", m=num_draws)  # (M*B, N, C)
    f = repeat(f, "b n d -> (m b) n d", m=num_draws)  # (M*B, N, D)
    x_t = noisy(x0, eps, t)
    v = head(x_t, t, f).float()
    if teacher_log_probs is not None:
        if codebook is None:
            raise ValueError("fcs_loss: residual guidance needs the codebook with teacher_log_probs")
        lp = repeat(teacher_log_probs, "b n v -> (m b) n v", m=num_draws)
        with torch.no_grad():
            v_teacher = teacher_velocity(x_t, t, lp, codebook, chunk_rows=chunk_rows).float()
        v = v + v_teacher
    return (v - velocity(x0, eps).float()).pow(2).mean(-1)


def csd_loss(
    x0: Tensor,
    guidance_head: VelocityHead,
    f_guidance: Tensor,
    log_probs: Tensor,
    codebook: Tensor,
    t: Tensor,
    eps: Tensor,
    *,
    weighting: Literal["sid", "sid_seq", "none"] = "sid",
    residual: bool = False,
    chunk_rows: int | None = DEFAULT_CHUNK_ROWS,
) -> Tensor:
    """Conditional score distillation (DD2 Eq. 4) with the SiD discrepancy (Eq. 3) at alpha = 1, x0-form:

        x_t      = (1 - t) q + t eps'                          q = generator tokens (carry the gradient)
        f_Phi    = x0_hat_teacher(x_t, t | p(. | sg(q_<i)))    exact posterior mean (scores.teacher_x0_hat)
        f_psi    = x_t - t v_psi(x_t, t | f_i(sg(q_<i)))       guidance denoiser
        omega    = 1 / mean_C |q - f_Phi|                      ('sid', per token, no gradient; 'none': omega = 1;
                                                               'sid_seq': 1 / mean_{N,C} |q - f_Phi| per sequence,
                                                               SiD's per-image normaliser)
        L        = omega * (f_Phi - f_psi) . (f_psi - q)       (sum over C)

    With `residual` (not in the paper) the guidance head predicts only a residual velocity on top of the teacher's:
    f_psi = f_Phi - t v_psi (see fcs_loss), so f_Phi - f_psi = t v_psi and the guidance has no error floor of its own
    where the generator already matches the teacher.
    The gradient reaches the generator only through q: directly and through x_t in both denoisers. The caller
    computes log_probs and f_guidance on sg(q) and must keep the guidance head's parameters out of the generator's
    update (their gradients are not wanted; see dd2_train.steps.generator_step).
    Shapes: x0 (B, N, C), f_guidance (B, N, D), log_probs (B, N, V), codebook (V, C), t (B, N, 1), eps (B, N, C)
    -> (B, N).
    """
    x_t = noisy(x0, eps, t)
    f_teacher = teacher_x0_hat(x_t, t, log_probs, codebook, chunk_rows=chunk_rows).float()  # (B, N, C)
    v_psi = guidance_head(x_t, t, f_guidance).float()
    f_fake = f_teacher - t * v_psi if residual else x0_from_v(x_t, v_psi, t).float()  # (B, N, C)
    q = x0.float()
    if weighting == "sid":
        with torch.no_grad():
            omega = 1.0 / (q - f_teacher).abs().mean(-1, keepdim=True).clamp_min(TINY)  # (B, N, 1), sg(.)
    elif weighting == "sid_seq":
        with torch.no_grad():
            omega = 1.0 / (q - f_teacher).abs().mean((-2, -1), keepdim=True).clamp_min(TINY)  # (B, 1, 1), sg(.)
    elif weighting == "none":
        omega = torch.ones_like(q[..., :1])
    else:
        raise ValueError(f"weighting: expected 'sid', 'sid_seq' or 'none', got {weighting!r}")
    return (omega * (f_teacher - f_fake) * (f_fake - q)).sum(-1)


def regression_loss(tokens_pred: Tensor, tokens_target: Tensor) -> Tensor:
    """DD1-style regression onto the teacher's deterministic flow map: ||G(eps) - F(eps)||^2 (mean over C).

    Shapes: tokens_pred, tokens_target (B, N, C) -> (B, N).
    """
    return (tokens_pred.float() - tokens_target.float()).pow(2).mean(-1)
