"""Kernel Inception Distance (Bińkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel

    k(x, y) = (x . y / D + 1)^3
    MMD^2_u = [sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)] / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2

averaged over random subsets of size m (100 subsets of 1000, as in the KID paper and torch-fidelity). Unbiased, so
unlike FID it is comparable across sample sizes and can be slightly negative when the sets match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dd2_eval._arrays import as_tensor
from dd2_eval.errors import EvalError


@dataclass(frozen=True)
class KernelDistance:
    mean: float
    std: float
    num_subsets: int
    subset_size: int


def polynomial_mmd2(x: Tensor, y: Tensor, *, degree: int = 3, coef0: float = 1.0) -> float:
    """Unbiased MMD^2 of two equal-size sets with k(x, y) = (x . y / D + coef0)^degree, in float64.

    Shapes: x (m, D), y (m, D) -> scalar.
    """
    m, d = x.shape
    x, y = x.to(torch.float64), y.to(torch.float64)
    k_xx = (x @ x.T / d + coef0) ** degree  # (m, m)
    k_yy = (y @ y.T / d + coef0) ** degree
    k_xy = (x @ y.T / d + coef0) ** degree
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kernel_inception_distance(
    features_1: np.ndarray | Tensor,
    features_2: np.ndarray | Tensor,
    *,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> KernelDistance:
    """KID mean and std over `num_subsets` random subsets (without replacement inside a subset), seeded.

    The subset size is capped at the smaller set. Shapes: features_1 (N_1, D), features_2 (N_2, D) -> KernelDistance.
    """
    a = _as_tensor("features_1", features_1)
    b = _as_tensor("features_2", features_2).to(a.device)
    if a.shape[1] != b.shape[1]:
        raise EvalError(f"kernel_inception_distance: feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2 or num_subsets < 1:
        raise EvalError(
            f"kernel_inception_distance: need >= 2 features per set and >= 1 subset, got sets of "
            f"{a.shape[0]} and {b.shape[0]}, num_subsets={num_subsets}"
        )
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        ia = torch.from_numpy(rng.choice(a.shape[0], m, replace=False)).to(a.device)
        ib = torch.from_numpy(rng.choice(b.shape[0], m, replace=False)).to(a.device)
        values.append(polynomial_mmd2(a[ia], b[ib]))
    return KernelDistance(float(np.mean(values)), float(np.std(values)), num_subsets, m)


def _as_tensor(name: str, x: np.ndarray | Tensor) -> Tensor:
    t = as_tensor(x)
    if t.dim() != 2:
        raise EvalError(f"{name}: expected features (N, D), got {tuple(t.shape)}")
    return t.detach()
