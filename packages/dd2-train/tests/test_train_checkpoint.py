"""The run folder: atomic step folders, the latest pointer, keep-last-N, half-written checkpoints, RNG states."""

import random

import numpy as np
import pytest
import torch

from dd2_core.errors import CheckpointError
from dd2_train.checkpoint import (
    RunFolder,
    capture_rng,
    load_rank_state,
    read_manifest,
    resolve_checkpoint,
    restore_rng,
    save_rank_state,
    step_name,
)


def _save(folder: RunFolder, step: int, keep_last: int = 0) -> None:
    tmp = folder.begin(step)
    (tmp / "weights.bin").write_bytes(bytes([step % 256]) * 64)
    folder.commit(step, {"stage": "csd", "world_size": 1, "modules": {}}, keep_last)


def test_commit_latest_and_keep_last(tmp_path):
    folder = RunFolder(tmp_path / "csd")
    assert folder.latest_checkpoint() is None
    for step in (10, 20, 30, 40):
        _save(folder, step, keep_last=2)
    assert [s for s, _ in folder.complete_checkpoints()] == [30, 40]
    assert folder.latest_checkpoint() == folder.checkpoints / step_name(40)
    assert (folder.checkpoints / "latest").read_text() == step_name(40)
    assert read_manifest(folder.latest_checkpoint())["step"] == 40
    assert not any(p.name.startswith(".tmp-") for p in folder.checkpoints.iterdir())
    assert resolve_checkpoint(tmp_path / "csd") == folder.checkpoints / step_name(40)
    assert resolve_checkpoint(folder.checkpoints / step_name(30)) == folder.checkpoints / step_name(30)


def test_half_written_checkpoints_are_never_loaded(tmp_path):
    folder = RunFolder(tmp_path / "gts")
    _save(folder, 5)
    # killed while writing step 10: files in the temporary folder, no manifest, no rename
    tmp = folder.begin(10)
    (tmp / "model").mkdir()
    (tmp / "model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * 100)
    # a step folder without a readable manifest (e.g. copied by hand, or a truncated manifest)
    broken = folder.checkpoints / step_name(20)
    broken.mkdir()
    (broken / "manifest.json").write_text('{"step": 20, "modu')
    assert folder.latest_checkpoint() == folder.checkpoints / step_name(5)
    # a `latest` pointer to something incomplete is not trusted either
    (folder.checkpoints / "latest").write_text(step_name(20))
    assert folder.latest_checkpoint() == folder.checkpoints / step_name(5)
    assert folder.remove_partial() == [tmp]
    assert not tmp.exists()


def test_resolve_checkpoint_error_is_clear(tmp_path):
    (tmp_path / "gts").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_checkpoint(tmp_path / "gts")


def test_rng_states_round_trip_through_rank_files(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1), random.seed(2), np.random.seed(4)
    state = capture_rng(gen)
    save_rank_state(tmp_path, 1, {"rng": state, "data": {"epoch": 2, "batches": 7, "skipped": 0}})
    expected = (torch.rand(3), random.random(), np.random.rand(), torch.rand(3, generator=gen))
    loaded = load_rank_state(tmp_path, 1)  # weights_only=True
    restore_rng(loaded["rng"], gen)
    again = (torch.rand(3), random.random(), np.random.rand(), torch.rand(3, generator=gen))
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[3], again[3])
    assert expected[1:3] == again[1:3]
    assert loaded["data"] == {"epoch": 2, "batches": 7, "skipped": 0}
    with pytest.raises(CheckpointError, match="no state for rank 0"):
        load_rank_state(tmp_path, 0)
