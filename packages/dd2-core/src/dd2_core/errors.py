"""Errors raised by dd2-core, and the boundary checks that produce them.

Every message names the argument, what was expected and what was received (DESIGN.md, Conventions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class DD2Error(Exception):
    """Root of every error that dd2-core raises on purpose."""


class DD2ValueError(DD2Error, ValueError):
    """A tensor, config value or file that a caller passed in is not what was expected."""


class CheckpointError(DD2Error, ValueError):
    """A checkpoint or pipeline folder does not match the model it is loaded into."""


def expect_shape(name: str, x: Tensor, expected: Sequence[int | None]) -> None:
    """Raise DD2ValueError unless `x.shape` matches `expected` (None = any size).

    Example message: ``x0: expected (B, N, 8) = (None, None, 8), got (4, 256, 32)``.
    """
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise DD2ValueError(f"{name}: expected shape {want}, got {shape}")


def expect_labels(
    name: str, labels: Tensor, num_classes: int, *, allow_null: bool = True, batch: int | None = None
) -> None:
    """Raise DD2ValueError unless `labels` is an integer (B,) tensor in [0, num_classes] (num_classes = null class)."""
    if labels.dim() != 1 or (batch is not None and labels.shape[0] != batch):
        want = f"({batch},)" if batch is not None else "(B,)"
        raise DD2ValueError(f"{name}: expected shape {want}, got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DD2ValueError(f"{name}: expected an integer tensor, got dtype {labels.dtype}")
    if labels.numel() == 0:
        return
    hi = num_classes if allow_null else num_classes - 1
    lo_found, hi_found = int(labels.min()), int(labels.max())
    if lo_found < 0 or hi_found > hi:
        raise DD2ValueError(
            f"{name}: expected class ids in [0, {hi}] ({num_classes} classes"
            + (f", null class = {num_classes}" if allow_null else "")
            + f"), got values in [{lo_found}, {hi_found}]"
        )


def expect_t(name: str, t: Tensor) -> None:
    """Raise DD2ValueError unless every t lies in (0, 1] (t = 0 is data; the posterior divides by t)."""
    if t.numel() and (bool((t <= 0).any()) or bool((t > 1).any())):
        raise DD2ValueError(f"{name}: expected every t in (0, 1], got values in [{float(t.min())}, {float(t.max())}]")
