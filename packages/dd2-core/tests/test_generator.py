import copy

import pytest
import torch
from torch import nn

from dd2_core import ARDiffusion, BackboneConfig, HeadConfig, OneStepGenerator, TransformerBackbone, VelocityHead
from dd2_core.errors import DD2ValueError
from dd2_core.generator import codebook_noise_scale


def _model(seed=0, n=5, c=3, classes=4):
    torch.manual_seed(seed)
    bb = TransformerBackbone(BackboneConfig(num_tokens=n, token_dim=c, num_classes=classes, dim=32, heads=4))
    head = VelocityHead(HeadConfig(token_dim=c, cond_dim=32, width=48, depth=2))
    for p in head.parameters():  # leave the zero init, so that the outputs depend on every input
        nn.init.normal_(p, std=0.2)
    return ARDiffusion(bb, head)


def test_fresh_head_predicts_zero_velocity():
    head = VelocityHead(HeadConfig(token_dim=3, cond_dim=8, width=16, depth=2))
    assert head(torch.randn(2, 4, 3), torch.rand(2, 4, 1), torch.randn(2, 4, 8)).abs().max() == 0


def test_backbone_is_causal_with_the_one_token_shift():
    model = _model()
    x = torch.randn(2, 5, 3)
    labels = torch.tensor([1, 2])
    f = model.features(x, labels)
    for i in range(5):
        y = x.clone()
        y[:, i] += 1.0
        g = model.features(y, labels)
        assert torch.allclose(f[:, : i + 1], g[:, : i + 1], atol=1e-6)  # positions <= i never see token i
        if i < 4:
            assert not torch.allclose(f[:, i + 1 :], g[:, i + 1 :])
    assert not torch.allclose(f, model.features(x, torch.tensor([0, 3])))  # the class conditions every position


def test_generator_at_init_is_one_euler_step_of_the_ar_diffusion_flow():
    model = _model()
    gen = OneStepGenerator.from_ar_diffusion(model)
    eps = torch.randn(3, 5, 3)
    labels = torch.tensor([0, 1, 3])
    # one Euler step from t = 1 to 0 with the backbone reading the noise prefix: eps - v(eps, 1 | f(eps_<i))
    v = model(eps, torch.ones(3, 5, 1), eps, labels)
    torch.testing.assert_close(gen(eps, labels), eps - v)
    # and equals A's own 1-step sampler when A conditions on the noise (the generator's causal structure)
    q = gen(eps, labels)
    for i in range(5):
        e2 = eps.clone()
        e2[:, i] += 0.5
        q2 = gen(e2, labels)
        assert torch.allclose(q[:, :i], q2[:, :i], atol=1e-6)  # q_j depends on eps_<=j only
    # a deep copy: training the generator leaves the AR-diffusion model untouched
    gen.model.head.final.linear.bias.data += 1
    assert not torch.equal(gen.model.head.final.linear.bias, model.head.final.linear.bias)


def test_ar_diffusion_sampler_is_seeded_and_uses_head():
    model = _model()
    labels = torch.tensor([0, 1])
    a = model.sample(labels, steps=4, generator=torch.Generator().manual_seed(0))
    b = model.sample(labels, steps=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 5, 3)


