"""Test helper (not a test module): run packages/dd2-train/run.py, but SIGKILL this process while it commits the
checkpoint named by DD2_TEST_KILL="<stage>:<step>", i.e. after every rank wrote its files into `.tmp-step_N/` and
before the manifest and rename. Only rank 0 commits; the launcher then takes the other ranks down.

    python -m torch.distributed.run --nproc_per_node 2 kill_during_commit.py --config CFG
"""

import os
import runpy
import signal
import sys
from pathlib import Path

from dd2_train.checkpoint import RunFolder

stage, step = os.environ["DD2_TEST_KILL"].split(":")
original = RunFolder.commit


def commit(self, at: int, manifest, keep_last):
    if manifest["stage"] == stage and at == int(step):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, at, manifest, keep_last)


RunFolder.commit = commit
run_py = Path(__file__).resolve().parents[1] / "run.py"
sys.argv = [str(run_py), *sys.argv[1:]]
runpy.run_path(str(run_py), run_name="__main__")
