"""Sessions for the dd2 monorepo. They run in the interpreter nox was started from (`.venv`, made by `.ci/setup`):

.venv/bin/nox -s lint layering tests    # what CI runs (README)
.venv/bin/nox -s demo                   # the main job: the Fashion-MNIST demo (runs/demo/report)
.venv/bin/nox -s proof                  # the exact CSD proof at full size, JSON in runs/proof.json
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import nox

nox.options.sessions = ["lint", "layering", "tests"]
ROOT = Path(__file__).parent
PACKAGES = ["dd2-core", "dd2-teachers", "dd2-train", "dd2-eval"]

# which dd2 packages each package may import (DESIGN.md); dd2_eval may import dd2_teachers only behind its extra
ALLOWED = {
    "dd2_core": set(),
    "dd2_teachers": {"dd2_core"},
    "dd2_eval": {"dd2_core", "dd2_teachers"},
    "dd2_train": {"dd2_core", "dd2_teachers"},
}
TRAIN_ONLY = {"deepspeed", "webdataset"}  # any other package importing these fails the layering session


def _in_venv(session: nox.Session) -> None:
    if sys.prefix == sys.base_prefix:
        session.error("run nox from the project venv: bash .ci/setup && .venv/bin/nox -s ...")


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Every package's tests and the cross-package tests (CPU)."""
    _in_venv(session)
    session.run(sys.executable, "-m", "pytest", "-q", *session.posargs, external=True)


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check with the root config."""
    _in_venv(session)
    session.run(sys.executable, "-m", "ruff", "check", ".", external=True)
    session.run(sys.executable, "-m", "ruff", "format", "--check", ".", external=True)


@nox.session(venv_backend="none")
def layering(session: nox.Session) -> None:
    """Imports only go down: parse every src/ file and fail on an import outside ALLOWED / TRAIN_ONLY."""
    bad = []
    for pkg in PACKAGES:
        name = pkg.replace("-", "_")
        for path in sorted((ROOT / "packages" / pkg / "src").rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    if top.startswith("dd2_") and top != name and top not in ALLOWED[name]:
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name} may not import {top}")
                    if top in TRAIN_ONLY and name != "dd2_train":
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: only dd2_train may import {top}")
    if bad:
        session.error("layering violations:\n" + "\n".join(bad))
    session.log(f"layering ok: {', '.join(PACKAGES)}")


@nox.session(venv_backend="none")
def proof(session: nox.Session) -> None:
    """The enumerable-teacher proof at full size; writes runs/proof.json (a benchmark, minutes on 2 cores)."""
    _in_venv(session)
    out = session.posargs[0] if session.posargs else "runs/proof.json"
    session.run(sys.executable, "-m", "dd2_train.proof", "--preset", "full", "--out", out, external=True)


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """The main job: Fashion-MNIST pixels -> tokenizer -> LlamaGen teacher -> DD2 one-step, ending in the comparison
    table (runs/demo/report/; `-- --family var`: a VAR teacher, runs/demo-var/report/). A second run reuses every
    finished step. Extra arguments go to demo/fashion_mnist.py."""
    _in_venv(session)
    session.run(sys.executable, "demo/fashion_mnist.py", *session.posargs, external=True)
