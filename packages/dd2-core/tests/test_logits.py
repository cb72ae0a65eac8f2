import pytest
import torch
from pydantic import ValidationError

from dd2_core.errors import DD2ValueError
from dd2_core.logits import SamplingPolicy, guidance_weights, policy_log_probs, top_k_filter, top_p_filter


def _ref_top_p(logits_row, p, rule):
    # brute force over one row: sort descending, keep by the exclusive cumulative mass
    probs = torch.softmax(logits_row.double(), -1)
    order = torch.argsort(probs, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    mass = 0.0
    for rank, j in enumerate(order.tolist()):
        ok = mass <= p if rule == "hf" else mass < p
        keep[j] = ok or rank == 0
        mass += float(probs[j])
    return keep


def test_cfg_constant_and_ramp_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    groups = (1, 4, 9)
    cond, uncond = torch.randn(2, 14, 10, generator=g), torch.randn(2, 14, 10, generator=g)
    lp = policy_log_probs(cond, uncond, SamplingPolicy(cfg_scale=2.0), groups)
    torch.testing.assert_close(lp, (uncond + 2.0 * (cond - uncond)).log_softmax(-1))
    # VAR: t = cfg * si / (S - 1); logits = (1 + t) c - t u
    lp = policy_log_probs(cond, uncond, SamplingPolicy(cfg_scale=1.5, cfg_schedule="ramp"), groups)
    si = torch.tensor([0] + [1] * 4 + [2] * 9, dtype=torch.float32)
    tg = (1.5 * si / 2).view(1, -1, 1)
    torch.testing.assert_close(lp, ((1 + tg) * cond - tg * uncond).log_softmax(-1))
    w = guidance_weights(SamplingPolicy(cfg_scale=1.5, cfg_schedule="ramp"), groups)
    assert w[0] == 1.0 and w[-1] == 2.5


def test_temperature_then_top_k():
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(1, 3, 20, generator=g)
    lp = policy_log_probs(cond, None, SamplingPolicy(temperature=0.5, top_k=4), (1, 1, 1))
    scaled = cond / 0.5
    kth = scaled.topk(4, -1).values[..., -1:]
    ref = scaled.masked_fill(scaled < kth, float("-inf")).log_softmax(-1)
    torch.testing.assert_close(lp, ref)
    assert (lp > float("-inf")).sum(-1).eq(4).all()


@pytest.mark.parametrize("rule", ["hf", "var"])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 0.95, 1.0])
def test_top_p_matches_brute_force(rule, p):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 30, generator=g) * 2
    out = top_p_filter(logits, p, rule)
    for r in range(5):
        active = (rule == "hf" and p < 1.0) or (rule == "var" and p > 0.0)
        expect = _ref_top_p(logits[r], p, rule) if active else torch.ones(30, dtype=torch.bool)
        assert torch.equal(out[r] > float("-inf"), expect)


def test_top_k_ties_keep_all_equal_values_and_k_ge_v_is_noop():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert torch.equal(top_k_filter(logits, 2) > float("-inf"), torch.tensor([[False, True, True, False]]))
    assert torch.equal(top_k_filter(logits, 4), logits)


@pytest.mark.parametrize("k", [1, 7, 50, 99])
def test_top_k_matches_a_full_sort(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randint(-20, 20, (6, 5, 100), generator=g).float() / 4  # many ties
    threshold = torch.sort(logits, dim=-1, descending=True).values[..., k - 1 : k]  # the k-th largest, by a sort
    expect = logits.masked_fill(logits < threshold, float("-inf"))
    assert torch.equal(top_k_filter(logits, k), expect)


def test_policy_errors():
    with pytest.raises(DD2ValueError, match="uncond"):
        policy_log_probs(torch.randn(1, 2, 3), None, SamplingPolicy(cfg_scale=2.0), (1, 1))
    with pytest.raises(DD2ValueError, match="cond logits"):
        policy_log_probs(torch.randn(1, 3, 3), None, SamplingPolicy(), (1, 1))
    with pytest.raises(ValidationError, match="temperature"):
        SamplingPolicy(temperature=0.0)
    with pytest.raises(ValidationError, match="extra"):
        SamplingPolicy(topk=3)
