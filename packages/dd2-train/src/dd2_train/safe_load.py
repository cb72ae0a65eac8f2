"""Reading checkpoint files without running code from them: torch.load(weights_only=True) everywhere.

A pickle can name any Python callable, so `torch.load(weights_only=False)` on a file from someone else runs their
code. Every `.pt` file dd2 reads goes through `safe_torch_load`: tensors, plain containers and numbers, plus the
three small DeepSpeed classes that its ZeRO files hold (a loss-scaler record, a fragment address, the ZeRO stage
enum); a file that needs anything else is refused with a message naming it.

`zero_fp32_state_dict` rebuilds an engine's full fp32 weights from DeepSpeed's ZeRO files (our own reader, in
place of DeepSpeed's zero_to_fp32, which unpickles with weights_only=False). The layout it reads:
    <tag>/mp_rank_00_model_states.pt                 ZeRO 1/2: "module" (working-precision weights and buffers),
                                                     "buffer_names", "param_shapes" (one {name: shape} per
                                                     parameter group), "frozen_param_shapes/fragments" (full
                                                     tensors), "shared_params" {name: name it aliases}
    <tag>/zero_pp_rank_R_mp_rank_00_model_states.pt  ZeRO 3: the same per rank R; frozen fragments are partitions
    <tag>/zero_pp_rank_R_mp_rank_00_optim_states.pt  "optimizer_state_dict": ZeRO 1/2 "single_partition_of_fp32_groups"
                                                     (rank R's slice of each group's flat fp32 vector) and
                                                     "param_alignment_paddings"; ZeRO 3 "fp32_flat_groups"
ZeRO 1/2 flatten a group's parameters one after another, pad the flat vector and cut it into world-size equal
slices. ZeRO 3 cuts every parameter on its own into ceil(numel / world) pieces; rank R's flat vector is its
pieces of all parameters in order.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dd2_core.errors import CheckpointError


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file needs pickled code (not only tensors and containers) to load; it was not loaded."""


@functools.cache
def _allowed_globals() -> tuple[type, ...]:
    """The DeepSpeed classes its own checkpoint files hold: records of plain fields, no code runs to rebuild them."""
    found: list[type] = []
    for module, name in (
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),  # {'cur_scale': 1.0, 'dynamic': False}
        ("deepspeed.utils.tensor_fragment", "fragment_address"),  # dataclass {numel, start}
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),  # IntEnum
    ):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(__import__(module, fromlist=[name]), name))
    return tuple(found)


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True (and the DeepSpeed records above); refuses anything that needs code."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(_allowed_globals())):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"WeightsUnpickler error: (.*?)(?: was not an allowed global|\. Please|\n|$)", str(e))
        detail = m.group(1).strip() if m else (str(e).strip().splitlines() or [type(e).__name__])[0]
        if m or "Weights only load failed" in str(e):
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the file needs pickled code, not only tensors and containers ({detail}); "
                "dd2 never runs code from a checkpoint (was it written by dd2, or altered?)"
            ) from None
        raise CheckpointError(f"{path}: could not be read ({detail}); is the file complete?") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: could not be read ({type(e).__name__}: {e}); is the file complete?") from None


@contextlib.contextmanager
def safe_deepspeed_loads(engine) -> Iterator[None]:
    """Inside the block, every file DeepSpeed's `engine.load_checkpoint` reads goes through `safe_torch_load`.

    DeepSpeed reads all checkpoint files through `engine.checkpoint_engine.load(path, map_location)`; the instance's
    method is replaced for the block (and restored after it)."""
    ckpt_engine = engine.checkpoint_engine

    def load(path, map_location=None):
        return safe_torch_load(path, map_location=map_location if map_location is not None else "cpu")

    ckpt_engine.load = load
    try:
        yield
    finally:
        del ckpt_engine.load  # back to the class's method


def check_pickles(folder: Path) -> None:
    """Refuse (UnsafeCheckpointError, naming the file) if any .pt file under `folder` references a Python global
    outside torch's weights-only allow-list and `_allowed_globals`; reads only each file's pickle, not its tensors."""
    allowed = {f"{c.__module__}.{c.__qualname__}" for c in _allowed_globals()}
    for path in sorted(folder.rglob("*.pt")):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as e:  # not a zip checkpoint (legacy format) or damaged: the safe load will say which
            raise CheckpointError(f"{path}: could not be read ({type(e).__name__}: {e}); is the file complete?") from e
        bad = [n for n in names if n not in allowed]
        if bad:
            raise UnsafeCheckpointError(
                f"{path}: refused to load: the file references Python code {bad[:3]}, not only tensors and "
                "containers; dd2 never runs code from a checkpoint (was it written by dd2, or altered?)"
            )


