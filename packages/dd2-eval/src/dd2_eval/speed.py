"""Latency and throughput of a one-step pipeline against its teacher's AR sampler, eager and `torch.compile`d.

Latency is the median wall time of one call at batch 1; throughput is images/s of one call at batch 64 (median
call time). Each (target, mode, batch) is called `warmup` times untimed (the first call of a compiled target
compiles; its time is kept as `first_call_s`), then `repeats` times, each call bracketed by a device synchronise
so that asynchronous CUDA work is counted. Every number is reported with the device name, dtype, batch size and
torch version (STYLE.md §2.8). Both sides include decoding to pixels: the pipeline's call, and the teacher's
`sample(labels, generator=...)` (the Teacher protocol's AR sampler) followed by its `decode(ids)` when it has one.

Compiled mode: a dd2 OneStepPipeline runs its fast path (dd2_core.fast: autocast, torch.compile of generator and
channels-last decoder, CUDA graphs at fixed batch buckets; `BenchConfig.fast_path`, default the device's
defaults); any other pipeline object has its whole call compiled (one step, so dynamo traces the generator and
decoder, methods included). A teacher's AR loop must not be unrolled that way, so its compiled variant is the
teacher built with its own compiled decode step (dd2_teachers: `compile=True`, CUDA graphs on CUDA). `dd2-eval
bench` builds both from the pipeline's teacher_ref.json through the dd2-teachers plugin (dd2_eval.teacher), or at a
released size with random weights (`--random-init`, dd2_eval.random_init). Every eager target is timed before any
compiled one (the fast path turns the decoder's weights channels-last).

Speed-up: with `without_decode` both sides are timed a second time without decoding (the pipeline's tokens, the
teacher's ids); `BenchReport.speedups` holds teacher time / one-step time for every batch size, pair of modes, and
with and without decoding. `system` records the load average before and after (a shared CPU's numbers are only
as good as its load).
"""

from __future__ import annotations

import copy
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

