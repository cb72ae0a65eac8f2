"""One writer per run folder, intact checkpoints only, a log that survives a cut-short line, clean CLI errors.

Each test first shows the original failure (what the old code accepted or crashed on), then the refusal or recovery.
"""

import errno
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from dd2_core.errors import CheckpointError
from dd2_teachers.toy import ToyTeacher, ToyTeacherConfig
from dd2_train import trainer
from dd2_train.checkpoint import RunFolder, read_manifest, resolve_checkpoint, step_name
from dd2_train.config import ConfigError, apply_overrides, check_config, validate_config
from dd2_train.data import DataError
from dd2_train.runlock import LOCK_NAME, RunFolderBusy, RunLock

PKG = Path(__file__).resolve().parents[1]


def _run_module():
    spec = importlib.util.spec_from_file_location("dd2_train_run", PKG / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def toy_teacher(tmp_path) -> Path:
    folder = tmp_path / "teacher"
    ToyTeacher(ToyTeacherConfig(dim=16, depth=1, heads=2)).save(folder)
    return folder


def _raw(tmp_path, teacher, **over) -> dict:
    raw = {"run_dir": str(tmp_path / "run"), "stage": "gts", "teacher": {"family": "toy", "size": "toy",
           "ckpt": str(teacher)}}  # fmt: skip
    return apply_overrides(raw, [f"{k}={v}" for k, v in over.items()])


# -- one writer per run folder --------------------------------------------------------------------------------------
_HOLDER = "import sys, time; from dd2_train.runlock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"  # noqa: E501


def _hold(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        with pytest.raises(RunFolderBusy) as e:
            RunLock(run_dir).acquire()
        msg = str(e.value)
        assert f"host {socket.gethostname()} pid {holder.pid}" in msg and "in use by" in msg and LOCK_NAME in msg
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing: a stale lock file stays
        holder.wait()
        holder.stdout.close()
    assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING), RunLock(run_dir):
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"took over the run-folder lock {run_dir / LOCK_NAME} of host {socket.gethostname()} pid {holder.pid}" in (
        caplog.text
    )
    assert (run_dir / LOCK_NAME).read_text() == ""  # released cleanly: the next launch has nothing to take over
    RunLock(run_dir).acquire()  # free again


def test_a_concurrent_launch_stops_at_once_naming_the_holder(tmp_path, toy_teacher):
    """Two ranks of a real launch into a run folder that another process writes: both stop before any work."""
    raw = _raw(tmp_path, toy_teacher, stage="gen-data", **{"gen_data.num_samples": 16, "gen_data.shard_size": 16,
               "gen_data.batch_size": 16})  # fmt: skip
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(raw))
    holder = _hold(tmp_path / "run")
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               str(PKG / "run.py"), "--config", str(config)]  # fmt: skip
        env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        tic = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert holder.poll() is None  # the holder was never disturbed
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert proc.returncode != 0
    err = proc.stderr
    assert (
        f"dd2-train: rank 0: error: {tmp_path / 'run'}: in use by host {socket.gethostname()} pid {holder.pid}" in err
    )
    assert "dd2-train: rank 1: error: " in err and "rank 0 could not lock the run folder" in err
    ours = [
        line for line in err.splitlines() if 'File "' in line and ("dd2_train" in line or "dd2-train/run.py" in line)
    ]
    assert not ours, ours  # no traceback of ours (torchrun prints its own summary of the failed ranks)
    assert not (tmp_path / "run" / "gen-data").exists()  # nothing written
    print(f"refused launch took {time.time() - tic:.1f} s\n{err}")


# -- intact checkpoints only -----------------------------------------------------------------------------------------
def _save(folder: RunFolder, step: int, keep_last: int = 0) -> Path:
    tmp = folder.begin(step)
    (tmp / "generator").mkdir()
    (tmp / "generator" / "mp_rank_00_model_states.pt").write_bytes(bytes([step % 256]) * 64)
    (tmp / "ema.safetensors").write_bytes(b"e" * 32)
    (tmp / "rank_00000.pt").write_bytes(b"r" * 16)
    modules = {"generator": {"kind": "engine"}, "ema": {"kind": "file", "file": "ema.safetensors"}}
    return folder.commit(step, {"stage": "csd", "world_size": 1, "modules": modules}, keep_last)


