"""Feature statistics and the Fréchet distance (FID, sFID, and FD in any feature space).

    FD = ||mu_1 - mu_2||^2 + tr S_1 + tr S_2 - 2 tr (S_1 S_2)^{1/2}

S_1 S_2 is not symmetric, which is why the reference implementations' `scipy.linalg.sqrtm` can return complex
round-off and needs an epsilon retry. We use the identity tr (S_1 S_2)^{1/2} = sum_i sqrt(lambda_i(A)) with a
symmetric PSD matrix A similar to S_1 S_2 (L^T S_2 L for S_1 = L L^T, or S_1^{1/2} S_2 S_1^{1/2}), so symmetric
eigenvalue solvers in float64 do it, with no complex numbers (evaluation.md §1.3). Statistics are float64: mean
and the unbiased (N - 1) covariance, as `np.cov(rowvar=False)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dd2_eval._arrays import as_tensor
from dd2_eval.errors import EvalError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of a feature set, float64.

    Shapes: mu (D,), sigma (D, D). `num` is the number of features they came from (None when read from a file
    that does not record it, e.g. ADM's reference batches).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num: int | None = None

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if mu.ndim != 1:
            raise EvalError(f"FeatureStats.mu: expected shape (D,), got {mu.shape}")
        d = mu.shape[0]
        if sigma.shape != (d, d):
            raise EvalError(f"FeatureStats.sigma: expected shape (D, D) = ({d}, {d}) to match mu, got {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise EvalError("FeatureStats: mu or sigma holds NaN or inf; were the features finite?")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def feature_stats(features: np.ndarray | Tensor) -> FeatureStats:
    """Mean and unbiased covariance of (N, D) features in float64 (the same numbers as np.mean / np.cov).

    Shapes: features (N, D) -> FeatureStats(mu (D,), sigma (D, D)).
    """
    running = RunningStats(_as_2d("features", features).shape[1])
    running.update(features)
    return running.stats()


class RunningStats:
    """Streaming float64 mean and covariance over batches of features (Chan et al.'s pairwise update).

    Keeps n, the mean and M2 = sum_i (x_i - mean)(x_i - mean)^T on the device of the first batch, so that
    sample features never have to be held in memory. Merging a batch b into the running set a:

        delta = mean_b - mean_a,  n = n_a + n_b
        mean  = mean_a + delta * n_b / n
        M2    = M2_a + M2_b + delta delta^T * n_a n_b / n
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise EvalError(f"RunningStats: dim must be >= 1, got {dim}")
        self.dim = dim
        self.num = 0
        self._mean: Tensor | None = None  # (D,) float64
        self._m2: Tensor | None = None  # (D, D) float64

    def update(self, features: np.ndarray | Tensor) -> None:
        """Add a batch. Shapes: features (B, D)."""
        x = _as_2d("features", features)
        if x.shape[1] != self.dim:
            raise EvalError(f"RunningStats.update: expected features (B, {self.dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return
        x = x.to(torch.float64)
        n_b = x.shape[0]
        mean_b = x.mean(0)  # (D,)
        xc = x - mean_b  # (B, D)
        m2_b = xc.T @ xc  # (D, D)
        if self._mean is None or self._m2 is None:
            self._mean, self._m2, self.num = mean_b, m2_b, n_b
            return
        n_a = self.num
        n = n_a + n_b
        delta = mean_b.to(self._mean.device) - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b.to(self._m2.device) + torch.outer(delta, delta) * (n_a * n_b / n)
        self.num = n

    def stats(self) -> FeatureStats:
        """The unbiased statistics so far (needs at least two features)."""
        if self.num < 2 or self._mean is None or self._m2 is None:
            raise EvalError(f"RunningStats: a covariance needs at least 2 features, got {self.num}")
        sigma = self._m2 / (self.num - 1)
        sigma = 0.5 * (sigma + sigma.T)  # exact symmetry; the update is symmetric up to round-off only
        return FeatureStats(self._mean.cpu().numpy(), sigma.cpu().numpy(), self.num)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (S_1 S_2)^{1/2} = sum_i sqrt(lambda_i(A)) for a symmetric PSD A similar to S_1 S_2, in float64.

    A = L^T S_2 L with the Cholesky factor S_1 = L L^T when S_1 is positive definite (fast); else the same with
    the roles swapped (S_1 S_2 and S_2 S_1 have the same eigenvalues), e.g. a few samples against full-rank
    reference statistics; else A = S_1^{1/2} S_2 S_1^{1/2} through an eigendecomposition of S_1 (both rank-
    deficient: several times slower on 2048 x 2048). Tiny negative eigenvalues from round-off are clipped to 0.
    torch's LAPACK is used because it is several times faster than NumPy's here.
    Shapes: sigma1 (D, D), sigma2 (D, D) -> scalar.
    """
    s1 = torch.from_numpy(np.asarray(sigma1, dtype=np.float64))
    s2 = torch.from_numpy(np.asarray(sigma2, dtype=np.float64))
    s1, s2 = 0.5 * (s1 + s1.T), 0.5 * (s2 + s2.T)
    factor, other = None, s2
    for candidate, rest in ((s1, s2), (s2, s1)):
        chol, info = torch.linalg.cholesky_ex(candidate)
        if int(info) == 0:
            factor, other = chol, rest
            break
    if factor is None:  # neither is positive definite: symmetric square root of S_1
        w, v = torch.linalg.eigh(s1)
        factor = (v * w.clamp_min(0).sqrt()) @ v.T  # (D, D) S_1^{1/2}
    a = factor.T @ other @ factor  # (D, D), eigenvalues = those of S_1 S_2
    a = 0.5 * (a + a.T)
    return float(torch.linalg.eigvalsh(a).clamp_min(0).sqrt().sum())


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """Fréchet distance between the Gaussians N(mu_a, S_a) and N(mu_b, S_b) (module docstring).

    Shapes: a.mu (D,), a.sigma (D, D), b likewise -> scalar.
    """
    if a.dim != b.dim:
        raise EvalError(
            f"frechet_distance: feature dimensions differ: {a.dim} vs {b.dim}; were both statistics computed "
            "with the same network and layer (pool3: 2048, sFID spatial: 2023)?"
        )
    for name, s in (("first", a), ("second", b)):
        asym = float(np.abs(s.sigma - s.sigma.T).max())
        scale = max(float(np.abs(s.sigma).max()), 1e-300)
        if asym > 1e-6 * scale:
            raise EvalError(f"frechet_distance: the {name} covariance is not symmetric (max |S - S^T| = {asym:.3g})")
    diff = a.mu - b.mu
    fd = float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * trace_sqrt_product(a.sigma, b.sigma))
    return fd


def _as_2d(name: str, x: np.ndarray | Tensor) -> Tensor:
    t = as_tensor(x)
    if t.dim() != 2:
        raise EvalError(f"{name}: expected shape (N, D), got {tuple(t.shape)}")
    if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64, torch.uint8)):
        raise EvalError(f"{name}: expected a real-valued array, got dtype {t.dtype}")
    return t.detach()
