"""LlamaGenTeacher on the golden (official-code) checkpoints: loading, errors, sampler = teacher forcing, log-probs
on continuous prefixes = the id-based teacher within the embedding fit's error."""

import logging

import pytest
import torch

from dd2_core.checkpoint import save_safetensors
from dd2_core.errors import CheckpointError, DD2ValueError
from dd2_core.logits import SamplingPolicy, policy_log_probs
from dd2_core.models.llamagen import LlamaGenConfig
from dd2_core.models.llamagen_vq import VQConfig
from dd2_core.teacher import Teacher
from dd2_teachers.llamagen import LlamaGenTeacher, LlamaGenTeacherConfig, llamagen_teacher_config

logger = logging.getLogger(__name__)

GPT = LlamaGenConfig(n_layer=2, dim=128, n_head=4, vocab_size=64, num_classes=10, grid=4)
VQ = VQConfig(codebook_size=64, codebook_dim=8, z_channels=32, ch=32)
POLICY = SamplingPolicy(cfg_scale=2.0, top_k=12)  # top-k < V so that filtering is exercised


def make_cfg(**kw) -> LlamaGenTeacherConfig:
    return LlamaGenTeacherConfig(**({"gpt": GPT, "vq": VQ, "policy": POLICY, "fit_steps": 0} | kw))


