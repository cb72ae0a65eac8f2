"""Inference: a one-step generator plus a token decoder, saved as and loaded from a pipeline folder.

Pipeline folder (written by `save_pretrained` / dd2-train's `export`, read by `from_pretrained`):
    config.json             PipelineConfig: schema version, backbone family + config, head config, decoder config
    generator.safetensors   OneStepGenerator weights (model.backbone.*, model.head.*)
    decoder.safetensors     token decoder weights (absent when decoder = "none")
    teacher_ref.json        optional: which teacher to use for teacher-refined multi-step sampling (informational)

Installing only dd2-core is enough: every architecture a pipeline may name lives in dd2_core (backbone.py, models/).

Speed: `from_pretrained(folder, fast=True)` or `pipe.enable_fast_path()` turns on the fast path (dd2_core.fast: bf16
autocast, torch.compile of generator and decoder, CUDA graphs at fixed batch buckets, no per-call host sync). The
default, and CPU's, is the eager path in the weights' dtype.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from dd2_core.backbone import Backbone
from dd2_core.checkpoint import (
    atomic_write_bytes,
    check_shapes,
    load_strict,
    read_state_dict,
    safetensors_shapes,
    save_safetensors,
)
from dd2_core.diffusion import ARDiffusion
from dd2_core.errors import CheckpointError, DD2ValueError, expect_labels
from dd2_core.fast import FastPath, FastPathConfig, expect_labels_async
from dd2_core.generator import OneStepGenerator
from dd2_core.heads import HeadConfig, VelocityHead
from dd2_core.sampling import refine_with_teacher
from dd2_core.teacher import Teacher

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# family -> (module, backbone class, config class); imported lazily so that a toy pipeline needs no large model code
_BACKBONES: dict[str, tuple[str, str, str]] = {
    "transformer": ("dd2_core.backbone", "TransformerBackbone", "BackboneConfig"),
    "llamagen": ("dd2_core.models.llamagen", "LlamaGenBackbone", "LlamaGenConfig"),
    "var": ("dd2_core.models.var", "VARBackbone", "VARBackboneConfig"),
}
# decoder -> (module, class, config class); decode_tokens(tokens (B, N, C)) -> images (B, 3, H, W) in [-1, 1]
_DECODERS: dict[str, tuple[str, str, str]] = {
    "llamagen_vq": ("dd2_core.models.llamagen_vq", "LlamaGenVQ", "VQConfig"),
    "var_vqvae": ("dd2_core.models.var_vqvae", "VARVQVAE", "VARVQVAEConfig"),
}


class PipelineConfig(BaseModel):
    """config.json of a pipeline folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(SCHEMA_VERSION, description="bumped when the folder layout changes")
    family: Literal["transformer", "llamagen", "var"] = Field(..., description="backbone architecture")
    backbone: dict[str, Any] = Field(..., description="the backbone's own config (validated by its config class)")
    head: HeadConfig
    head_time: float = Field(1.0, gt=0.0, le=1.0, description="t fed to the generator's head")
    noise_scale: float = Field(1.0, gt=0.0, description="the generator's backbone reads noise_scale * eps")
    class_cond: bool = Field(False, description="the generator adds a class embedding to the head's condition")
    decoder: Literal["none", "llamagen_vq", "var_vqvae"] = Field("none", description="token -> image decoder")
    decoder_config: dict[str, Any] | None = Field(None, description="the decoder's own config")
    num_classes: int = Field(..., ge=1)
    dd2_core_version: str = Field("0.1.0", description="version of dd2-core that wrote the folder")


@dataclass
class PipelineOutput:
    """images: uint8 (B, H, W, 3) or None without a decoder; tokens: (B, N, C) generated continuous tokens."""

    images: Tensor | None
    tokens: Tensor


def _resolve(table: dict[str, tuple[str, str, str]], name: str) -> tuple[type, type]:
    module, cls, cfg_cls = table[name]
    mod = importlib.import_module(module)
    return getattr(mod, cls), getattr(mod, cfg_cls)


def build_backbone(family: str, config: dict[str, Any]) -> Backbone:
    """Instantiate a backbone of `family` from its config dict."""
    cls, cfg_cls = _resolve(_BACKBONES, family)
    return cls(cfg_cls.model_validate(config))


