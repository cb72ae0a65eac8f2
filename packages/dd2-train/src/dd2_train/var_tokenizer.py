"""Training a small VAR multi-scale VQVAE from pixels, and a small VAR transformer on its codes (the VAR demo).

The architectures are dd2_core's `VARVQVAE` and `VAR` at small configs; only the training is here, in plain torch
(one process: both are small). Images are padded to the VQVAE's image size (28x28 Fashion-MNIST -> 32x32, the
padding at the background value -1) and greyscale is replicated to 3 channels.

VQVAE (VAR's multi-scale residual quantisation, on sg(f); the codebook and the phi convs learn from f_hat):

    f       = quant_conv(encoder(x))                               (B, Cvae, H, H)
    for each scale k:  r_k = area_{pn_k}(sg(f) - f_hat_<k)          residual left for scale k
                       ids_k = argmin_j ||r_k - c_j||,   f_hat_<=k = f_hat_<k + phi_k(up_H(E[ids_k]))
    f_q     = f + sg(f_hat - f)                                     straight-through estimator
    x_rec   = decoder(post_quant_conv(f_q))
    loss    = |x_rec - x| + (x_rec - x)^2                           reconstruction
            + mean_k ||f_hat_<=k - sg(f)||^2 + beta mean_k ||sg(f_hat_<=k) - f||^2     codebook / commitment

Dead codes (unused for `restart_every` steps) are restarted at residual vectors of the current batch.

VAR transformer: teacher-forced cross-entropy over all scales at once, the next-scale inputs built from the codes
by the VQVAE's phi / f_hat construction; labels are replaced by the null class with probability `label_drop`
(VAR's class dropout), so that the ramped CFG of the VAR policy has a trained unconditional model.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dd2_core.errors import DD2ValueError
from dd2_core.models.var import VAR
from dd2_core.models.var_vqvae import VARVQVAE
from dd2_train.tokenizer import VQTrainConfig, _as_tensor, to_vq_input

logger = logging.getLogger(__name__)


def to_var_input(images: np.ndarray | Tensor, size: int) -> Tensor:
    """uint8 (B, h, w[, 3]) -> float (B, 3, size, size) in [-1, 1], centred, padded with -1 (black background)."""
    x = to_vq_input(images)  # (B, 3, h, w)
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise DD2ValueError(f"images: expected at most {size}x{size} (the VQVAE's image size), got {h}x{w}")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)


def crop_images(images: Tensor, height: int, width: int) -> Tensor:
    """The centre height x width of uint8 images (B, H, W, 3): undoes `to_var_input`'s padding."""
    h, w = images.shape[1:3]
    top, left = (h - height) // 2, (w - width) // 2
    return images[:, top : top + height, left : left + width]


def multiscale_quantize(vqvae: VARVQVAE, f: Tensor) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
    """VAR's residual quantisation of sg(f), keeping the graph to the codebook and the phi convs.

    Shapes: f (B, Cvae, H, H) -> f_hat (B, Cvae, H, H), [f_hat_<=k for every scale k], ids (B, N), residual
    vectors the codes were chosen for (B*N, Cvae) (for dead-code restarts).
    """
    phi, quant = vqvae.phi, vqvae.quantize
    target = f.detach()
    f_hat = torch.zeros_like(target)
    partial, ids, residuals = [], [], []
    last = len(phi.patch_nums) - 1
    for si, pn in enumerate(phi.patch_nums):
        rest = target - f_hat.detach()
        r = rest if si == last else F.interpolate(rest, size=(pn, pn), mode="area")  # (B, C, pn, pn)
        r = rearrange(r, "b c h w -> (b h w) c")  # (B*pn*pn, C)
        idx = quant.nearest_ids(r)  # (B*pn*pn,)
        h = rearrange(quant.embedding(idx), "(b h w) c -> b c h w", b=f.shape[0], h=pn)  # (B, C, pn, pn)
        f_hat = f_hat + phi.residual(h, si)
        partial.append(f_hat)
        ids.append(rearrange(idx, "(b n) -> b n", b=f.shape[0]))
        residuals.append(r)
    return f_hat, partial, torch.cat(ids, dim=1), torch.cat(residuals)


def var_vq_losses(vqvae: VARVQVAE, x: Tensor, beta: float) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """One forward pass with the training losses (module docstring).

    Shapes: x (B, 3, S, S) -> loss (), metrics {name: ()}, ids (B, N), residual vectors (M, Cvae).
    """
    f = vqvae.encode_latent(x)  # (B, C, H, H)
    f_hat, partial, ids, residuals = multiscale_quantize(vqvae, f)
    f_q = f + (f_hat - f).detach()  # straight-through: the decoder sees f_hat, the encoder gets the gradient
    rec = vqvae.decoder(vqvae.post_quant_conv(f_q))  # (B, 3, S, S)
    rec_loss = (rec - x).abs().mean() + (rec - x).pow(2).mean()
    codebook_loss = torch.stack([(p - f.detach()).pow(2).mean() for p in partial]).mean()
    commit_loss = torch.stack([(p.detach() - f).pow(2).mean() for p in partial]).mean()
    loss = rec_loss + codebook_loss + beta * commit_loss
    mse = (rec.detach().clamp(-1, 1) - x).pow(2).mean()
    metrics = {"loss": loss.detach(), "rec": rec_loss.detach(), "commit": commit_loss.detach(), "mse": mse}
    return loss, metrics, ids, residuals.detach()


@torch.no_grad()
def _restart_dead_codes(vqvae: VARVQVAE, usage: Tensor, residuals: Tensor, g: torch.Generator) -> int:
    dead = (usage == 0).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    pick = torch.randint(residuals.shape[0], (dead.numel(),), generator=g).to(residuals.device)
    weight = vqvae.quantize.embedding.weight
    weight[dead] = residuals[pick].to(weight.dtype)
    return int(dead.numel())


