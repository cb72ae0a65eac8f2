"""Sample a one-step pipeline into an ADM sample batch (.npz), in resumable chunks.

The labels are `per_class` of each class (50 x 1000 = 50k for ImageNet), in a seeded random order so that every
consecutive IS split (ADM: 5000 in order) sees all classes. Work is cut into chunks of `chunk_size` images, each
written atomically to `<out>.parts/chunk_XXXXX.npz` with its labels; a rerun skips finished chunks, and when all
exist the chunks are streamed into `<out>` (arr_0 uint8 (N, H, W, 3) + arr_1 labels, ADM's sampler layout) and the
parts folder is removed. Each pipeline batch gets its own seed derived from (seed, chunk, batch), so the result does
not depend on where a run was interrupted. Sharding: rank r of world_size W does the chunks i with i % W == r;
rank 0 assembles once every chunk exists (rerun rank 0 after the others finish).

The pipeline is anything with `num_classes` and `__call__(labels (B,) int64, *, seed=None, generator=None)`
returning an object with `images` uint8 (B, H, W, 3) (dd2_core.pipeline.OneStepPipeline).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor
from tqdm import tqdm

from dd2_eval.errors import EvalError, NpzFormatError
from dd2_eval.npz import NpzImageWriter, images_entry, iter_images, read_labels, write_images

logger = logging.getLogger(__name__)

_MANIFEST_VERSION = 1


class ImagePipeline(Protocol):
    """What sampling and benchmarking need from a pipeline (dd2_core.pipeline.OneStepPipeline provides it)."""

    num_classes: int

    def __call__(
        self, labels: Tensor, *, seed: int | None = None, generator: torch.Generator | None = None
    ) -> Any:  # PipelineOutput with .images uint8 (B, H, W, 3) and .tokens (B, N, C)
        ...


class SampleConfig(BaseModel):
    """What `sample_to_npz` draws; everything here except `rank`/`world_size` is part of the resume check."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_class: int = Field(50, ge=1, description="images per class (ADM/LlamaGen: 50 x 1000 classes = 50k)")
    classes: tuple[int, ...] | None = Field(None, description="class ids to sample; None = all of the pipeline's")
    batch_size: int = Field(64, ge=1, description="images per pipeline call")
    chunk_size: int = Field(1000, ge=1, description="images per resumable chunk file")
    seed: int = Field(0, ge=0, description="base seed: label order and every batch's noise derive from it")
    rank: int = Field(0, ge=0, description="this process's shard")
    world_size: int = Field(1, ge=1, description="number of shards")

    @model_validator(mode="after")
    def _rank_in_range(self) -> SampleConfig:
        if self.rank >= self.world_size:
            raise ValueError(f"need rank < world_size, got rank={self.rank}, world_size={self.world_size}")
        return self


def sample_labels(num_classes: int, cfg: SampleConfig) -> np.ndarray:
    """`per_class` of each class, in a random order fixed by `cfg.seed`. Shapes: -> int64 (per_class * classes,)."""
    classes = np.arange(num_classes) if cfg.classes is None else np.asarray(cfg.classes, dtype=np.int64)
    if (
        classes.size == 0
        or classes.min() < 0
        or classes.max() >= num_classes
        or len(set(classes.tolist())) != len(classes)
    ):
        raise EvalError(f"classes: expected distinct ids in [0, {num_classes - 1}], got {cfg.classes}")
    labels = np.repeat(classes, cfg.per_class).astype(np.int64)
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x1ABE1])).permutation(labels)