def build_decoder(name: str, config: dict[str, Any] | None) -> nn.Module | None:
    if name == "none":
        return None
    cls, cfg_cls = _resolve(_DECODERS, name)
    return cls(cfg_cls.model_validate(config or {}))


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, round((x + 1) * 127.5) clamped to [0, 255]."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def _check_folder(folder: Path, config: PipelineConfig) -> None:
    """Build the networks of `config` on the meta device (no memory) and compare them with config.json's class count
    and the weight files' headers: a config that does not match its weights fails here, before any allocation."""
    cfg_path = folder / "config.json"
    try:
        with torch.device("meta"):
            backbone = build_backbone(config.family, config.backbone)
            generator = _generator(backbone, config)
            decoder = build_decoder(config.decoder, config.decoder_config)
    except (ValidationError, ValueError, TypeError) as e:
        raise CheckpointError(f"pipeline: {cfg_path} describes no buildable network:\n{e}") from e
    if backbone.num_classes != config.num_classes:
        raise CheckpointError(
            f"pipeline: {cfg_path} has num_classes {config.num_classes}, but its backbone has "
            f"{backbone.num_classes} classes (backbone.num_classes); the two must agree"
        )
    parts = [("generator.safetensors", generator, f"a {config.family} one-step generator")]
    if decoder is not None:
        parts.append(("decoder.safetensors", decoder, f"decoder {config.decoder}"))
    for name, module, expected in parts:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"pipeline: expected {path} next to {cfg_path}, found no such file")
        check_shapes(module, safetensors_shapes(path), expected=f"{expected} as {cfg_path} describes it",
                     source=str(path))  # fmt: skip


def _generator(backbone: Backbone, config: PipelineConfig) -> OneStepGenerator:
    """The one-step generator a pipeline config describes (weights not loaded)."""
    head = VelocityHead(config.head)
    return OneStepGenerator(ARDiffusion(backbone, head), config.head_time, noise_scale=config.noise_scale,
                            class_cond=config.class_cond)  # fmt: skip


