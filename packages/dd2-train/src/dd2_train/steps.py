"""One update of every DD2 stage, engine-agnostic (DESIGN.md: the algorithm lives here, once).

Each step takes the model(s), an `Updater` (anything with backward(loss) and step(): a plain-torch `TorchUpdater`
or a DeepSpeed engine), a batch, and a config; it computes the loss from dd2_core.losses, reduces it, and updates.
Metrics come back as detached 0-dim tensors: call .item() only when logging (it is a CPU-GPU sync point).

    gts_step        AR-diffusion tuning on teacher samples (DD2 Eq. 6)               stage `gts`
    guidance_step   guidance network psi by FCS on generator samples (Eq. 5)        stage `csd` (K per generator step)
    generator_step  one-step generator by CSD against teacher and psi (Eq. 4)        stage `csd`
    regression_step DD1-style regression onto precomputed flow-map pairs (offline)     stage `regress` (offline)
    onpolicy_regression_step  regression onto the teacher's per-token flow map given the generator's own prefix
                    (one teacher pass per batch, no pairs; its fixed point is DD1's map)  stage `regress` (onpolicy)
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
from dd2_core.sampling import integrate_teacher_flow, nearest_code
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
    weighting: Literal["sid", "sid_seq", "none"] = Field(
        "sid",
        description="'sid': omega = 1/mean_C|q - f_teacher| per token (no grad); 'sid_seq': per sequence (SiD's per-"
        "image normaliser); 'none': omega = 1",
    )
    snap_prefix: bool = Field(
        False, description="not in the paper: teacher and guidance condition on the prefix snapped to nearest codes"
    )
    guidance_residual: bool = Field(
        False,
        description="not in the paper: the guidance predicts the teacher's exact velocity plus a learned residual "
        "(its output layer zeroed at the start of CSD), so it starts at the teacher instead of at A's approximation "
        "and needs a teacher forward pass per guidance update",
    )

    anchor_weight: float = Field(
        0.0,
        ge=0.0,
        description="not in the paper (0 = off): lambda of the regression anchor added to the generator's CSD loss, "
        "lambda * ||q - sg(F(eps | p(. | sg(q)_<i)))||^2 with F the teacher's per-token flow map (the on-policy "
        "regression target, from the CSD step's own teacher pass)",
    )
    anchor_final: float | None = Field(
        None, ge=0.0, description="lambda after anchor_steps generator updates (linear from anchor_weight); None: fixed"
    )
    anchor_steps: int = Field(0, ge=0, description="generator updates over which lambda goes to anchor_final")
    flow_steps: int = Field(32, ge=1, le=4096, description="Euler steps of the anchor's per-token flow map")
    align_weight: float = Field(
        0.0,
        ge=0.0,
        description="not in the paper (0 = off): prefix-feature alignment, + align_weight * ||f_G(eps)_i - "
        "f_A(sg(q)_<i)||^2 (mean over D) with A the frozen GTS model: the generator's noise features are pulled "
        "toward A's features of the tokens it produced (needs `reference` = A)",
    )
    flow_power: float = Field(2.0, gt=0.0, description="time grid (1 - k/steps)^power of the flow map")

    @model_validator(mode="after")
    def _t_range(self) -> CSDConfig:
        if self.t_min >= self.t_max:
            raise ValueError(f"need t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        return self

    def anchor_at(self, step: int) -> float:
        """lambda at generator update `step` (0-based): linear from anchor_weight to anchor_final over anchor_steps."""
        if self.anchor_final is None:
            return self.anchor_weight
        if step >= self.anchor_steps:
            return self.anchor_final
        return self.anchor_weight + (self.anchor_final - self.anchor_weight) * step / self.anchor_steps


class RegressConfig(BaseModel):
    """Regression of the generator onto the teacher's flow map (not in DD2; DD1's map).

    'onpolicy': for q = G(eps), one teacher-forced pass on sg(q) gives p(. | q_<i) at every position; the target of
    token i is the teacher's deterministic per-token flow map F(eps_i | p(. | q_<i)) (the mixture-velocity ODE from
    t = 1 to 0, `dd2_core.sampling.integrate_teacher_flow`). At the fixed point G = F the prefixes are F's own, so
    it converges to DD1's map, with no sequential AR sampling and no pair dataset.
    'offline': DD1 itself, on (eps, F(eps)) pairs written by the `gen-pairs` stage.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["onpolicy", "offline"] = Field("onpolicy", description="targets from the generator's own prefix "
                                                 "(one teacher pass per batch) or from gen-pairs shards")  # fmt: skip
    snap_prefix: bool = Field(True, description="onpolicy: the teacher conditions on the prefix snapped to codes")
    flow_steps: int = Field(32, ge=1, le=4096, description="Euler steps of the per-token flow map")
    flow_power: float = Field(2.0, gt=0.0, description="time grid (1 - k/steps)^power, as dd2_core.sampling")
    align_weight: float = Field(0.0, ge=0.0, description="prefix-feature alignment weight (CSDConfig.align_weight)")


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


def alignment_loss(f_generator: Tensor, reference: ARDiffusion | None, prefix: Tensor, labels: Tensor) -> Tensor:
    """Prefix-feature alignment: mean ||f_G(eps)_i - sg(f_A(prefix)_i)||^2 over positions and D (A frozen)."""
    if reference is None:
        raise ValueError("align_weight > 0 needs the frozen GTS model A (reference=...)")
    with torch.no_grad():
        f_ref = reference.features(prefix, labels)  # (B, N, D): A reads the generated prefix
    return (f_generator.float() - f_ref.float()).pow(2).mean()


