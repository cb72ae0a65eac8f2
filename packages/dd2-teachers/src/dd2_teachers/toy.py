"""An enumerable toy teacher: a small causal transformer over a small codebook, with an exact joint distribution.

With V codes and N positions there are V^N sequences (8^4 = 4096), so the teacher's joint p_T can be computed
exactly by enumeration, and the distribution of a one-step generator can be compared with it in total variation.
The teacher reads **continuous** prefixes (a linear input embedding, like VAR's `word_embed`), so it can score the
generator's continuous outputs the way DD2's teachers do.

`synthetic_joint` builds a strongly correlated target: a Markov chain with peaked random transitions in which every
position also depends on the first one (a long-range dependency), so that sampling positions independently from
their marginals (one-step set prediction) is far from the joint.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn

from dd2_core.backbone import BackboneConfig, TransformerBackbone
from dd2_core.checkpoint import (
    atomic_write_bytes,
    check_shapes,
    load_strict,
    read_state_dict,
    safetensors_shapes,
    save_safetensors,
)
from dd2_core.diffusion import ARDiffusion
from dd2_core.errors import CheckpointError, DD2ValueError, expect_labels
from dd2_core.heads import HeadConfig, VelocityHead
from dd2_core.logits import SamplingPolicy, policy_log_probs

logger = logging.getLogger(__name__)


class ToyTeacherConfig(BaseModel):
    """Sizes of the toy teacher and of its codebook."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    codebook_size: int = Field(8, ge=2, description="V")
    token_dim: int = Field(2, ge=1, description="C")
    num_tokens: int = Field(4, ge=1, description="N")
    num_classes: int = Field(1, ge=1, description="real classes (1 = effectively unconditional)")
    dim: int = Field(64, ge=8, description="transformer width")
    depth: int = Field(2, ge=1, description="transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads")
    codebook_radius: float = Field(
        1.5, gt=0, description="C = 2: codes on a circle of this radius; else random codes scaled to it"
    )
    seed: int = Field(0, description="seed of the codebook and of the initial weights")
    policy: SamplingPolicy = Field(default_factory=SamplingPolicy, description="CFG / temperature / top-k / top-p")

    def backbone_config(self) -> BackboneConfig:
        return BackboneConfig(
            num_tokens=self.num_tokens,
            token_dim=self.token_dim,
            num_classes=self.num_classes,
            dim=self.dim,
            depth=self.depth,
            heads=self.heads,
        )


def make_codebook(cfg: ToyTeacherConfig) -> Tensor:
    """(V, C) codes: evenly spaced on a circle for C = 2, else seeded Gaussian codes normalised to the radius."""
    v, c, r = cfg.codebook_size, cfg.token_dim, cfg.codebook_radius
    if c == 2:
        ang = 2 * math.pi * torch.arange(v, dtype=torch.float64) / v
        return (r * torch.stack([ang.cos(), ang.sin()], dim=-1)).float()
    g = torch.Generator().manual_seed(cfg.seed + 1)
    codes = torch.randn(v, c, generator=g)
    return r * codes / codes.norm(dim=-1, keepdim=True)


