import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dd2_core import ARDiffusion, BackboneConfig, HeadConfig, OneStepGenerator, TransformerBackbone, VelocityHead
from dd2_core.checkpoint import read_state_dict
from dd2_core.errors import CheckpointError, DD2ValueError
from dd2_core.models.llamagen import LlamaGenBackbone, LlamaGenConfig
from dd2_core.models.llamagen_vq import LlamaGenVQ, VQConfig
from dd2_core.pipeline import OneStepPipeline


def _toy_pipeline():
    torch.manual_seed(0)
    cfg = BackboneConfig(num_tokens=4, token_dim=2, num_classes=3, dim=16, heads=2)
    head = HeadConfig(token_dim=2, cond_dim=16, width=16, depth=1)
    gen = OneStepGenerator(ARDiffusion(TransformerBackbone(cfg), VelocityHead(head)))
    torch.nn.init.normal_(gen.head.final.linear.weight)
    return OneStepPipeline.from_models(gen, family="transformer", backbone_config=cfg)


def _image_pipeline():
    torch.manual_seed(0)
    vq_cfg = VQConfig(
        codebook_size=32, codebook_dim=4, ch=16, ch_mult=(1, 2), z_channels=16, num_res_blocks=1, norm_groups=8
    )
    vq = LlamaGenVQ(vq_cfg)
    gpt_cfg = LlamaGenConfig(n_layer=1, dim=32, n_head=2, vocab_size=32, num_classes=5, grid=4, codebook_dim=4)
    head = HeadConfig(token_dim=4, cond_dim=32, width=16, depth=1)
    gen = OneStepGenerator(ARDiffusion(LlamaGenBackbone(gpt_cfg), VelocityHead(head)))
    return OneStepPipeline.from_models(
        gen, family="llamagen", backbone_config=gpt_cfg, decoder=vq, decoder_name="llamagen_vq", decoder_config=vq_cfg
    )


def test_round_trip_gives_identical_samples(tmp_path):
    pipe = _toy_pipeline()
    out = pipe([0, 1, 2], seed=3)
    assert out.images is None and out.tokens.shape == (3, 4, 2)
    pipe.save_pretrained(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["config.json", "generator.safetensors"]
    again = OneStepPipeline.from_pretrained(tmp_path / "p")
    torch.testing.assert_close(again([0, 1, 2], seed=3).tokens, out.tokens)
    assert not torch.equal(again([0, 1, 2], seed=4).tokens, out.tokens)


def test_image_pipeline_round_trip_and_cli(tmp_path):
    pipe = _image_pipeline()
    out = pipe(torch.tensor([0, 4]), seed=0)
    assert out.images.dtype == torch.uint8 and out.images.shape[0] == 2 and out.images.shape[-1] == 3
    pipe.save_pretrained(tmp_path / "p")
    again = OneStepPipeline.from_pretrained(tmp_path / "p")
    assert torch.equal(again([0, 4], seed=0).images, out.images)
    png = tmp_path / "grid.png"
    res = subprocess.run(
        [sys.executable, "-m", "dd2_core.cli", "sample", "--pipeline", str(tmp_path / "p"), "--classes", "0,4",
         "--per-class", "3", "--out", str(png), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    summary = json.loads(res.stdout)
    assert summary["images"] == 6 and png.stat().st_size > 0
    from PIL import Image

    h, w = out.images.shape[1:3]
    with Image.open(png) as im:
        assert im.size == (3 * w, 2 * h)
    # --out-dir: one grid per class
    res = subprocess.run(
        [sys.executable, "-m", "dd2_core.cli", "sample", "--pipeline", str(tmp_path / "p"), "--classes", "0,4",
         "--per-class", "16", "--out-dir", str(tmp_path / "grids"), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    files = json.loads(res.stdout)["files"]
    assert [Path(f).name for f in files] == ["class_0000.png", "class_0004.png"]
    for f in files:
        with Image.open(f) as im:
            assert im.size == (8 * w, 2 * h)


def test_bad_folders_and_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        OneStepPipeline.from_pretrained(tmp_path)
    pipe = _toy_pipeline()
    pipe.save_pretrained(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg | {"head": cfg["head"] | {"width": 32}}))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        OneStepPipeline.from_pretrained(tmp_path / "p")
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg | {"colour": 1}))
    with pytest.raises(CheckpointError, match="colour"):
        OneStepPipeline.from_pretrained(tmp_path / "p")
    with pytest.raises(DD2ValueError, match="labels"):
        pipe([3])
    data = (tmp_path / "p" / "generator.safetensors").read_bytes()
    (tmp_path / "p" / "generator.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not be read"):
        read_state_dict(tmp_path / "p" / "generator.safetensors")


def test_var_pipeline_round_trip(tmp_path):
    from dd2_core.models.var import VARBackbone, VARBackboneConfig, VARConfig
    from dd2_core.models.var_vqvae import VARVQVAE, VARVQVAEConfig

    torch.manual_seed(0)
    pn = (1, 2, 3, 4)
    var_cfg = VARConfig(depth=1, embed_dim=32, num_heads=2, num_classes=3, vocab_size=16, token_dim=4, patch_nums=pn)
    bb_cfg = VARBackboneConfig(var=var_cfg)
    vq_cfg = VARVQVAEConfig(vocab_size=16, token_dim=4, ch=32, ch_mult=(1, 2), patch_nums=pn)
    head = HeadConfig(token_dim=4, cond_dim=32, width=16, depth=1)
    gen = OneStepGenerator(ARDiffusion(VARBackbone(bb_cfg), VelocityHead(head)))
    pipe = OneStepPipeline.from_models(
        gen, family="var", backbone_config=bb_cfg, decoder=VARVQVAE(vq_cfg), decoder_name="var_vqvae",
        decoder_config=vq_cfg,
    )  # fmt: skip
    out = pipe([0, 2], seed=1)
    assert out.tokens.shape == (2, 30, 4) and out.images.dtype == torch.uint8
    pipe.save_pretrained(tmp_path / "v")
    assert torch.equal(OneStepPipeline.from_pretrained(tmp_path / "v")([0, 2], seed=1).images, out.images)


def test_generator_options_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = BackboneConfig(num_tokens=4, token_dim=2, num_classes=3, dim=16, heads=2)
    head = HeadConfig(token_dim=2, cond_dim=16, width=16, depth=1)
    model = ARDiffusion(TransformerBackbone(cfg), VelocityHead(head))
    gen = OneStepGenerator(model, 0.45, noise_scale=0.7, class_cond=True)
    torch.nn.init.normal_(gen.head.final.linear.weight)
    torch.nn.init.normal_(gen.class_embed.weight)
    pipe = OneStepPipeline.from_models(gen, family="transformer", backbone_config=cfg)
    pipe.save_pretrained(tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (config["head_time"], config["noise_scale"], config["class_cond"]) == (0.45, 0.7, True)
    back = OneStepPipeline.from_pretrained(tmp_path / "p")
    assert back.generator.options() == gen.options()
    assert torch.equal(back([0, 1, 2], seed=3).tokens, pipe([0, 1, 2], seed=3).tokens)