@pytest.fixture(scope="module")
def files(golden, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llamagen")
    gpt, vq = (torch.load(golden / f, weights_only=False) for f in ("llamagen_gpt.pt", "llamagen_vq.pt"))
    torch.save(gpt["state_dict"], folder / "gpt.pt")  # {"model": sd}: the DDP layout
    torch.save(vq["state_dict"], folder / "vq.pt")
    var = torch.load(golden / "var.pt", weights_only=False)
    torch.save(var["var_state_dict"], folder / "var.pth")  # raw layout
    torch.save(var["vae_state_dict"], folder / "var_vae.pth")
    return {"dir": folder, "gpt": gpt, "vq": vq}


@pytest.fixture(scope="module")
def teacher(files):
    return LlamaGenTeacher.from_checkpoints(make_cfg(), files["dir"] / "gpt.pt", files["dir"] / "vq.pt")


def _guided(teacher, ids, labels):
    null = torch.full_like(labels, teacher.num_classes)
    with torch.no_grad():
        return teacher.model(torch.cat([ids, ids]), torch.cat([labels, null])).chunk(2)  # id-based, 2B rows


def test_protocol_and_golden_logits(teacher, files):
    assert isinstance(teacher, Teacher)
    assert (teacher.num_tokens, teacher.num_classes, teacher.token_groups) == (16, 10, (1,) * 16)
    torch.testing.assert_close(teacher.codebook.norm(dim=-1), torch.ones(64))
    gpt = files["gpt"]
    cond, null = _guided(teacher, gpt["tokens"], gpt["labels"])
    assert (cond - gpt["logits_cond"]).abs().max() <= 1e-5
    assert (null - gpt["logits_null"]).abs().max() <= 1e-5
    _, step_logits = teacher.generate(gpt["labels"], prefix=gpt["tokens"], return_logits=True)
    assert (step_logits - gpt["ar_step_logits"]).abs().max() <= 1e-5
    torch.testing.assert_close(teacher.decode(files["vq"]["indices"]), files["vq"]["decoded"], atol=1e-4, rtol=0)


def test_sampler_logits_equal_teacher_forced_pass_on_its_samples(teacher):
    labels = torch.tensor([0, 4, 9])
    ids, step_logits = teacher.generate(labels, generator=torch.Generator().manual_seed(0), return_logits=True)
    assert ids.dtype == torch.int64 and ids.shape == (3, 16)
    cond, uncond = _guided(teacher, ids, labels)
    assert (step_logits - (uncond + 2.0 * (cond - uncond))).abs().max() <= 1e-5
    ranks = (step_logits > step_logits.gather(-1, ids.unsqueeze(-1))).sum(-1)
    assert ranks.max() < POLICY.top_k  # every sampled id survived top-k
    assert torch.equal(ids, teacher.sample(labels, generator=torch.Generator().manual_seed(0)))


def test_log_probs_on_codebook_prefixes_equal_id_teacher(teacher):
    fit = teacher.embedding_fit
    logger.info("LlamaGen cont_embed fit on the golden GPT: %s", fit)
    assert fit is not None and fit.max_abs < 1e-5, fit  # hidden 512 >= V = 64: exact up to rounding
    labels = torch.tensor([1, 2, 3, 8])
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    cont = teacher.log_probs(teacher.embed(ids), labels)
    cond, uncond = _guided(teacher, ids, labels)
    by_ids = policy_log_probs(cond, uncond, teacher.policy, teacher.token_groups)
    assert cont.dtype == torch.float32 and cont.shape == (4, 16, 64)
    assert torch.equal(torch.isinf(cont), torch.isinf(by_ids))  # same top-k sets
    finite = torch.isfinite(by_ids)
    err = (cont[finite] - by_ids[finite]).abs().max()
    logger.info("log_probs(continuous) - log_probs(ids): max |diff| %.3e", err)
    assert err <= 1e-4
    assert (torch.isfinite(cont).sum(-1) == POLICY.top_k).all()


def test_unfitted_embedding_is_detected(teacher):
    """The previous test can fail: a cont_embed that is not fitted gives different log-probs."""
    labels = torch.tensor([1, 2])
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    bad = LlamaGenTeacher(teacher.cfg, teacher.model, teacher.vq)
    saved = {k: v.clone() for k, v in bad.model.cont_embed.state_dict().items()}
    try:
        with torch.no_grad():
            bad.model.cont_embed.fc2.bias.add_(0.5)
        cond, uncond = _guided(teacher, ids, labels)
        by_ids = policy_log_probs(cond, uncond, teacher.policy, teacher.token_groups).exp()
        assert (bad.log_probs(teacher.embed(ids), labels).exp() - by_ids)[:, 1:].abs().max() > 1e-2
    finally:
        bad.model.cont_embed.load_state_dict(saved)


def test_adapted_checkpoint_loads_without_fit_and_codes_sampler(teacher, files, tmp_path):
    path = tmp_path / "adapted.safetensors"
    save_safetensors(teacher.model.state_dict(), path)  # official keys + cont_embed.*
    cfg = make_cfg(sample_input="codes")
    adapted = LlamaGenTeacher.from_checkpoints(cfg, path, files["dir"] / "vq.pt")
    assert adapted.embedding_fit is None
    torch.testing.assert_close(adapted.model.cont_embed.fc1.weight, teacher.model.cont_embed.fc1.weight)
    labels = torch.tensor([5, 6])
    ids, step_logits = adapted.generate(labels, generator=torch.Generator().manual_seed(3), return_logits=True)
    cond, uncond = adapted.logits(adapted.embed(ids), labels)  # the continuous teacher-forced pass
    assert (step_logits - (uncond + 2.0 * (cond - uncond))).abs().max() <= 1e-5


def test_compiled_paths_match_eager(teacher):
    """compile=True routes sampling and log-probs through torch.compile (the 'eager' backend only traces)."""
    compiled = LlamaGenTeacher(make_cfg(compile=True, compile_backend="eager"), teacher.model, teacher.vq)
    labels = torch.tensor([3, 7])
    ids = compiled.sample(labels, generator=torch.Generator().manual_seed(4))
    assert torch.equal(ids, teacher.sample(labels, generator=torch.Generator().manual_seed(4)))
    tokens = teacher.embed(ids)
    torch.testing.assert_close(compiled.log_probs(tokens, labels), teacher.log_probs(tokens, labels))


def test_sample_images(teacher):
    ids, images = teacher.sample_images(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(5))
    assert ids.shape == (2, 16) and images.shape == (2, 3, 64, 64) and images.dtype == torch.float32
    torch.testing.assert_close(images, teacher.decode_tokens(teacher.embed(ids)))


def test_default_policy_and_presets():
    cfg = llamagen_teacher_config("GPT-L")
    assert cfg.policy == SamplingPolicy(cfg_scale=2.0, cfg_schedule="constant", top_k=8000, top_p=1.0, top_p_rule="hf")
    assert (cfg.gpt.n_layer, cfg.gpt.dim, cfg.gpt.num_tokens, cfg.vq.codebook_size) == (24, 1024, 256, 16384)
    assert cfg.compile is False
    assert llamagen_teacher_config("GPT-XL", grid=24).gpt.num_tokens == 576
    with pytest.raises(DD2ValueError, match="size"):
        llamagen_teacher_config("GPT-M")
    with pytest.raises(ValueError, match="vocab_size must equal vq.codebook_size"):
        LlamaGenTeacherConfig(gpt=GPT, vq=VQConfig())


def test_missing_and_truncated_files(files, tmp_path):
    d = files["dir"]
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        LlamaGenTeacher.from_checkpoints(make_cfg(), d / "nope.pt", d / "vq.pt")
    data = (d / "gpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="could not be read"):
        LlamaGenTeacher.from_checkpoints(make_cfg(), tmp_path / "cut.pt", d / "vq.pt")


def test_other_family_and_swapped_checkpoints(files):
    d = files["dir"]
    with pytest.raises(CheckpointError, match="VAR transformer checkpoint.*expected a LlamaGen c2i GPT"):
        LlamaGenTeacher.from_checkpoints(make_cfg(), d / "var.pth", d / "vq.pt")
    with pytest.raises(CheckpointError, match="VAR's multi-scale VQVAE"):
        LlamaGenTeacher.from_checkpoints(make_cfg(), d / "gpt.pt", d / "var_vae.pth")
    with pytest.raises(CheckpointError, match="swapped"):
        LlamaGenTeacher.from_checkpoints(make_cfg(), d / "vq.pt", d / "gpt.pt")


def test_checkpoint_of_another_size(files):
    d = files["dir"]
    bigger = LlamaGenConfig(**(GPT.model_dump() | {"n_layer": 3}))
    with pytest.raises(
        CheckpointError, match=r"holds LlamaGen custom \(2 layers, dim 128.*expects LlamaGen custom \(3 layers"
    ):
        LlamaGenTeacher.from_checkpoints(make_cfg(gpt=bigger), d / "gpt.pt", d / "vq.pt")
    with pytest.raises(CheckpointError, match="codebook 64x8, z_channels 32, ch 32; the config expects.*ch 64"):
        LlamaGenTeacher.from_checkpoints(make_cfg(vq=VQ.model_copy(update={"ch": 64})), d / "gpt.pt", d / "vq.pt")


def test_bad_labels_and_tokens(teacher):
    tokens = torch.zeros(2, 16, 8)
    with pytest.raises(DD2ValueError, match=r"labels: expected class ids in \[0, 9\].*got values in \[3, 10\]"):
        teacher.log_probs(tokens, torch.tensor([3, 10]))
    with pytest.raises(DD2ValueError, match=r"class ids in \[0, 9\]"):
        teacher.sample(torch.tensor([1000]))
    with pytest.raises(DD2ValueError, match=r"tokens: expected shape \(\*, 16, 8\), got \(2, 15, 8\)"):
        teacher.log_probs(torch.zeros(2, 15, 8), torch.tensor([1, 2]))
    with pytest.raises(DD2ValueError, match=r"labels: expected shape \(2,\)"):
        teacher.log_probs(tokens, torch.tensor([1, 2, 3]))


def test_official_kv_cache_buffers_are_ignored(files, tmp_path):
    sd = dict(files["gpt"]["state_dict"]["model"])
    sd["layers.0.attention.kv_cache.k_cache"] = torch.zeros(2, 4, 24, 32)  # saved by the official code after sampling
    sd["layers.0.attention.kv_cache.v_cache"] = torch.zeros(2, 4, 24, 32)
    torch.save({"model": sd}, tmp_path / "after_sampling.pt")
    t = LlamaGenTeacher.from_checkpoints(make_cfg(), tmp_path / "after_sampling.pt", files["dir"] / "vq.pt")
    assert "layers.0.attention.kv_cache.k_cache" not in t.model.state_dict()


@pytest.mark.parametrize("policy", [POLICY, SamplingPolicy(cfg_scale=1.5, cfg_schedule="ramp", top_k=0, top_p=0.9,
                                                           temperature=0.8)])  # fmt: skip
def test_kv_cached_flow_map_equals_teacher_forced_passes(files, policy):
    """The KV-cached flow map (one decode step per token) = the generic one (N teacher-forced passes on the
    continuous prefix), with CFG (constant and ramped), top-k, top-p and temperature."""
    from dd2_core.sampling import teacher_flow_map

    t = LlamaGenTeacher.from_checkpoints(make_cfg(policy=policy), files["dir"] / "gpt.pt", files["dir"] / "vq.pt")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(6, t.num_tokens, 8, generator=g)
    labels = torch.tensor([0, 3, 9, 1, 1, 5])
    cached = teacher_flow_map(t, noise, labels, steps=16)
    forced = teacher_flow_map(t, noise, labels, steps=16, cached=False)
    torch.testing.assert_close(cached, forced, atol=2e-5, rtol=0)
    assert (cached - noise).abs().mean() > 0.1  # it moved: not a trivial identity
    with pytest.raises(DD2ValueError, match="labels"):
        t.flow_map(noise, labels[:5], steps=4)
