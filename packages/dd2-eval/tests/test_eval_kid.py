"""KID: the unbiased polynomial-kernel MMD against a double-loop reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dd2_eval.errors import EvalError
from dd2_eval.kid import kernel_inception_distance, polynomial_mmd2


def _reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return float(xx + yy - 2 * xy)


def test_polynomial_mmd_equals_double_loop():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.3
    assert polynomial_mmd2(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(_reference_mmd2(x, y), rel=1e-12)


def test_kid_subsets_and_sign():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((30, 4)), rng.standard_normal((25, 4))
    # subsets as large as the smaller set draw it whole, so every subset of b is b (up to order)
    full = kernel_inception_distance(a[:25], b, num_subsets=3, subset_size=100)
    assert full.subset_size == 25 and full.std == pytest.approx(0.0, abs=1e-12)
    assert full.mean == pytest.approx(_reference_mmd2(a[:25], b), rel=1e-10)
    same = kernel_inception_distance(rng.standard_normal((400, 4)), rng.standard_normal((400, 4)), subset_size=100)
    shifted = kernel_inception_distance(
        rng.standard_normal((400, 4)), rng.standard_normal((400, 4)) + 1, subset_size=100
    )
    assert abs(same.mean) < 0.05 < shifted.mean
    again = kernel_inception_distance(a, b, num_subsets=4, subset_size=10, seed=3)
    assert again == kernel_inception_distance(a, b, num_subsets=4, subset_size=10, seed=3)  # seeded


def test_bad_input():
    with pytest.raises(EvalError, match="feature dims differ"):
        kernel_inception_distance(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(EvalError, match="need >= 2 features per set"):
        kernel_inception_distance(np.zeros((1, 2)), np.zeros((5, 2)))
