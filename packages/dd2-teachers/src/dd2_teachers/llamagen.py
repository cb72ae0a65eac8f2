"""LlamaGen c2i as a DD2 teacher: official checkpoints, constant-scale CFG policy, KV-cached sampling, log-probs on
continuous prefixes (implements `dd2_core.teacher.Teacher`).

    log_probs(tokens, labels)   one teacher-forced pass on 2B rows [labels; null] through the continuous-input MLP
                                `cont_embed` (DD2 App. E.4), then u + s (c - u), temperature, top-k, top-p, log-softmax
    sample(labels, generator)   KV-cached AR sampling with the same policy (CFG before temperature and filtering)
    sample_images / decode      VQ-16 decoding of ids or continuous tokens

The released GPT checkpoints have no `cont_embed`; when it is missing it is fitted to the token-embedding table over
the L2-normalised codebook at load time, and `embedding_fit` reports the error. An adapted checkpoint (with
`cont_embed.*` keys, after the fine-tuning stage) loads as it is.

Defaults follow DD2 (method.md 2 / App. E.5): CFG 2.0 constant, top-k 8000, top-p 1.0, temperature 1.0.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from dd2_core.checkpoint import load_strict, read_state_dict
from dd2_core.errors import CheckpointError, DD2ValueError, expect_labels, expect_shape
from dd2_core.logits import SamplingPolicy, cfg_combine, filtered_log_probs, guidance_weights, policy_log_probs
from dd2_core.models.llamagen import LLAMAGEN_PRESETS, EmbeddingFit, LlamaGen, LlamaGenConfig
from dd2_core.models.llamagen_vq import VQ_PRESETS, LlamaGenVQ, VQConfig
from dd2_core.sampling import integrate_teacher_flow

logger = logging.getLogger(__name__)


def default_llamagen_policy() -> SamplingPolicy:
    """DD2's LlamaGen teacher settings: CFG 2.0 (constant), top-k 8000, top-p 1.0 (off), temperature 1.0."""
    return SamplingPolicy(cfg_scale=2.0, cfg_schedule="constant", top_k=8000, top_p=1.0, top_p_rule="hf")