def train_var_vqvae(vqvae: VARVQVAE, images: np.ndarray | Tensor, cfg: VQTrainConfig) -> dict[str, Any]:
    """Train `vqvae` in place on uint8 images (B, h, w) or (B, h, w, 3) no larger than its image size; returns a
    summary (steps, seconds, restarted codes, last metrics). Batches are drawn epoch by epoch from cfg.seed."""
    data = _as_tensor(images)
    n, size = data.shape[0], vqvae.cfg.image_size
    device = next(vqvae.parameters()).device
    g = torch.Generator().manual_seed(cfg.seed)
    vqvae.train().requires_grad_(True)
    opt = torch.optim.Adam(vqvae.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    usage = torch.zeros(vqvae.cfg.vocab_size, device=device)
    order, pos = torch.randperm(n, generator=g), 0
    tic, metrics, restarted, step = time.perf_counter(), {}, 0, 0
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        x = to_var_input(data[order[pos : pos + cfg.batch_size]], size).to(device)  # (B, 3, S, S)
        pos += cfg.batch_size
        loss, m, ids, residuals = var_vq_losses(vqvae, x, cfg.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage += torch.bincount(ids.flatten(), minlength=vqvae.cfg.vocab_size)
        if cfg.restart_every and step % cfg.restart_every == 0:
            restarted += _restart_dead_codes(vqvae, usage, residuals, g)
            usage.zero_()
        done = step == cfg.steps or (cfg.seconds is not None and time.perf_counter() - tic > cfg.seconds)
        if step % cfg.log_every == 0 or done:
            metrics = {k: float(v) for k, v in m.items()}  # .item(): a sync point, only when logging
            logger.info("var vqvae step %d/%d | loss %.4f | mse %.4f | %.1f img/s", step, cfg.steps, metrics["loss"],
                        metrics["mse"], step * cfg.batch_size / (time.perf_counter() - tic))  # fmt: skip
        if done:
            break
    vqvae.eval().requires_grad_(False)
    return {"steps": step, "seconds": time.perf_counter() - tic, "restarted_codes": restarted, "metrics": metrics}


@torch.no_grad()
def encode_var_images(vqvae: VARVQVAE, images: np.ndarray | Tensor, *, batch_size: int = 500) -> Tensor:
    """Per-scale token ids of uint8 images (padded to the image size).  Shapes: (M, h, w[, 3]) -> (M, N) int64."""
    data = _as_tensor(images)
    device = next(vqvae.parameters()).device
    size = vqvae.cfg.image_size
    return torch.cat([vqvae.encode_ids(to_var_input(data[i : i + batch_size], size).to(device)).cpu()
                      for i in range(0, len(data), batch_size)])  # fmt: skip


class VARTrainConfig(BaseModel):
    """How the small VAR transformer is trained on codes (AdamW, linear warm-up, constant learning rate)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(..., ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1, description="sequences per step")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    label_drop: float = Field(0.1, ge=0.0, lt=1.0, description="probability of the null class (VAR: 0.1)")
    seconds: float | None = Field(None, gt=0.0, description="optional wall-time cap (stops early)")
    seed: int = Field(0, description="batches and label dropout")
    log_every: int = Field(50, ge=1, description="log a line every N steps")


def var_ce_loss(var: VAR, vqvae: VARVQVAE, ids: Tensor, labels: Tensor) -> Tensor:
    """Teacher-forced next-scale cross-entropy, mean over tokens.  Shapes: ids (B, N), labels (B,) -> ()."""
    x_in = vqvae.next_scale_input(vqvae.ids_to_tokens(ids))  # (B, N - first_l, Cvae)
    logits = var(labels, x_in)  # (B, N, V)
    return F.cross_entropy(logits.flatten(0, 1), ids.flatten())


def train_var(var: VAR, vqvae: VARVQVAE, ids: Tensor, labels: Tensor, cfg: VARTrainConfig) -> dict[str, Any]:
    """Train `var` in place on code sequences (M, N) with labels (M,); returns a summary (steps, seconds, loss)."""
    if ids.dim() != 2 or ids.shape[1] != var.cfg.num_tokens or labels.shape != (ids.shape[0],):
        raise DD2ValueError(f"ids, labels: expected (M, {var.cfg.num_tokens}) and (M,), got {tuple(ids.shape)}, "
                            f"{tuple(labels.shape)}")  # fmt: skip
    g = torch.Generator().manual_seed(cfg.seed)
    var.train().requires_grad_(True)
    opt = torch.optim.AdamW(var.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    n, device = ids.shape[0], next(var.parameters()).device
    order, pos = torch.randperm(n, generator=g), 0
    tic, loss_value, step = time.perf_counter(), float("nan"), 0
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + cfg.batch_size]
        pos += cfg.batch_size
        y = labels[idx].clone()
        y[torch.rand(y.shape, generator=g) < cfg.label_drop] = var.cfg.num_classes  # the null class
        loss = var_ce_loss(var, vqvae, ids[idx].to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step == cfg.steps or (cfg.seconds is not None and time.perf_counter() - tic > cfg.seconds)
        if step % cfg.log_every == 0 or done:
            loss_value = float(loss.detach())  # .item(): a sync point, only when logging
            logger.info("var step %d/%d | ce %.4f | %.1f seq/s", step, cfg.steps, loss_value,
                        step * cfg.batch_size / (time.perf_counter() - tic))  # fmt: skip
        if done:
            break
    var.eval().requires_grad_(False)
    return {"steps": step, "seconds": time.perf_counter() - tic, "ce": loss_value}
