"""The fast inference path of a one-step pipeline: autocast, `torch.compile`, CUDA graphs at fixed batch sizes.

One-step generation is one backbone pass plus one decoder pass, so at batch 1 it is bound by kernel launches and
Python, and at batch 64 by the decoder's convolutions. The fast path removes both overheads:

    autocast        bf16 autocast on CUDA (weights stay float32; the maths of the head's output stays float32)
    torch.compile   the generator's call and the decoder's call are compiled once per batch bucket, fullgraph (no
                    graph break, hence no hidden host sync inside); the decoder's weights are channels-last
    CUDA graphs     on CUDA with inductor, mode="reduce-overhead": each bucket's compiled call is replayed as one
                    CUDA graph (inductor's CUDA graph trees copy inputs into static buffers; outputs are cloned
                    before the next replay overwrites them)
    batch buckets   a batch of B is padded to the smallest bucket >= B (zero noise, class 0 in the padding rows,
                    dropped afterwards), so only len(buckets) shapes are ever compiled; a batch larger than the
                    largest bucket is cut into chunks of it

Images equal the eager path's up to the autocast dtype's rounding (tests: bf16 on CPU with backend aot_eager).
On CPU the pipeline stays eager float32 unless the fast path is asked for (`FastPathConfig.for_device`).

    pipe = OneStepPipeline.from_pretrained(folder, device="cuda", fast=True)
    pipe.enable_fast_path(FastPathConfig(autocast="bfloat16", backend="aot_eager"))   # what the CPU tests run
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from dd2_core.errors import DD2ValueError

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class FastPathConfig(BaseModel):
    """How `OneStepPipeline.enable_fast_path` runs the generator and the decoder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    autocast: Literal["bfloat16", "float16", "off"] = Field(
        "bfloat16", description="autocast dtype of both calls; 'off' = the weights' own dtype"
    )
    compile: bool = Field(True, description="torch.compile the generator's and the decoder's calls (fullgraph)")
    backend: str = Field("inductor", description="torch.compile backend ('aot_eager' traces without codegen: tests)")
    cuda_graphs: bool = Field(
        True, description="on CUDA with inductor: mode='reduce-overhead', one CUDA graph per batch bucket"
    )
    channels_last: bool = Field(True, description="convert the decoder's conv weights to channels-last")
    batch_buckets: tuple[int, ...] = Field(
        DEFAULT_BUCKETS, min_length=1, description="compiled batch sizes; a batch is padded to the next one"
    )

    @field_validator("batch_buckets")
    @classmethod
    def _increasing(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if v[0] < 1 or any(b >= a for a, b in zip(v[1:], v[:-1])):
            raise ValueError(f"batch_buckets must be strictly increasing positive sizes, got {v}")
        return v

    @classmethod
    def for_device(cls, device: torch.device | str, **overrides) -> FastPathConfig:
        """The defaults of a device: bf16 autocast + inductor + CUDA graphs on CUDA; on CPU, inductor in float32
        (bf16 matmuls are slow on CPUs without AMX) and no graphs. `overrides` sets any field."""
        cpu = torch.device(device).type == "cpu"
        return cls.model_validate(({"autocast": "off", "cuda_graphs": False} if cpu else {}) | overrides)


def expect_labels_async(name: str, labels: Tensor, num_classes: int) -> None:
    """The range check of class ids already on an accelerator, without a host sync: shape and dtype are checked on
    the host, the range by a device-side assert (`torch._assert_async`), which fails the next synchronising call."""
    if labels.dim() != 1:
        raise DD2ValueError(f"{name}: expected shape (B,), got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DD2ValueError(f"{name}: expected an integer tensor, got dtype {labels.dtype}")
    if labels.numel():
        torch._assert_async(((labels >= 0) & (labels < num_classes)).all(), f"{name}: class ids out of range")


class FastPath:
    """The compiled calls of one pipeline's generator and decoder (module docstring).

    tokens(noise (B, N, C), labels (B,)) -> tokens (B, N, C) float32
    images(tokens (B, N, C)) -> uint8 images (B, H, W, 3)
    """

    def __init__(
        self,
        generator: nn.Module,
        decoder: nn.Module | None,
        config: FastPathConfig,
        device: torch.device,
        to_images: Callable[[Tensor], Tensor],
    ):
        self.config = config
        self.device = device
        self.graphs = config.compile and config.cuda_graphs and device.type == "cuda" and config.backend == "inductor"
        dtype = AUTOCAST_DTYPES.get(config.autocast)
        if dtype is not None and device.type not in ("cuda", "cpu"):
            raise DD2ValueError(f"FastPathConfig.autocast: {config.autocast} autocast needs cuda or cpu, got {device}")
        if decoder is not None and config.channels_last:
            decoder.to(memory_format=torch.channels_last)
        rope = getattr(getattr(generator, "backbone", None), "rope", None)
        if callable(rope):  # LlamaGen's lazily built rotary table: built here, so that it is no output of a CUDA graph
            rope(device)

        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

        def tokens(noise: Tensor, labels: Tensor) -> Tensor:
            with autocast():
                return generator(noise, labels).float()

        def images(tokens: Tensor) -> Tensor:
            with autocast():
                return to_images(decoder.decode_tokens(tokens))

        self._tokens = self._compile(tokens)
        self._images = self._compile(images) if decoder is not None else None
        logger.info(
            "fast path: autocast %s, compile %s (backend %s), CUDA graphs %s, buckets %s",
            config.autocast,
            config.compile,
            config.backend,
            self.graphs,
            config.batch_buckets,
        )

    def _compile(self, fn: Callable) -> Callable:
        if not self.config.compile:
            return fn
        # dynamic=False: one graph per bucket shape, which is what CUDA graphs need
        compiled = torch.compile(
            fn,
            backend=self.config.backend,
            mode="reduce-overhead" if self.graphs else None,
            fullgraph=True,
            dynamic=False,
        )
        if not self.graphs:
            return compiled

        def replay(*args: Tensor) -> Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            return compiled(*args).clone()  # the graph's output buffer is overwritten by the next replay

        return replay

    def bucket(self, batch: int) -> int:
        """The compiled batch size a batch of `batch` rows runs at (the largest bucket for chunks above it)."""
        return next((b for b in self.config.batch_buckets if b >= batch), self.config.batch_buckets[-1])

    def _chunks(self, batch: int) -> list[tuple[int, int, int]]:
        """(start, stop, padded size) of every chunk; only compiled calls are padded."""
        if not self.config.compile:
            return [(0, batch, batch)]
        step = self.config.batch_buckets[-1]
        return [(i, min(i + step, batch), self.bucket(min(step, batch - i))) for i in range(0, batch, step)]

    def tokens(self, noise: Tensor, labels: Tensor) -> Tensor:
        """Shapes: noise (B, N, C), labels (B,) on the pipeline's device -> tokens (B, N, C) float32."""
        out = []
        for start, stop, size in self._chunks(noise.shape[0]):
            x, y = _pad(noise[start:stop], size), _pad(labels[start:stop], size)
            out.append(self._tokens(x, y)[: stop - start])
        return out[0] if len(out) == 1 else torch.cat(out)

    def images(self, tokens: Tensor) -> Tensor:
        """Shapes: tokens (B, N, C) -> uint8 images (B, H, W, 3)."""
        if self._images is None:
            raise DD2ValueError("fast path: this pipeline has no decoder (decoder = 'none'); there are no images")
        out = []
        for start, stop, size in self._chunks(tokens.shape[0]):
            out.append(self._images(_pad(tokens[start:stop], size))[: stop - start])
        return out[0] if len(out) == 1 else torch.cat(out)


def _pad(x: Tensor, size: int) -> Tensor:
    """Rows of zeros appended up to `size` rows (zero noise / class 0: valid inputs whose outputs are dropped)."""
    if x.shape[0] == size:
        return x
    return torch.cat([x, x.new_zeros(size - x.shape[0], *x.shape[1:])])


__all__ = ["DEFAULT_BUCKETS", "FastPath", "FastPathConfig", "expect_labels_async"]
