"""The VAR transformer against the official code's golden outputs; KV-cached sampler vs teacher forcing; backbone."""

from pathlib import Path

import pytest
import torch

from dd2_core.checkpoint import load_strict
from dd2_core.diffusion import ARDiffusion
from dd2_core.errors import DD2ValueError
from dd2_core.heads import HeadConfig, VelocityHead
from dd2_core.logits import SamplingPolicy, cfg_combine, guidance_weights, policy_log_probs
from dd2_core.models.var import VAR, VARBackbone, VARConfig, sample_var
from dd2_core.models.var_vqvae import VARVQVAE, VARVQVAEConfig
from dd2_core.teacher import group_slices

TINY = VARConfig(depth=2, embed_dim=64, num_heads=2, num_classes=5, vocab_size=32, token_dim=4, patch_nums=(1, 2, 3, 4))
TINY_VQ = VARVQVAEConfig(vocab_size=32, token_dim=4, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 3, 4))


def golden_models(golden: Path) -> tuple[VAR, VARVQVAE, dict]:
    g = torch.load(golden / "var.pt", weights_only=False)
    c = g["config"]
    cfg = VARConfig(
        depth=c["depth"],
        embed_dim=c["embed_dim"],
        num_heads=c["num_heads"],
        mlp_ratio=c["mlp_ratio"],
        norm_eps=c["norm_eps"],
        num_classes=c["num_classes"],
        vocab_size=c["vocab_size"],
        token_dim=c["Cvae"],
        patch_nums=tuple(c["patch_nums"]),
    )
    vq_cfg = VARVQVAEConfig(vocab_size=c["vocab_size"], token_dim=c["Cvae"], ch=c["ch"], patch_nums=cfg.patch_nums)
    var, vq = VAR(cfg).eval(), VARVQVAE(vq_cfg).eval()
    assert list(var.state_dict()) == list(g["var_state_dict"])  # same keys, same order, buffers included
    load_strict(var, g["var_state_dict"], expected="golden VAR")
    load_strict(vq, g["vae_state_dict"], expected="golden VAR VQVAE")
    return var, vq, g


def tiny_models(seed: int = 0) -> tuple[VAR, VARVQVAE]:
    torch.manual_seed(seed)
    var, vq = VAR(TINY).eval(), VARVQVAE(TINY_VQ).eval()
    with torch.no_grad():  # random weights with non-trivial gates, attention scales and head
        for blk in var.blocks:
            blk.ada_lin[1].weight.normal_(0, 0.05)
            blk.attn.scale_mul_1H11.uniform_(1.0, 5.5)  # some heads above the ln(100) cap
        var.head.weight.normal_(0, 0.3)
        vq.codebook.normal_()
    return var, vq


