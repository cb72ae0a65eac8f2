"""Regenerate inception_regression.npz: four synthetic 64x64 images and their pool3 / sFID features.

Run from the repository root with the offline weights installed:
    .venv/bin/python packages/dd2-eval/tests/data/make_inception_fixture.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dd2_eval.inception import WEIGHTS_SHA256, InceptionExtractor, load_inception


def synthetic_images(size: int = 64) -> np.ndarray:
    """Shapes: -> uint8 (4, size, size, 3): a colour gradient, a disc, a checkerboard, smooth noise."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    gradient = np.stack([x, y, 1 - x * y], -1)
    disc = (((x - 0.4) ** 2 + (y - 0.6) ** 2) < 0.08)[..., None] * np.array([0.9, 0.3, 0.1]) + 0.05
    checker = ((np.floor(x * 8) + np.floor(y * 8)) % 2)[..., None] * np.array([0.2, 0.8, 0.6]) + 0.1
    rng = np.random.default_rng(0)
    coarse = rng.uniform(size=(8, 8, 3))
    noise = np.kron(coarse, np.ones((size // 8, size // 8, 1)))
    images = np.stack([gradient, disc, checker, noise])
    return np.clip(np.rint(images * 255), 0, 255).astype(np.uint8)


def main() -> None:
    torch.set_num_threads(2)
    images = synthetic_images()
    out = InceptionExtractor(load_inception())(images)
    path = Path(__file__).with_name("inception_regression.npz")
    np.savez_compressed(
        path,
        arr_0=images,
        pool3=out.pool3.numpy(),
        spatial=out.spatial.numpy(),
        weights_sha256=np.array(WEIGHTS_SHA256),
        torch_version=np.array(torch.__version__),
    )
    print(f"wrote {path}: pool3 {tuple(out.pool3.shape)}, spatial {tuple(out.spatial.shape)}")


if __name__ == "__main__":
    main()
