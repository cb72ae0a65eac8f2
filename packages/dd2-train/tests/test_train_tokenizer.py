"""The small VQ tokenizer's training and code shards (dd2_train.tokenizer), and a LlamaGen teacher of a custom size
built from a run config (teacher.size = custom): what the Fashion-MNIST demo trains and distils."""

import json

import numpy as np
import pytest
import torch

from dd2_core.checkpoint import save_safetensors
from dd2_core.errors import DD2ValueError
from dd2_core.models.llamagen import LlamaGen, LlamaGenConfig
from dd2_core.models.llamagen_vq import LlamaGenVQ, VQConfig
from dd2_teachers.registry import load_teacher
from dd2_train.build import build_ar_diffusion, build_teacher, build_tokenizer, teacher_ref
from dd2_train.config import ConfigError, validate_config
from dd2_train.data import TokenStream, read_shard_meta
from dd2_train.tokenizer import (
    VQTrainConfig,
    codebook_usage,
    encode_images,
    quantize,
    reconstruct,
    to_vq_input,
    train_vq,
    write_code_shards,
)

VQ = VQConfig(codebook_size=16, codebook_dim=4, z_channels=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
              codebook_used_size=0)  # fmt: skip
GPT = LlamaGenConfig(n_layer=1, dim=16, n_head=2, vocab_size=16, num_classes=3, grid=4, multiple_of=8)


def _images(n: int = 64, seed: int = 0) -> np.ndarray:
    """Blocky synthetic uint8 images (n, 8, 8): a bright square at a random corner on black."""
    g = np.random.default_rng(seed)
    x = np.zeros((n, 8, 8), dtype=np.uint8)
    for i, (r, c) in enumerate(g.integers(0, 2, size=(n, 2))):
        x[i, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] = 255
    return x


def test_to_vq_input_range_and_errors():
    x = to_vq_input(np.array([[[0, 255]]], dtype=np.uint8))
    assert x.shape == (1, 3, 1, 2) and x.min() == -1 and x.max() == 1
    assert to_vq_input(np.zeros((2, 4, 4, 3), dtype=np.uint8)).shape == (2, 3, 4, 4)
    with pytest.raises(DD2ValueError, match="uint8"):
        to_vq_input(np.zeros((2, 4, 4), dtype=np.float32))


def test_train_vq_lowers_the_loss_and_restarts_dead_codes():
    torch.manual_seed(0)
    vq = LlamaGenVQ(VQ)
    images = _images()
    x = to_vq_input(images)
    with torch.no_grad():
        before = (reconstruct(vq, images) - x).pow(2).mean()
    summary = train_vq(vq, images, VQTrainConfig(steps=60, batch_size=16, lr=3e-3, restart_every=10, log_every=30))
    with torch.no_grad():
        after = (reconstruct(vq, images) - x).pow(2).mean()
    assert summary["steps"] == 60 and summary["restarted_codes"] > 0
    assert after < 0.5 * before
    assert not vq.training and not any(p.requires_grad for p in vq.parameters())
    ids = encode_images(vq, images, batch_size=10)
    assert ids.shape == (64, 16) and ids.dtype == torch.int64  # (8 / 2)^2 tokens, raster order
    z, e, ids2 = quantize(vq, x)
    assert torch.equal(ids2, ids) and torch.allclose(z.norm(dim=-1), torch.ones(64, 16), atol=1e-5)
    assert torch.allclose(e, vq.codebook[ids])
    assert 1 <= codebook_usage(ids, 16)["codes_used"] <= 16


def test_image_size_must_fit_the_downsampling():
    with pytest.raises(DD2ValueError, match="multiples of 2"):
        train_vq(LlamaGenVQ(VQ), np.zeros((4, 7, 8), dtype=np.uint8), VQTrainConfig(steps=1))


