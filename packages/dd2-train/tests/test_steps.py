import copy

import pytest
import torch
from pydantic import ValidationError

from dd2_core import OneStepGenerator
from dd2_core.flow import noisy
from dd2_core.heads import HeadConfig
from dd2_core.losses import csd_loss
from dd2_core.sampling import nearest_code, teacher_flow_map
from dd2_core.scores import teacher_x0_hat
from dd2_teachers.toy import ToyTeacher, ToyTeacherConfig, ar_diffusion_from_teacher
from dd2_train.steps import (
    CSDConfig,
    GTSConfig,
    RegressConfig,
    TorchUpdater,
    csd_round,
    ema_decay,
    ema_update,
    flow_map_target,
    generator_step,
    gts_step,
    guidance_step,
    onpolicy_regression_step,
    regression_step,
)


class CountingUpdater(TorchUpdater):
    def __init__(self, params, lr=1e-3):
        super().__init__(torch.optim.Adam(params, lr=lr))
        self.steps = 0

    def step(self):
        self.steps += 1
        super().step()


@pytest.fixture()
def nets():
    torch.manual_seed(0)
    teacher = ToyTeacher(ToyTeacherConfig(codebook_size=4, num_tokens=3, dim=32, heads=2)).eval().requires_grad_(False)
    model = ar_diffusion_from_teacher(teacher, HeadConfig(token_dim=2, cond_dim=32, width=32, depth=2))
    for p in model.head.parameters():  # a non-trivial head, as after GTS
        torch.nn.init.normal_(p, std=0.1)
    return teacher, model


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def _changed(before, m):
    return any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_gts_step_trains_the_model_and_head_only_freezes_the_backbone(nets):
    teacher, model = nets
    labels = torch.zeros(16, dtype=torch.long)
    tokens = teacher.embed(teacher.sample(labels, generator=torch.Generator().manual_seed(0)))
    bb = _params(model.backbone)
    up = TorchUpdater(torch.optim.Adam(model.parameters(), lr=1e-3))
    m = gts_step(model, up, teacher, tokens, labels, GTSConfig(head_only=True), rng=torch.Generator().manual_seed(1))
    assert m["loss_gts"].dim() == 0 and torch.isfinite(m["loss_gts"])
    assert not _changed(bb, model.backbone)
    gts_step(model, up, teacher, tokens, labels, GTSConfig(), rng=torch.Generator().manual_seed(1))
    assert _changed(bb, model.backbone)


def test_guidance_step_updates_only_the_guidance(nets):
    teacher, model = nets
    gen, gui = OneStepGenerator.from_ar_diffusion(model), copy.deepcopy(model)
    g_before, p_before = _params(gen), _params(gui)
    up = TorchUpdater(torch.optim.Adam(gui.parameters(), lr=1e-3))
    cfg = CSDConfig(fcs_draws=3)
    m = guidance_step(gui, up, gen, torch.zeros(8, dtype=torch.long), cfg, rng=torch.Generator().manual_seed(0))
    assert torch.isfinite(m["loss_fcs"]) and _changed(p_before, gui) and not _changed(g_before, gen)
    assert all(p.grad is None for p in gen.parameters())


def test_generator_step_gives_the_guidance_no_gradient(nets):
    teacher, model = nets
    gen, gui = OneStepGenerator.from_ar_diffusion(model), copy.deepcopy(model)
    for p in gui.head.parameters():  # make guidance differ from the teacher so CSD has a signal
        p.data.add_(0.05 * torch.randn_like(p))
    g_before, p_before = _params(gen), _params(gui)
    up = TorchUpdater(torch.optim.Adam(gen.parameters(), lr=1e-3))
    for snap in (False, True):
        cfg = CSDConfig(snap_prefix=snap)
        m = generator_step(gen, up, gui, teacher, torch.zeros(8, dtype=torch.long), cfg, rng=torch.Generator())
        assert torch.isfinite(m["loss_csd"])
    assert _changed(g_before, gen) and not _changed(p_before, gui)
    assert all(p.grad is None for p in gui.parameters())
    assert all(p.requires_grad for p in gui.parameters())  # frozen only during the step


class _NoStep(TorchUpdater):
    """Records the loss and the generator gradient of one step; applies nothing."""

    def __init__(self, params):
        self.params = list(params)
        super().__init__(torch.optim.SGD(self.params, lr=0.0))

    def step(self):
        self.grads = [p.grad.detach().clone() for p in self.params]
        self.optimizer.zero_grad(set_to_none=True)


