"""Fréchet distance and streaming statistics against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dd2_eval.errors import EvalError
from dd2_eval.fid import FeatureStats, RunningStats, feature_stats, frechet_distance


def _random_psd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d)) * rng.uniform(0.2, 2.0, size=rank or d)
    return a @ a.T / (rank or d)


def _reference_fd(mu1, s1, mu2, s2) -> float:
    """ADM/pytorch-fid's formula with tr sqrtm(S1 S2); scipy's sqrtm if importable, else sum sqrt(eigvals(S1 S2))."""
    try:
        from scipy.linalg import sqrtm

        tr_covmean = np.trace(sqrtm(s1 @ s2)).real
    except ImportError:
        tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(np.complex128)).real.sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_frechet_matches_float64_reference_on_random_psd(seed):
    rng = np.random.default_rng(seed)
    d = 48
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) * 0.5
    s1, s2 = _random_psd(rng, d), _random_psd(rng, d)
    ours = frechet_distance(FeatureStats(mu1, s1), FeatureStats(mu2, s2))
    ref = _reference_fd(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-8 * max(1.0, abs(ref)), (ours, ref)


# which covariances are singular picks the route: Cholesky of S1, of S2, or the eigendecomposition of S1
@pytest.mark.parametrize(("singular_1", "singular_2"), [(False, False), (True, False), (True, True)])
def test_frechet_closed_form_for_commuting_covariances(singular_1, singular_2):
    # diagonal covariances commute: tr (S1 S2)^1/2 = sum sqrt(a_i b_i), so FD = |dmu|^2 + sum (sqrt a_i - sqrt b_i)^2
    rng = np.random.default_rng(5)
    a, b = rng.uniform(0.1, 3.0, 32), rng.uniform(0.1, 3.0, 32)
    a[:5] = 0.0 if singular_1 else a[:5]
    b[3:9] = 0.0 if singular_2 else b[3:9]
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    ours = frechet_distance(FeatureStats(mu1, np.diag(a)), FeatureStats(mu2, np.diag(b)))
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_frechet_rank_deficient_statistics():
    # fewer features than dimensions, as with 1000 images in 2048-d: both covariances are singular
    rng = np.random.default_rng(7)
    d = 64
    s1, s2 = _random_psd(rng, d, rank=20), _random_psd(rng, d, rank=30)
    mu = np.zeros(d)
    ours = frechet_distance(FeatureStats(mu, s1), FeatureStats(mu + 0.1, s2))
    ref = _reference_fd(mu, s1, mu + 0.1, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)


def test_frechet_of_identical_statistics_is_zero():
    rng = np.random.default_rng(3)
    s = feature_stats(rng.standard_normal((500, 40)) * 3 + 1)
    assert abs(frechet_distance(s, s)) < 1e-8


def test_feature_stats_equal_numpy_mean_and_cov():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32) + 1000.0  # large offset: the naive sum formula would lose it
    stats = feature_stats(x)
    np.testing.assert_allclose(stats.mu, x.astype(np.float64).mean(0), rtol=1e-14)
    np.testing.assert_allclose(stats.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.num == 300


def test_running_stats_streaming_equals_one_shot():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((257, 12)) * rng.uniform(0.1, 5, 12) + rng.uniform(-50, 50, 12)
    running = RunningStats(12)
    for start, size in [(0, 1), (1, 64), (65, 100), (165, 0), (165, 92)]:
        running.update(torch.from_numpy(x[start : start + size]))
    stats = running.stats()
    assert stats.num == 257
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-11, atol=1e-12)
    assert np.array_equal(stats.sigma, stats.sigma.T)


def test_bad_inputs_raise_clear_errors():
    good = FeatureStats(np.zeros(4), np.eye(4))
    with pytest.raises(EvalError, match=r"sigma: expected shape \(D, D\) = \(4, 4\)"):
        FeatureStats(np.zeros(4), np.eye(3))
    with pytest.raises(EvalError, match="NaN or inf"):
        FeatureStats(np.array([0, np.nan, 0, 0.0]), np.eye(4))
    with pytest.raises(EvalError, match="dimensions differ: 4 vs 3"):
        frechet_distance(good, FeatureStats(np.zeros(3), np.eye(3)))
    asym = np.eye(4)
    asym[0, 1] = 0.5
    with pytest.raises(EvalError, match="not symmetric"):
        frechet_distance(good, FeatureStats(np.zeros(4), asym))
    with pytest.raises(EvalError, match="at least 2 features"):
        feature_stats(np.zeros((1, 4)))
    with pytest.raises(EvalError, match=r"expected features \(B, 4\), got \(2, 5\)"):
        RunningStats(4).update(np.zeros((2, 5)))
