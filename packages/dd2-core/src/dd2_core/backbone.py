"""The backbone interface of ARDiffusion, and a small causal transformer that implements it.

A backbone turns a sequence of continuous tokens (in codebook space) and class labels into one feature vector per
position, such that the feature at position i depends only on the labels and on tokens of groups *before* i's
group (DESIGN.md, Key interfaces). The backbone does the shifting itself: it never reads the last group's tokens.
LlamaGen (`dd2_core.models.llamagen`) and VAR (`dd2_core.models.var`) backbones implement the same interface, so
`ARDiffusion` and `OneStepGenerator` use them unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from dd2_core.errors import expect_labels, expect_shape


class Backbone(nn.Module):
    """Causal feature extractor: features[:, i] sees only labels and tokens of groups before i's group.

    Subclasses set these attributes in __init__ and implement `forward`.
        token_dim     C, dimension of a token in codebook space
        feature_dim   D, dimension of the features handed to the velocity head
        num_tokens    N
        num_classes   real classes; id `num_classes` is the null class
        token_groups  group sizes (sum N); (1,)*N for token-by-token models
    """

    token_dim: int
    feature_dim: int
    num_tokens: int
    num_classes: int
    token_groups: tuple[int, ...]

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - interface
        """Shapes: tokens (B, N, C), labels (B,) -> features (B, N, D)."""
        raise NotImplementedError

    def check_inputs(self, tokens: Tensor, labels: Tensor) -> None:
        """Boundary check shared by all backbones (clear errors instead of index errors deep inside)."""
        expect_shape("tokens", tokens, (None, self.num_tokens, self.token_dim))
        if torch.compiler.is_compiling():  # the range check reads labels on the host: a sync and a graph break;
            return  # compiled callers check labels at their boundary (OneStepPipeline: dd2_core.fast)
        expect_labels("labels", labels, self.num_classes, batch=tokens.shape[0])


class BackboneConfig(BaseModel):
    """A small pre-norm causal transformer over continuous tokens, one token per step (toy and test teachers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_tokens: int = Field(..., ge=1, description="N, tokens per sequence")
    token_dim: int = Field(..., ge=1, description="C, token dimension in codebook space")
    num_classes: int = Field(1, ge=1, description="real classes; the null class id is num_classes")
    dim: int = Field(128, ge=8, description="D, transformer width = feature dimension")
    depth: int = Field(2, ge=1, description="number of transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads; must divide dim")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP hidden width / dim")

    @model_validator(mode="after")
    def _heads_divide(self) -> BackboneConfig:
        if self.dim % self.heads:
            raise ValueError(f"dim must be a multiple of heads, got dim={self.dim}, heads={self.heads}")
        return self


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = (
            self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        )  # (B, H, N, d)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, N, d)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TransformerBackbone(Backbone):
    """Causal transformer reading [class, q_1, ..., q_{N-1}] and returning N features (position i sees q_<i)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        self.token_dim, self.feature_dim = cfg.token_dim, cfg.dim
        self.num_tokens, self.num_classes = cfg.num_tokens, cfg.num_classes
        self.token_groups = (1,) * cfg.num_tokens
        self.class_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # last row: null class
        self.tok_proj = nn.Linear(cfg.token_dim, cfg.dim)  # continuous input embedding
        self.pos_emb = nn.Parameter(torch.zeros(cfg.num_tokens, cfg.dim))
        self.blocks = nn.ModuleList(_Block(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.class_emb.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:  # GPT-2 style scaled init of the residual projections
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * self.cfg.depth))
            nn.init.normal_(blk.mlp[2].weight, std=0.02 / math.sqrt(2 * self.cfg.depth))

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Shapes: tokens (B, N, C), labels (B,) -> features (B, N, D)."""
        self.check_inputs(tokens, labels)
        cls = self.class_emb(labels).unsqueeze(1)  # (B, 1, D)
        prev = self.tok_proj(tokens[:, :-1].to(self.tok_proj.weight.dtype))  # (B, N-1, D): shift by one
        x = torch.cat([cls, prev], dim=1) + self.pos_emb  # (B, N, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)
