"""load_teacher: a teacher reference dict (a pipeline's teacher_ref.json) rebuilds the same teacher, bad references
fail naming the key, and the loader is the `dd2.teachers` entry point that dd2-eval finds."""

import json
from importlib.metadata import entry_points

import pytest
import torch

from dd2_core.checkpoint import save_safetensors
from dd2_core.errors import CheckpointError, DD2ValueError
from dd2_core.logits import SamplingPolicy
from dd2_core.models.llamagen import LlamaGen, LlamaGenConfig
from dd2_core.models.llamagen_vq import LlamaGenVQ, VQConfig
from dd2_core.models.var import VAR, VARConfig
from dd2_core.models.var_vqvae import VARVQVAE, VARVQVAEConfig
from dd2_teachers.llamagen import LlamaGenTeacher, LlamaGenTeacherConfig
from dd2_teachers.registry import TeacherFileError, TeacherRefError, load_teacher
from dd2_teachers.toy import ToyTeacher, ToyTeacherConfig
from dd2_teachers.var import VARTeacher, VARTeacherConfig

VQ = VQConfig(codebook_size=16, codebook_dim=4, z_channels=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
              codebook_used_size=0)  # fmt: skip
GPT = LlamaGenConfig(n_layer=1, dim=16, n_head=2, vocab_size=16, num_classes=3, grid=4, multiple_of=8)
POLICY = SamplingPolicy(cfg_scale=1.5, temperature=0.9, top_k=6)
TINY_VAR = VARConfig(depth=1, embed_dim=32, num_heads=2, num_classes=3, vocab_size=16, token_dim=4, patch_nums=(1, 2))
TINY_VQVAE = VARVQVAEConfig(vocab_size=16, token_dim=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=(1, 2))


def _json(ref: dict) -> dict:
    return json.loads(json.dumps(ref))  # what teacher_ref.json holds


@pytest.fixture
def toy_ref(tmp_path) -> tuple[ToyTeacher, dict]:
    teacher = ToyTeacher(ToyTeacherConfig(codebook_size=4, num_tokens=3, num_classes=3, dim=16, heads=2, seed=3))
    teacher.save(tmp_path / "toy")
    teacher.policy = POLICY
    teacher.eval().requires_grad_(False)  # frozen, as loaded (the autograd-enabled kernels round differently)
    ref = {"family": "toy", "size": "toy", "ckpt": str(tmp_path / "toy"), "vq_ckpt": None,
           "policy": POLICY.model_dump(mode="json"), "source_checkpoint": "x", "weights": "ema"}  # fmt: skip
    return teacher, _json(ref)


@pytest.fixture
def llamagen_ref(tmp_path) -> dict:
    gpt, vq = tmp_path / "gpt.safetensors", tmp_path / "vq.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_safetensors(LlamaGen(GPT.model_copy(update={"codebook_dim": 4})).state_dict(), gpt)
        save_safetensors(LlamaGenVQ(VQ).state_dict(), vq)
    ref = {"family": "llamagen", "size": "custom", "ckpt": str(gpt), "vq_ckpt": str(vq),
           "policy": POLICY.model_dump(mode="json"), "gpt": GPT.model_dump(mode="json"),
           "vq": VQ.model_dump(mode="json"), "sample_input": "codes"}  # fmt: skip
    return _json(ref)


def test_toy_teacher_is_rebuilt(toy_ref):
    original, ref = toy_ref
    teacher = load_teacher(ref, device="cpu")
    assert isinstance(teacher, ToyTeacher) and teacher.policy == POLICY
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    ids = torch.randint(4, (5, 3), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1])
    assert torch.equal(teacher.log_probs(teacher.embed(ids), labels), original.log_probs(original.embed(ids), labels))
    assert load_teacher(ref, device="cpu", dtype=torch.float64).codebook.dtype == torch.float64
    default = load_teacher(ref | {"policy": None}, device="cpu")
    assert default.policy == SamplingPolicy()  # null policy: the family's default


def test_custom_llamagen_teacher_is_rebuilt(llamagen_ref):
    cfg = LlamaGenTeacherConfig(gpt=GPT, vq=VQ, policy=POLICY, sample_input="codes")
    direct = LlamaGenTeacher.from_checkpoints(cfg, llamagen_ref["ckpt"], llamagen_ref["vq_ckpt"])
    teacher = load_teacher(llamagen_ref, device="cpu")
    assert isinstance(teacher, LlamaGenTeacher) and teacher.cfg == cfg and not teacher.cfg.compile
    assert teacher.embedding_fit is None  # cont_embed came from the checkpoint, as in an adapted teacher
    ids, labels = torch.randint(16, (2, 16), generator=torch.Generator().manual_seed(1)), torch.arange(2)
    tokens = direct.embed(ids)  # (B, N, C) code vectors
    assert torch.equal(teacher.log_probs(tokens, labels), direct.log_probs(tokens, labels))
    g = torch.Generator().manual_seed(2)
    assert torch.equal(teacher.sample(labels, generator=g), direct.sample(labels, generator=g.manual_seed(2)))
    assert load_teacher(llamagen_ref, device="cpu", compile=True).cfg.compile  # compiled on first use, not here


