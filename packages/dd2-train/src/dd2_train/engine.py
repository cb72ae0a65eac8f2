"""Everything DeepSpeed: process group, ZeRO engines, frozen (optionally sharded) modules, engine checkpoints.

The only dd2 module that imports deepspeed (STYLE.md 2.6). A DeepSpeed engine is itself the `Updater` of the
step functions (`engine.backward(loss)`; `engine.step()` steps the optimizer, clips, zeroes the gradients and
advances the LR schedule at gradient-accumulation boundaries only), and `engine.module` is the model they train.

Accelerator: DeepSpeed picks it (CUDA on GPU machines, CPU + gloo elsewhere; CI sets DS_ACCELERATOR=cpu in its
environment). Precision: bf16 on GPU, fp32 on CPU (`resolve_precision`). Optimizer: torch's AdamW through
`"torch_adam": true` (no JIT build), β = (0.9, 0.95), linear warm-up from `warmup_start_lr` (DeepSpeed WarmupLR).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from dd2_core.errors import CheckpointError
from dd2_core.heads import VelocityHead

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(local_rank: int | None = None) -> DistInfo:
    """Join (or create) the process group. Without a launcher, runs as a world of one on a free local port."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if local_rank is None or local_rank < 0:  # torchrun sets LOCAL_RANK; the deepspeed launcher passes --local_rank
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "RANK" not in os.environ:  # plain `python run.py`: a single-process world
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank), MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=accel.communication_backend_name(), auto_mpi_discovery=False)
    device = torch.device(accel.device_name(local_rank) if accel.device_name() != "cpu" else "cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__


def accelerator_name() -> str:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' on an accelerator, 'fp32' on CPU (DeepSpeed has no fp16/bf16 mixed precision win there)."""
    if precision != "auto":
        return precision
    return "fp32" if accelerator_name() == "cpu" else "bf16"


def barrier() -> None:
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":  # name the device: NCCL otherwise guesses (and warns)
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def shutdown(*, wait: bool = True) -> None:
    """Leave the process group at the end of a run (`wait`: after a barrier, so that no rank leaves early)."""
    if dist.is_initialized():
        if wait:
            barrier()
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of a picklable object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_ranks_ok(ok: bool) -> bool:
    """True only if `ok` holds on every rank (a collective; use it so that all ranks fail together)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


@dataclass(frozen=True)
class EngineSpec:
    """What one DeepSpeed engine needs; the trainer fills it from the stage config."""

    lr: float  # end learning rate
    warmup_start_lr: float
    warmup_steps: int  # optimizer steps of this engine
    betas: tuple[float, float]
    weight_decay: float
    grad_clip: float  # 0 = off
    zero_stage: int
    precision: str  # "bf16" | "fp32"
    micro_batch: int  # per rank per micro-step
    grad_accum: int
    world_size: int


def deepspeed_config(spec: EngineSpec) -> dict[str, Any]:
    """The DeepSpeed config dict of one engine (train_batch_size = micro x accumulation x world)."""
    cfg: dict[str, Any] = {
        "train_batch_size": spec.micro_batch * spec.grad_accum * spec.world_size,
        "train_micro_batch_size_per_gpu": spec.micro_batch,
        "gradient_accumulation_steps": spec.grad_accum,
        "optimizer": {
            "type": "Adam",
            "params": {
                "lr": spec.lr,
                "betas": list(spec.betas),
                "eps": 1e-8,
                "weight_decay": spec.weight_decay,
                "torch_adam": True,  # torch.optim.AdamW: no FusedAdam/CPUAdam JIT build
                "adam_w_mode": True,
            },
        },
        "gradient_clipping": spec.grad_clip,
        "zero_optimization": {"stage": spec.zero_stage},
        "bf16": {"enabled": spec.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if spec.zero_stage == 3:
        cfg["zero_optimization"].update(stage3_gather_16bit_weights_on_model_save=False)
    if spec.warmup_steps > 0:
        cfg["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": spec.warmup_start_lr,
                "warmup_max_lr": spec.lr,
                "warmup_num_steps": spec.warmup_steps,
                "warmup_type": "linear",
            },
        }
    return cfg


def build_engine(module: nn.Module, spec: EngineSpec):
    """Wrap `module` in a DeepSpeed engine training its `requires_grad` parameters. Returns the engine."""
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"build_engine: {type(module).__name__} has no trainable parameter")
    if spec.zero_stage == 3:
        register_child_parameters(module)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=params, config=deepspeed_config(spec), dist_init_required=False
    )
    return engine


def freeze(module: nn.Module, *, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen network in eval mode (teacher, fixed generator): no gradients, no optimizer, replicated."""
    module.requires_grad_(False)
    module.eval()  # inference behaviour (no dropout) for the whole run
    return module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)


def shard_frozen(module: nn.Module, *, precision: str, world_size: int):
    """A frozen network partitioned with ZeRO-3 across ranks (parameters gathered layer by layer in forward).

    Returns the engine; call `engine.module` (its parameters are partitioned in place).
    """
    import deepspeed

    module.requires_grad_(False)
    module.eval()
    register_child_parameters(module)
    cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "train_batch_size": world_size,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 1 << 30,
    }
    engine, _, _, _ = deepspeed.initialize(model=module, config=cfg, dist_init_required=False)
    engine.eval()
    return engine