def test_a_checkpoint_missing_its_engine_folder_is_skipped(tmp_path, caplog):
    import shutil

    folder = RunFolder(tmp_path / "csd")
    for step in (4, 8, 12):
        _save(folder, step)
    damaged = folder.checkpoints / step_name(12)
    shutil.rmtree(damaged / "generator")  # what two concurrent launches left: the manifest and `latest` point here
    assert read_manifest(damaged) is not None  # the old test of completeness accepted it (then DeepSpeed asserted)
    with caplog.at_level(logging.WARNING):
        assert folder.latest_checkpoint() == folder.checkpoints / step_name(8)
    assert "skipped checkpoint" in caplog.text and "step_000012" in caplog.text
    assert "generator/mp_rank_00_model_states.pt is missing" in caplog.text
    assert f"using checkpoint {folder.checkpoints / step_name(8)} instead of the damaged step_000012" in caplog.text
    # same size, other bytes: the checksum catches it; a shorter file: the size
    (folder.checkpoints / step_name(8) / "ema.safetensors").write_bytes(b"x" * 32)
    (folder.checkpoints / step_name(4) / "rank_00000.pt").write_bytes(b"r" * 15)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert folder.latest_checkpoint() is None
    assert "ema.safetensors does not match its recorded sha256" in caplog.text
    assert "rank_00000.pt has 15 bytes, the manifest records 16" in caplog.text
    with pytest.raises(CheckpointError, match="step_000012: not an intact checkpoint: generator/mp_rank_00"):
        resolve_checkpoint(damaged)  # init_from / export naming the step folder itself


