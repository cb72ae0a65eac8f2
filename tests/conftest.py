"""Fixtures shared by the end-to-end tests: a fresh virtual environment where only dd2-core is installed.

Fresh-venv method: `venv` without pip (seconds), dd2-core built as a wheel from the repo and installed into it with
this venv's pip (`pip --python`), and its third-party dependencies made visible through one .pth line pointing at a
folder of symlinks to exactly the distributions in dd2-core's declared dependency closure (torch, numpy, einops,
pydantic, safetensors, pillow and what they require), taken from this venv: no network, no second copy of torch,
and nothing else of this venv (no dd2 package, no deepspeed) on the new interpreter's path.
"""

import re
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _requirement_names(dist: metadata.Distribution) -> list[str]:
    """Names of a distribution's unconditional requirements (no extras; environment markers evaluated)."""
    from packaging.requirements import Requirement

    names = []
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names


def _dependency_closure(root: str) -> list[metadata.Distribution]:
    """`root`'s installed requirements, recursively (not `root` itself)."""
    seen: dict[str, metadata.Distribution] = {}
    todo = _requirement_names(metadata.distribution(root))
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        seen[name] = dist = metadata.distribution(name)
        todo += _requirement_names(dist)
    return list(seen.values())


def _link_distributions(dists: list[metadata.Distribution], folder: Path) -> None:
    """Symlink each distribution's top-level files and folders (and its .dist-info) into `folder`."""
    folder.mkdir()
    for dist in dists:
        site = Path(dist.locate_file(""))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if top in ("__pycache__",) or top.endswith(".pth"):
                continue
            target = folder / top
            if (site / top).exists() and not target.exists():
                target.symlink_to(site / top)


@pytest.fixture(scope="session")
def core_only_venv(tmp_path_factory) -> Path:
    """A fresh venv (its folder) with dd2-core installed from a wheel of this repo and nothing else of dd2.

    Run its `bin/python` and `bin/dd2` with env={"PATH": "/usr/bin:/bin"}.
    """
    root = tmp_path_factory.mktemp("core_only")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())  # fmt: skip
    deps = root / "deps"
    _link_distributions(_dependency_closure("dd2-core"), deps)
    (site / "dd2_core_deps.pth").write_text(f"{deps}\n")
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT / "packages" / "dd2-core"],
                   check=True)  # fmt: skip
    wheel = next(wheels.glob("dd2_core-*.whl"))
    subprocess.run([*pip, "--python", py, "install", "--no-deps", "--no-index", wheel], check=True)
    return env_dir
