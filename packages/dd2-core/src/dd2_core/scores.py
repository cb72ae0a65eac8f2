"""The teacher's conditional score: the closed-form posterior of a RectFlow-diffused categorical over a codebook.

A categorical p over codes c_1..c_V, diffused along x_t = (1 - t) x0 + t eps, is the Gaussian mixture
p_t(x) = sum_j p_j N(x; (1 - t) c_j, t^2 I)  (DD2 Eq. 1). Its posterior and derived quantities:

    w_j    = softmax_j( log p_j - ||x_t - (1 - t) c_j||^2 / (2 t^2) )
    x0_hat = sum_j w_j c_j                  (Tweedie: E[x0 | x_t])
    v      = (x_t - x0_hat) / t             (RectFlow velocity)
    s      = -(x_t - (1 - t) x0_hat) / t^2  (score)

The squared distance is expanded as ||x||^2 - 2 a x.c + a^2 ||c||^2 (a = 1 - t), so the largest intermediate is
(rows, V) per chunk: a (B, N, V, C) tensor is never built. The maths runs in float32 (or float64 if the inputs are
float64) whatever the input dtype, and results come back in x_t's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dd2_core.errors import DD2ValueError, expect_shape, expect_t

DEFAULT_CHUNK_ROWS = 4096  # rows of (B*N) per chunk: 4096 x 16384 codes x 4 B = 256 MiB for LlamaGen


def _check(x_t: Tensor, t: Tensor, log_probs: Tensor, codebook: Tensor) -> None:
    if codebook.dim() != 2 or codebook.shape[0] == 0 or codebook.shape[1] == 0:
        raise DD2ValueError(f"codebook: expected a non-empty (V, C) tensor, got shape {tuple(codebook.shape)}")
    v_size, c_dim = codebook.shape
    expect_shape("x_t", x_t, (None, None, c_dim))
    b, n, _ = x_t.shape
    expect_shape("log_probs", log_probs, (b, n, v_size))
    if t.dim() != 3 or t.shape[-1] != 1 or t.shape[0] not in (1, b) or t.shape[1] not in (1, n):
        raise DD2ValueError(f"t: expected shape ({b}, {n}, 1) or broadcastable to it, got {tuple(t.shape)}")
    expect_t("t", t)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def posterior_weights(x_t: Tensor, t: Tensor, log_probs: Tensor, codebook: Tensor) -> Tensor:
    """Posterior w_j = p(x0 = c_j | x_t) over codes (unchunked; for tests and small V).

    Shapes: x_t (B, N, C), t (B, N, 1), log_probs (B, N, V), codebook (V, C) -> (B, N, V).
    """
    _check(x_t, t, log_probs, codebook)
    dt = _compute_dtype(x_t)
    return _weights(x_t.to(dt), t.to(dt).expand(*x_t.shape[:2], 1), log_probs.to(dt), codebook.to(dt))


def _weights(x: Tensor, t: Tensor, log_probs: Tensor, codebook: Tensor) -> Tensor:
    a = 1 - t  # (..., 1) alpha_t
    sq_dist = x.pow(2).sum(-1, keepdim=True) - 2 * a * (x @ codebook.T) + a.pow(2) * codebook.pow(2).sum(-1)  # (..., V)
    return torch.softmax(log_probs - sq_dist / (2 * t.pow(2)), dim=-1)


def teacher_x0_hat(
    x_t: Tensor, t: Tensor, log_probs: Tensor, codebook: Tensor, *, chunk_rows: int | None = DEFAULT_CHUNK_ROWS
) -> Tensor:
    """Posterior mean E[x0 | x_t] of the teacher's code mixture (DD2 Eq. 1, Tweedie form).

        w_j    = softmax_j( log p_j - ||x_t - (1 - t) c_j||^2 / (2 t^2) )
        x0_hat = sum_j w_j c_j

    Differentiable in x_t (CSD needs d x0_hat / d x_t); log_probs are typically computed without gradient.
    Chunked over the B*N rows (`chunk_rows`; None = one chunk).
    Shapes: x_t (B, N, C), t (B, N, 1), log_probs (B, N, V), codebook (V, C) -> (B, N, C) in x_t's dtype.
    """
    _check(x_t, t, log_probs, codebook)
    b, n, c = x_t.shape
    dt = _compute_dtype(x_t)
    x = x_t.to(dt).reshape(b * n, c)  # (R, C)
    tt = t.to(dt).expand(b, n, 1).reshape(b * n, 1)  # (R, 1)
    lp = log_probs.to(dt).reshape(b * n, -1)  # (R, V)
    cb = codebook.to(dt)
    rows = b * n if not chunk_rows else max(1, chunk_rows)
    out = [_weights(x[i : i + rows], tt[i : i + rows], lp[i : i + rows], cb) @ cb for i in range(0, b * n, rows)]
    return torch.cat(out).reshape(b, n, c).to(x_t.dtype)


def teacher_velocity(
    x_t: Tensor, t: Tensor, log_probs: Tensor, codebook: Tensor, *, chunk_rows: int | None = DEFAULT_CHUNK_ROWS
) -> Tensor:
    """Exact teacher velocity v = (x_t - x0_hat) / t.  Shapes as teacher_x0_hat -> (B, N, C)."""
    x0_hat = teacher_x0_hat(x_t, t, log_probs, codebook, chunk_rows=chunk_rows)
    return (x_t - x0_hat) / t.to(x_t.dtype)


def teacher_score(
    x_t: Tensor, t: Tensor, log_probs: Tensor, codebook: Tensor, *, chunk_rows: int | None = DEFAULT_CHUNK_ROWS
) -> Tensor:
    """Exact teacher score s = grad log p_t(x_t) = -(x_t - (1 - t) x0_hat) / t^2.  Shapes -> (B, N, C)."""
    x0_hat = teacher_x0_hat(x_t, t, log_probs, codebook, chunk_rows=chunk_rows)
    t = t.to(x_t.dtype)
    return -(x_t - (1 - t) * x0_hat) / t.pow(2)
