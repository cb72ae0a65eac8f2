"""The per-token MLP AdaLN velocity head (MAR-style; DD2 3.2.3).

v_psi(x_t, t | f): an input projection of the noisy token, a time embedding plus a projection of the backbone
feature summed into the AdaLN condition, residual AdaLN MLP blocks, and a DiT-style final layer. The head knows
nothing about the backbone. The adaLN modulations and the output layer start at zero, so a fresh head outputs
v = 0 and every block starts as the identity (DiT's initialisation).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn


class HeadConfig(BaseModel):
    """Size of the velocity head. DD2 gives none ("lightweight"); MAR uses 3 blocks x 1024 in small variants."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token_dim: int = Field(..., ge=1, description="C, token dimension (input and output)")
    cond_dim: int = Field(..., ge=1, description="D, backbone feature dimension")
    width: int = Field(1024, ge=8, description="hidden width of the residual blocks")
    depth: int = Field(3, ge=1, description="number of residual AdaLN MLP blocks")
    time_freq_dim: int = Field(256, ge=8, description="sinusoidal time embedding size (even)")
    time_scale: float = Field(1000.0, gt=0, description="t in [0, 1] is multiplied by this before the sinusoids")


class TimeEmbedder(nn.Module):
    """Sinusoidal embedding of t followed by a 2-layer MLP (DiT's TimestepEmbedder)."""

    def __init__(self, width: int, freq_dim: int, scale: float):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        """Shapes: t (...,) -> (..., width)."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * self.scale).unsqueeze(-1) * freqs  # (..., half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (..., freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    """x + gate * MLP(modulate(LN(x), shift, scale)), with (shift, scale, gate) from the condition."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.norm(x), shift, scale))


class FinalLayer(nn.Module):
    """DiT's final layer: affine-free LN, adaLN modulation, linear to the token dimension."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class VelocityHead(nn.Module):
    """Per-token velocity v(x_t, t | f) of the AR-diffusion model, the guidance network and the generator."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = TimeEmbedder(cfg.width, cfg.time_freq_dim, cfg.time_scale)
        self.cond_proj = nn.Linear(cfg.cond_dim, cfg.width)
        self.input_proj = nn.Linear(cfg.token_dim, cfg.width)
        self.blocks = nn.ModuleList(ResBlock(cfg.width) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.width, cfg.token_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for blk in self.blocks:  # every block starts as the identity
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        nn.init.zeros_(self.final.ada[-1].weight)
        nn.init.zeros_(self.final.ada[-1].bias)
        nn.init.zeros_(self.final.linear.weight)  # a fresh head predicts v = 0
        nn.init.zeros_(self.final.linear.bias)

    def forward(self, x_t: Tensor, t: Tensor, f: Tensor) -> Tensor:
        """Shapes: x_t (..., C), t (..., 1), f (..., D) -> v (..., C) in x_t's dtype."""
        dtype = self.input_proj.weight.dtype
        c = self.time_embed(t.squeeze(-1)) + self.cond_proj(f.to(dtype))  # (..., W)
        x = self.input_proj(x_t.to(dtype))  # (..., W)
        for blk in self.blocks:
            x = blk(x, c)
        return self.final(x, c).to(x_t.dtype)
