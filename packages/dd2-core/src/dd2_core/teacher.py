"""What dd2-core needs from an AR teacher.

Core cannot import dd2_teachers, so it declares the shape of a teacher here; `dd2_teachers.LlamaGenTeacher`,
`dd2_teachers.VARTeacher` and `dd2_teachers.ToyTeacher` implement it (DESIGN.md, Key interfaces).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Teacher(Protocol):
    """An AR teacher over a VQ codebook, seen as conditional categorical distributions per token group.

    Attributes:
        codebook: (V, C) code vectors c_j exactly as the teacher's tokens live in continuous space
            (LlamaGen: L2-normalised rows; VAR: raw rows).
        num_tokens: N, tokens per sequence.
        num_classes: real classes; the null (unconditional) class id is `num_classes`.
        token_groups: sizes of the groups that are generated together (sum = N). Tokens of one group are
            conditionally independent given earlier groups: (1,)*N for LlamaGen, (1, 4, 9, ...) for VAR.
    """

    codebook: Tensor
    num_tokens: int
    num_classes: int
    token_groups: tuple[int, ...]

    def log_probs(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced log p(q_i | q_<i, class) after the family's CFG policy, temperature and top-k/top-p;
        filtered codes are -inf. One pass (two with CFG) over continuous prefix tokens; row i depends only on
        tokens of groups before i's group.  Shapes: tokens (B, N, C), labels (B,) -> (B, N, V) float32."""
        ...

    def sample(self, labels: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Ancestral AR sampling with the teacher's policy.  Shapes: labels (B,) -> ids (B, N) int64."""
        ...

    def embed(self, ids: Tensor) -> Tensor:
        """Code vectors of token ids.  Shapes: ids (B, N) -> (B, N, C)."""
        ...


def group_index(token_groups: tuple[int, ...], device: torch.device | str | None = None) -> Tensor:
    """Group id of every token position.  Shapes: -> (N,) int64, e.g. (1, 4) -> [0, 1, 1, 1, 1]."""
    sizes = torch.tensor(token_groups, dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(token_groups), device=device), sizes)


def group_slices(token_groups: tuple[int, ...]) -> list[slice]:
    """Token slice of every group, in generation order."""
    out, start = [], 0
    for size in token_groups:
        out.append(slice(start, start + size))
        start += size
    return out
