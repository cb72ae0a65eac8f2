"""A resumed `dd2-eval sample` never mixes chunks of two generators, and its bad inputs are clean messages."""

import hashlib

import pytest
import torch

from dd2_core import ARDiffusion, BackboneConfig, HeadConfig, OneStepGenerator, TransformerBackbone, VelocityHead
from dd2_core.pipeline import OneStepPipeline
from dd2_eval import cli
from dd2_eval.sample import parts_dir, pipeline_id


def _save_toy(folder, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = BackboneConfig(num_tokens=4, token_dim=2, num_classes=5, dim=16, heads=2)
    gen = OneStepGenerator(ARDiffusion(TransformerBackbone(cfg), VelocityHead(HeadConfig(token_dim=2, cond_dim=16,
                           width=16, depth=1))))  # fmt: skip
    OneStepPipeline.from_models(gen, family="transformer", backbone_config=cfg).save_pretrained(folder)


def _old_id(path) -> str:  # what the resume check hashed before: config.json and the weight files' sizes
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


@pytest.fixture
def swappable(tmp_path, tiny_pipeline, monkeypatch):
    """A pipeline folder, and a same-size generator of another seed to swap in; sampling uses the tiny pipeline."""
    _save_toy(tmp_path / "pipe", seed=0)
    _save_toy(tmp_path / "other", seed=1)
    monkeypatch.setattr("dd2_eval.sample.load_pipeline", lambda path, device=None, dtype=None: tiny_pipeline)
    return tmp_path / "pipe", tmp_path / "other" / "generator.safetensors"


def test_swapped_same_size_weights_are_not_mixed_into_one_npz(tmp_path, swappable, caplog):
    pipe, other = swappable
    out = tmp_path / "s.npz"
    args = ["sample", "--pipeline", str(pipe), "--out", str(out), "--per-class", "2", "--chunk-size", "4",
            "--no-progress", "--device", "cpu", "--world-size", "2"]  # fmt: skip
    assert cli.main([*args, "--rank", "1"]) == 0  # rank 1's chunks of generator 1 on disk, not assembled yet
    before_old, before = _old_id(pipe), pipeline_id(pipe)
    (pipe / "generator.safetensors").write_bytes(other.read_bytes())  # same size, other weights
    assert _old_id(pipe) == before_old  # the original failure: the old identity could not tell them apart
    assert pipeline_id(pipe) != before
    assert cli.main([*args, "--rank", "0"]) == 2
    assert f"{parts_dir(out)} holds chunks of a different sampling run" in caplog.text and "'pipeline'" in caplog.text
    assert not out.exists()


def test_a_truncated_parts_manifest_is_a_clear_error(tmp_path, swappable, caplog):
    pipe, _ = swappable
    out = tmp_path / "s.npz"
    args = ["sample", "--pipeline", str(pipe), "--out", str(out), "--per-class", "2", "--chunk-size", "4",
            "--no-progress", "--device", "cpu", "--world-size", "2"]  # fmt: skip
    assert cli.main([*args, "--rank", "1"]) == 0
    manifest = parts_dir(out) / "manifest.json"
    manifest.write_text(manifest.read_text()[:20])
    assert cli.main([*args, "--rank", "0"]) == 2
    assert f"{manifest}: unreadable (" in caplog.text and "delete that folder or choose another --out" in caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--classes", "a"], "argument --classes: expected comma-separated integers such as 0,1,2, got 'a'"),
        (["--device", "bogus"], "argument --device: expected a torch device such as cpu, cuda or cuda:1, got 'bogus'"),
    ],
)
def test_bad_sample_arguments_exit_2(tmp_path, capsys, args, shown):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--pipeline", str(tmp_path), *args])
    assert e.value.code == 2 and shown in capsys.readouterr().err
