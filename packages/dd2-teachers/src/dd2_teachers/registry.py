"""The frozen teacher named by a reference dict: a pipeline folder's `teacher_ref.json`, or a run's teacher section.

One function, `load_teacher(ref, *, device, dtype=None, compile=False)`, builds every family from the keys below;
dd2_train builds its teachers through it, and dd2_eval finds it as the `dd2.teachers` entry point `load` (so that
dd2-eval times a teacher's AR sampler without importing dd2-teachers):

    family        toy | llamagen | var
    size          toy: 'toy' (optional); llamagen: B, L, XL, XXL, 3B (GPT-B.., 256 px) or custom;
                  var: d16, d20, d24, d30 or custom
    init          optional: 'checkpoint' (default) or 'random' = random weights at the size, no ckpt / vq_ckpt
                  (llamagen and var only: what `dd2-eval bench --random-init` times)
    ckpt          toy: folder written by ToyTeacher.save; llamagen: GPT .pt/.safetensors (an adapted one holds
                  cont_embed.*); var: var_dNN.pth
    vq_ckpt       llamagen: the VQ tokenizer (vq_ds16_c2i.pt); var: vae_ch160v4096z32.pth; toy: none
    policy        optional SamplingPolicy fields; missing or null = the family's default
    gpt, vq       llamagen size 'custom' only: LlamaGenConfig and VQConfig fields
    var, vqvae    var size 'custom' only: VARConfig and VARVQVAEConfig fields (tests, the VAR demo)
    sample_input  llamagen only, optional: 'ids' (default) or 'codes'

Other keys (`source_checkpoint`, `weights`, ...) are informational and ignored. Errors name the key: a missing or
bad value raises TeacherRefError (a DD2ValueError), a missing file TeacherFileError (a CheckpointError); a file that
is not the checkpoint the reference describes raises the family loader's CheckpointError.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from dd2_core.errors import CheckpointError, DD2ValueError
from dd2_core.logits import SamplingPolicy

logger = logging.getLogger(__name__)

FAMILIES = ("toy", "llamagen", "var")
COMPILED_FAMILIES = ("llamagen", "var")  # families with a compiled decode step (`compile=True`)
LLAMAGEN_SIZES = {"B": "GPT-B", "L": "GPT-L", "XL": "GPT-XL", "XXL": "GPT-XXL", "3B": "GPT-3B"}
VAR_SIZES = ("d16", "d20", "d24", "d30", "custom")
_VAR_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPES_BY_NAME = {name: dtype for dtype, name in _VAR_DTYPES.items()}


class TeacherRefError(DD2ValueError):
    """A teacher reference lacks a key or holds a bad value; `key` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"teacher ref {key!r}: {message}")
        self.key = key


