"""Sampling a pipeline into an ADM sample batch: balanced labels, determinism, resume, sharding, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dd2_eval.errors import EvalError
from dd2_eval.npz import read_images, read_labels
from dd2_eval.sample import SampleConfig, parts_dir, sample_labels, sample_to_npz

CFG = SampleConfig(per_class=3, batch_size=4, chunk_size=6, seed=7)  # 5 classes -> 15 images, 3 chunks


def test_writes_balanced_adm_sample_batch(tmp_path, tiny_pipeline):
    out = sample_to_npz(tiny_pipeline, tmp_path / "s.npz", CFG, progress=False)
    assert out == tmp_path / "s.npz" and not parts_dir(out).exists()
    images, labels = read_images(out), read_labels(out)
    assert images.shape == (15, 8, 8, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [3] * 5
    assert not np.array_equal(labels, np.sort(labels))  # shuffled, so every IS split sees all classes
    np.testing.assert_array_equal(labels, sample_labels(5, CFG))
    # each image is what the pipeline gives for its label and its batch's seed (not a constant)
    assert len({images[i].tobytes() for i in range(15)}) == 15


def test_resume_after_interruption_gives_identical_file(tmp_path, tiny_pipeline):
    reference = sample_to_npz(tiny_pipeline, tmp_path / "ref.npz", CFG, progress=False)

    class Crashing:
        num_classes, calls = tiny_pipeline.num_classes, 0

        def __call__(self, labels, *, seed=None, generator=None):
            Crashing.calls += 1
            if Crashing.calls > 3:  # dies inside the second chunk
                raise KeyboardInterrupt
            return tiny_pipeline(labels, seed=seed)

    out = tmp_path / "resumed.npz"
    with pytest.raises(KeyboardInterrupt):
        sample_to_npz(Crashing(), out, CFG, progress=False)
    assert sorted(p.name for p in parts_dir(out).glob("chunk_*.npz")) == ["chunk_00000.npz"] and not out.exists()
    sample_to_npz(tiny_pipeline, out, CFG, progress=False)
    np.testing.assert_array_equal(read_images(out), read_images(reference))
    np.testing.assert_array_equal(read_labels(out), read_labels(reference))


def test_sharded_ranks_then_rank0_assembles(tmp_path, tiny_pipeline):
    single = sample_to_npz(tiny_pipeline, tmp_path / "single.npz", CFG, progress=False)
    out = tmp_path / "sharded.npz"
    ranks = [SampleConfig.model_validate(CFG.model_dump() | {"rank": r, "world_size": 2}) for r in (0, 1)]
    assert sample_to_npz(tiny_pipeline, out, ranks[0], progress=False) is None  # chunk 1 missing
    assert sample_to_npz(tiny_pipeline, out, ranks[1], progress=False) is None  # only rank 0 assembles
    assert sample_to_npz(tiny_pipeline, out, ranks[0], progress=False) == out
    np.testing.assert_array_equal(read_images(out), read_images(single))


def test_refuses_to_mix_runs_and_bad_outputs(tmp_path, tiny_pipeline):
    out = tmp_path / "s.npz"
    parts = parts_dir(out)
    parts.mkdir()
    (parts / "manifest.json").write_text('{"version": 1, "seed": 99}')
    with pytest.raises(EvalError, match="holds chunks of a different sampling run"):
        sample_to_npz(tiny_pipeline, out, CFG, progress=False)

    class FloatImages:
        num_classes = 5

        def __call__(self, labels, *, seed=None, generator=None):
            return torch.zeros(len(labels), 3, 8, 8)

    with pytest.raises(EvalError, match=r"expected a uint8 tensor \(B, H, W, 3\), got torch.float32 \(4, 3, 8, 8\)"):
        sample_to_npz(FloatImages(), tmp_path / "f.npz", CFG, progress=False)
    with pytest.raises(EvalError, match=r"classes: expected distinct ids in \[0, 4\]"):
        sample_to_npz(tiny_pipeline, tmp_path / "c.npz", SampleConfig(classes=(1, 7)), progress=False)
    with pytest.raises(ValueError, match="need rank < world_size"):
        SampleConfig(rank=2, world_size=2)
