"""Inception Score: ADM's in-order split convention on synthetic logits."""

from __future__ import annotations

import numpy as np
import pytest

from dd2_eval.errors import EvalError
from dd2_eval.inception_score import inception_score


def _adm_reference(logits: np.ndarray, split_size: int) -> float:
    """ADM's compute_inception_score: softmax, consecutive splits of split_size (last one shorter), mean of
    exp(mean_x sum_y p log(p / p_split)), written out here in float64."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i : i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def _torch_fidelity_style(logits: np.ndarray, splits: int = 10, seed: int = 2020) -> float:
    """The other convention: shuffle, then 10 equal splits."""
    return _adm_reference(logits[np.random.default_rng(seed).permutation(len(logits))], len(logits) // splits)


@pytest.mark.parametrize(("n", "split_size"), [(23, 5), (40, 40), (12_000, 5000)])
def test_matches_adm_split_convention(n, split_size):
    rng = np.random.default_rng(n)
    # class-sorted, confident logits: the order of the samples matters, as with class-major sample files
    logits = rng.standard_normal((n, 50)) * 2
    logits[np.arange(n), np.sort(rng.integers(0, 50, n))] += 6
    score = inception_score(logits, split_size=split_size)
    assert score.num_splits == -(-n // split_size)
    assert score.mean == pytest.approx(_adm_reference(logits, split_size), rel=1e-10)
    if score.num_splits > 1:
        assert abs(score.mean - _torch_fidelity_style(logits, splits=score.num_splits)) > 1e-3


def test_known_values():
    assert inception_score(np.zeros((10, 7)), split_size=10).mean == pytest.approx(1.0)  # p(y|x) = p(y): KL 0
    one_hot = np.full((8, 8), -1e4)
    one_hot[np.arange(8), np.arange(8)] = 0.0  # each sample sure of a different class
    score = inception_score(one_hot, split_size=4)  # two splits of 4 distinct classes each
    assert score.mean == pytest.approx(4.0) and score.std == pytest.approx(0.0) and score.num_splits == 2


def test_bad_input():
    with pytest.raises(EvalError, match=r"expected logits \(N, K\)"):
        inception_score(np.zeros(5))
    with pytest.raises(EvalError, match="split_size must be >= 1"):
        inception_score(np.zeros((4, 3)), split_size=0)
