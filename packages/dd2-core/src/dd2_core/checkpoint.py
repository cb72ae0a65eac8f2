"""Reading and writing weights: official .pt/.pth layouts, safetensors, strict loading with one clear error.

Layouts accepted by `read_state_dict`:
    {"model": sd}  (LlamaGen DDP files, VQ files), {"state_dict": sd}, {"module": sd}, or a raw state_dict (VAR,
    LlamaGen FSDP-consolidated XXL/3B). Key prefixes `module.` (DDP) and `_orig_mod.` (torch.compile) are stripped.
    .pt/.pth/.bin are read with torch.load(weights_only=True); .safetensors with safetensors.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from dd2_core.errors import CheckpointError

_WRAPPER_KEYS = ("model", "state_dict", "module", "ema")
_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove DDP `module.` and torch.compile `_orig_mod.` prefixes (any order, repeated)."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def read_state_dict(path: str | os.PathLike, *, key: str | None = None) -> dict[str, Tensor]:
    """Load a state_dict from a checkpoint file in any supported layout (module docstring).

    `key` picks a wrapper entry explicitly (e.g. "var_state_dict"); by default the first of
    model/state_dict/module/ema present is used, else the file is taken as a raw state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint: no such file {str(path)!r}; pass the path of a .pt/.pth/.safetensors file"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a checkpoint at all
        raise CheckpointError(
            f"checkpoint {str(path)!r}: could not be read ({type(e).__name__}: {e}); "
            "is the file complete (compare its size with the download) and a PyTorch or safetensors checkpoint?"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {str(path)!r}: expected a dict, found {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"checkpoint {str(path)!r}: expected an entry {key!r}, found keys {sorted(obj)[:10]}")
        obj = obj[key]
    else:
        for k in _WRAPPER_KEYS:
            if k in obj and isinstance(obj[k], Mapping):
                obj = obj[k]
                break
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise CheckpointError(f"checkpoint {str(path)!r}: holds no tensors (top-level keys {sorted(obj)[:10]})")
    return strip_prefixes(sd)


def load_strict(module: nn.Module, sd: Mapping[str, Tensor], *, expected: str, source: str = "state_dict") -> None:
    """load_state_dict(strict=True), but one error listing missing keys, unexpected keys and shape mismatches.

    `expected` names the configuration the module was built for (e.g. "LlamaGen GPT-L (24 layers, dim 1024)").
    """
    _compare(module.state_dict(), sd, expected=expected, source=source)
    module.load_state_dict(sd, strict=True)


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{key: shape} from a .safetensors file's header alone (no tensor is read or allocated)."""
    import json
    import struct

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {str(path)!r}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        return {k: tuple(int(d) for d in v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: not a readable safetensors file ({type(e).__name__}: {e}); is it complete?"
        ) from e


def check_shapes(module: nn.Module, shapes: Mapping[str, tuple[int, ...]], *, expected: str, source: str) -> None:
    """The `load_strict` comparison against shapes only (e.g. a module built on the meta device and a file's
    header): one CheckpointError listing missing keys, unexpected keys and shape mismatches."""
    fake = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    _compare(module.state_dict(), fake, expected=expected, source=source)


def _compare(own: Mapping[str, Tensor], sd: Mapping[str, Tensor], *, expected: str, source: str) -> None:
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:

        def few(xs: list) -> str:
            return ", ".join(map(str, xs[:6])) + (f", ... (+{len(xs) - 6} more)" if len(xs) > 6 else "")

        lines = [f"{source} does not match {expected}:"]
        if missing:
            lines.append(f"  {len(missing)} missing keys: {few(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected keys: {few(unexpected)}")
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatches (key, found, expected): {few(mismatched)}")
        lines.append("  check the model family and size in the config against the checkpoint file")
        raise CheckpointError("\n".join(lines))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file where a folder of the path should be
        raise NotADirectoryError(errno.ENOTDIR, f"cannot write {path}: {e.filename} is a file, not a folder") from None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # ENOSPC from write() names no file: name it
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def save_safetensors(sd: Mapping[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Atomically write a state_dict as safetensors (tensors made contiguous, shared storage cloned)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
