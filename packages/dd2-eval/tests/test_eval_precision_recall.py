"""Precision/recall and density/coverage against brute-force references on small random sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dd2_eval.errors import EvalError
from dd2_eval.precision_recall import density_coverage, manifold_radii, pairwise_sq_distances, precision_recall


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # (n, m), float64


def _brute_force_pr(ref: np.ndarray, smp: np.ndarray, k: int) -> tuple[float, float]:
    r_ref = np.sort(_sq_dists(ref, ref), axis=1)[:, k]  # k-th neighbour, self at index 0
    r_smp = np.sort(_sq_dists(smp, smp), axis=1)[:, k]
    d = _sq_dists(ref, smp)  # (N_r, N_s)
    precision = np.mean([any(d[j, i] <= r_ref[j] for j in range(len(ref))) for i in range(len(smp))])
    recall = np.mean([any(d[j, i] <= r_smp[i] for i in range(len(smp))) for j in range(len(ref))])
    return float(precision), float(recall)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("row_batch", "col_batch"), [(10_000, 10_000), (7, 5)])
def test_precision_recall_equals_brute_force(seed, row_batch, col_batch):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((40, 6))
    smp = rng.standard_normal((33, 6)) * 0.8 + 0.7  # partly overlapping
    ours = precision_recall(ref, smp, k=3, row_batch=row_batch, col_batch=col_batch, distance_dtype=torch.float64)
    expected = _brute_force_pr(ref, smp, 3)
    assert (ours.precision, ours.recall) == pytest.approx(expected, abs=0)
    assert 0 < ours.precision < 1 and 0 < ours.recall < 1  # a non-trivial case
    fp32 = precision_recall(ref.astype(np.float32), smp.astype(np.float32), row_batch=row_batch, col_batch=col_batch)
    assert (fp32.precision, fp32.recall) == pytest.approx(expected, abs=1 / 33)


def test_manifold_radii_and_collapse():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((25, 3))
    np.testing.assert_allclose(
        manifold_radii(x, k=2, row_batch=4, col_batch=6, distance_dtype=torch.float64).numpy(),
        np.sort(_sq_dists(x, x), axis=1)[:, 2],
        rtol=1e-6,
    )
    # collapse: 10 distinct samples repeated 5 times each have k-NN radius 0, so they cover nothing: recall -> ~0
    ref = rng.standard_normal((60, 4))
    collapsed = np.repeat(ref[:10], 5, axis=0)
    pr = precision_recall(ref, collapsed, k=3)
    assert pr.precision == 1.0 and pr.recall <= 10 / 60


def test_fp16_distances_and_fallback():
    rng = np.random.default_rng(5)
    a, b = torch.from_numpy(rng.standard_normal((20, 8))).float(), torch.from_numpy(rng.standard_normal((9, 8))).float()
    exact = torch.from_numpy(_sq_dists(a.double().numpy(), b.double().numpy())).float()
    torch.testing.assert_close(pairwise_sq_distances(a, b, distance_dtype=torch.float16), exact, atol=0.05, rtol=0.01)
    big_a, big_b = a * 1000, b * 1000  # |x|^2 ~ 8e6 overflows fp16 (max 65504): ADM falls back to fp32
    torch.testing.assert_close(
        pairwise_sq_distances(big_a, big_b, distance_dtype=torch.float16), pairwise_sq_distances(big_a, big_b)
    )


def test_density_coverage_equals_brute_force():
    rng = np.random.default_rng(6)
    real, fake = rng.standard_normal((30, 5)), rng.standard_normal((22, 5)) * 1.3
    k = 5
    radii = np.sort(_sq_dists(real, real), axis=1)[:, k]
    inside = _sq_dists(real, fake) < radii[:, None]  # (N_r, N_f)
    ours = density_coverage(real, fake, k=k, batch=7)
    assert ours.density == pytest.approx(inside.sum() / (k * len(fake)), rel=1e-12)
    assert ours.coverage == pytest.approx(inside.any(1).mean(), rel=1e-12)


def test_bad_input():
    with pytest.raises(EvalError, match=r"need at least k \+ 1 = 4 features, got 3"):
        precision_recall(np.zeros((3, 2)), np.zeros((5, 2)))
    with pytest.raises(EvalError, match="feature dims differ: reference 2, samples 3"):
        precision_recall(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(EvalError, match=r"expected features \(N, D\)"):
        precision_recall(np.zeros(5), np.zeros((5, 3)))


def test_precomputed_reference_radii_give_the_same_result():
    rng = np.random.default_rng(8)
    ref, a, b = rng.standard_normal((40, 4)), rng.standard_normal((25, 4)), rng.standard_normal((31, 4)) * 2
    radii_3, radii_5 = manifold_radii(ref, k=3), manifold_radii(ref, k=5)
    for samples in (a, b):  # one reference, several sample sets
        assert precision_recall(ref, samples, reference_radii=radii_3) == precision_recall(ref, samples)
        assert density_coverage(ref, samples, real_radii=radii_5) == density_coverage(ref, samples)
    with pytest.raises(EvalError, match=r"radii: expected shape \(40,\) \(one per reference feature\), got \(39,\)"):
        precision_recall(ref, a, reference_radii=radii_3[:39])
    with pytest.raises(EvalError, match=r"radii: expected shape \(40,\)"):
        density_coverage(ref, a, real_radii=radii_5[None])