def test_generator_step_csd_draws_average_the_loss_of_independent_draws(nets):
    from dd2_core.losses import csd_loss

    teacher, model = nets
    gen, gui = OneStepGenerator.from_ar_diffusion(model), copy.deepcopy(model)
    for p in gui.head.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    labels = torch.zeros(8, dtype=torch.long)

    def step(draws: int):
        up = _NoStep(gen.parameters())
        m = generator_step(
            gen, up, gui, teacher, labels, CSDConfig(csd_draws=draws), rng=torch.Generator().manual_seed(3)
        )
        return m["loss_csd"], up.grads

    # the same random stream by hand: noise, then (t, eps') per draw
    rng = torch.Generator().manual_seed(3)
    cfg = CSDConfig()
    with torch.no_grad():
        q = gen(gen.sample_noise(8, generator=rng), labels)
        log_probs, f = teacher.log_probs(q, labels), gui.features(q, labels)
        losses = []
        for _ in range(2):
            t = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(*q.shape[:2], 1, generator=rng)
            eps = torch.randn(q.shape, generator=rng)
            losses.append(csd_loss(q, gui.head, f, log_probs, teacher.codebook, t, eps).mean())
    one, g1 = step(1)
    two, g2 = step(2)
    torch.testing.assert_close(one, losses[0])
    torch.testing.assert_close(two, (losses[0] + losses[1]) / 2)
    assert g1 and any(not torch.equal(a, b) for a, b in zip(g1, g2, strict=True))  # a second draw changes it


def test_csd_round_runs_k_guidance_updates_and_is_seeded(nets):
    teacher, model = nets

    def run():
        gen, gui = OneStepGenerator.from_ar_diffusion(model), copy.deepcopy(model)
        gen_up, gui_up = CountingUpdater(gen.parameters()), CountingUpdater(gui.parameters())
        rng = torch.Generator().manual_seed(5)
        m = csd_round(gen, gen_up, gui, gui_up, teacher, lambda: torch.zeros(4, dtype=torch.long),
                      CSDConfig(guidance_updates=3), rng=rng)  # fmt: skip
        return gen_up.steps, gui_up.steps, m

    a, b = run(), run()
    assert a[:2] == (1, 3)
    assert torch.equal(a[2]["loss_csd"], b[2]["loss_csd"]) and torch.equal(a[2]["loss_fcs"], b[2]["loss_fcs"])


def test_regression_step_fits_targets(nets):
    _, model = nets
    gen = OneStepGenerator.from_ar_diffusion(model)
    up = TorchUpdater(torch.optim.Adam(gen.parameters(), lr=3e-3))
    g = torch.Generator().manual_seed(0)
    noise, target = torch.randn(32, 3, 2, generator=g), torch.randn(32, 3, 2, generator=g)
    labels = torch.zeros(32, dtype=torch.long)
    first = regression_step(gen, up, noise, target, labels)["loss_reg"]
    for _ in range(30):
        last = regression_step(gen, up, noise, target, labels)["loss_reg"]
    assert last < first


def test_ema_progressive_rule():
    assert ema_decay(0) == pytest.approx(0.1)
    assert ema_decay(90) == pytest.approx(0.91)
    assert ema_decay(10**7) == 0.9999
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    a0 = a.weight.detach().clone()
    d = ema_update(a, b, step=8)
    torch.testing.assert_close(a.weight, d * a0 + (1 - d) * b.weight)
    # a frozen parameter (VAR's phi convs) keeps the EMA's copy: on bf16 runs the model's is a rounding of it
    b.bias.requires_grad_(False)
    bias = a.bias.detach().clone()
    ema_update(a, b.bfloat16(), step=9)
    assert torch.equal(a.bias, bias) and not torch.equal(a.weight, a0)


def test_configs_reject_bad_values():
    with pytest.raises(ValidationError, match="t_min < t_max"):
        CSDConfig(t_min=0.9, t_max=0.5)
    with pytest.raises(ValidationError, match="guidance_updates"):
        CSDConfig(guidance_updates=0)
    with pytest.raises(ValidationError, match="extra"):
        GTSConfig(tmin=0.1)


def test_residual_guidance_starts_at_the_teacher_and_needs_it(nets):
    from dd2_train.steps import start_residual_guidance

    teacher, model = nets
    gen, gui = OneStepGenerator.from_ar_diffusion(model), start_residual_guidance(copy.deepcopy(model))
    assert gui.head.final.linear.weight.abs().max() == 0  # zero residual: psi == teacher exactly
    cfg = CSDConfig(guidance_residual=True, snap_prefix=True)
    labels = torch.zeros(8, dtype=torch.long)
    up = TorchUpdater(torch.optim.Adam(gui.parameters(), lr=1e-3))
    with pytest.raises(ValueError, match="need the teacher"):
        guidance_step(gui, up, gen, labels, cfg, rng=torch.Generator().manual_seed(0))
    # with a zero residual the generator gets no CSD signal (psi is the teacher) ...
    gen_up = _NoStep(gen.parameters())
    m = generator_step(gen, gen_up, gui, teacher, labels, cfg, rng=torch.Generator().manual_seed(1))
    assert m["loss_csd"] == 0 and all(g.abs().max() == 0 for g in gen_up.grads)
    # ... until FCS has fitted the residual to the generator's samples
    for i in range(3):
        guidance_step(gui, up, gen, labels, cfg, teacher=teacher, rng=torch.Generator().manual_seed(2 + i))
    assert gui.head.final.linear.weight.abs().max() > 0
    m = generator_step(gen, gen_up, gui, teacher, labels, cfg, rng=torch.Generator().manual_seed(1))
    assert m["loss_csd"] != 0 and any(g.abs().max() > 0 for g in gen_up.grads)


