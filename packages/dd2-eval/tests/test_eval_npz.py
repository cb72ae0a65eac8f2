"""ADM .npz round trips, streaming, and clear errors for wrong layouts and damaged files."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from dd2_eval.errors import MissingResourceError, NpzFormatError
from dd2_eval.fid import FeatureStats
from dd2_eval.npz import (
    NpzImageWriter,
    images_entry,
    iter_images,
    read_images,
    read_labels,
    read_reference,
    write_images,
    write_reference,
)


def _images(n: int = 7, h: int = 5, w: int = 6, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_sample_batch_round_trip_and_adm_compatibility(tmp_path):
    images, labels = _images(), np.arange(7) % 3
    path = tmp_path / "samples.npz"
    write_images(path, images, labels)
    np.testing.assert_array_equal(read_images(path), images)
    np.testing.assert_array_equal(read_labels(path), labels)
    with np.load(path) as data:  # what ADM's evaluator and np.load see
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (7, 5, 6, 3)
        np.testing.assert_array_equal(data["arr_0"], images)


def test_reads_files_written_by_np_savez_and_savez_compressed(tmp_path):
    images = _images(9)
    np.savez(tmp_path / "a.npz", images)
    np.savez_compressed(tmp_path / "b.npz", arr_0=images)
    for name in ("a.npz", "b.npz"):
        batches = list(iter_images(tmp_path / name, batch_size=4))
        assert [len(b) for b in batches] == [4, 4, 1]
        np.testing.assert_array_equal(np.concatenate(batches), images)
    assert read_labels(tmp_path / "a.npz") is None


def test_streaming_writer_equals_one_shot_and_is_atomic(tmp_path):
    images = _images(10)
    path = tmp_path / "streamed.npz"
    with NpzImageWriter(path, num_images=10) as writer:
        for start in range(0, 10, 3):
            writer.write(images[start : start + 3], np.full(len(images[start : start + 3]), start))
            assert not path.exists()  # nothing at the final path until close()
    np.testing.assert_array_equal(read_images(path), images)
    np.testing.assert_array_equal(read_labels(path), np.repeat([0, 3, 6, 9], [3, 3, 3, 1]))

    with (
        pytest.raises(NpzFormatError, match="wrote 3 images, expected num_images=10"),
        NpzImageWriter(tmp_path / "short.npz", num_images=10) as writer,
    ):
        writer.write(images[:3])
    assert list(tmp_path.glob("short*")) == [] and list(tmp_path.glob(".short*")) == []
    with (
        pytest.raises(NpzFormatError, match="every batch must be 5x6"),
        NpzImageWriter(tmp_path / "mixed.npz", num_images=4) as writer,
    ):
        writer.write(images[:2])
        writer.write(_images(2, h=4))


def test_reference_batch_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    stats = FeatureStats(rng.standard_normal(6), a @ a.T)
    stats_s = FeatureStats(rng.standard_normal(3), np.eye(3))
    write_reference(tmp_path / "ref.npz", stats, stats_s, _images(4))
    ref = read_reference(tmp_path / "ref.npz")
    np.testing.assert_array_equal(ref.stats.mu, stats.mu)
    np.testing.assert_array_equal(ref.stats.sigma, stats.sigma)
    np.testing.assert_array_equal(ref.stats_spatial.sigma, np.eye(3))
    assert ref.images.shape == (4, 5, 6, 3)
    with np.load(tmp_path / "ref.npz") as data:
        assert sorted(data.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]

    write_reference(tmp_path / "stats_only.npz", stats)
    only = read_reference(tmp_path / "stats_only.npz")
    assert only.stats_spatial is None and only.images is None


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((2, 3, 8, 8), np.float32), r"looks like NCHW; convert with x.transpose\(0, 2, 3, 1\)"),
        (np.zeros((2, 8, 8, 3), np.float32), r"expected dtype uint8 .* got float32 .*np.clip\(np.rint\(x \* 255\)"),
        (np.zeros((2, 8, 8, 1), np.uint8), r"greyscale; repeat the channel"),
        (np.zeros((8, 8, 3), np.uint8), r"got shape \(8, 8, 3\) \(one image\? add a batch axis"),
        (np.zeros((0, 8, 8, 3), np.uint8), r"at least one image"),
    ],
)
def test_wrong_layouts_are_refused_with_a_hint(tmp_path, array, match):
    path = tmp_path / "bad.npz"
    np.savez(path, arr_0=array)
    with pytest.raises(NpzFormatError, match=match):
        next(iter_images(path))
    with pytest.raises(NpzFormatError, match=match):
        write_images(tmp_path / "out.npz", array)


def test_missing_corrupt_and_truncated_files(tmp_path):
    with pytest.raises(MissingResourceError, match="no such file") as e:
        read_images(tmp_path / "nope.npz")
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(NpzFormatError, match="expected an .npz file, got the folder"):
        read_images(tmp_path)

    (tmp_path / "junk.npz").write_bytes(b"definitely not a zip archive" * 10)
    with pytest.raises(NpzFormatError, match=r"not a valid .npz \(zip\) archive"):
        read_images(tmp_path / "junk.npz")

    np.save(tmp_path / "bare.npy", _images(2))
    with pytest.raises(NpzFormatError, match="bare .npy array: wrap it with np.savez"):
        read_images(tmp_path / "bare.npy")

    good = tmp_path / "good.npz"
    write_images(good, _images(50, 16, 16))
    data = good.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(NpzFormatError, match="not a valid .npz"):
        read_images(tmp_path / "cut.npz")

    # flip bytes inside the stored pixels: the zip's CRC check fails while streaming
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    with pytest.raises(NpzFormatError, match="corrupt data in arr_0.npy"):
        read_images(tmp_path / "flipped.npz")

    # a header that promises more images than the member holds
    with zipfile.ZipFile(tmp_path / "short.npz", "w") as zf, zf.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (5, 4, 4, 3)})
        f.write(bytes(2 * 4 * 4 * 3))
    with pytest.raises(NpzFormatError, match="truncated: the header promises 5 images of 4x4x3"):
        read_images(tmp_path / "short.npz")


def test_wrong_keys_and_statistics(tmp_path):
    np.savez(tmp_path / "keys.npz", images=_images(2))
    with pytest.raises(NpzFormatError, match=r"expected images under key 'arr_0' .* found keys \['images'\]"):
        images_entry(tmp_path / "keys.npz")
    with pytest.raises(NpzFormatError, match=r"expected statistics \(mu, sigma\) or images"):
        read_reference(tmp_path / "keys.npz")

    np.savez(tmp_path / "half.npz", mu=np.zeros(4))
    with pytest.raises(NpzFormatError, match="has 'mu' but not 'sigma'"):
        read_reference(tmp_path / "half.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(4), sigma=np.eye(5))
    with pytest.raises(
        NpzFormatError, match=r"expected mu \(D,\) and sigma \(D, D\), got mu \(4,\) and sigma \(5, 5\)"
    ):
        read_reference(tmp_path / "shape.npz")
    np.savez(tmp_path / "nan.npz", mu=np.full(2, np.nan), sigma=np.eye(2))
    with pytest.raises(NpzFormatError, match="NaN or inf"):
        read_reference(tmp_path / "nan.npz")
    np.savez(tmp_path / "labels.npz", arr_0=_images(2), arr_1=np.zeros((2, 2)))
    with pytest.raises(NpzFormatError, match=r"expected integer labels \(N,\)"):
        read_labels(tmp_path / "labels.npz")
