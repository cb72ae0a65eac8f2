"""LlamaGen class-conditional GPT (c2i), state_dict-compatible with the released checkpoints.

Architecture (teachers.md 1.1-1.4, 1.6): a pre-norm Llama-style decoder over the sequence
[class, tok_0, ..., tok_{N-2}]; output position j predicts tok_j (raster order, id = row * grid + col).

    block:  h   = x + wo(SDPA_causal(rope(q), rope(k), v)),  q | k | v = wqkv(RMSNorm(x))
            out = h + w2(silu(w1 n) * w3 n),                  n = RMSNorm(h)
    head:   logits = output(RMSNorm(h)), in float32

2-D RoPE: head_dim/2 interleaved pairs (2i, 2i+1); the first half of the pairs rotates by the token's grid row,
the second half by its column. The class token's rotary entry is all zeros (not the identity), so its q and k are
zero. Image token tok_i sits at sequence position i + 1 and uses grid cell i's angles.

Three ways in:
    LlamaGen.forward(ids, labels)                  teacher-forced logits on token ids (the released teacher)
    LlamaGen.forward_continuous(tokens, labels)    the same through an MLP input embedding on code vectors
                                                   (`cont_embed`, DD2 App. E.4 / method.md 5.3)
    LlamaGen.step(x, pos)                          one KV-cached step on a static, preallocated cache, so that the
                                                   decode step can be torch.compile'd and CUDA-graphed
and `LlamaGenBackbone` is the same transformer returning final-norm features for ARDiffusion.

Key names follow the official module tree exactly (`cls_embedding.embedding_table`, `tok_embeddings`,
`layers.{i}.attention.wqkv`, ...). The rotary table and the KV caches are not in the state_dict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from dd2_core.backbone import Backbone
from dd2_core.errors import DD2ValueError, expect_labels, expect_shape
from dd2_core.logits import SamplingPolicy, guidance_weights, top_k_filter, top_p_filter

logger = logging.getLogger(__name__)


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of k that is >= n."""
    return n if n % k == 0 else n + k - n % k


