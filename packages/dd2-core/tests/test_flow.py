import pytest
import torch
from pydantic import ValidationError

from dd2_core import flow


def test_conversions_are_consistent():
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(3, 4, 2, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 2, generator=g, dtype=torch.float64),
    )
    t = torch.rand(3, 4, 1, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x_t = flow.noisy(x0, eps, t)
    v = flow.velocity(x0, eps)
    torch.testing.assert_close(flow.x0_from_v(x_t, v, t), x0)
    torch.testing.assert_close(flow.eps_from_v(x_t, v, t), eps)
    torch.testing.assert_close(flow.v_from_x0(x_t, x0, t), v)
    s = flow.score_from_x0(x_t, x0, t)  # the conditional score of q(x_t | x0) = -eps / t
    torch.testing.assert_close(s, -eps / t)
    torch.testing.assert_close(flow.x0_from_score(x_t, s, t), x0)
    torch.testing.assert_close(flow.v_from_score(x_t, s, t), v)
    torch.testing.assert_close(flow.score_from_v(x_t, v, t), s)


def test_sample_t_range_and_seed():
    a = flow.sample_t((1000, 1), 0.1, 0.9, generator=torch.Generator().manual_seed(0))
    b = flow.sample_t((1000, 1), 0.1, 0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.min() >= 0.1 and a.max() <= 0.9


def test_flow_config_checks():
    with pytest.raises(ValidationError, match="t_min < t_max"):
        flow.FlowConfig(t_min=0.5, t_max=0.4)
    with pytest.raises(ValidationError):
        flow.FlowConfig(t_min=0.0)
