"""Every stage through the real launch path (torchrun, 2 CPU ranks, gloo) for ZeRO 1, 2 and 3, and bitwise resume
after SIGKILL. Each launch runs adapt -> gen-data -> gts -> gen-pairs -> regress -> csd -> align -> export on a tiny
toy teacher with the recommended recipe (regress warm start, anchored CSD); regress is offline (DD1 on the pair
shards) under ZeRO 2 and on-policy under ZeRO 1 and 3.

CI environment: DS_ACCELERATOR=cpu (set here for the subprocesses); the first launch on a machine JIT-builds
DeepSpeed's shm_comm op (~30-60 s; cache it with TORCH_EXTENSIONS_DIR).
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dd2_core.checkpoint import read_state_dict
from dd2_core.pipeline import OneStepPipeline
from dd2_teachers.registry import load_teacher
from dd2_teachers.toy import ToyTeacher, ToyTeacherConfig
from dd2_train.checkpoint import RunFolder, module_weights, read_manifest
from dd2_train.data import write_shard
from dd2_train.trainer import stage_seconds

TESTS = Path(__file__).resolve().parent
RUN_PY = TESTS.parent / "run.py"
STAGES = ["adapt", "gen-data", "gts", "gen-pairs", "regress", "csd", "align", "export"]
TIMEOUT = 480  # per launch; generous for a loaded 2-core machine


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: Path, config: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port())]
    cmd += [str(script), "--config", str(config), *(a for o in overrides for a in ("--set", o))]
    full_env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=TIMEOUT)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _log(stage_dir: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (stage_dir / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"{stage_dir}: steps logged twice or out of order: {steps}"
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("loss", "lr", "ema"))} for r in records}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("launch")
    teacher = ToyTeacher(
        ToyTeacherConfig(codebook_size=8, token_dim=2, num_tokens=4, num_classes=3, dim=16, depth=1, heads=2)
    )
    teacher.save(root / "teacher")
    g = torch.Generator().manual_seed(0)
    for j in range(4):  # "image codes" for the adapt stage
        ids, labels = torch.randint(8, (16, 4), generator=g), torch.randint(3, (16,), generator=g)
        write_shard(
            root / "codes" / f"shard-{j:06d}.tar", ids, labels, {"num_tokens": 4, "vocab_size": 8, "num_classes": 3}
        )
    config = {
        "run_dir": str(root / "run"),
        "stage": STAGES,
        "seed": 3,
        "teacher": {"family": "toy", "size": "toy", "ckpt": str(root / "teacher")},
        "head": {"width": 16, "depth": 1},
        "adapt": {"steps": 2, "batch_size": 8, "data": {"shards": str(root / "codes"), "num_workers": 1}},
        "gen_data": {"num_samples": 128, "shard_size": 16, "batch_size": 16},
        "gts": {
            "steps": 12,
            "head_only_steps": 2,
            "batch_size": 16,
            "grad_accum": 2,
            "optim": {"lr": 1e-3, "warmup_steps": 3},
            "data": {"num_workers": 2, "shuffle_buffer": 8},
        },
        "gen_pairs": {"num_samples": 64, "shard_size": 16, "batch_size": 16, "flow_steps": 8},
        "regress": {
            "mode": "offline",
            "steps": 4,
            "batch_size": 8,
            "grad_accum": 2,
            "optim": {"lr": 1e-3},
            "data": {"num_workers": 1, "shuffle_buffer": 8},
        },
        "csd": {
            "steps": 6,
            "batch_size": 8,
            "grad_accum": 2,
            "guidance_updates": 2,
            "ema_max_decay": 0.99,
            "guidance_prefit": 2,
            "csd_draws": 2,
            "guidance_residual": True,  # the trainer passes the teacher to every guidance step (csd, pre-fit, align)
        },
        "align": {"steps": 2, "batch_size": 8},
        "checkpoint": {"every": 2, "keep_last": 0},
        "log": {"every": 1},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": path, "teacher": teacher}


@pytest.fixture(scope="module")
def zero2_run(setup) -> Path:
    run = setup["root"] / "zero2"
    _ok(_launch(RUN_PY, setup["config"], f"run_dir={run}", "deepspeed.zero_stage=2"))
    return run


def _check_pipeline_run(run: Path, teacher: ToyTeacher, zero: int) -> None:
    for stage in ("adapt", "gts", "regress", "csd", "align"):
        folder = RunFolder(run / stage)
        latest = folder.latest_checkpoint()
        assert latest is not None, f"{stage}: no checkpoint"
        manifest = read_manifest(latest)
        assert (manifest["world_size"], manifest["zero_stage"]) == (2, zero)
        log = _log(run / stage)
        assert max(log) == manifest["step"]
        assert all(math.isfinite(v) for rec in log.values() for v in rec.values())
        assert any((run / stage / "events").iterdir()), f"{stage}: no TensorBoard events"
        assert json.loads((run / stage / "config.json").read_text())["deepspeed"]["zero_stage"] == zero
    assert sorted(p.name for p in (run / "gen-data" / "shards").glob("*.tar")) == [
        f"shard-{j:06d}.tar" for j in range(8)
    ]
    assert sorted(p.name for p in (run / "gen-pairs" / "shards").glob("*.tar")) == [
        f"shard-{j:06d}.tar" for j in range(4)
    ]
    assert ToyTeacher.load(run / "adapt" / "teacher").cfg == teacher.cfg  # the adapted teacher
    # gts: the backbone stays exactly the teacher's during the 2 head-only steps, then trains
    gts = dict(RunFolder(run / "gts").complete_checkpoints())
    assert sorted(gts) == [2, 4, 6, 8, 10, 12]
    at2, at4 = module_weights(gts[2], "model"), module_weights(gts[4], "model")
    teacher_bb = teacher.backbone.state_dict()
    assert all(torch.equal(at2[f"backbone.{k}"], v) for k, v in teacher_bb.items())
    assert not all(torch.equal(at4[f"backbone.{k}"], v) for k, v in teacher_bb.items())
    assert not torch.equal(at2["head.final.linear.weight"], torch.zeros_like(at2["head.final.linear.weight"]))
    # regress starts from model A (last gts checkpoint); csd's generator starts from regress's EMA generator
    regress_log = _log(run / "regress")
    assert sorted(regress_log) == [1, 2, 3, 4] and all(rec["loss_reg"] > 0 for rec in regress_log.values())
    assert "generator initialised from model A of" in (run / "regress" / "log.txt").read_text()
    assert "generator warm-started from the EMA generator of" in (run / "csd" / "log.txt").read_text()
    # csd: the progressive EMA rate after 6 generator updates; the recipe's constant regression anchor
    csd_log = _log(run / "csd")
    assert csd_log[6]["ema_decay"] == pytest.approx(min(0.99, 6 / 15))
    csd_records = [json.loads(line) for line in (run / "csd" / "log.jsonl").read_text().splitlines()]
    lams = [r["anchor_lambda"] for r in csd_records]
    assert lams == [1.0] * 6 and all(r["loss_anchor"] > 0 for r in csd_records)
    assert "csd guidance pre-fit 2/2" in (run / "csd" / "log.txt").read_text()  # before round 1 of a fresh run
    # export: the pipeline holds the EMA generator of the last csd checkpoint and generates
    pipe = OneStepPipeline.from_pretrained(run / "pipeline")
    ema = read_state_dict(RunFolder(run / "csd").latest_checkpoint() / "ema.safetensors")
    for k, v in pipe.generator.state_dict().items():
        assert torch.equal(v, ema[k]), k
    out = pipe(torch.tensor([0, 1, 2]), seed=0)
    assert out.tokens.shape == (3, 4, 2) and torch.isfinite(out.tokens).all()
    ref = json.loads((run / "pipeline" / "teacher_ref.json").read_text())
    assert ref["weights"] == "ema" and Path(ref["ckpt"]).is_absolute()
    rebuilt = load_teacher(ref, device="cpu")  # what `dd2-eval bench` times: the teacher the run distilled
    assert rebuilt.cfg == teacher.cfg and all(
        torch.equal(v, teacher.state_dict()[k]) for k, v in rebuilt.state_dict().items()
    )


def test_all_stages_zero2(setup, zero2_run):
    _check_pipeline_run(zero2_run, setup["teacher"], 2)


@pytest.mark.parametrize("zero", [1, 3])
def test_all_stages_zero1_zero3(setup, zero):
    run = setup["root"] / f"zero{zero}"
    extra = (
        ["teacher.shard=true", "deepspeed.activation_checkpointing=true"]
        if zero == 3
        else ["deepspeed.compile=true", "deepspeed.compile_backend=aot_eager"]  # regional compile under ZeRO-1
    ) + ["regress.mode=onpolicy"]
    _ok(_launch(RUN_PY, setup["config"], f"run_dir={run}", f"deepspeed.zero_stage={zero}", *extra))
    _check_pipeline_run(run, setup["teacher"], zero)
    if zero == 1:  # every trained network and the teacher-forced teacher; not gen-data's sampler
        for stage, names in {"adapt": ["adapt"], "gts": ["model", "teacher"], "csd": ["generator", "guidance",
                             "teacher"], "align": ["guidance", "teacher"]}.items():  # fmt: skip
            log = (run / stage / "log.txt").read_text()
            for name in names:
                assert f"{name}: torch.compile (aot_eager) on" in log, (stage, name)
        assert "torch.compile" not in (run / "gen-data" / "log.txt").read_text()


def test_sigkill_resume_is_bitwise_equal(setup, zero2_run):
    run = setup["root"] / "killed"
    args = [
        f"run_dir={run}",
        "deepspeed.zero_stage=2",
        "checkpoint.keep_last=2",
        "stage=[gts,regress,csd]",
        f"gts.data.shards={zero2_run / 'gen-data' / 'shards'}",
        f"regress.data.shards={zero2_run / 'gen-pairs' / 'shards'}",
    ]
    killer = TESTS / "kill_during_commit.py"
    # 1) killed while committing gts step 8: step 6 is the last complete checkpoint, step 8 is half-written
    first = _launch(killer, setup["config"], *args, env={"DD2_TEST_KILL": "gts:8"})
    assert first.returncode != 0
    tmp = run / "gts" / "checkpoints" / ".tmp-step_000008"
    assert tmp.is_dir() and not (tmp / "manifest.json").exists()
    assert RunFolder(run / "gts").latest_checkpoint().name == "step_000006"
    # 2) the same command resumes gts at step 6 (data stream replayed into epoch 1), then dies in regress at step 4
    second = _launch(killer, setup["config"], *args, env={"DD2_TEST_KILL": "regress:4"})
    assert second.returncode != 0
    assert "removed the half-written checkpoint" in second.stderr and ".tmp-step_000008" in second.stderr
    assert "gts/checkpoints/step_000006 (step 6)" in second.stderr  # "resumed from ..."
    # 3) regress resumes at step 2 (engine, EMA, RNG, pair stream), then csd dies at step 4
    third = _launch(killer, setup["config"], *args, env={"DD2_TEST_KILL": "csd:4"})
    assert third.returncode != 0
    assert "regress/checkpoints/step_000002 (step 2)" in third.stderr
    # 4) plain re-run: csd resumes at step 2 (two engines, EMA, RNG) and finishes
    _ok(_launch(RUN_PY, setup["config"], *args))
    for stage in ("gts", "regress", "csd"):
        assert _log(run / stage) == _log(zero2_run / stage), stage  # every step, bitwise (floats via JSON repr)
    for stage, names in {"regress": ("generator", "ema"), "csd": ("generator", "guidance", "ema")}.items():
        ref = RunFolder(zero2_run / stage).latest_checkpoint()
        got = RunFolder(run / stage).latest_checkpoint()
        for name in names:
            a, b = module_weights(ref, name), module_weights(got, name)
            assert all(torch.equal(a[k], b[k]) for k in a), (stage, name)


def test_time_limit_ends_a_stage_and_counts_as_complete(setup, zero2_run):
    """`<stage>.time_limit_s` (equal-time comparisons): the stage stops at the first step past the budget with a
    checkpoint that records it, and a second launch treats the stage as complete instead of training on."""
    args = [f"run_dir={zero2_run}", "deepspeed.zero_stage=2", "stage=[regress]", "name=regress-timed",
            "regress.steps=1000000", "regress.time_limit_s=2", "checkpoint.every=1000000"]  # fmt: skip
    first = _launch(RUN_PY, setup["config"], *args)
    _ok(first)
    folder = RunFolder(zero2_run / "regress-timed")
    latest = folder.latest_checkpoint()
    state = read_manifest(latest)["state"]
    assert state["time_limit_reached"] is True and 2.0 <= state["train_seconds"] < 60, state
    assert 1 <= state["step"] < 1_000_000 and max(_log(zero2_run / "regress-timed")) == state["step"]
    assert "time limit 2 s reached after" in first.stderr
    second = _launch(RUN_PY, setup["config"], *args)
    _ok(second)
    assert "already complete (its time limit was reached)" in second.stderr
    assert folder.latest_checkpoint() == latest and [p for _, p in folder.complete_checkpoints()] == [latest]
    launches = [json.loads(line) for line in (zero2_run / "regress-timed" / "launches.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in launches] == ["regress", "regress"]  # one wall-time record per launch
    assert stage_seconds(zero2_run / "regress-timed") == pytest.approx(sum(r["seconds"] for r in launches))
    assert launches[0]["seconds"] >= 2.0
