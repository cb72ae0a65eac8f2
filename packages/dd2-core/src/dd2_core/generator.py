"""The one-step generator G_theta (DD2 3.3, App. C.5).

The backbone reads the noise sequence shifted by one group ([class, eps_1, ..., eps_{n-1}] for LlamaGen: the
backbone does the shift itself), the head reads eps_i in the slot of the noisy token at t = 1, and the output is
one Euler step of the AR-diffusion flow from t = 1 to 0:

    q_i = eps_i - t_in * v(eps_i, t_in | f_i(class, eps_<i)),   t_in = 1  ->  q_i = eps_i - v

So all N tokens come from one backbone pass, and q_i depends on eps_<=i: the causal structure of DD1's noise->token
map. At initialisation (a copy of the GTS-tuned model A) this is exactly one Euler step of A's flow.

Options the paper does not state (defaults reproduce the plain form above):
    head_time    t fed to the head (1.0). At t = 1 model A's exact target is eps - E_p[c]: the initialised generator
                 outputs the conditional mean whatever eps_i is. At t ~ 0.4-0.5 A's head sees the noise as a partly
                 denoised token and its one Euler step is a noise-dependent, perturb-and-MAP-like pick of a code.
    noise_scale  the backbone reads noise_scale * eps (1.0). The backbone's input embedding was fitted on codes;
                 `codebook_noise_scale` matches the noise's norm (~sqrt(C)) to the codes' mean norm.
    class_cond   a zero-initialised class embedding added to the head's condition f_i (False): the class reaches
                 every position's head directly instead of only through the backbone's first token.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dd2_core.diffusion import ARDiffusion
from dd2_core.errors import DD2ValueError, expect_shape


def codebook_noise_scale(codebook: Tensor) -> float:
    """mean_j ||c_j|| / sqrt(C): scales N(0, I) noise (norm ~ sqrt(C)) to the codes' mean norm.  (V, C) -> float."""
    return float(codebook.float().norm(dim=-1).mean() / codebook.shape[1] ** 0.5)


class OneStepGenerator(nn.Module):
    """Wraps an ARDiffusion; forward(noise, labels) -> tokens in one backbone pass (options: module docstring)."""

    def __init__(
        self, model: ARDiffusion, head_time: float = 1.0, *, noise_scale: float = 1.0, class_cond: bool = False
    ):
        super().__init__()
        if not 0.0 < head_time <= 1.0:
            raise DD2ValueError(f"head_time: expected 0 < head_time <= 1, got {head_time}")
        if not noise_scale > 0.0:
            raise DD2ValueError(f"noise_scale: expected > 0, got {noise_scale}")
        self.model = model
        self.head_time = head_time  # t fed to the head; the paper does not state it, 1.0 matches noise at t = 1
        self.noise_scale = float(noise_scale)
        self.class_cond = class_cond
        if class_cond:
            bb = model.backbone
            self.class_embed = nn.Embedding(bb.num_classes + 1, bb.feature_dim)  # last row: null class
            nn.init.zeros_(self.class_embed.weight)  # starts as the plain generator

    @classmethod
    def from_ar_diffusion(
        cls, model: ARDiffusion, head_time: float = 1.0, *, noise_scale: float = 1.0, class_cond: bool = False
    ) -> OneStepGenerator:
        """A generator initialised as a deep copy of the (GTS-tuned) AR-diffusion model."""
        return cls(copy.deepcopy(model), head_time, noise_scale=noise_scale, class_cond=class_cond)

    def options(self) -> dict:
        """The constructor options (what a pipeline's config.json records)."""
        return {"head_time": self.head_time, "noise_scale": self.noise_scale, "class_cond": self.class_cond}

    @property
    def backbone(self):
        return self.model.backbone

    @property
    def head(self):
        return self.model.head

    def forward(self, noise: Tensor, labels: Tensor) -> Tensor:
        """Shapes: noise (B, N, C), labels (B,) -> tokens (B, N, C)."""
        return self.forward_with_features(noise, labels)[0]

    def forward_with_features(self, noise: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens and the head's condition f_i (for prefix-feature alignment).  -> (B, N, C), (B, N, D)."""
        bb = self.model.backbone
        expect_shape("noise", noise, (None, bb.num_tokens, bb.token_dim))
        f = bb(noise * self.noise_scale if self.noise_scale != 1.0 else noise, labels)  # (B, N, D): class, eps_<i
        if self.class_cond:
            f = f + self.class_embed(labels).unsqueeze(1).to(f.dtype)  # (B, N, D)
        t = torch.full((*noise.shape[:2], 1), self.head_time, device=noise.device, dtype=noise.dtype)
        v = self.model.head(noise, t, f)  # (B, N, C)
        return noise - t * v, f

    def sample_noise(self, batch: int, *, device=None, dtype=None, generator: torch.Generator | None = None) -> Tensor:
        """eps ~ N(0, I).  Shapes: -> (B, N, C)."""
        bb = self.model.backbone
        return torch.randn(batch, bb.num_tokens, bb.token_dim, device=device, dtype=dtype, generator=generator)