class TeacherFileError(CheckpointError):
    """A file named by a teacher reference does not exist; `key` names the reference key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"teacher ref {key!r}: {message}")
        self.key = key


def load_teacher(
    ref: Mapping[str, Any],
    *,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    compile: bool = False,
) -> nn.Module:
    """The frozen teacher (eval mode, no gradients) that `ref` describes (module docstring), on `device`.

    dtype: weight dtype (None = the family's default, float32; VAR keeps its VQVAE in float32). compile: the
    family's compiled decode step (LlamaGenTeacherConfig / VARTeacherConfig `compile`, CUDA graphs on CUDA for
    LlamaGen); the toy teacher has none and raises DD2ValueError. The result implements dd2_core.teacher.Teacher.
    """
    if not isinstance(ref, Mapping):
        raise DD2ValueError(f"teacher ref: expected a mapping (teacher_ref.json), got {type(ref).__name__}")
    family = _required(ref, "family")
    if family not in FAMILIES:
        raise TeacherRefError("family", f"expected one of {list(FAMILIES)}, got {family!r}")
    if compile and family not in COMPILED_FAMILIES:
        raise DD2ValueError(
            f"compile: the {family} teacher has no compiled decode step (families with one: "
            f"{', '.join(COMPILED_FAMILIES)})"
        )
    for key, owner in (("gpt", "llamagen"), ("vq", "llamagen"), ("sample_input", "llamagen"), ("var", "var"),
                       ("vqvae", "var")):  # fmt: skip
        if family != owner and ref.get(key) is not None:
            raise TeacherRefError(key, f"only for {owner} teachers, got family {family!r}")
    init = ref.get("init") or "checkpoint"
    if init not in ("checkpoint", "random") or (init == "random" and family == "toy"):
        raise TeacherRefError("init", f"expected 'checkpoint' or (llamagen, var) 'random', got {init!r} for {family}")
    if init == "random":
        for key in ("ckpt", "vq_ckpt"):
            if ref.get(key) is not None:
                raise TeacherRefError(key, f"init 'random' builds random weights; expected no {key}, got {ref[key]!r}")
    policy = _model(SamplingPolicy, ref, "policy")
    device = torch.device(device)
    if family == "toy":
        teacher = _toy(ref, device=device, dtype=dtype)
    elif family == "llamagen":
        teacher = _llamagen(ref, policy, device=device, dtype=dtype, compile=compile, random=init == "random")
    else:
        teacher = _var(ref, policy, device=device, dtype=dtype, compile=compile, random=init == "random")
    if policy is not None:
        teacher.policy = policy
    teacher.requires_grad_(False)
    return teacher.eval()


def _toy(ref: Mapping[str, Any], *, device: torch.device, dtype: torch.dtype | None) -> nn.Module:
    from dd2_teachers.toy import ToyTeacher

    size = ref.get("size", "toy")
    if size not in (None, "toy"):
        raise TeacherRefError("size", f"the toy teacher has the one size 'toy', got {size!r}")
    if ref.get("vq_ckpt") is not None:
        raise TeacherRefError("vq_ckpt", f"the toy teacher has no VQ tokenizer; expected null, got {ref['vq_ckpt']!r}")
    folder = _path(ref, "ckpt")
    if not (folder / "config.json").is_file():
        raise TeacherFileError(
            "ckpt", f"expected a toy teacher folder with config.json (ToyTeacher.save), got {str(folder)!r}"
        )
    teacher = ToyTeacher.load(folder, device=device)
    return teacher.to(dtype) if dtype is not None else teacher


def _overrides(policy: SamplingPolicy | None, compile: bool) -> dict[str, Any]:
    """Teacher-config fields every family takes from the ref: the compiled decode step and the policy (if given)."""
    return {"compile": compile} | ({"policy": policy} if policy is not None else {})


def _llamagen(
    ref: Mapping[str, Any],
    policy: SamplingPolicy | None,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    compile: bool,
    random: bool,
) -> nn.Module:
    from dd2_core.models.llamagen import LlamaGen, LlamaGenConfig
    from dd2_core.models.llamagen_vq import LlamaGenVQ, VQConfig
    from dd2_teachers.llamagen import LlamaGenTeacher, LlamaGenTeacherConfig, llamagen_teacher_config

    size = _required(ref, "size")
    overrides = _overrides(policy, compile)
    sample_input = ref.get("sample_input")
    if sample_input is not None:
        if sample_input not in ("ids", "codes"):
            raise TeacherRefError("sample_input", f"expected 'ids' or 'codes', got {sample_input!r}")
        overrides["sample_input"] = sample_input
    if size == "custom":
        gpt, vq = _model(LlamaGenConfig, ref, "gpt"), _model(VQConfig, ref, "vq")
        if gpt is None or vq is None:
            raise TeacherRefError("gpt" if gpt is None else "vq", "llamagen size 'custom' needs both gpt and vq sizes")
        try:
            cfg = LlamaGenTeacherConfig(gpt=gpt, vq=vq, **overrides)
        except ValidationError as e:
            raise TeacherRefError("gpt", _validation_message(e)) from e
    elif size in LLAMAGEN_SIZES:
        for key in ("gpt", "vq"):
            if ref.get(key) is not None:
                raise TeacherRefError(key, f"only for llamagen size 'custom', got size {size!r}")
        cfg = llamagen_teacher_config(LLAMAGEN_SIZES[size], **overrides)
    else:
        raise TeacherRefError("size", f"llamagen sizes are {[*LLAMAGEN_SIZES, 'custom']}, got {size!r}")
    if random:  # no checkpoint: speed benchmarks at a released size; cont_embed is left at its random init
        with torch.device(device):
            model, vq = LlamaGen(cfg.gpt_config()), LlamaGenVQ(cfg.vq)
        logger.info("LlamaGen teacher: %s with random weights", cfg.gpt.describe())
        return LlamaGenTeacher(cfg, model.to(dtype or torch.float32), vq.to(dtype or torch.float32))
    gpt_path, vq_path = _file(ref, "ckpt", "the GPT checkpoint"), _file(ref, "vq_ckpt", "the VQ tokenizer checkpoint")
    return LlamaGenTeacher.from_checkpoints(cfg, gpt_path, vq_path, device=device, dtype=dtype or torch.float32)


def _var(
    ref: Mapping[str, Any],
    policy: SamplingPolicy | None,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    compile: bool,
    random: bool,
) -> nn.Module:
    from dd2_core.models.var import VAR, VARConfig
    from dd2_core.models.var_vqvae import VARVQVAE, VARVQVAEConfig
    from dd2_teachers.var import VARTeacher, VARTeacherConfig, var_teacher_config

    size = _required(ref, "size")
    overrides = _overrides(policy, compile)
    if dtype is not None:
        if dtype not in _VAR_DTYPES:
            raise DD2ValueError(f"dtype: the VAR teacher runs in {list(_VAR_DTYPES.values())}, got {dtype}")
        overrides["dtype"] = _VAR_DTYPES[dtype]
    if size == "custom":
        var, vqvae = _model(VARConfig, ref, "var"), _model(VARVQVAEConfig, ref, "vqvae")
        if var is None or vqvae is None:
            raise TeacherRefError("var" if var is None else "vqvae", "var size 'custom' needs both var and vqvae sizes")
        try:
            cfg = VARTeacherConfig(var=var, vqvae=vqvae, **overrides)
        except ValidationError as e:
            raise TeacherRefError("var", _validation_message(e)) from e
    elif size in VAR_SIZES:
        for key in ("var", "vqvae"):
            if ref.get(key) is not None:
                raise TeacherRefError(key, f"only for var size 'custom', got size {size!r}")
        cfg = var_teacher_config(int(size[1:]), **overrides)
    else:
        raise TeacherRefError("size", f"var sizes are {list(VAR_SIZES)}, got {size!r}")
    if random:  # no checkpoint: speed benchmarks at a released size
        with torch.device(device):
            var_model, vqvae_model = VAR(cfg.var), VARVQVAE(cfg.vqvae)
        logger.info("VAR teacher: %s with random weights (%s)", cfg.var.describe(), cfg.dtype)
        return VARTeacher(var_model.to(_DTYPES_BY_NAME[cfg.dtype]), vqvae_model, policy=cfg.policy, compile=cfg.compile)
    var_path, vae_path = _file(ref, "ckpt", "the VAR checkpoint"), _file(ref, "vq_ckpt", "the VQVAE checkpoint")
    return VARTeacher.from_checkpoints(cfg, var_path, vae_path, device=device)


# -- reading the reference -----------------------------------------------------------------------------------------


def _required(ref: Mapping[str, Any], key: str) -> Any:
    if ref.get(key) is None:
        raise TeacherRefError(key, f"missing; the reference holds {sorted(ref)}")
    return ref[key]


def _path(ref: Mapping[str, Any], key: str) -> Path:
    value = _required(ref, key)
    if not isinstance(value, str | os.PathLike):
        raise TeacherRefError(key, f"expected a path, got {type(value).__name__} {value!r}")
    return Path(value)


def _file(ref: Mapping[str, Any], key: str, what: str) -> Path:
    path = _path(ref, key)
    if not path.is_file():
        raise TeacherFileError(key, f"no such file {str(path)!r} ({what})")
    return path


def _model(cls: type[BaseModel], ref: Mapping[str, Any], key: str) -> Any:
    """`ref[key]` validated as `cls` (a dict of its fields, or an instance); None when missing or null."""
    value = ref.get(key)
    if value is None or isinstance(value, cls):
        return value
    try:
        return cls.model_validate(value)
    except ValidationError as e:
        raise TeacherRefError(key, f"not valid {cls.__name__} fields: {_validation_message(e)}") from e


def _validation_message(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in e.errors())
