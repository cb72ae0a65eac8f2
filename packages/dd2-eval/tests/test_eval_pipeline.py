"""`sample` and `bench` with the real dd2_core.pipeline.OneStepPipeline (a tiny LlamaGen backbone + VQ decoder)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dd2_eval import cli
from dd2_eval.errors import EvalError
from dd2_eval.npz import read_images, read_labels
from dd2_eval.sample import SampleConfig, batch_seed, sample_labels, sample_to_npz

pipeline = pytest.importorskip("dd2_core.pipeline", reason="dd2_core.pipeline is not in the installed dd2-core")


def _image_pipeline():
    from dd2_core import ARDiffusion, HeadConfig, OneStepGenerator, VelocityHead
    from dd2_core.models.llamagen import LlamaGenBackbone, LlamaGenConfig
    from dd2_core.models.llamagen_vq import LlamaGenVQ, VQConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vq_cfg = VQConfig(
            codebook_size=32, codebook_dim=4, ch=16, ch_mult=(1, 2), z_channels=16, num_res_blocks=1, norm_groups=8
        )
        gpt_cfg = LlamaGenConfig(n_layer=1, dim=32, n_head=2, vocab_size=32, num_classes=5, grid=4, codebook_dim=4)
        head = HeadConfig(token_dim=4, cond_dim=32, width=16, depth=1)
        gen = OneStepGenerator(ARDiffusion(LlamaGenBackbone(gpt_cfg), VelocityHead(head)))
        torch.nn.init.normal_(gen.head.final.linear.weight)  # zero-initialised: make the images depend on noise
        return pipeline.OneStepPipeline.from_models(
            gen,
            family="llamagen",
            backbone_config=gpt_cfg,
            decoder=LlamaGenVQ(vq_cfg),
            decoder_name="llamagen_vq",
            decoder_config=vq_cfg,
        )


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe")
    _image_pipeline().save_pretrained(folder)
    return folder


def test_sample_command_with_the_real_pipeline(tmp_path, pipeline_dir):
    out = tmp_path / "samples.npz"
    args = ["sample", "--pipeline", str(pipeline_dir), "--out", str(out), "--per-class", "2", "--batch-size", "4"]
    assert cli.main([*args, "--chunk-size", "6", "--device", "cpu", "--no-progress"]) == 0
    images, labels = read_images(out), read_labels(out)
    assert images.dtype == np.uint8 and images.shape[0] == 10 and images.shape[-1] == 3
    assert np.bincount(labels).tolist() == [2] * 5

    # the file holds exactly what the pipeline draws for each batch's label slice and derived seed
    pipe = pipeline.OneStepPipeline.from_pretrained(pipeline_dir)
    cfg = SampleConfig(per_class=2, batch_size=4, chunk_size=6)
    expected = sample_labels(5, cfg)
    np.testing.assert_array_equal(labels, expected)
    first = pipe(torch.from_numpy(expected[:4]), seed=batch_seed(0, 0, 0)).images.numpy()
    np.testing.assert_array_equal(images[:4], first)
    assert not np.array_equal(images[0], images[1])


def test_sample_command_fast_path_draws_the_same_images(tmp_path, pipeline_dir):
    """`dd2-eval sample --fast` (CPU: float32, compiled; backend aot_eager here) writes the eager command's images."""
    common = ["sample", "--pipeline", str(pipeline_dir), "--per-class", "1", "--batch-size", "5", "--device", "cpu"]
    assert cli.main([*common, "--out", str(tmp_path / "eager.npz"), "--no-progress"]) == 0
    fast = ["--out", str(tmp_path / "fast.npz"), "--fast", "--compile-backend", "aot_eager", "--no-progress"]
    assert cli.main([*common, *fast]) == 0
    eager, compiled = read_images(tmp_path / "eager.npz"), read_images(tmp_path / "fast.npz")
    assert compiled.shape == eager.shape == (5, 8, 8, 3)
    assert np.abs(compiled.astype(np.int16) - eager.astype(np.int16)).max() <= 1


def test_bench_command_with_the_real_pipeline(tmp_path, pipeline_dir, capsys):
    args = ["bench", "--pipeline", str(pipeline_dir), "--out", str(tmp_path), "--modes", "eager", "--json"]
    assert cli.main([*args, "--warmup", "1", "--repeats", "2", "--throughput-batch", "3", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [t["batch_size"] for t in report["timings"]] == [1, 3] and (tmp_path / "bench.png").is_file()


def test_pipeline_without_decoder_is_refused(tmp_path):
    from dd2_core import ARDiffusion, BackboneConfig, HeadConfig, OneStepGenerator, TransformerBackbone, VelocityHead

    cfg = BackboneConfig(num_tokens=4, token_dim=2, num_classes=3, dim=16, heads=2)
    gen = OneStepGenerator(ARDiffusion(TransformerBackbone(cfg), VelocityHead(HeadConfig(token_dim=2, cond_dim=16))))
    pipe = pipeline.OneStepPipeline.from_models(gen, family="transformer", backbone_config=cfg)
    with pytest.raises(EvalError, match="has no decoder"):
        sample_to_npz(pipe, tmp_path / "s.npz", SampleConfig(per_class=1), progress=False)
