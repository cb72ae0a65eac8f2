"""The VAR demo end to end (issue 15, part 2): `python demo/fashion_mnist.py --family var --preset ci`.

A multi-scale VQVAE and a VAR teacher trained from Fashion-MNIST pixels, DD2 through the real stages under the
deepspeed launcher with the recommended recipe, the report. The test checks that distillation clearly improves the
one-step generator over its GTS initialisation, that its recall stays above the floor that a collapsed generator
fails (tests/test_demo.py), that the report files exist, that a second run reuses every finished step, and that the
exported VAR pipeline loads and samples with `OneStepPipeline.from_pretrained` (dd2-core alone: tests/
test_var_end_to_end.py).
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
RECALL_FLOOR = 0.005  # a collapsed generator (one image per class, repeated) scores 0.0: the last test here


def _skip_without_data() -> None:
    if not (DATA / "train-images-idx3-ubyte.gz").is_file() and not (DATA / "train-images-idx3-ubyte").is_file():
        pytest.skip(
            f"Fashion-MNIST not found in {DATA}: `sudo apt-get install dataset-fashion-mnist` (or set "
            "DD2_FASHION_MNIST to a folder with the four IDX files)"
        )


def _run_demo(out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(DEMO), "--family", "var", "--out", str(out), "--preset", "ci", "--data", str(DATA)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 0, f"demo failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    _skip_without_data()
    out = tmp_path_factory.mktemp("demo_var") / "run"
    first = _run_demo(out)
    second = _run_demo(out)
    return {"out": out, "first": first, "second": second}


@pytest.mark.slow
def test_distillation_improves_the_var_generator_and_keeps_recall(demo, capsys):
    report = json.loads((demo["out"] / "report" / "report.json").read_text())
    rows = report["rows"]
    with capsys.disabled():
        print("\n" + demo["first"].stdout.strip())
        print("timings:", json.dumps(report["timings"]))
    assert report["family"] == "var" and report["recipe"] == "recommended"
    one_step, before = rows["dd2"], rows["before"]
    assert rows["set_prediction"]["fd"] > rows["teacher"]["fd"], "set prediction must be worse than its teacher"
    assert one_step["fd"] < 0.8 * before["fd"], "distillation must improve clearly on the GTS-initialised generator"
    assert one_step["recall"] > RECALL_FLOOR
    assert rows["teacher"]["steps"] == "4" and rows["dd2_refine1"]["steps"] == "2"  # 4 scales; 1 + the last scale
    for row in rows.values():
        assert all(row[k] == row[k] for k in ("fd", "recall", "nll", "latency_ms", "images_per_s")), row  # no NaN
    for name in ("overview.png", "report.md", *(f"{k}.png" for k in rows)):
        assert (demo["out"] / "report" / name).is_file(), name
    per_class = sorted(p.name for p in (demo["out"] / "report" / "dd2_sample").glob("*.png"))
    assert per_class == [f"class_{c:04d}.png" for c in range(10)]  # `dd2 sample --out-dir`: a grid per class


@pytest.mark.slow
def test_second_var_run_reuses_every_step(demo):
    report = json.loads((demo["out"] / "report" / "report.json").read_text())
    assert report["preset"] == "ci"
    log = demo["second"].stderr
    for step in ("tokenizer", "codes", "teacher", "train", "report"):
        assert re.search(rf"\[{step}\] reused", log), f"{step} was not reused on the second run:\n{log[-3000:]}"
    assert "launch:" not in log
    assert "| DD2 one-step |" in demo["second"].stdout  # the table is printed again


@pytest.mark.slow
def test_exported_var_pipeline_samples(demo):
    from dd2_core.pipeline import OneStepPipeline

    pipe = OneStepPipeline.from_pretrained(demo["out"] / "pipeline")
    assert pipe.config.family == "var" and pipe.config.decoder == "var_vqvae"
    out = pipe(torch.tensor([0, 1, 9]), seed=0)
    assert out.images.shape == (3, 32, 32, 3) and out.images.dtype == torch.uint8  # 28x28 padded to 32x32
    assert out.tokens.shape == (3, 85, 8)  # scales 1, 2, 4, 8 of 8-dim tokens
    assert torch.equal(out.images, pipe(torch.tensor([0, 1, 9]), seed=0).images)  # seeded: reproducible


@pytest.mark.slow
def test_recall_floor_fails_a_collapsed_var_generator(demo):
    from dd2_core.pipeline import OneStepPipeline
    from dd2_eval.toy import ToyFeatureSpace, load_fashion_mnist, load_toy_net
    from dd2_train.var_tokenizer import crop_images

    pipe = OneStepPipeline.from_pretrained(demo["out"] / "pipeline")
    labels = torch.arange(10).repeat_interleave(50)
    noise = pipe.generator.sample_noise(10, generator=torch.Generator().manual_seed(0)).repeat_interleave(50, 0)
    images = crop_images(pipe(labels, noise=noise).images, 28, 28)  # one image per class, 50 times
    reference, _ = load_fashion_mnist("test", DATA)
    recall = ToyFeatureSpace(load_toy_net(data_dir=DATA)).metrics(images, reference).recall
    assert recall < RECALL_FLOOR / 3, f"a collapsed generator reaches recall {recall}"