def read_shapes(path: Path) -> list[tuple[str, str, str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, dtype = line.split("\t")
            rows.append((name, shape, dtype))
    return rows


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_full_size_state_dict_keys_and_shapes(golden, depth):
    with torch.device("meta"):
        var = VAR(VARConfig(depth=depth))
    got = [(k, str(tuple(v.shape)), str(v.dtype).removeprefix("torch.")) for k, v in var.state_dict().items()]
    assert got == read_shapes(golden / "shapes" / "full" / f"var_d{depth}.txt")


def test_golden_teacher_forced_logits(golden):
    var, _, g = golden_models(golden)
    null = torch.full_like(g["labels"], var.cfg.num_classes)
    with torch.no_grad():
        torch.testing.assert_close(var(g["labels"], g["var_input"]), g["logits_cond"], atol=1e-5, rtol=0)
        torch.testing.assert_close(var(null, g["var_input"]), g["logits_null"], atol=1e-5, rtol=0)


def test_golden_kv_cached_step_logits_and_image(golden):
    var, vq, g = golden_models(golden)
    ids = torch.cat(g["scale_indices"], dim=1)
    policy = SamplingPolicy(cfg_scale=g["cfg"], cfg_schedule="ramp", top_k=0, top_p=0.0, top_p_rule="var")
    out = sample_var(var, vq, g["labels"], policy, ids=ids, return_logits=True)
    torch.testing.assert_close(out.logits, g["ar_step_logits"], atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close((vq.decode_fhat(out.f_hat) + 1) / 2, g["image"], atol=1e-4, rtol=0)
    # the golden sequence was drawn by the official sampler seeded with 0: the same RNG stream gives the same ids
    drawn = sample_var(var, vq, g["labels"], policy, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn.ids, ids)


def test_sampler_step_logits_equal_one_teacher_forced_pass():
    var, vq = tiny_models()
    labels = torch.tensor([0, 3, 4])
    policy = SamplingPolicy(cfg_scale=2.0, cfg_schedule="ramp", top_k=12, top_p=0.9, top_p_rule="var")
    out = sample_var(var, vq, labels, policy, generator=torch.Generator().manual_seed(1), return_logits=True)
    with torch.no_grad():
        x_in = vq.next_scale_input(vq.ids_to_tokens(out.ids))
        cond = var(labels, x_in)
        uncond = var(torch.full_like(labels, TINY.num_classes), x_in)
    tf = cfg_combine(cond, uncond, guidance_weights(policy, TINY.token_groups))
    torch.testing.assert_close(out.logits, tf, atol=1e-5, rtol=1e-5)
    expected = policy_log_probs(cond, uncond, policy, TINY.token_groups)
    assert torch.equal(expected.isfinite(), out.log_probs.isfinite())
    finite = expected.isfinite()
    torch.testing.assert_close(out.log_probs[finite], expected[finite], atol=1e-5, rtol=1e-5)
    assert bool((out.log_probs.gather(-1, out.ids.unsqueeze(-1)) > -torch.inf).all())  # drawn codes survived filtering


def test_sampler_is_seeded_and_unguided_without_cfg():
    var, vq = tiny_models()
    labels = torch.tensor([1, 2])
    policy = SamplingPolicy(cfg_scale=0.0, cfg_schedule="ramp", top_k=0, top_p=0.0, top_p_rule="var")
    a = sample_var(var, vq, labels, policy, generator=torch.Generator().manual_seed(5), return_logits=True)
    b = sample_var(var, vq, labels, policy, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.ids, b.ids)
    with torch.no_grad():
        tf = var(labels, vq.next_scale_input(vq.ids_to_tokens(a.ids)))
    torch.testing.assert_close(a.logits, tf, atol=1e-5, rtol=1e-5)


def test_backbone_features_feed_the_teacher_head(golden):
    var, vq, g = golden_models(golden)
    bb = VARBackbone.from_teacher(var, vq)
    assert bb.token_groups == (1, 4, 9, 16) and bb.feature_dim == 128 and bb.var.head is None
    tokens = vq.ids_to_tokens(torch.cat(g["scale_indices"], dim=1)).detach()
    with torch.no_grad():
        f = bb(tokens, g["labels"])  # (B, N, C)
        torch.testing.assert_close(var.head(f), g["logits_cond"], atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in bb.phi.parameters())


def test_backbone_is_block_causal_by_scale():
    var, vq = tiny_models()
    bb = VARBackbone.from_teacher(var, vq).eval()
    labels = torch.tensor([1, 4])
    tokens = torch.randn(2, TINY.num_tokens, TINY.token_dim)
    slices = group_slices(TINY.token_groups)
    with torch.no_grad():
        base = bb(tokens, labels)
        for k, sl in enumerate(slices):
            pert = tokens.clone()
            pert[:, sl] += torch.randn_like(pert[:, sl])
            f = bb(pert, labels)
            seen = slices[k].stop  # features of scales <= k must not move
            assert torch.equal(f[:, :seen], base[:, :seen]), f"scale {k} leaked into scales <= {k}"
            if k + 1 < len(slices):
                assert not torch.allclose(f[:, slices[k + 1]], base[:, slices[k + 1]]), (
                    f"scale {k + 1} ignores scale {k}"
                )


def test_backbone_plugs_into_ar_diffusion():
    var, vq = tiny_models()
    bb = VARBackbone.from_teacher(var, vq)
    model = ARDiffusion(bb, VelocityHead(HeadConfig(token_dim=4, cond_dim=64, width=32, depth=1)))
    x = torch.randn(2, TINY.num_tokens, 4)
    v = model(x, torch.full((2, TINY.num_tokens, 1), 0.5), x, torch.tensor([0, 5]))  # 5 = null class
    assert v.shape == x.shape
    v.sum().backward()
    assert bb.var.blocks[0].attn.mat_qkv.weight.grad is not None


def test_bad_inputs_give_clear_errors():
    var, vq = tiny_models()
    with pytest.raises(DD2ValueError, match=r"x_in: expected shape \(2, 29, 4\), got \(2, 30, 4\)"):
        var(torch.tensor([0, 1]), torch.zeros(2, 30, 4))
    with pytest.raises(DD2ValueError, match=r"labels: expected class ids in \[0, 5\]"):
        sample_var(var, vq, torch.tensor([6]), SamplingPolicy())
    bb = VARBackbone.from_teacher(var, vq)
    with pytest.raises(DD2ValueError, match=r"tokens: expected shape \(\*, 30, 4\), got \(2, 30, 8\)"):
        bb(torch.zeros(2, 30, 8), torch.tensor([0, 1]))
    with pytest.raises(DD2ValueError, match="with_head=False"):
        bb.var(torch.tensor([0]), torch.zeros(1, 29, 4))
    other = VAR(
        VARConfig(
            depth=3, embed_dim=64, num_heads=2, num_classes=5, vocab_size=32, token_dim=4, patch_nums=(1, 2, 3, 4)
        )
    )
    with pytest.raises(DD2ValueError, match="does not match backbone"):
        bb.init_from_teacher(other, vq)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        VARConfig(depth=3, embed_dim=64)