def _with_alignment(
    loss: Tensor, metrics: dict, weight: float, f_generator: Tensor, reference, prefix, labels
) -> Tensor:
    """loss + weight * alignment_loss (recorded in metrics["loss_align"]); loss unchanged when weight is 0."""
    if weight <= 0:
        return loss
    align = alignment_loss(f_generator, reference, prefix, labels)
    metrics["loss_align"] = align.detach()
    return loss + weight * align


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
    step: int = 0,
    reference: ARDiffusion | None = None,
) -> dict[str, Tensor]:
    """One CSD update of the generator (DD2 Eq. 4, all positions at once, prefixes detached).

    Teacher log-probs and guidance features are computed on sg(q); only the noised current token carries the
    generator's gradient. The guidance parameters are frozen during the backward pass, so they receive no gradient.
    Anchored CSD (not in the paper; cfg.anchor_at(step) > 0): + lambda * ||q - sg(F)||^2 with F the per-token
    flow map given the same teacher pass (`onpolicy_regression_step`'s target); it draws no random numbers, so
    with lambda = 0 the step is today's CSD bit for bit.
    Shapes: labels (B,).
    """
    noise = generator.sample_noise(labels.shape[0], device=labels.device, generator=rng)
    q, f_gen = generator.forward_with_features(noise, labels)  # (B, N, C), (B, N, D), with gradient
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
        metrics = {"loss_csd": loss.detach()}
        lam = cfg.anchor_at(step)
        if lam > 0:
            target = flow_map_target(noise, log_probs, teacher.codebook, cfg.flow_steps, cfg.flow_power)
            reg = regression_loss(q, target).mean()
            loss = loss + lam * reg
            metrics |= {"loss_anchor": reg.detach(), "anchor_lambda": torch.tensor(lam)}
        loss = _with_alignment(loss, metrics, cfg.align_weight, f_gen, reference, prefix, labels)
        updater.backward(loss)
    updater.step()
    return metrics


def regression_step(
    generator: OneStepGenerator, updater: Updater, noise: Tensor, tokens: Tensor, labels: Tensor
) -> dict[str, Tensor]:
    """One DD1-style update: regress G(eps) onto the teacher flow map F(eps).  Shapes: (B, N, C), (B, N, C), (B,)."""
    loss = regression_loss(generator(noise, labels), tokens).mean()
    updater.backward(loss)
    updater.step()
    return {"loss_reg": loss.detach()}


@torch.no_grad()
def flow_map_target(noise: Tensor, log_probs: Tensor, codebook: Tensor, steps: int, power: float) -> Tensor:
    """sg(F): the teacher's per-token flow map F(eps_i | p_i), all positions at once (dd2_core.sampling's
    integrator and grid).  Shapes: noise (B, N, C), log_probs (B, N, V), codebook (V, C) -> (B, N, C) float32."""
    return integrate_teacher_flow(noise.float(), log_probs, codebook.float(), steps=steps, power=power)


def onpolicy_regression_step(
    generator: OneStepGenerator,
    updater: Updater,
    teacher: Teacher,
    labels: Tensor,
    cfg: RegressConfig,
    *,
    rng: torch.Generator | None = None,
    reference: ARDiffusion | None = None,
) -> dict[str, Tensor]:
    """One on-policy flow-map regression update (RegressConfig): q = G(eps), p = teacher(sg(q)) in one teacher-forced
    pass, loss ||q - sg(F(eps | p))||^2 (+ prefix-feature alignment with cfg.align_weight).  Shapes: labels (B,)."""
    noise = generator.sample_noise(labels.shape[0], device=labels.device, generator=rng)
    q, f_gen = generator.forward_with_features(noise, labels)  # (B, N, C), (B, N, D), with gradient
    prefix = _prefix(q, teacher.codebook, cfg.snap_prefix)  # sg(q_<i)
    with torch.no_grad():
        log_probs = teacher.log_probs(prefix, labels)  # (B, N, V): row i sees only q_<i
        target = flow_map_target(noise, log_probs, teacher.codebook, cfg.flow_steps, cfg.flow_power)
    loss = regression_loss(q, target).mean()
    metrics = {"loss_reg": loss.detach()}
    loss = _with_alignment(loss, metrics, cfg.align_weight, f_gen, reference, prefix, labels)
    updater.backward(loss)
    updater.step()
    return metrics


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
    step: int = 0,
    reference: ARDiffusion | None = None,
) -> dict[str, Tensor]:
    """K guidance updates then one generator update (DD2 Alg. 1): the unit that every CSD driver repeats.
    `step` (0-based generator update) sets the anchor's lambda; `reference` (model A) serves cfg.align_weight."""
    metrics: dict[str, Tensor] = {}
    for _ in range(cfg.guidance_updates):
        metrics = guidance_step(guidance, gui_updater, generator, next_labels(), cfg, teacher=teacher, rng=rng)
    return metrics | generator_step(generator, gen_updater, guidance, teacher, next_labels(), cfg, rng=rng, step=step,
                                    reference=reference)  # fmt: skip