# -- ZeRO files -> full fp32 weights ----------------------------------------------------------------------------------
_RANK_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_(model|optim)_states\.pt$")  # bf16_: bf16 runs


def _rank_files(folder: Path, kind: str) -> list[Path]:
    found = sorted(
        (int(m.group(1)), p) for p in folder.iterdir() if (m := _RANK_RE.match(p.name)) and m.group(2) == kind
    )
    ranks = [r for r, _ in found]
    if ranks != list(range(len(ranks))):
        raise CheckpointError(f"{folder}: {kind} files of ranks {ranks}; expected ranks 0..{len(ranks) - 1}")
    return [p for _, p in found]


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def zero_fp32_state_dict(folder: str | os.PathLike, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights (master weights of ZeRO 1/2/3, frozen parameters and buffers) of the engine saved in
    folder/tag/, read with `safe_torch_load` and no engine. Shapes as in the module's state_dict."""
    root = Path(folder) / tag
    if not root.is_dir():
        raise CheckpointError(f"{root}: missing; the checkpoint holds no engine {tag!r}")
    optim_files = _rank_files(root, "optim")
    if not optim_files:
        raise CheckpointError(f"{root}: no zero_pp_rank_*_optim_states.pt files; not a ZeRO engine checkpoint")
    world = len(optim_files)
    optim = [safe_torch_load(p)["optimizer_state_dict"] for p in optim_files]
    zero3 = "fp32_flat_groups" in optim[0]
    if zero3:
        model_files = _rank_files(root, "model")
        if len(model_files) != world:
            raise CheckpointError(f"{root}: {len(model_files)} model-state files for {world} optimizer-state files")
        models = [safe_torch_load(p) for p in model_files]
    else:
        path = root / "mp_rank_00_model_states.pt"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; the checkpoint is incomplete")
        models = [safe_torch_load(path)]
    m0 = models[0]
    out: dict[str, torch.Tensor] = {}
    module = m0.get("module") or {}
    for name in m0.get("buffer_names", []):
        if name in module:
            out[name] = module[name]
    frozen = m0.get("frozen_param_shapes") or {}
    for name, shape in frozen.items():
        if zero3:  # partitions, one per rank
            parts = [m["frozen_param_fragments"][name].reshape(-1) for m in models]
            out[name] = torch.cat(parts)[: _numel(shape)].view(shape)
        else:
            out[name] = m0["frozen_param_fragments"][name].view(shape)
    shapes = [dict(group) for group in m0["param_shapes"]]
    if zero3:
        flats = [torch.cat([g.reshape(-1) for g in o["fp32_flat_groups"]]) for o in optim]
        offset = 0
        for group in shapes:
            for name, shape in group.items():
                n = _numel(shape)
                piece = math.ceil(n / world)
                if offset + piece > flats[0].numel():
                    raise CheckpointError(f"{root}: the fp32 partitions end before parameter {name!r}")
                out[name] = torch.cat([f[offset : offset + piece] for f in flats])[:n].view(shape)
                offset += piece
    else:
        paddings = optim[0].get("param_alignment_paddings")
        for g, group in enumerate(shapes):
            flat = torch.cat([o["single_partition_of_fp32_groups"][g].reshape(-1) for o in optim])
            offset = 0
            for i, (name, shape) in enumerate(group.items()):
                n = _numel(shape)
                if offset + n > flat.numel():
                    raise CheckpointError(f"{root}: the fp32 partitions end before parameter {name!r}")
                out[name] = flat[offset : offset + n].view(shape)
                offset += n + (int(paddings[g][i]) if paddings is not None else 0)
    for name, alias in (m0.get("shared_params") or {}).items():
        out[name] = out[alias]
    if not zero3:  # ZeRO 1 records no frozen_param_shapes; its full module state still holds the frozen parameters
        for name, value in module.items():
            out.setdefault(name, value)
    return {k: v.float().contiguous() for k, v in out.items()}
