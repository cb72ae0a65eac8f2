"""Pipeline folders that disagree with themselves are refused before any allocation, and every bad `dd2` argument
or failure is one clear message with exit code 2 (bad input) or 1 (failure while running)."""

import errno
import json

import pytest
import torch

from dd2_core import ARDiffusion, BackboneConfig, HeadConfig, OneStepGenerator, TransformerBackbone, VelocityHead, cli
from dd2_core.clitools import error_message, exit_code
from dd2_core.errors import CheckpointError
from dd2_core.models.llamagen import LlamaGenBackbone, LlamaGenConfig
from dd2_core.models.llamagen_vq import LlamaGenVQ, VQConfig
from dd2_core.pipeline import OneStepPipeline, PipelineConfig


def _toy(num_classes: int = 3) -> OneStepPipeline:
    torch.manual_seed(0)
    cfg = BackboneConfig(num_tokens=4, token_dim=2, num_classes=num_classes, dim=16, heads=2)
    head = HeadConfig(token_dim=2, cond_dim=16, width=16, depth=1)
    gen = OneStepGenerator(ARDiffusion(TransformerBackbone(cfg), VelocityHead(head)))
    return OneStepPipeline.from_models(gen, family="transformer", backbone_config=cfg)


def _edit_config(folder, **changes) -> None:
    raw = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        target = raw
        *path, last = key.split(".")
        for k in path:
            target = target[k]
        target[last] = value
    (folder / "config.json").write_text(json.dumps(raw))


def test_class_count_of_config_json_must_match_the_backbone(tmp_path):
    pipe = _toy(num_classes=3)
    pipe.save_pretrained(tmp_path / "p")
    # the original failure: a config saying 4 classes over a 3-class backbone samples "class 3" = the null class
    wrong = OneStepPipeline(pipe.generator, PipelineConfig(**{**pipe.config.model_dump(), "num_classes": 4}))
    null = pipe.generator(torch.zeros(1, 4, 2), torch.tensor([3]))  # id 3 is the 3-class backbone's null class
    assert torch.equal(wrong([3], noise=torch.zeros(1, 4, 2)).tokens, null)
    _edit_config(tmp_path / "p", num_classes=4)
    with pytest.raises(CheckpointError, match="has num_classes 4, but its backbone has 3 classes"):
        OneStepPipeline.from_pretrained(tmp_path / "p")


def test_config_sizes_are_checked_against_the_weights_before_allocating(tmp_path):
    _toy().save_pretrained(tmp_path / "p")
    # a dim of 2**18 would need ~1 TB of weights: the header check refuses it before anything is allocated
    _edit_config(tmp_path / "p", **{"backbone.dim": 2**18, "head.cond_dim": 2**18})
    with pytest.raises(CheckpointError) as e:
        OneStepPipeline.from_pretrained(tmp_path / "p")
    msg = str(e.value)
    assert "generator.safetensors does not match a transformer one-step generator as" in msg
    assert "config.json describes it" in msg and "shape mismatches (key, found, expected)" in msg
    # a changed class count in the backbone's own config: caught by the weights' shapes (class embedding rows)
    _toy().save_pretrained(tmp_path / "q")
    _edit_config(tmp_path / "q", num_classes=5, **{"backbone.num_classes": 5})
    with pytest.raises(CheckpointError, match=r"model.backbone.class_emb.weight', \(4, 16\), \(6, 16\)"):
        OneStepPipeline.from_pretrained(tmp_path / "q")


def test_decoder_sizes_are_checked_too(tmp_path):
    vq_cfg = VQConfig(codebook_size=32, codebook_dim=4, ch=16, ch_mult=(1, 2), z_channels=16, num_res_blocks=1,
                      norm_groups=8)  # fmt: skip
    gpt_cfg = LlamaGenConfig(n_layer=1, dim=32, n_head=2, vocab_size=32, num_classes=5, grid=4, codebook_dim=4)
    gen = OneStepGenerator(ARDiffusion(LlamaGenBackbone(gpt_cfg), VelocityHead(HeadConfig(token_dim=4, cond_dim=32,
                           width=16, depth=1))))  # fmt: skip
    pipe = OneStepPipeline.from_models(gen, family="llamagen", backbone_config=gpt_cfg, decoder=LlamaGenVQ(vq_cfg),
                                       decoder_name="llamagen_vq", decoder_config=vq_cfg)  # fmt: skip
    pipe.save_pretrained(tmp_path / "p")
    _edit_config(tmp_path / "p", **{"decoder_config.ch": 32})
    with pytest.raises(CheckpointError, match="decoder.safetensors does not match decoder llamagen_vq"):
        OneStepPipeline.from_pretrained(tmp_path / "p")
    (tmp_path / "p" / "decoder.safetensors").write_bytes(b"\xff" * 12)  # truncated / not safetensors
    with pytest.raises(CheckpointError, match="decoder.safetensors': not a readable safetensors file"):
        OneStepPipeline.from_pretrained(tmp_path / "p")


