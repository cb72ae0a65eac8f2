"""Test helper (not a test module), run on 2 ranks by test_train_safe_load.py:

    python -m torch.distributed.run --nproc_per_node 2 zero_files_worker.py OUT

For ZeRO 1, 2 and 3 in fp32 and bf16: trains a small engine (odd parameter sizes, a frozen parameter, a buffer)
two steps and saves it to OUT/<fp32|bf16>-zero<k>/model. Then plants a pickle that would run code (create
OUT/evil/ran) into a copy of the fp32 ZeRO-2 checkpoint and tries `load_engine`, and DeepSpeed's `load_checkpoint`
under `safe_deepspeed_loads`, on every rank; each rank writes what happened to OUT/result_<rank>.json.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from dd2_train import engine as eng


class Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)  # 42 parameters: not a multiple of 2 ranks x alignment
        self.norm = nn.LayerNorm(7)
        self.b = nn.Linear(7, 3)
        self.frozen = nn.Parameter(torch.randn(3, 3), requires_grad=False)
        self.register_buffer("scale", torch.tensor([1.5, 2.5, 3.5]))

    def forward(self, x):
        return (self.b(self.norm(self.a(x))) * self.scale.to(x.dtype)) @ self.frozen.to(x.dtype)


def main() -> None:
    out = Path(sys.argv[1])
    dist = eng.init_distributed()
    result: dict = {}
    for precision in ("fp32", "bf16"):  # bf16 runs name their optimizer files bf16_zero_pp_rank_*
        for zero in (1, 2, 3):
            torch.manual_seed(0)
            spec = eng.EngineSpec(lr=1e-2, warmup_start_lr=0.0, warmup_steps=0, betas=(0.9, 0.95), weight_decay=0.0,
                                  grad_clip=1.0, zero_stage=zero, precision=precision, micro_batch=2, grad_accum=1,
                                  world_size=dist.world_size)  # fmt: skip
            engine = eng.build_engine(Net(), spec)
            g = torch.Generator().manual_seed(dist.rank)
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            for _ in range(2):
                loss = engine(torch.randn(2, 5, generator=g).to(dtype)).float().square().mean()
                engine.backward(loss)
                engine.step()
            eng.save_engine(engine, out / f"{precision}-zero{zero}", "model")
            eng.barrier()
            if (precision, zero) == ("fp32", 2):
                engine2 = engine
    eng.barrier()
    # a copy of the ZeRO-2 checkpoint with a code pickle inside the model states (rank 0 plants it)
    evil = out / "evil"
    if dist.is_main:
        shutil.copytree(out / "fp32-zero2", evil)
        path = evil / "model" / "mp_rank_00_model_states.pt"
        state = torch.load(path, weights_only=False)  # our own file
        state["payload"] = Payload(str(evil / "ran"))
        torch.save(state, path)
    eng.barrier()
    try:
        eng.load_engine(engine2, evil, "model")
        result["load_engine"] = "loaded"
    except Exception as e:
        result["load_engine"] = f"{type(e).__name__}: {e}"
    from dd2_train.safe_load import safe_deepspeed_loads

    try:  # the second guard alone (no pickle scan first): DeepSpeed's own loads go through weights_only=True
        with safe_deepspeed_loads(engine2):
            engine2.load_checkpoint(str(evil), tag="model")
        result["deepspeed_load"] = "loaded"
    except Exception as e:
        result["deepspeed_load"] = f"{type(e).__name__}: {e}"
    result["ran"] = (evil / "ran").exists()
    (out / f"result_{dist.rank}.json").write_text(json.dumps(result))
    eng.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
