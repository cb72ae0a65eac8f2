"""VAR as a DD2 teacher: the released checkpoints, VAR's sampling policy, teacher-forced log-probs on continuous
per-scale tokens, and the KV-cached next-scale sampler (teachers.md 2, method.md 2 and 6).

Policy (DD2 App. E.3, DD1's VAR sampling): CFG 2.0 ramped over scales, (1 + t) c - t u with t = cfg si / (S - 1), i.e.
u + w (c - u) with w = 1 + t; top-k 900; top-p 0.95 with VAR's switch (on when top_p > 0). VAR's sampler has no
temperature (the policy's temperature is honoured if set, 1.0 by default).

Tokens are (B, N, Cvae) per-scale residual tokens (N = 680, Cvae = 32 for the released models). For code vectors
E[ids] they give exactly the id-based teacher; for continuous tokens the next-scale input is built by the same phi /
f_hat accumulation as for codes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from dd2_core.checkpoint import load_strict, read_state_dict
from dd2_core.errors import CheckpointError, DD2ValueError, expect_labels, expect_shape
from dd2_core.logits import SamplingPolicy, policy_log_probs
from dd2_core.models.var import VAR, VARConfig, sample_var
from dd2_core.models.var_vqvae import VARVQVAE, VARVQVAEConfig

logger = logging.getLogger(__name__)

VAR_POLICY = SamplingPolicy(cfg_scale=2.0, cfg_schedule="ramp", top_k=900, top_p=0.95, top_p_rule="var")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VARTeacherConfig(BaseModel):
    """A VAR teacher: transformer and VQVAE sizes, sampling policy, compute dtype of the transformer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    var: VARConfig = Field(default_factory=VARConfig, description="transformer sizes (default VAR-d16)")
    vqvae: VARVQVAEConfig = Field(default_factory=VARVQVAEConfig, description="tokenizer (default vae_ch160v4096z32)")
    policy: SamplingPolicy = Field(VAR_POLICY, description="CFG ramp / top-k / top-p that define the teacher's p")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the transformer weights; the VQVAE and f_hat stay float32"
    )
    compile: bool = Field(False, description="torch.compile the teacher-forced pass and the sampler's scale step")

    @model_validator(mode="after")
    def _agree(self) -> VARTeacherConfig:
        for name in ("vocab_size", "token_dim", "patch_nums"):
            a, b = getattr(self.var, name), getattr(self.vqvae, name)
            if a != b:
                raise ValueError(f"var.{name} and vqvae.{name} must agree, got {a} and {b}")
        return self


def var_teacher_config(depth: int = 16, **overrides) -> VARTeacherConfig:
    """The released VAR-d{depth} (16, 20, 24, 30) with its tokenizer; `overrides` sets other top-level fields."""
    return VARTeacherConfig.model_validate({"var": VARConfig(depth=depth).model_dump()} | overrides)


def describe_state_dict(sd: dict[str, Tensor]) -> str:
    """What a checkpoint holds, judged from its keys (for error messages)."""
    if "tok_embeddings.weight" in sd or "cls_embedding.embedding_table.weight" in sd:
        return "a LlamaGen GPT checkpoint (use LlamaGenTeacher)"
    if "quantize.codebook_used" in sd:
        return "a LlamaGen VQ tokenizer checkpoint"
    if any(k.startswith("quantize.quant_resi.") for k in sd):
        return "the VAR VQVAE tokenizer (pass it as the VQVAE checkpoint)"
    if "pos_1LC" in sd and "class_emb.weight" in sd:
        depth = sum(1 for k in sd if k.startswith("blocks.") and k.endswith(".attn.mat_qkv.weight"))
        width = sd["pos_1LC"].shape[-1]
        return f"a VAR transformer with depth {depth}, width {width}"
    return f"an unknown model (first keys {sorted(sd)[:4]})"


def _check_var_state_dict(sd: dict[str, Tensor], cfg: VARConfig, path: str | os.PathLike) -> None:
    if not ("pos_1LC" in sd and "class_emb.weight" in sd):
        raise CheckpointError(
            f"VAR checkpoint {str(path)!r}: expected {cfg.describe()} weights, found {describe_state_dict(sd)}"
        )
    depth = sum(1 for k in sd if k.startswith("blocks.") and k.endswith(".attn.mat_qkv.weight"))
    width = sd["pos_1LC"].shape[-1]
    if depth != cfg.depth or width != cfg.width:
        raise CheckpointError(
            f"VAR checkpoint {str(path)!r}: holds a VAR with depth {depth}, width {width}, but the config expects "
            f"{cfg.describe()}; build the teacher with VARConfig(depth={depth}) (var_teacher_config({depth}))"
        )


def _check_vqvae_state_dict(sd: dict[str, Tensor], path: str | os.PathLike) -> None:
    if not any(k.startswith("quantize.quant_resi.") for k in sd):
        raise CheckpointError(
            f"VQVAE checkpoint {str(path)!r}: expected the VAR multi-scale VQVAE, found {describe_state_dict(sd)}"
        )


@dataclass
class VARTeacherSample:
    """ids (B, N); images (B, 3, H, W) in [0, 1] (None when not decoded); log_probs (B, N, V) the policy's
    log-probs at every step (only when asked for)."""

    ids: Tensor
    images: Tensor | None = None
    log_probs: Tensor | None = None