from dd2_core.fast import FastPathConfig
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
    teacher_warmup: int | None = Field(None, ge=0, description="warm-up calls of the AR sampler; None = warmup")
    teacher_repeats: int | None = Field(None, ge=1, description="timed calls of the AR sampler; None = repeats")
    modes: tuple[Mode, ...] = Field(("eager", "compiled"), min_length=1)
    compile_backend: str = Field("inductor", description="torch.compile backend ('eager' to test the wiring)")
    compile_mode: str | None = Field(None, description="torch.compile mode of a non-dd2 pipeline, e.g. 'max-autotune'")
    fast_path: FastPathConfig | None = Field(
        None, description="compiled mode of a dd2 pipeline; None = FastPathConfig.for_device(device, compile_backend)"
    )
    without_decode: bool = Field(False, description="also time both sides without decoding (generator alone)")
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
    decode: bool = True  # False: the generator alone (pipeline tokens / teacher ids)
    # median process CPU time of one call, all threads: on a CPU shared with other processes it depends far less on
    # their load than wall time does (on CUDA it is mostly the host's launch and wait time)
    cpu_s: float | None = None

    @property
    def label(self) -> str:
        return f"{self.target} ({self.mode}{'' if self.decode else ', no decode'})"


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
    system: dict[str, Any] = field(default_factory=dict)  # load average before/after, CPU count, threads
    setup: dict[str, Any] = field(default_factory=dict)  # what was timed (sizes, parameter counts), set by callers
    speedups: list[dict[str, Any]] = field(default_factory=list)  # filled by bench_pipeline (module docstring)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read_json(cls, path: str | os.PathLike) -> BenchReport:
        """A report written by write_json (e.g. to redraw its chart)."""
        data = json.loads(Path(path).read_text())
        return cls(**(data | {"timings": [Timing(**t) for t in data["timings"]]}))

    def write_json(self, path: str | os.PathLike) -> None:
        """Atomically (a temporary file renamed over `path`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)

    def table(self) -> str:
        """A one-screen text table: latency (ms) and throughput (images/s) per target and mode, then speed-ups."""
        lines = [f"device {self.device} | dtype {self.dtype} | torch {self.torch_version}"]
        lines.append(f"{'target':<40} {'batch':>5} {'median ms':>10} {'images/s':>10} {'1st call s':>10}")
        for t in self.timings:
            lines.append(
                f"{t.label:<40} {t.batch_size:>5} {t.median_s * 1e3:>10.2f} {t.images_per_s:>10.1f} "
                f"{t.first_call_s:>10.2f}"
            )
        for r in self.speedups:
            lines.append(
                f"speed-up batch {r['batch_size']:>3} {'with decode' if r['decode'] else 'generator alone':<15}: "
                f"one-step {r['one_step_mode']:<8} vs AR {r['teacher_mode']:<8} {r['speedup']:8.1f}x"
                + (f" (CPU time {r['speedup_cpu_time']:.1f}x)" if r.get("speedup_cpu_time") else "")
            )
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def speedup(self, batch_size: int, *, decode: bool, one_step_mode: str, teacher_mode: str) -> float | None:
        """teacher time / one-step time for one row of `speedups`, None when it was not measured."""
        for r in self.speedups:
            if (r["batch_size"], r["decode"], r["one_step_mode"], r["teacher_mode"]) == (
                batch_size,
                decode,
                one_step_mode,
                teacher_mode,
            ):
                return r["speedup"]
        return None


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (a CPU-GPU sync point; a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    device: torch.device,
    cpu_times: list[float] | None = None,
) -> tuple[float, list[float]]:
    """Wall time of the first call (the first warm-up call, or the first timed one when `warmup` is 0) and of each
    of `repeats` timed calls, in seconds; the process CPU time of each timed call is appended to `cpu_times`."""
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
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c0)
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
    on_timing: Callable[[BenchReport], None] | None = None,
) -> BenchReport:
    """Time the pipeline and, if given, the teacher's AR sampler (module docstring).

    `teacher_compiled` is the teacher built with its own compiled decode step (e.g. LlamaGenTeacherConfig(compile=
    True)); without it the teacher's compiled mode is skipped and a note says so (`teacher_compiled_note`: why, if
    the caller knows). `device` is where labels live and what is synchronised (default: the pipeline's `device`
    attribute or CPU); `dtype` is only recorded. `on_timing(report)` is called after every measurement.
    """
    cfg = cfg or BenchConfig()
    dev = torch.device(device if device is not None else getattr(pipe, "device", "cpu"))
    num_classes = int(pipe.num_classes)
    report = BenchReport(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or 'x86'})",
        dtype=dtype,
        torch_version=torch.__version__,
        config=cfg.model_dump(mode="json"),
        system={"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": _loadavg()},
    )
    decodes = (True, False) if cfg.without_decode else (True,)

    def pipe_call(target: Any, decode: bool) -> Callable[[Tensor], object]:
        def call(labels: Tensor) -> object:
            return target(labels, seed=cfg.seed, **({} if decode else {"decode": False}))

        return call

    fast_pipe: list[Any] = []  # the dd2 pipeline with its fast path, made once (both decode settings share it)

    def compiled_pipe_call(decode: bool) -> Callable[[Tensor], object]:
        if hasattr(pipe, "enable_fast_path"):  # a dd2 pipeline: its own fast path, on a copy (eager stays eager)
            if not fast_pipe:
                fast = cfg.fast_path or FastPathConfig.for_device(dev, backend=cfg.compile_backend)
                fast_pipe.append(copy.copy(pipe).enable_fast_path(fast))
            return pipe_call(fast_pipe[0], decode)
        # one step, no Python loop: compile the whole call, so that methods of submodules are traced too
        return torch.compile(pipe_call(pipe, decode), backend=cfg.compile_backend, mode=cfg.compile_mode)

    def teacher_call(target: Any, decode: bool) -> Callable[[Tensor], object]:
        def call(labels: Tensor) -> object:
            ids = target.sample(labels, generator=torch.Generator(dev).manual_seed(cfg.seed))
            return target.decode(ids) if decode and hasattr(target, "decode") else ids

        return call

    # (target, mode, decode, make_call): calls are made when their turn comes, every eager one before any compiled
    calls: list[tuple[str, str, bool, Callable[[], Callable[[Tensor], object]]]] = []
    for mode in sorted(cfg.modes, key=("eager", "compiled").index):
        for decode in decodes:
            if mode == "eager":
                calls.append((pipeline_name, mode, decode, partial(pipe_call, pipe, decode)))
            else:
                calls.append((pipeline_name, mode, decode, partial(compiled_pipe_call, decode)))
            if teacher is None:
                continue
            if mode == "eager":
                calls.append((teacher_name, mode, decode, partial(teacher_call, teacher, decode)))
            elif teacher_compiled is not None:
                calls.append((teacher_name, mode, decode, partial(teacher_call, teacher_compiled, decode)))
    if teacher is not None and "compiled" in cfg.modes and teacher_compiled is None:
        why = teacher_compiled_note or (
            "pass teacher_compiled, the teacher built with its own compiled decode step; compiling a whole "
            "AR loop would unroll it"
        )
        report.notes.append(f"{teacher_name} compiled: not measured ({why})")
    for name, mode, decode, make_call in calls:
        call = make_call()
        warmup, repeats = cfg.warmup, cfg.repeats
        if name == teacher_name:
            warmup = cfg.teacher_warmup if cfg.teacher_warmup is not None else warmup
            repeats = cfg.teacher_repeats or repeats
        for batch in dict.fromkeys((cfg.latency_batch, cfg.throughput_batch)):  # once when the two are equal
            labels = torch.arange(batch, device=dev) % num_classes
            with torch.inference_mode():
                cpu: list[float] = []
                first, times = time_calls(
                    partial(call, labels), warmup=warmup, repeats=repeats, device=dev, cpu_times=cpu
                )
            median = statistics.median(times)
            timing = Timing(name, mode, batch, median, batch / median, first, times, decode, statistics.median(cpu))
            report.timings.append(timing)
            logger.info("%s batch %d: %.2f ms (%.1f images/s)", timing.label, batch, median * 1e3, batch / median)
            if on_timing is not None:  # e.g. write the partial report, so that a run cut short keeps its numbers
                report.speedups = speedups(report.timings, pipeline_name, teacher_name)
                on_timing(report)
    report.system["loadavg_end"] = _loadavg()
    report.speedups = speedups(report.timings, pipeline_name, teacher_name)
    return report


def speedups(timings: list[Timing], pipeline_name: str, teacher_name: str) -> list[dict[str, Any]]:
    """teacher median / one-step median for every (batch size, with or without decode, one-step mode, AR mode);
    `speedup_cpu_time` is the same ratio of median process CPU times."""
    one = {(t.batch_size, t.decode, t.mode): t for t in timings if t.target == pipeline_name}
    rows = []
    for t in timings:
        if t.target != teacher_name:
            continue
        for (batch, decode, mode), o in one.items():
            if (batch, decode) == (t.batch_size, t.decode):
                rows.append(
                    {
                        "batch_size": batch,
                        "decode": decode,
                        "one_step_mode": mode,
                        "teacher_mode": t.mode,
                        "one_step_ms": o.median_s * 1e3,
                        "teacher_ms": t.median_s * 1e3,
                        "speedup": t.median_s / o.median_s,
                        "speedup_cpu_time": t.cpu_s / o.cpu_s if t.cpu_s and o.cpu_s else None,
                    }
                )
    return rows


def _loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def bar_chart_png(
    report: BenchReport, path: str | os.PathLike, *, latency_batch: int = 1, throughput_batch: int = 64
) -> None:
    """Two horizontal bar panels, latency (ms, lower is better) and throughput (images/s, higher is better), one bar
    per target and mode (lighter: without decoding), under one line of speed-ups per batch size; drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    panels = [
        (f"latency, batch {latency_batch} (ms, lower is better)", latency_batch, lambda t: t.median_s * 1e3),
        (
            f"throughput, batch {throughput_batch} (images/s, higher is better)",
            throughput_batch,
            lambda t: t.images_per_s,
        ),
    ]
    if throughput_batch == latency_batch:  # one batch size: the throughput panel would repeat the latency one
        panels = panels[:1]
    rows = [[t for t in report.timings if t.batch_size == b] for _, b, _ in panels]
    if not any(rows):
        raise EvalError(f"bar_chart_png: no timings at batch {latency_batch} or {throughput_batch}")
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    bar_h, gap, label_w, plot_w, pad = 22, 8, 270, 420, 16
    panel_h = [40 + len(r) * (bar_h + gap) for r in rows]
    summary = [line for b in dict.fromkeys((latency_batch, throughput_batch)) for line in _speedup_lines(report, b)]
    width = label_w + plot_w + 110
    head_h = 50 + 18 * len(summary)
    height = head_h + sum(panel_h) + pad * len(panels)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 12), f"{report.device} | {report.dtype} | torch {report.torch_version}", fill="black", font=font)
    for i, line in enumerate(summary):
        draw.text((pad, 34 + 18 * i), line, fill="black", font=small)
    colors = {"eager": (90, 120, 200), "compiled": (230, 130, 50)}
    lighter = {"eager": (160, 180, 230), "compiled": (245, 190, 140)}  # the generator alone (no decode)
    y = head_h
    for (title, _, value), timings, h in zip(panels, rows, panel_h):
        draw.text((pad, y), title, fill="black", font=font)
        top = y + 28
        vmax = max((value(t) for t in timings), default=1.0) or 1.0
        for i, t in enumerate(timings):
            by = top + i * (bar_h + gap)
            v = value(t)
            draw.text((pad, by + 4), t.label, fill="black", font=small)
            fill = colors.get(t.mode) if t.decode else lighter.get(t.mode)
            draw.rectangle([label_w, by, label_w + max(1, int(plot_w * v / vmax)), by + bar_h], fill=fill)
            text = f"{v:,.1f}" if v >= 10 else f"{v:.3g}"
            draw.text((label_w + int(plot_w * v / vmax) + 6, by + 4), text, fill="black", font=small)
        draw.line([label_w, top - 2, label_w, top + len(timings) * (bar_h + gap)], fill="black")
        y += h + pad
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def _speedup_lines(report: BenchReport, batch: int) -> list[str]:
    """'batch 1, one-step (compiled) vs AR (eager): 12.3x with decode, 45.6x generator alone', one per AR mode."""
    modes = {r["one_step_mode"] for r in report.speedups if r["batch_size"] == batch}
    one = "compiled" if "compiled" in modes else "eager"
    lines = []
    for ar in ("eager", "compiled"):
        with_dec = report.speedup(batch, decode=True, one_step_mode=one, teacher_mode=ar)
        alone = report.speedup(batch, decode=False, one_step_mode=one, teacher_mode=ar)
        got = [f"{x:,.1f}x {what}" for x, what in ((with_dec, "with decode"), (alone, "generator alone")) if x]
        if got:
            lines.append(f"batch {batch}, one-step ({one}) vs AR ({ar}): " + ", ".join(got))
    return lines
