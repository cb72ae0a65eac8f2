"""VAR's multi-scale residual VQVAE (teachers.md 2.4): our own code, state_dict-compatible with the official
`vae_ch160v4096z32.pth` (same key names and shapes, the `quantize.ema_vocab_hit_SV` buffer included).

The latent f (B, Cvae, H, H), H = patch_nums[-1], is written as a sum over scales k of residual maps:

    f_hat = sum_k phi_{m(k)}( up_H( r_k ) ),     r_k (B, Cvae, pn_k, pn_k): the tokens of scale k
    phi_m(h) = (1 - ratio) h + ratio conv3x3_m(h)           (ratio = quant_resi = 0.5; 4 partially shared convs)
    up_H = bicubic upsampling to H x H (skipped at the last scale, where pn = H)

With ids, r_k are codebook rows E[ids_k]; DD2 also feeds **continuous** per-scale tokens (generated or noise) through
the very same construction (method.md 6, "VAR specifics"). Token layout everywhere: (B, N, Cvae), the scales
concatenated in order, each scale row-major, N = sum pn^2.

The transformer's teacher-forcing input for scale k + 1 is area_{pn_{k+1}}(f_hat after scales 0..k): scale k + 1 only
sees scales <= k. `PhiConvs` owns the phi convolutions and both constructions, so a backbone can hold a copy of it.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from dd2_core.errors import DD2ValueError, expect_shape

logger = logging.getLogger(__name__)

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def check_patch_nums(patch_nums: tuple[int, ...]) -> tuple[int, ...]:
    """Validate VAR scale sides: at least two scales, positive and strictly increasing."""
    if len(patch_nums) < 2:
        raise ValueError(f"patch_nums: expected at least 2 scales, got {patch_nums}")
    if any(p < 1 for p in patch_nums) or any(a >= b for a, b in zip(patch_nums, patch_nums[1:])):
        raise ValueError(f"patch_nums: expected positive, strictly increasing sides, got {patch_nums}")
    return patch_nums


def phi_index(num_scales: int, num_phi: int) -> tuple[int, ...]:
    """Which of the `num_phi` shared phi convs each scale uses (official rule, float64 as in numpy).

    m(k) = argmin_j |tick_j - k / (S - 1)|,  ticks = linspace(1/(3K), 1 - 1/(3K), K).
    For S = 10, K = 4 this is (0, 0, 1, 1, 1, 2, 2, 3, 3, 3); k = 2 is an exact tie in real numbers that float64
    rounding breaks towards 1, which numpy reproduces here exactly.
    """
    ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    return tuple(int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) for k in range(num_scales))


class PhiConvs(nn.Module):
    """The partially shared phi convolutions and the residual f_hat accumulation over scales.

    Keys: `qresi_ls.{0..K-1}.{weight, bias}` (inside the VQVAE: `quantize.quant_resi.qresi_ls.*`).
    """

    def __init__(self, dim: int, patch_nums: tuple[int, ...], num_phi: int = 4, ratio: float = 0.5):
        super().__init__()
        self.dim = dim
        self.patch_nums = tuple(check_patch_nums(tuple(patch_nums)))
        self.ratio = ratio
        self.phi_of_scale = phi_index(len(self.patch_nums), num_phi)
        self.qresi_ls = nn.ModuleList(nn.Conv2d(dim, dim, kernel_size=3, padding=1) for _ in range(num_phi))

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    def residual(self, h: Tensor, si: int) -> Tensor:
        """Contribution of scale `si` to f_hat: phi_{m(si)}(up_H(h)).  Shapes: (B, C, pn, pn) -> (B, C, H, H)."""
        side = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        conv = self.qresi_ls[self.phi_of_scale[si]]
        return h.mul(1 - self.ratio) + conv(h).mul(self.ratio)

    def token_maps(self, tokens: Tensor) -> list[Tensor]:
        """Split a token sequence into per-scale maps.  Shapes: (B, N, C) -> [(B, C, pn, pn) for each scale]."""
        expect_shape("tokens", tokens, (None, self.num_tokens, self.dim))
        maps, start = [], 0
        for pn in self.patch_nums:
            maps.append(rearrange(tokens[:, start : start + pn * pn], "b (h w) c -> b c h w", h=pn))  # (B, C, pn, pn)
            start += pn * pn
        return maps

    def f_hat(self, tokens: Tensor) -> Tensor:
        """f_hat = sum over all scales of the phi residuals.  Shapes: tokens (B, N, C) -> (B, C, H, H)."""
        maps = self.token_maps(tokens.to(self.qresi_ls[0].weight.dtype))
        f_hat = torch.zeros_like(maps[-1])  # (B, C, H, H)
        for si, h in enumerate(maps):
            f_hat = f_hat + self.residual(h, si)
        return f_hat

    def next_scale_input(self, tokens: Tensor) -> Tensor:
        """The transformer's teacher-forcing input: for k = 1..S-1, area_{pn_k}(f_hat of scales < k), flattened.

        Reads only the tokens of scales 0..S-2 (the last scale is never an input). Accepts ids' code vectors and
        continuous tokens alike.  Shapes: tokens (B, N, C) -> (B, N - pn_0^2, C).
        """
        maps = self.token_maps(tokens.to(self.qresi_ls[0].weight.dtype))
        f_hat = torch.zeros_like(maps[-1])  # (B, C, H, H)
        inputs = []
        for si in range(len(self.patch_nums) - 1):
            f_hat = f_hat + self.residual(maps[si], si)
            pn_next = self.patch_nums[si + 1]
            nxt = F.interpolate(f_hat, size=(pn_next, pn_next), mode="area")  # (B, C, pn', pn')
            inputs.append(rearrange(nxt, "b c h w -> b (h w) c"))  # (B, pn'^2, C)
        return torch.cat(inputs, dim=1)


class VARVQVAEConfig(BaseModel):
    """VAR's VQVAE; defaults are the released `vae_ch160v4096z32.pth` (teachers.md 2.4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(4096, ge=2, description="V, codebook size")
    token_dim: int = Field(32, ge=1, description="Cvae = z_channels, dimension of a code vector")
    ch: int = Field(160, ge=1, description="base channel count of encoder and decoder")
    ch_mult: tuple[int, ...] = Field((1, 1, 2, 2, 4), min_length=1, description="channel multiplier per level")
    num_res_blocks: int = Field(2, ge=1, description="res-blocks per encoder level (the decoder has one more)")
    num_phi: int = Field(4, ge=2, description="share_quant_resi: partially shared phi convs (1 and 0 not supported)")
    phi_ratio: float = Field(0.5, gt=0.0, le=1.0, description="quant_resi: phi(h) = (1 - r) h + r conv(h)")
    patch_nums: tuple[int, ...] = Field(VAR_PATCH_NUMS, description="side of every scale; the last is the latent H")
    in_channels: int = Field(3, ge=1, description="image channels")
    norm_groups: int = Field(32, ge=1, description="GroupNorm groups (released: 32); channel counts are multiples")

    @field_validator("patch_nums")
    @classmethod
    def _patch_nums(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return check_patch_nums(v)

    @model_validator(mode="after")
    def _group_norm(self) -> VARVQVAEConfig:
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise ValueError(
                f"ch * ch_mult must be multiples of norm_groups={self.norm_groups} (GroupNorm groups), got "
                f"ch={self.ch}, ch_mult={self.ch_mult}"
            )
        return self

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def image_size(self) -> int:
        """Image side that maps to the H x H latent (downsampling 2^(levels - 1))."""
        return self.patch_nums[-1] * 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class _AttnBlock(nn.Module):
    """Single-head self-attention over pixels with a fused 1x1 qkv conv (channels q | k | v)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, kernel_size=1)
        self.proj_out = nn.Conv2d(c, c, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (t c) h w -> t b 1 (h w) c", t=3)  # (B, 1, HW, C) each
        a = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v: (B, 1, HW, C)
        return x + self.proj_out(rearrange(a, "b 1 (h w) c -> b c h w", h=h))


class _Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom only


class _Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: res-blocks, attention after each block (lowest resolution only), optional resampling."""

    def __init__(
        self, c_in: int, c_out: int, num_blocks: int, attn: bool, resample: type[nn.Module] | None, groups: int
    ):
        super().__init__()
        self.block = nn.ModuleList(_ResBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(num_blocks))
        self.attn = nn.ModuleList(_AttnBlock(c_out, groups) for _ in range(num_blocks if attn else 0))
        if resample is _Downsample:
            self.downsample = _Downsample(c_out)
        elif resample is _Upsample:
            self.upsample = _Upsample(c_out)

    def forward(self, x: Tensor) -> Tensor:
        for i, blk in enumerate(self.block):
            x = blk(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class _Mid(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1 = _ResBlock(c, c, groups)
        self.attn_1 = _AttnBlock(c, groups)
        self.block_2 = _ResBlock(c, c, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Encoder(nn.Module):
    def __init__(self, cfg: VARVQVAEConfig):
        super().__init__()
        chans = [cfg.ch * m for m in (1, *cfg.ch_mult)]
        last = len(cfg.ch_mult) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList(
            _Level(
                chans[i],
                chans[i + 1],
                cfg.num_res_blocks,
                attn=i == last,
                resample=None if i == last else _Downsample,
                groups=cfg.norm_groups,
            )
            for i in range(len(cfg.ch_mult))
        )
        self.mid = _Mid(chans[-1], cfg.norm_groups)
        self.norm_out = _norm(chans[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(chans[-1], cfg.token_dim, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class _Decoder(nn.Module):
    def __init__(self, cfg: VARVQVAEConfig):
        super().__init__()
        outs = [cfg.ch * m for m in cfg.ch_mult]
        last = len(cfg.ch_mult) - 1
        self.conv_in = nn.Conv2d(cfg.token_dim, outs[-1], kernel_size=3, padding=1)
        self.mid = _Mid(outs[-1], cfg.norm_groups)
        # up[0] is the highest resolution; level i receives the channels of level i + 1 (the mid block for the last)
        self.up = nn.ModuleList(
            _Level(
                outs[min(i + 1, last)],
                outs[i],
                cfg.num_res_blocks + 1,
                attn=i == last,
                resample=None if i == 0 else _Upsample,
                groups=cfg.norm_groups,
            )
            for i in range(len(cfg.ch_mult))
        )
        self.norm_out = _norm(outs[0], cfg.norm_groups)
        self.conv_out = nn.Conv2d(outs[0], cfg.in_channels, kernel_size=3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MultiScaleQuantizer(nn.Module):
    """Codebook (Euclidean, not normalised), the phi convs, and multi-scale residual quantisation of a latent."""

    def __init__(self, cfg: VARVQVAEConfig):
        super().__init__()
        # usage statistics of the official training code; kept so that the checkpoint loads strictly
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(cfg.patch_nums), cfg.vocab_size))
        self.quant_resi = PhiConvs(cfg.token_dim, cfg.patch_nums, cfg.num_phi, cfg.phi_ratio)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.token_dim)

    def nearest_ids(self, z: Tensor) -> Tensor:
        """Euclidean nearest code of every row.  Shapes: (M, C) -> (M,) int64."""
        e = self.embedding.weight
        dist = z.square().sum(1, keepdim=True) + e.square().sum(1)  # ||z||^2 + ||e||^2: (M, V)
        dist = torch.addmm(dist, z, e.T, alpha=-2)  # - 2 z.e
        return dist.argmin(dim=1)

    def quantize(self, f: Tensor) -> Tensor:
        """Multi-scale residual quantisation of a latent.  Shapes: f (B, C, H, H) -> ids (B, N) int64.

        For each scale: ids = nearest(area_{pn}(f_rest)); h = phi(up_H(E[ids])); f_rest -= h.
        """
        phi = self.quant_resi
        f_rest = f.detach().float()
        out = []
        for si, pn in enumerate(phi.patch_nums):
            z = f_rest if si == len(phi.patch_nums) - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            ids = self.nearest_ids(rearrange(z, "b c h w -> (b h w) c"))  # (B*pn*pn,)
            ids = rearrange(ids, "(b n) -> b n", b=f.shape[0])  # (B, pn*pn)
            h = rearrange(self.embedding(ids), "b (h w) c -> b c h w", h=pn)  # (B, C, pn, pn)
            f_rest = f_rest - phi.residual(h, si)
            out.append(ids)
        return torch.cat(out, dim=1)


class VARVQVAE(nn.Module):
    """VAR's multi-scale VQVAE.  Keys: encoder.*, decoder.*, quantize.*, quant_conv.*, post_quant_conv.*."""

    def __init__(self, cfg: VARVQVAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VARVQVAEConfig()
        self.encoder = _Encoder(cfg)
        self.decoder = _Decoder(cfg)
        self.quantize = MultiScaleQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.token_dim, cfg.token_dim, kernel_size=3, padding=1)
        self.post_quant_conv = nn.Conv2d(cfg.token_dim, cfg.token_dim, kernel_size=3, padding=1)

    @property
    def phi(self) -> PhiConvs:
        return self.quantize.quant_resi

    @property
    def codebook(self) -> Tensor:
        """Raw code vectors.  Shapes: (V, C)."""
        return self.quantize.embedding.weight

    @property
    def token_groups(self) -> tuple[int, ...]:
        return tuple(p * p for p in self.cfg.patch_nums)

    def _check_ids(self, ids: Tensor) -> None:
        expect_shape("ids", ids, (None, self.cfg.num_tokens))
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise DD2ValueError(f"ids: expected an integer tensor, got dtype {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise DD2ValueError(
                f"ids: expected values in [0, {self.cfg.vocab_size - 1}], got [{int(ids.min())}, {int(ids.max())}]"
            )

    def ids_to_tokens(self, ids: Tensor) -> Tensor:
        """Code vectors of ids.  Shapes: (B, N) -> (B, N, C)."""
        self._check_ids(ids)
        return self.quantize.embedding(ids)

    def next_scale_input(self, tokens: Tensor) -> Tensor:
        """Teacher-forcing input of the transformer (PhiConvs.next_scale_input).  (B, N, C) -> (B, N - pn_0^2, C)."""
        return self.phi.next_scale_input(tokens)

    def f_hat(self, tokens: Tensor) -> Tensor:
        """Accumulated latent of per-scale tokens (codes or continuous).  Shapes: (B, N, C) -> (B, C, H, H)."""
        return self.phi.f_hat(tokens)

    def decode_fhat(self, f_hat: Tensor) -> Tensor:
        """Image in [-1, 1] (clamped, as the official fhat_to_img).  Shapes: (B, C, H, H) -> (B, 3, 16H, 16H)."""
        side = self.cfg.patch_nums[-1]
        expect_shape("f_hat", f_hat, (None, self.cfg.token_dim, side, side))
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1.0, 1.0)

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Per-scale tokens (codes or continuous, no snapping) -> image in [-1, 1].

        Shapes: (B, N, C) -> (B, 3, H_img, W_img).
        """
        return self.decode_fhat(self.f_hat(tokens))

    def decode_ids(self, ids: Tensor) -> Tensor:
        """Token ids -> image in [-1, 1] (the official idxBl_to_img(last_one=True)).  (B, N) -> (B, 3, H_img, W_img)."""
        return self.decode_tokens(self.ids_to_tokens(ids))

    def encode_latent(self, img: Tensor) -> Tensor:
        """Continuous latent f.  Shapes: img (B, 3, H_img, W_img) in [-1, 1] -> (B, C, H, H)."""
        size = self.cfg.image_size
        expect_shape("img", img, (None, self.cfg.in_channels, size, size))
        return self.quant_conv(self.encoder(img))

    def encode_ids(self, img: Tensor) -> Tensor:
        """Image -> per-scale token ids, concatenated.  Shapes: (B, 3, H_img, W_img) in [-1, 1] -> (B, N) int64."""
        return self.quantize.quantize(self.encode_latent(img))
