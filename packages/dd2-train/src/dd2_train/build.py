"""Networks of a run from its teacher section: the teacher, the AR-diffusion model A, the adapt model, the tokenizer.

One function per role; the families' own code lives in dd2_teachers and dd2_core.models, and the teacher is built
by dd2_teachers.registry.load_teacher from the reference dict `teacher_ref` makes of the teacher section:

    toy        dd2_teachers.toy.ToyTeacher (folder written by ToyTeacher.save) + TransformerBackbone
    llamagen   dd2_teachers.llamagen.LlamaGenTeacher (GPT .pt + VQ-16) + LlamaGenBackbone; the continuous-input
               teacher is the adapt stage's output (<run_dir>/adapt/teacher/gpt.safetensors) when present
    var        dd2_teachers.var.VARTeacher (var_dNN.pth + VQVAE) + VARBackbone
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dd2_core.checkpoint import CheckpointError, load_strict, read_state_dict, save_safetensors
from dd2_core.diffusion import ARDiffusion
from dd2_core.errors import DD2Error
from dd2_core.generator import OneStepGenerator, codebook_noise_scale
from dd2_core.heads import HeadConfig, VelocityHead
from dd2_teachers.registry import load_teacher
from dd2_train.config import ConfigError, HeadSpec, OneStepSpec, TeacherSpec

logger = logging.getLogger(__name__)

ADAPTED_DIR = "teacher"  # inside the adapt stage folder


def adapted_folder(spec: TeacherSpec, run_dir: Path) -> Path | None:
    """The adapt stage's output folder to load the teacher from, or None (use `teacher.ckpt` as is)."""
    if spec.adapted is not None:
        folder = spec.adapted / ADAPTED_DIR
        if not folder.is_dir():
            raise ConfigError(
                f"teacher.adapted: {str(spec.adapted)!r} holds no {ADAPTED_DIR}/ folder (the adapt stage writes it)"
            )
        return folder
    if spec.family == "llamagen":
        folder = run_dir / "adapt" / ADAPTED_DIR
        if folder.is_dir():
            return folder
        logger.warning(
            "LlamaGen teacher without the adapt stage's output (%s): cont_embed is only fitted to the token table, "
            "which is lossy (method.md 5.3); run the adapt stage first",
            folder,
        )
    return None


def teacher_ref(spec: TeacherSpec, run_dir: Path) -> dict[str, Any]:
    """The reference dict that `dd2_teachers.registry.load_teacher` builds this run's teacher from (the keys of a
    pipeline's teacher_ref.json). `ckpt` is the adapt stage's output when there is one (`adapted_folder`; for
    llamagen its gpt.safetensors); `policy` is `spec.policy` (None = the family's default)."""
    adapted = adapted_folder(spec, run_dir)
    ckpt = spec.ckpt
    if adapted is not None:
        ckpt = adapted / "gpt.safetensors" if spec.family == "llamagen" else adapted
    ref: dict[str, Any] = {
        "family": spec.family,
        "size": spec.size,
        "ckpt": str(ckpt),
        "vq_ckpt": str(spec.vq_ckpt) if spec.vq_ckpt is not None else None,
        "policy": spec.policy.model_dump(mode="json") if spec.policy is not None else None,
    }
    if spec.family == "llamagen":
        ref["sample_input"] = spec.sample_input
        if spec.size == "custom":
            ref["gpt"], ref["vq"] = spec.gpt.model_dump(mode="json"), spec.vq.model_dump(mode="json")
    if spec.family == "var" and spec.size == "custom":
        ref["var"], ref["vqvae"] = spec.var.model_dump(mode="json"), spec.vqvae.model_dump(mode="json")
    return ref


def build_teacher(spec: TeacherSpec, *, device: torch.device, dtype: torch.dtype, run_dir: Path) -> nn.Module:
    """The frozen teacher (eval, no gradients), with `spec.policy` if set. Errors name the config field."""
    return teacher_from_ref(teacher_ref(spec, run_dir), spec, device=device, dtype=dtype)


