"""The one-step generator G_theta (DD2 3.3, App. C.5).

The backbone reads the noise sequence shifted by one group ([class, eps_1, ..., eps_{n-1}] for LlamaGen: the
backbone does the shift itself), the head reads eps_i in the slot of the noisy token at t = 1, and the output is
one Euler step of the AR-diffusion flow from t = 1 to 0:

    q_i = eps_i - t_in * v(eps_i, t_in | f_i(class, eps_<i)),   t_in = 1  ->  q_i = eps_i - v

So all N tokens come from one backbone pass, and q_i depends on eps_<=i: the causal structure of DD1's noise->token
map. At initialisation (a copy of the GTS-tuned model A) this is exactly one Euler step of A's flow.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dd2_core.diffusion import ARDiffusion
from dd2_core.errors import expect_shape


class OneStepGenerator(nn.Module):
    """Wraps an ARDiffusion; forward(noise, labels) -> tokens in one backbone pass."""

    def __init__(self, model: ARDiffusion, head_time: float = 1.0):
        super().__init__()
        self.model = model
        self.head_time = head_time  # t fed to the head; the paper does not state it, 1.0 matches noise at t = 1

    @classmethod
    def from_ar_diffusion(cls, model: ARDiffusion, head_time: float = 1.0) -> OneStepGenerator:
        """A generator initialised as a deep copy of the (GTS-tuned) AR-diffusion model."""
        return cls(copy.deepcopy(model), head_time=head_time)

    @property
    def backbone(self):
        return self.model.backbone

    @property
    def head(self):
        return self.model.head

    def forward(self, noise: Tensor, labels: Tensor) -> Tensor:
        """Shapes: noise (B, N, C), labels (B,) -> tokens (B, N, C)."""
        bb = self.model.backbone
        expect_shape("noise", noise, (None, bb.num_tokens, bb.token_dim))
        f = bb(noise, labels)  # (B, N, D): position i sees class and eps of earlier groups
        t = torch.full((*noise.shape[:2], 1), self.head_time, device=noise.device, dtype=noise.dtype)
        v = self.model.head(noise, t, f)  # (B, N, C)
        return noise - t * v

    def sample_noise(self, batch: int, *, device=None, dtype=None, generator: torch.Generator | None = None) -> Tensor:
        """eps ~ N(0, I).  Shapes: -> (B, N, C)."""
        bb = self.model.backbone
        return torch.randn(batch, bb.num_tokens, bb.token_dim, device=device, dtype=dtype, generator=generator)
