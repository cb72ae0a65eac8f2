"""Speed benchmark wiring: timings, compiled mode, JSON and the PNG chart."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dd2_eval.speed import BenchConfig, bar_chart_png, bench_pipeline, time_calls

CFG = BenchConfig(warmup=1, repeats=3, latency_batch=1, throughput_batch=4, compile_backend="eager")


def test_time_calls_counts_and_measures():
    calls = []
    first, times = time_calls(lambda: calls.append(1), warmup=2, repeats=5, device=torch.device("cpu"))
    assert len(calls) == 7 and len(times) == 5 and first >= 0 and all(t >= 0 for t in times)


def test_bench_pipeline_against_teacher(tmp_path, tiny_pipeline, tiny_teacher):
    report = bench_pipeline(tiny_pipeline, teacher=tiny_teacher, teacher_compiled=tiny_teacher, cfg=CFG, device="cpu")
    got = {(t.target, t.mode, t.batch_size) for t in report.timings}
    assert got == {(n, m, b) for n in ("dd2 one-step", "teacher AR") for m in ("eager", "compiled") for b in (1, 4)}
    for t in report.timings:
        assert len(t.times_s) == 3 and t.median_s > 0 and t.images_per_s == pytest.approx(t.batch_size / t.median_s)
    assert report.torch_version == torch.__version__ and report.device.startswith("cpu")

    report.write_json(tmp_path / "bench.json")
    assert json.loads((tmp_path / "bench.json").read_text())["timings"][0]["target"] == "dd2 one-step"
    bar_chart_png(report, tmp_path / "bench.png", latency_batch=1, throughput_batch=4)
    with Image.open(tmp_path / "bench.png") as img:
        assert img.format == "PNG" and img.width > 400 and img.height > 100
        assert len(img.convert("RGB").getcolors(1 << 16)) > 5  # bars and text were drawn
    assert "teacher AR" in report.table()


def test_teacher_compiled_is_skipped_with_a_note(tiny_pipeline, tiny_teacher):
    report = bench_pipeline(tiny_pipeline, teacher=tiny_teacher, cfg=CFG, device="cpu")
    assert {(t.target, t.mode) for t in report.timings} == {
        ("dd2 one-step", "eager"),
        ("dd2 one-step", "compiled"),
        ("teacher AR", "eager"),
    }
    assert any("not measured" in n for n in report.notes)


def test_teacher_compiled_note_says_why(tiny_pipeline, tiny_teacher):
    cfg = CFG.model_copy(update={"modes": ("compiled",), "repeats": 1})
    report = bench_pipeline(tiny_pipeline, teacher=tiny_teacher, cfg=cfg, teacher_compiled_note="no compiled step")
    assert report.notes == ["teacher AR compiled: not measured (no compiled step)"]


def test_inception_speed_bench_writes_its_json(inception_net, tmp_path):
    """packages/dd2-eval/bench/inception_speed.py on a few small images: the numbers it reports are consistent."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "inception_speed.py"
    spec = importlib.util.spec_from_file_location("inception_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "speed.json"
    assert bench.main(["--images", "5", "--batch", "2", "--size", "32", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 5 and result["spatial"] is True
    assert result["seconds_per_1000"] == pytest.approx(result["seconds"] * 200)
    assert result["images_per_s"] == pytest.approx(5 / result["seconds"])