def teacher_from_ref(ref: dict[str, Any], spec: TeacherSpec, *, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`dd2_teachers.registry.load_teacher(ref)` for a `ref` made from the teacher section `spec` (`teacher_ref`),
    with errors that name the config field: teacher.adapted when the adapt stage's output is at fault."""
    try:
        return load_teacher(ref, device=device, dtype=dtype)
    except (OSError, DD2Error) as e:
        key = getattr(e, "key", "ckpt")  # registry errors name the reference key, which is the config field's name
        adapted = Path(ref["ckpt"]).absolute() != spec.ckpt.absolute()
        field = "adapted" if key == "ckpt" and adapted else key
        raise ConfigError(
            f"teacher.{field}: the {spec.family} {spec.size} teacher cannot be built from {ref['ckpt']!r}: {e}"
        ) from e


def build_ar_diffusion(teacher: nn.Module, spec: TeacherSpec, head: HeadSpec) -> ARDiffusion:
    """Model A before GTS: the teacher's backbone weights and a fresh velocity head (fp32, on the teacher's device)."""
    if spec.family == "toy":
        from dd2_core.backbone import TransformerBackbone

        backbone = TransformerBackbone(teacher.cfg.backbone_config())
        backbone.load_state_dict(teacher.backbone.state_dict())
    elif spec.family == "llamagen":
        from dd2_core.models.llamagen import LlamaGenBackbone

        backbone = LlamaGenBackbone.from_teacher(teacher.model)
    else:
        from dd2_core.models.var import VARBackbone

        backbone = VARBackbone.from_teacher(teacher.var, teacher.vqvae)
    device = teacher.codebook.device
    backbone = backbone.to(device=device, dtype=torch.float32)
    cfg = HeadConfig(token_dim=backbone.token_dim, cond_dim=backbone.feature_dim, width=head.width, depth=head.depth)
    return ARDiffusion(backbone, VelocityHead(cfg).to(device))


@torch.no_grad()
def restore_frozen_tokenizer(model: ARDiffusion, teacher: nn.Module, spec: TeacherSpec) -> ARDiffusion:
    """VAR: copy the VQVAE's phi convs into the backbone's frozen copy again, exactly (fp32). Other families: no-op.

    The backbone builds the next-scale inputs with the tokenizer's phi convs, which must stay equal to the decoder's.
    They are never trained, so a DeepSpeed checkpoint holds them only in the engine module's dtype (bf16 on bf16
    runs: fp32 master weights exist for trainable parameters only); call this after loading weights from one.
    """
    if spec.family == "var":
        model.backbone.phi.load_state_dict(teacher.vqvae.phi.state_dict(), strict=True)
    return model


def onestep_options(spec: OneStepSpec, codebook: Tensor) -> dict[str, Any]:
    """OneStepGenerator's keyword options from the config's onestep section (noise_scale 'codebook' resolved)."""
    scale = codebook_noise_scale(codebook) if spec.noise_scale == "codebook" else float(spec.noise_scale)
    return {"head_time": spec.head_time, "noise_scale": scale, "class_cond": spec.class_cond}


def build_generator(teacher: nn.Module, spec: TeacherSpec, head: HeadSpec, onestep: OneStepSpec) -> OneStepGenerator:
    """A one-step generator around a fresh model A (the caller loads A's or the generator's weights)."""
    return OneStepGenerator(build_ar_diffusion(teacher, spec, head), **onestep_options(onestep, teacher.codebook))


class ToyContinuousAR(nn.Module):
    """The toy teacher seen as a continuous-input AR model: forward_continuous = teacher-forced logits."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward_continuous(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Shapes: tokens (B, N, C), labels (B,) -> logits (B, N, V)."""
        return self.teacher.logits(tokens, labels)


def build_adapt_model(teacher: nn.Module, spec: TeacherSpec) -> nn.Module:
    """The network the adapt stage trains (fp32, trainable): it has `forward_continuous(tokens, labels)`."""
    model = ToyContinuousAR(teacher) if spec.family == "toy" else teacher.model
    if spec.family == "var":
        raise ConfigError("stage: 'adapt' is LlamaGen's continuous-input adaptation; VAR needs none")
    model.float().requires_grad_(True).train()
    return model


def save_adapted_teacher(weights: dict[str, Tensor], teacher: nn.Module, spec: TeacherSpec, folder: Path) -> None:
    """Write the adapted teacher where `adapted_folder` finds it (rank 0). `weights` is the full fp32 state_dict
    of the adapt model (`build_adapt_model`): toy keys under `teacher.`, LlamaGen GPT keys as they are."""
    folder.mkdir(parents=True, exist_ok=True)
    if spec.family == "toy":
        from dd2_teachers.toy import ToyTeacher

        adapted = ToyTeacher(teacher.cfg)
        load_strict(adapted, {k.removeprefix("teacher."): v for k, v in weights.items()}, expected="the toy teacher")
        adapted.save(folder)
    else:
        save_safetensors(weights, folder / "gpt.safetensors")


@dataclass
class Tokenizer:
    """Images in [-1, 1] -> ids, for `python -m dd2_train.data tokenize`."""

    encode: object
    resolution: int
    vocab_size: int
    num_tokens: int


def build_tokenizer(spec: TeacherSpec, *, device: torch.device | str) -> Tokenizer:
    """LlamaGen's VQ-16 encoder (the adapt stage trains on real image codes; no other family needs them)."""
    if spec.family != "llamagen":
        raise ConfigError(f"teacher.family: tokenizing images is for LlamaGen's adapt stage, got {spec.family!r}")
    if spec.vq_ckpt is None:
        raise ConfigError("teacher.vq_ckpt: the VQ tokenizer checkpoint is needed to tokenize images")
    from dd2_core.models.llamagen_vq import VQ_PRESETS, LlamaGenVQ

    cfg = spec.vq if spec.vq is not None else VQ_PRESETS["VQ-16"]()
    vq = LlamaGenVQ(cfg)
    name = "a custom LlamaGen VQ" if spec.vq is not None else "LlamaGen VQ-16"
    try:
        load_strict(vq, read_state_dict(spec.vq_ckpt), expected=name, source=str(spec.vq_ckpt))
    except (OSError, CheckpointError) as e:
        raise ConfigError(f"teacher.vq_ckpt: {e}") from e
    vq.to(device).eval().requires_grad_(False)
    grid = spec.gpt.grid if spec.gpt is not None else 16  # released: 256 px checkpoints (c2i_*_256.pt)
    return Tokenizer(
        encode=vq.encode, resolution=grid * cfg.downsample, vocab_size=cfg.codebook_size, num_tokens=grid * grid
    )
