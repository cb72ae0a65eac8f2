"""Toy feature space: IDX parsing, input conversion, and (with the Debian dataset) the trained CNN's metrics."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from dd2_eval.errors import EvalError, MissingResourceError, NpzFormatError
from dd2_eval.toy import (
    FASHION_MNIST_DIR,
    ToyFeatureConfig,
    ToyFeatureSpace,
    load_fashion_mnist,
    load_toy_net,
    read_idx,
    toy_input,
)


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def test_read_idx_gz_and_raw(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "a.gz", images, gz=True)
    _write_idx(tmp_path / "b", images, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), images)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + bytes(8))
    with pytest.raises(NpzFormatError, match="expected a uint8 IDX header"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "b").read_bytes()[:-10])
    with pytest.raises(NpzFormatError, match=r"header promises \(5, 28, 28\)"):
        read_idx(tmp_path / "short")


def test_data_folder_and_missing_data(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([3, 1, 4, 1]), gz=True)
    x, y = load_fashion_mnist("test", tmp_path)
    np.testing.assert_array_equal(x, images)
    assert y.tolist() == [3, 1, 4, 1] and y.dtype == np.int64
    with pytest.raises(MissingResourceError, match="sudo apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_toy_input_conversions():
    grey = np.random.default_rng(2).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    x = toy_input(grey)
    assert x.shape == (3, 1, 28, 28) and float(x.min()) >= -0.5 and float(x.max()) <= 0.5
    torch.testing.assert_close(toy_input(np.repeat(grey[..., None], 3, axis=-1)), x)  # grey stored as RGB
    torch.testing.assert_close(toy_input(grey[..., None]), x)
    assert toy_input(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 1, 28, 28)


@pytest.fixture(scope="module")
def toy_space(tmp_path_factory):
    if not FASHION_MNIST_DIR.is_dir():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST_DIR} (sudo apt-get install dataset-fashion-mnist)")
    cfg = ToyFeatureConfig(train_images=2000, epochs=2, seed=0)
    cache = tmp_path_factory.mktemp("toy_cache")
    net = load_toy_net(cfg, cache=cache)
    assert len(list(cache.glob("fmnist_cnn_*.safetensors"))) == 1
    again = load_toy_net(cfg, cache=cache)  # from the cache this time
    for (k, v), (_, w) in zip(net.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, w), k
    return ToyFeatureSpace(net)


@pytest.mark.slow
def test_toy_metrics_separate_real_noisy_and_collapsed(toy_space):
    test_images, test_labels = load_fashion_mnist("test")
    assert toy_space.accuracy(test_images[:1000], test_labels[:1000]) > 0.5  # chance: 0.1
    ref, real = test_images[:600], test_images[600:1200]
    kw = dict(kid_subsets=10, kid_subset_size=300)
    m_real = toy_space.metrics(real, ref, **kw)
    noisy = np.clip(real + np.random.default_rng(0).normal(0, 60, real.shape), 0, 255).astype(np.uint8)
    m_noisy = toy_space.metrics(noisy, ref, **kw)
    m_collapsed = toy_space.metrics(np.repeat(real[:30], 20, axis=0), ref, **kw)
    assert m_real.fd < m_noisy.fd and m_real.kid < m_noisy.kid
    assert m_real.recall > 0.7 and m_real.coverage > 0.7
    assert m_collapsed.recall < 0.1 < m_real.recall and m_collapsed.coverage < m_real.coverage / 2  # only recall-
    assert m_collapsed.precision > 0.7  # and coverage-type metrics see collapse
    assert 1.0 <= m_real.classifier_is <= 10.0
    cached = toy_space.reference(ref)  # features and radii once, for many methods: the same numbers
    assert len(cached) == len(ref)
    assert toy_space.metrics(noisy, cached, **kw) == m_noisy and toy_space.metrics(real, cached, **kw) == m_real
    with pytest.raises(EvalError, match="reference: built for k = 3, coverage_k = 5; metrics asked for k = 4"):
        toy_space.metrics(real, cached, k=4, **kw)
