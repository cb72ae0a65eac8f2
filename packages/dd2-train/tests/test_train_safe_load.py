"""No code runs from a run folder: every checkpoint file is read with weights_only=True, including DeepSpeed's ZeRO
files (our own reader, checked against DeepSpeed's zero_to_fp32 for ZeRO 1/2/3 on 2 ranks) and resume."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dd2_core.errors import CheckpointError
from dd2_train.checkpoint import load_rank_state, module_weights
from dd2_train.safe_load import UnsafeCheckpointError, safe_torch_load, zero_fp32_state_dict

TESTS = Path(__file__).resolve().parent


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def zero_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zero")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           str(TESTS / "zero_files_worker.py"), str(out)]  # fmt: skip
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_reader_matches_deepspeed(zero_run, zero, precision):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = zero_run / f"{precision}-zero{zero}"
    ours = zero_fp32_state_dict(folder, "model")
    ref = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="model")  # our own files
    # trainable parameters, buffers and (where DeepSpeed records them: ZeRO 2 and 3) frozen parameters
    expected = {"a.bias", "a.weight", "b.bias", "b.weight", "norm.bias", "norm.weight", "scale"}
    assert set(ours) == set(ref) | {"frozen"} and expected <= set(ref) and set(ref) - expected <= {"frozen"}
    assert ("frozen" in ref) == (zero != 1)
    for k in ref:
        assert ours[k].dtype == torch.float32 and torch.equal(ours[k], ref[k].float()), k
    if zero == 1:  # DeepSpeed's reader drops ZeRO 1's frozen parameters (a VAR teacher's phi convs); ours keeps them
        module = safe_torch_load(folder / "model" / "mp_rank_00_model_states.pt")["module"]
        assert torch.equal(ours["frozen"], module["frozen"].float())


def test_code_pickle_in_zero_files_never_runs(zero_run, tmp_path):
    # resume (load_engine on 2 ranks): refused by the pickle scan, and by DeepSpeed's loads alone
    for rank in (0, 1):
        result = json.loads((zero_run / f"result_{rank}.json").read_text())
        assert not result["ran"]
        for key in ("load_engine", "deepspeed_load"):
            assert result[key].startswith("UnsafeCheckpointError: "), result[key]
            assert "mp_rank_00_model_states.pt: refused to load" in result[key]
    # export / init_from (module_weights -> the ZeRO reader)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    evil = zero_run / "evil"
    marker = evil / "ran"
    get_fp32_state_dict_from_zero_checkpoint(str(evil), tag="model")  # the original failure: the payload runs
    assert marker.exists()
    marker.unlink()
    step = tmp_path / "step_000002"
    import shutil

    shutil.copytree(evil, step)
    (step / "manifest.json").write_text(json.dumps({"step": 2, "modules": {"model": {"kind": "engine"}}}))
    with pytest.raises(UnsafeCheckpointError, match="mp_rank_00_model_states.pt: refused to load"):
        module_weights(step, "model")
    assert not marker.exists() and not (step / "ran").exists()


def test_code_pickle_in_rank_state_and_plain_files_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "rank_00000.pt"
    torch.save({"rng": {"torch": torch.get_rng_state()}, "x": _Payload(marker)}, path)
    torch.load(path, weights_only=False)  # the failure a weights_only=False reader has
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafeCheckpointError, match="rank_00000.pt: refused to load"):
        safe_torch_load(path)
    with pytest.raises(CheckpointError, match="rank_00000.pt"):
        load_rank_state(tmp_path, 0)
    assert not marker.exists()
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut.pt: could not be read"):
        safe_torch_load(tmp_path / "cut.pt")
