"""`dd2-eval bench --random-init`: pipelines and teachers at a size with random weights, the bench's JSON schema,
speed-ups and chart (on the tiny sizes, so that every code path of the GPU benchmark runs on CPU in seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from dd2_eval import cli
from dd2_eval.random_init import RANDOM_INIT_SIZES, parameter_count, random_pipeline
from dd2_eval.speed import BenchReport

pytest.importorskip("dd2_teachers", reason="the teacher side of bench needs dd2-teachers")

TIMING_KEYS = {"target", "mode", "batch_size", "median_s", "images_per_s", "first_call_s", "times_s", "decode", "cpu_s"}
SPEEDUP_KEYS = {"batch_size", "decode", "one_step_mode", "teacher_mode", "one_step_ms", "teacher_ms", "speedup",
                "speedup_cpu_time"}  # fmt: skip


def test_released_sizes_match_the_teacher_sizes():
    """The one-step backbone of each released size is its teacher's transformer (same layers and width)."""
    from dd2_core.models.llamagen import LLAMAGEN_PRESETS

    for name, preset in (("llamagen-b", "GPT-B"), ("llamagen-l", "GPT-L")):
        spec = RANDOM_INIT_SIZES[name]
        want = LLAMAGEN_PRESETS[preset]()
        assert (spec.backbone["n_layer"], spec.backbone["dim"]) == (want.n_layer, want.dim)
        assert spec.backbone["codebook_dim"] == 8 and spec.teacher_ref == {
            "family": "llamagen",
            "size": preset[4:],
            "init": "random",
        }
    var = RANDOM_INIT_SIZES["var-d16"]
    assert var.backbone["var"]["depth"] == 16 and var.teacher_ref == {"family": "var", "size": "d16", "init": "random"}


@pytest.mark.parametrize("name", ["tiny-llamagen", "tiny-var"])
def test_random_pipeline_generates_images(name):
    pipe = random_pipeline(name, device="cpu", dtype=torch.bfloat16)
    assert pipe.dtype == torch.bfloat16 and parameter_count(pipe.generator) > 0
    out = pipe([0, 9], seed=0)
    assert out.images.shape[0] == 2 and out.images.dtype == torch.uint8
    again = random_pipeline(name, device="cpu", dtype=torch.bfloat16)  # seeded: the same weights
    assert torch.equal(again([0, 9], seed=0).tokens, out.tokens)


def _compiled_teacher_backend_eager(monkeypatch):
    """The plugin's compiled LlamaGen teacher with torch.compile backend 'eager' (traced, no inductor codegen)."""
    from dd2_teachers.llamagen import LlamaGenTeacher
    from dd2_teachers.registry import load_teacher

    def load(ref, *, device, dtype=None, compile=False):
        teacher = load_teacher(ref, device=device, dtype=dtype, compile=compile)
        if compile and isinstance(teacher, LlamaGenTeacher):
            teacher.cfg = teacher.cfg.model_copy(update={"compile_backend": "eager"})
        return teacher

    monkeypatch.setattr("dd2_eval.teacher.teacher_plugin", lambda: load)


