"""var_tokenizer: VAR's multi-scale residual quantisation in training form, and the small VQVAE / VAR trainers."""

import numpy as np
import pytest
import torch

from dd2_core.errors import DD2ValueError
from dd2_core.models.var import VAR, VARConfig
from dd2_core.models.var_vqvae import VARVQVAE, VARVQVAEConfig
from dd2_train.tokenizer import VQTrainConfig
from dd2_train.var_tokenizer import (
    VARTrainConfig,
    crop_images,
    encode_var_images,
    multiscale_quantize,
    to_var_input,
    train_var,
    train_var_vqvae,
    var_ce_loss,
)

PN = (1, 2, 4)
VQVAE_CFG = VARVQVAEConfig(vocab_size=16, token_dim=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)


def _images(n: int = 32, side: int = 6) -> np.ndarray:
    """uint8 (n, side, side): two kinds of bars, so that there is something to learn."""
    g = np.random.default_rng(0)
    x = np.zeros((n, side, side), dtype=np.uint8)
    x[::2, :, side // 2] = 255
    x[1::2, side // 2, :] = 200
    return x + g.integers(0, 20, size=x.shape, dtype=np.uint8)


def test_padding_is_centred_black_and_crop_undoes_it():
    x = to_var_input(_images(2), 8)  # 6x6 -> 8x8
    assert x.shape == (2, 3, 8, 8) and torch.all(x[:, :, 0] == -1) and torch.all(x[:, :, :, -1] == -1)
    back = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)  # (B, 8, 8, 3)
    assert torch.equal(crop_images(back, 6, 6)[..., 0], torch.from_numpy(_images(2)))
    with pytest.raises(DD2ValueError, match="at most 4x4"):
        to_var_input(_images(2), 4)


def test_training_quantisation_is_the_vqvae_quantiser():
    torch.manual_seed(0)
    vqvae = VARVQVAE(VQVAE_CFG)
    f = torch.randn(3, 4, 4, 4)
    f_hat, partial, ids, residuals = multiscale_quantize(vqvae, f)
    assert torch.equal(ids, vqvae.quantize.quantize(f))  # the same codes as the (official-layout) quantiser
    torch.testing.assert_close(f_hat, vqvae.f_hat(vqvae.ids_to_tokens(ids)))
    assert len(partial) == 3 and residuals.shape == (3 * 21, 4)
    f_hat.sum().backward()
    assert vqvae.quantize.embedding.weight.grad is not None  # the codebook learns through f_hat


def test_vqvae_and_var_trainers_lower_their_losses():
    torch.manual_seed(0)
    vqvae, images = VARVQVAE(VQVAE_CFG), _images()
    summary = train_var_vqvae(vqvae, images, VQTrainConfig(steps=1, batch_size=16, restart_every=0))
    first = summary["metrics"]["loss"]
    summary = train_var_vqvae(vqvae, images, VQTrainConfig(steps=20, batch_size=8, lr=3e-3, restart_every=10))
    assert summary["metrics"]["loss"] < first and not vqvae.training
    ids = encode_var_images(vqvae, images)
    assert ids.shape == (32, 21) and int(ids.max()) < 16
    var = VAR(VARConfig(depth=1, embed_dim=32, num_heads=2, num_classes=2, vocab_size=16, token_dim=4, patch_nums=PN))
    labels = torch.arange(32) % 2
    with torch.no_grad():
        before = float(var_ce_loss(var, vqvae, ids, labels))
    out = train_var(var, vqvae, ids, labels, VARTrainConfig(steps=20, batch_size=16, lr=3e-3, warmup_steps=1))
    with torch.no_grad():
        assert float(var_ce_loss(var, vqvae, ids, labels)) < before and out["steps"] == 20
