"""LlamaGen VQ-16 image tokenizer, state_dict-compatible with `vq_ds16_c2i.pt` (teachers.md 1.5).

    encode:  image [-1, 1] -> encoder -> quant_conv (z_channels -> C) -> L2-normalise -> nearest L2-normalised code
    decode:  codes (B, N, C) -> (B, C, h, w) -> post_quant_conv -> decoder -> image, roughly [-1, 1], not clamped

The codebook (V x C = 16384 x 8) is L2-normalised on every use, so the decoder only ever sees unit vectors;
`decode_tokens` takes any continuous (B, N, C) tokens and does not re-quantise them.

Trunk: GroupNorm(32, eps 1e-6) + swish residual blocks, `num_res_blocks` per level in the encoder and one more in
the decoder, self-attention at the lowest resolution and in the middle, downsampling by pad (0, 1, 0, 1) + stride-2
3x3 conv, upsampling by nearest x2 + 3x3 conv. Key tree: `encoder.conv_blocks.{i}.{res,attn,downsample}`,
`decoder.conv_blocks.{i}.{res,attn,upsample}` (decoder block 0 = lowest resolution), `{encoder,decoder}.mid.{0,1,2}`,
`quantize.embedding`, `quantize.codebook_used` (a usage buffer kept only so that official files load strictly).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from dd2_core.errors import DD2ValueError, expect_shape

logger = logging.getLogger(__name__)


class VQConfig(BaseModel):
    """Sizes of the LlamaGen VQ tokenizer; the defaults are VQ-16."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    codebook_size: int = Field(16384, ge=2, description="V")
    codebook_dim: int = Field(8, ge=1, description="C, code vector dimension")
    z_channels: int = Field(256, ge=1, description="encoder output / decoder input channels")
    ch: int = Field(128, ge=1, description="base channel count of the conv trunk")
    ch_mult: tuple[int, ...] = Field((1, 1, 2, 2, 4), min_length=1, description="channel multiplier per level")
    num_res_blocks: int = Field(2, ge=1, description="residual blocks per encoder level (decoder: one more)")
    norm_groups: int = Field(32, ge=1, description="GroupNorm groups; every channel count must be a multiple")
    codebook_used_size: int = Field(65536, ge=0, description="length of the official `codebook_used` buffer")

    @model_validator(mode="after")
    def _groups_divide(self) -> VQConfig:
        bad = sorted({self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups})
        if bad:
            raise ValueError(
                f"channel counts {bad} (ch={self.ch} x ch_mult) are not multiples of norm_groups={self.norm_groups}"
            )
        return self

    @property
    def downsample(self) -> int:
        """Image pixels per token side (16 for VQ-16)."""
        return 2 ** (len(self.ch_mult) - 1)


VQ_PRESETS: dict[str, Callable[..., VQConfig]] = {
    "VQ-16": lambda **kw: VQConfig(**kw),
}


