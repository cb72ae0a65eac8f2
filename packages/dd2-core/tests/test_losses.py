import torch
from torch import nn

from dd2_core.flow import noisy, velocity
from dd2_core.heads import HeadConfig, VelocityHead
from dd2_core.losses import csd_loss, fcs_loss, gts_loss
from dd2_core.scores import teacher_velocity, teacher_x0_hat


class ExactTeacherHead(nn.Module):
    """A 'head' whose velocity is the teacher's exact one for fixed log-probs (ignores f)."""

    def __init__(self, log_probs, codebook, scale=1.0):
        super().__init__()
        self.log_probs, self.codebook, self.scale = log_probs, codebook, scale
        self.w = nn.Parameter(torch.ones(()))  # a parameter, to check it receives no gradient when frozen

    def forward(self, x_t, t, f):
        lp = self.log_probs.repeat(x_t.shape[0] // self.log_probs.shape[0], 1, 1)
        return self.w * self.scale * teacher_velocity(x_t, t, lp, self.codebook)


def _setup(seed=0, b=4, n=3, v=6, c=2):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(v, c, generator=g)
    log_probs = (torch.randn(b, n, v, generator=g) * 2).log_softmax(-1)
    x0 = torch.randn(b, n, c, generator=g)
    t = torch.rand(b, n, 1, generator=g) * 0.9 + 0.05
    eps = torch.randn(b, n, c, generator=g)
    return codebook, log_probs, x0, t, eps


def test_gts_is_zero_at_the_exact_velocity_and_positive_elsewhere():
    codebook, log_probs, x0, t, eps = _setup()
    f = torch.zeros(*x0.shape[:2], 5)
    exact = ExactTeacherHead(log_probs, codebook)
    loss = gts_loss(exact, x0, f, log_probs, codebook, t, eps)
    assert loss.shape == x0.shape[:2]
    assert loss.abs().max() < 1e-10
    assert gts_loss(ExactTeacherHead(log_probs, codebook, scale=1.1), x0, f, log_probs, codebook, t, eps).min() > 0


def test_fcs_is_the_dsm_regression_with_m_draws():
    _, _, x0, _, _ = _setup()
    m = 3
    head = VelocityHead(HeadConfig(token_dim=2, cond_dim=5, width=16, depth=1))
    nn.init.normal_(head.final.linear.weight)
    f = torch.randn(*x0.shape[:2], 5)
    g = torch.Generator().manual_seed(3)
    t = torch.rand(m * x0.shape[0], x0.shape[1], 1, generator=g)
    eps = torch.randn(m * x0.shape[0], *x0.shape[1:], generator=g)
    loss = fcs_loss(head, x0, f, t, eps, num_draws=m)
    assert loss.shape == (m * x0.shape[0], x0.shape[1])
    x0m, fm = x0.repeat(m, 1, 1), f.repeat(m, 1, 1)
    ref = (head(noisy(x0m, eps, t), t, fm) - velocity(x0m, eps)).pow(2).mean(-1)
    torch.testing.assert_close(loss, ref)


def test_csd_gradient_vanishes_when_guidance_equals_teacher():
    codebook, log_probs, x0, t, eps = _setup()
    q = x0.clone().requires_grad_(True)
    f = torch.zeros(*x0.shape[:2], 5)
    head = ExactTeacherHead(log_probs, codebook).requires_grad_(False)
    for weighting in ("sid", "none"):
        loss = csd_loss(q, head, f, log_probs, codebook, t, eps, weighting=weighting)
        assert loss.abs().max() < 1e-6
        (grad,) = torch.autograd.grad(loss.sum(), q)
        assert grad.abs().max() < 1e-5


def test_csd_gradient_matches_the_sid_formula_and_is_nonzero_otherwise():
    codebook, log_probs, x0, t, eps = _setup(seed=1)
    q = x0.clone().requires_grad_(True)
    f = torch.zeros(*x0.shape[:2], 5)
    head = ExactTeacherHead(log_probs.roll(1, -1), codebook).requires_grad_(False)  # a wrong 'fake' score
    loss = csd_loss(q, head, f, log_probs, codebook, t, eps, weighting="none")
    # direct evaluation of omega (f_Phi - f_psi).(f_psi - q) with omega = 1
    x_t = (1 - t) * q + t * eps
    f_phi = teacher_x0_hat(x_t, t, log_probs, codebook)
    f_psi = x_t - t * head(x_t, t, f)
    torch.testing.assert_close(loss, ((f_phi - f_psi) * (f_psi - q)).sum(-1))
    (grad,) = torch.autograd.grad(loss.sum(), q)
    assert grad.abs().max() > 1e-3


def test_csd_sid_weight_is_detached_and_positive():
    codebook, log_probs, x0, t, eps = _setup(seed=2)
    q = x0.clone().requires_grad_(True)
    head = ExactTeacherHead(log_probs.roll(2, -1), codebook).requires_grad_(False)
    f = torch.zeros(*x0.shape[:2], 5)
    a = csd_loss(q, head, f, log_probs, codebook, t, eps, weighting="sid")
    b = csd_loss(q, head, f, log_probs, codebook, t, eps, weighting="none")
    with torch.no_grad():
        x_t = (1 - t) * q + t * eps
        omega = 1 / (q - teacher_x0_hat(x_t, t, log_probs, codebook)).abs().mean(-1).clamp_min(1e-5)
    torch.testing.assert_close(a, omega * b)


class ConstantHead(nn.Module):
    """A residual 'head' predicting a fixed velocity offset."""

    def __init__(self, offset):
        super().__init__()
        self.offset = nn.Parameter(torch.as_tensor(offset, dtype=torch.float32))

    def forward(self, x_t, t, f):
        return self.offset.expand_as(x_t)


def test_residual_guidance_is_the_teacher_plus_the_head():
    codebook, log_probs, x0, t, eps = _setup(seed=3)
    f = torch.zeros(*x0.shape[:2], 5)
    # FCS: with a zero residual the prediction is exactly the teacher's velocity
    zero = ConstantHead(0.0)
    got = fcs_loss(zero, x0, f, t, eps, teacher_log_probs=log_probs, codebook=codebook)
    x_t = noisy(x0, eps, t)
    want = (teacher_velocity(x_t, t, log_probs, codebook) - velocity(x0, eps)).pow(2).mean(-1)
    torch.testing.assert_close(got, want)
    # the residual is added to it, and only the head gets a gradient
    shift = ConstantHead(0.3)
    loss = fcs_loss(shift, x0, f, t, eps, teacher_log_probs=log_probs, codebook=codebook)
    torch.testing.assert_close(
        loss, (teacher_velocity(x_t, t, log_probs, codebook) + 0.3 - velocity(x0, eps)).pow(2).mean(-1)
    )
    loss.sum().backward()
    assert shift.offset.grad is not None and shift.offset.grad != 0
    # CSD: a zero residual means psi == teacher: loss and generator gradient vanish exactly
    q = x0.clone().requires_grad_(True)
    csd = csd_loss(q, zero, f, log_probs, codebook, t, eps, weighting="none", residual=True)
    assert csd.abs().max() == 0
    csd.sum().backward()
    assert q.grad.abs().max() == 0
    # a non-zero residual r: f_Phi - f_psi = t r, so L = (t r) . (f_Phi - t r - q)
    q2 = x0.clone().requires_grad_(True)
    r = ConstantHead(0.2)
    csd = csd_loss(q2, r, f, log_probs, codebook, t, eps, weighting="none", residual=True)
    f_teacher = teacher_x0_hat(noisy(x0, eps, t), t, log_probs, codebook)
    torch.testing.assert_close(csd, (t * 0.2 * (f_teacher - t * 0.2 - x0)).sum(-1))
