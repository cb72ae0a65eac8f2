"""The embedded default demo end to end (issue: embedded default), and sampling with dd2-core alone.

`python demo/fashion_mnist.py --preset ci` runs the whole demo at a reduced size: a VQ tokenizer and a LlamaGen
teacher trained from Fashion-MNIST pixels, DD2 through the real stages under the deepspeed launcher, the report.
The recipe is the recommended one (gen-pairs -> regress -> anchored CSD from model A). The test checks the
embedded default's bar as far as the reduced size reaches it: DD2 one-step keeps the class (classifier accuracy
>= 0.9x the teacher's) and its codes are far likelier under the teacher than one-step set prediction's (FD below
set prediction's is met by the full preset only: docs/experiments.md, 2026-12-07); anchored CSD improves on its
regression warm start, distillation improves clearly on the GTS initialisation, recall stays above a floor that a
collapsed generator (one sample per class, repeated) fails, a second run reuses every finished step, the --compare
configurations start from the run's model A with the run's distillation time, and the exported pipeline loads and
samples in a fresh virtual environment where only dd2-core is installed (dd2_teachers, dd2_train, dd2_eval are not
importable).

The fresh venv is the `core_only_venv` fixture of tests/conftest.py.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo" / "fashion_mnist.py"
DATA = Path(os.environ.get("DD2_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
TIMEOUT = 900
RECALL_FLOOR = 0.03  # DD2's recall must stay above it; one image per class, repeated, scores 0.0


def _skip_without_data() -> None:
    if not (DATA / "train-images-idx3-ubyte.gz").is_file() and not (DATA / "train-images-idx3-ubyte").is_file():
        pytest.skip(
            f"Fashion-MNIST not found in {DATA}: `sudo apt-get install dataset-fashion-mnist` (or set "
            "DD2_FASHION_MNIST to a folder with the four IDX files)"
        )


def _run_demo(out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(DEMO), "--out", str(out), "--preset", "ci", "--data", str(DATA)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    _skip_without_data()
    out = tmp_path_factory.mktemp("demo") / "run"
    first = _run_demo(out)
    second = _run_demo(out)
    return {"out": out, "first": first, "second": second}


def _rows(demo) -> dict:
    return json.loads((demo["out"] / "report" / "report.json").read_text())["rows"]


@pytest.mark.slow
def test_dd2_beats_set_prediction_keeps_the_class_and_recall(demo, capsys):
    report = json.loads((demo["out"] / "report" / "report.json").read_text())
    rows = report["rows"]
    with capsys.disabled():
        print("\n" + demo["first"].stdout.strip())
        print("timings:", json.dumps(report["timings"]))
    one_step, before, sp, teacher = rows["dd2"], rows["before"], rows["set_prediction"], rows["teacher"]
    assert sp["fd"] > teacher["fd"], "set prediction must be worse than its teacher"
    assert one_step["fd"] < 0.8 * before["fd"], "distillation must improve clearly on the GTS-initialised generator"
    assert one_step["nll"] < before["nll"], "distillation must move the samples towards what the teacher finds likely"
    assert one_step["recall"] > RECALL_FLOOR
    # the embedded default's bar (recommended recipe) as far as the CI preset reaches it: one step keeps the class
    # and its codes are far likelier under the teacher than set prediction's; anchored CSD improves on its warm
    # start. (FD below set prediction's is met by the full preset, not by this one: docs/experiments.md, session 7.)
    assert one_step["accuracy"] >= 0.9 * teacher["accuracy"], (one_step["accuracy"], teacher["accuracy"])
    assert one_step["nll"] < sp["nll"] - 1.0, "DD2's codes must be far likelier under the teacher than set prediction's"
    assert "regress" in rows and rows["regress"]["steps"] == "1"  # the recipe's warm start has its own row
    assert one_step["fd"] < rows["regress"]["fd"], "anchored CSD must improve on its regression warm start"
    assert rows["dd2_refine2"]["steps"] == "3" and rows["teacher"]["steps"] == "49"
    for row in rows.values():
        assert all(row[k] == row[k] for k in ("fd", "recall", "nll", "latency_ms", "images_per_s")), row  # no NaN
    for name in ("overview.png", "report.md", *(f"{k}.png" for k in rows)):
        assert (demo["out"] / "report" / name).is_file(), name
    per_class = sorted(p.name for p in (demo["out"] / "report" / "dd2_sample").glob("*.png"))
    assert per_class == [f"class_{c:04d}.png" for c in range(10)]  # `dd2 sample --out-dir`: a grid per class


@pytest.mark.slow
def test_recall_floor_fails_a_collapsed_generator(demo):
    from dd2_core.pipeline import OneStepPipeline
    from dd2_eval.toy import ToyFeatureSpace, load_fashion_mnist, load_toy_net

    pipe = OneStepPipeline.from_pretrained(demo["out"] / "pipeline")
    labels = torch.arange(10).repeat_interleave(50)
    noise = pipe.generator.sample_noise(10, generator=torch.Generator().manual_seed(0)).repeat_interleave(50, 0)
    images = pipe(labels, noise=noise).images  # one image per class, 50 times
    reference, _ = load_fashion_mnist("test", DATA)
    recall = ToyFeatureSpace(load_toy_net(data_dir=DATA)).metrics(images, reference).recall
    assert recall < RECALL_FLOOR / 3, f"a collapsed generator reaches recall {recall}"


@pytest.mark.slow
def test_second_run_reuses_every_step(demo):
    report = json.loads((demo["out"] / "report" / "report.json").read_text())
    assert report["preset"] == "ci"
    log = demo["second"].stderr
    for step in ("tokenizer", "codes", "train", "report"):
        assert re.search(rf"\[{step}\] reused", log), f"{step} was not reused on the second run:\n{log[-3000:]}"
    assert "launch:" not in log
    assert "| DD2 one-step |" in demo["second"].stdout  # the table is printed again


@pytest.mark.slow
def test_pipeline_loads_with_dd2_core_alone(demo, core_only_venv, tmp_path):
    pipeline = demo["out"] / "pipeline"
    env_dir = core_only_venv  # tests/conftest.py: dd2-core installed alone
    py = env_dir / "bin" / "python"
    script = f"""