def register_child_parameters(module: nn.Module) -> int:
    """ZeRO-3: let every module read its direct children's own parameters in its forward (returns how many).

    ZeRO-3 gathers a module's own parameters only around that module's forward. Some model code reads a child's
    weight itself (VAR's attention: F.linear(x, self.mat_qkv.weight, bias); VARBackbone: the VAR module's
    pos_start and pos_1LC via `var.features`), and the step functions call the models' methods, not the engine,
    so DeepSpeed's automatic discovery of such parameters is off: register them as external parameters instead.
    """
    import deepspeed

    n = 0
    for parent in module.modules():
        for child in parent.children():
            for p in child.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(parent, p)
                n += 1
    return n


@contextlib.contextmanager
def gathered(module: nn.Module, zero_stage: int) -> Iterator[None]:
    """Full parameters of a ZeRO-3 module inside the block (read-only); a no-op for stages 0-2."""
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def _blocks(module: nn.Module, skip: tuple[type[nn.Module], ...] = ()) -> list[nn.Module]:
    """The transformer blocks of `module`: children of every nn.ModuleList named `blocks` or `layers`, except those
    inside a module of a type in `skip`."""
    skipped = [name for name, m in module.named_modules() if skip and isinstance(m, skip)]
    found = []
    for name, child in module.named_modules():
        inside_skipped = any(name == s or name.startswith(s + ".") for s in skipped)
        if isinstance(child, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("blocks", "layers") and not inside_skipped:
            found.extend(child)
    return found


def enable_activation_checkpointing(module: nn.Module) -> int:
    """Recompute every transformer block of `module` in backward (torch non-reentrant checkpointing).

    Blocks are the children of every nn.ModuleList named `blocks` or `layers`; their `forward` is wrapped in
    place, so parameter names (and checkpoints) do not change. Returns how many blocks were wrapped.
    """
    blocks = _blocks(module)
    for block in blocks:
        forward = block.forward

        @functools.wraps(forward)
        def wrapped(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped
    if not blocks:
        raise ValueError(f"activation checkpointing: {type(module).__name__} has no `blocks`/`layers` ModuleList")
    return len(blocks)


COMPILE_CACHE_SIZE = 64  # compiled variants kept per code object (grad mode, batch shapes, dtypes of 3 networks)


def compile_regions(module: nn.Module, *, backend: str = "inductor") -> int:
    """Regional torch.compile, in place: every transformer block and every velocity head of `module`.

    Each block is compiled on its own (`nn.Module.compile`), so one traced graph serves all blocks of a class and
    compile time does not grow with depth; a velocity head is compiled whole (its LayerNorm/AdaLN/SiLU chain is
    where eager mode loses most to fusion). Parameter and state-dict names do not change (no `_orig_mod.` prefix),
    so checkpoints stay interchangeable with uncompiled runs. The first calls of each shape compile (tens of
    seconds on a GPU); DeepSpeed's ZeRO-1/2 gradient hooks work unchanged. Not for ZeRO-3, whose per-module
    parameter gathering needs eager modules (the config refuses that pair). Returns how many regions were compiled.
    """
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, COMPILE_CACHE_SIZE)
    regions = [m for m in module.modules() if isinstance(m, VelocityHead)] + _blocks(module, skip=(VelocityHead,))
    for region in regions:
        region.compile(backend=backend)
    if not regions:
        raise ValueError(f"compile: {type(module).__name__} has no transformer blocks or velocity head to compile")
    return len(regions)


def save_engine(engine, folder: Path, tag: str) -> None:
    """Collective: every rank writes its part of the engine (model, optimizer, LR schedule) to folder/tag/."""
    try:
        engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
    except (OSError, RuntimeError) as e:  # ENOSPC surfaces as torch's "PytorchStreamWriter failed writing file"
        from dd2_train.checkpoint import writing

        raise writing(folder / tag, e) from e


def load_engine(engine, folder: Path, tag: str) -> None:
    """Collective: restore model, optimizer and LR-schedule states written by `save_engine`.

    Every file is read with weights_only=True (dd2_train.safe_load): a file that needs pickled code is refused,
    naming it, before DeepSpeed uses it."""
    from dd2_train.safe_load import check_pickles, safe_deepspeed_loads

    if not (folder / tag).is_dir():
        raise CheckpointError(f"{folder / tag}: missing; the checkpoint holds no engine {tag!r}")
    check_pickles(folder / tag)
    with safe_deepspeed_loads(engine):
        path, _ = engine.load_checkpoint(
            str(folder), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True, load_module_strict=True
        )
    if path is None:
        raise CheckpointError(f"{folder}/{tag}: no DeepSpeed checkpoint there")


def engine_fp32_state_dict(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a saved engine (master weights of any ZeRO stage), on CPU, without an engine; read by
    dd2's own ZeRO reader with weights_only=True (dd2_train.safe_load)."""
    from dd2_train.safe_load import zero_fp32_state_dict

    return zero_fp32_state_dict(folder, tag)


def engine_lr(engine) -> float:
    return float(engine.get_lr()[0])


def engine_global_steps(engine) -> int:
    """Optimizer steps taken by the engine (its LR-schedule position)."""
    return int(engine.global_steps)
