"""Pipelines and teachers at the released sizes with random weights: `dd2-eval bench --random-init SIZE`.

Speed does not depend on the values of the weights, only on the sizes, so the one-step pipeline and its teacher can
be timed without a checkpoint. Each size names both sides:

    one-step pipeline   the teacher's backbone as an ARDiffusion backbone + a velocity head (HeadConfig defaults,
                        1024 x 3 as dd2-train's) + the family's decoder (LlamaGen VQ-16 / VAR's VQVAE), built here
                        from dd2_core only
    teacher             a dd2_teachers reference with init 'random' (the same GPT / VAR and tokenizer sizes, the
                        family's default sampling policy), built by the `dd2.teachers` plugin (dd2_eval.teacher)

The tiny sizes exist for tests: they run every code path of the bench in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dd2_core.diffusion import ARDiffusion
from dd2_core.generator import OneStepGenerator
from dd2_core.heads import HeadConfig, VelocityHead
from dd2_core.models.llamagen import LLAMAGEN_PRESETS, LlamaGenConfig
from dd2_core.models.llamagen_vq import VQConfig
from dd2_core.models.var import VARBackboneConfig, VARConfig
from dd2_core.models.var_vqvae import VARVQVAEConfig
from dd2_core.pipeline import OneStepPipeline, build_backbone, build_decoder
from dd2_eval.errors import EvalError


@dataclass(frozen=True)
class RandomInitSize:
    """One benchmark size: the pipeline's backbone family and configs, and the teacher reference of the same sizes."""

    family: str  # pipeline backbone family: llamagen | var
    backbone: dict[str, Any]
    decoder: str  # llamagen_vq | var_vqvae
    decoder_config: dict[str, Any]
    teacher_ref: dict[str, Any]
    head: dict[str, Any] = field(default_factory=dict)  # HeadConfig fields besides token_dim / cond_dim


def _llamagen(gpt: LlamaGenConfig, vq: VQConfig, size: str, head: dict[str, Any] | None = None) -> RandomInitSize:
    ref = {"family": "llamagen", "size": size, "init": "random"}
    if size == "custom":
        ref |= {"gpt": gpt.model_dump(mode="json"), "vq": vq.model_dump(mode="json")}
    return RandomInitSize(
        family="llamagen",
        backbone=gpt.model_dump(mode="json") | {"codebook_dim": vq.codebook_dim},
        decoder="llamagen_vq",
        decoder_config=vq.model_dump(mode="json"),
        teacher_ref=ref,
        head=head or {},
    )


def _var(var: VARConfig, vqvae: VARVQVAEConfig, size: str, head: dict[str, Any] | None = None) -> RandomInitSize:
    ref = {"family": "var", "size": size, "init": "random"}
    if size == "custom":
        ref |= {"var": var.model_dump(mode="json"), "vqvae": vqvae.model_dump(mode="json")}
    backbone = VARBackboneConfig(var=var, num_phi=vqvae.num_phi, phi_ratio=vqvae.phi_ratio)
    return RandomInitSize(
        family="var",
        backbone=backbone.model_dump(mode="json"),
        decoder="var_vqvae",
        decoder_config=vqvae.model_dump(mode="json"),
        teacher_ref=ref,
        head=head or {},
    )


_TINY_HEAD = {"width": 32, "depth": 1}
RANDOM_INIT_SIZES: dict[str, RandomInitSize] = {
    "llamagen-b": _llamagen(LLAMAGEN_PRESETS["GPT-B"](), VQConfig(), "B"),
    "llamagen-l": _llamagen(LLAMAGEN_PRESETS["GPT-L"](), VQConfig(), "L"),
    "var-d16": _var(VARConfig(depth=16), VARVQVAEConfig(), "d16"),
    "tiny-llamagen": _llamagen(
        LlamaGenConfig(n_layer=2, dim=64, n_head=4, vocab_size=64, num_classes=10, grid=4, multiple_of=32),
        VQConfig(
            codebook_size=64,
            codebook_dim=8,
            z_channels=16,
            ch=16,
            ch_mult=(1, 2),
            num_res_blocks=1,
            norm_groups=8,
            codebook_used_size=0,
        ),  # fmt: skip
        "custom",
        _TINY_HEAD,
    ),
    "tiny-var": _var(
        VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=10, vocab_size=64, token_dim=8, patch_nums=(1, 2, 4)),
        VARVQVAEConfig(vocab_size=64, token_dim=8, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 4)),
        "custom",
        _TINY_HEAD,
    ),
}


def random_init_size(name: str) -> RandomInitSize:
    if name not in RANDOM_INIT_SIZES:
        raise EvalError(f"--random-init: expected one of {sorted(RANDOM_INIT_SIZES)}, got {name!r}")
    return RANDOM_INIT_SIZES[name]


def random_pipeline(
    name: str, *, device: torch.device | str, dtype: torch.dtype | None = None, seed: int = 0
) -> OneStepPipeline:
    """The one-step pipeline of size `name` with random weights (seeded), built directly on `device`."""
    spec = random_init_size(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            backbone = build_backbone(spec.family, spec.backbone)
            head = HeadConfig(token_dim=backbone.token_dim, cond_dim=backbone.feature_dim, **spec.head)
            generator = OneStepGenerator(ARDiffusion(backbone, VelocityHead(head)))
            decoder = build_decoder(spec.decoder, spec.decoder_config)
    pipe = OneStepPipeline.from_models(
        generator.to(dtype=dtype),
        family=spec.family,
        backbone_config=spec.backbone,
        decoder=decoder.to(dtype=dtype),
        decoder_name=spec.decoder,
        decoder_config=spec.decoder_config,
    )
    return pipe


def parameter_count(module: torch.nn.Module | None) -> int | None:
    """Number of parameters of `module` (None for None or an object that is not a module)."""
    return sum(p.numel() for p in module.parameters()) if isinstance(module, torch.nn.Module) else None


__all__ = ["RANDOM_INIT_SIZES", "RandomInitSize", "parameter_count", "random_init_size", "random_pipeline"]