def test_code_shards_round_trip_and_resume(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(16, (50, 16), generator=g), torch.randint(3, (50,), generator=g)
    meta = {"num_classes": 3, "vocab_size": 16}
    assert write_code_shards(ids, labels, tmp_path, shard_size=20, meta=meta) == {
        "written": 3,
        "skipped": 0,
        "shards": 3,
    }
    assert write_code_shards(ids, labels, tmp_path, shard_size=20, meta=meta)["skipped"] == 3
    assert read_shard_meta(str(tmp_path / "shard-000002.tar"))["kind"] == "image-codes"
    stream = TokenStream(str(tmp_path), batch_size=10, num_tokens=16, vocab_size=16, num_classes=3,
                         shuffle_buffer=0, shard_shuffle=False)  # fmt: skip
    got = [b for b in stream.epoch_batches(0) if "ids" in b]
    assert torch.equal(torch.cat([b["ids"] for b in got]), ids) and torch.equal(
        torch.cat([b["labels"] for b in got]), labels
    )
    with pytest.raises(DD2ValueError, match="other settings"):
        write_code_shards(ids, labels, tmp_path, shard_size=20, meta={"num_classes": 4, "vocab_size": 16})


def _custom(tmp_path, **teacher) -> dict:
    return {
        "run_dir": str(tmp_path / "run"),
        "stage": "gts",
        "teacher": {
            "family": "llamagen",
            "size": "custom",
            "ckpt": str(tmp_path / "gpt.safetensors"),
            "vq_ckpt": str(tmp_path / "vq.safetensors"),
            "gpt": GPT.model_dump(),
            "vq": VQ.model_dump(),
            **teacher,
        },  # fmt: skip
    }


def test_custom_llamagen_teacher_from_a_config(tmp_path):
    torch.manual_seed(0)
    save_safetensors(LlamaGen(GPT.model_copy(update={"codebook_dim": 4})).state_dict(), tmp_path / "gpt.safetensors")
    save_safetensors(LlamaGenVQ(VQ).state_dict(), tmp_path / "vq.safetensors")
    cfg = validate_config(_custom(tmp_path, sample_input="codes"))
    teacher = build_teacher(cfg.teacher, device=torch.device("cpu"), dtype=torch.float32, run_dir=cfg.run_dir)
    assert teacher.cfg.sample_input == "codes" and teacher.num_tokens == 16 and teacher.codebook.shape == (16, 4)
    ids = teacher.sample(torch.tensor([0, 2]), generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 16)
    model = build_ar_diffusion(teacher, cfg.teacher, cfg.head)
    assert model.backbone.num_tokens == 16 and model.backbone.token_dim == 4
    tok = build_tokenizer(cfg.teacher, device="cpu")
    assert (tok.resolution, tok.vocab_size, tok.num_tokens) == (8, 16, 16)


def test_teacher_ref_rebuilds_the_adapted_custom_teacher(tmp_path):
    """The reference export writes (teacher_ref.json) names the adapt stage's GPT and the custom sizes, so that
    load_teacher rebuilds exactly the teacher the run distils, not the released checkpoint it started from."""
    torch.manual_seed(0)
    gpt = GPT.model_copy(update={"codebook_dim": 4})
    save_safetensors(LlamaGen(gpt).state_dict(), tmp_path / "gpt.safetensors")
    save_safetensors(LlamaGenVQ(VQ).state_dict(), tmp_path / "vq.safetensors")
    adapted = tmp_path / "run" / "adapt" / "teacher"
    adapted.mkdir(parents=True)
    save_safetensors(LlamaGen(gpt).state_dict(), adapted / "gpt.safetensors")  # other weights than teacher.ckpt
    cfg = validate_config(_custom(tmp_path, sample_input="codes", policy={"cfg_scale": 1.5, "top_k": 5}))
    ref = json.loads(json.dumps(teacher_ref(cfg.teacher, cfg.run_dir)))
    assert ref["ckpt"] == str(adapted / "gpt.safetensors") and ref["vq_ckpt"] == str(tmp_path / "vq.safetensors")
    assert ref["gpt"] == GPT.model_dump(mode="json") and ref["vq"] == VQ.model_dump(mode="json")
    assert ref["sample_input"] == "codes" and ref["policy"]["top_k"] == 5
    built = build_teacher(cfg.teacher, device=torch.device("cpu"), dtype=torch.float32, run_dir=cfg.run_dir)
    rebuilt = load_teacher(ref, device="cpu")
    assert rebuilt.cfg == built.cfg and rebuilt.policy == built.policy
    tokens, labels = built.embed(torch.randint(16, (2, 16))), torch.tensor([0, 2])
    assert torch.equal(rebuilt.log_probs(tokens, labels), built.log_probs(tokens, labels))
    released = load_teacher(ref | {"ckpt": str(tmp_path / "gpt.safetensors")}, device="cpu")
    assert not torch.equal(released.log_probs(tokens, labels), built.log_probs(tokens, labels))

    (adapted / "gpt.safetensors").unlink()  # the adapt folder without its GPT: the error names teacher.adapted
    with pytest.raises(ConfigError, match=r"teacher.adapted: .*teacher ref 'ckpt': no such file"):
        build_teacher(cfg.teacher, device=torch.device("cpu"), dtype=torch.float32, run_dir=cfg.run_dir)


def test_custom_size_errors_name_the_field(tmp_path):
    raw = _custom(tmp_path)
    del raw["teacher"]["gpt"]
    with pytest.raises(ConfigError, match="teacher: gpt, vq: llamagen size 'custom' needs both"):
        validate_config(raw)
    raw = _custom(tmp_path)
    raw["teacher"]["size"] = "L"
    with pytest.raises(ConfigError, match="only for llamagen size 'custom'"):
        validate_config(raw)
    raw = _custom(tmp_path)
    raw["teacher"]["vq"] = VQ.model_copy(update={"codebook_size": 32}).model_dump()
    with pytest.raises(ConfigError, match="gpt.vocab_size must equal vq.codebook_size"):
        validate_config(raw)
