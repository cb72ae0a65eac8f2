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
