"""Training a small LlamaGen-architecture VQ tokenizer from pixels, and writing image-code shards for `adapt`.

The architecture is dd2_core's `LlamaGenVQ` at a small `VQConfig` (the same encoder, decoder and L2-normalised
nearest-code quantiser as VQ-16); only the training is here, in plain torch (one process: the tokenizer is small).

    z      = normalize(quant_conv(encoder(x)))                  per token, (B, N, C) on the unit sphere
    e      = codebook[argmin_j ||z - c_j||]                     c_j L2-normalised codes
    z_q    = z + sg(e - z)                                       straight-through estimator
    x_rec  = decoder(post_quant_conv(z_q))
    loss   = |x_rec - x| + (x_rec - x)^2                         reconstruction (L1 + L2), mean over pixels
           + ||sg(z) - e||^2 + beta ||z - sg(e)||^2              codebook and commitment terms (VQ-VAE)

Dead codes (unused for `restart_every` steps) are restarted at encoder outputs of the current batch, so that the
small codebook is used. Greyscale images are replicated to 3 channels (the architecture's input); images in
[-1, 1]. `encode_images` and `write_code_shards` turn a dataset into the WebDataset token shards (`data.write_shard`
format, kind "image-codes") that the `adapt` stage trains the AR teacher on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dd2_core.errors import DD2ValueError
from dd2_core.models.llamagen_vq import LlamaGenVQ, VQConfig
from dd2_train.data import SHARD_PATTERN, read_shard_meta, shard_plan, write_shard

logger = logging.getLogger(__name__)


class VQTrainConfig(BaseModel):
    """How the VQ tokenizer is trained (plain Adam, constant learning rate after a short warm-up)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(..., ge=1, description="optimizer steps")
    batch_size: int = Field(128, ge=1, description="images per step")
    lr: float = Field(2e-3, gt=0.0, description="Adam learning rate")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps")
    beta: float = Field(0.25, ge=0.0, description="commitment weight")
    restart_every: int = Field(25, ge=0, description="restart codes unused over this many steps; 0 = never")
    seconds: float | None = Field(None, gt=0.0, description="optional wall-time cap (stops early)")
    seed: int = Field(0, description="initialisation, batches and restarts")
    log_every: int = Field(50, ge=1, description="log a line every N steps")


def _as_tensor(images: np.ndarray | Tensor) -> Tensor:
    """A tensor view of images; read-only arrays (np.load with mmap, np.frombuffer) are copied, not aliased."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()
    return torch.as_tensor(images)


def to_vq_input(images: np.ndarray | Tensor) -> Tensor:
    """uint8 grey (B, H, W) or RGB (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] (grey replicated to 3 channels)."""
    x = _as_tensor(images)
    if x.dtype != torch.uint8 or x.dim() not in (3, 4) or (x.dim() == 4 and x.shape[-1] != 3):
        raise DD2ValueError(f"images: expected uint8 (B, H, W) or (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
    x = x.float() / 127.5 - 1.0
    if x.dim() == 3:
        return x[:, None].expand(-1, 3, -1, -1).contiguous()  # (B, 3, H, W)
    return x.permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)


def check_image_size(cfg: VQConfig, height: int, width: int) -> tuple[int, int]:
    """The token grid (h, w) of images of this size; raises when the size is not a multiple of the downsampling."""
    f = cfg.downsample
    if height % f or width % f:
        raise DD2ValueError(f"images: height and width must be multiples of {f} (ch_mult), got {height}x{width}")
    return height // f, width // f


def quantize(vq: LlamaGenVQ, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Encoder output on the unit sphere, its nearest codes and ids.

    Shapes: x (B, 3, H, W) -> z (B, N, C) normalised latents, e (B, N, C) codes, ids (B, N).
    """
    z = vq.quant_conv(vq.encoder(x))  # (B, C, h, w)
    z = F.normalize(rearrange(z, "b c h w -> b (h w) c"), dim=-1)  # (B, N, C)
    codebook = vq.codebook  # (V, C), normalised
    ids = (z.detach() @ codebook.detach().T).argmax(-1)  # nearest on the sphere = largest cosine
    return z, codebook[ids], ids


def vq_losses(vq: LlamaGenVQ, x: Tensor, beta: float) -> tuple[Tensor, dict[str, Tensor], Tensor]:
    """One forward pass with the training losses (module docstring).

    Shapes: x (B, 3, H, W) -> loss (), metrics {name: ()}, ids (B, N).
    """
    h, w = check_image_size(vq.cfg, x.shape[2], x.shape[3])
    z, e, ids = quantize(vq, x)
    z_q = z + (e - z).detach()  # straight-through: the decoder sees codes, the encoder gets the gradient
    rec = vq.decoder(vq.post_quant_conv(rearrange(z_q, "b (h w) c -> b c h w", h=h, w=w)))  # (B, 3, H, W)
    rec_loss = (rec - x).abs().mean() + (rec - x).pow(2).mean()
    codebook_loss = (z.detach() - e).pow(2).sum(-1).mean()
    commit_loss = (z - e.detach()).pow(2).sum(-1).mean()
    loss = rec_loss + codebook_loss + beta * commit_loss
    mse = (rec.detach().clamp(-1, 1) - x).pow(2).mean()
    metrics = {"loss": loss.detach(), "rec": rec_loss.detach(), "commit": commit_loss.detach(), "mse": mse}
    return loss, metrics, ids