# -- flow-map regression (on-policy and offline) and anchored CSD --------------------------------------------------
def _fine_flow(noise, log_probs, codebook, steps=1000):
    """An independent reference: classical RK4 in float64 on a fine grid t = (1 - k/steps)^2, with the mixture
    posterior written out directly (no dd2_core.scores); every token is its own ODE (batched only for speed)."""
    cb = codebook.double()
    lp = log_probs.double()

    def vel(x, t):
        d2 = ((x.unsqueeze(-2) - (1 - t) * cb) ** 2).sum(-1)  # (B, N, V)
        w = torch.softmax(lp - d2 / (2 * t * t), -1)
        return (x - w @ cb) / t

    grid = [(1 - k / steps) ** 2 for k in range(steps + 1)]
    x = noise.double()
    for t0, t1 in zip(grid[:-1], grid[1:]):
        h = t1 - t0
        if t1 == 0.0:  # last step: lands on the posterior mean (x - t v = x0_hat)
            return x + h * vel(x, t0)
        k1 = vel(x, t0)
        k2 = vel(x + h / 2 * k1, t0 + h / 2)
        k3 = vel(x + h / 2 * k2, t0 + h / 2)
        k4 = vel(x + h * k3, t1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_flow_map_target_is_the_per_token_teacher_flow(nets):
    teacher, _ = nets
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(6, 3, 2, generator=g)
    log_probs = teacher.log_probs(
        teacher.embed(torch.randint(4, (6, 3), generator=g)), torch.zeros(6, dtype=torch.long)
    )
    ref = _fine_flow(noise, log_probs, teacher.codebook)
    got = flow_map_target(noise, log_probs, teacher.codebook, steps=2048, power=2.0)
    assert (got.double() - ref).abs().max() <= 1e-3
    # the default grid (32 Euler steps) ends on the same code for every token here
    coarse = flow_map_target(noise, log_probs, teacher.codebook, steps=32, power=2.0)
    assert torch.equal(nearest_code(coarse, teacher.codebook), nearest_code(ref.float(), teacher.codebook))


class _MapGenerator(torch.nn.Module):
    """A 'generator' that is exactly DD1's map F (teacher_flow_map), plus a dummy parameter for the updater."""

    def __init__(self, teacher, steps):
        super().__init__()
        self.teacher, self.steps = teacher, steps
        self.w = torch.nn.Parameter(torch.zeros(()))

    def sample_noise(self, batch, *, device=None, dtype=None, generator=None):
        return torch.randn(batch, self.teacher.num_tokens, 2, device=device, dtype=dtype, generator=generator)

    def forward_with_features(self, noise, labels):
        tokens = teacher_flow_map(self.teacher, noise, labels, steps=self.steps) + 0 * self.w
        return tokens, tokens  # no backbone features (alignment is off)

    def forward(self, noise, labels):
        return self.forward_with_features(noise, labels)[0]


def test_dd1_map_has_zero_onpolicy_loss(nets):
    teacher, model = nets
    labels = torch.zeros(16, dtype=torch.long)
    fixed = _MapGenerator(teacher, steps=32)
    up = TorchUpdater(torch.optim.SGD(fixed.parameters(), lr=0.0))
    cfg = RegressConfig(snap_prefix=False, flow_steps=32)
    m = onpolicy_regression_step(fixed, up, teacher, labels, cfg, rng=torch.Generator().manual_seed(0))
    assert m["loss_reg"] < 1e-10
    gen = OneStepGenerator.from_ar_diffusion(model)  # not the map: a positive loss, and the generator trains
    before = _params(gen)
    up = TorchUpdater(torch.optim.Adam(gen.parameters(), lr=1e-3))
    m = onpolicy_regression_step(gen, up, teacher, labels, RegressConfig(), rng=torch.Generator().manual_seed(0))
    assert m["loss_reg"] > 1e-3 and _changed(before, gen)


def test_onpolicy_regression_converges_toward_the_map(nets):
    teacher, model = nets
    gen = OneStepGenerator.from_ar_diffusion(model)
    up = TorchUpdater(torch.optim.Adam(gen.parameters(), lr=3e-3))
    rng = torch.Generator().manual_seed(0)
    labels = torch.zeros(32, dtype=torch.long)
    losses = [
        onpolicy_regression_step(gen, up, teacher, labels, RegressConfig(), rng=rng)["loss_reg"] for _ in range(40)
    ]
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])


