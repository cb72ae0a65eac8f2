"""deepspeed.compile: regional torch.compile of transformer blocks and velocity heads (dd2_train.engine).

The compiled modules must compute what the eager ones compute (losses and gradients), keep their state-dict names
(checkpoints stay interchangeable), and work under activation checkpointing. Most tests use the `aot_eager`
backend (traces forward and backward like inductor, no C++ build); one runs inductor where a C++ compiler exists.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dd2_core import OneStepGenerator
from dd2_core.diffusion import ARDiffusion
from dd2_core.heads import HeadConfig, VelocityHead
from dd2_core.models.llamagen import LlamaGen, LlamaGenBackbone, LlamaGenConfig
from dd2_core.models.var import VAR, VARBackbone, VARConfig
from dd2_core.models.var_vqvae import VARVQVAE, VARVQVAEConfig
from dd2_teachers.toy import ToyTeacher, ToyTeacherConfig, ar_diffusion_from_teacher
from dd2_train import engine as eng
from dd2_train.steps import CSDConfig, GTSConfig, TorchUpdater, generator_step, gts_step, guidance_step

# dynamo reads `.grad` of non-leaf inputs while it wraps them; torch warns about that read (seen when other tests of the
# session compiled first). A torch-internal warning, not ours: the tests' filterwarnings=error must not turn it fatal.
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")


def _llamagen_model(layers: int = 2) -> ARDiffusion:
    torch.manual_seed(0)
    cfg = LlamaGenConfig(n_layer=layers, dim=32, n_head=2, vocab_size=16, num_classes=3, grid=2, codebook_dim=4)
    backbone = LlamaGenBackbone.from_teacher(LlamaGen(cfg))
    head = VelocityHead(HeadConfig(token_dim=4, cond_dim=32, width=16, depth=2))
    for p in head.parameters():  # a non-trivial head (a fresh one outputs zeros)
        torch.nn.init.normal_(p, std=0.2)
    return ARDiffusion(backbone, head)


def _loss_and_grads(model: ARDiffusion, tokens, labels, x_t, t):
    model.zero_grad(set_to_none=True)
    loss = model(x_t, t, tokens, labels).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compile_regions_counts_blocks_and_heads_and_keeps_names():
    model = _llamagen_model(layers=3)
    keys = list(model.state_dict())
    assert eng.compile_regions(model, backend="aot_eager") == 3 + 1  # 3 transformer blocks + the head (whole)
    assert list(model.state_dict()) == keys  # no `_orig_mod.` prefixes: checkpoints are interchangeable
    gen = OneStepGenerator.from_ar_diffusion(_llamagen_model())
    assert eng.compile_regions(gen, backend="aot_eager") == 2 + 1
    with pytest.raises(ValueError, match="no transformer blocks or velocity head"):
        eng.compile_regions(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_model_matches_eager(checkpointing):
    eager = _llamagen_model()
    compiled = copy.deepcopy(eager)
    if checkpointing:
        eng.enable_activation_checkpointing(compiled.backbone)
    eng.compile_regions(compiled, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    for batch in (3, 5):  # a second shape: the compiled regions must follow it
        tokens, x_t = torch.randn(batch, 4, 4, generator=g), torch.randn(batch, 4, 4, generator=g)
        t, labels = torch.rand(batch, 4, 1, generator=g), torch.randint(3, (batch,), generator=g)
        loss_e, grads_e = _loss_and_grads(eager, tokens, labels, x_t, t)
        loss_c, grads_c = _loss_and_grads(compiled, tokens, labels, x_t, t)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _var_model() -> ARDiffusion:
    torch.manual_seed(0)
    patches = (1, 2, 3)
    cfg = VARConfig(depth=2, embed_dim=32, num_heads=2, num_classes=3, vocab_size=16, token_dim=4, patch_nums=patches)
    var = VAR(cfg)
    vq = VARVQVAE(VARVQVAEConfig(vocab_size=16, token_dim=4, ch=32, ch_mult=(1, 2), patch_nums=patches))
    backbone = VARBackbone.from_teacher(var, vq)
    head = VelocityHead(HeadConfig(token_dim=4, cond_dim=backbone.feature_dim, width=16, depth=2))
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return ARDiffusion(backbone, head)


def test_compiled_var_backbone_matches_eager():
    eager = _var_model()
    compiled = copy.deepcopy(eager)
    assert eng.compile_regions(compiled, backend="aot_eager") == 2 + 1
    g = torch.Generator().manual_seed(1)
    n = eager.backbone.num_tokens
    tokens, x_t = torch.randn(3, n, 4, generator=g), torch.randn(3, n, 4, generator=g)
    t, labels = torch.rand(3, n, 1, generator=g), torch.randint(3, (3,), generator=g)
    loss_e, grads_e = _loss_and_grads(eager, tokens, labels, x_t, t)
    loss_c, grads_c = _loss_and_grads(compiled, tokens, labels, x_t, t)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _toy_nets():
    torch.manual_seed(0)
    teacher = ToyTeacher(ToyTeacherConfig(codebook_size=4, num_tokens=3, num_classes=3, dim=32, heads=2))
    teacher.eval().requires_grad_(False)
    model = ar_diffusion_from_teacher(teacher, HeadConfig(token_dim=2, cond_dim=32, width=32, depth=2))
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return teacher, model


def _csd_losses(compiled: bool, backend: str) -> list[float]:
    """Two GTS, two FCS and two CSD updates on the toy teacher; every network compiled or none."""
    teacher, model = _toy_nets()
    generator, guidance = OneStepGenerator.from_ar_diffusion(model), copy.deepcopy(model)
    if compiled:
        for net in (model, generator, guidance, teacher):
            eng.compile_regions(net, backend=backend)
    rng = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 1, 2, 0])
    cfg = CSDConfig(guidance_updates=1, weighting="none", snap_prefix=True)
    losses = []
    up = TorchUpdater(torch.optim.Adam(model.parameters(), lr=1e-2))
    for _ in range(2):
        tokens = teacher.embed(torch.randint(4, (4, 3), generator=rng))
        losses.append(gts_step(model, up, teacher, tokens, labels, GTSConfig(), rng=rng)["loss_gts"].item())
    gen_up = TorchUpdater(torch.optim.Adam(generator.parameters(), lr=1e-2))
    gui_up = TorchUpdater(torch.optim.Adam(guidance.parameters(), lr=1e-2))
    for _ in range(2):
        m = guidance_step(guidance, gui_up, generator, labels, cfg, teacher=teacher, rng=rng)
        losses.append(m["loss_fcs"].item())
        losses.append(generator_step(generator, gen_up, guidance, teacher, labels, cfg, rng=rng)["loss_csd"].item())
    return losses


def test_compiled_steps_match_eager_steps():
    eager = _csd_losses(False, "aot_eager")
    assert eager == pytest.approx(_csd_losses(True, "aot_eager"), rel=1e-4, abs=1e-6)


@pytest.mark.filterwarnings("ignore:.*script_method.*:DeprecationWarning")  # raised inside inductor's CPU codegen
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler")
def test_inductor_backend_matches_eager():
    assert _csd_losses(False, "inductor") == pytest.approx(_csd_losses(True, "inductor"), rel=1e-3, abs=1e-5)


def _bench(tmp_path, name: str, *extra: str) -> tuple[dict, str]:
    bench = Path(__file__).resolve().parents[1] / "bench" / "csd_step.py"
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, str(bench), "--tiny", "--batches", "2", "--k", "1", "--head-width", "16", "--head-depth",
           "1", "--warmup", "1", "--repeats", "1", "--out", str(out), *extra]  # fmt: skip
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stderr


def test_csd_step_bench_compiles_and_profiles(tmp_path):
    """bench/csd_step.py end to end on CPU at tiny sizes: eager FLOP count, regional compile, timing, profiler."""
    prof = tmp_path / "prof"
    report, stderr = _bench(tmp_path, "compiled", "--compile", "--compile-backend", "aot_eager", "--profile", str(prof))
    assert report["compile"] and report["compile_seconds"] > 0 and report["micro_batch"] == 2
    assert all(v > 0 for v in report["seconds"].values()) and all(v > 0 for v in report["tflop_per_step"].values())
    s = report["seconds"]  # a round is K guidance steps and one generator step
    assert s["csd_round"] == pytest.approx(s["guidance_step"] + s["generator_step"])
    assert "compiled 8 regions" in stderr  # generator, guidance: 2 blocks + a head each; teacher: 2 blocks
    for step in ("guidance_step", "generator_step"):
        assert "aten::" in (prof / f"{step}.txt").read_text()
    # the FLOP count at a smaller micro-batch, scaled, equals the count at the full micro-batch (linear in batch)
    full, _ = _bench(tmp_path, "full", "--flop-batch", "2")
    half, _ = _bench(tmp_path, "half", "--flop-batch", "1")
    assert full["tflop_per_step"] == half["tflop_per_step"] == report["tflop_per_step"]
