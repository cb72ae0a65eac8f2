"""The ADM-style evaluator end to end on a handful of images, with a tiny stand-in feature network (the plumbing;
the Inception network and its weights are checked in test_eval_inception, the Fréchet maths in test_eval_fid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dd2_eval.errors import EvalError
from dd2_eval.evaluator import IS_NA_REASON, EvalConfig, evaluate, write_reference_stats
from dd2_eval.fid import frechet_distance
from dd2_eval.inception import InceptionExtractor
from dd2_eval.inception_score import inception_score
from dd2_eval.npz import read_reference, write_images, write_reference
from dd2_eval.precision_recall import precision_recall

CFG = EvalConfig(kid_subsets=3, kid_subset_size=4, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_inception):
    """4 sample and 4 reference images (24x24) as ADM batches, their features, and one full evaluation."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("batches")
    samples = rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    reference = np.clip(rng.normal(128, 40, (4, 24, 24, 3)), 0, 255).astype(np.uint8)
    write_images(folder / "samples.npz", samples)
    write_images(folder / "reference.npz", reference)
    head = torch.randn(1008, 32, generator=torch.Generator().manual_seed(0))
    torch.save({"fc.weight": head}, folder / "head.pth")
    ext = InceptionExtractor(tiny_inception, is_head=head)
    feats = {"samples": ext.extract([samples]), "reference": ext.extract([reference])}
    cfg = EvalConfig.model_validate(CFG.model_dump() | {"is_head": folder / "head.pth"})
    report = evaluate(folder / "samples.npz", folder / "reference.npz", cfg, net=tiny_inception)
    return folder, feats, report


def test_all_metrics_from_images(setup):
    _, feats, report = setup
    f_s, f_r = feats["samples"], feats["reference"]
    assert report.fid == pytest.approx(frechet_distance(f_s.stats, f_r.stats), rel=1e-9)
    pr = precision_recall(f_r.pool3, f_s.pool3)
    assert (report.precision, report.recall) == (pr.precision, pr.recall)
    assert report.inception_score == pytest.approx(inception_score(f_s.logits).mean, rel=1e-9)
    assert report.sfid is not None and report.kid is not None
    assert report.num_samples == 4 and report.num_reference_images == 4
    assert report.unavailable == {} and "n/a" not in report.table()


def test_reference_statistics_file_and_na_reasons(setup, tiny_inception, tmp_path):
    folder, feats, full = setup
    write_reference_stats(folder / "reference.npz", tmp_path / "ref_stats.npz", CFG, net=tiny_inception)
    ref = read_reference(tmp_path / "ref_stats.npz")
    assert ref.images is None and ref.stats.dim == 32 and ref.stats_spatial.dim == 63
    np.testing.assert_allclose(ref.stats.sigma, feats["reference"].stats.sigma, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ref.stats_spatial.mu, feats["reference"].stats_spatial.mu, rtol=1e-6, atol=1e-9)

    stats_only = evaluate(folder / "samples.npz", tmp_path / "ref_stats.npz", CFG, net=tiny_inception)
    assert stats_only.fid == pytest.approx(full.fid, rel=1e-6) and stats_only.sfid == pytest.approx(full.sfid, rel=1e-6)
    assert stats_only.inception_score is None and stats_only.unavailable["inception_score"] == IS_NA_REASON
    assert stats_only.precision is None and "reference batch has no arr_0" in stats_only.unavailable["precision"]
    assert "n/a (IS needs the 1008-way" in stats_only.table()

    # statistics on both sides, no spatial statistics for the samples: FID only, every other metric says why not
    write_reference(tmp_path / "sample_stats.npz", feats["samples"].stats)
    cfg = EvalConfig.model_validate(CFG.model_dump() | {"is_head": folder / "head.pth"})
    only_fid = evaluate(tmp_path / "sample_stats.npz", tmp_path / "ref_stats.npz", cfg, net=tiny_inception)
    assert only_fid.fid == pytest.approx(full.fid, rel=1e-6) and only_fid.num_samples is None
    assert only_fid.unavailable["sFID"] == "the sample batch has neither mu_s/sigma_s nor images"
    assert only_fid.unavailable["inception_score"] == "the sample batch has no images (arr_0)"


def test_wrong_statistics_and_files_are_refused_before_any_inception_work(setup, tmp_path):
    folder, _, _ = setup

    class NoNet:  # evaluate must fail on the files before it touches the network
        def to(self, device):
            raise AssertionError("the network was used")

    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(EvalError, match=r"mu/sigma has dimension 64, expected 2048 \(Inception pool3 statistics\)"):
        evaluate(folder / "samples.npz", tmp_path / "small.npz", CFG, net=NoNet())
    np.savez(tmp_path / "spatial.npz", mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(3), sigma_s=np.eye(3))
    with pytest.raises(EvalError, match="mu_s/sigma_s has dimension 3, expected 2023"):
        evaluate(folder / "samples.npz", tmp_path / "spatial.npz", CFG, net=NoNet())
    with pytest.raises(FileNotFoundError, match="no such file"):
        evaluate(folder / "samples.npz", tmp_path / "missing.npz", CFG, net=NoNet())
