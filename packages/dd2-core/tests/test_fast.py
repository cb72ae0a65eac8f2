"""The fast inference path: bf16 autocast + torch.compile (aot_eager on CPU) + batch buckets equal the eager path."""

from __future__ import annotations

import pytest
import torch

from dd2_core import ARDiffusion, HeadConfig, OneStepGenerator, VelocityHead
from dd2_core.errors import DD2ValueError
from dd2_core.fast import FastPathConfig
from dd2_core.models.llamagen import LlamaGenBackbone, LlamaGenConfig
from dd2_core.models.llamagen_vq import LlamaGenVQ, VQConfig
from dd2_core.models.var import VARBackbone, VARBackboneConfig, VARConfig
from dd2_core.models.var_vqvae import VARVQVAE, VARVQVAEConfig
from dd2_core.pipeline import OneStepPipeline


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch (dynamo caches graphs per function across pipelines of the same structure)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


BF16 = FastPathConfig(autocast="bfloat16", backend="aot_eager", batch_buckets=(4,))  # one compiled shape: fast tests


def _llamagen_pipeline() -> OneStepPipeline:
    torch.manual_seed(0)
    vq_cfg = VQConfig(
        codebook_size=32, codebook_dim=4, ch=16, ch_mult=(1, 2), z_channels=16, num_res_blocks=1, norm_groups=8
    )
    gpt_cfg = LlamaGenConfig(n_layer=2, dim=32, n_head=2, vocab_size=32, num_classes=5, grid=4, codebook_dim=4)
    gen = OneStepGenerator(
        ARDiffusion(LlamaGenBackbone(gpt_cfg), VelocityHead(HeadConfig(token_dim=4, cond_dim=32, width=16, depth=1)))
    )
    torch.nn.init.normal_(gen.head.final.linear.weight, std=0.3)  # the zero-init head would make tokens = noise
    return OneStepPipeline.from_models(
        gen,
        family="llamagen",
        backbone_config=gpt_cfg,
        decoder=LlamaGenVQ(vq_cfg),
        decoder_name="llamagen_vq",
        decoder_config=vq_cfg,
    )


def _var_pipeline() -> OneStepPipeline:
    torch.manual_seed(0)
    var = VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=5, vocab_size=32, token_dim=4, patch_nums=(1, 2, 4))
    vq_cfg = VARVQVAEConfig(vocab_size=32, token_dim=4, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 4))
    bb_cfg = VARBackboneConfig(var=var)
    gen = OneStepGenerator(
        ARDiffusion(VARBackbone(bb_cfg), VelocityHead(HeadConfig(token_dim=4, cond_dim=64, width=16, depth=1)))
    )
    torch.nn.init.normal_(gen.head.final.linear.weight, std=0.3)
    return OneStepPipeline.from_models(
        gen,
        family="var",
        backbone_config=bb_cfg,
        decoder=VARVQVAE(vq_cfg),
        decoder_name="var_vqvae",
        decoder_config=vq_cfg,
    )


@pytest.mark.parametrize("build", [_llamagen_pipeline, _var_pipeline], ids=["llamagen", "var"])
def test_bf16_compiled_fast_path_matches_eager(build):
    """Batch 3 runs padded to bucket 4; batch 5 is cut into a 4-row chunk and a 1-row chunk padded to 4."""
    pipe = build()
    labels = [0, 4, 2, 1, 3]
    eager = pipe(labels, seed=7)
    eager_tokens_only = pipe(labels[:3], seed=7, decode=False)
    pipe.enable_fast_path(BF16)
    before = compiled_graphs()
    fast = pipe(labels, seed=7)
    assert compiled_graphs() - before == 2  # one fullgraph each for the generator and the decoder, at bucket 4
    assert fast.images.dtype == torch.uint8 and fast.images.shape == eager.images.shape
    assert fast.tokens.dtype == torch.float32 and fast.tokens.shape == eager.tokens.shape
    assert not torch.equal(fast.tokens, eager.tokens)  # autocast really ran in bf16
    scale = eager.tokens.abs().max()
    torch.testing.assert_close(fast.tokens, eager.tokens, atol=0.03 * scale, rtol=0.03)  # bf16: 8 mantissa bits
    diff = (fast.images.int() - eager.images.int()).abs()
    assert diff.float().mean() < 2.0 and diff.max() <= 24, (diff.float().mean(), diff.max())
    three = pipe(labels[:3], seed=7, decode=False)
    assert three.images is None
    torch.testing.assert_close(three.tokens, eager_tokens_only.tokens, atol=0.03 * scale, rtol=0.03)
    assert pipe.fast.bucket(3) == 4 and pipe.fast.bucket(5) == 4


