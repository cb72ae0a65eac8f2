"""ARDiffusion: a causal backbone plus a per-token velocity head (the MAR-style AR-diffusion model of DD2 3.3).

Used three ways (DD2 Fig. 5): tuned from the teacher with GTS it is model A; copies of A are the guidance
network psi (trained with FCS) and the inside of the one-step generator.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dd2_core.backbone import Backbone
from dd2_core.errors import DD2ValueError
from dd2_core.heads import VelocityHead
from dd2_core.sampling import nearest_code, time_grid
from dd2_core.teacher import group_slices


class ARDiffusion(nn.Module):
    """backbone(tokens, labels) -> f (B, N, D);  head(x_t, t, f) -> v (B, N, C)."""

    def __init__(self, backbone: Backbone, head: VelocityHead):
        super().__init__()
        if head.cfg.token_dim != backbone.token_dim or head.cfg.cond_dim != backbone.feature_dim:
            raise DD2ValueError(
                "head: expected token_dim/cond_dim = backbone token_dim/feature_dim = "
                f"{backbone.token_dim}/{backbone.feature_dim}, got {head.cfg.token_dim}/{head.cfg.cond_dim}"
            )
        self.backbone = backbone
        self.head = head

    @property
    def token_groups(self) -> tuple[int, ...]:
        return self.backbone.token_groups

    def features(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Causal features; position i sees labels and tokens of earlier groups.  (B, N, C), (B,) -> (B, N, D)."""
        return self.backbone(tokens, labels)

    def forward(self, x_t: Tensor, t: Tensor, tokens: Tensor, labels: Tensor) -> Tensor:
        """Velocity at every position given the clean prefix `tokens`.

        Shapes: x_t (B, N, C), t (B, N, 1), tokens (B, N, C), labels (B,) -> v (B, N, C).
        """
        return self.head(x_t, t, self.features(tokens, labels))

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor,
        *,
        steps: int = 10,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        power: float = 2.0,
        snap_codebook: Tensor | None = None,
    ) -> Tensor:
        """AR-diffusion sampling: group by group, integrate the head's flow from t = 1 to 0 with `steps` Euler steps.

        The steps sit on the teacher flow's grid t_k = (1 - k / steps)^power (`dd2_core.sampling.time_grid`; power 1
        is a uniform grid). With `snap_codebook` (V, C) each finished group is snapped to its nearest codes before
        later groups condition on it (and returned snapped), like the teacher's own flow map.
        Shapes: labels (B,) -> tokens (B, N, C). `noise` (B, N, C) fixes the starting points.
        """
        bb = self.backbone
        b = labels.shape[0]
        device = labels.device
        dtype = next(self.parameters()).dtype
        if noise is None:
            noise = torch.randn(b, bb.num_tokens, bb.token_dim, device=device, generator=generator, dtype=dtype)
        tokens = torch.zeros_like(noise)
        times = time_grid(steps, power=power, device=device).to(dtype)
        for sl in group_slices(bb.token_groups):
            f = self.features(tokens, labels)[:, sl]  # (B, n_g, D): depends only on earlier groups
            x = noise[:, sl]
            for k in range(steps):
                t = times[k].expand(*x.shape[:2], 1)
                x = x + (times[k + 1] - times[k]) * self.head(x, t, f)  # dx = v dt, dt < 0
            if snap_codebook is not None:
                cb = snap_codebook.to(device=x.device, dtype=x.dtype)
                x = cb[nearest_code(x, cb)]
            tokens[:, sl] = x
        return tokens
