"""A VAR teacher through every stage (issue: VAR end to end): gen-data -> gts -> csd -> export under the deepspeed
launcher (2 CPU ranks, gloo, ZeRO 2) with the paper recipe, then `OneStepPipeline.from_pretrained` and `dd2 sample`
on the exported VAR pipeline in a fresh venv where only dd2-core is installed (tests/conftest.py).

The teacher is a tiny random-weight VAR (`teacher.size: custom`, 3 scales of 1, 4 and 9 tokens, width 32) with a
tiny multi-scale VQVAE, written as raw state_dicts like the released var_d16.pth / vae_ch160v4096z32.pth. The
group structure (a generated token depends on the noise of earlier scales and its own only) is checked exactly in
packages/dd2-core/tests/test_generator.py; here: the stages agree with the teacher (gen-data's shards are the
teacher's own KV-cached samples, GTS trains the head alone first), VAR's frozen phi convs stay the VQVAE's through
every checkpoint and the export, and the pipeline samples the same images with dd2-core alone. A second launch runs
the recommended recipe (gen-data -> gts -> gen-pairs -> regress -> csd -> export) with ZeRO-3 engines and a
ZeRO-3-partitioned teacher.

CI environment: DS_ACCELERATOR=cpu (set here for the subprocesses).
"""

import io
import json
import math
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dd2_core.checkpoint import read_state_dict
from dd2_core.models.var import VAR, VARConfig
from dd2_core.models.var_vqvae import VARVQVAE, VARVQVAEConfig
from dd2_core.pipeline import OneStepPipeline
from dd2_teachers.registry import load_teacher
from dd2_train.checkpoint import RunFolder, module_weights
from dd2_train.data import derive_seed

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "packages" / "dd2-train" / "run.py"
TIMEOUT = 300
PATCH_NUMS = (1, 2, 3)
VAR_CFG = VARConfig(depth=2, embed_dim=32, num_heads=2, num_classes=3, vocab_size=16, token_dim=4,
                    patch_nums=PATCH_NUMS)  # fmt: skip