class LlamaGenTeacherConfig(BaseModel):
    """A LlamaGen GPT size, its VQ tokenizer, and the sampling policy the teacher's p is defined by."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpt: LlamaGenConfig = Field(..., description="GPT size; codebook_dim is taken from the VQ config")
    vq: VQConfig = Field(default_factory=VQ_PRESETS["VQ-16"], description="VQ tokenizer sizes")
    policy: SamplingPolicy = Field(default_factory=default_llamagen_policy, description="CFG / top-k / top-p")
    sample_input: Literal["ids", "codes"] = Field(
        "ids",
        description="inputs of the AR sampler: 'ids' = the token table (the released teacher), "
        "'codes' = cont_embed(code vectors) (the adapted continuous-input teacher, the one log_probs uses)",
    )
    fit_steps: int = Field(200, ge=0, description="Adam steps of the cont_embed fit when the checkpoint has none")
    compile: bool = Field(False, description="torch.compile the decode step (CUDA graphs on CUDA) and the TF pass")
    compile_backend: str = Field("inductor", description="torch.compile backend ('eager' only traces: for tests)")

    @model_validator(mode="after")
    def _gpt_matches_vq(self) -> LlamaGenTeacherConfig:
        if self.gpt.vocab_size != self.vq.codebook_size:
            raise ValueError(
                f"gpt.vocab_size must equal vq.codebook_size, got {self.gpt.vocab_size} and {self.vq.codebook_size}"
            )
        if self.gpt.codebook_dim not in (None, self.vq.codebook_dim):
            raise ValueError(
                "gpt.codebook_dim must be None or vq.codebook_dim, "
                f"got {self.gpt.codebook_dim} and {self.vq.codebook_dim}"
            )
        return self

    def gpt_config(self) -> LlamaGenConfig:
        """The GPT config with the continuous-input MLP sized for the VQ codes."""
        return LlamaGenConfig.model_validate(self.gpt.model_dump() | {"codebook_dim": self.vq.codebook_dim})


def llamagen_teacher_config(size: str = "GPT-L", *, grid: int = 16, **overrides) -> LlamaGenTeacherConfig:
    """Teacher config for a released size ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B") with VQ-16.

    grid 16 = 256 px checkpoints (c2i_B_256.pt, c2i_L_256.pt), 24 = 384 px.
    """
    if size not in LLAMAGEN_PRESETS:
        raise DD2ValueError(f"size: expected one of {sorted(LLAMAGEN_PRESETS)}, got {size!r}")
    return LlamaGenTeacherConfig(gpt=LLAMAGEN_PRESETS[size](grid=grid), **overrides)


# ---------------------------------------------------------------------------------------------------------------------
# recognising checkpoints, so that a wrong file gets a useful error instead of a list of 300 keys


def _first_keys(sd: Mapping[str, Tensor], n: int = 4) -> str:
    return ", ".join(list(sd)[:n])


def _family_error(sd: Mapping[str, Tensor], path: str, want: str) -> str | None:
    """Name the model family of a state_dict that is not `want` ('gpt' or 'vq'), or None when it may be `want`."""
    keys = set(sd)
    is_var = "class_emb.weight" in keys or any(k.startswith("blocks.") and ".attn.mat_qkv" in k for k in keys)
    is_var_vae = any("quant_resi" in k for k in keys) or any(k.startswith("decoder.up.") for k in keys)
    is_vq = "quantize.embedding.weight" in keys and not is_var_vae
    is_gpt = "tok_embeddings.weight" in keys or any(k.startswith("layers.") for k in keys)
    if is_var:
        return f"{path!r} looks like a VAR transformer checkpoint (keys class_emb.weight, blocks.*)"
    if is_var_vae:
        return f"{path!r} looks like VAR's multi-scale VQVAE checkpoint (keys quantize.quant_resi.*, decoder.up.*)"
    if want == "gpt" and is_vq:
        return (
            f"{path!r} looks like a LlamaGen VQ tokenizer checkpoint (keys quantize.*, encoder.*); "
            "were the GPT and VQ paths swapped?"
        )
    if want == "vq" and is_gpt:
        return (
            f"{path!r} looks like a LlamaGen GPT checkpoint (keys tok_embeddings.*, layers.*); "
            "were the GPT and VQ paths swapped?"
        )
    return None


def describe_gpt_state_dict(sd: Mapping[str, Tensor]) -> str:
    """Size of a LlamaGen GPT state_dict, named after the matching preset where there is one."""
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    n_layer = max(layers) + 1 if layers else 0
    vocab, dim = sd["tok_embeddings.weight"].shape
    classes = sd["cls_embedding.embedding_table.weight"].shape[0] - 1
    name = next(
        (k for k, f in LLAMAGEN_PRESETS.items() if (f().n_layer, f().dim, f().vocab_size) == (n_layer, dim, vocab)),
        "custom",
    )
    return f"LlamaGen {name} ({n_layer} layers, dim {dim}, vocab {vocab}, {classes} classes)"


def check_gpt_state_dict(sd: Mapping[str, Tensor], cfg: LlamaGenConfig, path: str) -> None:
    """Raise CheckpointError naming the family or size when `sd` is not a LlamaGen GPT of the config's size."""
    want = cfg.describe()
    family = _family_error(sd, path, "gpt")
    if family:
        raise CheckpointError(f"GPT checkpoint: {family}; expected a LlamaGen c2i GPT checkpoint (c2i_*.pt) for {want}")
    if "tok_embeddings.weight" not in sd or "cls_embedding.embedding_table.weight" not in sd:
        raise CheckpointError(
            f"GPT checkpoint {path!r}: expected a LlamaGen c2i GPT for {want} (keys tok_embeddings.weight, "
            f"cls_embedding.embedding_table.weight), found keys {_first_keys(sd)}, ..."
        )
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    found = (max(layers) + 1 if layers else 0, *sd["tok_embeddings.weight"].shape[::-1])
    found += (sd["cls_embedding.embedding_table.weight"].shape[0] - 1,)
    if found != (cfg.n_layer, cfg.dim, cfg.vocab_size, cfg.num_classes):
        raise CheckpointError(
            f"GPT checkpoint {path!r}: holds {describe_gpt_state_dict(sd)}, but the config expects {want}; "
            "choose the config of the checkpoint's size (LLAMAGEN_PRESETS / llamagen_teacher_config(size=...))"
        )


