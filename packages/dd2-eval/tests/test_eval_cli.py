"""The dd2-eval command line: metrics --json, sample, bench, toy, and errors as exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dd2_eval import cli
from dd2_eval.npz import read_images, read_labels, read_reference, write_images


@pytest.fixture
def pipeline_dir(tmp_path, tiny_pipeline, monkeypatch):
    folder = tmp_path / "pipe"
    folder.mkdir()
    (folder / "config.json").write_text('{"kind": "tiny"}')
    monkeypatch.setattr("dd2_eval.sample.load_pipeline", lambda path, device=None, dtype=None: tiny_pipeline)
    return folder


def test_reference_and_metrics_json(tmp_path, tiny_inception, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    write_images(tmp_path / "s.npz", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    write_images(tmp_path / "r.npz", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    monkeypatch.setattr("dd2_eval.evaluator.load_inception", lambda weights, device: tiny_inception)
    common = ["--device", "cpu", "--no-progress"]
    assert cli.main(["reference", str(tmp_path / "r.npz"), str(tmp_path / "ref.npz"), "--keep-images", *common]) == 0
    ref = read_reference(tmp_path / "ref.npz")
    assert ref.stats.dim == 32 and ref.stats_spatial.dim == 63 and ref.images.shape == (4, 16, 16, 3)
    args = ["metrics", str(tmp_path / "s.npz"), str(tmp_path / "ref.npz"), "--json", *common]
    assert cli.main([*args, "--kid-subsets", "2", "--kid-subset-size", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"fid", "sfid", "inception_score", "precision", "recall", "kid", "unavailable"}
    assert out["inception_score"] is None and "1008-way" in out["unavailable"]["inception_score"]
    assert isinstance(out["fid"], float) and isinstance(out["sfid"], float) and 0 <= out["precision"] <= 1


def test_sample_command(tmp_path, pipeline_dir):
    out = tmp_path / "samples.npz"
    args = ["sample", "--pipeline", str(pipeline_dir), "--out", str(out), "--per-class", "2", "--no-progress"]
    assert cli.main([*args, "--chunk-size", "4", "--device", "cpu"]) == 0
    assert read_images(out).shape == (10, 8, 8, 3) and np.bincount(read_labels(out)).tolist() == [2] * 5


def test_bench_command(tmp_path, pipeline_dir, capsys):
    args = ["bench", "--pipeline", str(pipeline_dir), "--out", str(tmp_path / "b"), "--modes", "eager", "--json"]
    assert cli.main([*args, "--warmup", "1", "--repeats", "2", "--throughput-batch", "4", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(t["mode"], t["batch_size"]) for t in report["timings"]] == [("eager", 1), ("eager", 4)]
    assert (tmp_path / "b" / "bench.json").is_file() and (tmp_path / "b" / "bench.png").stat().st_size > 1000


def test_toy_command(tmp_path, monkeypatch, capsys):
    import torch

    from dd2_eval.toy import ToyFeatureNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ToyFeatureNet().eval()
    monkeypatch.setattr("dd2_eval.toy.load_toy_net", lambda **kw: net)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "s.npz", arr_0=rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), arr_1=np.arange(12) % 10)
    write_images(tmp_path / "r.npz", rng.integers(0, 256, (12, 28, 28, 3), dtype=np.uint8))
    assert cli.main(["toy", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"fd", "precision", "recall", "coverage", "class_accuracy"} <= set(out)


def test_errors_are_exit_code_2(tmp_path, caplog):
    assert cli.main(["metrics", str(tmp_path / "missing.npz"), str(tmp_path / "r.npz"), "--device", "cpu"]) == 2
    assert "no such file" in caplog.text
    assert cli.main(["sample", "--pipeline", str(tmp_path), "--device", "cpu"]) == 2
    assert "expected a pipeline folder with config.json" in caplog.text
    assert cli.main(["sample", "--pipeline", str(tmp_path), "--per-class", "0"]) == 2
    assert "per_class" in caplog.text
    with pytest.raises(SystemExit):
        cli.main(["metrics", "--help"])