def test_anchored_csd_with_lambda_zero_is_todays_csd_bit_for_bit(nets):
    teacher, model = nets
    labels = torch.zeros(8, dtype=torch.long)
    results = []
    for cfg in (CSDConfig(), CSDConfig(anchor_weight=0.0, anchor_final=0.0, anchor_steps=5, flow_steps=8)):
        torch.manual_seed(0)
        gen, gui = OneStepGenerator.from_ar_diffusion(model), copy.deepcopy(model)
        up = TorchUpdater(torch.optim.Adam(gen.parameters(), lr=1e-3))
        m = generator_step(gen, up, gui, teacher, labels, cfg, rng=torch.Generator().manual_seed(1), step=3)
        results.append((m, [p.detach().clone() for p in gen.parameters()]))
    (m0, p0), (m1, p1) = results
    assert set(m0) == set(m1) == {"loss_csd"} and torch.equal(m0["loss_csd"], m1["loss_csd"])
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))


def test_anchor_adds_the_flow_map_regression_and_its_schedule(nets):
    teacher, model = nets
    cfg = CSDConfig(anchor_weight=2.0, anchor_final=0.5, anchor_steps=4, flow_steps=8)
    assert [cfg.anchor_at(s) for s in (0, 2, 4, 9)] == [2.0, 1.25, 0.5, 0.5]
    assert CSDConfig(anchor_weight=0.3).anchor_at(10**6) == 0.3
    labels = torch.zeros(8, dtype=torch.long)
    gen, gui = OneStepGenerator.from_ar_diffusion(model), copy.deepcopy(model)
    up = TorchUpdater(torch.optim.SGD(gen.parameters(), lr=0.0))
    m = generator_step(gen, up, gui, teacher, labels, cfg, rng=torch.Generator().manual_seed(1), step=2)
    assert m["anchor_lambda"] == 1.25 and m["loss_anchor"] > 0
    # the anchor's value is the on-policy regression loss of the same noise and prefix
    m2 = onpolicy_regression_step(gen, up, teacher, labels, RegressConfig(snap_prefix=False, flow_steps=8),
                                  rng=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.allclose(m["loss_anchor"], m2["loss_reg"], rtol=1e-5)


def test_sid_sequence_weighting_normalises_per_sequence(nets):
    teacher, model = nets
    torch.manual_seed(0)
    q = teacher.embed(torch.randint(4, (4, 3))) + 0.1 * torch.randn(4, 3, 2)
    f = model.features(q, torch.zeros(4, dtype=torch.long))
    lp = teacher.log_probs(q, torch.zeros(4, dtype=torch.long))
    t, eps = torch.full((4, 3, 1), 0.5), torch.randn(4, 3, 2)
    args = (q, model.head, f, lp, teacher.codebook, t, eps)
    none, seq = csd_loss(*args, weighting="none"), csd_loss(*args, weighting="sid_seq")
    with torch.no_grad():
        f_teacher = teacher_x0_hat(noisy(q, eps, t), t, lp, teacher.codebook)
        omega = 1 / (q - f_teacher).abs().mean((1, 2))  # (B,)
    assert torch.allclose(seq, none * omega[:, None], rtol=1e-5)
    with pytest.raises(ValueError, match="sid_seq"):
        csd_loss(*args, weighting="bogus")


def test_prefix_feature_alignment_pulls_noise_features_toward_a(nets):
    teacher, model = nets
    labels = torch.zeros(16, dtype=torch.long)
    gen = OneStepGenerator.from_ar_diffusion(model)
    up = TorchUpdater(torch.optim.Adam(gen.parameters(), lr=1e-3))
    cfg = RegressConfig(align_weight=1.0)
    with pytest.raises(ValueError, match="reference"):
        onpolicy_regression_step(gen, up, teacher, labels, cfg, rng=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model).requires_grad_(False)
    m = onpolicy_regression_step(gen, up, teacher, labels, cfg, rng=torch.Generator().manual_seed(0),
                                 reference=reference)  # fmt: skip
    assert m["loss_align"] > 0 and set(m) == {"loss_reg", "loss_align"}
    gui = copy.deepcopy(model)
    m = generator_step(gen, up, gui, teacher, labels, CSDConfig(align_weight=0.5), reference=reference,
                       rng=torch.Generator().manual_seed(0))  # fmt: skip
    assert m["loss_align"] > 0 and "loss_anchor" not in m