def check_vq_state_dict(sd: Mapping[str, Tensor], cfg: VQConfig, path: str) -> None:
    """Raise CheckpointError when `sd` is not a LlamaGen VQ tokenizer with the config's codebook and channels."""
    family = _family_error(sd, path, "vq")
    if family:
        raise CheckpointError(f"VQ checkpoint: {family}; expected the LlamaGen VQ-16 tokenizer (vq_ds16_c2i.pt)")
    need = ("quantize.embedding.weight", "quant_conv.weight", "encoder.conv_in.weight")
    if any(k not in sd for k in need):
        raise CheckpointError(
            f"VQ checkpoint {path!r}: expected a LlamaGen VQ tokenizer (keys {', '.join(need)}), "
            f"found keys {_first_keys(sd)}, ..."
        )
    v, c = sd["quantize.embedding.weight"].shape
    z, ch = sd["quant_conv.weight"].shape[1], sd["encoder.conv_in.weight"].shape[0]
    if (v, c, z, ch) != (cfg.codebook_size, cfg.codebook_dim, cfg.z_channels, cfg.ch):
        raise CheckpointError(
            f"VQ checkpoint {path!r}: holds codebook {v}x{c}, z_channels {z}, ch {ch}; the config expects codebook "
            f"{cfg.codebook_size}x{cfg.codebook_dim}, z_channels {cfg.z_channels}, ch {cfg.ch}"
        )


# ---------------------------------------------------------------------------------------------------------------------
# the teacher