def test_shape_and_label_errors():
    model = _model()
    gen = OneStepGenerator(copy.deepcopy(model))
    with pytest.raises(DD2ValueError, match=r"noise: expected shape \(\*, 5, 3\), got \(2, 5, 2\)"):
        gen(torch.randn(2, 5, 2), torch.tensor([0, 1]))
    with pytest.raises(DD2ValueError, match=r"labels: expected class ids in \[0, 4\]"):
        gen(torch.randn(2, 5, 3), torch.tensor([0, 7]))
    with pytest.raises(DD2ValueError, match="labels: expected shape"):
        gen(torch.randn(2, 5, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(DD2ValueError, match="token_dim/cond_dim"):
        ARDiffusion(model.backbone, VelocityHead(HeadConfig(token_dim=3, cond_dim=31, width=8, depth=1)))


def test_generator_options_noise_scale_class_cond_head_time():
    model = _model()
    noise, labels = torch.randn(3, 5, 3), torch.tensor([0, 1, 3])
    plain = OneStepGenerator.from_ar_diffusion(model)
    cond = OneStepGenerator.from_ar_diffusion(model, class_cond=True)
    assert torch.equal(cond(noise, labels), plain(noise, labels))  # zero-initialised: starts as the plain generator
    nn.init.normal_(cond.class_embed.weight)
    assert not torch.allclose(cond(noise, labels), plain(noise, labels))
    assert "class_embed.weight" in cond.state_dict() and "class_embed.weight" not in plain.state_dict()
    # noise_scale: the backbone reads s * eps, the head still reads eps
    scaled = OneStepGenerator.from_ar_diffusion(model, noise_scale=0.5)
    f = model.features(0.5 * noise, labels)
    t = torch.ones(3, 5, 1)
    assert torch.allclose(scaled(noise, labels), noise - model.head(noise, t, f), atol=1e-6)
    half = OneStepGenerator.from_ar_diffusion(model, 0.5)
    t = torch.full((3, 5, 1), 0.5)
    assert torch.allclose(half(noise, labels), noise - 0.5 * model.head(noise, t, model.features(noise, labels)))
    assert half.options() == {"head_time": 0.5, "noise_scale": 1.0, "class_cond": False}
    for bad in ({"head_time": 0.0}, {"head_time": 1.5}, {"noise_scale": -1.0}):
        with pytest.raises(DD2ValueError):
            OneStepGenerator(model, **bad)


def test_codebook_noise_scale_matches_the_codes_norm():
    codebook = 3.0 * torch.nn.functional.normalize(torch.randn(16, 4), dim=-1)
    s = codebook_noise_scale(codebook)
    assert s == pytest.approx(3.0 / 2.0, rel=1e-6)  # mean code norm 3 over sqrt(C) = 2


def test_ar_diffusion_sampler_power_grid_and_snapping():
    model = _model()
    labels = torch.tensor([0, 2])
    noise = torch.randn(2, 5, 3)
    uniform = model.sample(labels, steps=4, noise=noise, power=1.0)
    powered = model.sample(labels, steps=4, noise=noise)  # the teacher flow's grid (power 2) by default
    assert not torch.allclose(uniform, powered)
    codebook = torch.randn(6, 3)
    snapped = model.sample(labels, steps=4, noise=noise, snap_codebook=codebook)
    assert all(any(torch.equal(tok, c) for c in codebook) for tok in snapped.reshape(-1, 3))


def test_var_generator_reads_noise_of_earlier_scales_and_its_own_token_only():
    """d q_i / d eps_j of a tiny VAR generator (float64 Jacobian): zero for j in a later scale than i, and for j != i
    in i's own scale (the head reads eps_i only, the backbone only earlier scales); nonzero for j = i and for every
    j in an earlier scale (the f_hat of earlier scales' noise is the next scale's input)."""
    from dd2_core.models.var import VARBackbone, VARBackboneConfig, VARConfig
    from dd2_core.teacher import group_index

    torch.manual_seed(0)
    vc = VARConfig(depth=2, embed_dim=32, num_heads=2, num_classes=3, vocab_size=8, token_dim=3, patch_nums=(1, 2, 3))
    bb = VARBackbone(VARBackboneConfig(var=vc))
    for blk in bb.var.blocks:  # visible gates: VAR's init scales them by 1e-2
        nn.init.normal_(blk.ada_lin[1].weight, std=0.1)
    head = VelocityHead(HeadConfig(token_dim=3, cond_dim=32, width=32, depth=2))
    for p in head.parameters():
        nn.init.normal_(p, std=0.2)
    gen = OneStepGenerator(ARDiffusion(bb, head)).double()
    n, c = vc.num_tokens, vc.token_dim
    labels = torch.tensor([2])
    eps = torch.randn(1, n, c, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda e: gen(e, labels), eps)  # (1, N, C, 1, N, C)
    dep = jac[0, :, :, 0].abs().amax(dim=(1, 3))  # (N, N): max |d q_i / d eps_j| over channels
    scale = group_index(vc.token_groups)  # (N,)
    later = scale.view(1, n) > scale.view(n, 1)
    same_other = (scale.view(1, n) == scale.view(n, 1)) & ~torch.eye(n, dtype=torch.bool)
    earlier = scale.view(1, n) < scale.view(n, 1)
    assert dep[later].max() == 0, "a token depends on noise of a later scale"
    assert dep[same_other].max() == 0, "a token depends on the noise of another token of its own scale"
    assert dep.diagonal().min() > 1e-3
    assert dep[earlier].min() > 1e-8, "a token ignores the noise of an earlier scale"
