"""The run folder of one stage (DESIGN.md): config snapshot, atomic checkpoints, `latest` pointer, keep-last-N.

Layout of `<run_dir>/<stage name>/`:
    config.json                      resolved TrainConfig snapshot (rank 0, at start)
    log.txt, log.jsonl, events/      logs (dd2_train.logs)
    checkpoints/
        step_000120/                 a complete checkpoint: its manifest.json is written last, before the rename
            manifest.json            {"step", "stage", "world_size", "modules": {name: {"kind": "engine"|"file"}},
                                      "files": {relative path: {"size", "sha256"}} (every other file of the folder)}
            <engine name>/           DeepSpeed engine checkpoint (tag = engine name), one file per rank
            <module>.safetensors     replicated weights (EMA, frozen generator), written by rank 0
            rank_00000.pt            per-rank RNG states and data-stream position
            trainer_state.json       loop counters
        .tmp-step_000240/            being written; never loaded, removed at the next start
        latest                       "step_000120", replaced atomically after the rename

A checkpoint is written into `.tmp-step_N/` by all ranks, rank 0 fsyncs it, writes `manifest.json`, renames the
folder to `step_N/` and then replaces `latest`. A kill at any point leaves either the old or the new checkpoint
complete; `latest_checkpoint` only returns folders whose manifest reads and whose every listed file is there with
its recorded size and checksum, so a half-written or damaged one is never loaded (the next older intact one is, and
the log names the ones skipped). Pruned folders are renamed to `.old-step_N/` before they are deleted, and
`remove_partial` clears what a kill leaves behind (`.tmp-*`, `.old-*`, `.latest.*`, manifest-less step folders).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dd2_core.checkpoint import atomic_write_bytes, read_state_dict
from dd2_core.errors import CheckpointError, DD2Error

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"  # a pruned or replaced step folder being deleted


class CheckpointWriteError(DD2Error, RuntimeError):
    """Writing a checkpoint failed (a full or read-only disk); the message names the folder. Exit code 1."""

    exit_code = 1


def writing(what: Path, error: BaseException) -> CheckpointWriteError:
    """The error to raise when writing `what` failed with `error` (torch and DeepSpeed name no file on ENOSPC)."""
    first = (str(error).strip().splitlines() or [""])[0]
    return CheckpointWriteError(
        f"{what}: writing the checkpoint failed ({type(error).__name__}: {first}); is the disk full or read-only? "
        "The previous checkpoint is intact; free space and rerun the same command to resume"
    )


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (temporary file + rename)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_manifest(step_dir: Path) -> dict | None:
    """The manifest of a complete checkpoint, or None when the folder is incomplete or not a checkpoint."""
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or "step" not in manifest or "modules" not in manifest:
        return None
    return manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under `folder` except the manifest."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            out[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return out


_VERIFIED: dict[tuple[str, tuple], str | None] = {}  # (folder, stat signature) -> problem: hash a checkpoint once


def _stat_signature(step_dir: Path, names: list[str]) -> tuple:
    out = []
    for rel in names:
        try:
            st = (step_dir / rel).stat()
            out.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
        except OSError:
            out.append((rel, None))
    return tuple(out)


def checkpoint_problem(step_dir: Path) -> str | None:
    """Why `step_dir` is not an intact checkpoint (None if it is): no readable manifest, or a file the manifest
    lists is missing or has another size or checksum. Manifests written before file records were kept are checked
    for their modules' engine folders, files and rank-0 state."""
    manifest = read_manifest(step_dir)
    if manifest is None:
        return f"no readable {MANIFEST}"
    files = manifest.get("files")
    key = (str(step_dir), _stat_signature(step_dir, [MANIFEST, *(files if isinstance(files, dict) else [])]))
    if key in _VERIFIED:
        return _VERIFIED[key]
    problem = None
    if isinstance(files, dict):
        for rel, rec in files.items():
            path = step_dir / rel
            if not path.is_file():
                problem = f"{rel} is missing"
            elif path.stat().st_size != rec.get("size"):
                problem = f"{rel} has {path.stat().st_size} bytes, the manifest records {rec.get('size')}"
            elif _sha256(path) != rec.get("sha256"):
                problem = f"{rel} does not match its recorded sha256 (damaged or replaced)"
            if problem:
                break
    else:
        for name, entry in manifest["modules"].items():
            path = step_dir / (name if entry.get("kind") == "engine" else entry.get("file", f"{name}.safetensors"))
            if not path.exists() or (path.is_dir() and not any(path.iterdir())):
                problem = f"{path.name} (module {name!r}) is missing"
                break
    _VERIFIED[key] = problem
    return problem