@pytest.fixture
def var_ref(tmp_path) -> dict:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(VAR(TINY_VAR).state_dict(), tmp_path / "var.pth")
        torch.save(VARVQVAE(TINY_VQVAE).state_dict(), tmp_path / "vae.pth")
    ref = {"family": "var", "size": "custom", "ckpt": str(tmp_path / "var.pth"), "vq_ckpt": str(tmp_path / "vae.pth"),
           "var": TINY_VAR.model_dump(mode="json"), "vqvae": TINY_VQVAE.model_dump(mode="json")}  # fmt: skip
    return _json(ref)


def test_custom_var_teacher_is_rebuilt(var_ref):
    cfg = VARTeacherConfig(var=TINY_VAR, vqvae=TINY_VQVAE)
    direct = VARTeacher.from_checkpoints(cfg, var_ref["ckpt"], var_ref["vq_ckpt"])
    teacher = load_teacher(var_ref, device="cpu")
    assert isinstance(teacher, VARTeacher) and teacher.token_groups == (1, 4) and teacher.policy == cfg.policy
    ids, labels = torch.randint(16, (2, 5), generator=torch.Generator().manual_seed(1)), torch.arange(2)
    tokens = direct.embed(ids)  # (B, N, C) code vectors
    assert torch.equal(teacher.log_probs(tokens, labels), direct.log_probs(tokens, labels))
    g = torch.Generator().manual_seed(2)
    assert torch.equal(teacher.sample(labels, generator=g), direct.sample(labels, generator=g.manual_seed(2)))
    with pytest.raises(TeacherRefError, match="'vqvae': var size 'custom' needs both var and vqvae"):
        load_teacher(var_ref | {"vqvae": None}, device="cpu")
    with pytest.raises(TeacherRefError, match="'var': only for var size 'custom', got size 'd16'"):
        load_teacher(var_ref | {"size": "d16"}, device="cpu")
    with pytest.raises(TeacherRefError, match="'var': .*var.patch_nums and vqvae.patch_nums must agree"):
        load_teacher(var_ref | {"var": TINY_VAR.model_dump(mode="json") | {"patch_nums": [1, 3]}}, device="cpu")
    with pytest.raises(TeacherRefError, match="'var': only for var teachers, got family 'llamagen'"):
        load_teacher(var_ref | {"family": "llamagen", "size": "B"}, device="cpu")


