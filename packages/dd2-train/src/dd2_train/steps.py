"""One update of every DD2 stage, engine-agnostic (DESIGN.md: the algorithm lives here, once).

Each step takes the model(s), an `Updater` (anything with backward(loss) and step(): a plain-torch `TorchUpdater`
or a DeepSpeed engine), a batch, and a config; it computes the loss from dd2_core.losses, reduces it, and updates.
Metrics come back as detached 0-dim tensors: call .item() only when logging (it is a CPU-GPU sync point).

    gts_step        AR-diffusion tuning on teacher samples (DD2 Eq. 6)               stage `gts`
    guidance_step   guidance network psi by FCS on generator samples (Eq. 5)        stage `csd` (K per generator step)
    generator_step  one-step generator by CSD against teacher and psi (Eq. 4)        stage `csd`
    regression_step DD1-style regression onto the teacher's flow map (optional warm start / baseline)
    adapt_step      LlamaGen's continuous-input AR fine-tuning (stage 0, App. E.4)   stage `adapt`
    ema_update      the paper's progressive EMA: decay = min(max_decay, (step + 1) / (step + 10))
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from dd2_core.diffusion import ARDiffusion
from dd2_core.flow import sample_t
from dd2_core.generator import OneStepGenerator
from dd2_core.losses import csd_loss, fcs_loss, gts_loss, regression_loss
from dd2_core.sampling import nearest_code
from dd2_core.teacher import Teacher

logger = logging.getLogger(__name__)


class Updater(Protocol):
    """What a step needs to apply a loss. A DeepSpeed engine satisfies it as is."""

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> None: ...


class TorchUpdater:
    """Plain-torch Updater: backward, optional gradient clipping, optimizer step, zero grads, scheduler step."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, clip: float | None = None, scheduler=None):
        self.optimizer, self.clip, self.scheduler = optimizer, clip, scheduler

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()


class GTSConfig(BaseModel):
    """AR-diffusion tuning with the GTS loss (DD2 3.3, Tab. 10)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    t_min: float = Field(0.02, gt=0.0, lt=1.0, description="t ~ U[t_min, t_max] per token")
    t_max: float = Field(1.0, gt=0.0, le=1.0, description="1.0: the generator's head runs at t = 1, so train there too")
    head_only: bool = Field(False, description="freeze the backbone (VAR's first phase: 300k head-only iterations)")

    @model_validator(mode="after")
    def _t_range(self) -> GTSConfig:
        if self.t_min >= self.t_max:
            raise ValueError(f"need t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        return self


class CSDConfig(BaseModel):
    """CSD training of the generator with a guidance network (DD2 3.2, Tab. 11). Defaults follow the paper where it
    is explicit (K = 5, alpha = 1) and method.md 10 where it is silent (t range, omega, m = 4)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    guidance_updates: int = Field(5, ge=1, description="K guidance (FCS) updates per generator update")
    fcs_draws: int = Field(4, ge=1, description="m (t, eps) draws per generated token in FCS (App. C.2)")
    csd_draws: int = Field(
        1, ge=1, description="not in the paper (1): (t, eps') draws per token in the generator's CSD loss, averaged"
    )
    t_min: float = Field(0.02, gt=0.0, lt=1.0, description="t ~ U[t_min, t_max] per token, CSD and FCS")
    t_max: float = Field(0.98, gt=0.0, le=1.0, description="upper end of t")
    weighting: Literal["sid", "none"] = Field("sid", description="'sid': omega = 1/mean|q - f_teacher| (no grad)")
    snap_prefix: bool = Field(
        False, description="not in the paper: teacher and guidance condition on the prefix snapped to nearest codes"
    )
    guidance_residual: bool = Field(
        False,
        description="not in the paper: the guidance predicts the teacher's exact velocity plus a learned residual "
        "(its output layer zeroed at the start of CSD), so it starts at the teacher instead of at A's approximation "
        "and needs a teacher forward pass per guidance update",
    )

    @model_validator(mode="after")
    def _t_range(self) -> CSDConfig:
        if self.t_min >= self.t_max:
            raise ValueError(f"need t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        return self


def _per_token_t(shape: tuple[int, ...], t_min: float, t_max: float, like: Tensor, rng) -> Tensor:
    return sample_t((*shape, 1), t_min, t_max, device=like.device, generator=rng).to(like.dtype)


def _randn_like(x: Tensor, rng) -> Tensor:
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=rng)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Temporarily set requires_grad = False on every parameter (inputs still get gradients through the module)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _prefix(tokens: Tensor, codebook: Tensor, snap: bool) -> Tensor:
    """sg(q): the prefix that teacher and guidance condition on (optionally snapped to the nearest codes)."""
    tokens = tokens.detach()  # sg(.)
    if snap:
        tokens = codebook.to(tokens.device, tokens.dtype)[nearest_code(tokens, codebook)]
    return tokens


