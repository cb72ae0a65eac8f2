"""VARTeacher: golden checkpoints through the loader, continuous log-probs, the sampler, and clear errors."""

from pathlib import Path

import pytest
import torch

from dd2_core.errors import CheckpointError, DD2ValueError
from dd2_core.logits import SamplingPolicy, policy_log_probs
from dd2_core.models.var import VAR, VARConfig
from dd2_core.models.var_vqvae import VARVQVAEConfig
from dd2_core.teacher import Teacher
from dd2_teachers.var import VAR_POLICY, VARTeacher, VARTeacherConfig, var_teacher_config


def golden_config(g: dict, **overrides) -> VARTeacherConfig:
    c = g["config"]
    pn = tuple(c["patch_nums"])
    var = VARConfig(
        depth=c["depth"],
        embed_dim=c["embed_dim"],
        num_heads=c["num_heads"],
        num_classes=c["num_classes"],
        vocab_size=c["vocab_size"],
        token_dim=c["Cvae"],
        patch_nums=pn,
    )
    vqvae = VARVQVAEConfig(vocab_size=c["vocab_size"], token_dim=c["Cvae"], ch=c["ch"], patch_nums=pn)
    return VARTeacherConfig.model_validate({"var": var.model_dump(), "vqvae": vqvae.model_dump()} | overrides)


@pytest.fixture(scope="module")
def files(golden: Path, tmp_path_factory) -> dict:
    """The golden state_dicts written as released files: raw state_dicts (VAR, VQVAE) and a LlamaGen DDP file."""
    g = torch.load(golden / "var.pt", weights_only=False)
    d = tmp_path_factory.mktemp("var_ckpt")
    torch.save(g["var_state_dict"], d / "var_d2.pth")
    torch.save(g["vae_state_dict"], d / "vae.pth")
    torch.save(torch.load(golden / "llamagen_gpt.pt", weights_only=False)["state_dict"], d / "llamagen.pt")
    return {"g": g, "var": d / "var_d2.pth", "vae": d / "vae.pth", "llamagen": d / "llamagen.pt", "dir": d}


def test_default_config_and_policy():
    cfg = var_teacher_config(20)
    assert cfg.var.width == 1280 and cfg.var.heads == 20 and cfg.var.num_tokens == 680
    assert (
        cfg.policy
        == VAR_POLICY
        == SamplingPolicy(cfg_scale=2.0, cfg_schedule="ramp", top_k=900, top_p=0.95, top_p_rule="var")
    )
    assert cfg.policy.temperature == 1.0 and cfg.compile is False and cfg.dtype == "float32"
    with pytest.raises(ValueError, match="var.token_dim and vqvae.token_dim must agree"):
        VARTeacherConfig(vqvae=VARVQVAEConfig(token_dim=16))


def test_golden_log_probs_equal_the_id_based_teacher(files):
    g = files["g"]
    policy = SamplingPolicy(cfg_scale=1.5, cfg_schedule="ramp", top_k=20, top_p=0.9, top_p_rule="var")
    teacher = VARTeacher.from_checkpoints(golden_config(g, policy=policy.model_dump()), files["var"], files["vae"])
    assert isinstance(teacher, Teacher)
    assert teacher.token_groups == (1, 4, 9, 16) and teacher.num_tokens == 30 and teacher.codebook.shape == (64, 8)
    ids = torch.cat(g["scale_indices"], dim=1)
    labels = g["labels"]
    with torch.no_grad():
        # continuous tokens that are exactly the code vectors (a plain tensor, not an embedding lookup)
        codes = teacher.codebook[ids].clone()
        lp = teacher.log_probs(codes, labels)
        # the id-based teacher: the official teacher-forcing input from ids, then the two passes
        x_in = teacher.vqvae.next_scale_input(teacher.embed(ids))
        cond = teacher.var(labels, x_in)
        uncond = teacher.var(torch.full_like(labels, 10), x_in)
    # one batched cond+null pass vs two separate ones: equal up to the BLAS kernels' summation order, which can
    # change with the batch shape and the number of threads (bitwise equality held on an idle machine only)
    by_ids = policy_log_probs(cond, uncond, policy, teacher.token_groups)
    assert torch.equal(lp.isfinite(), by_ids.isfinite())
    torch.testing.assert_close(lp[lp.isfinite()], by_ids[lp.isfinite()], atol=1e-5, rtol=0)
    golden_lp = policy_log_probs(g["logits_cond"], g["logits_null"], policy, teacher.token_groups)
    assert torch.equal(lp.isfinite(), golden_lp.isfinite())
    torch.testing.assert_close(lp[lp.isfinite()], golden_lp[lp.isfinite()], atol=1e-5, rtol=0)