class OneStepPipeline:
    """One-step class-conditional image generation:  pipe(labels, seed=0).images -> uint8 (B, H, W, 3).

    Example:
        >>> pipe = OneStepPipeline.from_pretrained("runs/toy/export")      # doctest: +SKIP
        >>> out = pipe(torch.tensor([0, 1, 2]), seed=0)                    # doctest: +SKIP
    """

    def __init__(self, generator: OneStepGenerator, config: PipelineConfig, decoder: nn.Module | None = None):
        self.generator = generator.eval()
        self.decoder = decoder.eval() if decoder is not None else None
        self.config = config
        self.fast: FastPath | None = None

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.generator.parameters()).dtype

    def enable_fast_path(self, config: FastPathConfig | None = None, **overrides) -> OneStepPipeline:
        """Run every later call through the fast path (dd2_core.fast) on the pipeline's current device; returns self.

        config: FastPathConfig (None = `FastPathConfig.for_device(self.device, **overrides)`). Compilation happens
        in the first call of each batch bucket. Move the pipeline to its device before enabling the fast path.
        """
        if config is not None and overrides:
            raise DD2ValueError(
                f"enable_fast_path: pass either a FastPathConfig or field overrides, got both {overrides}"
            )
        config = config or FastPathConfig.for_device(self.device, **overrides)
        self.fast = FastPath(self.generator, self.decoder, config, self.device, to_uint8)
        return self

    def disable_fast_path(self) -> OneStepPipeline:
        """Back to the eager path (the decoder keeps its memory format); returns self."""
        self.fast = None
        return self

    @classmethod
    def from_models(
        cls,
        generator: OneStepGenerator,
        *,
        family: str,
        backbone_config: BaseModel | dict,
        decoder: nn.Module | None = None,
        decoder_name: str = "none",
        decoder_config: BaseModel | dict | None = None,
    ) -> OneStepPipeline:
        """Assemble a pipeline from live modules (what `export` does before save_pretrained)."""

        def as_dict(c):
            return c.model_dump() if isinstance(c, BaseModel) else c

        config = PipelineConfig(
            family=family,
            backbone=as_dict(backbone_config),
            head=generator.head.cfg,
            **generator.options(),
            decoder=decoder_name,
            decoder_config=as_dict(decoder_config),
            num_classes=generator.backbone.num_classes,
        )
        return cls(generator, config, decoder)

    def save_pretrained(self, folder: str | os.PathLike, *, teacher_ref: dict | None = None) -> None:
        """Write the pipeline folder; each file is written atomically (weights first, config.json last)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors(self.generator.state_dict(), folder / "generator.safetensors")
        if self.decoder is not None:
            save_safetensors(self.decoder.state_dict(), folder / "decoder.safetensors")
        if teacher_ref is not None:
            atomic_write_bytes(folder / "teacher_ref.json", json.dumps(teacher_ref, indent=1).encode())
        atomic_write_bytes(folder / "config.json", self.config.model_dump_json(indent=1).encode())

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        fast: bool | FastPathConfig = False,
    ) -> OneStepPipeline:
        """Load a pipeline folder written by save_pretrained / dd2-train export.

        fast: True = `enable_fast_path()` with the device's defaults, a FastPathConfig = with that config."""
        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"pipeline: expected {cfg_path} (a folder written by `export` or save_pretrained), found no such file"
            )
        try:
            config = PipelineConfig.model_validate_json(cfg_path.read_text())
        except ValidationError as e:
            raise CheckpointError(f"pipeline: {cfg_path} is not a valid pipeline config:\n{e}") from e
        if config.schema_version != SCHEMA_VERSION:
            raise CheckpointError(
                f"pipeline: {cfg_path} has schema_version {config.schema_version}, this dd2-core reads {SCHEMA_VERSION}"
            )
        _check_folder(folder, config)  # every size in config.json against the weights, before allocating
        backbone = build_backbone(config.family, config.backbone)
        generator = _generator(backbone, config)
        weights = folder / "generator.safetensors"
        expected = f"a {config.family} one-step generator"
        load_strict(generator, read_state_dict(weights), expected=expected, source=str(weights))
        decoder = build_decoder(config.decoder, config.decoder_config)
        if decoder is not None:
            weights = folder / "decoder.safetensors"
            load_strict(decoder, read_state_dict(weights), expected=f"decoder {config.decoder}", source=str(weights))
            decoder = decoder.to(device=device, dtype=dtype)
        pipe = cls(generator.to(device=device, dtype=dtype), config, decoder)
        return pipe.enable_fast_path(None if fast is True else fast) if fast else pipe

    @torch.no_grad()
    def __call__(
        self,
        labels: Tensor | list[int],
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        teacher: Teacher | None = None,
        refine_groups: int = 0,
        decode: bool = True,
    ) -> PipelineOutput:
        """Generate one image per label.

        Args:
            labels: (B,) class ids in [0, num_classes).
            seed / generator: seed the noise (a fresh torch.Generator on the pipeline's device when `seed` is given).
            noise: (B, N, C) explicit noise instead.
            teacher, refine_groups: teacher-refined multi-step sampling (DD2 Alg. 4): the teacher resamples the last
                `refine_groups` token groups (1 + refine_groups steps). Needs a Teacher from dd2_teachers.
            decode: False = tokens only (images None), e.g. to time the generator alone.

        Labels given on the host (a list or a CPU tensor) are checked there; with the fast path, labels already on
        the accelerator are checked by a device-side assert, so that a call never waits for the device.
        """
        labels = torch.as_tensor(labels)
        if self.fast is not None and labels.device != torch.device("cpu"):
            expect_labels_async("labels", labels, self.num_classes)
        else:
            expect_labels("labels", labels, self.num_classes, allow_null=False)
        labels = labels.to(self.device, non_blocking=True)
        if seed is not None and generator is not None:
            raise DD2ValueError("pass either seed or generator, not both")
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        if noise is None:
            noise = self.generator.sample_noise(
                labels.shape[0], device=self.device, dtype=self.dtype, generator=generator
            )
        tokens = self.fast.tokens(noise, labels) if self.fast is not None else self.generator(noise, labels)
        if refine_groups:
            if teacher is None:
                raise DD2ValueError(f"refine_groups={refine_groups} needs a teacher (dd2_teachers), got teacher=None")
            tokens = refine_with_teacher(teacher, tokens, labels, resample_groups=refine_groups, generator=generator)
        images = None
        if self.decoder is not None and decode:
            images = self.fast.images(tokens) if self.fast is not None else to_uint8(self.decoder.decode_tokens(tokens))
        return PipelineOutput(images=images, tokens=tokens)


__all__ = ["OneStepPipeline", "PipelineConfig", "PipelineOutput", "build_backbone", "build_decoder", "to_uint8"]