@torch.no_grad()
def start_residual_guidance(guidance: ARDiffusion) -> ARDiffusion:
    """Zero the guidance head's output layer: with csd.guidance_residual it then equals the teacher exactly.

    Called once when CSD starts from model A (not on resume). The rest of A's head and backbone is kept as features.
    """
    final = guidance.head.final.linear
    final.weight.zero_()
    if final.bias is not None:
        final.bias.zero_()
    return guidance


def gts_step(
    model: ARDiffusion,
    updater: Updater,
    teacher: Teacher,
    tokens: Tensor,
    labels: Tensor,
    cfg: GTSConfig,
    *,
    rng: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """One GTS update of the AR-diffusion model on teacher samples.

    tokens are teacher samples in codebook space (teacher.embed(ids)); the target is the exact teacher velocity
    under p(. | tokens_<i) from one teacher-forced pass.  Shapes: tokens (B, N, C), labels (B,).
    """
    with torch.no_grad():
        log_probs = teacher.log_probs(tokens, labels)  # (B, N, V)
    ctx = torch.no_grad() if cfg.head_only else contextlib.nullcontext()
    with ctx:
        f = model.features(tokens, labels)  # (B, N, D)
    t = _per_token_t(tokens.shape[:2], cfg.t_min, cfg.t_max, tokens, rng)
    eps = _randn_like(tokens, rng)
    loss = gts_loss(model.head, tokens, f, log_probs, teacher.codebook, t, eps).mean()
    updater.backward(loss)
    updater.step()
    return {"loss_gts": loss.detach()}


def guidance_step(
    guidance: ARDiffusion,
    updater: Updater,
    generator: OneStepGenerator,
    labels: Tensor,
    cfg: CSDConfig,
    *,
    teacher: Teacher | None = None,
    rng: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """One FCS update of the guidance network on fresh generator samples (DD2 Eq. 5, m draws per token).

    `teacher` is needed only with cfg.snap_prefix (its codebook) or cfg.guidance_residual.  Shapes: labels (B,).
    """
    if teacher is None and (cfg.snap_prefix or cfg.guidance_residual):
        raise ValueError("guidance_step: csd.snap_prefix and csd.guidance_residual need the teacher (teacher=...)")
    with torch.no_grad():
        noise = generator.sample_noise(labels.shape[0], device=labels.device, generator=rng)
        q = generator(noise, labels)  # (B, N, C), sg(.) by no_grad
    prefix = _prefix(q, teacher.codebook, cfg.snap_prefix) if cfg.snap_prefix else q
    f = guidance.features(prefix, labels)  # (B, N, D)
    residual = {}
    if cfg.guidance_residual:
        with torch.no_grad():
            residual = {"teacher_log_probs": teacher.log_probs(prefix, labels), "codebook": teacher.codebook}
    m = cfg.fcs_draws
    t = _per_token_t((m * q.shape[0], q.shape[1]), cfg.t_min, cfg.t_max, q, rng)
    eps = torch.randn((m * q.shape[0], *q.shape[1:]), device=q.device, dtype=q.dtype, generator=rng)
    loss = fcs_loss(guidance.head, q, f, t, eps, num_draws=m, **residual).mean()
    updater.backward(loss)
    updater.step()
    return {"loss_fcs": loss.detach()}


def generator_step(
    generator: OneStepGenerator,
    updater: Updater,
    guidance: ARDiffusion,
    teacher: Teacher,
    labels: Tensor,
    cfg: CSDConfig,
    *,
    rng: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """One CSD update of the generator (DD2 Eq. 4, all positions at once, prefixes detached).

    Teacher log-probs and guidance features are computed on sg(q); only the noised current token carries the
    generator's gradient. The guidance parameters are frozen during the backward pass, so they receive no gradient.
    Shapes: labels (B,).
    """
    noise = generator.sample_noise(labels.shape[0], device=labels.device, generator=rng)
    q = generator(noise, labels)  # (B, N, C), with gradient
    prefix = _prefix(q, teacher.codebook, cfg.snap_prefix)  # sg(q_<i)
    with torch.no_grad():
        log_probs = teacher.log_probs(prefix, labels)  # (B, N, V)
        f = guidance.features(prefix, labels)  # (B, N, D)
    with frozen(guidance):
        loss = q.new_zeros((), dtype=torch.float32)
        for _ in range(cfg.csd_draws):  # the teacher and guidance features above are shared by all draws
            t = _per_token_t(q.shape[:2], cfg.t_min, cfg.t_max, q, rng)
            eps = _randn_like(q, rng)
            draw = csd_loss(q, guidance.head, f, log_probs, teacher.codebook, t, eps, weighting=cfg.weighting,
                            residual=cfg.guidance_residual)  # fmt: skip
            loss = loss + draw.mean() / cfg.csd_draws
        updater.backward(loss)
    updater.step()
    return {"loss_csd": loss.detach()}


def regression_step(
    generator: OneStepGenerator, updater: Updater, noise: Tensor, tokens: Tensor, labels: Tensor
) -> dict[str, Tensor]:
    """One DD1-style update: regress G(eps) onto the teacher flow map F(eps).  Shapes: (B, N, C), (B, N, C), (B,)."""
    loss = regression_loss(generator(noise, labels), tokens).mean()
    updater.backward(loss)
    updater.step()
    return {"loss_reg": loss.detach()}


def adapt_step(model: nn.Module, updater: Updater, ids: Tensor, labels: Tensor, codebook: Tensor) -> dict[str, Tensor]:
    """One AR cross-entropy update of a continuous-input teacher (LlamaGen stage 0, DD2 App. E.4).

    `model.forward_continuous(tokens (B, N, C), labels) -> logits (B, N, V)` reads code vectors instead of ids.
    Shapes: ids (B, N), labels (B,), codebook (V, C).
    """
    tokens = codebook[ids]  # (B, N, C)
    logits = model.forward_continuous(tokens, labels)  # (B, N, V)
    loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    updater.backward(loss)
    updater.step()
    return {"loss_ce": loss.detach()}


def ema_decay(step: int, max_decay: float = 0.9999) -> float:
    """The paper's progressive EMA rate (App. E.3): min(max_decay, (step + 1) / (step + 10))."""
    return min(max_decay, (step + 1) / (step + 10))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, max_decay: float = 0.9999) -> float:
    """ema <- d * ema + (1 - d) * model for trained parameters (buffers copied); returns d.

    Frozen parameters (VAR's phi convs) keep the EMA's own copy: the model's may be a bf16 rounding of them.
    """
    d = ema_decay(step, max_decay)
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        if pm.requires_grad:
            pe.lerp_(pm.to(pe.dtype), 1 - d)
    for be, bm in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(bm)
    return d


def csd_round(
    generator: OneStepGenerator,
    gen_updater: Updater,
    guidance: ARDiffusion,
    gui_updater: Updater,
    teacher: Teacher,
    next_labels: Callable[[], Tensor],
    cfg: CSDConfig,
    *,
    rng: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """K guidance updates then one generator update (DD2 Alg. 1): the unit that every CSD driver repeats."""
    metrics: dict[str, Tensor] = {}
    for _ in range(cfg.guidance_updates):
        metrics = guidance_step(guidance, gui_updater, generator, next_labels(), cfg, teacher=teacher, rng=rng)
    return metrics | generator_step(generator, gen_updater, guidance, teacher, next_labels(), cfg, rng=rng)