def test_sampler_log_probs_equal_teacher_forcing_and_images(files):
    g = files["g"]
    teacher = VARTeacher.from_checkpoints(golden_config(g), files["var"], files["vae"])
    labels = torch.tensor([3, 9])
    out = teacher.generate(labels, generator=torch.Generator().manual_seed(3), decode=False, return_log_probs=True)
    assert out.ids.shape == (2, 30) and out.ids.dtype == torch.long and out.images is None
    with torch.no_grad():
        lp = teacher.log_probs(teacher.embed(out.ids), labels)
    assert torch.equal(lp.isfinite(), out.log_probs.isfinite())
    torch.testing.assert_close(out.log_probs[lp.isfinite()], lp[lp.isfinite()], atol=1e-5, rtol=1e-5)
    again = teacher.sample(labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, out.ids)
    # the official sample (cfg 1.5, no filtering, seed 0) comes back through the teacher, images included
    official = golden_config(
        g, policy={"cfg_scale": 1.5, "cfg_schedule": "ramp", "top_k": 0, "top_p": 0.0, "top_p_rule": "var"}
    )
    t2 = VARTeacher(teacher.var, teacher.vqvae, policy=official.policy)
    res = t2.generate(g["labels"], generator=torch.Generator().manual_seed(0))
    ids = torch.cat(g["scale_indices"], dim=1)
    assert torch.equal(res.ids, ids)
    assert res.images.shape == (2, 3, 64, 64) and float(res.images.min()) >= 0 and float(res.images.max()) <= 1
    torch.testing.assert_close(res.images, g["image"], atol=1e-4, rtol=0)
    torch.testing.assert_close(teacher.decode(ids), res.images, atol=1e-5, rtol=0)


def test_bad_files_give_clear_errors(files):
    cfg = golden_config(files["g"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        VARTeacher.from_checkpoints(cfg, files["dir"] / "missing.pth", files["vae"])
    truncated = files["dir"] / "truncated.pth"
    truncated.write_bytes(files["var"].read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="could not be read"):
        VARTeacher.from_checkpoints(cfg, truncated, files["vae"])
    with pytest.raises(CheckpointError, match="found a LlamaGen GPT checkpoint"):
        VARTeacher.from_checkpoints(cfg, files["llamagen"], files["vae"])
    with pytest.raises(CheckpointError, match="found the VAR VQVAE tokenizer"):
        VARTeacher.from_checkpoints(cfg, files["vae"], files["vae"])
    with pytest.raises(CheckpointError, match="expected the VAR multi-scale VQVAE, found a VAR transformer"):
        VARTeacher.from_checkpoints(cfg, files["var"], files["var"])
    deeper = files["dir"] / "var_d3.pth"
    torch.save(VAR(VARConfig.model_validate(cfg.var.model_dump() | {"depth": 3})).state_dict(), deeper)
    with pytest.raises(
        CheckpointError, match=r"depth 3, width 128, but the config expects VAR-d2 \(depth 2, width 128"
    ):
        VARTeacher.from_checkpoints(cfg, deeper, files["vae"])
    with pytest.raises(CheckpointError, match="does not match VAR-d2"):  # same depth, other sizes: strict key check
        wrong_classes = golden_config(files["g"], var=cfg.var.model_dump() | {"num_classes": 20})
        VARTeacher.from_checkpoints(wrong_classes, files["var"], files["vae"])


def test_bad_inputs_give_clear_errors(files):
    teacher = VARTeacher.from_checkpoints(golden_config(files["g"]), files["var"], files["vae"])
    tokens = torch.zeros(2, 30, 8)
    with pytest.raises(
        DD2ValueError, match=r"labels: expected class ids in \[0, 9\] \(10 classes\), got values in \[3, 10\]"
    ):
        teacher.log_probs(tokens, torch.tensor([3, 10]))
    with pytest.raises(DD2ValueError, match=r"labels: expected class ids in \[0, 9\]"):
        teacher.sample(torch.tensor([12]))
    with pytest.raises(DD2ValueError, match=r"tokens: expected shape \(\*, 30, 8\), got \(2, 30, 32\)"):
        teacher.log_probs(torch.zeros(2, 30, 32), torch.tensor([0, 1]))
    with pytest.raises(DD2ValueError, match=r"labels: expected shape \(2,\), got \(3,\)"):
        teacher.log_probs(tokens, torch.tensor([0, 1, 2]))
    with pytest.raises(DD2ValueError, match=r"ids: expected values in \[0, 63\]"):
        teacher.embed(torch.full((1, 30), 64))


def test_log_probs_condition_on_earlier_scales_only(files):
    """The CSD / GTS conditioning unit is the previous scales: with VAR's policy (ramped CFG, top-k, top-p), moving the
    continuous tokens of scale k changes no row of scales <= k and changes the rows of scale k + 1."""
    from dd2_core.teacher import group_slices

    teacher = VARTeacher.from_checkpoints(golden_config(files["g"]), files["var"], files["vae"])
    assert teacher.policy.cfg_schedule == "ramp" and teacher.policy.uses_cfg
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([1, 7])
    tokens = torch.randn(2, teacher.num_tokens, teacher.codebook.shape[1], generator=g)
    base = teacher.log_probs(tokens, labels)
    slices = group_slices(teacher.token_groups)
    for k, sl in enumerate(slices[:-1]):
        moved = tokens.clone()
        moved[:, sl] += torch.randn(moved[:, sl].shape, generator=g)
        lp = teacher.log_probs(moved, labels)
        assert torch.equal(lp[:, : sl.stop], base[:, : sl.stop]), f"scale {k} leaked into scales <= {k}"
        assert not torch.equal(lp[:, slices[k + 1]], base[:, slices[k + 1]]), f"scale {k + 1} ignores scale {k}"