def test_float32_compiled_fast_path_equals_eager():
    """Without autocast the compiled path is the eager computation (padding rows do not leak into real rows)."""
    pipe = _llamagen_pipeline()
    eager = pipe([1, 2, 3], seed=0)
    pipe.enable_fast_path(autocast="off", backend="aot_eager", batch_buckets=(4,))
    before = compiled_graphs()
    fast = pipe([1, 2, 3], seed=0)
    assert compiled_graphs() - before == 2
    torch.testing.assert_close(fast.tokens, eager.tokens, atol=1e-5, rtol=1e-5)
    assert (fast.images.int() - eager.images.int()).abs().max() <= 1
    pipe.disable_fast_path()
    assert torch.equal(pipe([1, 2, 3], seed=0).tokens, eager.tokens)


def test_fast_path_through_from_pretrained_and_label_checks(tmp_path):
    pipe = _llamagen_pipeline()
    pipe.save_pretrained(tmp_path / "p")
    loaded = OneStepPipeline.from_pretrained(tmp_path / "p", fast=BF16)
    assert loaded.fast is not None and loaded.fast.config == BF16
    assert loaded.decoder.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert loaded([0, 1], seed=0).images.shape[0] == 2
    with pytest.raises(DD2ValueError, match=r"class ids in \[0, 4\]"):
        loaded([0, 5], seed=0)  # host labels: checked on the host, before any device work
    with pytest.raises(DD2ValueError, match="integer"):
        loaded(torch.tensor([0.0, 1.0]), seed=0)
    assert OneStepPipeline.from_pretrained(tmp_path / "p").fast is None  # eager is the default


def test_fast_path_config_checks_and_device_defaults():
    with pytest.raises(ValueError, match="strictly increasing"):
        FastPathConfig(batch_buckets=(4, 2))
    cpu = FastPathConfig.for_device("cpu")
    assert (cpu.autocast, cpu.cuda_graphs, cpu.compile) == ("off", False, True)
    cuda = FastPathConfig.for_device("cuda", batch_buckets=(1, 64))
    assert (cuda.autocast, cuda.cuda_graphs, cuda.backend, cuda.batch_buckets) == (
        "bfloat16",
        True,
        "inductor",
        (1, 64),
    )
    with pytest.raises(DD2ValueError, match="either"):
        _llamagen_pipeline().enable_fast_path(BF16, backend="eager")


def test_dd2_sample_fast_flag(tmp_path, capsys):
    """`dd2 sample --fast` on CPU: the device's defaults (float32, compiled), the same grid as the eager command."""
    import json

    import numpy as np
    from PIL import Image

    from dd2_core import cli

    _llamagen_pipeline().save_pretrained(tmp_path / "p")
    common = ["sample", "--pipeline", str(tmp_path / "p"), "--classes", "0,4", "--per-class", "2", "--device", "cpu"]
    assert cli.main([*common, "--out", str(tmp_path / "eager.png")]) == 0
    fast = [*common, "--out", str(tmp_path / "fast.png"), "--fast", "--compile-backend", "aot_eager", "--json"]
    capsys.readouterr()
    assert cli.main(fast) == 0
    assert json.loads(capsys.readouterr().out)["fast"] is True
    with Image.open(tmp_path / "eager.png") as a, Image.open(tmp_path / "fast.png") as b:
        diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 1


def test_device_label_check_is_a_device_side_assert():
    """Labels already on the accelerator are range-checked by torch._assert_async (on CPU it raises at once)."""
    from dd2_core.fast import expect_labels_async

    expect_labels_async("labels", torch.tensor([0, 4]), 5)
    with pytest.raises(RuntimeError):
        expect_labels_async("labels", torch.tensor([0, 5]), 5)
    with pytest.raises(DD2ValueError, match=r"expected shape \(B,\)"):
        expect_labels_async("labels", torch.zeros(2, 2, dtype=torch.long), 5)
    with pytest.raises(DD2ValueError, match="integer"):
        expect_labels_async("labels", torch.zeros(2), 5)