class LlamaGenConfig(BaseModel):
    """Sizes of a LlamaGen c2i GPT. Only n_layer, dim, n_head, vocab_size and num_classes shape the state_dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_layer: int = Field(..., ge=1, description="transformer blocks")
    dim: int = Field(..., ge=8, description="D, model width")
    n_head: int = Field(..., ge=1, description="attention heads; head_dim = dim / n_head must be a multiple of 4")
    vocab_size: int = Field(16384, ge=2, description="V, codebook size of the VQ tokenizer")
    num_classes: int = Field(1000, ge=1, description="real classes; the extra row `num_classes` is the null class")
    grid: int = Field(16, ge=1, description="tokens per image side: 16 at 256 px, 24 at 384 px (sizes the RoPE table)")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon")
    rope_base: float = Field(10000.0, gt=0, description="RoPE base")
    multiple_of: int = Field(256, ge=1, description="FFN hidden = 2*4*dim/3 rounded up to a multiple of this")
    codebook_dim: int | None = Field(
        None, ge=1, description="C; when set, the model also holds the continuous-input MLP `cont_embed` (C -> D)"
    )
    cont_hidden: int | None = Field(None, ge=1, description="hidden width of `cont_embed`; None = 4 * dim")

    @model_validator(mode="after")
    def _head_dim(self) -> LlamaGenConfig:
        if self.dim % self.n_head:
            raise ValueError(f"dim must be a multiple of n_head, got dim={self.dim}, n_head={self.n_head}")
        if (self.dim // self.n_head) % 4:
            raise ValueError(
                f"2-D RoPE needs head_dim = dim / n_head to be a multiple of 4, got {self.dim}/{self.n_head} = "
                f"{self.dim // self.n_head}"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        return find_multiple(int(2 * 4 * self.dim / 3), self.multiple_of)

    @property
    def num_tokens(self) -> int:
        """N = grid^2 image tokens."""
        return self.grid * self.grid

    @property
    def cont_hidden_size(self) -> int:
        return self.cont_hidden if self.cont_hidden is not None else 4 * self.dim

    def describe(self) -> str:
        """One line naming the size, used in checkpoint errors."""
        name = next((k for k, f in LLAMAGEN_PRESETS.items() if _same_size(f(), self)), "custom")
        return (
            f"LlamaGen {name} ({self.n_layer} layers, dim {self.dim}, {self.n_head} heads, vocab {self.vocab_size}, "
            f"{self.num_classes} classes)"
        )


def _same_size(a: LlamaGenConfig, b: LlamaGenConfig) -> bool:
    keys = ("n_layer", "dim", "n_head", "vocab_size", "num_classes")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


# Released c2i sizes (teachers.md 1.1); every preset accepts overrides, e.g. LLAMAGEN_PRESETS["GPT-L"](grid=24).
LLAMAGEN_PRESETS: dict[str, Callable[..., LlamaGenConfig]] = {
    "GPT-B": lambda **kw: LlamaGenConfig(**{"n_layer": 12, "dim": 768, "n_head": 12} | kw),
    "GPT-L": lambda **kw: LlamaGenConfig(**{"n_layer": 24, "dim": 1024, "n_head": 16} | kw),
    "GPT-XL": lambda **kw: LlamaGenConfig(**{"n_layer": 36, "dim": 1280, "n_head": 20} | kw),
    "GPT-XXL": lambda **kw: LlamaGenConfig(**{"n_layer": 48, "dim": 1536, "n_head": 24} | kw),
    "GPT-3B": lambda **kw: LlamaGenConfig(**{"n_layer": 24, "dim": 3200, "n_head": 32} | kw),
}


# ---------------------------------------------------------------------------------------------------------------------
# building blocks


def rope_table_2d(grid: int, head_dim: int, base: float, cls_tokens: int = 1) -> Tensor:
    """cos/sin of the 2-D rotary angles, class rows all zero.  Shapes: -> (cls_tokens + grid^2, head_dim/2, 2) fp32.

    half = head_dim/2 pairs; freqs_k = base^(-2k/half) for k < half/2; cell (r, c) gets [r * freqs, c * freqs].
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device="cpu")[: half // 2].float() / half))  # (half/2,)
    ang = torch.outer(torch.arange(grid, device="cpu", dtype=torch.float32), freqs)  # (grid, half/2)
    rows = ang[:, None, :].expand(grid, grid, -1)  # (grid, grid, half/2): angle of the cell's row
    cols = ang[None, :, :].expand(grid, grid, -1)  # (grid, grid, half/2): angle of the cell's column
    angles = torch.cat([rows, cols], dim=-1).reshape(grid * grid, half)  # (grid^2, half)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)  # (grid^2, half, 2)
    return torch.cat([torch.zeros(cls_tokens, half, 2, device="cpu"), table])


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate interleaved pairs (x_2i, x_2i+1) by the table's angles, in float32.

    Shapes: x (B, T, H, hd), table (T, hd/2, 2) -> (B, T, H, hd).
    """
    xp = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, hd/2, 2)
    cos, sin = table[:, None, :, 0], table[:, None, :, 1]  # (T, 1, hd/2)
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)  # (B, T, H, hd/2, 2)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    """weight * x / sqrt(mean(x^2) + eps), normalised in float32 and cast back before the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class KVCache(nn.Module):
    """Static per-layer KV cache: non-persistent buffers (never in the state_dict; fixed addresses for CUDA graphs)."""

    def __init__(self, rows: int, n_head: int, length: int, head_dim: int, *, dtype: torch.dtype, device):
        super().__init__()
        shape = (rows, n_head, length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v at positions `pos`.  Shapes: pos (T,), k, v (R, H, T, hd) -> caches (R, H, L, hd)."""
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)  # rows: q | k | v
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Causal self-attention; with `pos` it reads and writes the KV cache.

        Shapes: x (B, T, D), rope (T, hd/2, 2), pos (T,), mask (1, 1, T, L) -> (B, T, D).
        """
        b, t, d = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.n_head, self.head_dim).unbind(2)  # each (B, T, H, hd)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd)
        if pos is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        else:
            k, v = self.kv_cache.update(pos, k, v)  # (B, H, L, hd)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        return self.wo(a.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)  # down

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, pos: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class ClassEmbedding(nn.Module):
    """Class table with one extra row, `num_classes`, for the null (CFG) class."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        """Shapes: labels (B,) -> (B, 1, D)."""
        return self.embedding_table(labels).unsqueeze(1)


class ContinuousEmbedding(nn.Module):
    """MLP input embedding on code vectors, replacing the token-embedding lookup (DD2 App. E.4).

    e(c) = fc2(silu(fc1 c))
    """

    def __init__(self, codebook_dim: int, hidden: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(codebook_dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, c: Tensor) -> Tensor:
        """Shapes: c (..., C) -> (..., D)."""
        return self.fc2(F.silu(self.fc1(c.to(self.fc1.weight.dtype))))


class EmbeddingFit(BaseModel):
    """How well `cont_embed(c_i)` reproduces the token-embedding row emb(i) over all V codes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mse: float = Field(..., description="mean over codes and channels of (mlp(c_i) - emb(i))^2")
    max_abs: float = Field(..., description="largest |mlp(c_i) - emb(i)| over codes and channels")
    relative: float = Field(..., description="||mlp(C) - E||_F / ||E||_F")


@torch.no_grad()
def fit_continuous_embedding(
    embed: ContinuousEmbedding,
    codebook: Tensor,
    table: Tensor,
    *,
    steps: int = 200,
    lr: float = 1e-3,
    init_scale: float = 3.0,
    seed: int = 0,
) -> EmbeddingFit:
    """Fit the MLP to the token-embedding table: minimise sum_i ||mlp(c_i) - emb(i)||^2 (method.md 5.3).

    fc1 starts from a seeded Gaussian (std init_scale / sqrt(C), so that unit-norm codes give O(init_scale)
    pre-activations) and uniform biases, fc2 from zeros; `steps` full-batch Adam steps on all MLP weights follow;
    finally fc2 is solved in closed form (ridge-stabilised least squares in float64), the exact optimum given fc1.
    With a hidden width >= V the fit is exact up to rounding; at V = 16384 it is lossy, and fine-tuning restores
    the teacher.

    Shapes: codebook (V, C) code vectors as the GPT will see them (L2-normalised for VQ-16), table (V, D).
    """
    expect_shape("codebook", codebook, (table.shape[0], embed.fc1.in_features))
    expect_shape("table", table, (None, embed.fc2.out_features))
    w1, b1 = embed.fc1.weight, embed.fc1.bias
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = codebook.to(device=w1.device, dtype=torch.float32)
    target = table.to(device=w1.device, dtype=torch.float32)
    w1.copy_(torch.randn(w1.shape, generator=g) * init_scale / w1.shape[1] ** 0.5)
    b1.copy_((torch.rand(b1.shape, generator=g) * 2 - 1) * init_scale)
    embed.fc2.weight.zero_()  # fc2 is solved exactly below; zeros give Adam a finite start whatever was there
    embed.fc2.bias.zero_()
    params = [p for p in embed.parameters()]
    master = [p.detach().float().clone().requires_grad_(True) for p in params]  # fp32 copies, whatever the dtype
    if steps:
        opt = torch.optim.Adam(master, lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                h = F.silu(c @ master[0].T + master[1])  # (V, hidden)
                loss = (h @ master[2].T + master[3] - target).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    # closed-form output layer: [h, 1] W = target in the least-squares sense
    h = F.silu(c @ master[0].detach().T + master[1].detach()).double()  # (V, hidden)
    a = torch.cat([h, torch.ones_like(h[:, :1])], dim=1)  # (V, hidden + 1)
    gram = a.T @ a
    ridge = 1e-10 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    sol = torch.linalg.solve(gram + ridge, a.T @ target.double())  # (hidden + 1, D)
    master[2].data.copy_(sol[:-1].T)
    master[3].data.copy_(sol[-1])
    for p, m in zip(params, master):
        p.copy_(m.detach())
    err = embed(c).float() - target  # (V, D)
    fit = EmbeddingFit(
        mse=float(err.pow(2).mean()),
        max_abs=float(err.abs().max()),
        relative=float(err.norm() / target.norm().clamp_min(1e-30)),
    )
    logger.info("continuous embedding fit: mse %.3e, max |err| %.3e, relative %.3e", fit.mse, fit.max_abs, fit.relative)
    return fit


def _init_weights(module: nn.Module) -> None:
    """Random init for fresh models (std 0.02; the head is random too, so untrained logits are not uniform)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)


class _RopeMixin:
    """Per-device float32 rotary table, kept out of the state_dict and out of `.to(dtype)` casts."""

    cfg: LlamaGenConfig

    def _init_rope(self) -> None:
        self._rope_tables: dict[torch.device, Tensor] = {}

    def rope(self, device: torch.device) -> Tensor:
        """Shapes: -> (1 + N, head_dim/2, 2) float32 on `device`."""
        table = self._rope_tables.get(device)
        if table is None:
            cfg = self.cfg
            table = rope_table_2d(cfg.grid, cfg.head_dim, cfg.rope_base).to(device)
            self._rope_tables[device] = table
        return table


def _check_ids(name: str, ids: Tensor, vocab: int) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise DD2ValueError(f"{name}: expected integer token ids, got dtype {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise DD2ValueError(
            f"{name}: expected ids in [0, {vocab - 1}], got values in [{int(ids.min())}, {int(ids.max())}]"
        )


# ---------------------------------------------------------------------------------------------------------------------
# the GPT


class LlamaGen(_RopeMixin, nn.Module):
    """LlamaGen c2i GPT with the official key names; see the module docstring."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.cfg = cfg
        self.cls_embedding = ClassEmbedding(cfg.num_classes, cfg.dim)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.cont_embed = (
            ContinuousEmbedding(cfg.codebook_dim, cfg.cont_hidden_size, cfg.dim) if cfg.codebook_dim else None
        )
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._init_rope()
        self._cache_len = 0
        _init_weights(self)

    # -- teacher forcing --------------------------------------------------------------------------------------------

    def forward_embedded(self, tok: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced logits from already embedded tokens, without input checks (for compiled callers).

        Shapes: tok (B, T-1, D) embedded tok_0..tok_{T-2}, labels (B,) -> logits (B, T, V) float32.
        """
        x = torch.cat([self.cls_embedding(labels), tok.to(self.norm.weight.dtype)], dim=1)  # (B, T, D)
        rope = self.rope(x.device)[: x.shape[1]]
        for layer in self.layers:
            x = layer(x, rope)
        return self.output(self.norm(x)).float()

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced logits: position j is p(tok_j | class, ids[:, :j]); the last id is never read.

        Shapes: ids (B, T) int with 1 <= T <= N, labels (B,) (null class allowed) -> logits (B, T, V) float32.
        """
        self._check_prefix("ids", ids, labels, ids.dim() == 2)
        _check_ids("ids", ids, self.cfg.vocab_size)
        return self.forward_embedded(self.tok_embeddings(ids[:, :-1]), labels)

    def forward_continuous(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced logits on continuous tokens through `cont_embed`: the input is [class, tokens[:, :-1]].

        Shapes: tokens (B, T, C) with 1 <= T <= N, labels (B,) -> logits (B, T, V) float32.
        """
        embed = self._require_cont_embed()
        self._check_prefix("tokens", tokens, labels, tokens.dim() == 3 and tokens.shape[-1] == self.cfg.codebook_dim)
        return self.forward_embedded(embed(tokens[:, :-1]), labels)

    def _check_prefix(self, name: str, x: Tensor, labels: Tensor, ok: bool) -> None:
        n = self.cfg.num_tokens
        want = "(B, T)" if name == "ids" else f"(B, T, {self.cfg.codebook_dim})"
        if not ok or not 1 <= x.shape[1] <= n:
            raise DD2ValueError(f"{name}: expected shape {want} with 1 <= T <= N = {n}, got {tuple(x.shape)}")
        expect_labels("labels", labels, self.cfg.num_classes, batch=x.shape[0])

    def _require_cont_embed(self) -> ContinuousEmbedding:
        if self.cont_embed is None:
            raise DD2ValueError(
                "cont_embed: this LlamaGen was built without the continuous-input MLP (codebook_dim=None); "
                "build it with LlamaGenConfig(codebook_dim=C) and fit it with fit_continuous_embedding"
            )
        return self.cont_embed

    def fit_continuous(self, codebook: Tensor, **kwargs) -> EmbeddingFit:
        """Fit `cont_embed` to `tok_embeddings` over the codebook (see fit_continuous_embedding).

        Shapes: codebook (V, C).
        """
        return fit_continuous_embedding(self._require_cont_embed(), codebook, self.tok_embeddings.weight, **kwargs)

    # -- KV-cached decoding -----------------------------------------------------------------------------------------

    def setup_cache(self, rows: int, *, device, dtype: torch.dtype, length: int | None = None) -> None:
        """Preallocate every layer's KV cache for `rows` sequences (kept when the sizes already match)."""
        length = length or find_multiple(self.cfg.num_tokens, 8)  # class + N-1 tokens = N positions
        self.rope(torch.device(device))  # build the table outside any compiled step
        cache = self.layers[0].attention.kv_cache
        if (
            cache is not None
            and cache.k_cache.shape[0] == rows
            and cache.k_cache.shape[2] == length
            and cache.k_cache.dtype == dtype
            and cache.k_cache.device == torch.device(device)
        ):
            return
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                rows, self.cfg.n_head, length, self.cfg.head_dim, dtype=dtype, device=device
            )
        self._cache_len = length

    def clear_cache(self) -> None:
        """Free the KV caches."""
        for layer in self.layers:
            layer.attention.kv_cache = None
        self._cache_len = 0

    def step(self, x: Tensor, pos: Tensor) -> Tensor:
        """One KV-cached forward over new inputs at sequence positions `pos` (static shapes: compile-friendly).

        Position 0 is the class token, position i + 1 the image token tok_i.
        Shapes: x (R, T, D) embedded inputs, pos (T,) int64 -> logits (R, T, V) float32.
        """
        rope = self.rope(x.device)[pos]  # (T, hd/2, 2)
        slots = torch.arange(self._cache_len, device=x.device)
        mask = (slots[None, :] <= pos[:, None])[None, None]  # (1, 1, T, L): earlier and own positions only
        for layer in self.layers:
            x = layer(x, rope, pos, mask)
        return self.output(self.norm(x)).float()

    def embed_inputs(self, ids: Tensor, codebook: Tensor | None = None) -> Tensor:
        """Input embeddings of token ids: the token table, or `cont_embed(codebook[ids])` when a codebook is given.

        Shapes: ids (R, T), codebook (V, C) -> (R, T, D).
        """
        if codebook is None:
            return self.tok_embeddings(ids)
        return self._require_cont_embed()(codebook[ids]).to(self.norm.weight.dtype)

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        policy: SamplingPolicy,
        *,
        generator: torch.Generator | None = None,
        codebook: Tensor | None = None,
        prefix: Tensor | None = None,
        step: Callable[[Tensor, Tensor], Tensor] | None = None,
        return_logits: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """KV-cached ancestral sampling, one token per step (teachers.md 1.6).

        With CFG the cache holds 2B rows [labels; null]; the previous token is fed to both halves. Per step:
        u + w (c - u), then temperature, top-k, top-p ('hf' rule), softmax, multinomial with `generator`.
        `prefix` ids are forced instead of sampled for the first T steps (teacher-forcing through the cache, or
        continuing a given prefix). `codebook` switches the inputs to `cont_embed(codebook[ids])`. `step` replaces
        `self.step` (e.g. a compiled copy).

        Shapes: labels (B,) -> ids (B, N) int64, and with return_logits the per-step guided logits (B, N, V) fp32.
        """
        cfg = self.cfg
        n = cfg.num_tokens
        expect_labels("labels", labels, cfg.num_classes, allow_null=False)
        if prefix is not None:
            if prefix.dim() != 2 or prefix.shape[0] != labels.shape[0] or prefix.shape[1] > n:
                raise DD2ValueError(
                    f"prefix: expected shape ({labels.shape[0]}, T) with T <= {n}, got {tuple(prefix.shape)}"
                )
            _check_ids("prefix", prefix, cfg.vocab_size)
        b, device = labels.shape[0], labels.device
        dtype = self.norm.weight.dtype
        use_cfg = policy.uses_cfg
        rows_labels = torch.cat([labels, torch.full_like(labels, cfg.num_classes)]) if use_cfg else labels
        self.setup_cache(rows_labels.shape[0], device=device, dtype=dtype)
        step = step or self.step
        weights = guidance_weights(policy, (1,) * n, device=device).tolist()  # (N,) python floats
        positions = torch.arange(n, device=device)
        ids = torch.empty(b, n, dtype=torch.long, device=device)
        all_logits = torch.empty(b, n, cfg.vocab_size, device=device) if return_logits else None
        x = self.cls_embedding(rows_labels)  # (R, 1, D)
        for i in range(n):
            logits = step(x, positions[i : i + 1])[:, -1]  # (R, V)
            if use_cfg:
                cond, uncond = logits.chunk(2)
                logits = uncond + weights[i] * (cond - uncond)  # (B, V)
            if all_logits is not None:
                all_logits[:, i] = logits
            if prefix is not None and i < prefix.shape[1]:
                nxt = prefix[:, i]
            else:
                nxt = sample_logits(logits, policy, generator)
            ids[:, i] = nxt
            if i + 1 < n:
                prev = torch.cat([nxt, nxt]) if use_cfg else nxt  # (R,)
                x = self.embed_inputs(prev[:, None], codebook)  # (R, 1, D)
        return (ids, all_logits) if return_logits else ids


def sample_logits(logits: Tensor, policy: SamplingPolicy, generator: torch.Generator | None = None) -> Tensor:
    """Temperature, top-k, top-p (family rule), softmax, one multinomial draw.  Shapes: (B, V) -> (B,) int64."""
    logits = logits / policy.temperature
    logits = top_k_filter(logits, policy.top_k)
    logits = top_p_filter(logits, policy.top_p, policy.top_p_rule)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------------------------------
# backbone mode


class LlamaGenBackbone(_RopeMixin, Backbone):
    """The LlamaGen transformer as an ARDiffusion backbone: continuous inputs, final-norm features, no head.

    Input [class, cont_embed(tok_1), ..., cont_embed(tok_{N-1})]; feature i sees the class and tokens < i.
    Keys are the teacher's (`cls_embedding.*`, `cont_embed.*`, `layers.*`, `norm.*`), so `init_from_teacher` is a
    plain copy of every teacher weight except `tok_embeddings` and `output`.
    """

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        if cfg.codebook_dim is None:
            raise DD2ValueError(
                "LlamaGenBackbone: expected a config with codebook_dim (the token dimension C), got None"
            )
        self.cfg = cfg
        self.token_dim, self.feature_dim = cfg.codebook_dim, cfg.dim
        self.num_tokens, self.num_classes = cfg.num_tokens, cfg.num_classes
        self.token_groups = (1,) * cfg.num_tokens
        self.cls_embedding = ClassEmbedding(cfg.num_classes, cfg.dim)
        self.cont_embed = ContinuousEmbedding(cfg.codebook_dim, cfg.cont_hidden_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self._init_rope()
        _init_weights(self)

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Shapes: tokens (B, N, C), labels (B,) -> features (B, N, D)."""
        self.check_inputs(tokens, labels)
        prev = self.cont_embed(tokens[:, :-1])  # (B, N-1, D): shift by one token
        x = torch.cat([self.cls_embedding(labels), prev], dim=1)  # (B, N, D)
        rope = self.rope(x.device)[: x.shape[1]]
        for layer in self.layers:
            x = layer(x, rope)
        return self.norm(x)

    @torch.no_grad()
    def init_from_teacher(self, model: LlamaGen, codebook: Tensor | None = None, **fit_kwargs) -> EmbeddingFit | None:
        """Copy every teacher weight but `tok_embeddings` and `output`.

        If the teacher has no `cont_embed`, the MLP is fitted to its token table over `codebook` (V, C) and the fit
        is returned; otherwise the teacher's MLP is copied and None is returned.
        """
        if not isinstance(model, LlamaGen):
            raise DD2ValueError(f"model: expected a dd2_core.models.llamagen.LlamaGen, got {type(model).__name__}")
        mine, theirs = self.cfg, model.cfg
        keys = ("n_layer", "dim", "n_head", "num_classes", "grid", "norm_eps", "rope_base", "multiple_of")
        diff = {k: (getattr(mine, k), getattr(theirs, k)) for k in keys if getattr(mine, k) != getattr(theirs, k)}
        if diff:
            raise DD2ValueError(
                f"init_from_teacher: backbone and teacher configs differ as (backbone, teacher): {diff}"
            )
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith(("tok_embeddings.", "output."))}
        fit = None
        if model.cont_embed is None:
            if codebook is None:
                raise DD2ValueError(
                    "codebook: the teacher has no cont_embed, so a (V, C) codebook is needed to fit one"
                )
            sd |= {k: v for k, v in self.state_dict().items() if k.startswith("cont_embed.")}
            self.load_state_dict(sd, strict=True)
            fit = fit_continuous_embedding(self.cont_embed, codebook, model.tok_embeddings.weight, **fit_kwargs)
        else:
            self.load_state_dict(sd, strict=True)
        return fit

    @classmethod
    def from_teacher(cls, model: LlamaGen, codebook: Tensor | None = None, **fit_kwargs) -> LlamaGenBackbone:
        """A backbone with the teacher's config (codebook_dim from the teacher or the codebook) and weights."""
        cfg = model.cfg
        if cfg.codebook_dim is None:
            if codebook is None:
                raise DD2ValueError(
                    "codebook: the teacher has no cont_embed, so a (V, C) codebook is needed to fit one"
                )
            cfg = LlamaGenConfig.model_validate(cfg.model_dump() | {"codebook_dim": codebook.shape[-1]})
        ref = next(model.parameters())
        with torch.device(ref.device):
            backbone = cls(cfg).to(ref.dtype)
        backbone.init_from_teacher(model, codebook, **fit_kwargs)
        return backbone
