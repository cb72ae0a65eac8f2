"""LlamaGen GPT: golden logits of the official code, full-size key names and shapes, KV cache = teacher forcing,
continuous-input embedding, backbone mode."""

import pytest
import torch

from dd2_core.backbone import Backbone
from dd2_core.diffusion import ARDiffusion
from dd2_core.errors import DD2ValueError
from dd2_core.heads import HeadConfig, VelocityHead
from dd2_core.logits import SamplingPolicy
from dd2_core.models.llamagen import (
    LLAMAGEN_PRESETS,
    LlamaGen,
    LlamaGenBackbone,
    LlamaGenConfig,
    fit_continuous_embedding,
    rope_table_2d,
)

GOLDEN_CFG = dict(n_layer=2, dim=128, n_head=4, vocab_size=64, num_classes=10, grid=4)


def tiny(**kw) -> LlamaGenConfig:
    return LlamaGenConfig(**(GOLDEN_CFG | kw))


def random_model(seed: int = 0, **kw) -> LlamaGen:
    torch.manual_seed(seed)
    return LlamaGen(tiny(**kw)).eval()


@pytest.fixture(scope="module")
def golden_gpt(golden):
    data = torch.load(golden / "llamagen_gpt.pt", weights_only=False)
    model = LlamaGen(tiny()).eval()
    model.load_state_dict(data["state_dict"]["model"], strict=True)
    return model, data


def test_golden_teacher_forced_logits(golden_gpt):
    model, data = golden_gpt
    labels, tokens = data["labels"], data["tokens"]
    with torch.no_grad():
        cond = model(tokens, labels)
        null = model(tokens, torch.full_like(labels, model.cfg.num_classes))
    assert (cond - data["logits_cond"]).abs().max() <= 1e-5
    assert (null - data["logits_null"]).abs().max() <= 1e-5


def test_golden_kv_cached_cfg_step_logits(golden_gpt):
    model, data = golden_gpt
    policy = SamplingPolicy(cfg_scale=float(data["cfg_scale"]))
    ids, logits = model.generate(data["labels"], policy, prefix=data["tokens"], return_logits=True)
    assert torch.equal(ids, data["tokens"])
    assert (logits - data["ar_step_logits"]).abs().max() <= 1e-5


def _read_shapes(path):
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, dtype = line.split("\t")
            out[name] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return out


@pytest.mark.parametrize("name", sorted(LLAMAGEN_PRESETS))
def test_full_size_keys_and_shapes(golden, name):
    with torch.device("meta"):
        model = LlamaGen(LLAMAGEN_PRESETS[name]())
    ours = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert ours == _read_shapes(golden / "shapes" / "full" / f"llamagen_{name}.txt")


def test_rope_table_class_row_zero_and_row_column_halves():
    table = rope_table_2d(grid=3, head_dim=16, base=10000.0)  # (1 + 9, 8, 2)
    assert table.shape == (10, 8, 2)
    assert torch.all(table[0] == 0)  # class token: all zeros, not the identity rotation
    freqs = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)  # (4,)
    for r in range(3):
        for c in range(3):
            ang = torch.cat([r * freqs, c * freqs])  # first half: row, second half: column
            torch.testing.assert_close(table[1 + r * 3 + c], torch.stack([ang.cos(), ang.sin()], -1))


def test_sampler_step_logits_equal_one_teacher_forced_pass():
    model = random_model(1)
    labels = torch.tensor([0, 3, 9])
    policy = SamplingPolicy(cfg_scale=2.0, top_k=20, temperature=1.3)
    gen = torch.Generator().manual_seed(0)
    ids, step_logits = model.generate(labels, policy, generator=gen, return_logits=True)
    with torch.no_grad():
        cond, uncond = model(torch.cat([ids, ids]), torch.cat([labels, torch.full_like(labels, 10)])).chunk(2)
    assert (step_logits - (uncond + 2.0 * (cond - uncond))).abs().max() <= 1e-5
    again = model.generate(labels, policy, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)  # the torch.Generator fixes the draws


def test_sampler_top_k_1_is_greedy_and_without_cfg_uses_b_rows():
    model = random_model(2)
    labels = torch.tensor([4, 5])
    ids, step_logits = model.generate(labels, SamplingPolicy(top_k=1), return_logits=True)
    assert torch.equal(ids, step_logits.argmax(-1))
    assert model.layers[0].attention.kv_cache.k_cache.shape[0] == 2  # no CFG: no null rows
    with torch.no_grad():
        assert (step_logits - model(ids, labels)).abs().max() <= 1e-5


def test_teacher_forcing_is_causal_and_accepts_prefixes():
    model = random_model(3)
    labels = torch.tensor([1, 2])
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, labels)
        short = model(ids[:, :5], labels)
        changed = ids.clone()
        changed[:, 5:] = (changed[:, 5:] + 1) % 64
        other = model(changed, labels)
    torch.testing.assert_close(short, full[:, :5], atol=1e-5, rtol=0)
    torch.testing.assert_close(other[:, :6], full[:, :6], atol=1e-5, rtol=0)  # position j reads ids < j only
    assert (other[:, 6:] - full[:, 6:]).abs().max() > 1e-3


