"""The VAR transformer (next-scale prediction, teachers.md 2.1-2.5): our own code, state_dict-compatible with the
released `var_d{16,20,24,30}.pth` (same keys and shapes, buffers `lvl_1L`, `attn_bias_for_masking` and
`blocks.{i}.attn.zero_k_bias` included).

Sequence: N = sum pn^2 positions, the scales in order, each row-major. Position p predicts the token at p.
    x = [class_emb(label) + pos_start (first scale), word_embed(x_in) (scales 1..S-1)] + (lvl_embed(scale) + pos_1LC)
    x_in: the next-scale input built by the VQVAE's phi / f_hat construction (`PhiConvs.next_scale_input`)
    block:  x += attn(LN(x) (1 + s1) + b1) g1;  x += ffn(LN(x) (1 + s2) + b2) g2   (AdaLN from class_emb(label))
    attention: cosine (L2-normalised q, k) with a learned per-head scale exp(min(scale_mul, ln 100)), softmax scale 1,
               block-causal by scale (bidirectional within a scale)
    head:   logits = head(LN(h) (1 + scale) + shift)
The class embedding is both the start token and the AdaLN condition; row `num_classes` is the null class. Labels are
never dropped here (the official `forward` drops them with p = 0.1 even in eval mode: teachers.md, quirk 1).

Also here: the KV-cached per-scale sampler (`sample_var`) and the backbone mode for ARDiffusion (`VARBackbone`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from dd2_core.backbone import Backbone
from dd2_core.errors import DD2ValueError, expect_labels, expect_shape
from dd2_core.logits import SamplingPolicy, cfg_combine, guidance_weights, top_k_filter, top_p_filter
from dd2_core.models.var_vqvae import VAR_PATCH_NUMS, VARVQVAE, PhiConvs, check_patch_nums
from dd2_core.teacher import group_slices

logger = logging.getLogger(__name__)

# ln(100) as the official code computes it (float32 log, then .item()): the cap of the per-head attention scale
MAX_SCALE_MUL = 4.605170249938965

KVCache = list[tuple[Tensor, Tensor]]


class VARConfig(BaseModel):
    """VAR transformer sizes; `VARConfig(depth=d)` is the released VAR-d{d} (width 64 d, d heads)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: int = Field(16, ge=1, description="number of AdaLN blocks (released: 16, 20, 24, 30)")
    embed_dim: int | None = Field(None, ge=8, description="C, width; None = 64 * depth")
    num_heads: int | None = Field(None, ge=1, description="attention heads; None = depth (head dim 64)")
    mlp_ratio: float = Field(4.0, gt=0, description="FFN hidden width = round(C * mlp_ratio)")
    norm_eps: float = Field(1e-6, gt=0, description="LayerNorm eps (no affine)")
    num_classes: int = Field(1000, ge=1, description="real classes; id num_classes is the null class")
    vocab_size: int = Field(4096, ge=2, description="V, codebook size of the VQVAE")
    token_dim: int = Field(32, ge=1, description="Cvae, code vector dimension of the VQVAE")
    patch_nums: tuple[int, ...] = Field(VAR_PATCH_NUMS, description="side of every scale")

    @field_validator("patch_nums")
    @classmethod
    def _patch_nums(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return check_patch_nums(v)

    @model_validator(mode="after")
    def _heads_divide(self) -> VARConfig:
        if self.width % self.heads:
            raise ValueError(
                f"embed_dim must be a multiple of num_heads, got embed_dim={self.width}, num_heads={self.heads}"
            )
        return self

    @property
    def width(self) -> int:
        return self.embed_dim if self.embed_dim is not None else 64 * self.depth

    @property
    def heads(self) -> int:
        return self.num_heads if self.num_heads is not None else self.depth

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def token_groups(self) -> tuple[int, ...]:
        return tuple(p * p for p in self.patch_nums)

    def describe(self) -> str:
        """Human-readable name for error messages, e.g. 'VAR-d16 (depth 16, width 1024, 16 heads)'."""
        return f"VAR-d{self.depth} (depth {self.depth}, width {self.width}, {self.heads} heads)"


VAR_PRESETS: dict[str, VARConfig] = {f"d{d}": VARConfig(depth=d) for d in (16, 20, 24, 30)}


class _SelfAttention(nn.Module):
    """Cosine attention with a capped learned per-head scale; qkv bias = [q_bias, 0, v_bias]."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())  # log of the logit scale
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None, cache: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple]:
        """Shapes: x (B, L, C), attn_mask (1, 1, L, L) or None, cache k/v (B, H, L_past, C/H) -> (B, L, C), new k/v."""
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.heads, c // self.heads)  # (B, L, 3, H, c)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, L, c) each
        scale = self.scale_mul_1H11.clamp_max(MAX_SCALE_MUL).exp()  # (1, H, 1, 1)
        q = F.normalize(q, dim=-1).mul(scale)
        k = F.normalize(k, dim=-1)
        if cache is not None:  # KV cache: keys and values of all earlier scales
            k = torch.cat((cache[0], k), dim=2)
            v = torch.cat((cache[1], v), dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)  # (B, H, L, c)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), (k, v)


class _FFN(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _AdaLNBlock(nn.Module):
    """AdaLN self-attention block; ada_lin(cond) splits as gamma1, gamma2, scale1, scale2, shift1, shift2."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        dim = cfg.width
        self.attn = _SelfAttention(dim, cfg.heads)
        self.ffn = _FFN(dim, round(dim * cfg.mlp_ratio))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=False)

    def forward(
        self, x: Tensor, cond: Tensor, attn_mask: Tensor | None = None, cache: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Shapes: x (B, L, C), cond (B, C) -> (B, L, C), new k/v of this block."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond).view(-1, 1, 6, x.shape[-1]).unbind(2)
        a, kv = self.attn(self.norm(x).mul(scale1.add(1)).add_(shift1), attn_mask, cache)
        x = x + a.mul(gamma1)
        x = x + self.ffn(self.norm(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2)
        return x, kv


class _AdaLNHead(nn.Module):
    """LN(h) (1 + scale) + shift with (scale, shift) = ada_lin(cond): the features the logits head reads."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        dim = cfg.width
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=False)

    def forward(self, h: Tensor, cond: Tensor) -> Tensor:
        """Shapes: h (B, L, C), cond (B, C) -> (B, L, C)."""
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, h.shape[-1]).unbind(2)
        return self.norm(h).mul(scale.add(1)).add_(shift)


class VAR(nn.Module):
    """The VAR transformer.  `with_head=False` drops `head` (the backbone mode reads the features before it)."""

    def __init__(self, cfg: VARConfig | None = None, *, with_head: bool = True):
        super().__init__()
        self.cfg = cfg = cfg or VARConfig()
        dim, first_l, n = cfg.width, cfg.patch_nums[0] ** 2, cfg.num_tokens
        self.first_l = first_l
        # registration order = state_dict order of the official model: own params, own buffers, then children
        self.pos_start = nn.Parameter(torch.empty(1, first_l, dim))
        self.pos_1LC = nn.Parameter(torch.empty(1, n, dim))
        lvl = torch.tensor([si for si, pn in enumerate(cfg.patch_nums) for _ in range(pn * pn)])  # (N,) scale index
        self.register_buffer("lvl_1L", lvl.view(1, n))
        allowed = lvl.view(n, 1) >= lvl.view(1, n)  # query scale >= key scale: block-causal
        self.register_buffer("attn_bias_for_masking", torch.where(allowed, 0.0, -math.inf).view(1, 1, n, n))
        self.word_embed = nn.Linear(cfg.token_dim, dim)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, dim)  # last row: null class
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), dim)
        self.blocks = nn.ModuleList(_AdaLNBlock(cfg) for _ in range(cfg.depth))
        self.head_nm = _AdaLNHead(cfg)
        self.head = nn.Linear(dim, cfg.vocab_size) if with_head else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Random init for tests and benchmarks (released weights come from checkpoints): normals with std
        sqrt(1 / 3C), small AdaLN gates so that blocks start close to the identity."""
        std = math.sqrt(1 / self.cfg.width / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.normal_(p, std=std)
        for blk in self.blocks:
            blk.ada_lin[1].weight.data.mul_(0.5)
            blk.ada_lin[1].weight.data[: 2 * self.cfg.width].mul_(1e-2)  # gamma rows
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=0.02)

    @property
    def dtype(self) -> torch.dtype:
        return self.word_embed.weight.dtype

    def embed_inputs(self, labels: Tensor, x_in: Tensor) -> tuple[Tensor, Tensor]:
        """Input sequence and AdaLN condition.

        Shapes: labels (B,), x_in (B, N - first_l, Cvae) -> (B, N, C), (B, C).
        """
        b = labels.shape[0]
        cond = self.class_emb(labels)  # (B, C)
        sos = cond.unsqueeze(1).expand(b, self.first_l, -1) + self.pos_start.expand(b, self.first_l, -1)  # (B, l0, C)
        x = torch.cat((sos, self.word_embed(x_in.to(self.dtype))), dim=1)  # (B, N, C)
        x = x + (self.lvl_embed(self.lvl_1L.expand(b, -1)) + self.pos_1LC)
        return x, cond

    def hidden(self, labels: Tensor, x_in: Tensor) -> tuple[Tensor, Tensor]:
        """Last block's output and the condition.

        Shapes: labels (B,), x_in (B, N - first_l, Cvae) -> (B, N, C), (B, C).
        """
        expect_shape("x_in", x_in, (labels.shape[0], self.cfg.num_tokens - self.first_l, self.cfg.token_dim))
        x, cond = self.embed_inputs(labels, x_in)
        mask = self.attn_bias_for_masking.to(x.dtype)
        for blk in self.blocks:
            x, _ = blk(x, cond, mask)
        return x, cond

    def features(self, labels: Tensor, x_in: Tensor) -> Tensor:
        """AdaLN-head-modulated hidden state LN(h)(1 + scale) + shift, the input of `head`.

        Shapes: labels (B,), x_in (B, N - first_l, Cvae) -> (B, N, C).
        """
        h, cond = self.hidden(labels, x_in)
        return self.head_nm(h, cond)

    def forward(self, labels: Tensor, x_in: Tensor) -> Tensor:
        """Teacher-forced logits; labels are used as given (never dropped).

        Shapes: labels (B,), x_in (B, N - first_l, Cvae) -> logits (B, N, V) float32.
        """
        if self.head is None:
            raise DD2ValueError("VAR.forward: this model was built with with_head=False; use features()")
        return self.head(self.features(labels, x_in)).float()

    def first_scale_input(self, cond: Tensor) -> Tensor:
        """Embedded first scale for the KV-cached sampler.  Shapes: cond (B, C) -> (B, first_l, C)."""
        b = cond.shape[0]
        lvl_pos = self.lvl_embed(self.lvl_1L[:, : self.first_l]) + self.pos_1LC[:, : self.first_l]  # (1, l0, C)
        return cond.unsqueeze(1).expand(b, self.first_l, -1) + self.pos_start.expand(b, self.first_l, -1) + lvl_pos

    def scale_input(self, x_map: Tensor, si: int) -> Tensor:
        """Embedded input of scale si >= 1 for the sampler.  Shapes: x_map (B, pn^2, Cvae) -> (B, pn^2, C)."""
        sl = group_slices(self.cfg.token_groups)[si]
        lvl_pos = self.lvl_embed(self.lvl_1L[:, sl]) + self.pos_1LC[:, sl]  # (1, pn^2, C)
        return self.word_embed(x_map.to(self.dtype)) + lvl_pos

    def forward_step(self, x: Tensor, cond: Tensor, cache: KVCache | None) -> tuple[Tensor, KVCache]:
        """One scale of KV-cached inference: no mask, the new scale attends to itself and all cached scales.

        Shapes: x (B, pn^2, C), cond (B, C), cache [(k, v) (B, H, L_past, C/H) per block] -> logits (B, pn^2, V)
        float32, the cache extended by this scale.
        """
        new_cache = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, cond, None, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.head(self.head_nm(x, cond)).float(), new_cache


def policy_logits(logits: Tensor, policy: SamplingPolicy) -> Tensor:
    """Temperature, top-k and top-p of the policy on CFG-combined logits; filtered entries are -inf.

    Shapes: (..., V) -> (..., V).
    """
    if policy.temperature != 1.0:
        logits = logits / policy.temperature
    logits = top_k_filter(logits, policy.top_k)
    return top_p_filter(logits, policy.top_p, policy.top_p_rule)


@dataclass
class VARSampleOutput:
    """ids (B, N) int64; f_hat (B, Cvae, H, H) the accumulated latent to decode; logits (B, N, V) the CFG-combined
    logits of every step and log_probs (B, N, V) the policy's log-probs sampled from (both only when asked for)."""

    ids: Tensor
    f_hat: Tensor
    logits: Tensor | None = None
    log_probs: Tensor | None = None


@torch.no_grad()
def sample_var(
    var: VAR,
    vqvae: VARVQVAE,
    labels: Tensor,
    policy: SamplingPolicy,
    *,
    generator: torch.Generator | None = None,
    ids: Tensor | None = None,
    return_logits: bool = False,
    step: Callable[[Tensor, Tensor, KVCache | None], tuple[Tensor, KVCache]] | None = None,
) -> VARSampleOutput:
    """KV-cached next-scale sampling (teachers.md 2.5), one transformer pass per scale over 2B rows under CFG.

    Per scale si: logits -> u + w_si (c - u) (VAR's ramp: w = 1 + cfg si / (S - 1)) -> temperature -> top-k ->
    top-p -> softmax -> one multinomial draw per token from `generator` (on the labels' device); the drawn codes
    update f_hat with the phi residual and the area-downsampled f_hat is the next scale's input.
    `ids` (B, N) replays a given sequence through the cache instead of sampling; `step` replaces
    `var.forward_step` (e.g. by a compiled version).

    Shapes: labels (B,) -> VARSampleOutput(ids (B, N), f_hat (B, Cvae, H, H), ...).
    """
    cfg, phi = var.cfg, vqvae.phi
    expect_labels("labels", labels, cfg.num_classes)
    if ids is not None:
        expect_shape("ids", ids, (labels.shape[0], cfg.num_tokens))
    step = step or var.forward_step
    b, device = labels.shape[0], labels.device
    use_cfg = policy.uses_cfg
    rows = torch.cat((labels, torch.full_like(labels, cfg.num_classes))) if use_cfg else labels  # (2B,) cond | null
    cond = var.class_emb(rows)  # (2B, C)
    x = var.first_scale_input(cond)  # (2B, l0, C)
    weights = guidance_weights(policy, cfg.token_groups, device=device)  # (N,)
    side = cfg.patch_nums[-1]
    f_hat = torch.zeros(b, cfg.token_dim, side, side, device=device, dtype=phi.qresi_ls[0].weight.dtype)
    cache, out_ids, out_logits, out_log_probs = None, [], [], []
    for si, sl in enumerate(group_slices(cfg.token_groups)):
        logits, cache = step(x, cond, cache)  # (2B, pn^2, V)
        logits = cfg_combine(logits[:b], logits[b:], weights[sl]) if use_cfg else logits  # (B, pn^2, V)
        filtered = policy_logits(logits, policy)
        if ids is None:
            probs = filtered.softmax(dim=-1)
            idx = torch.multinomial(probs.flatten(0, 1), 1, replacement=True, generator=generator)  # (B*pn^2, 1)
            idx = idx.view(b, -1)  # (B, pn^2)
        else:
            idx = ids[:, sl]
        out_ids.append(idx)
        if return_logits:
            out_logits.append(logits)
            out_log_probs.append(filtered.log_softmax(dim=-1))
        pn = cfg.patch_nums[si]
        h = rearrange(vqvae.quantize.embedding(idx), "b (h w) c -> b c h w", h=pn)  # (B, Cvae, pn, pn)
        f_hat = f_hat + phi.residual(h, si)
        if si + 1 < len(cfg.patch_nums):
            pn_next = cfg.patch_nums[si + 1]
            x_map = rearrange(F.interpolate(f_hat, size=(pn_next, pn_next), mode="area"), "b c h w -> b (h w) c")
            x = var.scale_input(x_map, si + 1)  # (B, pn'^2, C)
            x = torch.cat((x, x)) if use_cfg else x  # (2B, pn'^2, C): the same input for cond and null rows
    return VARSampleOutput(
        ids=torch.cat(out_ids, dim=1),
        f_hat=f_hat,
        logits=torch.cat(out_logits, dim=1) if return_logits else None,
        log_probs=torch.cat(out_log_probs, dim=1) if return_logits else None,
    )


class VARBackboneConfig(BaseModel):
    """The VAR transformer as an ARDiffusion backbone, with the phi convs of its VQVAE."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    var: VARConfig = Field(default_factory=VARConfig, description="transformer sizes")
    num_phi: int = Field(4, ge=2, description="phi convs of the VQVAE (share_quant_resi)")
    phi_ratio: float = Field(0.5, gt=0.0, le=1.0, description="quant_resi of the VQVAE")


class VARBackbone(Backbone):
    """VAR in backbone mode: continuous per-scale tokens -> features, block-causal by scale.

    tokens (B, N, Cvae) are per-scale residual tokens (codes, generator outputs or noise); the next-scale input is
    built from them with the VQVAE's phi / f_hat construction (a frozen copy of the phi convs lives in `phi`), so
    features of scale k depend only on labels and tokens of scales < k. The features are the AdaLN-head-modulated
    hidden state LN(h)(1 + scale) + shift (what the logits head reads); D = C. There is no logits head.
    """

    def __init__(self, cfg: VARBackboneConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VARBackboneConfig()
        vc = cfg.var
        self.token_dim, self.feature_dim = vc.token_dim, vc.width
        self.num_tokens, self.num_classes = vc.num_tokens, vc.num_classes
        self.token_groups = vc.token_groups
        self.var = VAR(vc, with_head=False)
        self.phi = PhiConvs(vc.token_dim, vc.patch_nums, cfg.num_phi, cfg.phi_ratio)
        self.phi.requires_grad_(False)  # part of the tokenizer: must stay equal to the decoder's phi

    @classmethod
    def from_teacher(cls, var: VAR, vqvae: VARVQVAE) -> VARBackbone:
        """A backbone with the teacher's transformer weights (without `head`) and the VQVAE's phi convs."""
        vq = vqvae.cfg
        for name in ("vocab_size", "token_dim", "patch_nums"):
            if getattr(var.cfg, name) != getattr(vq, name):
                raise DD2ValueError(
                    f"VAR and VQVAE disagree on {name}: {getattr(var.cfg, name)} vs {getattr(vq, name)}"
                )
        with torch.device("meta"):  # every tensor is copied from the teacher below: skip the random init
            bb = cls(VARBackboneConfig(var=var.cfg, num_phi=vq.num_phi, phi_ratio=vq.phi_ratio))
        bb.to_empty(device=var.word_embed.weight.device)
        bb.to(dtype=var.dtype)
        bb.init_from_teacher(var, vqvae)
        return bb

    @torch.no_grad()
    def init_from_teacher(self, var: VAR, vqvae: VARVQVAE) -> None:
        """Copy every transformer weight except `head`, and the VQVAE's phi convs (strict: shapes must match)."""
        own = self.var.state_dict()
        src = {k: v for k, v in var.state_dict().items() if not k.startswith("head.")}
        if set(own) != set(src) or any(own[k].shape != src[k].shape for k in own):
            raise DD2ValueError(
                f"init_from_teacher: teacher {var.cfg.describe()} does not match backbone {self.cfg.var.describe()}"
            )
        self.var.load_state_dict(src, strict=True)
        self.phi.load_state_dict(vqvae.phi.state_dict(), strict=True)

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Shapes: tokens (B, N, Cvae), labels (B,) -> features (B, N, C)."""
        self.check_inputs(tokens, labels)
        x_in = self.phi.next_scale_input(tokens)  # (B, N - first_l, Cvae): never reads the last scale
        return self.var.features(labels, x_in)