import importlib.util, json, sys
from pathlib import Path
import dd2_core
from dd2_core.pipeline import OneStepPipeline
absent = {{m: importlib.util.find_spec(m) is None for m in ("dd2_teachers", "dd2_train", "dd2_eval", "deepspeed")}}
pipe = OneStepPipeline.from_pretrained({str(pipeline)!r})
out = pipe([0, 1, 2, 9], seed=0)
print(json.dumps({{"absent": absent, "core": dd2_core.__file__, "shape": list(out.images.shape),
                   "dtype": str(out.images.dtype), "prefix": sys.prefix}}))
"""
    proc = subprocess.run(
        [py, "-c", script], capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"}
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(result["absent"].values()), f"importable in the fresh venv: {result['absent']}"
    assert Path(result["core"]).is_relative_to(env_dir), f"dd2_core came from {result['core']}, not the fresh venv"
    assert result["shape"] == [4, 28, 28, 3] and result["dtype"] == "torch.uint8", result
    grid = tmp_path / "grid.png"
    cli = subprocess.run([env_dir / "bin" / "dd2", "sample", "--pipeline", pipeline, "--out", grid, "--per-class", "4"],
                         capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-4000:]
    assert grid.stat().st_size > 0


@pytest.mark.slow
def test_compare_methods_start_from_model_a_with_the_runs_distillation_time(demo):
    import importlib.util

    import yaml

    from dd2_train.config import check_config

    spec = importlib.util.spec_from_file_location("fashion_mnist_demo", DEMO)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = demo["out"]
    main_raw = yaml.safe_load((out / "config.yaml").read_text())
    tc = mod.validate_config(main_raw)
    budget = sum(mod.stage_seconds(tc.stage_dir(s)) for s in mod.DISTIL_STAGES)
    pairs = mod.stage_seconds(tc.stage_dir("gen-pairs"))
    assert 0 < pairs < budget  # launches.jsonl of every distillation stage, written by the trainer
    for key in mod.COMPARE:
        raw = mod.compare_config(main_raw, out, key, budget, pairs)
        run = mod.validate_config(raw)  # a valid training config
        assert Path(raw["run_dir"]) == out / "compare" / key and run.teacher.adapted == out / "adapt"
        stage = run.stages[0]
        section = raw[stage]
        assert Path(section["init_from"]) == out / "gts", key  # the main run's model A
        limit = budget - pairs if key == "dd1" else budget  # DD1's pairs are the main run's: their time counts
        assert section["time_limit_s"] == pytest.approx(limit), key
        assert mod.pending_stages(run) == run.stages  # nothing trained yet
        check_config(run, world_size=1)  # launchable as is: every input exists or an earlier stage writes it
    assert raw["regress"]["mode"] == "onpolicy"
    assert mod.compare_config(main_raw, out, "paper", budget, pairs)["stage"] == ["csd", "export"]