class RunFolder:
    """One stage's folder: `<run_dir>/<name>/`. Only rank 0 writes the shared files (the caller guards)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    # -- reading -------------------------------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        """(step, folder) of every complete checkpoint, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        out = []
        for p in self.checkpoints.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir() and read_manifest(p) is not None:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def latest_checkpoint(self) -> Path | None:
        """The newest intact checkpoint (`checkpoint_problem`): the one `latest` points to if it is intact, else
        the newest intact one; each skipped folder is named in the log with why. None if there is none."""
        pointer = self.checkpoints / "latest"
        skipped: list[str] = []
        if pointer.is_file():
            target = self.checkpoints / pointer.read_text().strip()
            if _STEP_RE.match(target.name) and target.is_dir():
                problem = checkpoint_problem(target)
                if problem is None:
                    return target
                skipped.append(target.name)
                logger.warning("skipped checkpoint %s (checkpoints/latest points to it): %s", target, problem)
            else:
                logger.warning("checkpoints/latest points to %s, which is not a checkpoint; scanning", target)
        for _, path in reversed(self.complete_checkpoints()):
            if path.name in skipped:
                continue
            problem = checkpoint_problem(path)
            if problem is None:
                if skipped:
                    logger.warning("using checkpoint %s instead of the damaged %s", path, ", ".join(skipped))
                return path
            skipped.append(path.name)
            logger.warning("skipped checkpoint %s: %s", path, problem)
        return None

    # -- writing (rank 0) ----------------------------------------------------------------------------------------
    def remove_partial(self) -> list[Path]:
        """Delete what a killed run leaves: `.tmp-*` (half-written) and `.old-*` (half-deleted) folders, `.latest.*`
        temporary pointer files, and step folders without a manifest (a deletion cut short; a step folder only
        gets its name after its manifest is written). Returns what was removed."""
        removed = []
        if self.checkpoints.is_dir():
            for p in sorted(self.checkpoints.iterdir()):
                if p.name.startswith((_TMP_PREFIX, _OLD_PREFIX)) or (
                    _STEP_RE.match(p.name) and p.is_dir() and not (p / MANIFEST).exists()
                ):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
                elif p.name.startswith(".latest.") and p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
        for p in removed:
            logger.warning("removed the half-written checkpoint %s", p)
        return removed

    def _delete(self, step_dir: Path) -> None:
        """Rename to `.old-step_N` (atomic: the folder stops being a checkpoint at once), then delete."""
        old = self.checkpoints / f"{_OLD_PREFIX}{step_dir.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(step_dir, old)
        shutil.rmtree(old, ignore_errors=True)

    def begin(self, step: int) -> Path:
        """Create the empty temporary folder for the checkpoint of `step` and return it."""
        tmp = self.checkpoints / f"{_TMP_PREFIX}{step_name(step)}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    def tmp_path(self, step: int) -> Path:
        return self.checkpoints / f"{_TMP_PREFIX}{step_name(step)}"

    def commit(self, step: int, manifest: Mapping[str, Any], keep_last: int) -> Path:
        """fsync the temporary folder, write its manifest, rename it to step_N, point `latest` at it, prune."""
        tmp = self.tmp_path(step)
        final = self.checkpoints / step_name(step)
        _fsync_tree(tmp)
        write_json(tmp / MANIFEST, {**manifest, "step": step, "files": file_records(tmp)})
        if final.exists():  # re-saving a step after resume from an older checkpoint: replace it
            self._delete(final)
        os.replace(tmp, final)
        _fsync_dir(self.checkpoints)
        atomic_write_bytes(self.checkpoints / "latest", step_name(step).encode())
        self.prune(keep_last)
        return final

    def prune(self, keep_last: int) -> None:
        """Keep the newest `keep_last` complete checkpoints (0 = keep all)."""
        if keep_last <= 0:
            return
        for _, p in self.complete_checkpoints()[:-keep_last]:
            self._delete(p)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A stage folder, a `checkpoints/` folder or a step folder -> a complete step folder (CheckpointError if none)."""
    path = Path(path)
    if read_manifest(path) is not None:
        if (problem := checkpoint_problem(path)) is not None:
            raise CheckpointError(f"{path}: not an intact checkpoint: {problem}")
        return path
    for folder in (RunFolder(path), RunFolder(path.parent) if path.name == "checkpoints" else None):
        if folder is not None and (found := folder.latest_checkpoint()) is not None:
            return found
    raise CheckpointError(
        f"{str(path)!r} holds no complete checkpoint: expected a stage folder with checkpoints/step_N/{MANIFEST} "
        "(a run of an earlier stage), or a step folder; did that stage run and save at least once?"
    )


def module_weights(step_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """Full fp32 weights of module `name` of a complete checkpoint: an engine's master weights (any ZeRO stage,
    read without an engine) or a replicated .safetensors file."""
    manifest = read_manifest(step_dir)
    if manifest is None:
        raise CheckpointError(f"{step_dir}: not a complete checkpoint (no readable {MANIFEST})")
    modules = manifest["modules"]
    if name not in modules:
        raise CheckpointError(
            f"{step_dir} (stage {manifest.get('stage')}) has no {name!r}; it holds {sorted(modules)}; "
            "check which stage's folder init_from points to"
        )
    entry = modules[name]
    if entry["kind"] == "engine":
        from dd2_train.engine import engine_fp32_state_dict

        return engine_fp32_state_dict(step_dir, name)
    return read_state_dict(step_dir / entry["file"])


# -- RNG and per-rank state -----------------------------------------------------------------------------------------
def capture_rng(rng: torch.Generator | None) -> dict[str, Any]:
    """Every RNG a step may draw from: torch CPU/CUDA, python, numpy and the loop's own generator."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if rng is not None:
        state["loop"] = rng.get_state()
    return state


def restore_rng(state: Mapping[str, Any], rng: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if rng is not None:
        if "loop" not in state:
            raise CheckpointError("checkpoint has no loop RNG state; was it written by another stage?")
        rng.set_state(state["loop"])


def save_rank_state(step_dir: Path, rank: int, state: Mapping[str, Any]) -> None:
    """Per-rank state (RNG, data position): plain tensors, lists and numbers, readable with weights_only=True."""
    path = step_dir / f"rank_{rank:05d}.pt"
    try:
        torch.save(dict(state), path)
    except (OSError, RuntimeError) as e:
        raise writing(path, e) from e


def load_rank_state(step_dir: Path, rank: int) -> dict[str, Any]:
    path = step_dir / f"rank_{rank:05d}.pt"
    if not path.is_file():
        raise CheckpointError(
            f"{step_dir}: no state for rank {rank} ({path.name}); was it saved with another world size?"
        )
    from dd2_train.safe_load import safe_torch_load

    return safe_torch_load(path)