def test_a_legacy_manifest_without_file_records_is_checked_for_its_modules(tmp_path, caplog):
    import shutil

    folder = RunFolder(tmp_path / "gts")
    for step in (2, 4):
        path = _save(folder, step)
        manifest = read_manifest(path)
        del manifest["files"]  # written before file records existed
        (path / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(folder.checkpoints / step_name(4) / "generator")
    with caplog.at_level(logging.WARNING):
        assert folder.latest_checkpoint() == folder.checkpoints / step_name(2)
    assert "generator (module 'generator') is missing" in caplog.text


def test_leftovers_of_a_kill_are_removed_and_pruning_never_leaves_a_manifest_less_folder(tmp_path):
    folder = RunFolder(tmp_path / "csd")
    for step in (2, 4, 6):
        _save(folder, step, keep_last=2)
    assert [s for s, _ in folder.complete_checkpoints()] == [4, 6]
    # what kills leave: a pointer temp file (between write and rename), a half-deleted pruned folder (renamed
    # first since this change), and a step folder whose manifest an older, in-place prune had already deleted
    (folder.checkpoints / ".latest.k3j2h1").write_bytes(b"step_000006")
    old = folder.checkpoints / ".old-step_000002"
    old.mkdir()
    (old / "rank_00000.pt").write_bytes(b"r")
    stale = folder.checkpoints / step_name(1)
    (stale / "generator").mkdir(parents=True)
    assert read_manifest(stale) is None
    removed = folder.remove_partial()
    assert sorted(p.name for p in removed) == [".latest.k3j2h1", ".old-step_000002", "step_000001"]
    assert sorted(p.name for p in folder.checkpoints.iterdir()) == ["latest", step_name(4), step_name(6)]
    # pruning renames before it deletes: a kill inside rmtree leaves only an `.old-` folder
    calls = []
    original = __import__("shutil").rmtree

    def rmtree(path, *a, **k):
        calls.append(Path(path).name)
        return original(path, *a, **k)

    import dd2_train.checkpoint as ckpt

    ckpt.shutil.rmtree = rmtree
    try:
        _save(folder, 8, keep_last=2)
    finally:
        ckpt.shutil.rmtree = original
    assert calls == [".old-step_000004"]


# -- log.jsonl -------------------------------------------------------------------------------------------------------
def _ctx(path: Path, cfg=None) -> SimpleNamespace:
    return SimpleNamespace(folder=RunFolder(path), dist=SimpleNamespace(is_main=True), cfg=cfg, extra={})


def test_a_partial_last_log_line_is_dropped_on_resume(tmp_path, caplog):
    stage = tmp_path / "gts"
    stage.mkdir()
    lines = [json.dumps({"step": s, "loss": 0.5 / s}) for s in (1, 2, 3, 4)]
    (stage / "log.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 5, "lo')  # disk full mid-append
    with pytest.raises(json.JSONDecodeError):  # the original failure: every resume crashed here
        [json.loads(line) for line in (stage / "log.jsonl").read_text().splitlines()]
    with caplog.at_level(logging.WARNING):
        trainer._truncate_log(_ctx(stage), 3)
    assert (stage / "log.jsonl").read_text() == "\n".join(lines[:3]) + "\n"
    assert "dropped 1 unreadable line(s) (line 5; cut short by a full disk or a kill?)" in caplog.text
    assert [p.name for p in stage.iterdir()] == ["log.jsonl"]  # rewritten through a temporary file and a rename


def test_the_config_snapshot_is_written_only_after_a_clean_resume(tmp_path):
    stage = tmp_path / "csd"
    folder = RunFolder(stage)
    _save(folder, 2)
    (stage / "config.json").write_text('{"seed": 1}\n')
    cfg = SimpleNamespace(model_dump=lambda mode: {"seed": 2})
    ctx = _ctx(stage, cfg)

    def bad_load(step_dir):
        raise ConfigError(f"resume: {step_dir} was written by 2 ranks, this run has 1")

    with pytest.raises(ConfigError):
        trainer._resume_or_init(ctx, bad_load, lambda: None)
    assert json.loads((stage / "config.json").read_text()) == {"seed": 1}  # the previous run's snapshot stays
    assert trainer._resume_or_init(ctx, lambda d: read_manifest(d), lambda: None) == 2
    assert json.loads((stage / "config.json").read_text()) == {"seed": 2}


# -- config: what can escape or execute ------------------------------------------------------------------------------
def test_name_cannot_leave_run_dir(tmp_path, toy_teacher):
    for name in ("../elsewhere", "/etc", "a/b", "..", ".hidden"):
        with pytest.raises(ConfigError, match="name: .*expected one folder name inside run_dir"):
            validate_config(_raw(tmp_path, toy_teacher, name=name))
    assert validate_config(_raw(tmp_path, toy_teacher, name="csd-aligned")).stage_dir("gts").name == "csd-aligned"


def test_pipe_urls_need_allow_pipe(tmp_path, toy_teacher):
    pipe = "pipe:touch " + str(tmp_path / "ran") + " && cat shard.tar"
    raw = _raw(tmp_path, toy_teacher)
    raw["gts"] = {"data": {"shards": pipe}}
    with pytest.raises(ConfigError, match="gts.data.*runs a shell command; set allow_pipe: true"):
        validate_config(raw)
    raw["gts"]["data"]["allow_pipe"] = True
    assert validate_config(raw).gts.data.shards == pipe
    assert not (tmp_path / "ran").exists()


def test_missing_explicit_shards_fail_the_config_check(tmp_path, toy_teacher):
    cfg = validate_config(_raw(tmp_path, toy_teacher, **{"gts.data.shards": str(tmp_path / "s-{000..002}.tar")}))
    with pytest.raises(ConfigError, match=r"gts.data.shards: no such shard file '.*s-000.tar' \(\+2 more\)"):
        check_config(cfg, world_size=1)
    later = validate_config(_raw(tmp_path, toy_teacher, stage="[gen-data,gts]",
                                 **{"gts.data.shards": str(tmp_path / "s-{000..002}.tar")}))  # fmt: skip
    check_config(later, world_size=1)  # gen-data of the same launch writes them
    (tmp_path / "empty").mkdir()
    cfg = validate_config(_raw(tmp_path, toy_teacher, **{"gts.data.shards": str(tmp_path / "empty")}))
    with pytest.raises(ConfigError, match="gts.data.shards: folder .*empty' holds no \\*.tar shard"):
        check_config(cfg, world_size=1)


# -- run.py: one message per rank, exit 2 for bad input and 1 for failures ------------------------------------------
@pytest.mark.parametrize(
    ("error", "code", "shown"),
    [
        (DataError("shard 'a.tar': cannot read its metadata (ReadError: truncated)"), 2, "shard 'a.tar'"),
        (CheckpointError("ckpt/step_000004: not an intact checkpoint: generator/x.pt is missing"), 2, "is missing"),
        (OSError(errno.ENOSPC, "No space left on device", "run/gts/log.jsonl"), 1,
         "No space left on device: 'run/gts/log.jsonl'"),
        (PermissionError(errno.EACCES, "Permission denied", "run/gts"), 2, "Permission denied: 'run/gts'"),
        (RunFolderBusy("run: in use by host h pid 1"), 2, "in use by host h pid 1"),
        (RuntimeError("CUDA error: an illegal memory access"), 1, "RuntimeError: CUDA error"),
    ],
)  # fmt: skip
def test_run_py_errors_are_one_message_per_rank(tmp_path, toy_teacher, monkeypatch, capsys, error, code, shown):
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path, toy_teacher, stage="gen-data")))
    run = _run_module()

    def train(cfg, local_rank):
        raise error

    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run.main(["--config", str(config)]) == code
    err = capsys.readouterr().err
    assert err.startswith("dd2-train: rank 1: error: ") and shown in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 3
    assert run.main(["--config", str(config), "--debug"]) == code
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("DD2_DEBUG", "1")
    assert run.main(["--config", str(config)]) == code
    assert "Traceback" in capsys.readouterr().err


def test_a_full_disk_while_saving_names_the_checkpoint(tmp_path, monkeypatch):
    import dd2_train.checkpoint as ckpt
    from dd2_core.clitools import error_message, exit_code

    def full(obj, path):  # what torch raises on ENOSPC: no file system path in it
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(ckpt.CheckpointWriteError) as e:
        ckpt.save_rank_state(tmp_path, 0, {"rng": {}})
    assert exit_code(e.value) == 1
    assert error_message(e.value).startswith(f"{tmp_path / 'rank_00000.pt'}: writing the checkpoint failed (Runtime")
    assert "is the disk full or read-only?" in str(e.value)
