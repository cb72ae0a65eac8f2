"""Inception Score with ADM's split convention (openai/guided-diffusion `evaluations/evaluator.py`).

    IS = exp( E_x KL( p(y|x) || p(y) ) ),   p(y) = mean of p(y|x) over the split

ADM cuts the samples **in order** into consecutive splits of `split_size` = 5000 (10 splits for 50k; a shorter
last split is kept), computes IS per split and reports the **mean** over splits; we also return the std. This
differs from torch-fidelity, which shuffles (seed 2020) into 10 equal splits. The logits are pool3 @ W^T with the
2015 graph's 1008 x 2048 `softmax/logits` weight and no bias (evaluation.md §1.4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dd2_eval._arrays import as_tensor
from dd2_eval.errors import EvalError

ADM_SPLIT_SIZE = 5000


@dataclass(frozen=True)
class InceptionScore:
    """IS mean and std over splits, with the split layout used."""

    mean: float
    std: float
    num_splits: int
    split_size: int


def inception_score(logits: np.ndarray | Tensor, *, split_size: int = ADM_SPLIT_SIZE) -> InceptionScore:
    """IS of classifier logits, splits in order (module docstring). Computed in float64 from log-softmax, so a
    probability that underflows to 0 contributes 0 (not NaN) to the KL.

    Shapes: logits (N, K) -> InceptionScore.
    """
    x = as_tensor(logits)
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 2:
        raise EvalError(f"inception_score: expected logits (N, K) with N >= 1, K >= 2, got {tuple(x.shape)}")
    if split_size < 1:
        raise EvalError(f"inception_score: split_size must be >= 1, got {split_size}")
    log_p = torch.log_softmax(x.detach().to(torch.float64), dim=1)  # (N, K) log p(y|x)
    scores = []
    for start in range(0, x.shape[0], split_size):
        part = log_p[start : start + split_size]  # (n, K)
        log_py = torch.logsumexp(part, dim=0) - np.log(part.shape[0])  # (K,) log p(y) over the split
        kl = (part.exp() * (part - log_py)).sum(1).mean()  # E_x KL(p(y|x) || p(y))
        scores.append(float(kl.exp()))
    return InceptionScore(float(np.mean(scores)), float(np.std(scores)), len(scores), split_size)
