"""Latency and throughput of a one-step pipeline against its teacher's AR sampler, eager and `torch.compile`d.

Latency is the median wall time of one call at batch 1; throughput is images/s of one call at batch 64 (median
call time). Each (target, mode, batch) is called `warmup` times untimed (the first call of a compiled target
compiles; its time is kept as `first_call_s`), then `repeats` times, each call bracketed by a device synchronise
so that asynchronous CUDA work is counted. Every number is reported with the device name, dtype, batch size and
torch version (STYLE.md §2.8). Both sides include decoding to pixels: the pipeline's call, and the teacher's
`sample(labels, generator=...)` (the Teacher protocol's AR sampler) followed by its `decode(ids)` when it has one.

Compiled mode: the pipeline's whole call goes through `torch.compile` (one step, so dynamo traces the generator
and decoder, methods included); a teacher's AR loop must not be unrolled that way, so its compiled variant is the
teacher built with its own compiled decode step (dd2_teachers: `compile=True`, CUDA graphs on CUDA). `dd2-eval
bench` builds both from the pipeline's teacher_ref.json through the dd2-teachers plugin (dd2_eval.teacher).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dd2_eval.errors import EvalError

logger = logging.getLogger(__name__)

Mode = Literal["eager", "compiled"]


class BenchConfig(BaseModel):
    """What `bench_pipeline` measures."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_batch: int = Field(1, ge=1, description="batch size of the latency measurement")
    throughput_batch: int = Field(64, ge=1, description="batch size of the throughput measurement")
    warmup: int = Field(
        3, ge=0, description="untimed calls first (compilation happens in the first); 0 = the first timed call compiles"
    )
    repeats: int = Field(10, ge=1, description="timed calls; the median is reported")
    modes: tuple[Mode, ...] = Field(("eager", "compiled"), min_length=1)
    compile_backend: str = Field("inductor", description="torch.compile backend ('eager' to test the wiring)")
    compile_mode: str | None = Field(None, description="torch.compile mode, e.g. 'max-autotune'")
    seed: int = Field(0, description="seed of every call (same noise each repeat)")


@dataclass(frozen=True)
class Timing:
    """One measured (target, mode, batch size)."""

    target: str
    mode: str
    batch_size: int
    median_s: float
    images_per_s: float
    first_call_s: float
    times_s: list[float]


@dataclass
class BenchReport:
    """All timings plus the context needed to read them."""

    device: str
    dtype: str
    torch_version: str
    config: dict[str, Any]
    timings: list[Timing] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    host: str = field(default_factory=platform.node)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write_json(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    def table(self) -> str:
        """A one-screen text table: latency (ms) and throughput (images/s) per target and mode."""
        lines = [f"device {self.device} | dtype {self.dtype} | torch {self.torch_version}"]
        lines.append(f"{'target':<24} {'mode':<9} {'batch':>5} {'median ms':>10} {'images/s':>10} {'1st call s':>10}")
        for t in self.timings:
            lines.append(
                f"{t.target:<24} {t.mode:<9} {t.batch_size:>5} {t.median_s * 1e3:>10.2f} "
                f"{t.images_per_s:>10.1f} {t.first_call_s:>10.2f}"
            )
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (a CPU-GPU sync point; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], *, warmup: int, repeats: int, device: torch.device
) -> tuple[float, list[float]]:
    """Wall time of the first call (the first warm-up call, or the first timed one when `warmup` is 0) and of each
    of `repeats` timed calls, in seconds."""
    first = 0.0
    for i in range(warmup):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        if i == 0:
            first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return (first if warmup else times[0]), times


