import pytest
import torch

from dd2_core.errors import DD2ValueError
from dd2_core.sampling import integrate_teacher_flow
from dd2_core.scores import posterior_weights, teacher_score, teacher_velocity, teacher_x0_hat


def _setup(b=2, n=3, v=16, c=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.randn(v, c, generator=g, dtype=dtype)
    log_probs = torch.randn(b, n, v, generator=g, dtype=dtype).log_softmax(-1)
    x_t = torch.randn(b, n, c, generator=g, dtype=dtype)
    t = torch.rand(b, n, 1, generator=g, dtype=dtype) * 0.9 + 0.05
    return x_t, t, log_probs, codebook


def _log_density(x_t, t, log_probs, codebook):
    # log p_t(x_t) = logsumexp_j( log p_j + log N(x_t; (1 - t) c_j, t^2 I) ), brute force over (B, N, V, C)
    c = codebook.shape[1]
    sq = (x_t.unsqueeze(-2) - (1 - t).unsqueeze(-1) * codebook).pow(2).sum(-1)  # (B, N, V)
    log_norm = -0.5 * c * torch.log(2 * torch.pi * t.pow(2))
    return torch.logsumexp(log_probs - sq / (2 * t.pow(2)), -1) + log_norm.squeeze(-1)


def test_score_equals_autograd_of_mixture_density():
    x_t, t, log_probs, codebook = _setup()
    x = x_t.clone().requires_grad_(True)
    (s_ref,) = torch.autograd.grad(_log_density(x, t, log_probs, codebook).sum(), x)
    s = teacher_score(x_t, t, log_probs, codebook)
    assert ((s - s_ref).abs() / s_ref.abs().clamp_min(1e-12)).max() < 1e-6
    # Tweedie and the velocity conversion of method.md 2
    x0 = teacher_x0_hat(x_t, t, log_probs, codebook)
    torch.testing.assert_close(x0, (x_t + t**2 * s_ref) / (1 - t), rtol=1e-9, atol=1e-9)
    v = teacher_velocity(x_t, t, log_probs, codebook)
    torch.testing.assert_close(v, (-t * s_ref - x_t) / (1 - t), rtol=1e-8, atol=1e-8)


def test_masked_codes_get_no_posterior_mass():
    x_t, t, log_probs, codebook = _setup()
    log_probs = log_probs.clone()
    log_probs[..., :5] = float("-inf")
    w = posterior_weights(x_t, t, log_probs, codebook)
    assert torch.all(w[..., :5] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w[..., 0]))
    assert torch.isfinite(teacher_x0_hat(x_t, t, log_probs, codebook)).all()


def test_chunked_equals_unchunked():
    x_t, t, log_probs, codebook = _setup(b=3, n=7, v=32, dtype=torch.float32)
    full = teacher_x0_hat(x_t, t, log_probs, codebook, chunk_rows=None)
    for rows in (1, 4, 5, 100):
        torch.testing.assert_close(teacher_x0_hat(x_t, t, log_probs, codebook, chunk_rows=rows), full)


def test_bf16_inputs_work_and_match_float32():
    x_t, t, log_probs, codebook = _setup(dtype=torch.float32)
    ref = teacher_x0_hat(x_t, t, log_probs, codebook)
    out = teacher_x0_hat(x_t.bfloat16(), t.bfloat16(), log_probs.bfloat16(), codebook.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1


def test_gradient_flows_through_x_t():
    x_t, t, log_probs, codebook = _setup(dtype=torch.float32)
    x = x_t.clone().requires_grad_(True)
    teacher_x0_hat(x, t, log_probs, codebook, chunk_rows=2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_euler_flow_reproduces_the_categorical():
    # two codes in 1-D (method.md 2) plus a 4-code 2-D case; each token integrated independently
    g = torch.Generator().manual_seed(1)
    codebook = torch.tensor([[0.0, 2.0], [2.0, 0.0], [-2.0, 0.0], [0.0, -2.0]])
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20000
    log_probs = p.log().expand(1, n, 4)
    x = integrate_teacher_flow(torch.randn(1, n, 2, generator=g), log_probs, codebook, steps=100)
    ids = torch.cdist(x[0], codebook).argmin(-1)
    freq = torch.bincount(ids, minlength=4).float() / n
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() < 4 * se + 2e-3).all(), (freq, p)
    assert torch.cdist(x[0], codebook).min(-1).values.max() < 1e-2  # lands on the codes


@pytest.mark.parametrize(
    ("field", "make", "msg"),
    [
        ("codebook", lambda x, t, lp, cb: (x, t, lp, cb[:0]), "codebook"),
        ("x_t", lambda x, t, lp, cb: (x[..., :2], t, lp, cb), "x_t"),
        ("log_probs", lambda x, t, lp, cb: (x, t, lp[..., :3], cb), "log_probs"),
        ("t0", lambda x, t, lp, cb: (x, torch.zeros_like(t), lp, cb), "(0, 1]"),
        ("t>1", lambda x, t, lp, cb: (x, t + 1.5, lp, cb), "(0, 1]"),
        ("tshape", lambda x, t, lp, cb: (x, t[..., 0], lp, cb), "t: expected"),
    ],
)
def test_bad_inputs_name_the_argument(field, make, msg):
    args = make(*_setup(dtype=torch.float32))
    with pytest.raises(DD2ValueError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        teacher_x0_hat(*args)
