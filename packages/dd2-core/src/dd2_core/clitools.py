"""One error path for every dd2 command (`dd2`, `dd2-eval`, dd2-train's `run.py`), and argument types that check
their value where argparse can name the option.

    return run_main("dd2", lambda: args.func(args), debug=args.debug)

A failure prints one `<prog>: error: ...` message of at most three lines (naming the file, key or argument, what
was expected and what was found) and returns exit code 2 for bad input (a dd2 error, a missing or unwritable path,
an invalid config) or 1 for a failure while running (a full disk, an out-of-memory, a bug). `--debug`, or the
environment variable DD2_DEBUG=1, prints the traceback as well.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

import torch

from dd2_core.errors import DD2Error

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
MAX_LINES = 3
_BAD_INPUT_OS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


def debug_requested(flag: bool = False) -> bool:
    return flag or os.environ.get("DD2_DEBUG", "").strip() not in ("", "0")


def exit_code(error: BaseException) -> int:
    """2 for bad input, 1 for a failure while running; a DD2Error may say otherwise with `exit_code`."""
    code = getattr(error, "exit_code", None)
    if isinstance(error, DD2Error) and isinstance(code, int):
        return code
    if isinstance(error, (DD2Error, *_BAD_INPUT_OS)) or type(error).__name__ == "ValidationError":  # pydantic
        return EXIT_BAD_INPUT
    return EXIT_FAILURE


def error_message(error: BaseException, *, max_lines: int = MAX_LINES) -> str:
    """The message a user sees: the error's own text (an unexpected error type is named), at most `max_lines`."""
    text = str(error).strip()
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    if not isinstance(error, (DD2Error, OSError)) and type(error).__name__ != "ValidationError":
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    lines = text.splitlines() or [type(error).__name__]
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], f"{lines[max_lines - 1]} (+{len(lines) - max_lines} more lines: --debug)"]
    return "\n".join(lines)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def run_main(
    prog: str,
    fn: Callable[[], int | None],
    *,
    debug: bool = False,
    prefix: str = "",
    report: Callable[[str], None] = _stderr,
) -> int:
    """Run a command's body; any failure becomes one message (`report`: stderr, or e.g. a logger's `error`) and an
    exit code (module docstring)."""
    try:
        return int(fn() or 0)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        report(f"{prog}: {prefix}interrupted")
        return 130
    except BaseException as e:
        if debug_requested(debug):
            traceback.print_exc()
        code = exit_code(e)
        hint = "" if code == EXIT_BAD_INPUT or debug_requested(debug) else " (--debug or DD2_DEBUG=1: traceback)"
        report(f"{prog}: {prefix}error: {error_message(e)}{hint}")
        return code


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error (or set DD2_DEBUG=1)")


# -- argument types: argparse turns their ArgumentTypeError into "argument --x: ..." and exit code 2 -----------------
def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def seed_int(text: str) -> int:
    """A seed torch.Generator.manual_seed accepts: 0 <= seed < 2**63."""
    value = _int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**63 - 1], got {text!r}")
    return value


def device_name(text: str) -> str:
    """A torch device this machine has ('auto' passes through)."""
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif device.type not in ("cpu", "meta") and not _backend_available(device.type):
        raise argparse.ArgumentTypeError(f"{text!r}: no {device.type} device on this machine")
    return text


def _backend_available(kind: str) -> bool:
    module = getattr(torch, kind, None) or getattr(torch.backends, kind, None)
    available = getattr(module, "is_available", None)
    return bool(available()) if callable(available) else False


def class_ids(text: str) -> tuple[int, ...]:
    """Comma-separated class ids, e.g. 0,1,2 (range checks need the pipeline: the caller does them)."""
    try:
        ids = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError(f"expected at least one class id, got {text!r}")
    return ids


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
