"""End to end on the enumerable teacher: one step holds an AR teacher's *joint* (issues: foundation, fidelity).

The teacher's joint p_T is computed exactly by enumeration (8 codes, 4 positions: 4,096 sequences). The test runs the
real stages — teacher fit, GTS initialisation, then the recommended recipe (on-policy flow-map regression, then
anchored CSD with K guidance updates per generator update) — and compares the one-step generator with the
set-prediction baseline (independent exact marginals) and with the generator before training.
"""

import json

import pytest

from dd2_train.proof import PRESETS, ProofConfig, run_proof


@pytest.mark.slow
def test_recommended_recipe_distils_the_joint_into_one_step(capsys):
    cfg = ProofConfig.model_validate(PRESETS["ci"])
    result = run_proof(cfg)
    tv = result["tv"]
    with capsys.disabled():
        print("\nproof (ci preset):", json.dumps({k: round(v, 4) for k, v in tv.items()}))
        print("seconds:", json.dumps({k: round(v, 1) for k, v in result["seconds"].items()}))
    assert tv["teacher_vs_data"] < 0.1  # the teacher learned the synthetic joint
    assert tv["noise_floor"] < 0.1
    assert tv["set_prediction"] >= 0.3  # positions depend strongly on each other
    assert tv["ar_diffusion"] < 0.3  # GTS gives a good multi-step model
    assert tv["recommended"] < 0.5 * tv["gts_init"]  # far better than the generator it starts from
    assert tv["recommended"] <= 0.5 * tv["set_prediction"]  # and at most half of one-step set prediction's TV
    log = result["logs"]["recommended"]
    assert log["regress"]["steps"] > 0 and log["csd"]["steps"] > 0  # both phases ran within the budget


def test_proof_runs_on_another_teacher_with_every_method():
    """Any ToyTeacherConfig (here V = 4 codes in 3-D, N = 3) and every method: the JSON carries each TV."""
    cfg = ProofConfig.model_validate(
        {
            "teacher": {"codebook_size": 4, "token_dim": 3, "num_tokens": 3, "dim": 16, "depth": 1, "heads": 2},
            "teacher_steps": 20,
            "gts_steps": 10,
            "batch": 32,
            "budget_seconds": 0.5,
            "pairs": 256,
            "flow_steps": 4,
            "eval_samples": 1000,
            "ar_steps": 2,
            "methods": ("paper", "recommended", "onpolicy", "regression"),
        }
    )
    result = run_proof(cfg)
    for key in ("noise_floor", "set_prediction", "paper", "recommended", "onpolicy", "regression"):
        assert 0.0 <= result["tv"][key] <= 1.0, key
    assert result["logs"]["regression"]["regress"]["steps"] > 0 and "pairs_seconds" in result["logs"]["regression"]
    assert all(result["seconds"][m] >= 0.5 for m in cfg.methods)  # each used its whole CPU budget