class VARTeacher(nn.Module):
    """VAR transformer + VQVAE implementing `dd2_core.teacher.Teacher` (weights frozen, eval mode)."""

    def __init__(
        self,
        var: VAR,
        vqvae: VARVQVAE,
        *,
        policy: SamplingPolicy = VAR_POLICY,
        compile: bool = False,
    ):
        super().__init__()
        for name in ("vocab_size", "token_dim", "patch_nums"):
            a, b = getattr(var.cfg, name), getattr(vqvae.cfg, name)
            if a != b:
                raise DD2ValueError(f"VARTeacher: VAR and VQVAE disagree on {name}: {a} vs {b}")
        self.var = var.eval().requires_grad_(False)
        self.vqvae = vqvae.eval().requires_grad_(False)
        self.policy = policy
        self.num_tokens = var.cfg.num_tokens
        self.num_classes = var.cfg.num_classes
        self.token_groups = var.cfg.token_groups
        # the scale step sees a new query length and KV length at every scale: dynamo recompiles it once with
        # dynamic sizes (3 graphs in all). CUDA graphs (mode="reduce-overhead") do not work with this step: the KV
        # cache returned by one scale's graph is an input of the next and gets overwritten (seen on an H100).
        self._forward = torch.compile(var.forward) if compile else var.forward
        self._step = torch.compile(var.forward_step) if compile else var.forward_step

    @classmethod
    def from_checkpoints(
        cls,
        cfg: VARTeacherConfig,
        var_path: str | os.PathLike,
        vqvae_path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
    ) -> VARTeacher:
        """Load `var_d*.pth` and `vae_ch160v4096z32.pth` (raw state_dicts; {"model": ...} layouts work too).

        Errors: FileNotFoundError for a missing file; CheckpointError for a truncated or foreign file, the other
        family's checkpoint, another depth (naming the config to use), or any key/shape mismatch.
        """
        vae_sd = read_state_dict(vqvae_path)
        _check_vqvae_state_dict(vae_sd, vqvae_path)
        var_sd = read_state_dict(var_path)
        _check_var_state_dict(var_sd, cfg.var, var_path)
        with torch.device("meta"):  # every tensor, buffers included, comes from the checkpoint: skip random init
            var, vqvae = VAR(cfg.var), VARVQVAE(cfg.vqvae)
        var.to_empty(device=device)
        vqvae.to_empty(device=device)
        load_strict(
            vqvae,
            vae_sd,
            expected=f"the VAR VQVAE ({cfg.vqvae.vocab_size} codes of dim {cfg.vqvae.token_dim})",
            source=str(vqvae_path),
        )
        load_strict(var, var_sd, expected=cfg.var.describe(), source=str(var_path))
        var.to(_DTYPES[cfg.dtype])
        logger.info("loaded %s from %s and its VQVAE from %s (%s)", cfg.var.describe(), var_path, vqvae_path, cfg.dtype)
        return cls(var, vqvae, policy=cfg.policy, compile=cfg.compile)

    @property
    def codebook(self) -> Tensor:
        """Raw (not normalised) code vectors.  Shapes: (V, Cvae)."""
        return self.vqvae.codebook

    def embed(self, ids: Tensor) -> Tensor:
        """Code vectors of token ids.  Shapes: ids (B, N) -> (B, N, Cvae)."""
        return self.vqvae.ids_to_tokens(ids)

    def _check(self, labels: Tensor, batch: int | None = None) -> None:
        expect_labels("labels", labels, self.num_classes, allow_null=False, batch=batch)

    def logits(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """Teacher-forced conditional and (under CFG) null-class logits in one pass over 2B rows.

        Shapes: tokens (B, N, Cvae), labels (B,) -> (B, N, V), (B, N, V) or None, float32.
        """
        expect_shape("tokens", tokens, (None, self.num_tokens, self.vqvae.cfg.token_dim))
        self._check(labels, batch=tokens.shape[0])
        x_in = self.vqvae.next_scale_input(tokens)  # (B, N - 1, Cvae): same f_hat construction as for codes
        if not self.policy.uses_cfg:
            return self._forward(labels, x_in), None
        rows = torch.cat((labels, torch.full_like(labels, self.num_classes)))  # (2B,) cond | null
        cond, uncond = self._forward(rows, torch.cat((x_in, x_in))).chunk(2)  # (B, N, V) each
        return cond, uncond

    def log_probs(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """log p(q_i | q_<i) under the policy, -inf for filtered codes; row i sees only earlier scales.

        Shapes: tokens (B, N, Cvae), labels (B,) -> (B, N, V) float32.
        """
        cond, uncond = self.logits(tokens, labels)
        return policy_log_probs(cond, uncond, self.policy, self.token_groups)

    def generate(
        self,
        labels: Tensor,
        *,
        generator: torch.Generator | None = None,
        decode: bool = True,
        return_log_probs: bool = False,
    ) -> VARTeacherSample:
        """KV-cached next-scale sampling with the policy; `generator` must live on the labels' device.

        Shapes: labels (B,) -> ids (B, N), images (B, 3, H, W) in [0, 1], log_probs (B, N, V).
        """
        self._check(labels)
        out = sample_var(
            self.var,
            self.vqvae,
            labels,
            self.policy,
            generator=generator,
            return_logits=return_log_probs,
            step=self._step,
        )
        images = (self.vqvae.decode_fhat(out.f_hat) + 1) / 2 if decode else None
        return VARTeacherSample(ids=out.ids, images=images, log_probs=out.log_probs)

    def sample(self, labels: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Token ids only.  Shapes: labels (B,) -> ids (B, N) int64."""
        return self.generate(labels, generator=generator, decode=False).ids

    @torch.no_grad()
    def decode(self, ids: Tensor) -> Tensor:
        """Token ids -> images in [0, 1].  Shapes: (B, N) -> (B, 3, H, W)."""
        return (self.vqvae.decode_ids(ids) + 1) / 2

    @torch.no_grad()
    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Continuous per-scale tokens -> images in [0, 1], no snapping to codes (method.md 9).

        Shapes: (B, N, Cvae) -> (B, 3, H, W).
        """
        return (self.vqvae.decode_tokens(tokens) + 1) / 2
