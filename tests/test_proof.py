"""End to end on the enumerable teacher: CSD distils an AR teacher's *joint* into one step (issue: foundation).

The teacher's joint p_T is computed exactly by enumeration (8 codes, 4 positions: 4,096 sequences). The test runs the
real stages — teacher fit, GTS initialisation, CSD with K guidance updates per generator update — and compares the
one-step generator with the set-prediction baseline (independent exact marginals) and with itself before CSD.
"""

import json

import pytest

from dd2_train.proof import PRESETS, ProofConfig, run_proof


@pytest.mark.slow
def test_csd_distils_the_joint_into_one_step(capsys, tmp_path):
    cfg = ProofConfig.model_validate(PRESETS["ci"] | {"with_paper": False, "with_dd1": False})
    result = run_proof(cfg)
    tv = result["tv"]
    with capsys.disabled():
        print("\nproof (ci preset):", json.dumps({k: round(v, 4) for k, v in tv.items()}))
        print("seconds:", json.dumps({k: round(v, 1) for k, v in result["seconds"].items()}), "csd", result["dd2"])
    assert tv["teacher_vs_data"] < 0.1  # the teacher learned the synthetic joint
    assert tv["noise_floor"] < 0.1
    assert tv["set_prediction"] >= 0.3  # positions depend strongly on each other
    assert tv["ar_diffusion"] < 0.3  # GTS gives a good multi-step model
    assert tv["dd2"] < tv["gts_init"]  # CSD improves on the GTS-initialised generator
    assert tv["dd2"] <= 0.8 * tv["set_prediction"]  # and beats one-step set prediction clearly