def test_bad_references_name_the_key(toy_ref, llamagen_ref, tmp_path):
    _, toy = toy_ref
    with pytest.raises(TeacherRefError, match=r"'family': expected one of \['toy', 'llamagen', 'var'\], got 'gpt'"):
        load_teacher(toy | {"family": "gpt"}, device="cpu")
    with pytest.raises(TeacherRefError, match="'family': missing"):
        load_teacher({"ckpt": "x"}, device="cpu")
    with pytest.raises(DD2ValueError, match="expected a mapping"):
        load_teacher(["toy"], device="cpu")
    with pytest.raises(TeacherFileError, match="'ckpt': expected a toy teacher folder"):
        load_teacher(toy | {"ckpt": str(tmp_path / "nope")}, device="cpu")
    with pytest.raises(DD2ValueError, match="compile: the toy teacher has no compiled decode step"):
        load_teacher(toy, device="cpu", compile=True)
    with pytest.raises(TeacherRefError, match="'policy': not valid SamplingPolicy fields: top_kk"):
        load_teacher(toy | {"policy": {"top_kk": 3}}, device="cpu")
    with pytest.raises(TeacherRefError, match="'sample_input': only for llamagen"):
        load_teacher(toy | {"sample_input": "ids"}, device="cpu")

    with pytest.raises(CheckpointError, match="'vq_ckpt': no such file .*missing.safetensors"):
        load_teacher(llamagen_ref | {"vq_ckpt": str(tmp_path / "missing.safetensors")}, device="cpu")
    with pytest.raises(TeacherRefError, match="'ckpt': missing"):
        load_teacher({k: v for k, v in llamagen_ref.items() if k != "ckpt"}, device="cpu")
    with pytest.raises(TeacherRefError, match=r"'size': llamagen sizes are \['B', 'L', 'XL', 'XXL', '3B', 'custom'\]"):
        load_teacher(llamagen_ref | {"size": "M"}, device="cpu")
    with pytest.raises(TeacherRefError, match="'vq': llamagen size 'custom' needs both gpt and vq"):
        load_teacher(llamagen_ref | {"vq": None}, device="cpu")
    with pytest.raises(TeacherRefError, match="'gpt': only for llamagen size 'custom'"):
        load_teacher(llamagen_ref | {"size": "B"}, device="cpu")
    with pytest.raises(TeacherRefError, match="'gpt': .*gpt.vocab_size must equal vq.codebook_size"):
        load_teacher(llamagen_ref | {"gpt": GPT.model_dump() | {"vocab_size": 32}}, device="cpu")
    with pytest.raises(TeacherRefError, match="'sample_input': expected 'ids' or 'codes', got 'pixels'"):
        load_teacher(llamagen_ref | {"sample_input": "pixels"}, device="cpu")
    with pytest.raises(CheckpointError, match="VQ checkpoint"):  # a real file of the wrong kind: the loader's error
        load_teacher(llamagen_ref | {"vq_ckpt": llamagen_ref["ckpt"]}, device="cpu")

    var = {"family": "var", "size": "d17", "ckpt": str(tmp_path / "var.pth"), "vq_ckpt": str(tmp_path / "vae.pth")}
    with pytest.raises(
        TeacherRefError, match=r"'size': var sizes are \['d16', 'd20', 'd24', 'd30', 'custom'\], got 'd17'"
    ):
        load_teacher(var, device="cpu")
    with pytest.raises(TeacherFileError, match="'ckpt': no such file .*var.pth"):
        load_teacher(var | {"size": "d16"}, device="cpu")


VAR_TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 3, "vocab_size": 16, "token_dim": 4,
            "patch_nums": [1, 2, 4]}  # fmt: skip
VQVAE_TINY = {"vocab_size": 16, "token_dim": 4, "ch": 32, "ch_mult": [1, 2], "patch_nums": [1, 2, 4]}


def test_random_init_teachers_sample_and_decode_at_their_size():
    """init 'random': no checkpoint, random weights at the ref's size (what dd2-eval bench --random-init times)."""
    from dd2_teachers.var import VARTeacher

    torch.manual_seed(0)
    llamagen = {"family": "llamagen", "size": "custom", "init": "random", "gpt": GPT.model_dump(mode="json"),
                "vq": VQ.model_dump(mode="json"), "policy": POLICY.model_dump(mode="json")}  # fmt: skip
    teacher = load_teacher(_json(llamagen), device="cpu", dtype=torch.bfloat16)
    assert isinstance(teacher, LlamaGenTeacher) and teacher.model.cfg.n_layer == 1 and teacher.policy == POLICY
    assert teacher.model.layers[0].attention.wqkv.weight.dtype == torch.bfloat16 and not teacher.training
    ids = teacher.sample(torch.tensor([0, 2]), generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 16) and teacher.decode(ids).shape == (2, 3, 8, 8)
    assert load_teacher(_json(llamagen), device="cpu", compile=True).cfg.compile

    var = {"family": "var", "size": "custom", "init": "random", "var": VAR_TINY, "vqvae": VQVAE_TINY}
    teacher = load_teacher(var, device="cpu")
    assert isinstance(teacher, VARTeacher) and teacher.num_tokens == 1 + 4 + 16
    ids = teacher.sample(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 21) and teacher.decode(ids).shape == (2, 3, 8, 8)

    with pytest.raises(TeacherRefError, match="'ckpt': init 'random' builds random weights; expected no ckpt"):
        load_teacher(var | {"ckpt": "var.pth"}, device="cpu")
    with pytest.raises(TeacherRefError, match="'init': expected 'checkpoint' or"):
        load_teacher(var | {"init": "zeros"}, device="cpu")
    with pytest.raises(TeacherRefError, match="'vqvae': var size 'custom' needs both var and vqvae"):
        load_teacher(var | {"vqvae": None}, device="cpu")
    with pytest.raises(TeacherRefError, match="'var': only for var size 'custom'"):
        load_teacher(var | {"size": "d16"}, device="cpu")
    with pytest.raises(TeacherRefError, match="'vqvae': only for var teachers"):
        load_teacher(llamagen | {"vqvae": VQVAE_TINY}, device="cpu")


def test_loader_is_the_dd2_teachers_entry_point():
    (ep,) = [ep for ep in entry_points(group="dd2.teachers") if ep.name == "load"]
    assert ep.load() is load_teacher
