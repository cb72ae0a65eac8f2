import pytest
import torch

from dd2_core.errors import DD2ValueError
from dd2_core.logits import SamplingPolicy
from dd2_core.sampling import nearest_code, teacher_flow_map
from dd2_core.teacher import Teacher
from dd2_teachers.toy import (
    ToyTeacher,
    ToyTeacherConfig,
    all_sequences,
    fit_toy_teacher,
    histogram,
    product_of_marginals,
    sequence_index,
    synthetic_joint,
    total_variation,
)


@pytest.fixture(scope="module")
def fitted():
    teacher = ToyTeacher(ToyTeacherConfig(codebook_size=4, num_tokens=3, dim=32, heads=2))
    joint = synthetic_joint(4, 3, sharpness=3.0, seed=0)
    tv = fit_toy_teacher(teacher, joint, steps=300, batch=256, generator=torch.Generator().manual_seed(0))
    return teacher, joint, tv


def test_synthetic_joint_is_a_distribution_with_strong_dependencies():
    joint = synthetic_joint(8, 4, sharpness=3.0, seed=0)
    assert joint.shape == (8**4,) and abs(float(joint.sum()) - 1) < 1e-12 and (joint >= 0).all()
    assert total_variation(joint, product_of_marginals(joint, 8, 4)) > 0.5  # set prediction is far off


def test_sequence_index_inverts_enumeration():
    seqs = all_sequences(5, 3)
    assert torch.equal(sequence_index(seqs, 5), torch.arange(125))


def test_toy_teacher_implements_the_protocol_and_fits(fitted):
    teacher, joint, tv = fitted
    assert isinstance(teacher, Teacher)
    assert tv < 0.1
    p_t = teacher.exact_joint()
    assert abs(float(p_t.sum()) - 1) < 1e-6
    ids = teacher.sample(torch.zeros(20000, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    assert total_variation(histogram(ids, 4), p_t) < 0.05  # AR sampling agrees with the enumerated joint


def test_flow_map_reproduces_the_teacher_joint(fitted):
    teacher, _, _ = fitted
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(8000, 3, 2, generator=g)
    tokens = teacher_flow_map(teacher, noise, torch.zeros(8000, dtype=torch.long), steps=48)
    ids = nearest_code(tokens, teacher.codebook)
    assert (tokens - teacher.codebook[ids]).norm(dim=-1).max() < 0.05  # lands on codes
    p_t = teacher.exact_joint()
    floor = total_variation(histogram(teacher.sample(torch.zeros(8000, dtype=torch.long), generator=g), 4), p_t)
    assert total_variation(histogram(ids, 4), p_t) < floor + 0.03


def test_cfg_policy_and_save_load(tmp_path, fitted):
    teacher, _, _ = fitted
    teacher.save(tmp_path / "t")
    again = ToyTeacher.load(tmp_path / "t")
    x = teacher.embed(all_sequences(4, 3)[:7])
    labels = torch.zeros(7, dtype=torch.long)
    torch.testing.assert_close(again.log_probs(x, labels), teacher.log_probs(x, labels))
    cfg = ToyTeacherConfig(num_classes=3, policy=SamplingPolicy(cfg_scale=2.0, top_k=2))
    guided = ToyTeacher(cfg)
    lp = guided.log_probs(torch.zeros(2, 4, 2), torch.tensor([0, 2]))
    assert (lp > float("-inf")).sum(-1).le(3).all()  # top-k 2 (ties may keep one more)
    with pytest.raises(DD2ValueError, match="labels"):
        guided.log_probs(torch.zeros(2, 4, 2), torch.tensor([0, 3]))
    with pytest.raises(DD2ValueError, match="ids"):
        teacher.embed(torch.tensor([[0, 9]]))
    with pytest.raises(FileNotFoundError, match="config.json"):
        ToyTeacher.load(tmp_path / "missing")
