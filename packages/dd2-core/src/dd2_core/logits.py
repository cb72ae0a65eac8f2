"""The teacher's sampling policy on logits: CFG, temperature, top-k, top-p -> log-probs.

Order (both official samplers): CFG combine, then temperature, then top-k, then top-p, then log-softmax.
Filtered codes get log p = -inf, so they contribute no component to the teacher's Gaussian mixture.

CFG conventions, both written as u + w_i (c - u) with a per-position weight w_i:
    constant (LlamaGen): w_i = s for every token.
    ramp (VAR):          (1 + t_g) c - t_g u with t_g = s * g / (G - 1) for group g of G, i.e. w = 1 + t_g;
                         the first scale is unguided (w = 1) and the last has w = 1 + s.

Top-p rules differ between the families (teachers.md 1.6 and 2.5); with probabilities sorted descending and
P_<k the mass of strictly more probable codes:
    "hf"  (LlamaGen): on when top_p < 1; keep code k iff P_<k <= top_p  (the first code past the threshold stays).
    "var" (VAR):      on when top_p > 0; keep code k iff P_<k <  top_p, and always keep the most probable code.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dd2_core.errors import DD2ValueError, expect_shape


class SamplingPolicy(BaseModel):
    """How a teacher's logits become the categorical p that DD2 distils (method.md 2: "default sampling settings")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cfg_scale: float = Field(1.0, ge=0.0, description="guidance scale s; 1.0 with 'constant' = no guidance")
    cfg_schedule: Literal["constant", "ramp"] = Field(
        "constant", description="'constant': w = s at every token (LlamaGen); 'ramp': w = 1 + s*g/(G-1) per group (VAR)"
    )
    temperature: float = Field(1.0, gt=0.0, description="logits are divided by it after CFG")
    top_k: int = Field(0, ge=0, description="keep logits >= the k-th largest; 0 = off")
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="nucleus mass; see top_p_rule for when it is active")
    top_p_rule: Literal["hf", "var"] = Field("hf", description="'hf' (LlamaGen) or 'var' top-p convention")

    @property
    def uses_cfg(self) -> bool:
        """Whether the unconditional pass is needed at all."""
        if self.cfg_schedule == "ramp":
            return self.cfg_scale != 0.0
        return self.cfg_scale != 1.0


def guidance_weights(policy: SamplingPolicy, token_groups: tuple[int, ...], device=None) -> Tensor:
    """Per-token CFG weight w_i of u + w_i (c - u).  Shapes: -> (N,) float32."""
    sizes = torch.tensor(token_groups, device=device)
    num_groups = len(token_groups)
    if policy.cfg_schedule == "constant":
        w_group = torch.full((num_groups,), float(policy.cfg_scale), device=device)
    else:
        ramp = torch.arange(num_groups, device=device, dtype=torch.float32) / max(num_groups - 1, 1)
        w_group = 1.0 + policy.cfg_scale * ramp
    return torch.repeat_interleave(w_group, sizes)


def cfg_combine(cond: Tensor, uncond: Tensor, weight: Tensor | float) -> Tensor:
    """u + w (c - u), w broadcast over positions.

    Shapes: cond, uncond (B, N, V), weight (N,) or scalar -> (B, N, V).
    """
    if isinstance(weight, Tensor):
        weight = weight.to(cond.dtype).unsqueeze(-1)  # (N, 1)
    return uncond + weight * (cond - uncond)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep logits >= the k-th largest along the last axis, -inf elsewhere (k = 0 or k >= V: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    # the k-th largest value is the smallest of an unsorted top-k set: no sort of the k kept values (on a GPU the
    # sort costs as much as the selection; LlamaGen's k = 8000 of 16384)
    kth = torch.topk(logits, k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float, rule: Literal["hf", "var"] = "hf") -> Tensor:
    """Nucleus filtering with the family's convention (module docstring)."""
    if (rule == "hf" and top_p >= 1.0) or (rule == "var" and top_p <= 0.0):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # P_<k, exclusive cumulative mass
    drop_sorted = mass_before > top_p if rule == "hf" else mass_before >= top_p
    drop_sorted[..., 0] = False  # the most probable code always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def policy_log_probs(
    cond: Tensor, uncond: Tensor | None, policy: SamplingPolicy, token_groups: tuple[int, ...]
) -> Tensor:
    """Conditional and unconditional logits -> filtered log-probs, in float32.

    Shapes: cond, uncond (B, N, V) (uncond may be None when the policy needs no CFG) -> (B, N, V).
    """
    n = sum(token_groups)
    expect_shape("cond logits", cond, (None, n, None))
    logits = cond.float()
    if policy.uses_cfg:
        if uncond is None:
            raise DD2ValueError(f"uncond logits: the policy uses CFG (scale {policy.cfg_scale}) but none were given")
        expect_shape("uncond logits", uncond, tuple(cond.shape))
        logits = cfg_combine(logits, uncond.float(), guidance_weights(policy, token_groups, device=cond.device))
    return filtered_log_probs(logits, policy)


def filtered_log_probs(logits: Tensor, policy: SamplingPolicy) -> Tensor:
    """Guided logits -> log-probs after the policy's temperature, top-k and top-p (filtered codes -inf).

    Shapes: (..., V) -> (..., V) float32.
    """
    logits = logits.float()
    if policy.temperature != 1.0:
        logits = logits / policy.temperature
    logits = top_k_filter(logits, policy.top_k)
    logits = top_p_filter(logits, policy.top_p, policy.top_p_rule)
    return torch.log_softmax(logits, dim=-1)
