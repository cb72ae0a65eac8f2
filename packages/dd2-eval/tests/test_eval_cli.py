"""The dd2-eval command line: metrics --json, sample, bench, toy, and errors as exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

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


@pytest.fixture
def toy_ref(tmp_path) -> dict:
    """A teacher reference (teacher_ref.json) of a toy teacher with the tiny pipeline's 5 classes."""
    toy = pytest.importorskip("dd2_teachers.toy", reason="the teacher side of bench needs dd2-teachers")
    with torch.random.fork_rng(devices=[]):
        toy.ToyTeacher(toy.ToyTeacherConfig(codebook_size=4, num_tokens=3, num_classes=5, dim=16, heads=2)).save(
            tmp_path / "toy"
        )
    return {"family": "toy", "size": "toy", "ckpt": str(tmp_path / "toy"), "vq_ckpt": None, "policy": None}


def _bench_rows(tmp_path, capsys, *args: str) -> set[tuple[str, str, int]]:
    common = ["--out", str(tmp_path / "b"), "--repeats", "1", "--warmup", "0", "--throughput-batch", "2"]
    assert cli.main(["bench", *args, *common, "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (tmp_path / "b" / "bench.json").is_file() and (tmp_path / "b" / "bench.png").is_file()
    return {(t["target"], t["mode"], t["batch_size"]) for t in report["timings"]}


def test_bench_times_the_teacher_of_teacher_ref(tmp_path, pipeline_dir, toy_ref, capsys):
    (pipeline_dir / "teacher_ref.json").write_text(json.dumps(toy_ref))
    rows = _bench_rows(tmp_path, capsys, "--pipeline", str(pipeline_dir), "--modes", "eager")  # --teacher auto
    assert rows == {(target, "eager", b) for target in ("dd2 one-step", "teacher AR") for b in (1, 2)}
    rows = _bench_rows(tmp_path, capsys, "--pipeline", str(pipeline_dir), "--modes", "eager", "--teacher", "none")
    assert rows == {("dd2 one-step", "eager", 1), ("dd2 one-step", "eager", 2)}


def test_bench_teacher_from_a_file_and_its_errors(tmp_path, pipeline_dir, toy_ref, capsys, caplog):
    (tmp_path / "ref.json").write_text(json.dumps(toy_ref))
    args = ["--pipeline", str(pipeline_dir), "--modes", "eager", "--teacher", str(tmp_path / "ref.json")]
    assert ("teacher AR", "eager", 1) in _bench_rows(tmp_path, capsys, *args)
    (tmp_path / "ref.json").write_text(json.dumps(toy_ref | {"ckpt": str(tmp_path / "nope")}))
    assert cli.main(["bench", *args, "--device", "cpu"]) == 2
    assert "teacher ref 'ckpt': expected a toy teacher folder" in caplog.text
    (tmp_path / "ref.json").write_text(json.dumps(toy_ref | {"family": "gpt"}))
    assert cli.main(["bench", *args, "--device", "cpu"]) == 2
    assert "teacher ref 'family': expected one of" in caplog.text
    assert cli.main(["bench", *args[:-1], str(tmp_path / "missing.json"), "--device", "cpu"]) == 2
    assert "missing.json': no such file" in caplog.text


def test_bench_refuses_a_teacher_of_other_classes(tmp_path, pipeline_dir, toy_ref, caplog):
    from dd2_teachers.toy import ToyTeacher, ToyTeacherConfig

    ToyTeacher(ToyTeacherConfig(num_classes=3, dim=16, heads=2)).save(tmp_path / "toy3")
    (pipeline_dir / "teacher_ref.json").write_text(json.dumps(toy_ref | {"ckpt": str(tmp_path / "toy3")}))
    assert cli.main(["bench", "--pipeline", str(pipeline_dir), "--modes", "eager", "--device", "cpu"]) == 2
    assert "the teacher has 3 classes, the pipeline 5" in caplog.text


def test_bench_without_dd2_teachers(tmp_path, pipeline_dir, toy_ref, monkeypatch, capsys, caplog):
    monkeypatch.setattr("dd2_eval.teacher.entry_points", lambda group: [])  # as if dd2-teachers were not installed
    (pipeline_dir / "teacher_ref.json").write_text(json.dumps(toy_ref))
    rows = _bench_rows(tmp_path, capsys, "--pipeline", str(pipeline_dir), "--modes", "eager")
    assert {target for target, _, _ in rows} == {"dd2 one-step"}
    assert "only the pipeline is timed; timing the teacher needs dd2-teachers: pip install 'dd2-eval[teachers]'" in (
        caplog.text
    )
    args = ["bench", "--pipeline", str(pipeline_dir), "--teacher", str(pipeline_dir / "teacher_ref.json")]
    assert cli.main([*args, "--modes", "eager", "--device", "cpu"]) == 2
    assert "pip install 'dd2-eval[teachers]' (or packages/dd2-teachers)" in caplog.text


def test_compiled_teacher_only_for_families_with_a_compiled_step(tmp_path, pipeline_dir, toy_ref):
    import argparse

    (pipeline_dir / "teacher_ref.json").write_text(json.dumps(toy_ref))
    args = argparse.Namespace(teacher="auto", pipeline=pipeline_dir, random_init=None)
    teacher, compiled, note = cli._bench_teachers(args, ("eager", "compiled"), device="cpu", dtype=None)
    assert teacher.num_classes == 5 and compiled is None
    assert "the toy teacher has no compiled decode step" in note


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
