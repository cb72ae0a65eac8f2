"""The teacher of a pipeline, for timing its AR sampler (`dd2-eval bench`), found as a plugin.

dd2-eval does not import dd2-teachers: dd2-teachers registers its loader as the entry point `load` of the group
`dd2.teachers` (`dd2_teachers.registry:load_teacher`), and `load_teacher_plugin` calls whatever is installed there
with a reference dict, the `teacher_ref.json` that export writes into a pipeline folder (family, size, ckpt,
vq_ckpt, policy, ...). Install it with `pip install 'dd2-eval[teachers]'`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch

from dd2_eval.errors import EvalError, MissingExtraError, MissingResourceError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dd2.teachers"
ENTRY_POINT_NAME = "load"
TEACHER_REF = "teacher_ref.json"  # in a pipeline folder (dd2_core.pipeline.OneStepPipeline.save_pretrained)
INSTALL_HINT = "timing the teacher needs dd2-teachers: pip install 'dd2-eval[teachers]' (or packages/dd2-teachers)"


def teacher_plugin() -> Callable[..., Any] | None:
    """The installed `dd2.teachers` loader (`load(ref, *, device, dtype, compile)`), or None when none is installed."""
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == ENTRY_POINT_NAME]
    if not found:
        return None
    if len({ep.value for ep in found}) > 1:
        raise EvalError(
            f"entry point group {ENTRY_POINT_GROUP!r}: expected one {ENTRY_POINT_NAME!r} loader, found "
            f"{sorted(ep.value for ep in found)}; uninstall all but one"
        )
    return found[0].load()


def load_teacher_plugin(
    ref: Mapping[str, Any], device: torch.device | str, dtype: torch.dtype | None = None, compile: bool = False
) -> Any:
    """The frozen teacher that `ref` (a teacher_ref.json dict) names, built by the installed dd2-teachers on `device`
    (dtype None = the family's default; compile = the family's compiled decode step). It has the Teacher protocol's
    `sample(labels (B,), generator=) -> ids (B, N)` and, for image teachers, `decode(ids) -> (B, 3, H, W)`.

    Raises MissingExtraError when dd2-teachers is not installed; the loader's errors name the bad key.
    """
    load = teacher_plugin()
    if load is None:
        raise MissingExtraError(INSTALL_HINT)
    return load(ref, device=device, dtype=dtype, compile=compile)


def read_teacher_ref(path: str | os.PathLike) -> dict[str, Any]:
    """A teacher reference JSON file (a pipeline folder's teacher_ref.json) as a dict."""
    path = Path(path)
    if not path.is_file():
        raise MissingResourceError(
            f"teacher reference {str(path)!r}: no such file; expected a JSON file like a pipeline's {TEACHER_REF}"
        )
    try:
        ref = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalError(f"teacher reference {str(path)!r}: expected JSON, could not parse it ({e})") from e
    if not isinstance(ref, dict):
        raise EvalError(f"teacher reference {str(path)!r}: expected a JSON object, found {type(ref).__name__}")
    return ref
