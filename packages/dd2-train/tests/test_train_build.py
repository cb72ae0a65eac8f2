"""build: the networks of a run from its teacher section (VAR specifics; the launch tests cover the rest)."""

import torch

from dd2_core.models.var import VAR, VARConfig
from dd2_core.models.var_vqvae import VARVQVAE, VARVQVAEConfig
from dd2_teachers.var import VARTeacher
from dd2_train.build import build_ar_diffusion, restore_frozen_tokenizer
from dd2_train.config import HeadSpec, TeacherSpec

PN = (1, 2, 3)
VAR_CFG = VARConfig(depth=1, embed_dim=32, num_heads=2, num_classes=3, vocab_size=16, token_dim=4, patch_nums=PN)
VQVAE_CFG = VARVQVAEConfig(vocab_size=16, token_dim=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PN)


def test_var_phi_convs_come_back_exactly_after_a_bf16_checkpoint():
    """VAR's frozen phi convs are not trained, so a bf16 run's checkpoint holds only their bf16 rounding (no fp32
    master copy); restore_frozen_tokenizer puts the VQVAE's own fp32 convs back, and touches nothing else."""
    torch.manual_seed(0)
    teacher = VARTeacher(VAR(VAR_CFG), VARVQVAE(VQVAE_CFG))
    spec = TeacherSpec(family="var", size="custom", ckpt="v.pth", vq_ckpt="q.pth", var=VAR_CFG, vqvae=VQVAE_CFG)
    model = build_ar_diffusion(teacher, spec, HeadSpec(width=16, depth=1))
    phi = model.backbone.phi
    assert not any(p.requires_grad for p in phi.parameters())
    rounded = {k: v.bfloat16().float() for k, v in model.state_dict().items()}  # what module_weights returns then
    model.load_state_dict(rounded)
    assert not all(torch.equal(v, teacher.vqvae.phi.state_dict()[k]) for k, v in phi.state_dict().items())
    restore_frozen_tokenizer(model, teacher, spec)
    assert all(torch.equal(v, teacher.vqvae.phi.state_dict()[k]) for k, v in phi.state_dict().items())
    assert torch.equal(model.head.final.linear.weight, rounded["head.final.linear.weight"])
