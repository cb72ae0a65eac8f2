"""Conversion of NumPy arrays to tensors without PyTorch's non-writable-array warning (streamed npz batches are
read-only views of a bytes buffer)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def as_tensor(x: np.ndarray | Tensor) -> Tensor:
    """A tensor sharing memory with `x` where it can; read-only arrays are copied."""
    if isinstance(x, Tensor):
        return x
    arr = np.asarray(x)
    if not arr.flags.writeable:
        arr = arr.copy()
    return torch.from_numpy(arr)
