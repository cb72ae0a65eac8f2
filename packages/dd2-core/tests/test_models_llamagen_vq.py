"""LlamaGen VQ-16 tokenizer: golden encode/decode of the official code, full-size key names and shapes, errors."""

import pytest
import torch

from dd2_core.errors import DD2ValueError
from dd2_core.models.llamagen_vq import VQ_PRESETS, LlamaGenVQ, VQConfig

GOLDEN_CFG = VQConfig(codebook_size=64, codebook_dim=8, z_channels=32, ch=32)


@pytest.fixture(scope="module")
def golden_vq(golden):
    data = torch.load(golden / "llamagen_vq.pt", weights_only=False)
    vq = LlamaGenVQ(GOLDEN_CFG).eval()
    vq.load_state_dict(data["state_dict"]["model"], strict=True)
    return vq, data


def test_golden_encode_indices_exact(golden_vq):
    vq, data = golden_vq
    with torch.no_grad():
        ids = vq.encode(data["image"])
        codes = vq.codes(ids)  # (B, N, C)
    assert torch.equal(ids, data["indices"])
    quant = codes.transpose(1, 2).reshape(data["quant"].shape)  # (B, C, h, w)
    assert (quant - data["quant"]).abs().max() <= 1e-6


def test_golden_decode(golden_vq):
    vq, data = golden_vq
    with torch.no_grad():
        images = vq.decode_ids(data["indices"])
        from_tokens = vq.decode_tokens(vq.codebook[data["indices"]])
    assert images.shape == data["decoded"].shape
    assert (images - data["decoded"]).abs().max() <= 1e-4
    assert torch.equal(images, from_tokens)


def test_full_size_keys_and_shapes(golden):
    with torch.device("meta"):
        vq = LlamaGenVQ(VQ_PRESETS["VQ-16"]())
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in vq.state_dict().items()}
    ref = {}
    for line in (golden / "shapes" / "full" / "llamagen_VQ-16.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, dtype = line.split("\t")
            ref[name] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    assert ours == ref


def test_codebook_is_normalised_and_decode_is_continuous():
    torch.manual_seed(0)
    vq = LlamaGenVQ(VQConfig(codebook_size=16, codebook_dim=4, z_channels=32, ch=32, ch_mult=(1, 2))).eval()
    assert torch.allclose(vq.codebook.norm(dim=-1), torch.ones(16))
    tokens = torch.randn(1, 9, 4)
    with torch.no_grad():
        a = vq.decode_tokens(tokens)
        b = vq.decode_tokens(tokens + 1e-2)
    assert a.shape == (1, 3, 6, 6)
    assert (a - b).abs().max() > 0  # no re-quantisation: nearby tokens decode differently


def test_bad_inputs_give_clear_errors():
    vq = LlamaGenVQ(VQConfig(codebook_size=16, codebook_dim=4, z_channels=32, ch=32, ch_mult=(1, 2))).eval()
    with pytest.raises(DD2ValueError, match=r"images: expected shape \(B, 3, H, W\) with H, W multiples of 2"):
        vq.encode(torch.zeros(1, 3, 5, 6))
    with pytest.raises(DD2ValueError, match="square"):
        vq.decode_tokens(torch.zeros(1, 8, 4))
    with pytest.raises(DD2ValueError, match=r"tokens: expected shape \(\*, \*, 4\)"):
        vq.decode_tokens(torch.zeros(1, 9, 8))
    with pytest.raises(DD2ValueError, match=r"ids: expected ids in \[0, 15\]"):
        vq.codes(torch.tensor([[16]]))
    with pytest.raises(ValueError, match="norm_groups"):
        VQConfig(ch=24)