def _norm(cfg: VQConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.norm_groups, channels, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1 x))))), with a 1x1 `nin_shortcut` when the channel count changes."""

    def __init__(self, cfg: VQConfig, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(cfg, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(cfg, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with separate 1x1 q, k, v convs and a residual `proj_out`."""

    def __init__(self, cfg: VQConfig, channels: int):
        super().__init__()
        self.norm = _norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (rearrange(f(n), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))  # (B, 1, hw, c)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, 1, hw, c), scale 1/sqrt(c)
        return x + self.proj_out(rearrange(a, "b 1 (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: residual blocks, each followed by attention where present, then a resampler.

    The resampler is registered as `downsample` (encoder) or `upsample` (decoder), the official key names.
    """

    def __init__(self, res: list[nn.Module], attn: list[nn.Module], resample: Downsample | Upsample | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self._resample_name = None
        if resample is not None:
            self._resample_name = "downsample" if isinstance(resample, Downsample) else "upsample"
            self.add_module(self._resample_name, resample)

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return getattr(self, self._resample_name)(x) if self._resample_name else x


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, levels = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        blocks, c_in = [], ch
        for i, m in enumerate(mult):
            c_out = ch * m
            res = [ResBlock(cfg, c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)]
            last = i == levels - 1
            attn = [AttnBlock(cfg, c_out) for _ in range(cfg.num_res_blocks)] if last else []
            blocks.append(_Level(res, attn, None if last else Downsample(c_out)))
            c_in = c_out
        self.conv_blocks = nn.ModuleList(blocks)
        self.mid = nn.ModuleList([ResBlock(cfg, c_in, c_in), AttnBlock(cfg, c_in), ResBlock(cfg, c_in, c_in)])
        self.norm_out = _norm(cfg, c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Shapes: (B, 3, H, W) -> (B, z_channels, H/f, W/f)."""
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = block(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, levels = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
        c_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = nn.ModuleList([ResBlock(cfg, c_in, c_in), AttnBlock(cfg, c_in), ResBlock(cfg, c_in, c_in)])
        blocks = []
        for i in range(levels):  # block 0 is the lowest resolution
            c_out = ch * mult[levels - 1 - i]
            res = [ResBlock(cfg, c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1)]
            attn = [AttnBlock(cfg, c_out) for _ in range(cfg.num_res_blocks + 1)] if i == 0 else []
            blocks.append(_Level(res, attn, Upsample(c_out) if i < levels - 1 else None))
            c_in = c_out
        self.conv_blocks = nn.ModuleList(blocks)
        self.norm_out = _norm(cfg, c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """Shapes: (B, z_channels, h, w) -> (B, 3, h*f, w*f)."""
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for block in self.conv_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-code lookup on the unit sphere: codes and latents are both L2-normalised."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        # training-time usage statistics of the official code; unused here but present in the checkpoints
        self.register_buffer("codebook_used", torch.zeros(cfg.codebook_used_size))

    def codebook(self) -> Tensor:
        """L2-normalised code vectors.  Shapes: -> (V, C)."""
        return F.normalize(self.embedding.weight, dim=-1)

    def nearest(self, z: Tensor) -> Tensor:
        """Index of the nearest normalised code to each normalised latent.  Shapes: z (..., C) -> (...) int64."""
        z = F.normalize(z, dim=-1)
        e = self.codebook()
        d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * z @ e.T  # (..., V) squared distances
        return d.argmin(-1)


class LlamaGenVQ(nn.Module):
    """VQ-16 tokenizer: encode images to ids, decode ids or continuous code tokens to images."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)

    @property
    def codebook(self) -> Tensor:
        """L2-normalised codebook as the GPT's tokens live in continuous space.  Shapes: -> (V, C)."""
        return self.quantize.codebook()

    def encode(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] to token ids in raster order (id = row * w + col).

        Shapes: images (B, 3, H, W), H and W multiples of the downsampling factor -> ids (B, N = H/f * W/f).
        """
        f = self.cfg.downsample
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % f or images.shape[3] % f:
            raise DD2ValueError(
                f"images: expected shape (B, 3, H, W) with H, W multiples of {f}, got {tuple(images.shape)}"
            )
        z = self.quant_conv(self.encoder(images.to(self.quant_conv.weight.dtype)))  # (B, C, h, w)
        return self.quantize.nearest(rearrange(z, "b c h w -> b (h w) c"))  # (B, N)

    def codes(self, ids: Tensor) -> Tensor:
        """Normalised code vectors of ids.  Shapes: ids (B, N) -> (B, N, C)."""
        v = self.cfg.codebook_size
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise DD2ValueError(f"ids: expected integer ids, got dtype {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
            raise DD2ValueError(
                f"ids: expected ids in [0, {v - 1}], got values in [{int(ids.min())}, {int(ids.max())}]"
            )
        return self.codebook[ids]

    def decode_tokens(self, tokens: Tensor) -> Tensor:
        """Continuous tokens on a square grid to images (no re-quantisation, no clamping).

        Shapes: tokens (B, N, C) with N a square -> images (B, 3, sqrt(N) f, sqrt(N) f).
        """
        expect_shape("tokens", tokens, (None, None, self.cfg.codebook_dim))
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise DD2ValueError(f"tokens: expected a square number of tokens N = h * w, got N = {tokens.shape[1]}")
        z = rearrange(tokens.to(self.post_quant_conv.weight.dtype), "b (h w) c -> b c h w", h=side)  # (B, C, h, w)
        return self.decoder(self.post_quant_conv(z))

    def decode_ids(self, ids: Tensor) -> Tensor:
        """Shapes: ids (B, N) -> images (B, 3, H, W)."""
        return self.decode_tokens(self.codes(ids))