@torch.no_grad()
def _restart_dead_codes(vq: LlamaGenVQ, usage: Tensor, z: Tensor, g: torch.Generator) -> int:
    """Move codes with zero usage onto random latents of the batch.  Shapes: usage (V,), z (B, N, C)."""
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    pool = z.detach().flatten(0, 1)  # (B*N, C)
    pick = torch.randint(pool.shape[0], (dead.numel(),), generator=g, device=pool.device)
    vq.quantize.embedding.weight[dead] = pool[pick].to(vq.quantize.embedding.weight.dtype)
    return int(dead.numel())


def train_vq(vq: LlamaGenVQ, images: np.ndarray | Tensor, cfg: VQTrainConfig) -> dict[str, Any]:
    """Train `vq` in place on uint8 images (B, H, W) or (B, H, W, 3); returns a summary (steps, seconds, metrics).

    Batches are drawn without replacement epoch by epoch from a generator seeded by cfg.seed.
    """
    data = _as_tensor(images)
    n = data.shape[0]
    check_image_size(vq.cfg, data.shape[1], data.shape[2])
    device = next(vq.parameters()).device
    g = torch.Generator().manual_seed(cfg.seed)
    vq.train().requires_grad_(True)
    opt = torch.optim.Adam(vq.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    usage = torch.zeros(vq.cfg.codebook_size, device=device)
    order, pos = torch.randperm(n, generator=g), 0
    tic = time.perf_counter()
    metrics: dict[str, float] = {}
    restarted = 0
    step = 0
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        x = to_vq_input(data[idx]).to(device)  # (B, 3, H, W)
        loss, m, ids = vq_losses(vq, x, cfg.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage += torch.bincount(ids.flatten(), minlength=vq.cfg.codebook_size)
        if cfg.restart_every and step % cfg.restart_every == 0:
            with torch.no_grad():
                z, _, _ = quantize(vq, x)
            restarted += _restart_dead_codes(vq, usage, z, g)
            usage.zero_()
        done = step == cfg.steps or (cfg.seconds is not None and time.perf_counter() - tic > cfg.seconds)
        if step % cfg.log_every == 0 or done:
            metrics = {k: float(v) for k, v in m.items()}  # .item(): a sync point, only when logging
            metrics["codes_used"] = float((usage > 0).sum()) if usage.sum() > 0 else float("nan")
            logger.info(
                "vq step %d/%d | loss %.4f | mse %.4f | %.1f img/s",
                step,
                cfg.steps,
                metrics["loss"],
                metrics["mse"],
                step * cfg.batch_size / (time.perf_counter() - tic),
            )
        if done:
            break
    vq.eval().requires_grad_(False)
    return {"steps": step, "seconds": time.perf_counter() - tic, "restarted_codes": restarted, "metrics": metrics}


@torch.no_grad()
def encode_images(vq: LlamaGenVQ, images: np.ndarray | Tensor, *, batch_size: int = 500) -> Tensor:
    """Token ids of uint8 images in raster order.  Shapes: (M, H, W[, 3]) -> ids (M, N) int64 on CPU."""
    data = _as_tensor(images)
    device = next(vq.parameters()).device
    out = [vq.encode(to_vq_input(data[i : i + batch_size]).to(device)).cpu() for i in range(0, len(data), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def reconstruct(vq: LlamaGenVQ, images: np.ndarray | Tensor, *, batch_size: int = 500) -> Tensor:
    """Encode and decode (through the codes).  Shapes: uint8 (M, H, W[, 3]) -> float (M, 3, H, W), about [-1, 1]."""
    ids = encode_images(vq, images, batch_size=batch_size)
    device = next(vq.parameters()).device
    return torch.cat([vq.decode_ids(ids[i : i + batch_size].to(device)).cpu() for i in range(0, len(ids), batch_size)])


def write_code_shards(
    ids: Tensor, labels: Tensor, out_dir: str | Path, *, shard_size: int, meta: Mapping[str, Any]
) -> dict[str, int]:
    """Image codes -> `adapt` shards (shard-NNNNNN.tar, the gen-data format); shards already written are kept.

    `meta` must hold num_classes (written into every shard with kind "image-codes", num_tokens, vocab_size).
    Shapes: ids (M, N), labels (M,).
    """
    if ids.dim() != 2 or labels.shape != (ids.shape[0],):
        raise DD2ValueError(f"ids, labels: expected (M, N) and (M,), got {tuple(ids.shape)}, {tuple(labels.shape)}")
    if "num_classes" not in meta or "vocab_size" not in meta:
        raise DD2ValueError(f"meta: expected the keys num_classes and vocab_size, got {sorted(meta)}")
    out_dir = Path(out_dir)
    plan = shard_plan(ids.shape[0], shard_size)
    written = skipped = 0
    for j, count in enumerate(plan):
        path = out_dir / SHARD_PATTERN.format(j)
        full = {**meta, "kind": "image-codes", "num_tokens": int(ids.shape[1]), "shard": j}
        if path.is_file():
            found = read_shard_meta(str(path))
            if {k: found.get(k) for k in full} != full:
                raise DD2ValueError(f"{path}: written with other settings ({found}); delete {out_dir} to re-tokenize")
            skipped += 1
            continue
        lo = j * shard_size
        write_shard(path, ids[lo : lo + count], labels[lo : lo + count], full)
        written += 1
    logger.info("code shards in %s: %d written, %d kept", out_dir, written, skipped)
    return {"written": written, "skipped": skipped, "shards": len(plan)}


def codebook_usage(ids: Tensor, vocab_size: int) -> dict[str, float]:
    """How much of the codebook a set of ids uses: count of used codes and perplexity exp(H(usage))."""
    counts = torch.bincount(ids.flatten(), minlength=vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"codes_used": int((counts > 0).sum()), "perplexity": float(math.exp(float(entropy)))}
