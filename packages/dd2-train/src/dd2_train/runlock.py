"""One writer per run folder: an exclusive lock on `<run_dir>/.dd2.lock`, held by rank 0 for the whole launch.

The lock is an OS file lock (fcntl.flock), so the kernel releases it when its process dies, however it dies; the
file itself stays and records the holder ({"host", "pid", "started"}). A second launch into the same folder stops
at once with a message naming the holder. A lock file whose holder is gone (the flock is free) is taken over, and
the log says whose it was. flock is not reliable on every network file system; there the host/pid record at least
names the other writer when a launch finds the flock free but the pid alive on this host.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from dd2_core.errors import DD2Error

logger = logging.getLogger(__name__)

LOCK_NAME = ".dd2.lock"


class RunFolderBusy(DD2Error, RuntimeError):
    """Another live process holds the run folder's lock."""


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} (since {when})"


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """`with RunLock(run_dir):` or acquire()/release(). Raises RunFolderBusy if another process holds it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderBusy(
                f"{self.path.parent}: in use by {_describe(_read_holder(self.path))}, which holds {self.path}; "
                "wait for it to finish, stop it, or write to another run_dir"
            ) from None
        previous = _read_holder(self.path)
        host = socket.gethostname()
        if previous.get("host") == host and previous.get("pid") != os.getpid() and _pid_alive(previous.get("pid")):
            # the flock is free but the recorded process lives: a file system without working flock (some NFS)
            os.close(fd)
            raise RunFolderBusy(
                f"{self.path.parent}: {self.path} names {_describe(previous)}, which is still running; "
                "wait for it to finish, stop it, or write to another run_dir"
            )
        if previous:
            logger.warning("took over the run-folder lock %s of %s, which is no longer running", self.path,
                           _describe(previous))  # fmt: skip
        record = json.dumps({"host": host, "pid": os.getpid(), "started": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Clear the holder record and drop the lock (the file stays: removing it would race a waiting launch)."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