def test_continuous_input_fit_exact_when_hidden_covers_codebook():
    model = random_model(4, codebook_dim=8, cont_hidden=256)
    codebook = torch.nn.functional.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    fit = model.fit_continuous(codebook, steps=0)
    assert fit.max_abs < 1e-5 and fit.relative < 1e-4, fit
    labels = torch.tensor([0, 7])
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        by_ids = model(ids, labels)
        by_codes = model.forward_continuous(codebook[ids], labels)
    assert (by_ids - by_codes).abs().max() <= 1e-4
    # the continuous sampler path embeds cont_embed(codebook[ids]) and matches the same teacher-forced pass
    ids2, step_logits = model.generate(
        labels,
        SamplingPolicy(cfg_scale=1.5),
        codebook=codebook,
        generator=torch.Generator().manual_seed(3),
        return_logits=True,
    )
    with torch.no_grad():
        cond, uncond = model.forward_continuous(torch.cat([codebook[ids2]] * 2), torch.tensor([0, 7, 10, 10])).chunk(2)
    assert (step_logits - (uncond + 1.5 * (cond - uncond))).abs().max() <= 1e-5


def test_continuous_fit_reports_error_when_lossy():
    model = random_model(5, codebook_dim=8, cont_hidden=16)
    codebook = torch.nn.functional.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    fit = model.fit_continuous(codebook, steps=20)
    with torch.no_grad():
        err = model.cont_embed(codebook) - model.tok_embeddings.weight
    assert fit.relative > 1e-2  # 16 hidden units cannot interpolate 64 arbitrary rows
    assert fit.mse == pytest.approx(float(err.pow(2).mean()), rel=1e-4)
    assert fit.max_abs == pytest.approx(float(err.abs().max()), rel=1e-4)


def test_fit_rejects_mismatched_table():
    model = random_model(6, codebook_dim=8, cont_hidden=32)
    with pytest.raises(DD2ValueError, match="codebook"):
        fit_continuous_embedding(model.cont_embed, torch.randn(10, 8), model.tok_embeddings.weight)


def test_backbone_copies_teacher_and_is_causal():
    teacher = random_model(7, codebook_dim=8, cont_hidden=64)
    backbone = LlamaGenBackbone.from_teacher(teacher)
    assert isinstance(backbone, Backbone)
    assert (backbone.token_dim, backbone.feature_dim, backbone.num_tokens) == (8, 128, 16)
    assert "output.weight" not in backbone.state_dict() and "tok_embeddings.weight" not in backbone.state_dict()
    tokens = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 10])  # the null class is a valid backbone label
    with torch.no_grad():
        f = backbone(tokens, labels)
        torch.testing.assert_close(teacher.output(f).float(), teacher.forward_continuous(tokens, labels))
        moved = tokens.clone()
        moved[:, 9:] += 1.0
        g = backbone(moved, labels)
    torch.testing.assert_close(g[:, :10], f[:, :10])  # feature i sees tokens < i only
    assert (g[:, 10:] - f[:, 10:]).abs().max() > 1e-4
    head = VelocityHead(HeadConfig(token_dim=8, cond_dim=128, width=32, depth=1))
    v = ARDiffusion(backbone, head)(tokens, torch.full((2, 16, 1), 0.5), tokens, labels)
    assert v.shape == (2, 16, 8)


def test_backbone_fits_embedding_when_teacher_has_none():
    teacher = random_model(8)  # released layout: token table only
    codebook = torch.nn.functional.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    backbone = LlamaGenBackbone(tiny(codebook_dim=8, cont_hidden=128))
    fit = backbone.init_from_teacher(teacher, codebook, steps=0)
    assert fit is not None and fit.max_abs < 1e-5
    torch.testing.assert_close(backbone.layers[1].feed_forward.w2.weight, teacher.layers[1].feed_forward.w2.weight)
    with pytest.raises(DD2ValueError, match="codebook"):
        backbone.init_from_teacher(teacher)
    with pytest.raises(DD2ValueError, match="n_layer"):
        LlamaGenBackbone(tiny(codebook_dim=8, n_layer=3)).init_from_teacher(teacher, codebook)


def test_bad_inputs_give_clear_errors():
    model = random_model(9)
    labels = torch.tensor([1, 2])
    with pytest.raises(DD2ValueError, match=r"labels: expected class ids in \[0, 10\]"):
        model(torch.zeros(2, 16, dtype=torch.long), torch.tensor([1, 11]))
    with pytest.raises(DD2ValueError, match=r"ids: expected ids in \[0, 63\]"):
        model(torch.full((2, 16), 64), labels)
    with pytest.raises(DD2ValueError, match=r"1 <= T <= N = 16"):
        model(torch.zeros(2, 17, dtype=torch.long), labels)
    with pytest.raises(DD2ValueError, match="cont_embed"):
        model.forward_continuous(torch.zeros(2, 16, 8), labels)
    with pytest.raises(DD2ValueError, match=r"class ids in \[0, 9\]"):
        model.generate(torch.tensor([10]), SamplingPolicy())  # the null class is not a sampling label
    with pytest.raises(ValueError, match="multiple of 4"):
        tiny(dim=120, n_head=4)
