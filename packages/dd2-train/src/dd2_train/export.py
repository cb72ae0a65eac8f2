"""`export`: a csd/align checkpoint -> a pipeline folder that `dd2_core.pipeline.OneStepPipeline` loads.

The generator weights are the EMA (export.use_ema, the paper's evaluated weights) or the raw generator; the decoder
is the teacher family's VQ decoder (none for the toy teacher, whose tokens are the output). `teacher_ref.json`
records which teacher (and sampling policy) the generator was distilled from, for teacher-refined sampling and
`dd2-eval bench`: `dd2_teachers.registry.load_teacher(ref)` rebuilds exactly that teacher (the adapt stage's output
when the run used it; for a custom LlamaGen size its `gpt` and `vq` sizes; `sample_input`). Paths are absolute, so
that the pipeline folder can be used from any working directory. `source_checkpoint` and `weights` say which
weights were exported.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dd2_core.pipeline import OneStepPipeline
from dd2_train.build import build_generator, restore_frozen_tokenizer, teacher_from_ref, teacher_ref
from dd2_train.checkpoint import module_weights, read_manifest
from dd2_train.config import ConfigError, TrainConfig

logger = logging.getLogger(__name__)


def _generator_weights(step_dir: Path, use_ema: bool) -> dict[str, torch.Tensor]:
    modules = read_manifest(step_dir)["modules"]
    name = "ema" if use_ema else "generator"
    if name not in modules:
        raise ConfigError(
            f"export.init_from: {step_dir} holds {sorted(modules)}, no {name!r}; export reads a csd, align or "
            "regress run"
        )
    return module_weights(step_dir, name)


def export_pipeline(cfg: TrainConfig, step_dir: Path, out: Path, *, device: torch.device | str = "cpu") -> Path:
    """Write the pipeline folder `out` from checkpoint `step_dir`; returns `out`."""
    ref = teacher_ref(cfg.teacher, cfg.run_dir)
    for key in ("ckpt", "vq_ckpt"):
        if ref[key] is not None:
            ref[key] = str(Path(ref[key]).absolute())
    teacher = teacher_from_ref(ref, cfg.teacher, device=torch.device(device), dtype=torch.float32)
    generator = build_generator(teacher, cfg.teacher, cfg.head, cfg.onestep)
    generator.load_state_dict(_generator_weights(step_dir, cfg.export.use_ema))
    restore_frozen_tokenizer(generator.model, teacher, cfg.teacher)  # VAR: the decoder's phi convs, exactly
    backbone = generator.backbone
    if cfg.teacher.family == "toy":
        family, backbone_cfg, decoder, decoder_name, decoder_cfg = "transformer", backbone.cfg, None, "none", None
    elif cfg.teacher.family == "llamagen":
        family, backbone_cfg = "llamagen", backbone.cfg
        decoder, decoder_name, decoder_cfg = teacher.vq, "llamagen_vq", teacher.vq.cfg
    else:
        family, backbone_cfg = "var", backbone.cfg
        decoder, decoder_name, decoder_cfg = teacher.vqvae, "var_vqvae", teacher.vqvae.cfg
    pipe = OneStepPipeline.from_models(
        generator.cpu().float(),
        family=family,
        backbone_config=backbone_cfg,
        decoder=decoder.cpu().float() if decoder is not None else None,
        decoder_name=decoder_name,
        decoder_config=decoder_cfg,
    )
    ref |= {
        "policy": teacher.policy.model_dump(mode="json"),  # the policy in effect, family defaults included
        "source_checkpoint": str(step_dir),
        "weights": "ema" if cfg.export.use_ema else "generator",
    }
    if cfg.teacher.family == "llamagen":
        ref["sample_input"] = teacher.cfg.sample_input
    pipe.save_pretrained(out, teacher_ref=ref)
    logger.info("exported %s weights of %s to %s", ref["weights"], step_dir, out)
    return out
