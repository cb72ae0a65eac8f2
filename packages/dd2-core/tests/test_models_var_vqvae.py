"""VAR's multi-scale VQVAE against the official code's golden outputs, full-size key lists, and invariants."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from dd2_core.checkpoint import load_strict
from dd2_core.errors import DD2ValueError
from dd2_core.models.var_vqvae import VARVQVAE, VARVQVAEConfig, phi_index


def golden_vqvae(golden: Path) -> tuple[VARVQVAE, dict]:
    g = torch.load(golden / "var.pt", weights_only=False)
    c = g["config"]
    cfg = VARVQVAEConfig(
        vocab_size=c["vocab_size"],
        token_dim=c["Cvae"],
        ch=c["ch"],
        num_phi=c["share_quant_resi"],
        phi_ratio=c["quant_resi"],
        patch_nums=tuple(c["patch_nums"]),
    )
    vq = VARVQVAE(cfg).eval()
    load_strict(vq, g["vae_state_dict"], expected="golden VAR VQVAE")
    return vq, g


def read_shapes(path: Path) -> list[tuple[str, str, str]]:
    rows = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, dtype = line.split("\t")
            rows.append((name, shape, dtype))
    return rows


def shapes_of(module: torch.nn.Module) -> list[tuple[str, str, str]]:
    return [(k, str(tuple(v.shape)), str(v.dtype).removeprefix("torch.")) for k, v in module.state_dict().items()]


def test_phi_assignment_matches_the_official_table():
    assert phi_index(10, 4) == (0, 0, 1, 1, 1, 2, 2, 3, 3, 3)  # k = 2 is a float tie broken towards 1
    assert phi_index(4, 4) == (0, 1, 2, 3)


def test_full_size_state_dict_keys_and_shapes(golden):
    with torch.device("meta"):
        vq = VARVQVAE()
    assert shapes_of(vq) == read_shapes(golden / "shapes" / "full" / "var_vqvae.txt")


def test_golden_teacher_forcing_input_and_decoding(golden):
    vq, g = golden_vqvae(golden)
    ids = torch.cat(g["scale_indices"], dim=1)  # (B, N)
    with torch.no_grad():
        tokens = vq.ids_to_tokens(ids)
        torch.testing.assert_close(vq.next_scale_input(tokens), g["var_input"], atol=1e-5, rtol=0)
        img = vq.decode_ids(ids)
    torch.testing.assert_close(img, g["image_from_indices"], atol=1e-4, rtol=0)
    torch.testing.assert_close((img + 1) / 2, g["image"], atol=1e-4, rtol=0)


def test_continuous_tokens_use_the_same_construction(golden):
    vq, g = golden_vqvae(golden)
    ids = torch.cat(g["scale_indices"], dim=1)
    with torch.no_grad():
        codes = vq.codebook[ids]  # (B, N, C) continuous tensor equal to the code vectors
        assert torch.equal(vq.next_scale_input(codes), vq.next_scale_input(vq.ids_to_tokens(ids)))
        # a perturbed last scale changes f_hat but never the teacher-forcing input
        noisy = codes.clone()
        noisy[:, -16:] += torch.randn(2, 16, codes.shape[-1])
        assert torch.equal(vq.next_scale_input(noisy), vq.next_scale_input(codes))
        assert not torch.equal(vq.f_hat(noisy), vq.f_hat(codes))


def test_f_hat_is_the_sum_of_phi_residuals():
    cfg = VARVQVAEConfig(vocab_size=16, token_dim=4, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 4))
    vq = VARVQVAE(cfg).eval()
    tokens = torch.randn(2, 21, 4)
    with torch.no_grad():
        expected = torch.zeros(2, 4, 4, 4)
        start = 0
        for si, pn in enumerate(cfg.patch_nums):
            h = rearrange(tokens[:, start : start + pn * pn], "b (h w) c -> b c h w", h=pn)
            if pn != 4:
                h = F.interpolate(h, size=(4, 4), mode="bicubic")
            conv = vq.phi.qresi_ls[vq.phi.phi_of_scale[si]]
            expected += 0.5 * h + 0.5 * conv(h)
            start += pn * pn
        torch.testing.assert_close(vq.f_hat(tokens), expected)
        # the input of scale 2 is the area-downsampled f_hat of scales 0 and 1
        x_in = vq.next_scale_input(tokens)
        f01 = vq.phi.residual(rearrange(tokens[:, :1], "b (h w) c -> b c h w", h=1), 0) + vq.phi.residual(
            rearrange(tokens[:, 1:5], "b (h w) c -> b c h w", h=2), 1
        )
        torch.testing.assert_close(x_in[:, 4:], rearrange(f01, "b c h w -> b (h w) c"))  # pn_2 = H: area is identity


def test_encode_picks_the_nearest_code_of_each_residual():
    torch.manual_seed(0)
    cfg = VARVQVAEConfig(vocab_size=32, token_dim=4, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 4))
    vq = VARVQVAE(cfg).eval()
    img = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        f = vq.encode_latent(img)
        ids = vq.encode_ids(img)
        assert ids.shape == (2, 21) and ids.dtype == torch.long
        f_rest, start = f.clone(), 0
        for si, pn in enumerate(cfg.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if pn != 4 else f_rest
            z = rearrange(z, "b c h w -> b (h w) c")
            brute = torch.cdist(z, vq.codebook.unsqueeze(0).expand(2, -1, -1)).argmin(-1)  # (B, pn^2)
            assert torch.equal(ids[:, start : start + pn * pn], brute)
            h = rearrange(vq.codebook[brute], "b (h w) c -> b c h w", h=pn)
            f_rest = f_rest - vq.phi.residual(h, si)
            start += pn * pn
        assert vq.decode_ids(ids).shape == img.shape


def test_bad_inputs_give_clear_errors():
    cfg = VARVQVAEConfig(vocab_size=16, token_dim=4, ch=32, ch_mult=(1, 2), patch_nums=(1, 2, 4))
    vq = VARVQVAE(cfg)
    with pytest.raises(DD2ValueError, match=r"ids: expected values in \[0, 15\], got \[0, 16\]"):
        vq.ids_to_tokens(torch.tensor([[16] + [0] * 20]))
    with pytest.raises(DD2ValueError, match=r"ids: expected shape \(\*, 21\), got \(1, 20\)"):
        vq.ids_to_tokens(torch.zeros(1, 20, dtype=torch.long))
    with pytest.raises(DD2ValueError, match=r"tokens: expected shape \(\*, 21, 4\), got \(2, 21, 8\)"):
        vq.next_scale_input(torch.zeros(2, 21, 8))
    with pytest.raises(DD2ValueError, match=r"img: expected shape \(\*, 3, 8, 8\)"):
        vq.encode_ids(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="strictly increasing"):
        VARVQVAEConfig(patch_nums=(1, 3, 2))
    with pytest.raises(ValueError, match="multiples of norm_groups=32"):
        VARVQVAEConfig(ch=48)
    small = VARVQVAE(VARVQVAEConfig(ch=16, ch_mult=(1, 2), norm_groups=8, vocab_size=16, token_dim=4))
    assert small.encoder.norm_out.num_groups == 8 and small.decoder.up[0].block[0].norm1.num_groups == 8
