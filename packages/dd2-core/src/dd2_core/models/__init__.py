"""Architectures that sampling needs: LlamaGen GPT + VQ-16 tokenizer, VAR transformer + multi-scale VQVAE."""

from dd2_core.models.llamagen import (
    LLAMAGEN_PRESETS,
    ContinuousEmbedding,
    EmbeddingFit,
    LlamaGen,
    LlamaGenBackbone,
    LlamaGenConfig,
    fit_continuous_embedding,
)
from dd2_core.models.llamagen_vq import VQ_PRESETS, LlamaGenVQ
from dd2_core.models.llamagen_vq import VQConfig as LlamaGenVQConfig
from dd2_core.models.var import VAR, VAR_PRESETS, VARBackbone, VARBackboneConfig, VARConfig
from dd2_core.models.var_vqvae import VAR_PATCH_NUMS, VARVQVAE, VARVQVAEConfig

__all__ = [
    "LLAMAGEN_PRESETS",
    "VAR",
    "VAR_PATCH_NUMS",
    "VAR_PRESETS",
    "VARVQVAE",
    "VQ_PRESETS",
    "ContinuousEmbedding",
    "EmbeddingFit",
    "LlamaGen",
    "LlamaGenBackbone",
    "LlamaGenConfig",
    "LlamaGenVQ",
    "LlamaGenVQConfig",
    "VARBackbone",
    "VARBackboneConfig",
    "VARConfig",
    "VARVQVAEConfig",
    "fit_continuous_embedding",
]
