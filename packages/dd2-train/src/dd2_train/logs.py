"""Logging of a training run: handlers per rank, the step line, `log.jsonl` and TensorBoard events.

Rank 0 logs INFO to the console and to `<stage dir>/log.txt`; other ranks log WARNING only (DiT). Metrics come
from the step functions as detached 0-dim tensors; `MetricsLogger.log` reduces them over ranks (one all-reduce of a
stacked tensor) and calls `.item()` only there, on log steps: that is the CPU-GPU sync point.

The step line is fixed and greppable:
    csd step 000120/012000 | loss_csd 1.234e-02 | loss_fcs 4.560e-01 | lr_generator 1.00e-05 | 3.41 it/s |
    435.2 samples/s | eta 0:58:12 | mem 52.1 GiB
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

_FORMAT = "%(asctime)s [rank%(rank)s] %(levelname)s %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int, stage_dir: Path | None = None) -> None:
    """Entry points call this once: INFO (+ `log.txt`) on rank 0, WARNING elsewhere. Idempotent."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_dd2", False):
            root.removeHandler(h)
            h.close()
    level = logging.INFO if rank == 0 else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0 and stage_dir is not None:
        stage_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(stage_dir / "log.txt"))
    for h in handlers:
        h._dd2 = True  # type: ignore[attr-defined]
        h.setFormatter(logging.Formatter(_FORMAT))
        h.addFilter(_RankFilter(rank))
        h.setLevel(level)
        root.addHandler(h)
    root.setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def format_eta(seconds: float) -> str:
    """Seconds -> 'H:MM:SS' ('?' when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(timedelta(seconds=int(round(seconds))))


class Throughput:
    """it/s, samples/s and ETA over the steps since the last call (the first window starts at construction)."""

    def __init__(self, start_step: int, total_steps: int, samples_per_step: int):
        self.total_steps = total_steps
        self.samples_per_step = samples_per_step
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def update(self, step: int) -> dict[str, float]:
        """`step` = number of completed steps. Returns it_s, samples_s, eta_s."""
        now = time.perf_counter()
        steps = step - self._last_step
        dt = max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        it_s = steps / dt
        eta = (self.total_steps - step) / it_s if it_s > 0 else float("inf")
        return {"it_s": it_s, "samples_s": it_s * self.samples_per_step, "eta_s": eta}


def reduce_metrics(metrics: Mapping[str, Tensor | float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean over ranks of every metric, as floats. Collective: every rank must call it with the same keys.

    `device` is where the reduction runs (the rank's accelerator under NCCL)."""
    if not metrics:
        return {}
    keys = sorted(metrics)
    values = [metrics[k] for k in keys]
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).detach().float() for v in values])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(keys, stacked.tolist()))  # .tolist() is the CPU-GPU sync point


class MetricsLogger:
    """Writes the step line (rank 0), appends to `log.jsonl` and, optionally, TensorBoard events under `events/`."""

    def __init__(self, stage_dir: Path, *, stage: str, rank: int, device: torch.device | str, tensorboard: bool):
        self.stage = stage
        self.rank = rank
        self.device = device
        self.path = stage_dir / "log.jsonl"
        self._tb = None
        if rank == 0 and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(stage_dir / "events"))

    def log(self, step: int, total: int, metrics: Mapping[str, Tensor | float], speed: Mapping[str, float]) -> dict:
        """Reduce `metrics` over ranks (collective), then write them on rank 0. Returns the reduced values."""
        values = reduce_metrics(metrics, self.device)
        if self.rank != 0:
            return values
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        record = {"stage": self.stage, "step": step, "time": time.time(), **values, **speed}
        if mem is not None:
            record["mem_gib"] = mem
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{self.stage}/{k}", v, step)
            for k in ("it_s", "samples_s"):
                if k in speed:
                    self._tb.add_scalar(f"{self.stage}/{k}", speed[k], step)
            self._tb.flush()
        parts = [f"{self.stage} step {step:06d}/{total:06d}"]
        parts += [f"{k} {v:.3e}" for k, v in values.items()]
        if speed:
            parts += [
                f"{speed['it_s']:.2f} it/s",
                f"{speed['samples_s']:.1f} samples/s",
                f"eta {format_eta(speed['eta_s'])}",
            ]
        if mem is not None:
            parts.append(f"mem {mem:.1f} GiB")
        logger.info(" | ".join(parts))
        return values

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