def batch_seed(seed: int, chunk: int, batch: int) -> int:
    """A well-mixed 63-bit seed for one pipeline call, independent of how the run was split or resumed."""
    return int(np.random.SeedSequence([seed, chunk, batch]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def parts_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def sample_to_npz(
    pipe: ImagePipeline,
    out: str | os.PathLike,
    cfg: SampleConfig | None = None,
    *,
    pipeline_id: str = "",
    progress: bool = True,
    keep_parts: bool = False,
) -> Path | None:
    """Draw the samples of `cfg` into `out` (module docstring). Returns `out` once assembled, or None while other
    ranks' chunks are missing. `pipeline_id` (e.g. a hash of the pipeline's config) is stored in the manifest so
    that a resume with another pipeline is refused."""
    cfg = cfg or SampleConfig()
    out = Path(out)
    labels = sample_labels(int(pipe.num_classes), cfg)
    num_chunks = (len(labels) + cfg.chunk_size - 1) // cfg.chunk_size
    parts = parts_dir(out)
    _check_manifest(parts, cfg, len(labels), int(pipe.num_classes), pipeline_id)

    mine = [i for i in range(num_chunks) if i % cfg.world_size == cfg.rank]
    todo = [i for i in mine if not _chunk_done(parts, i, _chunk_len(i, cfg.chunk_size, len(labels)))]
    done_images = sum(_chunk_len(i, cfg.chunk_size, len(labels)) for i in mine if i not in todo)
    total_images = sum(_chunk_len(i, cfg.chunk_size, len(labels)) for i in mine)
    if done_images:
        logger.info("resuming: %d of %d images of this shard already in %s", done_images, total_images, parts)
    device = _pipeline_device(pipe)
    t0, drawn = time.perf_counter(), 0
    with tqdm(total=total_images, initial=done_images, desc="sampling", unit="img", disable=not progress) as bar:
        for chunk in todo:
            chunk_labels = labels[chunk * cfg.chunk_size : (chunk + 1) * cfg.chunk_size]
            images = []
            for b, start in enumerate(range(0, len(chunk_labels), cfg.batch_size)):
                y = torch.from_numpy(chunk_labels[start : start + cfg.batch_size]).to(device)
                images.append(_images(pipe(y, seed=batch_seed(cfg.seed, chunk, b)), len(y)))
                bar.update(len(y))
                drawn += len(y)
            write_images(parts / f"chunk_{chunk:05d}.npz", np.concatenate(images), chunk_labels)
    if drawn:
        dt = time.perf_counter() - t0
        logger.info("drew %d images in %.1f s (%.1f images/s)", drawn, dt, drawn / dt)

    missing = [i for i in range(num_chunks) if not (parts / f"chunk_{i:05d}.npz").is_file()]
    if missing or cfg.rank != 0:
        if missing:
            logger.info(
                "%d of %d chunks missing (other ranks); rerun rank 0 to assemble %s", len(missing), num_chunks, out
            )
        return None
    _assemble(parts, num_chunks, len(labels), out)
    if not keep_parts:
        shutil.rmtree(parts)
    logger.info("wrote %s: %d images", out, len(labels))
    return out


def _images(output: Any, batch: int) -> np.ndarray:
    images = getattr(output, "images", output)
    if images is None:
        raise EvalError("pipeline output .images is None: the pipeline has no decoder; export it with one")
    if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        desc = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else type(images).__name__
        raise EvalError(f"pipeline output .images: expected a uint8 tensor (B, H, W, 3), got {desc}")
    if images.shape[0] != batch:
        raise EvalError(f"pipeline output .images: expected {batch} images for {batch} labels, got {images.shape[0]}")
    return images.cpu().numpy()


def _pipeline_device(pipe: ImagePipeline) -> torch.device:
    device = getattr(pipe, "device", None)
    if device is None:
        for value in vars(pipe).values():
            if isinstance(value, torch.nn.Module):
                p = next(value.parameters(), None)
                if p is not None:
                    return p.device
        return torch.device("cpu")
    return torch.device(device)


def _chunk_len(chunk: int, chunk_size: int, total: int) -> int:
    return min(chunk_size, total - chunk * chunk_size)


def _chunk_done(parts: Path, chunk: int, expected: int) -> bool:
    path = parts / f"chunk_{chunk:05d}.npz"
    if not path.is_file():
        return False
    try:
        return images_entry(path, what="chunk").shape[0] == expected
    except NpzFormatError as e:  # chunks are written atomically, so this means outside damage: redo it
        logger.warning("redoing %s: %s", path, e)
        return False


def _check_manifest(parts: Path, cfg: SampleConfig, num: int, num_classes: int, pipeline_id: str) -> None:
    manifest = {"version": _MANIFEST_VERSION, "num_samples": num, "num_classes": num_classes, "pipeline": pipeline_id}
    manifest |= cfg.model_dump(exclude={"rank", "world_size"}, mode="json")
    path = parts / "manifest.json"
    if path.is_file():
        try:
            found = json.loads(path.read_text())
            if not isinstance(found, dict):
                raise ValueError(f"expected a JSON object, found {type(found).__name__}")
        except ValueError as e:
            raise EvalError(
                f"{path}: unreadable ({e}); it records which run the chunks in {parts} belong to, so they cannot be "
                "reused: delete that folder or choose another --out"
            ) from None
        diff = {k: (found.get(k), v) for k, v in manifest.items() if found.get(k) != v}
        if diff:
            raise EvalError(
                f"{parts} holds chunks of a different sampling run (found vs now: {diff}); "
                "delete that folder or choose another --out"
            )
        return
    parts.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".manifest.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, path)


def _assemble(parts: Path, num_chunks: int, num: int, out: Path) -> None:
    with NpzImageWriter(out, num) as writer:
        for i in range(num_chunks):
            path = parts / f"chunk_{i:05d}.npz"
            labels = read_labels(path, what="chunk")
            start = 0
            for images in iter_images(path, batch_size=1024, what="chunk"):
                writer.write(images, None if labels is None else labels[start : start + len(images)])
                start += len(images)


def load_pipeline(path: str | os.PathLike, *, device: str | None = None, dtype: torch.dtype | None = None) -> Any:
    """`dd2_core.pipeline.OneStepPipeline.from_pretrained(path, device=, dtype=)`, with a clear error if the installed
    dd2-core has no pipeline module or `path` is not a pipeline folder."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise EvalError(f"--pipeline {str(path)!r}: expected a pipeline folder with config.json (written by export)")
    try:
        from dd2_core.pipeline import OneStepPipeline
    except ImportError as e:
        raise EvalError(f"the installed dd2-core has no dd2_core.pipeline ({e}); update dd2-core") from e
    return OneStepPipeline.from_pretrained(path, device=device, dtype=dtype)


def pipeline_id(path: str | os.PathLike) -> str:
    """Identity of a pipeline folder for the resume check: SHA256 of config.json and of every weight file's bytes
    (same-size weights of another generator give another id)."""
    path = Path(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}:".encode())
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()[:16]