class LlamaGenTeacher(nn.Module):
    """LlamaGen GPT + VQ-16 behind the Teacher protocol. Build it with `from_checkpoints`.

    Attributes: codebook (V, C) L2-normalised codes (float32), num_tokens N = grid^2, num_classes, token_groups
    (1,)*N, policy, embedding_fit (the cont_embed fit error, None when the checkpoint carried cont_embed).
    """

    def __init__(
        self, cfg: LlamaGenTeacherConfig, model: LlamaGen, vq: LlamaGenVQ, embedding_fit: EmbeddingFit | None = None
    ):
        super().__init__()
        if model.cont_embed is None:
            raise DD2ValueError("model: expected a LlamaGen with cont_embed (built from cfg.gpt_config()), got none")
        if model.cfg.vocab_size != vq.cfg.codebook_size or model.cfg.codebook_dim != vq.cfg.codebook_dim:
            raise DD2ValueError(
                f"model and vq disagree: GPT vocab {model.cfg.vocab_size} / codebook_dim {model.cfg.codebook_dim}, "
                f"VQ codebook {vq.cfg.codebook_size} x {vq.cfg.codebook_dim}"
            )
        self.cfg = cfg
        self.model = model
        self.vq = vq
        self.embedding_fit = embedding_fit
        self.policy = cfg.policy
        self.num_tokens, self.num_classes = model.cfg.num_tokens, model.cfg.num_classes
        self.token_groups = (1,) * self.num_tokens
        self._compiled_step: Callable[[Tensor, Tensor], Tensor] | None = None
        self._compiled_tf: Callable[[Tensor, Tensor], Tensor] | None = None
        self.eval().requires_grad_(False)  # no dropout anywhere; a training stage re-enables gradients itself

    @classmethod
    def from_checkpoints(
        cls,
        cfg: LlamaGenTeacherConfig,
        gpt_path: str | os.PathLike,
        vq_path: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> LlamaGenTeacher:
        """Load the GPT (`{"model": sd}` or raw/FSDP layout) and the VQ tokenizer, strictly, and fit cont_embed
        when the GPT checkpoint has none. Errors name the family or size found and the config expected."""
        gpt_cfg = cfg.gpt_config()
        gpt_sd = read_state_dict(gpt_path)
        stale = [k for k in gpt_sd if ".attention.kv_cache." in k]
        if stale:  # the official sampler registers its caches as buffers; a file saved after sampling holds them
            logger.warning("GPT checkpoint %s: ignoring %d KV-cache buffers saved after sampling", gpt_path, len(stale))
            gpt_sd = {k: v for k, v in gpt_sd.items() if k not in stale}
        vq_sd = read_state_dict(vq_path)
        check_gpt_state_dict(gpt_sd, gpt_cfg, str(gpt_path))
        check_vq_state_dict(vq_sd, cfg.vq, str(vq_path))
        with torch.device("meta"):  # no random init of weights that are about to be overwritten
            model, vq = LlamaGen(gpt_cfg), LlamaGenVQ(cfg.vq)
        model.to_empty(device=device)
        vq.to_empty(device=device)
        adapted = any(k.startswith("cont_embed.") for k in gpt_sd)
        if not adapted:  # released checkpoint: cont_embed is fitted below, after the strict check of everything else
            gpt_sd = dict(gpt_sd) | {k: v for k, v in model.state_dict().items() if k.startswith("cont_embed.")}
        load_strict(model, gpt_sd, expected=gpt_cfg.describe(), source=f"GPT checkpoint {str(gpt_path)!r}")
        load_strict(vq, vq_sd, expected=f"LlamaGen VQ {cfg.vq.model_dump()}", source=f"VQ checkpoint {str(vq_path)!r}")
        fit = None
        if not adapted:
            fit = model.fit_continuous(vq.codebook.detach(), steps=cfg.fit_steps)
        logger.info(
            "LlamaGen teacher: %s, %.1fM GPT params, VQ %dx%d, policy %s, cont_embed %s",
            gpt_cfg.describe(),
            sum(p.numel() for p in model.parameters()) / 1e6,
            cfg.vq.codebook_size,
            cfg.vq.codebook_dim,
            cfg.policy.model_dump(),
            "from checkpoint" if adapted else f"fitted (relative error {fit.relative:.3e})",
        )
        return cls(cfg, model.to(dtype), vq.to(dtype), fit)

    # -- Teacher protocol -------------------------------------------------------------------------------------------

    @property
    def codebook(self) -> Tensor:
        """L2-normalised code vectors c_j.  Shapes: -> (V, C) float32."""
        return self.vq.codebook.float()

    def embed(self, ids: Tensor) -> Tensor:
        """Shapes: ids (B, N) -> (B, N, C) float32 normalised codes."""
        return self.vq.codes(ids).float()

    def logits(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """Conditional and (with CFG) null-class teacher-forced logits on continuous tokens, in one 2B-row pass.

        Shapes: tokens (B, N, C), labels (B,) -> cond (B, N, V), uncond (B, N, V) or None; float32.
        """
        expect_shape("tokens", tokens, (None, self.num_tokens, self.model.cfg.codebook_dim))
        expect_labels("labels", labels, self.num_classes, allow_null=False, batch=tokens.shape[0])
        use_cfg = self.policy.uses_cfg
        rows_labels = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if use_cfg else labels
        rows = torch.cat([tokens, tokens]) if use_cfg else tokens  # (R, N, C)
        tf = self._compiled_tf if self._compiled_tf is not None else self._teacher_forced
        if self.cfg.compile and self._compiled_tf is None:
            self.model.rope(tokens.device)  # build the rotary table outside the compiled graph
            self._compiled_tf = tf = torch.compile(self._teacher_forced, backend=self.cfg.compile_backend)
        out = tf(rows, rows_labels)  # (R, N, V)
        return out.chunk(2) if use_cfg else (out, None)

    def _teacher_forced(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """[class, cont_embed(tokens[:, :-1])] -> logits, no checks.  Shapes: (R, N, C), (R,) -> (R, N, V)."""
        return self.model.forward_embedded(self.model.cont_embed(tokens[:, :-1]), labels)

    @torch.no_grad()
    def log_probs(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """log p(q_i | q_<i, class) after CFG, temperature, top-k, top-p; filtered codes are -inf.

        Shapes: tokens (B, N, C) continuous prefix tokens, labels (B,) in [0, num_classes) -> (B, N, V) float32.
        """
        cond, uncond = self.logits(tokens, labels)
        return policy_log_probs(cond, uncond, self.policy, self.token_groups)

    @torch.no_grad()
    def sample(self, labels: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """KV-cached AR sampling with the teacher's policy.  Shapes: labels (B,) -> ids (B, N) int64."""
        return self.generate(labels, generator=generator)

    @torch.no_grad()
    def flow_map(self, noise: Tensor, labels: Tensor, *, steps: int = 64, power: float = 2.0) -> Tensor:
        """DD1's flow map F(eps) through the KV cache: at each position the guided, filtered p(. | F_<i, class) of
        one decode step, the exact teacher flow integrated from noise_i (`integrate_teacher_flow`), and the
        continuous result fed back through cont_embed, as the teacher-forced passes of
        `dd2_core.sampling.teacher_flow_map(cached=False)` do, at the cost of one AR sampling pass.

        Shapes: noise (B, N, C), labels (B,) -> tokens (B, N, C) float32.
        """
        model, n = self.model, self.num_tokens
        expect_shape("noise", noise, (None, n, self.model.cfg.codebook_dim))
        expect_labels("labels", labels, self.num_classes, allow_null=False, batch=noise.shape[0])
        device, dtype = noise.device, model.norm.weight.dtype
        use_cfg = self.policy.uses_cfg
        rows_labels = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if use_cfg else labels
        model.setup_cache(rows_labels.shape[0], device=device, dtype=dtype)
        step = self._step(device) or model.step
        weights = guidance_weights(self.policy, self.token_groups, device=device)  # (N,)
        codebook = self.codebook.to(device)
        positions = torch.arange(n, device=device)
        out = torch.empty(noise.shape, device=device, dtype=torch.float32)
        x = model.cls_embedding(rows_labels)  # (R, 1, D)
        for i in range(n):
            logits = step(x, positions[i : i + 1])  # (R, 1, V)
            if use_cfg:
                cond, uncond = logits.chunk(2)
                logits = cfg_combine(cond, uncond, weights[i : i + 1])
            log_probs = filtered_log_probs(logits, self.policy)  # (B, 1, V)
            out[:, i : i + 1] = integrate_teacher_flow(noise[:, i : i + 1].float(), log_probs, codebook, steps=steps,
                                                       power=power)  # fmt: skip
            if i + 1 < n:
                prev = torch.cat([out[:, i : i + 1]] * 2) if use_cfg else out[:, i : i + 1]  # (R, 1, C)
                x = model.cont_embed(prev.to(dtype)).to(dtype)
        return out

    # -- sampling and decoding --------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        *,
        generator: torch.Generator | None = None,
        prefix: Tensor | None = None,
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """`LlamaGen.generate` with the teacher's policy, input mode and (optional) compiled decode step.

        Shapes: labels (B,), prefix ids (B, T) forced for the first T steps -> ids (B, N) [, guided logits (B, N, V)].
        """
        expect_labels("labels", labels, self.num_classes, allow_null=False)
        codebook = self.vq.codebook if self.cfg.sample_input == "codes" else None
        return self.model.generate(
            labels,
            self.policy,
            generator=generator,
            codebook=codebook,
            prefix=prefix,
            step=self._step(labels.device),
            return_logits=return_logits,
        )

    def _step(self, device: torch.device) -> Callable[[Tensor, Tensor], Tensor] | None:
        """The decode step: None (eager `model.step`) or a compiled copy; CUDA graphs on CUDA."""
        if not self.cfg.compile:
            return None
        if self._compiled_step is None:
            cuda = device.type == "cuda" and self.cfg.compile_backend == "inductor"
            compiled = torch.compile(
                self.model.step,
                backend=self.cfg.compile_backend,
                mode="reduce-overhead" if cuda else None,
                fullgraph=True,
                dynamic=False,
            )
            if cuda:

                def step(x: Tensor, pos: Tensor) -> Tensor:
                    torch.compiler.cudagraph_mark_step_begin()
                    return compiled(x, pos).clone()  # the graph's output buffer is reused by the next replay

                self._compiled_step = step
            else:
                self._compiled_step = compiled
        return self._compiled_step

    @torch.no_grad()
    def decode(self, ids: Tensor) -> Tensor:
        """VQ-16 decoding, roughly [-1, 1], not clamped.  Shapes: ids (B, N) -> images (B, 3, H, W) float32."""
        return self.vq.decode_ids(ids).float()

    @torch.no_grad()
    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Decoding of continuous tokens (no re-quantisation).  Shapes: (B, N, C) -> images (B, 3, H, W) float32."""
        return self.vq.decode_tokens(tokens).float()

    @torch.no_grad()
    def sample_images(self, labels: Tensor, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Sample ids and decode them.  Shapes: labels (B,) -> ids (B, N), images (B, 3, H, W) in about [-1, 1]."""
        ids = self.sample(labels, generator=generator)
        return ids, self.decode(ids)