def bench_pipeline(
    pipe: Any,
    *,
    teacher: Any | None = None,
    teacher_compiled: Any | None = None,
    cfg: BenchConfig | None = None,
    device: torch.device | str | None = None,
    dtype: str = "float32",
    pipeline_name: str = "dd2 one-step",
    teacher_name: str = "teacher AR",
    teacher_compiled_note: str | None = None,
) -> BenchReport:
    """Time the pipeline and, if given, the teacher's AR sampler (module docstring).

    `teacher_compiled` is the teacher built with its own compiled decode step (e.g. LlamaGenTeacherConfig(compile=
    True)); without it the teacher's compiled mode is skipped and a note says so (`teacher_compiled_note`: why, if
    the caller knows). `device` is where labels live and what is synchronised (default: the pipeline's `device`
    attribute or CPU); `dtype` is only recorded.
    """
    cfg = cfg or BenchConfig()
    dev = torch.device(device if device is not None else getattr(pipe, "device", "cpu"))
    num_classes = int(pipe.num_classes)
    report = BenchReport(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or 'x86'})",
        dtype=dtype,
        torch_version=torch.__version__,
        config=cfg.model_dump(),
    )

    def pipe_call(labels: Tensor) -> object:
        return pipe(labels, seed=cfg.seed)

    def teacher_call(target: Any) -> Callable[[Tensor], object]:
        def call(labels: Tensor) -> object:
            ids = target.sample(labels, generator=torch.Generator(dev).manual_seed(cfg.seed))
            return target.decode(ids) if hasattr(target, "decode") else ids

        return call

    calls: list[tuple[str, str, Callable[[Tensor], object]]] = []
    for mode in cfg.modes:
        if mode == "eager":
            calls.append((pipeline_name, mode, pipe_call))
        else:  # one step, no Python loop: compile the whole call, so that methods of submodules are traced too
            calls.append(
                (pipeline_name, mode, torch.compile(pipe_call, backend=cfg.compile_backend, mode=cfg.compile_mode))
            )
    if teacher is not None:
        for mode in cfg.modes:
            if mode == "eager":
                calls.append((teacher_name, mode, teacher_call(teacher)))
            elif teacher_compiled is not None:
                calls.append((teacher_name, mode, teacher_call(teacher_compiled)))
            else:
                why = teacher_compiled_note or (
                    "pass teacher_compiled, the teacher built with its own compiled decode step; compiling a whole "
                    "AR loop would unroll it"
                )
                report.notes.append(f"{teacher_name} compiled: not measured ({why})")
    for name, mode, call in calls:
        for batch in (cfg.latency_batch, cfg.throughput_batch):
            labels = torch.arange(batch, device=dev) % num_classes
            with torch.inference_mode():
                first, times = time_calls(partial(call, labels), warmup=cfg.warmup, repeats=cfg.repeats, device=dev)
            median = statistics.median(times)
            report.timings.append(Timing(name, mode, batch, median, batch / median, first, times))
            logger.info("%s %s batch %d: %.2f ms (%.1f images/s)", name, mode, batch, median * 1e3, batch / median)
    return report


def bar_chart_png(
    report: BenchReport, path: str | os.PathLike, *, latency_batch: int = 1, throughput_batch: int = 64
) -> None:
    """Two horizontal bar panels, latency (ms, lower is better) and throughput (images/s, higher is better), one bar
    per target and mode, drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    panels = [
        (f"latency, batch {latency_batch} (ms, lower is better)", latency_batch, lambda t: t.median_s * 1e3),
        (
            f"throughput, batch {throughput_batch} (images/s, higher is better)",
            throughput_batch,
            lambda t: t.images_per_s,
        ),
    ]
    rows = [[t for t in report.timings if t.batch_size == b] for _, b, _ in panels]
    if not any(rows):
        raise EvalError(f"bar_chart_png: no timings at batch {latency_batch} or {throughput_batch}")
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    bar_h, gap, label_w, plot_w, pad = 22, 8, 220, 420, 16
    panel_h = [40 + len(r) * (bar_h + gap) for r in rows]
    width = label_w + plot_w + 110
    height = 50 + sum(panel_h) + pad * len(panels)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 12), f"{report.device} | {report.dtype} | torch {report.torch_version}", fill="black", font=font)
    colors = {"eager": (90, 120, 200), "compiled": (230, 130, 50)}
    y = 50
    for (title, _, value), timings, h in zip(panels, rows, panel_h):
        draw.text((pad, y), title, fill="black", font=font)
        top = y + 28
        vmax = max((value(t) for t in timings), default=1.0) or 1.0
        for i, t in enumerate(timings):
            by = top + i * (bar_h + gap)
            v = value(t)
            draw.text((pad, by + 4), f"{t.target} ({t.mode})", fill="black", font=small)
            draw.rectangle([label_w, by, label_w + max(1, int(plot_w * v / vmax)), by + bar_h], fill=colors.get(t.mode))
            draw.text((label_w + int(plot_w * v / vmax) + 6, by + 4), f"{v:,.1f}", fill="black", font=small)
        draw.line([label_w, top - 2, label_w, top + len(timings) * (bar_h + gap)], fill="black")
        y += h + pad
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
