"""Improved precision and recall (Kynkäänniemi et al. 2019) as ADM computes them, plus density and coverage
(Naeem et al. 2020) for the toy feature space.

k-NN manifold of a feature set Phi: the union of balls around each phi with radius r(phi) = squared distance to
its k-th nearest neighbour in Phi (the (k+1)-th smallest distance when phi's own 0 is counted, as ADM does).

    precision = fraction of samples inside the reference manifold:  any_j d(s, r_j) <= r(r_j)
    recall    = fraction of references inside the sample manifold:  any_i d(r, s_i) <= r(s_i)

ADM uses k = 3, squared L2 distances max(|u|^2 - 2 u.v + |v|^2, 0) in fp16 with an fp32 fallback if any is not
finite, and blocks of 10,000 x 10,000 (`ManifoldEstimator`). Blocking does not change the result; the distance
precision can, a little, at ties: `distance_dtype` picks fp32 (default, exact enough to be batch-independent) or
fp16 (ADM). Recall is the metric that catches collapse onto few modes (evaluation.md §7.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dd2_eval._arrays import as_tensor
from dd2_eval.errors import EvalError

ADM_K = 3
ADM_BATCH = 10_000


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int


@dataclass(frozen=True)
class DensityCoverage:
    density: float
    coverage: float
    k: int


def pairwise_sq_distances(u: Tensor, v: Tensor, *, distance_dtype: torch.dtype = torch.float32) -> Tensor:
    """Squared L2 distances max(|u|^2 - 2 u v^T + |v|^2, 0); fp16 falls back to fp32 when any is not finite (ADM).

    Shapes: u (n, D), v (m, D) -> (n, m) float32.
    """
    if distance_dtype not in (torch.float16, torch.float32, torch.float64):
        raise EvalError(f"distance_dtype: expected float16, float32 or float64, got {distance_dtype}")

    def compute(dtype: torch.dtype) -> Tensor:
        a, b = u.to(dtype), v.to(dtype)
        d = (a * a).sum(1, keepdim=True) - 2 * (a @ b.T) + (b * b).sum(1)[None, :]  # (n, m)
        return d.clamp_min(0)

    if distance_dtype == torch.float16:
        d = compute(torch.float16)
        if bool(torch.isfinite(d).all()):
            return d.float()
        distance_dtype = torch.float32
    return compute(distance_dtype).float()


def manifold_radii(
    features: np.ndarray | Tensor,
    *,
    k: int = ADM_K,
    row_batch: int = ADM_BATCH,
    col_batch: int = ADM_BATCH,
    distance_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Squared distance of each feature to its k-th nearest neighbour in the same set (self counted at index 0).

    Streams column blocks and keeps the k+1 smallest distances per row, so memory is row_batch x (col_batch + k + 1).
    Shapes: features (N, D) -> (N,) float32.
    """
    x = _features("features", features)
    n = x.shape[0]
    if n < k + 1:
        raise EvalError(f"manifold_radii: need at least k + 1 = {k + 1} features, got {n}")
    _check_batches(row_batch, col_batch)
    radii = torch.empty(n, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, row_batch):
        rows = x[r0 : r0 + row_batch]
        best: Tensor | None = None  # (r, <= k + 1) smallest distances so far
        for c0 in range(0, n, col_batch):
            d = pairwise_sq_distances(rows, x[c0 : c0 + col_batch], distance_dtype=distance_dtype)  # (r, c)
            cand = d if best is None else torch.cat([best, d], dim=1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values  # ascending
        assert best is not None
        radii[r0 : r0 + rows.shape[0]] = best[:, k]
    return radii


def precision_recall(
    reference: np.ndarray | Tensor,
    samples: np.ndarray | Tensor,
    *,
    k: int = ADM_K,
    row_batch: int = ADM_BATCH,
    col_batch: int = ADM_BATCH,
    distance_dtype: torch.dtype = torch.float32,
    reference_radii: Tensor | None = None,
) -> PrecisionRecall:
    """Kynkäänniemi precision and recall of `samples` against `reference` (module docstring; ADM's batching).

    `reference_radii`: `manifold_radii(reference, k=k, ...)` computed once for many sample sets (the result is
    the same; the reference's N_r x N_r distances are the costly part).
    Shapes: reference (N_r, D), samples (N_s, D), reference_radii (N_r,) -> PrecisionRecall.
    """
    ref = _features("reference", reference)
    smp = _features("samples", samples).to(ref.device)
    if ref.shape[1] != smp.shape[1]:
        raise EvalError(f"precision_recall: feature dims differ: reference {ref.shape[1]}, samples {smp.shape[1]}")
    kw = dict(k=k, row_batch=row_batch, col_batch=col_batch, distance_dtype=distance_dtype)
    ref_radii = _given_radii(reference_radii, ref) if reference_radii is not None else manifold_radii(ref, **kw)
    smp_radii = manifold_radii(smp, **kw)  # (N_s,)
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    smp_in = torch.zeros(smp.shape[0], dtype=torch.bool, device=ref.device)
    for r0 in range(0, ref.shape[0], row_batch):
        r1 = min(r0 + row_batch, ref.shape[0])
        for s0 in range(0, smp.shape[0], col_batch):
            s1 = min(s0 + col_batch, smp.shape[0])
            d = pairwise_sq_distances(ref[r0:r1], smp[s0:s1], distance_dtype=distance_dtype)  # (r, s)
            smp_in[s0:s1] |= (d <= ref_radii[r0:r1, None]).any(0)
            ref_in[r0:r1] |= (d <= smp_radii[None, s0:s1]).any(1)
    return PrecisionRecall(float(smp_in.double().mean()), float(ref_in.double().mean()), k)


def density_coverage(
    real: np.ndarray | Tensor,
    fake: np.ndarray | Tensor,
    *,
    k: int = 5,
    batch: int = ADM_BATCH,
    real_radii: Tensor | None = None,
) -> DensityCoverage:
    """Density and coverage (Naeem et al. 2020), robust to duplicated samples, with real k-NN radii (fp32).

        density  = 1/(k N_f) sum_j #{i : d(f_j, r_i) < rad(r_i)}
        coverage = 1/N_r sum_i [ min_j d(r_i, f_j) < rad(r_i) ]

    `real_radii`: `manifold_radii(real, k=k)` computed once for many fake sets (the same result, faster).
    Shapes: real (N_r, D), fake (N_f, D), real_radii (N_r,) -> DensityCoverage.
    """
    r = _features("real", real)
    f = _features("fake", fake).to(r.device)
    if r.shape[1] != f.shape[1]:
        raise EvalError(f"density_coverage: feature dims differ: real {r.shape[1]}, fake {f.shape[1]}")
    radii = (
        _given_radii(real_radii, r)
        if real_radii is not None
        else manifold_radii(r, k=k, row_batch=batch, col_batch=batch)
    )
    count = torch.zeros((), dtype=torch.float64, device=r.device)
    covered = torch.zeros(r.shape[0], dtype=torch.bool, device=r.device)
    for r0 in range(0, r.shape[0], batch):
        r1 = min(r0 + batch, r.shape[0])
        for f0 in range(0, f.shape[0], batch):
            inside = pairwise_sq_distances(r[r0:r1], f[f0 : f0 + batch]) < radii[r0:r1, None]  # (r, f)
            count += inside.sum()
            covered[r0:r1] |= inside.any(1)
    return DensityCoverage(float(count) / (k * f.shape[0]), float(covered.double().mean()), k)


def _given_radii(radii: Tensor, features: Tensor) -> Tensor:
    """Precomputed k-NN radii of `features`, checked. Shapes: radii (N,), features (N, D) -> (N,) float32."""
    r = as_tensor(radii)
    if r.shape != (features.shape[0],):
        raise EvalError(
            f"radii: expected shape ({features.shape[0]},) (one per reference feature), got {tuple(r.shape)}"
        )
    return r.float().to(features.device)


def _features(name: str, x: np.ndarray | Tensor) -> Tensor:
    t = as_tensor(x)
    if t.dim() != 2 or t.shape[0] == 0:
        raise EvalError(f"{name}: expected features (N, D) with N >= 1, got {tuple(t.shape)}")
    if not t.dtype.is_floating_point:
        t = t.float()
    return t.detach()


def _check_batches(row_batch: int, col_batch: int) -> None:
    if row_batch < 1 or col_batch < 1:
        raise EvalError(f"row_batch and col_batch must be >= 1, got {row_batch} and {col_batch}")