class ToyTeacher(nn.Module):
    """Causal transformer teacher over continuous prefixes; implements dd2_core.teacher.Teacher."""

    def __init__(self, cfg: ToyTeacherConfig):
        super().__init__()
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.backbone = TransformerBackbone(cfg.backbone_config())
        self.output = nn.Linear(cfg.dim, cfg.codebook_size)
        self.register_buffer("codebook", make_codebook(cfg))
        self.num_tokens, self.num_classes = cfg.num_tokens, cfg.num_classes
        self.token_groups = (1,) * cfg.num_tokens
        self.policy = cfg.policy

    def logits(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced logits on continuous tokens.  Shapes: (B, N, C), (B,) -> (B, N, V)."""
        return self.output(self.backbone(tokens, labels))

    def log_probs(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """log p(q_i | q_<i) after the policy.  Shapes: tokens (B, N, C), labels (B,) -> (B, N, V)."""
        expect_labels("labels", labels, self.num_classes, allow_null=False, batch=tokens.shape[0])
        with torch.no_grad():
            cond = self.logits(tokens, labels)
            uncond = None
            if self.policy.uses_cfg:
                uncond = self.logits(tokens, torch.full_like(labels, self.num_classes))
            return policy_log_probs(cond, uncond, self.policy, self.token_groups)

    def embed(self, ids: Tensor) -> Tensor:
        """Shapes: ids (B, N) -> (B, N, C)."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.codebook_size):
            raise DD2ValueError(
                f"ids: expected values in [0, {self.cfg.codebook_size - 1}], got [{int(ids.min())}, {int(ids.max())}]"
            )
        return self.codebook[ids]

    @torch.no_grad()
    def sample(self, labels: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Ancestral sampling, one token per step (N is tiny, so no KV cache).  Shapes: (B,) -> ids (B, N)."""
        b = labels.shape[0]
        ids = torch.zeros(b, self.num_tokens, dtype=torch.long, device=labels.device)
        for i in range(self.num_tokens):
            p = self.log_probs(self.embed(ids), labels)[:, i].exp()  # (B, V), sees ids[:, :i] only
            ids[:, i] = torch.multinomial(p, 1, generator=generator).squeeze(-1)
        return ids

    @torch.no_grad()
    def exact_joint(self, label: int = 0, batch: int = 8192) -> Tensor:
        """p_T over all V^N sequences, in the order of `all_sequences`.  -> (V^N,) float64, sums to 1."""
        seqs = all_sequences(self.cfg.codebook_size, self.num_tokens, device=self.codebook.device)
        out = []
        for i in range(0, seqs.shape[0], batch):
            ids = seqs[i : i + batch]
            labels = torch.full((ids.shape[0],), label, dtype=torch.long, device=ids.device)
            lp = self.log_probs(self.embed(ids), labels).double()  # (b, N, V)
            out.append(lp.gather(-1, ids.unsqueeze(-1)).squeeze(-1).sum(-1).exp())
        return torch.cat(out)

    def save(self, folder: str | os.PathLike) -> None:
        """config.json + model.safetensors, each written atomically."""
        folder = Path(folder)
        atomic_write_bytes(folder / "config.json", self.cfg.model_dump_json(indent=1).encode())
        save_safetensors(self.state_dict(), folder / "model.safetensors")

    @classmethod
    def load(cls, folder: str | os.PathLike, *, device=None) -> ToyTeacher:
        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"toy teacher: expected {cfg_path} (written by ToyTeacher.save), found no such file"
            )
        try:
            cfg = ToyTeacherConfig.model_validate(json.loads(cfg_path.read_text()))
        except (ValueError, ValidationError) as e:  # truncated JSON, wrong types or values
            first = str(e).strip().splitlines()
            raise CheckpointError(
                f"toy teacher: {cfg_path} is not a valid ToyTeacherConfig: {' '.join(first[:3])}"
            ) from e
        weights = folder / "model.safetensors"
        expected = f"ToyTeacher {cfg.model_dump()} ({cfg_path})"
        with torch.device("meta"):  # sizes of config.json against the weights' header before allocating
            check_shapes(cls(cfg), safetensors_shapes(weights), expected=expected, source=str(weights))
        teacher = cls(cfg)
        load_strict(teacher, read_state_dict(weights), expected=expected, source=str(weights))
        return teacher.to(device).eval().requires_grad_(False)


def all_sequences(v: int, n: int, device=None) -> Tensor:
    """Every id sequence in lexicographic order.  -> (V^N, N) int64."""
    return torch.tensor(list(itertools.product(range(v), repeat=n)), dtype=torch.long, device=device)


def sequence_index(ids: Tensor, v: int) -> Tensor:
    """Lexicographic index of id sequences (inverse of all_sequences).  Shapes: (B, N) -> (B,)."""
    n = ids.shape[-1]
    weights = v ** torch.arange(n - 1, -1, -1, device=ids.device)
    return (ids * weights).sum(-1)


def synthetic_joint(v: int = 8, n: int = 4, *, sharpness: float = 3.0, seed: int = 0) -> Tensor:
    """A strongly correlated joint over V^N sequences (float64, sums to 1), in the order of `all_sequences`.

        p(q_1) = softmax(a z_1),   p(q_i | q_{i-1}, q_1) = softmax(a z_i[q_{i-1}, q_1])   for i >= 2

    z are seeded standard normal tables and a = `sharpness`: each position depends on its predecessor and, long range,
    on the first position.
    """
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(sharpness * torch.randn(v, generator=g, dtype=torch.float64), -1)  # (V,) over q_1
    for i in range(1, n):
        table = torch.softmax(
            sharpness * torch.randn(v, v, v, generator=g, dtype=torch.float64), -1
        )  # [prev, first, next]
        k = torch.arange(p.numel())  # lexicographic index of the prefix q_1..q_i
        first, last = k // v ** (i - 1), k % v
        p = (p.unsqueeze(-1) * table[last, first]).reshape(-1)  # (V^(i+1),)
    return p


def marginals(joint: Tensor, v: int, n: int) -> Tensor:
    """Per-position marginals of a joint over V^N sequences.  -> (N, V)."""
    p = joint.reshape([v] * n)
    return torch.stack([p.sum(dim=[d for d in range(n) if d != i]) for i in range(n)])


def product_of_marginals(joint: Tensor, v: int, n: int) -> Tensor:
    """The one-step set-prediction distribution: positions independent with the joint's exact marginals."""
    m = marginals(joint, v, n)
    out = m[0]
    for i in range(1, n):
        out = (out.unsqueeze(-1) * m[i]).reshape(-1)
    return out


def total_variation(p: Tensor, q: Tensor) -> float:
    """TV(p, q) = 0.5 * sum |p - q|."""
    return 0.5 * float((p.double() - q.double()).abs().sum())


def histogram(ids: Tensor, v: int) -> Tensor:
    """Empirical distribution of id sequences over V^N.  Shapes: (B, N) -> (V^N,) float64."""
    idx = sequence_index(ids, v)
    return torch.bincount(idx, minlength=v ** ids.shape[-1]).double() / ids.shape[0]


def fit_toy_teacher(
    teacher: ToyTeacher,
    joint: Tensor,
    *,
    steps: int = 1500,
    batch: int = 512,
    lr: float = 3e-3,
    generator: torch.Generator | None = None,
) -> float:
    """Fit the teacher to `joint` by AR cross-entropy on exact codes sampled from it; returns TV(p_T, joint).

    `joint` must be over V^N sequences of the teacher's size, for class 0.
    """
    v, n = teacher.cfg.codebook_size, teacher.num_tokens
    if joint.shape != (v**n,):
        raise DD2ValueError(f"joint: expected shape ({v**n},) for V={v}, N={n}, got {tuple(joint.shape)}")
    seqs = all_sequences(v, n)
    opt = torch.optim.AdamW(teacher.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    teacher.train()
    for _ in range(steps):
        ids = seqs[torch.multinomial(joint.float(), batch, replacement=True, generator=generator)]  # (B, N)
        labels = torch.zeros(batch, dtype=torch.long)
        logits = teacher.logits(teacher.embed(ids), labels)  # (B, N, V)
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    teacher.eval().requires_grad_(False)
    tv = total_variation(teacher.exact_joint(), joint)
    logger.info("toy teacher fitted: final loss %.4f, TV(p_T, data) %.4f", loss.item(), tv)
    return tv


def ar_diffusion_from_teacher(teacher: ToyTeacher, head_cfg: HeadConfig) -> ARDiffusion:
    """AR-diffusion model initialised from the teacher: its backbone weights (copied) and a fresh velocity head."""
    backbone = TransformerBackbone(teacher.cfg.backbone_config())
    backbone.load_state_dict(teacher.backbone.state_dict())
    return ARDiffusion(backbone, VelocityHead(head_cfg)).to(teacher.codebook.device)