@pytest.fixture(scope="module")
def image_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "p"
    vq_cfg = VQConfig(codebook_size=32, codebook_dim=4, ch=16, ch_mult=(1, 2), z_channels=16, num_res_blocks=1,
                      norm_groups=8)  # fmt: skip
    gpt_cfg = LlamaGenConfig(n_layer=1, dim=32, n_head=2, vocab_size=32, num_classes=5, grid=4, codebook_dim=4)
    gen = OneStepGenerator(ARDiffusion(LlamaGenBackbone(gpt_cfg), VelocityHead(HeadConfig(token_dim=4, cond_dim=32,
                           width=16, depth=1))))  # fmt: skip
    OneStepPipeline.from_models(gen, family="llamagen", backbone_config=gpt_cfg, decoder=LlamaGenVQ(vq_cfg),
                                decoder_name="llamagen_vq", decoder_config=vq_cfg).save_pretrained(folder)  # fmt: skip
    return folder


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--per-class", "0"], "argument --per-class: expected an integer >= 1, got '0'"),
        (["--per-class", "-2"], "argument --per-class: expected an integer >= 1, got '-2'"),
        (["--device", "bogus"], "argument --device: expected a torch device such as cpu, cuda or cuda:1, got 'bogus'"),
        (["--seed", str(2**70)], f"argument --seed: expected a seed in [0, 2**63 - 1], got '{2**70}'"),
        (["--seed", "-1"], "argument --seed: expected a seed in [0, 2**63 - 1], got '-1'"),
        (["--classes", "a"], "argument --classes: expected comma-separated integers such as 0,1,2, got 'a'"),
    ],
)
def test_bad_dd2_arguments_exit_2_naming_the_option(image_pipeline, tmp_path, capsys, args, shown):
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--pipeline", str(image_pipeline), "--out", str(tmp_path / "g.png"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert shown in err and "Traceback" not in err
    assert not (tmp_path / "g.png").exists()


def test_the_originals_of_those_argument_errors_were_raw_exceptions():
    with pytest.raises((RuntimeError, ValueError)):  # --seed 2**70 reached torch
        torch.Generator().manual_seed(2**70)
    with pytest.raises(RuntimeError):  # --device bogus reached torch
        torch.device("bogus")


def test_dd2_failures_are_one_message_with_exit_2_or_1(image_pipeline, tmp_path, capsys, monkeypatch):
    out = tmp_path / "g.png"
    base = ["sample", "--pipeline", str(image_pipeline), "--out", str(out), "--per-class", "1", "--device", "cpu"]
    assert cli.main([*base, "--classes", "7"]) == 2
    assert "dd2: error: --classes: expected ids in [0, 4] (this pipeline's classes), got [7]" in capsys.readouterr().err
    assert cli.main(["sample", "--pipeline", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "nope/config.json" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert cli.main([*base[:3], "--out", str(tmp_path / "file" / "g.png"), "--per-class", "1"]) == 2  # not a folder
    err = capsys.readouterr().err
    assert err.startswith("dd2: error: ") and "file" in err and "Traceback" not in err
    # a full disk: exit 1, the file named (write() itself names none)
    import dd2_core.checkpoint as ckpt

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.os, "fsync", full)
    assert cli.main(base) == 1
    err = capsys.readouterr().err
    assert f"dd2: error: [Errno 28] No space left on device: '{out}'" in err and "Traceback" not in err
    assert cli.main([*base, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli.main(base) == 0 and out.is_file()


def test_error_messages_and_codes():
    assert exit_code(CheckpointError("x")) == 2 and exit_code(FileNotFoundError("x")) == 2
    assert exit_code(OSError(errno.ENOSPC, "No space left on device")) == 1 and exit_code(RuntimeError("x")) == 1
    long = CheckpointError("a\nb\nc\nd\ne")
    assert error_message(long) == "a\nb\nc (+2 more lines: --debug)"
    assert error_message(KeyError("k")) == "KeyError: 'k'"