def test_bench_random_init_json_schema_and_speedups(tmp_path, capsys, monkeypatch):
    _compiled_teacher_backend_eager(monkeypatch)
    out = tmp_path / "bench"
    args = ["bench", "--random-init", "tiny-llamagen", "--device", "cpu", "--out", str(out), "--warmup", "1",
            "--repeats", "2", "--throughput-batch", "1", "--compile-backend", "aot_eager", "--json"]  # fmt: skip
    assert cli.main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "bench.json").read_text())
    assert printed == report == BenchReport.read_json(out / "bench.json").to_dict()

    assert {
        "device",
        "dtype",
        "torch_version",
        "config",
        "timings",
        "notes",
        "host",
        "system",
        "setup",
        "speedups",
    } <= set(report)
    assert report["torch_version"] == torch.__version__ and report["device"].startswith("cpu")
    assert report["config"]["without_decode"] is True and report["config"]["compile_backend"] == "aot_eager"
    assert report["system"]["cpu_count"] >= 1 and len(report["system"]["loadavg_start"]) == 3
    assert len(report["system"]["loadavg_end"]) == 3
    setup = report["setup"]
    assert setup["random_init"] == "tiny-llamagen" and setup["teacher_ref"]["init"] == "random"
    assert setup["generator_params"] > 0 and setup["decoder_params"] > 0 and setup["teacher_params"] > 0
    assert (out / "bench.json").is_file() and not list(out.glob(".*.tmp"))

    timings = report["timings"]
    assert all(set(t) == TIMING_KEYS and len(t["times_s"]) == 2 and t["median_s"] > 0 for t in timings)
    assert all(t["cpu_s"] > 0 for t in timings)
    got = {(t["target"], t["mode"], t["batch_size"], t["decode"]) for t in timings}
    targets, modes = ("dd2 one-step", "teacher AR"), ("eager", "compiled")
    assert got == {(n, m, 1, d) for n in targets for m in modes for d in (True, False)}  # batch 1 once: 1 = 1
    assert [t["mode"] for t in timings[:4]] == ["eager"] * 4  # every eager target before any compiled one

    rows = report["speedups"]
    assert all(set(r) == SPEEDUP_KEYS for r in rows) and len(rows) == 8  # decode x one-step mode x AR mode
    median = {(t["target"], t["mode"], t["batch_size"], t["decode"]): t["median_s"] for t in timings}
    cpu = {(t["target"], t["mode"], t["batch_size"], t["decode"]): t["cpu_s"] for t in timings}
    for r in rows:
        one = ("dd2 one-step", r["one_step_mode"], r["batch_size"], r["decode"])
        ar = ("teacher AR", r["teacher_mode"], r["batch_size"], r["decode"])
        assert r["speedup"] == pytest.approx(median[ar] / median[one])
        assert r["one_step_ms"] == pytest.approx(median[one] * 1e3)
        assert r["speedup_cpu_time"] == pytest.approx(cpu[ar] / cpu[one])
    with Image.open(out / "bench.png") as img:
        assert img.format == "PNG" and img.width > 600 and len(img.convert("RGB").getcolors(1 << 16)) > 5

    # bench/speed_targets.py (what gpu_speed.sh prints) reads this report: batch-1 targets measured, batch 64 missing
    targets = _bench_script("speed_targets")
    assert targets.main([f"llamagen-l={out / 'bench.json'}", "--out", str(tmp_path / "targets.json")]) == 0
    rows = {r["measure"]: r for r in json.loads((tmp_path / "targets.json").read_text())}
    batch1 = median["dd2 one-step", "compiled", 1, True]
    assert rows["one-step (compiled) batch 1"]["value"] == pytest.approx(batch1 * 1e3)
    assert rows["one-step (compiled) batch 1"]["met"] == (batch1 * 1e3 <= 20.0)
    ratio = median["teacher AR", "eager", 1, True] / batch1
    assert rows["one-step (compiled) batch 1 vs AR (eager)"]["value"] == pytest.approx(ratio)
    assert rows["one-step (compiled) batch 64"]["value"] is None and rows["one-step (compiled) batch 64"]["met"] is None
    assert "MET" in capsys.readouterr().out


def _bench_script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_random_init_var_eager(tmp_path, capsys):
    args = ["bench", "--random-init", "tiny-var", "--device", "cpu", "--out", str(tmp_path), "--warmup", "0",
            "--repeats", "1", "--teacher-repeats", "2", "--throughput-batch", "2", "--modes", "eager",
            "--dtype", "bfloat16", "--json"]  # fmt: skip
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "bfloat16" and report["setup"]["teacher_ref"]["family"] == "var"
    assert {(r["batch_size"], r["decode"]) for r in report["speedups"]} == {
        (1, True),
        (1, False),
        (2, True),
        (2, False),
    }
    assert {(t["target"], len(t["times_s"])) for t in report["timings"]} == {("dd2 one-step", 1), ("teacher AR", 2)}


def test_bench_needs_a_pipeline_or_a_size(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--device", "cpu"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "--random-init", "llamagen-xxl"])
    assert "invalid choice" in capsys.readouterr().err