VQVAE_CFG = VARVQVAEConfig(vocab_size=16, token_dim=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, patch_nums=PATCH_NUMS)
SEED = 5


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def var_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("var")
    torch.manual_seed(0)
    var, vqvae = VAR(VAR_CFG), VARVQVAE(VQVAE_CFG)
    torch.save(var.state_dict(), root / "var.pth")
    torch.save(vqvae.state_dict(), root / "vae.pth")
    config = {
        "run_dir": str(root / "run"),
        "stage": ["gen-data", "gts", "csd", "export"],
        "recipe": "paper",
        "seed": SEED,
        "teacher": {
            "family": "var",
            "size": "custom",
            "ckpt": str(root / "var.pth"),
            "vq_ckpt": str(root / "vae.pth"),
            "var": VAR_CFG.model_dump(mode="json"),
            "vqvae": VQVAE_CFG.model_dump(mode="json"),
        },  # fmt: skip
        "head": {"width": 16, "depth": 1},
        # the paper preset (VAR-d16's: policy, K = 5, accumulation 4, warm-ups, GTS head-only phase) at tiny sizes
        "gen_data": {"num_samples": 64, "shard_size": 16, "batch_size": 8},
        "gts": {"steps": 4, "head_only_steps": 2, "batch_size": 8, "data": {"num_workers": 1, "shuffle_buffer": 8}},
        "csd": {"steps": 2, "batch_size": 8},
        "checkpoint": {"every": 2, "keep_last": 0},
        "log": {"every": 1},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = _launch(path)
    return {"root": root, "config": path, "run": root / "run", "var": var, "vqvae": vqvae, "log": log}


def _launch(config: Path, *overrides: str) -> str:
    """deepspeed --num_gpus 2 run.py --config CONFIG --set ...; returns the output."""
    exe = Path(sys.executable).with_name("deepspeed")
    cmd = [str(exe) if exe.is_file() else "deepspeed", "--num_gpus", "2", "--master_port", str(_port())]
    cmd += [str(RUN_PY), "--config", str(config), *(a for o in overrides for a in ("--set", o))]
    env = os.environ | {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, cwd=config.parent)
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _shard(path: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """meta, ids (M, N), labels (M,) of one gen-data shard."""
    members: dict[str, bytes] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            members[m.name] = tar.extractfile(m).read()
    meta = json.loads(members.pop("__meta__.json") if "__meta__.json" in members else members.pop(next(iter(members))))
    keys = sorted({name.split(".")[0] for name in members})
    ids = torch.stack([torch.from_numpy(np.load(io.BytesIO(members[f"{k}.ids.npy"])).astype(np.int64)) for k in keys])
    labels = torch.tensor([int(members[f"{k}.cls"]) for k in keys])
    return meta, ids, labels


def _phi(sd: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}


def test_every_stage_of_a_var_teacher(var_run):
    run, var, vqvae = var_run["run"], var_run["var"], var_run["vqvae"]
    assert "world 2" in var_run["log"] and "ZeRO 2" in var_run["log"]
    vae_phi = _phi(vqvae.state_dict(), "quantize.quant_resi.")
    # gen-data: 4 shards; shard j holds exactly the teacher's KV-cached samples (ramped CFG, top-k, top-p) for the
    # labels and generator that gen-data seeds with (seed, j), whichever rank wrote it
    teacher = load_teacher(json.loads((run / "pipeline" / "teacher_ref.json").read_text()), device="cpu")
    shards = sorted((run / "gen-data" / "shards").glob("shard-*.tar"))
    assert len(shards) == 4
    for j in (0, 1):  # one shard of each rank
        meta, ids, labels = _shard(shards[j])
        assert meta["num_tokens"] == 14 and meta["policy"]["cfg_schedule"] == "ramp"
        g = torch.Generator().manual_seed(derive_seed(SEED, "gen-data", j))
        want_labels = torch.randint(3, (16,), generator=g)
        want = torch.cat([teacher.sample(want_labels[i : i + 8], generator=g) for i in (0, 8)])
        assert torch.equal(labels, want_labels) and torch.equal(ids, want), f"shard {j}"
    # gts: the backbone is the teacher's transformer during the head-only steps, then trains; phi never moves
    gts = dict(RunFolder(run / "gts").complete_checkpoints())
    assert sorted(gts) == [2, 4]
    at2, at4 = module_weights(gts[2], "model"), module_weights(gts[4], "model")
    teacher_bb = {k: v for k, v in var.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(at2[f"backbone.var.{k}"], v) for k, v in teacher_bb.items())
    assert not all(torch.equal(at4[f"backbone.var.{k}"], v) for k, v in teacher_bb.items())
    for sd in (at2, at4):
        assert all(torch.equal(v, vae_phi[k]) for k, v in _phi(sd, "backbone.phi.").items())
    # csd: finite losses, the progressive EMA rate, K = 5 and accumulation 4 of the paper preset
    records = [json.loads(line) for line in (run / "csd" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r[k]) for r in records for k in ("loss_csd", "loss_fcs"))
    assert records[-1]["ema_decay"] == pytest.approx(2 / 11)
    assert "micro-batch 1 x accumulation 4 x world 2" in (run / "csd" / "log.txt").read_text()
    # export: the EMA generator, its phi the decoder's, and the teacher_ref rebuilds the custom VAR teacher
    pipe = OneStepPipeline.from_pretrained(run / "pipeline")
    ema = read_state_dict(RunFolder(run / "csd").latest_checkpoint() / "ema.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in pipe.generator.state_dict().items())
    assert all(torch.equal(v, vae_phi[k]) for k, v in pipe.generator.backbone.phi.state_dict().items())
    assert all(torch.equal(v, vqvae.state_dict()[k]) for k, v in pipe.decoder.state_dict().items())
    assert pipe.config.family == "var" and pipe.config.decoder == "var_vqvae"
    assert all(torch.equal(v, var.state_dict()[k]) for k, v in teacher.var.state_dict().items())


def test_var_pipeline_samples_with_dd2_core_alone(var_run, core_only_venv, tmp_path):
    from PIL import Image

    from dd2_core.cli import image_grid

    pipeline = var_run["run"] / "pipeline"
    out_npy = tmp_path / "images.npy"
    script = f"""
import importlib.util, json
import numpy as np
import dd2_core
from dd2_core.pipeline import OneStepPipeline
absent = {{m: importlib.util.find_spec(m) is None for m in ("dd2_teachers", "dd2_train", "dd2_eval", "deepspeed")}}
out = OneStepPipeline.from_pretrained({str(pipeline)!r})([0, 1, 2, 1], seed=0)
np.save({str(out_npy)!r}, out.images.numpy())
print(json.dumps({{"absent": absent, "core": dd2_core.__file__, "shape": list(out.images.shape),
                   "dtype": str(out.images.dtype), "tokens": list(out.tokens.shape)}}))
"""
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([core_only_venv / "bin" / "python", "-c", script], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(result["absent"].values()), f"importable in the fresh venv: {result['absent']}"
    assert Path(result["core"]).is_relative_to(core_only_venv), f"dd2_core came from {result['core']}"
    assert (result["shape"], result["dtype"], result["tokens"]) == ([4, 6, 6, 3], "torch.uint8", [4, 14, 4])
    pipe = OneStepPipeline.from_pretrained(pipeline)
    assert np.array_equal(np.load(out_npy), pipe([0, 1, 2, 1], seed=0).images.numpy())  # same images as here
    grid = tmp_path / "grid.png"
    cli = subprocess.run([core_only_venv / "bin" / "dd2", "sample", "--pipeline", pipeline, "--out", grid,
                          "--per-class", "2", "--device", "cpu"], capture_output=True, text=True, timeout=120,
                         env=env)  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-4000:]
    want = image_grid(pipe(torch.tensor([0, 0, 1, 1, 2, 2]), seed=0).images, rows=3)  # one row per class
    assert np.array_equal(np.asarray(Image.open(grid).convert("RGB")), want.numpy())


@pytest.mark.slow
def test_zero3_with_a_sharded_var_teacher(var_run):
    """ZeRO-3 engines and a ZeRO-3-partitioned teacher (its blocks): VAR reads some weights outside their own
    module's forward (dd2_train.engine.register_child_parameters). The same samples and first GTS step as ZeRO 2.
    With the recommended recipe: DD1 pairs of the teacher's per-scale flow map (gen-pairs), offline regression onto
    them, then anchored CSD from the regression's EMA generator."""
    run = var_run["root"] / "zero3"
    log = _launch(var_run["config"], f"run_dir={run}", "deepspeed.zero_stage=3", "teacher.shard=true",
                  "recipe=recommended", "stage=[gen-data,gts,gen-pairs,regress,csd,export]", "gts.steps=2",
                  "gts.head_only_steps=1", "gen_pairs.num_samples=32", "gen_pairs.shard_size=8",
                  "gen_pairs.batch_size=8", "gen_pairs.flow_steps=4", "regress.steps=1", "regress.batch_size=8",
                  "regress.data.num_workers=0", "csd.steps=1")  # fmt: skip
    assert len(list((run / "gen-pairs" / "shards").glob("*.tar"))) == 4
    assert "teacher: ZeRO-3 partitioned over 2 ranks" in log
    assert "generator warm-started from the EMA generator of" in (run / "csd" / "log.txt").read_text()
    for a, b in zip(sorted((run / "gen-data" / "shards").glob("*.tar")),
                    sorted((var_run["run"] / "gen-data" / "shards").glob("*.tar")), strict=True):  # fmt: skip
        assert torch.equal(_shard(a)[1], _shard(b)[1]), a.name
    first = [
        json.loads((r / "gts" / "log.jsonl").read_text().splitlines()[0])["loss_gts"] for r in (run, var_run["run"])
    ]
    assert first[0] == first[1]
    records = [json.loads(line) for line in (run / "csd" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and all(math.isfinite(r["loss_csd"]) for r in records)
    pipe = OneStepPipeline.from_pretrained(run / "pipeline")
    vae_phi = _phi(var_run["vqvae"].state_dict(), "quantize.quant_resi.")
    assert all(torch.equal(v, vae_phi[k]) for k, v in pipe.generator.backbone.phi.state_dict().items())
    assert pipe([0, 2], seed=0).images.shape == (2, 6, 6, 3)
